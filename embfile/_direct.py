"""Epoch windows read around the page cache: ``O_DIRECT`` reads, several in flight, into aligned buffers.

Filling the page cache through the mapping tops out below a cold disk's sequential speed; reads that bypass
it, a MiB each with several in flight from threads, reach it.  So a cold epoch reads each window's row ranges
into one of two buffers (the next window is read while the current one is cut into batches), and the core
gathers batches from the buffer as it would from the mapping.  Where ``O_DIRECT`` is refused (tmpfs, some
network file systems) the epoch keeps the mapped path.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from embfile._pages import Layout, aligned_empty

ALIGN = 4096  # O_DIRECT wants offsets, lengths and addresses on the device's block: 4 KiB covers them
READ_BYTES = 1 << 20
IN_FLIGHT = 4


class DirectWindows:
    """Windows of row ranges read with ``O_DIRECT`` from the records sections of ``parts``: ``(path,
    records_offset, first row, rows)`` each, in row order.  Raises OSError if a file refuses ``O_DIRECT``."""

    def __init__(self, parts: Sequence[tuple[str, int, int, int]], record_bytes: int) -> None:
        self.record_bytes = record_bytes
        self.fds: list[int] = []
        try:
            for path, *_ in parts:
                self.fds.append(os.open(path, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            self.close()
            raise
        self.parts = [(offset, first, rows) for _, offset, first, rows in parts]
        self.n = parts[-1][2] + parts[-1][3] if parts else 0
        self.pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="embfile-direct")
        # window -> its buffer, its pieces (first row, end row, address) and its reads (and the bytes each must give)
        self.windows: dict[int, tuple[np.ndarray, list[tuple[int, int, int]], list[tuple[Future[int], int]]]] = {}
        self.spare: list[np.ndarray] = []  # buffers of finished windows, for the next ones

    def start(self, w: int, ranges: list[tuple[int, int]]) -> None:
        """Begin reading window ``w``, whose rows are ``ranges`` (``(lo, hi)``, ascending)."""
        if w in self.windows:
            return
        pieces = [piece for lo, hi in ranges for piece in self._split(lo, hi)]
        size = sum(self._span(p)[1] + ALIGN for p in pieces)
        fits = [i for i, b in enumerate(self.spare) if len(b) >= size]
        if fits:
            buffer = self.spare.pop(fits[0])
        else:  # windows differ a little in size: a new buffer an eighth larger serves the ones after
            self.spare.clear()
            buffer = aligned_empty(-(-size * 9 // 8 // READ_BYTES) * READ_BYTES, np.uint8, ALIGN)
        placed, reads = [], []
        at = 0
        for s, lo, hi in pieces:
            start, length = self._span((s, lo, hi))
            offset, first, _ = self.parts[s]
            end = offset + (hi - first) * self.record_bytes  # what must be read; past it, alignment
            placed.append((lo, hi, buffer.ctypes.data + at + (offset + (lo - first) * self.record_bytes - start)))
            for piece_at in range(0, length, READ_BYTES):
                view = buffer.data[at + piece_at : at + min(length, piece_at + READ_BYTES)]
                read = self.pool.submit(os.preadv, self.fds[s], [view], start + piece_at)
                reads.append((read, min(len(view), end - start - piece_at)))
            at += -(-length // ALIGN) * ALIGN
        self.windows[w] = (buffer, placed, reads)

    def layout(self, windows: Sequence[int]) -> Layout:
        """The rows of ``windows`` (started), once read (OSError if a read failed): a batch may span two."""
        pieces = sorted(p for w in windows for p in self.windows[w][1])
        for w in windows:
            for read, need in self.windows[w][2]:
                if read.result() < need:
                    raise OSError(f"short read of an epoch window ({read.result()} of {need} bytes)")
        bases, starts = [], [0]
        for lo, hi, address in pieces:
            if lo > starts[-1]:  # rows of no window here: a part never read from
                bases.append(address)
                starts.append(lo)
            bases.append(address)
            starts.append(hi)
        if starts[-1] < self.n:
            bases.append(pieces[-1][2] if pieces else 0)
            starts.append(self.n)
        owners = [self.windows[w][0] for w in windows]
        return Layout(np.array(bases, np.uintp), np.array(starts, np.uint64), self.record_bytes, owners)

    def release(self, w: int) -> None:
        """Window ``w`` is done: its buffer serves a later one."""
        found = self.windows.pop(w, None)
        if found is not None:
            concurrent.futures.wait([read for read, _ in found[2]])
            self.spare.append(found[0])

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _split(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Rows ``[lo, hi)`` as ``(part, lo, hi)`` pieces, one per file they are in."""
        out = []
        for s, (_, first, rows) in enumerate(self.parts):
            a, b = max(lo, first), min(hi, first + rows)
            if a < b:
                out.append((s, a, b))
        return out

    def _span(self, piece: tuple[int, int, int]) -> tuple[int, int]:
        """The aligned ``(file offset, length)`` holding a piece's records."""
        s, lo, hi = piece
        offset, first, _ = self.parts[s]
        begin = offset + (lo - first) * self.record_bytes
        end = offset + (hi - first) * self.record_bytes
        start = begin // ALIGN * ALIGN
        return start, -(-(end - start) // ALIGN) * ALIGN
