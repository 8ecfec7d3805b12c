"""The key index of a versioned dataset, in segments, and the edits that rewrite it with the shards.

A version's key index is a list of *segments*: .emb files holding the keys of consecutive dataset rows in row
order, each key's record its position in the segment (a uint64).  A lookup searches every segment, so an
append writes one segment of the new keys and rewrites nothing; :func:`merge_tail` then merges the newest
segments while they are not much smaller than the one before, so sizes fall by half or more from oldest to
newest and a dataset built by any number of appends has at most ``log2(count)`` segments (each key is
rewritten about as many times over its life: appends stay in proportion to the data appended).
``compact`` merges them into as few as hold the keys.  Finishing a segment holds its keys in memory, so none
holds more than :data:`SEGMENT_KEYS`: a commit or merge of more writes several, each checked against the ones
before for a repeated key.

Removing rows rewrites the shards and the segments that hold them without those rows (copy-on-write, at the
granularity of a shard), so every version's rows stay contiguous and every key is in exactly one segment:
reading a dataset never checks for deleted rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from embfile import _core, errors
from embfile._keys import EncodedKeys
from embfile.file import MappedFile, attach
from embfile.folder import INDEX, SHARDS, FileEntry, Manifest, Transaction, placed
from embfile.shards import in_two_shards
from embfile.writer import Writer

KEY_CHUNK = 1 << 16  # keys read and written at a time
SEGMENT_KEYS = 1 << 26  # keys a segment holds at most: finishing one holds them all in memory (about twice their
# UTF-8 plus 45 bytes a key, 6 GB of keys of 22 bytes), so that no commit, merge or compaction needs more
ROW_CHUNK_BYTES = 64 << 20  # records copied at a time by a rewrite


def entry(folder: str, name: str) -> FileEntry:
    """The manifest entry of a file just written: its count and its keys CRC, read back from it."""
    f = MappedFile(f"{folder}/{name}")
    try:
        return FileEntry(name, f.count, f.stored_crc("keys"))
    finally:
        f.close()


def file_keys(folder: str, name: str) -> Iterator[EncodedKeys]:
    """The keys of a file in row order, in chunks, as the bytes of its keys section."""
    f = MappedFile(f"{folder}/{name}")
    try:
        for lo in range(0, f.count, KEY_CHUNK):
            yield f.encoded_keys(lo, lo + KEY_CHUNK)
    finally:
        f.close()


def write_segments(tx: Transaction, key_chunks: Iterable[list[str] | EncodedKeys]) -> list[FileEntry]:
    """New segments of these keys, in this order, of :data:`SEGMENT_KEYS` each at most (none for no keys).
    A key given twice is a :class:`DuplicateKeyError` naming its two positions."""
    out: list[FileEntry] = []
    written: KeyIndex | None = None  # of the segments finished: the next one's keys are looked up in it
    current: tuple[str, Writer] | None = None  # the segment being written
    try:
        for keys in key_chunks:
            while len(keys):
                if current is None:
                    name = tx.new_name(INDEX)
                    current = name, Writer(tx.path(name), 1, "uint64")
                name, w = current
                take, keys = keys[: SEGMENT_KEYS - len(w)], keys[SEGMENT_KEYS - len(w) :]
                if written is not None:
                    _refuse_present(written, take, written.count + len(w))
                w.add_batch(take, np.arange(len(w), len(w) + len(take), dtype=np.uint64)[:, None])
                if len(w) == SEGMENT_KEYS:
                    current = None
                    out.append(_finished(tx, name, w, SEGMENT_KEYS * len(out)))
                    if written is not None:
                        written.close()
                    written = KeyIndex(tx.folder, out)
        if current is not None:
            name, w = current
            current = None
            out.append(_finished(tx, name, w, SEGMENT_KEYS * len(out)))
    finally:
        if current is not None:
            current[1].abort()
        if written is not None:
            written.close()
    return out


def _finished(tx: Transaction, name: str, w: Writer, start: int) -> FileEntry:
    """The segment ``w`` wrote, of keys ``start`` on; a key twice in it named by those positions."""
    try:
        w.close()
    except errors.DuplicateKeyError as e:
        a, b = sorted(start + int(r) for r in e.rows)
        raise errors.DuplicateKeyError(f"duplicate key {e.key!r} (positions {a} and {b})", e.key, (a, b)) from None
    return entry(tx.folder, name)


def _refuse_present(index: KeyIndex, keys: list[str] | EncodedKeys, at: int) -> None:
    """A DuplicateKeyError if one of ``keys`` (at positions ``at`` on) is in ``index``."""
    found = index.find_rows(keys)
    if (found >= 0).any():
        i = int(np.flatnonzero(found >= 0)[0])
        key, a = index.table.key(int(found[i])), int(found[i])
        raise errors.DuplicateKeyError(f"duplicate key {key!r} (positions {a} and {at + i})", key, (a, at + i))


def merge_tail(tx: Transaction, segments: Sequence[FileEntry]) -> list[FileEntry]:
    """``segments`` with the newest ones merged while the one before is less than twice as large and the two
    fit in one segment."""
    out = [s for s in segments if s.count]
    while len(out) >= 2 and out[-2].count < 2 * out[-1].count and out[-2].count + out[-1].count <= SEGMENT_KEYS:
        out[-2:] = merged(tx, out[-2:])
    return out


def fewest(segments: Sequence[FileEntry]) -> bool:
    """Whether ``segments`` are as few as can hold their keys: each one but the last full."""
    return all(s.count == SEGMENT_KEYS for s in segments[:-1])


def merged(tx: Transaction, segments: Sequence[FileEntry]) -> list[FileEntry]:
    """The keys of ``segments``, in order, in as few segments as hold them."""
    return write_segments(tx, itertools.chain.from_iterable(file_keys(tx.folder, s.path) for s in segments))


def without_rows(tx: Transaction, base: Manifest, rows: np.ndarray) -> tuple[list[FileEntry], list[FileEntry]]:
    """The shards and segments of ``base`` with dataset ``rows`` (sorted, unique) removed: the files holding
    none of them as they were, the others rewritten without them (or dropped if nothing is left)."""
    shards = _rewritten(tx, base.shards, rows, _copy_shard)
    segments = _rewritten(tx, base.segments, rows, lambda tx, f, live: write_segments(tx, _keys_at(f, live))[0])
    if not shards:  # every record removed: a version names at least one shard
        name = tx.new_name(SHARDS)
        Writer(tx.path(name), base.dim, base.dtype, ragged=base.ragged).close()
        shards = [entry(tx.folder, name)]
    return shards, segments


Rewrite = Callable[[Transaction, MappedFile, np.ndarray], FileEntry]


def _rewritten(tx: Transaction, entries: Sequence[FileEntry], rows: np.ndarray, rewrite: Rewrite) -> list[FileEntry]:
    """``entries`` (files of consecutive rows) with ``rows`` removed: ``rewrite(tx, file, rows to keep)``."""
    out, first = [], 0
    for e in entries:
        dead = rows[np.searchsorted(rows, first) : np.searchsorted(rows, first + e.count)] - first
        first += e.count
        if not dead.size:
            out.append(e)
        elif dead.size < e.count:
            f = MappedFile(tx.committed(e.path))
            try:
                out.append(rewrite(tx, f, np.setdiff1d(np.arange(e.count, dtype=np.uint64), dead)))
            finally:
                f.close()
    return out


def _keys_at(f: MappedFile, rows: np.ndarray) -> Iterator[list[str]]:
    for lo in range(0, len(rows), KEY_CHUNK):
        yield f.table().keys_at(rows[lo : lo + KEY_CHUNK])


def _copy_shard(tx: Transaction, f: MappedFile, live: np.ndarray) -> FileEntry:
    """A new shard of ``f``'s records at rows ``live``."""
    return _new_shard(tx, f, [(f, live)])


def copied(tx: Transaction, shards: Sequence[FileEntry]) -> FileEntry:
    """One new shard of the records of ``shards``, in order."""
    files = [MappedFile(tx.committed(s.path)) for s in shards]
    try:
        return _new_shard(tx, files[0], [(f, np.arange(f.count, dtype=np.uint64)) for f in files])
    finally:
        for f in files:
            f.close()


def _new_shard(tx: Transaction, like: MappedFile, parts: Sequence[tuple[MappedFile, np.ndarray]]) -> FileEntry:
    """A new shard of the records at ``rows`` of each ``(file, rows)``, with the user metadata of ``like``."""
    name = tx.new_name(SHARDS)
    meta = {k: v for k, v in like.metadata.items() if k != "embfile"}
    step = max(1, ROW_CHUNK_BYTES // (like.dim * like.dtype.itemsize))  # ragged: records, not rows (bounded below)
    if like.ragged:
        step = max(1, step * like.count // max(like.rows, 1))
    with Writer(tx.path(name), like.dim, like.dtype, meta, ragged=like.ragged) as w:
        for f, rows in parts:
            for lo in range(0, len(rows), step):
                chunk = rows[lo : lo + step]
                if f.ragged:
                    block, offsets = f.table()._gather_ragged(chunk, False)
                    w.add_batch(f.table().keys_at(chunk), block, np.diff(offsets))
                else:
                    w.add_batch(f.table().keys_at(chunk), f.matrix[chunk])
    return entry(tx.folder, name)


class KeyIndex:
    """The key index of one version (its ``segments``), for the writers: ``find_rows``, ``in`` and the keys,
    without mapping a shard (its table's records are the segments' own)."""

    def __init__(self, folder: str, segments: Sequence[FileEntry], version: int = 0) -> None:
        self.version = version
        self._files = [MappedFile(f"{folder}/{s.path}") for s in segments]
        self.count = sum(f.count for f in self._files)
        self.table = _core.Table()
        attach(self.table, self._files, self._files) if self._files else None

    def find_rows(self, keys: Sequence[str] | EncodedKeys) -> np.ndarray:
        if not self._files:
            return np.full(len(keys), -1, np.int64)
        return self.table.find_rows(keys)

    def __contains__(self, key: object) -> bool:
        return bool(self._files) and key in self.table

    def keys(self) -> Iterator[str]:
        for f in self._files:
            for lo in range(0, f.count, KEY_CHUNK):
                yield from f.table().keys_between(lo, lo + KEY_CHUNK)

    def close(self) -> None:
        self.table._detach()
        for f in self._files:
            f.close()


def appended(
    tx: Transaction,
    base: Manifest,
    shards: Sequence[FileEntry],
    segments: Sequence[FileEntry],
    replace: bool,
    operation: dict[str, Any],
) -> Manifest:
    """``base`` and then ``shards`` (whose keys ``segments`` hold).  A key already in ``base`` is a
    :class:`DuplicateKeyError`, or with ``replace`` its old record is removed."""
    index = KeyIndex(tx.folder, base.segments, base.version)
    found = []  # the rows of base the new keys are at (few, or none: not a row a key)
    try:
        for keys in (keys for s in segments for keys in file_keys(tx.folder, s.path)):
            rows = index.find_rows(keys)
            rows = rows[rows >= 0]
            if rows.size and not replace:
                key = index.table.key(int(rows[0]))
                raise errors.DuplicateKeyError(
                    f"key {key!r} is already in the dataset (version {base.version}); "
                    "on_duplicate='replace' (--replace) replaces it",
                    key,
                    (int(rows[0]), -1),
                )
            found.append(rows)
    finally:
        index.close()
    dead = np.unique(np.concatenate(found) if found else np.empty(0, np.int64)).astype(np.uint64)
    old_shards, old_segments = without_rows(tx, base, dead) if dead.size else (base.shards, base.segments)
    return base.successor(
        [*old_shards, *shards],
        merge_tail(tx, [*old_segments, *segments]),
        {**operation, "replaced": int(dead.size)} if replace else operation,
    )


def commit_shards(
    tx: Transaction,
    shards: Sequence[FileEntry],
    *,
    append: bool,
    replace: bool,
    dim: int,
    dtype: str,
    metadata: dict[str, Any],
    operation: str,
    ragged: bool = False,
    sources: Sequence[str] | None = None,
) -> Manifest:
    """Commit ``shards`` (files of ``tx``, in row order) as the next version, with segments of their keys:
    after the latest version's records (``append``; ``replace`` as in :func:`appended`), or alone (a new
    dataset, an overwrite).  A key in two of the shards is a :class:`ShardError` naming both, or the
    ``sources`` (the partitions of a job) that wrote them."""
    names = [tx.path(s.path) for s in shards] if sources is None else sources
    with in_two_shards(names, [s.count for s in shards], "shards" if sources is None else "partitions"):
        segments = write_segments(tx, itertools.chain.from_iterable(file_keys(tx.folder, s.path) for s in shards))
    count = sum(s.count for s in segments)
    done = {"name": operation, "records": count}

    def plan(base: Manifest | None) -> Manifest:
        if base is not None and append:
            return appended(tx, base, shards, segments, replace, done)
        return Manifest(
            version=1 if base is None else base.version + 1,
            parent=None if base is None else base.version,
            dim=dim,
            dtype=dtype,
            count=count,
            shards=tuple(shards),
            segments=placed(segments),
            operation=done,
            metadata=metadata,
            ragged=ragged,
        )

    manifest = tx.commit(plan)
    assert manifest is not None
    return manifest
