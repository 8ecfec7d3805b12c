"""A dataset at a URL: lookups by range reads over a partial local copy, everything else from whole local copies.

A :class:`RemoteDataset` is a :class:`~embfile.Dataset` whose native lookup table is attached to partial
copies of its files (:class:`~embfile.remote.cache.PartialCopy`).  A lookup first *probes* the table
(:meth:`embfile._core.Table.probe`): the native search runs over the pages already present and stops where it
would read one that is not, naming it.  Those pages are fetched (nearby ones merged, several requests in
flight) and the probe goes on, until every key is settled; then the records' pages are fetched and the
ordinary lookup runs, reading only pages that are there.  The search is the local one, step for step: no
second implementation of the index to drift from the first.

An epoch streams (:meth:`RemoteDataset._fetch_ranges`): before it reads a window, the checksum blocks holding
the window's records are fetched into the partial copies by range reads and checked, and the next window is
fetched while this one is read.  Everything else that reads in bulk (iteration, ``to_numpy``, exports, search,
``verify``) first downloads every file whole into the cache, checks it, and re-attaches the table to the whole
copies; from then on the dataset is a local one and asks nothing of the server.

Keys read by row (``key``, ``keys_between``, ``keys_at``: what :func:`embfile.changes` reads) need only the key
index's keys sections: those are fetched whole and checked, not the records.  An engine's read task of a slice
of a file (``_arrow_rows``) fetches the checksum blocks holding its rows and the file's keys section, each
checked, not the file.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from embfile import _core, errors
from embfile import folder as layout
from embfile._format import PAGE, Header
from embfile._pages import Layout, WindowReader
from embfile.dataset import Dataset, ReadPart, checked_part
from embfile.epochs import Fetch
from embfile.file import MappedFile
from embfile.remote.cache import Cache, PartialCopy, entry_name
from embfile.remote.store import IN_FLIGHT, SMALL_READS, Identity, RangeIgnored, Remote

MERGE_GAP = 16  # pages: runs of missing pages this close are one range (64 KiB cost less than a round trip)
OPEN_GAP = 1 << 20  # bytes: what opening fetches is one request where its parts are this close (a round trip
# costs more than a megabyte at the bandwidth of an object store)
MAX_ROUNDS = 64  # probes of one lookup (a cold key takes two; long shared prefixes a binary search more)
DOWNLOADS_IN_FLIGHT = 4


class RemoteFile:
    """One remote .emb file: whole in the cache, or a partial copy filled as lookups need its pages.

    ``expect`` is ``(count, keys_crc)`` when a manifest names the file: its whole copy in the cache is found
    by them alone (checked again when opened), without a request.  Otherwise the object's size and ETag are
    read first: they name its partial copy, bound the header's sizes, and go with every range request, so
    that a replaced object is refused rather than mixed with what was read of the old one.
    """

    def __init__(self, remote: Remote, cache: Cache, expect: tuple[int, int] | None = None) -> None:
        self.remote, self.cache, self.expect = remote, cache, expect
        named = f"{expect[0]}:{expect[1]:#x}" if expect else ""
        self.whole_name = entry_name(remote.url, named)  # the name of the whole copy in the cache
        self.partial: PartialCopy | None = None
        self.identity: Identity | None = None
        self.checked: set[str] = set()  # sections fetched whole and checked (fetch_section)
        self.checked_blocks: np.ndarray | None = None  # records blocks fetched and checked (check_blocks)
        self._held: np.ndarray | None = None  # records blocks: how many holds of this handle keep each (hold)
        self._sums_here = False  # the sums section fetched (fetch_sums)
        self._holding = threading.Lock()
        _open_files.add(self)
        self._in_use = -1  # of a whole copy: the descriptor marking it in use (Cache.in_use)
        if expect and self._open_whole():
            return
        self.identity = identity = remote.identity()
        partial_name = entry_name(remote.url, f"{named}:{identity.token()}")
        if not expect:
            self.whole_name = partial_name
            if self._open_whole():
                return
        try:
            head = remote.read_range(0, min(PAGE, identity.size), identity)
        except RangeIgnored as e:  # a server that serves files only whole (it just sent this one): cache it whole
            self.mapped = self._whole_copy(identity.size, e.data)
            self._in_use = cache.in_use(self.mapped.path)
            return
        h = Header.read(head, identity.size, remote.url)
        self.partial = cache.partial(partial_name, identity.size)
        if not self.partial.have[0]:
            self.partial.write(0, head)
        n_top = -(-h.n_buckets // 32)
        top_end = min(h.index_size, -(-h.lcp_len // 8) * 8 + 8 * n_top)
        self.fetch(
            [  # fetched together where they are near (in a small file, the whole tail is one request)
                (h.index_offset, h.index_offset + top_end),  # the common prefix and the top of the index
                (h.keys_offset, h.keys_offset + 8),  # the keys offsets' first and last (checked at open)
                (h.keys_offset + 8 * h.count, h.keys_offset + 8 * h.count + 8),
                (h.sums_offset + h.sums_size - 16, h.sums_offset + h.sums_size),  # index, keys, meta (ranges) CRCs
                *(  # ragged: the ranges' first and last (checked at open)
                    [
                        (h.ranges_offset, h.ranges_offset + 8),
                        (h.ranges_offset + 8 * h.count, h.ranges_offset + 8 * h.count + 8),
                    ]
                    if h.ragged
                    else []
                ),
            ]
        )
        self.mapped = self._checked(MappedFile(self.partial.path))

    def _open_whole(self) -> bool:
        path = self.cache.whole(self.whole_name)
        if path is not None:
            self._in_use = self.cache.in_use(path)
            self.mapped = self._checked(MappedFile(path))
        return path is not None

    def use_whole(self, mapped: MappedFile) -> None:
        """Read the whole copy ``mapped`` (:meth:`download`'s) from now on, the partial copy let go."""
        self.close()
        self._in_use = self.cache.in_use(mapped.path)
        self.partial, self.mapped = None, mapped
        self.__dict__.pop("have", None)

    @property
    def whole(self) -> bool:
        return self.partial is None

    @functools.cached_property
    def have(self) -> np.ndarray:
        """The page map a probe reads: the partial copy's, or every page of a whole copy."""
        if self.partial is not None:
            return self.partial.have
        return np.ones(-(-self.mapped.header.file_size // PAGE), np.uint8)

    def _checked(self, f: MappedFile) -> MappedFile:
        if self.expect is not None and (f.count, f.stored_crc("keys")) != self.expect:
            found = (f.count, f.stored_crc("keys"))
            f.close()
            raise errors.ShardError(
                f"{self.remote.url} is not the file the manifest names ({found[0]} records, keys CRC "
                f"{found[1]:#x}; the manifest says {self.expect[0]} and {self.expect[1]:#x}): it was replaced"
            )
        return f

    def needs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Byte ranges to fetch so that bytes ``[start, end)`` are here: missing pages, near runs merged."""
        if self.partial is None:
            return []
        runs = self.partial.missing(start, end)
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and a - merged[-1][1] <= MERGE_GAP:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        size = self.partial.size
        return [(a * PAGE, min(b * PAGE, size)) for a, b in merged]

    def needs_of(self, start: np.ndarray, end: np.ndarray) -> list[tuple[int, int]]:
        """:meth:`needs` of each byte range ``[start[i], end[i])``, with one look at the page map for all of
        them: a lookup whose pages are here costs no Python per range."""
        if self.partial is None or not len(start):
            return []
        first, pages = start // PAGE, -(-end // PAGE) - start // PAGE
        offsets = np.cumsum(pages) - pages
        page = np.arange(int(pages.sum())) - np.repeat(offsets - first, pages)
        lacking = np.unique(np.repeat(np.arange(len(start)), pages)[self.partial.have[page] == 0])
        return [r for i in lacking.tolist() for r in self.needs(int(start[i]), int(end[i]))]

    def has(self, starts: np.ndarray, length: int) -> bool:
        """Whether the pages of every byte range ``[starts[i], starts[i] + length)`` are here (False for a range
        past the file: what asks for it learns why)."""
        if self.partial is None:
            return True
        first, last = starts // PAGE, (starts + length - 1) // PAGE
        pages = np.minimum(first[:, None] + np.arange(-(-length // PAGE) + 1), last[:, None])  # each range's
        have = self.partial.have
        return bool(pages.max(initial=0) < len(have) and have[pages].all())

    def fetch(self, ranges: Iterable[tuple[int, int]], gap: int = OPEN_GAP) -> None:
        start, end = np.array(list(ranges), np.int64).reshape(-1, 2).T
        fetch_all(_merged([(self, a, b) for a, b in self.needs_of(start, end)], gap))

    def fetch_sections(self, names: Sequence[str]) -> None:
        """Fetch the sections ``names`` (``keys``, ``ranges``...) whole, then check each against its stored
        checksum, once: what is read of them by position, not by comparing a key, must be what was written."""
        h, todo = self.mapped.header, [n for n in names if n not in self.checked]
        self.fetch([(h.offset(n), h.offset(n) + h.size(n)) for n in todo])
        with memoryview(self.mapped.mappings()[1]) as whole:
            for n in todo:
                if _core.crc32c(whole[h.offset(n) : h.offset(n) + h.size(n)]) != self.mapped.stored_crc(n):
                    raise errors.ChecksumError(f"{self.remote.url}: the {n} section does not match its checksum")
                self.checked.add(n)

    @functools.cached_property
    def every_block(self) -> np.ndarray:
        """The numbers of every checksum block of the records section (what a lookup holds)."""
        return np.arange(self.n_blocks)

    @property
    def n_blocks(self) -> int:
        """Checksum blocks of the records section."""
        h = self.mapped.header
        return -(-h.records_size // h.block_bytes)

    def blocks(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The checksum blocks (sorted numbers) holding this file's records ``[lo[i], hi[i])`` (of ragged
        records, through the ranges section, which must be here)."""
        h, m = self.mapped.header, self.mapped
        lo, hi = lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)
        record_bytes = h.dim * m.dtype.itemsize
        if h.ragged:
            lo, hi = m.ranges()[lo].astype(np.int64), m.ranges()[hi].astype(np.int64)
        lo = np.minimum(lo, h.n_rows)  # damaged ranges: the reader's checks say so
        hi = np.minimum(np.maximum(lo, hi), h.n_rows)
        first, end = _spans(lo * record_bytes // h.block_bytes, -(-hi * record_bytes // h.block_bytes))
        return np.repeat(end - np.cumsum(end - first), end - first) + np.arange(int((end - first).sum()))

    def block_bytes(self, b0: int, b1: int) -> tuple[int, int]:
        """The byte range of checksum blocks ``[b0, b1)`` of the records section."""
        h = self.mapped.header
        return h.records_offset + b0 * h.block_bytes, h.records_offset + min(b1 * h.block_bytes, h.records_size)

    def fetch_sums(self) -> None:
        """Fetch the sums section (the records blocks' checksums), once."""
        if not self._sums_here:
            h = self.mapped.header
            self.fetch([(h.sums_offset, h.sums_offset + h.sums_size)])
            self._sums_here = True

    def block_needs(self, blocks: np.ndarray) -> list[tuple[int, int]]:
        """:meth:`needs` of the checksum blocks ``blocks`` (sorted numbers); those with pages missing are marked
        unchecked (what this handle checked of them was freed since), to be checked once fetched."""
        if self.partial is None or not len(blocks):
            return []
        if self.checked_blocks is None:
            self.checked_blocks = np.zeros(self.n_blocks, bool)
        h, have = self.mapped.header, self.partial.have
        per_block = h.block_bytes // PAGE
        pages = (h.records_offset + blocks * h.block_bytes)[:, None] // PAGE + np.arange(per_block)
        last = -(-(h.records_offset + h.records_size) // PAGE)  # the last block may be short
        present = (have[np.minimum(pages, last - 1)].astype(bool) | (pages >= last)).all(axis=1)
        self.checked_blocks[blocks] &= present
        return [r for a, b in _runs(blocks[~present]) for r in self.needs(*self.block_bytes(a, b))]

    def check_blocks(self, blocks: np.ndarray) -> list[int]:
        """Check the records blocks ``blocks`` that this handle has not checked (which must be here, and the sums
        section too) against their stored checksums: the blocks that do not match (the others are marked
        checked).  None of a whole copy, checked when it was downloaded."""
        if self.partial is None or not len(blocks):
            return []
        assert self.checked_blocks is not None
        bad: list[int] = []
        todo = blocks[~self.checked_blocks[blocks]]
        if not len(todo):
            return bad
        sums = self.mapped.sums()
        with memoryview(self.mapped.mappings()[1]) as whole:
            for c0, c1 in _runs(todo):
                start, end = self.block_bytes(c0, c1)
                good = _core.crc32c_blocks(whole[start:end], self.mapped.header.block_bytes) == sums[c0:c1]
                self.checked_blocks[c0:c1] = good
                bad += (np.flatnonzero(~good) + c0).tolist()
        return bad

    def forget(self, b: int) -> None:
        """Mark the pages of records block ``b`` absent from the partial copy, to be fetched again."""
        assert self.partial is not None
        start, end = self.block_bytes(b, b + 1)
        self.partial.have[start // PAGE : -(-end // PAGE)] = 0

    def hold(self, blocks: np.ndarray) -> None:
        """Keep records blocks ``blocks`` (distinct numbers) in the partial copy (no handle frees them) until
        :meth:`let_go`.  Holds are counted: windows of an epoch, and lookups, of this handle may hold the same
        blocks."""
        if self.partial is None or not len(blocks):
            return
        with self._holding:
            if self._held is None:
                self._held = np.zeros(self.n_blocks, np.int32)
            new = blocks[self._held[blocks] == 0]
            self._held[blocks] += 1
            for a, b in _runs(new):
                self.partial.hold(*self.block_bytes(a, b))

    def let_go(self, blocks: np.ndarray, free: bool = False) -> None:
        """End a :meth:`hold` of ``blocks``; with ``free``, give back the space of those no handle holds now (to
        be fetched again when read)."""
        if self.partial is None or not len(blocks) or self._held is None:
            return
        with self._holding:
            self._held[blocks] -= 1
            gone = blocks[self._held[blocks] == 0]
            for a, b in _runs(gone):
                self.partial.let_go(*self.block_bytes(a, b))
            for b in gone.tolist() if free else []:
                if self.partial.free(*self.block_bytes(b, b + 1)) and self.checked_blocks is not None:
                    self.checked_blocks[b] = False

    def store(self, start: int, data: bytes) -> None:
        assert self.partial is not None
        self.partial.write(start // PAGE, data)

    def download(self) -> MappedFile:
        """The whole file, from the cache or downloaded into it (checked against its checksums)."""
        if self.partial is None:
            return self.mapped
        return self._whole_copy(self.partial.size)

    def _whole_copy(self, size: int, data: bytes | None = None) -> MappedFile:
        """The whole copy from the cache, or downloaded into it by range reads (or written from ``data``, the
        whole file read already) and checked against its checksums."""

        def check(path: str) -> None:
            f = MappedFile(path)
            try:
                problems = f.problems()
                if problems:
                    raise errors.RemoteError(
                        f"{self.remote.url}: the downloaded copy does not match its checksums: {'; '.join(problems)}"
                    )
                self._checked(f)
            finally:
                f.close()

        fetch = functools.partial(self.remote.read_range, identity=self.identity)
        path = self.cache.download(self.whole_name, fetch, size, check, data)
        return self._checked(MappedFile(path))

    def close(self) -> None:
        self.mapped.close()
        if self.partial is not None:
            self.partial.close()  # its holds end with it
        if self._in_use >= 0:
            os.close(self._in_use)
            self._in_use = -1


_open_files: weakref.WeakSet[RemoteFile] = weakref.WeakSet()


def _forget_holds_after_fork() -> None:
    """In a forked child (a DataLoader's worker), the parent's holds are not the child's: each file starts
    with none, locking through a descriptor of its own."""
    for f in list(_open_files):
        f._held, f._holding = None, threading.Lock()
        if f.partial is not None:
            f.partial.reopen()


os.register_at_fork(after_in_child=_forget_holds_after_fork)


class WindowHolds:
    """The windows of a map-style epoch (:class:`embfile.torch.BatchSampler`'s) that this process reads, held:
    fetched, checked, and kept from being freed by any handle, from the first batch that needs them (or their
    fetch ahead) until this process's batches are two windows on.  Then they are let go of, and under a cache
    limit given back by whichever process lets go of them last, as an epoch's windows are.  A batch whose blocks
    are all held here is read with no further step: no Python per file, no lock per block.

    Windows are named ``TAG:NUMBER`` (the epoch, and the window's number in it); a batch names the windows its
    rows come from.  When a batch comes, the holds of another epoch's windows, and of windows before its first
    but one, are let go of, unless a batch is reading some of their blocks now (then at a later batch)."""

    def __init__(self, dataset: RemoteDataset) -> None:
        self._dataset = dataset
        self._lock = threading.Lock()
        self._holds: dict[str, list[tuple[Held, np.ndarray]]] = {}  # window: its holds, and their blocks
        blocks = int(dataset._block_base[-1])
        self._count = np.zeros(blocks, np.int32)  # of each block (numbered across the files): holds keeping it
        self._in_use = np.zeros(blocks, np.int32)  # and batches reading it now

    @contextlib.contextmanager
    def reading(self, rows: np.ndarray, windows: Sequence[str]) -> Iterator[Layout]:
        """Where to read the batch of ``rows`` from ``windows``, while it is read: its blocks held here (fetched
        first where they are not)."""
        ids = self._dataset._block_ids(rows)
        with self._lock:
            self._let_go_before(windows[0])
            held = bool((self._count[ids] > 0).all())
            self._in_use[ids] += 1
        try:
            if not held:  # held under its last window's name: its blocks are in its windows, the last the latest
                self.add(windows[-1], self._dataset._fetch_blocks(self._dataset._per_file(ids), *windows))
            yield self._dataset._partial_layout()
        finally:
            with self._lock:
                self._in_use[ids] -= 1

    def add(self, window: str, held: Held) -> None:
        """Keep ``held`` (blocks of ``window``, fetched and checked) until the batches have moved on."""
        ids = self._dataset._global_ids(held.blocks)
        with self._lock:
            self._holds.setdefault(window, []).append((held, ids))
            self._count[ids] += 1  # distinct blocks

    def _let_go_before(self, window: str) -> None:
        tag, _, first = window.rpartition(":")
        for name in list(self._holds):
            other, _, number = name.rpartition(":")
            if other == tag and int(number) >= int(first) - 1:
                continue
            kept = []
            for held, ids in self._holds.pop(name):
                if self._in_use[ids].any():
                    kept.append((held, ids))
                else:
                    self._count[ids] -= 1
                    held.read()
            if kept:
                self._holds[name] = kept

    def let_go(self) -> None:
        """Let go of every hold (the handle closes)."""
        with self._lock:
            for holds in self._holds.values():
                for held, _ in holds:
                    held.release()
            self._holds.clear()


class WindowFetcher:
    """Fetches the windows a map-style epoch reads next (:class:`embfile.torch.BatchSampler`'s, named so that
    the processes reading them fetch each once) on a thread of this process, and holds them for its batches
    (:class:`WindowHolds`): what :class:`~embfile._pages.ReadAhead` does for local files.  A fetch that fails
    here is fetched again by the batch that needs it, which raises the error."""

    def __init__(self, dataset: RemoteDataset) -> None:
        self._dataset = dataset
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="embfile-fetch-ahead")

    def windows(self, ahead: Sequence[tuple[str, list[tuple[int, int]]]]) -> None:
        """Fetch the windows ``ahead`` (each a name and its record ranges)."""
        for name, ranges in ahead:
            self._thread.submit(self._fetch, name, ranges)

    def _fetch(self, name: str, ranges: list[tuple[int, int]]) -> None:
        d = self._dataset
        with contextlib.suppress(Exception):
            d._window_holds().add(name, d._fetch_blocks(d._blocks_of(ranges), name))

    def stop(self, wait: bool = True) -> None:
        self._thread.shutdown(wait=wait, cancel_futures=True)


def fetch_all(requests: Sequence[tuple[RemoteFile, int, int]]) -> None:
    """Fetch byte ranges of several files into their partial copies, up to IN_FLIGHT requests at once."""

    def one(request: tuple[RemoteFile, int, int]) -> None:
        f, a, b = request
        f.store(a, f.remote.read_range(a, b, f.identity))

    if len(requests) == 1:
        one(requests[0])
    elif requests:
        with ThreadPoolExecutor(min(IN_FLIGHT, len(requests))) as pool:
            list(pool.map(one, requests))


def _fetched(held: Held, requests: list[tuple[RemoteFile, int, int]]) -> Held:
    """``held``, once the byte ranges ``(file, start, end)`` it lacked are fetched (on a failure, released)."""
    with contextlib.ExitStack() as failed:
        failed.callback(held.release)
        fetch_all(_merged(requests))
        failed.pop_all()
    return held


class Held:
    """Records blocks ``(file, numbers)`` held in their partial copies (:meth:`RemoteFile.hold`) from creation
    until released: what a lookup or a window of an epoch is reading, which no other handle frees."""

    def __init__(self, blocks: Sequence[tuple[RemoteFile, np.ndarray]], cache: Cache) -> None:
        self.blocks: list[tuple[RemoteFile, np.ndarray]] = []
        self._cache = cache
        try:
            for f, numbers in blocks:
                f.hold(numbers)
                self.blocks.append((f, numbers))
        except BaseException:
            self.release()
            raise

    def release(self, free: bool = False) -> None:
        """Let go of the blocks (once); with ``free``, give back the space of those no handle holds."""
        blocks, self.blocks = self.blocks, []
        for f, numbers in blocks:
            f.let_go(numbers, free)

    def read(self) -> None:
        """Let go of a window read: if the cache is over its limit once it evicted what no handle uses (the
        files this epoch reads are larger), give back the window's space."""
        self.release(free=bool(self.blocks) and self._cache.evict())

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RemoteDataset(Dataset):
    """A dataset (one .emb file or a dataset folder) at an ``s3://``, ``gs://``, ``https://`` or ``hdfs://``
    URL; see :func:`embfile.open`.  The same methods as a local dataset.

    Attributes
    ----------
    url : str
        What was opened.
    cache : embfile.remote.cache.Cache
        Where its files are kept.
    """

    def __init__(
        self,
        url: str,
        version: int | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._options = (cache_dir, cache_limit, storage_options)
        self.cache = Cache(cache_dir, cache_limit)
        self.remote = Remote(self.url, storage_options)
        self._remote_files: list[RemoteFile] = []
        self._remote_segments: list[RemoteFile] = []
        self._whole = False
        self._partial_layout_cache: Layout | None = None
        self._holds_here: tuple[int, WindowHolds | None] = (-1, None)  # this process's, and its pid
        self._holds_lock = threading.Lock()
        try:
            manifest = self._manifest(version)
            if manifest is None:
                try:
                    single = RemoteFile(self.remote, self.cache)
                except FileNotFoundError:
                    raise FileNotFoundError(errno.ENOENT, "no .emb file or dataset folder there", self.url) from None
                self._remote_files = self._remote_segments = [single]
            else:
                files = self._open_all(
                    [*((e, False) for e in manifest.shards), *((e, True) for e in manifest.segments)]
                )
                self._remote_files, self._remote_segments = files[: len(manifest.shards)], files[len(manifest.shards) :]
                self.version, self.manifest = manifest.version, manifest
            self._attach_files()
        except BaseException:
            self._close_remote()
            raise

    def _manifest(self, version: int | str | None) -> layout.Manifest | None:
        """The manifest of ``version`` (default: the latest) if the URL is a dataset folder, else None."""
        if self.url.endswith(".emb"):
            if version is not None:
                raise ValueError("version= applies to a dataset folder, not to one .emb file")
            return None
        return read_manifest(self.remote, version)

    def _open_all(self, entries: Sequence[tuple[layout.FileEntry, bool]]) -> list[RemoteFile]:
        """Open the files a manifest names, their headers read concurrently."""

        def one(entry: tuple[layout.FileEntry, bool]) -> RemoteFile:
            e, segment = entry
            f = RemoteFile(self.remote.child(e.path), self.cache, (e.count, e.keys_crc))
            if segment and (f.mapped.dim, f.mapped.dtype) != (1, np.dtype("<u8")):
                f.close()
                raise errors.CorruptFileError(f"{f.remote.url}: a key-index segment holds one uint64 per key")
            return f

        opened: list[RemoteFile] = []
        with ThreadPoolExecutor(min(IN_FLIGHT, max(len(entries), 1))) as pool:
            futures = [pool.submit(one, e) for e in entries]
            failure: BaseException | None = None
            for fut in futures:
                try:
                    opened.append(fut.result())
                except BaseException as e:
                    failure = failure or e
        if failure is not None:
            for f in opened:
                f.close()
            raise failure
        return opened

    def _attach_files(self) -> None:
        self._partial_layout_cache = None
        headers = [f.mapped.header for f in self._remote_files]
        self._block_base = np.cumsum([0, *(-(-h.records_size // h.block_bytes) for h in headers)])
        self._block_bytes = np.array([h.block_bytes for h in headers], np.int64)
        files = [f.mapped for f in self._remote_files]
        first = files[0]
        for f in files[1:]:
            if (f.dim, f.dtype) != (first.dim, first.dtype):
                raise errors.ShardError(f"{f.path} has dim {f.dim}, {first.path} dim {first.dim}")
        self._open_files([f.mapped for f in self._remote_segments], files, self.url)
        self._whole = all(f.whole for f in self._remote_files + self._remote_segments)

    # -- lookups: fetch the pages a lookup needs, then look up locally --------------------------------------

    def _fetch_for(self, keys: Sequence[str]) -> Held:
        """Fetch every page the lookups of ``keys`` and their records need, the records held until released."""
        if self._whole:
            return Held([], self.cache)
        rows = self._fetch_index(keys)
        return self._fetch_rows(rows[rows >= 0])

    def _fetch_index(self, keys: Sequence[str]) -> np.ndarray:
        """Fetch the pages of the key index that the lookups of ``keys`` need: the row of each, -1 if absent."""
        self._require_attached()
        haves = [f.have for f in self._remote_segments]
        for _ in range(MAX_ROUNDS):
            rows, needs = self.probe(keys, haves)
            if not len(needs):
                return rows
            requests = []
            for s, first, last in np.unique(needs, axis=0).tolist():
                f = self._remote_segments[s]
                requests += [(f, a, b) for a, b in f.needs(first * PAGE, (last + 1) * PAGE)]
            fetch_all(_merged(requests))
        raise errors.CorruptFileError(f"{self.url}: a lookup did not settle in {MAX_ROUNDS} rounds of reads")

    def _fetch_rows(self, rows: np.ndarray) -> Held:
        """Fetch the pages of the records at ``rows`` (of ragged records, their ranges first), held until
        released: the whole records section of each file holding them (one lock), for as long as a lookup."""
        if self._whole or not rows.size:
            return Held([], self.cache)
        if rows.size == 1 and not self.ragged:  # one key's record (db[key]): no set arithmetic on one element
            row = int(rows[0])
            part = bisect.bisect_right(self._starts, row) - 1
            f = self._remote_files[part]
            rb = self.dim * self.dtype.itemsize
            start = f.mapped.header.records_offset + (row - self._starts[part]) * rb
            return _fetched(Held([(f, f.every_block)], self.cache), [(f, *r) for r in f.needs(start, start + rb)])
        parts = [(self._remote_files[p], local) for p, local in _by_part(np.unique(rows), self._starts)]
        held = Held([(f, f.every_block) for f, _ in parts], self.cache)
        if self.ragged:  # each record's two ranges entries
            fetch_all(
                _merged(
                    [
                        (f, *r)
                        for f, local in parts
                        for r in f.needs_of(*(f.mapped.header.ranges_offset + 8 * e for e in _spans(local, local + 2)))
                    ]
                )
            )
        requests = []
        rb = self.dim * self.dtype.itemsize
        for f, local in parts:
            h = f.mapped.header
            if not h.ragged and f.has(h.records_offset + rb * local.astype(np.int64), rb):
                continue  # every record read before: the lookups of a warm cache
            lo, hi = (local, local + 1) if not h.ragged else (f.mapped.ranges()[local], f.mapped.ranges()[local + 1])
            lo = np.minimum(lo.astype(np.int64), h.n_rows)  # damaged ranges: the table says so
            hi = np.minimum(np.maximum(lo, hi.astype(np.int64)), h.n_rows)
            runs = _spans(lo, hi)  # runs of neighbouring records
            requests += [(f, *r) for r in f.needs_of(*(h.records_offset + rb * e for e in runs))]
        return _fetched(held, requests)

    # A record read from a partial copy is a copy, not a view: its pages may be freed once the lookup ends.

    def __getitem__(self, key: str) -> np.ndarray:
        with self._fetch_for([key]):
            return super().__getitem__(key) if self._whole else super().__getitem__(key).copy()

    # Finding rows needs the key index alone, not the records.

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and not self._whole:
            self._fetch_index([key])
        return super().__contains__(key)

    def row(self, key: str) -> int:
        if not self._whole:
            self._fetch_index([key])
        return super().row(key)

    def rows(self, keys: Any) -> np.ndarray:
        keys = _listed(keys, "rows")
        if not self._whole:
            self._fetch_index(keys)
        return super().rows(keys)

    def find_rows(self, keys: Any) -> np.ndarray:
        keys = _listed(keys, "find_rows")
        if not self._whole:
            self._fetch_index(keys)
        return super().find_rows(keys)

    def get_batch(self, keys: Any, pad: bool = True) -> Any:
        keys = _listed(keys, "get_batch")
        with self._fetch_for(keys):
            return super().get_batch(keys, pad)

    def record(self, row: int) -> np.ndarray:
        self._require_attached()
        if self._whole:
            return super().record(row)
        r = int(row) + (len(self) if int(row) < 0 else 0)
        with self._fetch_rows(np.array([r]) if 0 <= r < len(self) else np.zeros(0, np.int64)):
            return super().record(row).copy()

    def take(self, rows: Sequence[int] | np.ndarray, pad: bool = True) -> Any:
        if self._whole:
            return super().take(rows, pad)
        self._require_attached()
        rows = self._row_numbers(rows)
        with self._fetch_rows(rows.astype(np.int64)):
            if self.ragged:
                return self._gather_ragged(rows, pad)
            out = np.empty((len(rows), self.dim), self.dtype)
            self._layout_of(self.files).gather(rows, out)  # the partial copies
            return out

    @property
    def metadata(self) -> dict[str, Any]:
        self._require_attached()
        first = self._remote_files[0]
        h = first.mapped.header
        first.fetch([(h.meta_offset, h.meta_offset + h.meta_size)])
        return first.mapped.metadata

    # -- everything else reads whole local copies -----------------------------------------------------------

    def download(self) -> None:
        """Download every file of the dataset into the cache (those not there yet), check each against its
        checksums, and read from the whole copies from now on: no more requests.  The first bulk read does
        this; it re-attaches the lookup table, so no other thread may use the handle meanwhile."""
        self._require_attached()
        if self._whole:
            return
        files = list(dict.fromkeys(self._remote_files + self._remote_segments))
        with ThreadPoolExecutor(DOWNLOADS_IN_FLIGHT) as pool:
            wholes = dict(zip(files, pool.map(RemoteFile.download, files)))
        self._detach()
        for f in files:
            if f.partial is not None:
                f.use_whole(wholes[f])
        self._attach_files()

    def lengths(self, keys: Any = None) -> np.ndarray:
        """As :meth:`Dataset.lengths`; of ragged records from the files' ranges sections (8 bytes a record,
        fetched whole), not from whole copies of the files: what an engine's driver reads to cut its tasks."""
        if self._whole:
            return super().lengths(keys)
        if keys is not None:  # their lookups fetch each record's ranges entry
            rows = self.rows(keys).view(np.uint64)
            return self._extents(rows)[1].view(np.int64) if self.ragged else np.ones(len(rows), np.int64)
        self._require_attached()
        if not self.ragged:
            return np.ones(len(self), np.int64)
        for f in self._remote_files:
            h = f.mapped.header
            f.fetch([(h.ranges_offset, h.ranges_offset + h.ranges_size)])
        return np.concatenate([np.diff(f.mapped.ranges().astype(np.int64)) for f in self._remote_files])

    def _arrow_rows(self, lo: int, hi: int) -> Any:
        """Rows ``[lo, hi)`` from the files holding them alone, fetched by range reads (:meth:`fetch_records`):
        an engine's read task of a slice of a file costs that slice, not the file, whichever worker runs it."""
        if self._whole or hi <= lo:
            return super()._arrow_rows(lo, hi)
        self.fetch_records(lo, hi)
        first, last = self._files_holding(lo, hi)
        return self._arrow([f.mapped for f in self._remote_files[first:last]]).slice(lo - self._starts[first], hi - lo)

    def fetch_records(self, lo: int, hi: int) -> None:
        """Fetch records ``[lo, hi)`` by range reads, checked: of each file holding them, its keys (and ranges)
        section whole and the checksum blocks holding their rows, each against its stored checksum.  Reads of
        those records (``take``, ``keys_at``, an engine's task, whose Arrow arrays are views of them) then ask
        nothing more of the server; they are held until the handle closes."""
        if self._whole or hi <= lo:
            return
        self._require_attached()
        first, last = self._files_holding(lo, hi)
        for f in self._remote_files[first:last]:
            f.fetch_sections(["keys"])
        self._fetch_ranges([(lo, hi)])  # never released: the holds end with the handle

    def _epoch_reads(self) -> tuple[Layout, Fetch | None]:
        """An epoch streams from the partial copies, fetching each window's records before it reads them
        (:meth:`_fetch_ranges`), unless the files are whole here already: its first batch waits for one window,
        not for the dataset, and a rank fetches only the windows of its own share."""
        self._require_attached()
        if self._whole:
            return super()._epoch_reads()
        return self._partial_layout(), self._fetch_ranges

    def _partial_layout(self) -> Layout:
        """Where the rows are in the partial copies (:meth:`Dataset._layout` downloads the files whole)."""
        if self._partial_layout_cache is None:
            self._partial_layout_cache = self._layout_of(self.files)
        return self._partial_layout_cache

    def _reading(self, rows: np.ndarray, windows: Sequence[str] = ()) -> contextlib.AbstractContextManager[Layout]:
        """A batch of a map-style epoch in windows (``windows`` names those of
        :class:`embfile.torch.BatchSampler`'s its rows come from) reads blocks this process holds for its
        windows (:class:`WindowHolds`), fetched and checked as an epoch's are (under those windows' locks, so
        the DataLoader workers reading a window fetch it once).  Rows from anywhere (a random sampler's) are
        read from whole copies, downloaded first: an epoch of them would fetch every page, one request each."""
        if self._whole or not windows or not len(rows):
            return super()._reading(rows, windows)
        self._require_attached()
        return self._window_holds().reading(rows.astype(np.int64, copy=False), windows)

    def _window_holds(self) -> WindowHolds:
        """This process's :class:`WindowHolds` (a forked child's parent held its own)."""
        pid, holds = self._holds_here
        if holds is None or pid != os.getpid():
            with self._holds_lock:
                pid, holds = self._holds_here
                if holds is None or pid != os.getpid():
                    holds = WindowHolds(self)
                    self._holds_here = os.getpid(), holds
        return holds

    def _read_ahead(self) -> WindowReader:
        return super()._read_ahead() if self._whole else WindowFetcher(self)

    def _fetch_ranges(self, ranges: Sequence[tuple[int, int]]) -> Callable[[], None]:
        """Fetch the records of ``ranges`` (``(lo, hi)`` record numbers) by range reads, all in flight together,
        and check them (:meth:`_fetch_blocks`).  Processes sharing the cache that ask for the same ranges (a
        DataLoader's workers, which all read every window) fetch them once: the others wait, then find the pages
        there.  The blocks are held until the function returned is called, once they are read
        (:meth:`Held.read`: under a cache limit, their space is then given back)."""
        self._require_attached()
        if self._whole:
            return lambda: None
        return self._fetch_blocks(self._blocks_of(ranges), f"{list(ranges)}").read

    def _blocks_of(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[RemoteFile, np.ndarray]]:
        """The checksum blocks of each file holding the records of ``ranges`` (``(lo, hi)`` record numbers); of
        ragged records, through the ranges sections, fetched whole and checked first."""
        pieces: dict[int, list[tuple[int, int]]] = {}  # file: its records' ranges
        for lo, hi in ranges:
            first, last = self._files_holding(lo, hi)
            for i in range(first, min(last, len(self._remote_files))):
                start, end = self._starts[i], self._starts[i + 1]
                if min(hi, end) > max(lo, start):
                    pieces.setdefault(i, []).append((max(lo, start) - start, min(hi, end) - start))
        return [self._blocks_in(self._remote_files[i], *np.array(local, np.int64).T) for i, local in pieces.items()]

    def _block_ids(self, rows: np.ndarray) -> np.ndarray:
        """The checksum blocks holding the records at ``rows``, numbered across the files (sorted): a batch of
        a map-style epoch is hundreds of records from the blocks of a window, found in a few numpy steps."""
        rows = np.unique(rows)
        if self.ragged:
            return np.concatenate(
                [
                    self._blocks_in(self._remote_files[p], r, r + 1)[1] + self._block_base[p]
                    for p, r in _by_part(rows, self._starts)
                ]
            )
        starts = np.asarray(self._starts, np.int64)
        part = np.searchsorted(starts, rows, side="right") - 1
        local = rows - starts[part]
        record_bytes, block_bytes = self.dim * self.dtype.itemsize, self._block_bytes[part]
        first, last = local * record_bytes // block_bytes, ((local + 1) * record_bytes - 1) // block_bytes
        return np.unique(np.concatenate((first, last)) + np.tile(self._block_base[part], 2))

    def _per_file(self, ids: np.ndarray) -> list[tuple[RemoteFile, np.ndarray]]:
        """Blocks numbered across the files (sorted, distinct), as each file's."""
        return [(self._remote_files[p], numbers) for p, numbers in _by_part(ids, self._block_base)]

    def _global_ids(self, blocks: Sequence[tuple[RemoteFile, np.ndarray]]) -> np.ndarray:
        """Each file's blocks, numbered across the files."""
        index = {id(f): i for i, f in enumerate(self._remote_files)}
        return np.concatenate([np.zeros(0, np.int64), *(n + self._block_base[index[id(f)]] for f, n in blocks)])

    @staticmethod
    def _blocks_in(f: RemoteFile, lo: np.ndarray, hi: np.ndarray) -> tuple[RemoteFile, np.ndarray]:
        if f.mapped.header.ragged:
            f.fetch_sections(["ranges"])
        return f, f.blocks(lo, hi)

    def _fetch_blocks(self, blocks: Sequence[tuple[RemoteFile, np.ndarray]], *what: str) -> Held:
        """Hold checksum ``blocks`` (each file's, by number), fetch those not here by range reads, all in flight
        together, and check each against its stored checksum once per handle and fetch.  The fetch holds the
        cache's locks for the names ``what`` of what it fetches: processes naming the same at once fetch it
        once, the others waiting, then finding the pages there."""
        for f, _ in blocks:
            f.fetch_sums()
        held = Held(blocks, self.cache)
        with contextlib.ExitStack() as failed:
            failed.callback(held.release)
            if any(f.block_needs(numbers) for f, numbers in blocks):
                with self.cache.fetching(*(f"{self.url} {self.version} {w}" for w in what)):
                    # what another process fetched meanwhile is here now
                    fetch_all(_merged([(f, a, b) for f, numbers in blocks for a, b in f.block_needs(numbers)]))
            bad = [(f, b) for f, numbers in blocks for b in f.check_blocks(numbers)]
            if bad:  # the cache's copy may be what is damaged (a disk's fault): fetch those blocks again, once
                for f, b in bad:
                    f.forget(b)
                fetch_all(_merged([(f, a, b) for f, b in bad for a, b in f.block_needs(np.array([b]))]))
                for f, b in bad:
                    if f.check_blocks(np.array([b])):
                        raise errors.ChecksumError(f"{f.remote.url}: records block {b} does not match its checksum")
            failed.pop_all()
        return held

    def _file_location(self, i: int) -> str:
        return self._remote_files[i].remote.url

    @staticmethod
    def _open_part(part: ReadPart, storage_options: dict[str, Any] | None) -> Dataset:
        return checked_part(RemoteDataset(part.path, storage_options=storage_options), part)

    def _storage_options(self) -> dict[str, Any] | None:
        return self._options[2]

    def _require_open(self) -> None:
        """Bulk reads (every Python-level method that calls this) need the whole files."""
        self.download()

    # -- keys by row: from the key index's keys sections alone ----------------------------------------------

    def key(self, row: int) -> str:
        self._require_attached()
        row = _core.row_number(row, len(self))
        self._fetch_keys(np.array([row], np.int64))
        return super().key(row)

    def keys_between(self, start: int, stop: int) -> list[str]:
        self._fetch_keys(np.arange(max(start, 0), min(stop, len(self))))
        return super().keys_between(start, stop)

    def keys_at(self, rows: Any) -> list[str]:
        rows = self._row_numbers(rows, "keys_at()")
        self._fetch_keys(rows.astype(np.int64))
        return super().keys_at(rows)

    def _fetch_keys(self, rows: np.ndarray) -> None:
        """Fetch the keys sections of the key-index segments holding ``rows``, whole and checked: keys read by
        row are names the caller trusts (a lookup, by contrast, compares the key it was given), and a keys
        section costs a few percent of the records it names."""
        self._require_attached()
        if self._whole or not rows.size:
            return
        starts = np.cumsum([0, *(f.mapped.count for f in self._remote_segments)])
        rows = rows[(rows >= 0) & (rows < starts[-1])]
        for s in np.unique(np.searchsorted(starts, rows, "right") - 1).tolist():
            self._remote_segments[s].fetch_sections(["keys"])

    def _check_index(self) -> tuple[bool, int]:
        self.download()
        return super()._check_index()

    @property
    def requests(self) -> int:
        """How many requests this handle has sent (what a benchmark and the tests count)."""
        return self.remote.counts.requests

    @property
    def bytes_read(self) -> int:
        """How many bytes this handle has received."""
        return self.remote.counts.bytes_read

    def close(self) -> None:
        pid, holds = self._holds_here
        if holds is not None and pid == os.getpid():
            holds.let_go()
        super().close()
        self._partial_layout_cache = None
        self._close_remote()

    def _close_remote(self) -> None:
        for f in {*self._remote_files, *self._remote_segments}:
            f.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.url, self.version, *self._options))


def _reopen(url: str, version: int | None, *options: Any) -> RemoteDataset:
    return RemoteDataset(url, version, *options)


def read_manifest(remote: Remote, version: int | str | None = None) -> layout.Manifest | None:
    """The manifest of ``version`` (a number or a tag's name; default: the latest) of the dataset folder at
    ``remote``; None if there is no version there at all (a single file, or nothing)."""
    if isinstance(version, str):
        version = tagged_version(remote, version)
    if version is None:
        try:
            hint = int(remote.child(layout.LATEST).read_all().strip() or b"0")
        except FileNotFoundError:
            if not remote.child(version_name(1)).exists():
                return None
            hint = 0
        except ValueError:
            hint = 0
        version = max(hint, 1)
        while remote.child(version_name(version + 1)).exists():
            version += 1
    try:
        data = remote.child(version_name(version)).read_all()
    except FileNotFoundError:
        raise errors.VersionNotFoundError(f"{remote.url}: no version {version}") from None
    manifest = layout.Manifest.from_json(data, f"{remote.url}/{version_name(version)}")
    if manifest.version != version:
        raise errors.CorruptFileError(f"{remote.url}: manifest {version} says it is version {manifest.version}")
    return manifest


def tagged_version(remote: Remote, name: str) -> int:
    """The version the tag ``name`` of the dataset folder at ``remote`` names."""
    where = remote.child(f"{layout.TAGS}/{layout.tag_name(name)}.json")
    try:
        return layout.tag_version(where.read_all(), where.url)
    except FileNotFoundError:
        raise errors.VersionNotFoundError(f"{remote.url}: no tag {name!r}") from None


def remote_tags(remote: Remote) -> dict[str, int]:
    """Every tag of the dataset folder at ``remote`` and the version it names.  Where the server lists no
    folders (a plain http(s) server), the tags the ``tags.json`` hint names, each read to check it is there (a
    RemoteError if there is no hint: a dataset tagged by an embfile that wrote none)."""
    names = remote.child(layout.TAGS).names()
    if not names and remote.protocol in ("http", "https") and not remote.child(layout.VERSIONS).names():
        hint = remote.child(layout.TAG_LIST)
        try:
            names = [f"{name}.json" for name in layout.tag_list(hint.read_all(), hint.url)]
        except FileNotFoundError:
            raise errors.RemoteError(
                f"{remote.url}: the server lists no folders and the dataset has no list of its tags "
                f"({layout.TAG_LIST}, written by every tag change), so they cannot be listed (one opens by name, "
                "version='NAME')"
            ) from None

    def version(file: str) -> int | None:
        where = remote.child(f"{layout.TAGS}/{file}")
        try:
            return layout.tag_version(where.read_all(), where.url)
        except FileNotFoundError:  # removed meanwhile
            return None

    files = [f for f in names if layout.tag_of(f) is not None]
    with ThreadPoolExecutor(SMALL_READS) as pool:
        found = dict(zip(files, pool.map(version, files)))
    return {layout.tag_of(f): v for f, v in found.items() if v is not None}  # type: ignore[misc]


def _by_part(numbers: np.ndarray, starts: Sequence[int] | np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Sorted ``numbers`` (rows, blocks) of parts that start at ``starts``: each part holding some, and its
    numbers, counted from its start."""
    starts = np.asarray(starts, np.int64)
    part = np.searchsorted(starts, numbers, side="right") - 1
    cuts = np.flatnonzero(np.diff(part)) + 1
    firsts = part[np.concatenate(([0], cuts))].tolist() if len(numbers) else []
    return [(p, local - starts[p]) for p, local in zip(firsts, np.split(numbers, cuts))]


def _spans(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of the ranges ``[lo[i], hi[i])`` as sorted, disjoint ranges (empty ones dropped): their
    starts and ends, int64."""
    lo, hi = lo.astype(np.int64, copy=False), hi.astype(np.int64, copy=False)
    keep = hi > lo
    if not keep.all():
        lo, hi = lo[keep], hi[keep]
    if not len(lo):
        return lo, hi
    if (lo[1:] < lo[:-1]).any():
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
    reach = np.maximum.accumulate(hi)
    starts = np.flatnonzero(np.concatenate(([True], lo[1:] > reach[:-1])))
    return lo[starts], reach[np.append(starts[1:] - 1, len(lo) - 1)]


def _runs(numbers: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, distinct integers as runs of consecutive ones, ``(first, last + 1)``."""
    if not len(numbers):
        return []
    first, last = int(numbers[0]), int(numbers[-1])
    if last - first + 1 == len(numbers):
        return [(first, last + 1)]
    cut = np.flatnonzero(np.diff(numbers) != 1)
    return list(zip(numbers[np.concatenate(([0], cut + 1))].tolist(), (numbers[np.append(cut, -1)] + 1).tolist()))


def version_name(version: int) -> str:
    return f"{layout.VERSIONS}/{version:020d}.json"


def _listed(keys: Any, caller: str) -> list[str]:
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"{caller}() takes a sequence of keys, not a single key (db[key] gives one)")
    return keys.tolist() if isinstance(keys, np.ndarray) else list(keys)


def _merged(
    requests: list[tuple[RemoteFile, int, int]], gap: int = MERGE_GAP * PAGE
) -> list[tuple[RemoteFile, int, int]]:
    """Requests of the same file whose ranges overlap or are at most ``gap`` bytes apart, as one."""
    out: list[tuple[RemoteFile, int, int]] = []
    for f, a, b in sorted(set(requests), key=lambda r: (id(r[0]), r[1])):
        if out and out[-1][0] is f and a - out[-1][2] <= gap:
            out[-1] = (f, out[-1][1], max(b, out[-1][2]))
        else:
            out.append((f, a, b))
    return out
