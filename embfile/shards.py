"""Sharded datasets: one dataset over a folder (or a list) of .emb files.

A folder of shards carries an index, ``_index.emb``: itself an .emb file whose keys are all the shards'
keys in dataset row order, each with its shard number as a one-element uint32 record (FORMAT.md "Sharded
datasets").  Its index and keys are the dataset's, so a lookup is one binary search in it and then a read
from the shard, however many shards there are.  The index lists each shard's name, count and key checksum
and is checked against them at open.  Files whose names start with ``_`` or ``.`` are not shards.

Without an index (a list of paths, or a folder assembled by hand) ``open`` builds one in a temporary
file, reading every key once and refusing a key found in two shards; :func:`write_index` writes it into
the folder for good.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from embfile import errors
from embfile._staging import Staging
from embfile._stream import source_of
from embfile.dataset import Dataset
from embfile.file import MappedFile
from embfile.writer import Writer, write_source

INDEX_NAME = "_index.emb"
_META_KEY = "embfile.shards"
_KEY_CHUNK = 1 << 16  # keys read from a shard at a time while indexing

PathLike = str | os.PathLike[str]


def shard_paths(folder: PathLike) -> list[str]:
    """The shard files of ``folder`` in name order: ``*.emb`` not starting with ``_`` or ``.``."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".emb") and n[0] not in "_.")
    return [os.path.join(folder, n) for n in names]


def _identity(shard: MappedFile) -> dict[str, Any]:
    return {"name": os.path.basename(shard.path), "count": shard.count, "keys_crc": shard.stored_crc("keys")}


def _build_index(path: str, shards: Sequence[MappedFile]) -> None:
    """Write the index of ``shards`` to ``path``; a key in two shards is a ShardError."""
    bounds = np.cumsum([0] + [s.count for s in shards])
    try:
        with Writer(path, 1, "uint32", {_META_KEY: [_identity(s) for s in shards]}) as w:
            for number, shard in enumerate(shards):
                table = shard.table()
                for lo in range(0, shard.count, _KEY_CHUNK):
                    keys = table.keys_between(lo, lo + _KEY_CHUNK)
                    w.add_batch(keys, np.full((len(keys), 1), number, np.uint32))
    except errors.DuplicateKeyError as e:
        where = [
            f"{shards[s].path} (row {r - bounds[s]})"
            for r in e.rows
            for s in [int(np.searchsorted(bounds, r, side="right")) - 1]
        ]
        raise errors.ShardError(f"key {e.key!r} is in two shards: {where[0]} and {where[1]}") from None


def write_index(folder: PathLike) -> None:
    """Write (or rewrite) ``folder/_index.emb`` for the shards in ``folder``.

    Reads every key once; a key found in two shards is a :class:`ShardError` naming both files, and then
    nothing is written.
    """
    shards: list[MappedFile] = []
    try:
        for p in shard_paths(folder):
            shards.append(MappedFile(p))
        _check_shards(shards, os.fspath(folder))
        _build_index(os.path.join(folder, INDEX_NAME), shards)
    finally:
        for shard in shards:
            shard.close()


def _check_shards(shards: Sequence[MappedFile], where: str) -> None:
    if not shards:
        raise errors.ShardError(f"{where}: no .emb shards")
    first = shards[0]
    for s in shards[1:]:
        if (s.dim, s.dtype) != (first.dim, first.dtype):
            raise errors.ShardError(
                f"{s.path} has dim {s.dim} and dtype {s.dtype.name}, "
                f"{first.path} dim {first.dim} and dtype {first.dtype.name}"
            )


class ShardedEmbFile(Dataset):
    """A dataset over several .emb files (see the module, and :class:`Dataset` for what it offers).

    Rows are numbered across the shards in order (shard 0's rows first); keys, values and items iterate
    in that order.

    Parameters
    ----------
    source : str, os.PathLike or list
        A folder of shards (with its ``_index.emb``, or indexed at open without one), or the shard files.

    Raises
    ------
    ShardError
        If the shards do not fit together (dim, dtype, a key in two of them, an index that no longer
        describes them).
    """

    def __init__(self, source: PathLike | Sequence[PathLike]) -> None:
        self._source = source
        if isinstance(source, (str, os.PathLike)):
            folder = os.fspath(source)
            paths, index_path, where = shard_paths(folder), os.path.join(folder, INDEX_NAME), folder
        else:
            paths, index_path, where = [os.fspath(p) for p in source], None, "shard list"
        shards: list[MappedFile] = []
        index = None
        try:
            for p in paths:
                shards.append(MappedFile(p))
            _check_shards(shards, where)
            if index_path is not None and os.path.exists(index_path):
                index = self._checked_index(index_path, shards)
            else:
                with tempfile.TemporaryDirectory(prefix="embfile-index-") as tmp:
                    _build_index(os.path.join(tmp, INDEX_NAME), shards)
                    index = MappedFile(os.path.join(tmp, INDEX_NAME))  # stays mapped once unlinked
            self._open_files(index, shards, folder if index_path else None)
        except BaseException:
            for f in [*shards, *([index] if index is not None else [])]:
                f.close()
            raise

    @staticmethod
    def _checked_index(path: str, shards: Sequence[MappedFile]) -> MappedFile:
        index = MappedFile(path)
        want = [_identity(s) for s in shards]
        if index.metadata.get(_META_KEY) != want or index.count != sum(s.count for s in shards):
            index.close()
            raise errors.ShardError(
                f"{path} does not describe the shards beside it (a shard was added, removed or rewritten): "
                "rebuild it with embfile.write_index(folder) or `embfile index FOLDER`"
            )
        return index

    @property
    def shards(self) -> tuple[MappedFile, ...]:
        """The shard files, in row order (the same as :attr:`~embfile.Dataset.files`)."""
        return self.files

    def _consistency_problems(self) -> list[str]:
        """Whether the index matches the shards record for record: shard numbers and keys."""
        problems = []
        numbers = self._index.matrix[:, 0]
        for s, shard in enumerate(self.files):
            lo, hi = self._starts[s], self._starts[s + 1]
            if (numbers[lo:hi] != s).any():
                problems.append(f"index: rows {lo}-{hi} do not all point at shard {s}")
            table = shard.table()
            for a in range(lo, hi, _KEY_CHUNK):
                b = min(a + _KEY_CHUNK, hi)
                if self.keys_between(a, b) != table.keys_between(a - lo, b - lo):
                    problems.append(f"index: keys of rows {a}-{b} differ from {shard.path}")
                    break
        return problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardedEmbFile, (self._source,))


class ShardWriter:
    """Write a sharded dataset: like :class:`~embfile.Writer`, but starts a new shard every
    ``shard_bytes`` of records (default 1 GiB).

    The shards (``part-00000.emb``, ...) and the index are written into a hidden folder beside ``folder``
    and renamed into place on a clean close, so ``folder`` appears complete or not at all.  ``folder``
    must not exist yet, or be empty.  A key in two shards is found at close (a :class:`ShardError`).
    """

    def __init__(
        self,
        folder: PathLike,
        dim: int,
        dtype: object = "float32",
        metadata: dict[str, Any] | None = None,
        *,
        shard_bytes: int = 1 << 30,
        **options: Any,
    ) -> None:
        self.folder = os.fspath(folder).rstrip(os.sep) or os.sep
        if os.path.exists(self.folder) and (not os.path.isdir(self.folder) or os.listdir(self.folder)):
            raise errors.WriterError(f"{self.folder} exists and is not an empty folder")
        record_bytes = int(dim) * np.dtype(dtype).itemsize  # type: ignore[call-overload]
        if shard_bytes < record_bytes:
            raise ValueError(f"shard_bytes {shard_bytes} is less than one record ({record_bytes} bytes)")
        self._per_shard = int(shard_bytes) // record_bytes
        self._staging = Staging(self.folder, folder=True)
        self._args = (dim, dtype, metadata)
        self._options = options
        self._shards = 0
        self._writer: Writer | None = self._next_writer()
        self.dim, self.dtype = self._writer.dim, self._writer.dtype

    def _next_writer(self) -> Writer:
        path = os.path.join(self._staging.path, f"part-{self._shards:05d}.emb")
        self._shards += 1
        return Writer(path, *self._args, **self._options)

    def _current(self) -> Writer:
        if self._writer is None:
            raise errors.ClosedFileError(f"{self.folder}: operation on a closed ShardWriter")
        return self._writer

    def _room(self) -> int:
        """Records the current shard still takes, after starting a new one if it is full."""
        if len(self._current()) >= self._per_shard:
            self._current().close()
            self._writer = self._next_writer()
        return int(self._per_shard - len(self._current()))

    def add(self, key: str, vector: Any) -> None:
        """Append one record (see :meth:`Writer.add`)."""
        self._room()
        self._current().add(key, vector)

    def add_batch(self, keys: Sequence[str] | np.ndarray, matrix: Any) -> None:
        """Append one record per row of ``matrix`` (see :meth:`Writer.add_batch`)."""
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        lo = 0
        while lo < len(keys):
            hi = lo + self._room()
            self._current().add_batch(keys[lo:hi], matrix[lo:hi])
            lo = hi

    def close(self) -> None:
        """Finish the last shard, write the index and move the folder into place."""
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._writer = None
            write_index(self._staging.path)
            self._staging.commit()  # replaces an empty folder (checked at the start)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything; ``folder`` is left as it was."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._staging.discard()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(
    folder: PathLike,
    data: Any,
    shard_bytes: int = 1 << 30,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Split ``data`` into a sharded dataset in ``folder`` (see :class:`ShardWriter`).

    ``data`` is an open dataset (streamed; its user metadata is kept unless ``metadata`` is given),
    another mapping ``{key: vector}`` or a ``(keys, matrix)`` pair.
    """
    source = source_of(data, "write_shards()")
    meta = source.metadata if metadata is None else metadata

    def open_sink(dim: int, dt: object) -> ShardWriter:
        return ShardWriter(folder, dim, dt, meta or None, shard_bytes=shard_bytes, **options)

    write_source(source, open_sink, dtype)
