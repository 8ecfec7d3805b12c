"""What changed between two versions of a dataset folder: the keys added, replaced and removed.

For a job that keeps something in step with a growing dataset (a search index, a table of annotations, the
next stage of a pipeline) and wants to redo only what changed since the version it last saw.

Files are never changed in place, so a shard both versions name holds the same records in both, and none of
its keys can be anywhere else in either (a version holds each key once).  Only the shards one version names and
the other does not are read: a key of the later version's own shards is *added* if the earlier version lacks
it, *replaced* if its record there differs, byte for byte, and otherwise was only carried into a new shard (by a
removal's rewrite or a compaction); a key of the earlier version's own shards that the later one lacks is
*removed*.  So after an append the answer costs the appended keys' lookups, after a removal the shards it
rewrote, after a compaction the whole dataset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile.dataset import Dataset
from embfile.folder import Manifest
from embfile.segments import KEY_CHUNK, ROW_CHUNK_BYTES
from embfile.shards import open as open_dataset


@dataclasses.dataclass(frozen=True)
class Changes:
    """The keys whose records differ between version ``since`` and ``version`` of a dataset: ``added`` and
    ``replaced`` in the later version's row order, ``removed`` in the earlier one's."""

    since: int
    version: int
    added: list[str]
    replaced: list[str]
    removed: list[str]


def changes(
    path: str | os.PathLike[str],
    since: int | str,
    version: int | str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Changes:
    """The keys added, replaced and removed from version ``since`` to ``version`` (default: the latest) of the
    dataset folder at ``path`` (a local path or a URL; ``cache_dir`` and ``storage_options`` as in
    :func:`embfile.open`).  Versions go by number or by a tag's name (:func:`embfile.tag`).

    Reads only the shards that one of the two versions has and the other has not (see the module).  A key
    replaced by an identical record is not a change.  ``since`` may be later than ``version``: the changes
    that lead back.

    >>> c = embfile.changes("esm2/", since=3)                       # doctest: +SKIP
    >>> index.add(c.added + c.replaced, db.get_batch(c.added + c.replaced))   # doctest: +SKIP
    """
    since = _version_number(since)
    with open_dataset(path, version, cache_dir=cache_dir, storage_options=storage_options) as new:
        _versioned(new)
        with open_dataset(path, since, cache_dir=cache_dir, storage_options=storage_options) as old:
            added: list[str] = []
            replaced: list[str] = []
            for keys, _, new_keys in _changed(new, old):
                added += keys[new_keys].tolist()
                replaced += keys[~new_keys].tolist()
            removed: list[str] = []
            for keys, _, after in _looked_up(old, new):
                removed += keys[after < 0].tolist()
            return Changes(_versioned(old).version, _versioned(new).version, added, replaced, removed)


def changed_runs(ds: Dataset, since: int | str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, int]]:
    """The runs ``[lo, hi)`` of records of ``ds`` (a version of a dataset folder) that version ``since`` lacks
    or holds differently, in row order: what an engine's incremental read reads."""
    since = _version_number(since)
    _versioned(ds)
    assert ds.path is not None  # a folder's
    runs: list[tuple[int, int]] = []
    with open_dataset(ds.path, since, storage_options=storage_options) as old:
        for _, rows, _ in _changed(ds, old):
            if not len(rows):
                continue
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            for lo, hi in zip(rows[np.r_[0, breaks]].tolist(), (rows[np.r_[breaks - 1, len(rows) - 1]] + 1).tolist()):
                if runs and runs[-1][1] == lo:  # a run going on into the next chunk
                    runs[-1] = (runs[-1][0], hi)
                else:
                    runs.append((lo, hi))
    return runs


def _version_number(since: Any) -> int | str:
    if isinstance(since, str):
        return since  # a tag's name
    if isinstance(since, bool) or not isinstance(since, (int, np.integer)):
        raise TypeError(f"since must be a version's number or a tag's name, not {type(since).__name__}")
    return int(since)


def _versioned(ds: Dataset) -> Manifest:
    if ds.manifest is None:
        raise ValueError(f"{ds.path}: changes are between versions of a dataset folder, and this is not one")
    return ds.manifest


def _changed(new: Dataset, old: Dataset) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(keys, rows, added)`` of the records of ``new`` that ``old`` lacks (``added``) or holds differently, a
    chunk at a time, in row order."""
    for keys, rows, before in _looked_up(new, old):
        found = before >= 0
        changed = ~found
        changed[found] = _differ(new, rows[found], old, before[found])
        yield keys[changed], rows[changed], ~found[changed]


def _looked_up(ds: Dataset, other: Dataset) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(keys, rows, rows in other)`` for the records of the shards of ``ds`` that ``other`` (another version
    of its folder) does not name, a chunk at a time (a row in ``other`` is -1 where it lacks the key)."""
    theirs = {e.path for e in _versioned(other).shards}
    record_bytes = ds.dim * ds.dtype.itemsize
    step = max(1, min(KEY_CHUNK, ROW_CHUNK_BYTES // record_bytes))
    for entry, lo, hi in zip(_versioned(ds).shards, ds._starts, ds._starts[1:]):
        if entry.path in theirs:
            continue
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            keys = ds.keys_between(a, b)
            yield np.array(keys, dtype=object), np.arange(a, b, dtype=np.int64), other.find_rows(keys)


def _differ(new: Dataset, rows: np.ndarray, old: Dataset, before: np.ndarray) -> np.ndarray:
    """Whether the record at each of ``rows`` of ``new`` differs, byte for byte, from the one at ``before`` of
    ``old`` (of ragged records, their lengths first)."""
    if not len(rows):
        return np.zeros(0, bool)
    if not new.ragged:
        return _rows_differ(new.take(rows), old.take(before))
    lengths = new._extents(rows.astype(np.uint64))[1].astype(np.int64)
    differ: np.ndarray = lengths != old._extents(before.astype(np.uint64))[1].astype(np.int64)
    budget = max(1, ROW_CHUNK_BYTES // (new.dim * new.dtype.itemsize))
    same = np.flatnonzero(~differ)
    ends = np.cumsum(lengths[same])
    first = 0
    while first < len(same):  # records of the same lengths, compared about ``budget`` rows at a time
        done = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, done + budget, side="right")))
        pick = same[first:last]
        (a, _), (b, _) = new.take(rows[pick], pad=False), old.take(before[pick], pad=False)
        record = np.repeat(np.arange(len(pick)), lengths[pick])
        differ[pick[np.unique(record[_rows_differ(a, b)])]] = True
        first = last
    return differ


def _rows_differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each row of ``a`` differs from the same row of ``b`` in its bytes (so NaNs compare as stored)."""
    differ: np.ndarray = np.any(a.view(np.uint8).reshape(len(a), -1) != b.view(np.uint8).reshape(len(b), -1), axis=1)
    return differ
