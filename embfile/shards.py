"""Sharded datasets: one dataset over a folder (or a list) of .emb files.

A folder written by this embfile is *versioned* (FORMAT.md "Versioned datasets"): its shards sit in
``shards/``, each version's manifest names the shards and the key-index segment of that version, and a commit
publishes a new version without changing any file an earlier version uses.  The segment's keys and rows are the
dataset's, so a lookup is one binary search in it and then a read from the shard, however many shards there are.

Folders in 0.1's layout (``part-*.emb`` beside ``_index.emb``, an .emb file of every key with its shard's
number) still open.  Without an index (a list of paths, or a 0.1 folder assembled by hand) ``open`` builds one
in a temporary file, reading every key once and refusing a key found in two shards; :func:`write_index` writes
it into a 0.1 folder for good.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from embfile import errors
from embfile import folder as layout
from embfile._staging import Staging, fsync_path
from embfile._stream import source_of
from embfile.dataset import Dataset
from embfile.file import MappedFile
from embfile.writer import Writer, write_source

INDEX_NAME = "_index.emb"  # 0.1's layout
_META_KEY = "embfile.shards"
_KEY_CHUNK = 1 << 16  # keys read from a shard at a time while indexing

PathLike = str | os.PathLike[str]


def shard_paths(folder: PathLike) -> list[str]:
    """The shard files of a folder in 0.1's layout, in name order: ``*.emb`` not starting with ``_`` or ``.``."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".emb") and n[0] not in "_.")
    return [os.path.join(folder, n) for n in names]


def _identity(shard: MappedFile) -> dict[str, Any]:
    return {"name": os.path.basename(shard.path), "count": shard.count, "keys_crc": shard.stored_crc("keys")}


def _build_index(path: str, shards: Sequence[MappedFile], segment: bool = False, metadata: Any = None) -> None:
    """Write the key index of ``shards`` to ``path``: every key in dataset row order with its row (a
    versioned dataset's segment) or its shard's number (0.1's ``_index.emb``).  A key in two shards is a
    ShardError naming both."""
    bounds = np.cumsum([0] + [s.count for s in shards])
    if metadata is None:
        metadata = {_META_KEY: [_identity(s) for s in shards]}
    try:
        with Writer(path, 1, "uint64" if segment else "uint32", metadata) as w:
            for number, shard in enumerate(shards):
                table = shard.table()
                for lo in range(0, shard.count, _KEY_CHUNK):
                    keys = table.keys_between(lo, lo + _KEY_CHUNK)
                    first = int(bounds[number]) + lo
                    records = np.arange(first, first + len(keys)) if segment else np.full(len(keys), number)
                    w.add_batch(keys, records[:, None])
    except errors.DuplicateKeyError as e:
        where = [
            f"{shards[s].path} (row {r - bounds[s]})"
            for r in e.rows
            for s in [int(np.searchsorted(bounds, r, side="right")) - 1]
        ]
        raise errors.ShardError(f"key {e.key!r} is in two shards: {where[0]} and {where[1]}") from None


def write_index(folder: PathLike) -> None:
    """Write (or rewrite) ``folder/_index.emb`` for the shards of a folder in 0.1's layout.

    Reads every key once; a key found in two shards is a :class:`ShardError` naming both files, and then
    nothing is written.  A versioned folder keeps its index in each version: there is nothing to rebuild.
    """
    if layout.is_versioned(folder):
        raise errors.ShardError(f"{os.fspath(folder)}: a versioned dataset; its index is part of each version")
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


def _open_named(folder: str, entry: layout.FileEntry) -> MappedFile:
    """A file a manifest names, checked to be the one it names (count and keys CRC)."""
    try:
        f = MappedFile(os.path.join(folder, entry.path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise errors.ShardError(f"{folder}: the manifest names {entry.path}, which is not a file there") from None
    found = (f.count, f.stored_crc("keys"))
    if found != (entry.count, entry.keys_crc):
        f.close()
        raise errors.ShardError(
            f"{f.path} is not the file the manifest names ({found[0]} records, keys CRC {found[1]:#x}; "
            f"the manifest says {entry.count} and {entry.keys_crc:#x}): it was replaced"
        )
    return f


class ShardedEmbFile(Dataset):
    """A dataset over several .emb files (see the module, and :class:`Dataset` for what it offers).

    Rows are numbered across the shards in order (shard 0's rows first); keys, values and items iterate
    in that order.

    Parameters
    ----------
    source : str, os.PathLike or list
        A dataset folder (versioned, or in 0.1's layout), or a list of shard files.
    version : int, optional
        Of a versioned folder, the version to open (default: the latest).  The handle keeps reading it while
        later versions are committed.

    Raises
    ------
    ShardError
        If the shards do not fit together (dim, dtype, a key in two of them, an index or a manifest that no
        longer describes them).
    VersionNotFoundError
        If the folder has no such version.
    """

    def __init__(self, source: PathLike | Sequence[PathLike], version: int | None = None) -> None:
        self._source = source
        if isinstance(source, (str, os.PathLike)) and layout.is_versioned(source):
            self._open_version(os.fspath(source), version)
            return
        if version is not None:
            raise ValueError(f"{source}: version= applies to a versioned dataset folder only")
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

    def _open_version(self, folder: str, version: int | None) -> None:
        manifest = layout.read_manifest(folder, version)
        (segment,) = manifest.segments if len(manifest.segments) == 1 else (None,)
        if segment is None or segment.rows != (0, manifest.count):
            raise errors.UnsupportedVersionError(
                f"{folder}: version {manifest.version} has {len(manifest.segments)} key-index segments; "
                "this embfile reads versions with one"
            )
        files: list[MappedFile] = []
        try:
            for entry in manifest.shards:
                files.append(_open_named(folder, entry))
            _check_shards(files, folder)
            if (files[0].dim, files[0].dtype.name) != (manifest.dim, manifest.dtype):
                raise errors.ShardError(f"{files[0].path} is not of the manifest's dim and dtype")
            files.append(_open_named(folder, segment))
            if (files[-1].dim, files[-1].dtype) != (1, np.dtype("<u8")):
                raise errors.CorruptFileError(f"{files[-1].path}: a key-index segment holds one uint64 per key")
            self._open_files(files[-1], files[:-1], folder)
        except BaseException:
            for f in files:
                f.close()
            raise
        self.version, self.manifest = manifest.version, manifest

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
        """Whether the index matches the shards record for record: its records (the row, or in 0.1's
        layout the shard number) and its keys."""
        problems = []
        records = np.concatenate([segment.matrix[:, 0] for segment in self._segments])
        for s, shard in enumerate(self.files):
            lo, hi = self._starts[s], self._starts[s + 1]
            want = np.arange(lo, hi) if self.version is not None else s
            if (records[lo:hi] != want).any():
                problems.append(f"index: rows {lo}-{hi} do not all point at shard {s}")
            table = shard.table()
            for a in range(lo, hi, _KEY_CHUNK):
                b = min(a + _KEY_CHUNK, hi)
                if self.keys_between(a, b) != table.keys_between(a - lo, b - lo):
                    problems.append(f"index: keys of rows {a}-{b} differ from {shard.path}")
                    break
        return problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardedEmbFile, (self._source, self.version))  # a worker reads the same version


class ShardWriter:
    """Write a versioned sharded dataset: like :class:`~embfile.Writer`, but starts a new shard every
    ``shard_bytes`` of records (default 1 GiB).

    With ``mode="error"`` (the default) ``folder`` must not exist yet, or be empty: the whole dataset (shards,
    key index, version 1) is written beside it and renamed into place on a clean close, so ``folder`` appears
    complete or not at all.  With ``mode="overwrite"`` ``folder`` may also be a versioned dataset: the records
    written become its next version, and earlier versions stay readable.  A key in two shards is found at
    close (a :class:`ShardError`); on any error nothing is committed.
    """

    def __init__(
        self,
        folder: PathLike,
        dim: int,
        dtype: object = "float32",
        metadata: dict[str, Any] | None = None,
        *,
        shard_bytes: int = 1 << 30,
        mode: str = "error",
        **options: Any,
    ) -> None:
        if mode not in ("error", "overwrite"):
            raise ValueError(f"mode must be 'error' or 'overwrite', not {mode!r}")
        self.folder = os.fspath(folder).rstrip(os.sep) or os.sep
        exists = os.path.exists(self.folder) and (not os.path.isdir(self.folder) or os.listdir(self.folder))
        self._into = self.folder if exists and mode == "overwrite" and layout.is_versioned(self.folder) else None
        if exists and self._into is None:
            what = (
                "a dataset: mode='overwrite' (--overwrite) writes its next version"
                if layout.is_versioned(self.folder)
                else "not an empty folder or a versioned dataset"
            )
            raise errors.WriterError(f"{self.folder} exists and is {what}")
        record_bytes = int(dim) * np.dtype(dtype).itemsize  # type: ignore[call-overload]
        if shard_bytes < record_bytes:
            raise ValueError(f"shard_bytes {shard_bytes} is less than one record ({record_bytes} bytes)")
        self._per_shard = int(shard_bytes) // record_bytes
        if self._into is None:  # a new dataset: built whole beside the destination
            self._staging = Staging(self.folder, folder=True)
            self._root = self._staging.path
            layout.make_layout(self._root)
        else:  # a new version: built in the dataset's staging folder, moved in at commit
            self._staging = Staging(os.path.join(self._into, layout.STAGING, "write"), folder=True)
            self._root = self._staging.path
            os.makedirs(os.path.join(self._root, layout.SHARDS))
            os.makedirs(os.path.join(self._root, layout.INDEX))
        self._token = layout.unique_name()
        self._args = (dim, dtype, metadata)
        self._metadata = dict(metadata or {})
        self._options = options
        self._shard_names: list[str] = []
        self._writer: Writer | None = self._next_writer()
        self.dim, self.dtype = self._writer.dim, self._writer.dtype

    def _next_writer(self) -> Writer:
        name = f"{layout.SHARDS}/{self._token}-{len(self._shard_names):05d}.emb"
        self._shard_names.append(name)
        return Writer(os.path.join(self._root, name), *self._args, **self._options)

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
        """Finish the last shard, write the key index and commit the version."""
        if self._writer is None:
            return
        try:
            self._writer.close()
            self._writer = None
            self._commit()
        except BaseException:
            self.abort()
            raise

    def _commit(self) -> None:
        shards = [MappedFile(os.path.join(self._root, name)) for name in self._shard_names]
        segment_name = f"{layout.INDEX}/{self._token}.emb"
        try:
            _check_shards(shards, self.folder)
            _build_index(os.path.join(self._root, segment_name), shards, segment=True, metadata={})
            segment = MappedFile(os.path.join(self._root, segment_name))
            entries = [layout.FileEntry(n, s.count, s.stored_crc("keys")) for n, s in zip(self._shard_names, shards)]
            count = sum(s.count for s in shards)
            seg_entry = layout.FileEntry(segment_name, count, segment.stored_crc("keys"), (0, count))
            segment.close()
        finally:
            for s in shards:
                s.close()
        if self._into is None:
            manifest = self._manifest(1, None, "write", entries, seg_entry, count)
            layout.commit(self._root, manifest)
            self._staging.commit()  # replaces an empty folder (checked at the start)
            return
        for name in [*self._shard_names, segment_name]:  # in place under unique names: invisible until committed
            os.rename(os.path.join(self._root, name), os.path.join(self._into, name))
        for sub in (layout.SHARDS, layout.INDEX):
            fsync_path(os.path.join(self._into, sub))
        while True:  # an overwrite does not depend on what it replaces: on a conflict, commit after the winner
            latest = layout.latest_version(self._into)
            try:
                layout.commit(self._into, self._manifest(latest + 1, latest, "overwrite", entries, seg_entry, count))
                break
            except errors.CommitConflictError:
                continue
        self._staging.discard()

    def _manifest(
        self,
        version: int,
        parent: int | None,
        operation: str,
        shards: list[layout.FileEntry],
        segment: layout.FileEntry,
        count: int,
    ) -> layout.Manifest:
        return layout.Manifest(
            version=version,
            parent=parent,
            dim=self.dim,
            dtype=self.dtype.name,
            count=count,
            shards=tuple(shards),
            segments=(segment,),
            operation={"name": operation, "records": count},
            metadata=self._metadata,
        )

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
    *,
    mode: str = "error",
    **options: Any,
) -> None:
    """Split ``data`` into a versioned sharded dataset in ``folder`` (see :class:`ShardWriter`).

    ``data`` is an open dataset (streamed; its user metadata is kept unless ``metadata`` is given), another
    mapping ``{key: vector}`` or a ``(keys, matrix)`` pair.  ``mode="overwrite"`` writes a new version of an
    existing dataset.
    """
    source = source_of(data, "write_shards()")
    meta = source.metadata if metadata is None else metadata

    def open_sink(dim: int, dt: object) -> ShardWriter:
        return ShardWriter(folder, dim, dt, meta or None, shard_bytes=shard_bytes, mode=mode, **options)

    write_source(source, open_sink, dtype)
