"""Records in memory: where a dataset's rows are mapped, and what is asked of the kernel about their pages.

A :class:`Layout` says where each row lives in the bulk mappings of a dataset's files; the epochs, ``take``,
``to_numpy`` and the exports gather from it in the native core.  :class:`ReadAhead` moves page-cache work
(read ahead, map in, let go) onto a thread of its own, and :func:`faulted_in_ahead` does the same for the
first touch of a new array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np

from embfile import _core

# Linux 5.14's madvise values (Python's mmap module names them from 3.13 or not at all)
POPULATE_READ: int = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE: int | None = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)
POPULATE_STEP = 8 << 20  # pages faulted in per madvise call of the helper thread


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where rows live: part ``s`` holds rows ``starts[s]`` to ``starts[s + 1]`` at address ``bases[s]``.

    ``owner`` keeps every part mapped for as long as the layout is in use.
    """

    bases: np.ndarray  # uintp, one per part
    starts: np.ndarray  # uint64, one more than parts
    record_bytes: int
    owner: object
    random_rows: list[int] = dataclasses.field(default_factory=lambda: [0])  # gathered by gather_random so far

    def gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Copy ``rows`` (uint64) into ``out``, a C-contiguous array of ``len(rows)`` records."""
        _core.gather(self.bases, self.starts, self.record_bytes, rows, out)

    def gather_random(self, rows: np.ndarray, out: np.ndarray, chunk: int = 0, processes: int = 1) -> None:
        """:meth:`gather` of rows from anywhere: if they look uncached (a sample of them), the kernel is first
        asked for all their pages at once, so the copy waits on many reads in flight, not on one page fault at
        a time.  It reads the ``chunk``-byte pieces around them (a multiple of the page size), by default
        their pages alone until an eighth of the records came this way and 64 KiB pieces after that (see
        ``_core.prefetch_chunk``); of ``processes`` sharing the gathers of one epoch (DataLoader workers),
        this one's gathers count for all of them."""
        chunk = chunk or _core.prefetch_chunk(self.random_rows[0] * processes, int(self.starts[-1]))
        self.random_rows[0] += len(rows)
        if len(rows) > 1:
            _core.prefetch(self.bases, self.starts, self.record_bytes, np.sort(rows), chunk=chunk)
        self.gather(rows, out)

    def copy_all(self, out: np.ndarray) -> None:
        """Copy every row, in order, into ``out``: one pass in address order over each part."""
        _core.copy_all(self.bases, self.starts, self.record_bytes, out)

    def page_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The page-aligned ``(address, length)`` ranges holding rows ``[lo, hi)``."""
        out = []
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        for s in range(max(first, 0), len(self.bases)):
            a, b = max(lo, int(self.starts[s])), min(hi, int(self.starts[s + 1]))
            if a >= hi:
                break
            if a < b:
                start = int(self.bases[s]) + (a - int(self.starts[s])) * self.record_bytes
                end = int(self.bases[s]) + (b - int(self.starts[s])) * self.record_bytes
                aligned = start // mmap.PAGESIZE * mmap.PAGESIZE
                out.append((aligned, end - aligned))
        return out

    def advise(self, lo: int, hi: int, advice: int) -> None:
        """``madvise`` the pages of rows ``[lo, hi)`` (``WILLNEED`` through ``_core.hint``: every page read)."""
        for address, length in self.page_ranges(lo, hi):
            if advice == mmap.MADV_WILLNEED:
                _core.hint(address, length)
            else:
                _core.advise(address, length, advice)

    def sampled_cached(self, ranges: Sequence[tuple[int, int]], samples: int = 8) -> bool:
        """Whether one page each of up to ``samples`` of the row ranges ``ranges`` (spread over them) is in the
        page cache: a look at a window costing a few system calls."""
        picks = ranges[:: max(1, -(-len(ranges) // samples))]
        return all(_core.resident_fraction(self.page_ranges(lo, lo + 1)[0][0], mmap.PAGESIZE) == 1.0 for lo, _ in picks)

    def cached(self, samples: int = 16, sample_bytes: int = 1 << 20) -> bool:
        """Whether the records look to be in the page cache: at least 90% of ``samples`` ranges spread over
        them (``mincore``)."""
        total = int(self.starts[-1]) if len(self.bases) else 0
        if total == 0:
            return True
        step = max(1, total // samples)
        rows = max(1, sample_bytes // self.record_bytes)
        ranges = [r for lo in range(0, total, step) for r in self.page_ranges(lo, min(total, lo + rows))]
        held = sum(_core.resident_fraction(a, n) * n for a, n in ranges)
        return held >= 0.9 * sum(n for _, n in ranges)

    def first_part_cached(self, limit: int = 64 << 20) -> bool:
        """Whether most of the first ``limit`` bytes of records are in the page cache."""
        length = min(int(self.starts[1] - self.starts[0]) * self.record_bytes, limit) if len(self.bases) else 0
        return length > 0 and _core.resident_fraction(int(self.bases[0]), length) >= 0.5


def aligned_empty(shape: int | Sequence[int], dtype: object, align: int = 4096) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    nbytes = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    out: np.ndarray = raw[start : start + nbytes].view(dt).reshape(shape)
    return out


@contextlib.contextmanager
def faulted_in_ahead(out: np.ndarray) -> Iterator[None]:
    """Fault in the pages of ``out``, a new array, on a helper thread while the caller fills it.

    The first write to new memory makes the kernel zero each page (and, in a VM whose free memory went
    back to the host, fault it in from the host): as slow as the copy that fills it, or slower.  Done on
    another core, ahead of the copy, it leaves the copy alone on the critical path.  Only whole pages
    inside ``out`` are touched; without ``MADV_POPULATE_WRITE`` the copy faults the pages in itself.
    """
    start = out.ctypes.data
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + out.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    advice = MADV_POPULATE_WRITE
    if advice is None or hi - lo < 2 * POPULATE_STEP:
        yield
        return
    stop = threading.Event()

    def populate() -> None:
        for at in range(lo, hi, POPULATE_STEP):
            if stop.is_set():
                return
            try:
                _core.advise(at, min(POPULATE_STEP, hi - at), advice)
            except OSError:  # a kernel without it
                return

    helper = threading.Thread(target=populate, name="embfile-fault-in", daemon=True)
    helper.start()
    try:
        yield
    except BaseException:
        stop.set()  # out will not be used: stop faulting it in
        raise
    finally:
        helper.join()  # out must outlive the helper's last call


class WindowReader(Protocol):
    """Reads the windows a map-style epoch reads next, on a thread of its own."""

    def windows(self, ahead: Sequence[tuple[str, list[tuple[int, int]]]]) -> None:
        """Read the windows ``ahead``, each a name and its row ranges."""

    def stop(self, wait: bool = True) -> None:
        """End the thread."""


class ReadAhead:
    """A thread that reads upcoming row ranges into memory and lets go of finished ones.

    A hint asks the kernel for all of a window's pages at once (``WILLNEED``: the reads queue up
    together); populating maps them in (``POPULATE_READ``, which waits for them), so the main thread's
    gather finds them in place and takes no page faults; releasing unmaps a finished window
    (``DONTNEED``; the page cache keeps it), so resident memory stays at a few windows.  All of it runs
    here, in order, without the GIL.
    """

    def __init__(self, layout: Layout) -> None:
        self._layout = layout  # holds the mapping alive for the thread
        self._jobs: queue.SimpleQueue[tuple[list[tuple[int, int]], int] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._queued = self._done = 0  # counts of jobs (a lagging reader must not pile up releases)
        self._thread = threading.Thread(target=self._run, name="embfile-read-ahead", daemon=True)
        self._thread.start()

    def hint(self, ranges: list[tuple[int, int]]) -> None:
        self._put(ranges, mmap.MADV_WILLNEED)

    def populate(self, ranges: list[tuple[int, int]]) -> None:
        self._put(ranges, POPULATE_READ)

    def release(self, ranges: list[tuple[int, int]]) -> None:
        self._put(ranges, mmap.MADV_DONTNEED)

    def windows(self, ahead: Sequence[tuple[str, list[tuple[int, int]]]]) -> None:
        """Hint the windows ``ahead`` unless they look cached (:class:`WindowReader`)."""
        ranges = [r for _, window in ahead for r in window]
        if ranges and not self._layout.sampled_cached(ranges):
            self.hint(ranges)

    def _put(self, ranges: list[tuple[int, int]], advice: int) -> None:
        self._queued += 1
        self._jobs.put((ranges, advice))

    def backlog(self) -> int:
        """Jobs queued and not yet done."""
        return self._queued - self._done

    def stop(self, wait: bool = True) -> None:
        """Finish the releases asked for, skip the rest, end the thread (and wait for it)."""
        self._stopping.set()
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            ranges, advice = job
            if advice == mmap.MADV_DONTNEED or not self._stopping.is_set():
                for lo, hi in ranges:
                    try:
                        self._layout.advise(lo, hi, advice)
                    except OSError:
                        pass  # POPULATE_READ before Linux 5.14: the WILLNEED hint alone then
            self._done += 1
