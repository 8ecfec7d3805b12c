"""Operations on datasets: append, remove and compact commit a new version of a dataset folder; merge and
subset write a new file or dataset from existing ones.

Each operation on a folder is one :class:`~embfile.folder.Transaction`: it writes new files only (an earlier
version never changes), commits, and if another writer committed first, plans again on the new latest
version.  A killed operation leaves the latest version as it was; the next one removes what it left.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from embfile import errors, formats, remote
from embfile import folder as layout
from embfile._keys import key_list
from embfile._stream import Source, chunk_rows, is_table, source_of
from embfile.dataset import Dataset
from embfile.dataset_writer import ShardWriter
from embfile.file import MappedFile
from embfile.formats.parquet import read_table
from embfile.segments import KeyIndex, copied, fewest, merged, without_rows
from embfile.shards import open as open_dataset
from embfile.writer import Sink, Writer, write_source

PathLike = str | os.PathLike[str]


def append(
    folder: PathLike, data: Any, on_duplicate: str = "error", *, shard_bytes: int = 1 << 30, **options: Any
) -> int:
    """Add the records of ``data`` to the dataset in ``folder`` as its next version; return that version.

    ``data`` is anything :func:`embfile.write` takes (a mapping, a ``(keys, matrix)`` pair, an open dataset),
    a path :func:`embfile.convert` reads (an .emb file, a dataset folder, HDF5, Parquet, ...) or a table in
    memory it reads (pandas, polars, Arrow, datasets); ``options`` go to the reader.  Records are stored in the
    dataset's dtype.  A key the dataset holds already is a :class:`DuplicateKeyError` naming it, and nothing is
    committed; with ``on_duplicate="replace"`` the new record replaces the old one.  The cost is that of
    writing the new records (and, with replacements, of rewriting the shards that held the old ones), whatever
    the size of the dataset.
    """
    writers: list[ShardWriter] = []

    def open_sink(dim: int, dtype: object, ragged: bool) -> ShardWriter:
        writers.append(
            ShardWriter(folder, dim, shard_bytes=shard_bytes, mode="append", on_duplicate=on_duplicate, ragged=ragged)
        )
        return writers[-1]

    if not layout.is_versioned(folder):  # before the data is read: its errors would not say this
        raise layout.nothing_to_append_to(folder)
    ragged = layout.read_manifest(folder).ragged  # a mapping's records: as the dataset stores them
    write_source(_source(data, "append()", options, ragged), open_sink)
    version = writers[0].version
    assert version is not None
    return version


def remove(folder: PathLike, keys: Iterable[str], missing: str = "error") -> int:
    """Remove ``keys`` from the dataset in ``folder`` as its next version; return that version.

    A key the dataset does not hold is a :class:`KeyNotFoundError` (nothing is committed), or with
    ``missing="ignore"`` is skipped; if no key is there, no version is committed.  The shards and key-index
    segments holding the keys are rewritten without them; the others are shared with the earlier version.
    """
    if missing not in ("error", "ignore"):
        raise ValueError(f"missing must be 'error' or 'ignore', not {missing!r}")
    keys = key_list(keys, "remove()")
    with layout.Transaction(folder) as tx:

        def plan(base: layout.Manifest | None) -> layout.Manifest | None:
            assert base is not None
            rows = _rows_in(tx.folder, base, keys, missing)
            if not rows.size:
                return None
            shards, segments = without_rows(tx, base, rows)
            return base.successor(shards, segments, {"name": "remove", "records": int(rows.size)})

        return _committed(tx.commit(plan))


def compact(folder: PathLike, shard_bytes: int = 1 << 30) -> int:
    """Join runs of small shards into shards of up to ``shard_bytes`` of records, and merge the key index into
    as few segments as hold it, as the next version (none if there is nothing to join); return the latest
    version.

    Rows, keys and vectors stay as they were.  Earlier versions keep their files until :func:`vacuum`.
    """
    with layout.Transaction(folder) as tx:

        def plan(base: layout.Manifest | None) -> layout.Manifest | None:
            assert base is not None
            per_shard = max(1, shard_bytes // (base.dim * np.dtype(base.dtype).itemsize))  # rows
            runs: list[list[tuple[layout.FileEntry, int]]] = []
            for shard in base.shards:
                rows = _rows_of(tx.committed(shard.path)) if base.ragged else shard.count
                if not runs or sum(r for _, r in runs[-1]) + rows > per_shard:
                    runs.append([])
                runs[-1].append((shard, rows))
            merged_already = fewest(base.segments)
            if len(runs) == len(base.shards) and merged_already:
                return None
            shards = [run[0][0] if len(run) == 1 else copied(tx, [s for s, _ in run]) for run in runs]
            segments = base.segments if merged_already else merged(tx, base.segments)
            return base.successor(shards, segments, {"name": "compact", "records": base.count})

        return _committed(tx.commit(plan))


def merge(
    sources: Sequence[Any],
    dst: PathLike,
    *,
    shard_bytes: int = 1 << 30,
    storage_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Write the records of every source, one after another, to a new .emb file (``dst`` ending in ``.emb``)
    or a new dataset folder.  Sources are what :func:`append` takes; the first one's dim, dtype and metadata
    are the result's.  A key in two sources is an error naming it, and nothing is written.  A source at a URL
    (an .emb file or a dataset folder) is read as :func:`embfile.open` reads it, ``storage_options`` going to
    fsspec."""
    if not sources:
        raise ValueError("merge() needs at least one source")
    names = [str(s) if isinstance(s, (str, os.PathLike)) else f"source {i}" for i, s in enumerate(sources)]
    with contextlib.ExitStack() as at_urls:
        opened: list[Source] = []
        for s, name in zip(sources, names):
            data = at_urls.enter_context(open_dataset(s, storage_options=storage_options)) if remote.is_url(s) else s
            opened.append(_source(data, "merge()", options, opened[0].ragged if opened else None))
            first, last = opened[0], opened[-1]
            if last.dim != first.dim:
                raise errors.WriterError(f"{name} has vectors of dim {last.dim}, {names[0]} of dim {first.dim}")
            if last.ragged != first.ragged:
                kinds = ("one vector per key", "per-residue (ragged) records")
                raise errors.WriterError(
                    f"{names[0]} holds {kinds[first.ragged]}, {name} {kinds[last.ragged]}: "
                    "pool the ragged one first (db.pool('mean', out=...))"
                )
        starts: list[int] = []  # each source's first row in the result, known as its chunks come

        def chunks() -> Iterator[tuple[Any, ...]]:
            rows = 0
            for s in opened:
                starts.append(rows)
                for chunk in s.chunks:
                    rows += len(chunk[0])
                    yield chunk

        count = None if any(s.count is None for s in opened) else sum(s.count for s in opened if s.count is not None)
        try:
            _write_new(dataclasses.replace(first, chunks=chunks(), count=count), dst, shard_bytes)
        except errors.DuplicateKeyError as e:
            raise _in_sources(e, names, starts) from None


def subset(
    src: PathLike | Dataset,
    dst: PathLike,
    keys: Iterable[str],
    *,
    missing: str = "error",
    shard_bytes: int = 1 << 30,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write the records of ``keys`` in ``src`` (an .emb file, a dataset folder, either at a URL, or an open
    dataset) to a new .emb file or dataset folder ``dst``, in ``src``'s row order.  A key ``src`` lacks is a
    :class:`KeyNotFoundError`, or with ``missing="ignore"`` is skipped."""
    if missing not in ("error", "ignore"):
        raise ValueError(f"missing must be 'error' or 'ignore', not {missing!r}")
    keys = key_list(keys, "subset()")
    if isinstance(src, Dataset):
        ds = src
    else:  # storage_options (given for a destination at a URL, say) only for a source at a URL
        ds = open_dataset(src, storage_options=storage_options if remote.is_url(src) else None)
    try:
        found = ds.find_rows(keys)
        _refuse_missing(found, keys, f"{ds.path}", missing)
        rows = np.unique(found[found >= 0]).astype(np.uint64)
        source = source_of(ds, "subset()")
        step = chunk_rows(ds.dim * ds.dtype.itemsize)
        if ds.ragged:  # records of a mean length per step of rows
            step = max(1, step * len(ds) // max(1, int(ds.lengths().sum())))
        chunks = (_subset_chunk(ds, rows[lo : lo + step]) for lo in range(0, len(rows), step))
        _write_new(dataclasses.replace(source, chunks=chunks, count=len(rows)), dst, shard_bytes)
    finally:
        if ds is not src:
            ds.close()


def _source(data: Any, caller: str, options: dict[str, Any], ragged: bool | None = None) -> Source:
    if isinstance(data, (str, os.PathLike)):
        return formats.read(data, **options)
    if is_table(data):
        return read_table(data, **options)
    if options:
        raise TypeError(f"{caller}: options {sorted(options)} apply to reading a file or folder only")
    return source_of(data, caller, ragged)


def _in_sources(e: errors.DuplicateKeyError, names: list[str], starts: list[int]) -> errors.DuplicateKeyError:
    """``e`` (rows of the merged result) as the sources and rows it is about."""

    def place(row: int) -> tuple[int, int]:  # the source holding a row of the result, and its row there
        source = bisect.bisect_right(starts, row) - 1
        return source, row - starts[source]

    (i, a), (j, b) = place(e.rows[0]), place(e.rows[1])
    if i == j or names[i] == names[j]:
        where = f"in {names[i]}" + (f" (rows {a} and {b})" if i == j else ", given twice")
    else:
        where = f"in {names[i]} (row {a}) and {names[j]} (row {b})"
    return errors.DuplicateKeyError(f"merge(): key {e.key!r} is {where}; merge takes each key once", e.key, e.rows)


def _write_new(source: Source, dst: PathLike, shard_bytes: int) -> None:
    meta = {k: v for k, v in source.metadata.items() if k != "embfile"} or None

    def open_sink(dim: int, dtype: object, ragged: bool) -> Sink:
        if os.fspath(dst).endswith(".emb"):
            return Writer(dst, dim, dtype, meta, ragged=ragged)
        return ShardWriter(dst, dim, dtype, meta, shard_bytes=shard_bytes, ragged=ragged)

    write_source(source, open_sink)


def _subset_chunk(ds: Dataset, rows: np.ndarray) -> tuple[Any, ...]:
    if ds.ragged:
        block, offsets = ds.take(rows, pad=False)
        return ds.keys_at(rows), block, np.diff(offsets)
    return ds.keys_at(rows), ds.take(rows)


def _rows_of(path: str) -> int:
    f = MappedFile(path)
    try:
        return f.rows
    finally:
        f.close()


def _rows_in(folder: str, base: layout.Manifest, keys: list[str], missing: str) -> np.ndarray:
    """The sorted, unique rows of ``keys`` in ``base`` (a missing key refused unless ``missing="ignore"``)."""
    index = KeyIndex(folder, base.segments, base.version)
    try:
        found = index.find_rows(keys)
    finally:
        index.close()
    _refuse_missing(found, keys, f"{folder} (version {base.version})", missing)
    return np.unique(found[found >= 0]).astype(np.uint64)


def _refuse_missing(found: np.ndarray, keys: list[str], where: str, missing: str) -> None:
    if missing == "error" and (found < 0).any():
        key = keys[int(np.flatnonzero(found < 0)[0])]
        raise errors.KeyNotFoundError(
            key, f"key {key!r} is not in {where}; missing='ignore' (--missing ignore) skips it"
        )


def _committed(manifest: layout.Manifest | None) -> int:
    assert manifest is not None
    return manifest.version
