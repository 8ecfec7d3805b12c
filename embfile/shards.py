"""Sharded datasets: one dataset over a folder (or a list) of .emb files.

A folder written by this embfile is *versioned* (FORMAT.md "Versioned datasets"): its shards sit in
``shards/``, each version's manifest names its shards and the segments of its key index
(:mod:`embfile.segments`), and a commit publishes a new version without changing any file an earlier version
uses.  A lookup searches the few segments and reads from the shard, however many shards there are.

Folders in 0.1's layout (``part-*.emb`` beside ``_index.emb``, an .emb file of every key with its shard's
number) still open.  Without an index (a list of paths, or a 0.1 folder assembled by hand) ``open`` builds one
in a temporary file, reading every key once and refusing a key found in two shards; :func:`write_index` writes
it into a 0.1 folder for good.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embfile import errors, remote
from embfile import folder as layout
from embfile.dataset import Dataset, EmbFile, ReadPart, checked_part
from embfile.file import MappedFile
from embfile.writer import Writer

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


def _build_index(path: str, shards: Sequence[MappedFile]) -> None:
    """Write 0.1's ``_index.emb`` of ``shards`` to ``path``: every key in dataset row order with its shard's
    number.  A key in two shards is a ShardError naming both."""
    with in_two_shards([s.path for s in shards], [s.count for s in shards]):
        with Writer(path, 1, "uint32", {_META_KEY: [_identity(s) for s in shards]}) as w:
            for number, shard in enumerate(shards):
                table = shard.table()
                for lo in range(0, shard.count, _KEY_CHUNK):
                    keys = table.keys_between(lo, lo + _KEY_CHUNK)
                    w.add_batch(keys, np.full((len(keys), 1), number))


@contextlib.contextmanager
def in_two_shards(names: Sequence[str], counts: Sequence[int], kind: str = "shards") -> Iterator[None]:
    """Turn a DuplicateKeyError about rows across these shards into a ShardError naming both shards (their
    ``names``; consecutive shards of one name are one, a partition's say, of ``kind``)."""
    groups: list[str] = []
    sizes: list[int] = []
    for name, n in zip(names, counts):
        if groups and groups[-1] == name:
            sizes[-1] += n
        else:
            groups.append(name)
            sizes.append(n)
    bounds = np.cumsum([0, *sizes])
    try:
        yield
    except errors.DuplicateKeyError as e:
        (a, b), (i, j) = e.rows, [int(np.searchsorted(bounds, r, side="right")) - 1 for r in e.rows]
        if i == j:
            where = f"twice in {kind[:-1]} {groups[i]} (rows {a - bounds[i]} and {b - bounds[i]})"
        else:
            where = f"in two {kind}: {groups[i]} (row {a - bounds[i]}) and {groups[j]} (row {b - bounds[j]})"
        raise errors.ShardError(f"key {e.key!r} is {where}") from None


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
        if s.ragged != first.ragged:
            ragged, fixed = (s, first) if s.ragged else (first, s)
            raise errors.ShardError(f"{ragged.path} holds ragged records, {fixed.path} one row per record")


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
    version : int or str, optional
        Of a versioned folder, the version to open, by number or by a tag's name (default: the latest).  The
        handle keeps reading it while later versions are committed.

    Raises
    ------
    ShardError
        If the shards do not fit together (dim, dtype, a key in two of them, an index or a manifest that no
        longer describes them).
    VersionNotFoundError
        If the folder has no such version.
    """

    def __init__(self, source: PathLike | Sequence[PathLike], version: int | str | None = None) -> None:
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

    def _open_version(self, folder: str, version: int | str | None) -> None:
        manifest = layout.read_manifest(folder, version)
        files: list[MappedFile] = []
        try:
            for entry in manifest.shards:
                files.append(_open_named(folder, entry))
            _check_shards(files, folder)
            if (files[0].dim, files[0].dtype.name, files[0].ragged) != (manifest.dim, manifest.dtype, manifest.ragged):
                raise errors.ShardError(f"{files[0].path} is not of the manifest's dim, dtype and layout")
            shards = len(files)
            for entry in manifest.segments:
                files.append(_open_named(folder, entry))
                if (files[-1].dim, files[-1].dtype) != (1, np.dtype("<u8")):
                    raise errors.CorruptFileError(f"{files[-1].path}: a key-index segment holds one uint64 per key")
            self._open_files(files[shards:], files[:shards], folder)
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
        if self.version is not None:  # a segment's records number its keys
            for segment in self._segments:
                if (segment.matrix[:, 0] != np.arange(segment.count)).any():
                    problems.append(f"{segment.path}: its records are not its positions 0 to {segment.count - 1}")
        else:  # 0.1's index: each key's shard
            records = self._segments[0].matrix[:, 0]
            for s in range(len(self.files)):
                lo, hi = self._starts[s], self._starts[s + 1]
                if (records[lo:hi] != s).any():
                    problems.append(f"index: rows {lo}-{hi} do not all point at shard {s}")
        for s, shard in enumerate(self.files):
            lo, hi = self._starts[s], self._starts[s + 1]
            table = shard.table()
            for a in range(lo, hi, _KEY_CHUNK):
                b = min(a + _KEY_CHUNK, hi)
                if self.keys_between(a, b) != table.keys_between(a - lo, b - lo):
                    problems.append(f"index: keys of rows {a}-{b} differ from {shard.path}")
                    break
        return problems

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShardedEmbFile, (self._source, self.version))  # a worker reads the same version


def open(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    version: int | str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Dataset:
    """Open an .emb file, or a sharded dataset (a folder or a list of .emb files), for reading.

    Opening reads the header (and a folder's manifest) and maps the files: constant time, whatever the
    number of keys.

    A URL (``s3://``, ``gs://``, ``https://``, ``hdfs://``; a file or a dataset folder) opens through fsspec as
    a :class:`~embfile.remote.RemoteDataset`, with the same methods: lookups fetch only the index pages and
    records they need (a cold key takes at most three requests, a key read before none), an epoch the
    records of each window as it comes to it, other bulk reads (iteration, ``to_numpy``) download whole
    files into a local cache first.  Needs
    ``pip install "embfile[remote]"``.

    Parameters
    ----------
    path : str, os.PathLike or list
        An .emb file, a dataset folder, a list of shard files, or a URL of a file or a folder.
    version : int or str, optional
        Of a versioned dataset folder, the version to open, by number or by a tag's name (default: the
        latest); ``ds.version`` says which one a handle reads.
    cache_dir : str or os.PathLike, optional
        For a URL: the cache folder (default ``$EMBFILE_CACHE``, else ``~/.cache/embfile``), shared safely by
        any number of processes.
    cache_limit : int, optional
        For a URL: bytes the cache keeps between uses, least recently used files removed first (default: no
        limit).
    storage_options : dict, optional
        For a URL: passed to fsspec (credentials, ``endpoint_url``, ``client_kwargs``...).

    Returns
    -------
    Dataset
        An :class:`EmbFile` for a file, a :class:`ShardedEmbFile` for a folder or a list.

    Raises
    ------
    FormatError
        If a file is not a readable .emb file (with a subclass saying why).
    ShardError
        If the files of a sharded dataset do not fit together.
    VersionNotFoundError
        If a dataset folder has no such version, or no such tag.
    OSError
        If a file cannot be opened.

    Examples
    --------
    >>> with embfile.open("db.emb") as db:          # doctest: +SKIP
    ...     v = db["sp|P69905|HBA_HUMAN"]
    """
    if remote.is_url(path):
        return remote.RemoteDataset(path, version, cache_dir, cache_limit, storage_options)  # type: ignore[arg-type]
    if (cache_dir, cache_limit, storage_options) != (None, None, None):
        raise ValueError("cache_dir=, cache_limit= and storage_options= apply to a URL, not to a local path")
    if isinstance(path, (list, tuple)) or os.path.isdir(os.fspath(path)):  # type: ignore[arg-type]
        return ShardedEmbFile(path, version)
    if version is not None:
        raise ValueError("version= applies to a dataset folder, not to one .emb file")
    return EmbFile(path)  # type: ignore[arg-type]


def open_part(part: ReadPart, storage_options: dict[str, Any] | None = None) -> Dataset:
    """The file of an engine read task's ``part`` (:meth:`embfile.Dataset.read_parts`), opened alone, and
    checked to be the file the read was planned with."""
    return checked_part(open(part.path, storage_options=storage_options), part)
