"""One .emb file opened for reading: its checked header, its mappings, its checksums.

Opening reads and checks the 256-byte header (:class:`~embfile._format.Header`), maps the file, and
checks every section against the file size: constant time whatever the number of keys.  A
:class:`MappedFile` is storage, not yet a dataset: :class:`~embfile.EmbFile` and
:class:`~embfile.ShardedEmbFile` are built from one or several of them.
"""

from __future__ import annotations

import io
import json
import mmap
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from embfile import _core, errors
from embfile._format import PAGE, Header
from embfile._keys import EncodedKeys

READ_STEP = 64 << 20  # read_into's pread size: large enough for the kernel's full read-ahead
FIRST_READ = 64 << 10  # read_into's first pread: small, so that read-ahead starts small and ramps up


class MappedFile:
    """One .emb file, mapped twice: once for lookups, once for reading the records in bulk.

    The two mappings sit on two open files because the kernel keeps read-ahead state per open file:
    lookups want none (a record's pages, nothing around them), bulk reads the default.

    Attributes
    ----------
    path : str
        The file opened.
    header : embfile._format.Header
        Its header, checked against the file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        f, g, st = _open_twice(self.path)
        with f, g:
            self.header = h = Header.read(os.pread(f.fileno(), PAGE, 0), st.st_size, self.path)
            self.lookup_map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.lookup_map.madvise(mmap.MADV_RANDOM)
            self.bulk_map: mmap.mmap | None = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
        self._file_id = (st.st_dev, st.st_ino)
        self._table: _core.Table | None = None
        first, last = self.key_offsets()[[0, -1]]
        if first != 0 or last != h.keys_size - 8 * (h.count + 1):
            self.close()
            raise errors.CorruptFileError(f"{self.path}: keys section offsets do not span it")
        if h.ragged and tuple(self.ranges()[[0, -1]]) != (0, h.rows):
            self.close()
            raise errors.CorruptFileError(f"{self.path}: ranges section does not span the {h.rows} rows")

    @property
    def count(self) -> int:
        return self.header.count

    def __len__(self) -> int:
        return self.header.count

    @property
    def dim(self) -> int:
        return self.header.dim

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def closed(self) -> bool:
        return self.bulk_map is None

    def mappings(self) -> tuple[mmap.mmap, mmap.mmap]:
        """The lookup mapping (read-ahead off) and the bulk mapping, or ClosedFileError."""
        if self.lookup_map is None or self.bulk_map is None:
            raise errors.ClosedFileError(f"{self.path}: operation on a closed file")
        return self.lookup_map, self.bulk_map

    @property
    def ragged(self) -> bool:
        return self.header.ragged

    @property
    def rows(self) -> int:
        """Rows of the records section: :attr:`count`, or of a ragged file the rows of all its records."""
        return self.header.n_rows

    @property
    def matrix(self) -> np.ndarray:
        """All rows as a read-only ``(rows, dim)`` view of the bulk mapping, in row order."""
        h = self.header
        flat = np.frombuffer(self.mappings()[1], self.dtype, count=h.n_rows * h.dim, offset=h.records_offset)
        return flat.reshape(h.n_rows, h.dim)

    def ranges(self) -> np.ndarray:
        """Of a ragged file, the ``count + 1`` row offsets: record i is rows ``[r[i], r[i+1])`` (unchecked:
        :meth:`problems` checks them all, a lookup those it reads)."""
        h = self.header
        return np.frombuffer(self.mappings()[0], "<u8", count=h.count + 1, offset=h.ranges_offset)

    def table(self) -> _core.Table:
        """The native lookup table of this file alone (its own index, keys and records)."""
        if self._table is None:
            table = _core.Table()
            attach(table, [self], [self])
            self._table = table
        return self._table

    def key_segment(self) -> tuple[Any, ...]:
        """What the native table needs of this file's key index and keys sections (one segment)."""
        h = self.header
        return (
            self.mappings()[0],
            h.count,
            h.keys_offset,
            h.keys_size,
            h.index_offset,
            h.index_size,
            h.lcp_len,
            h.n_buckets,
        )

    def records_part(self) -> tuple[Any, ...]:
        """What the native table needs of this file's records section (one part)."""
        h = self.header
        return (self.mappings()[0], h.records_offset, h.count, h.ranges_offset, h.rows)

    def key_offsets(self) -> np.ndarray:
        """The keys section's ``count + 1`` byte offsets (key i is bytes [o[i], o[i+1]) after them)."""
        h = self.header
        return np.frombuffer(self.mappings()[0], "<u8", count=h.count + 1, offset=h.keys_offset)

    def encoded_keys(self, lo: int = 0, hi: int | None = None) -> EncodedKeys:
        """The keys of rows ``[lo, hi)`` as UTF-8 bytes, straight from the keys section (nothing copied)."""
        h, n = self.header, self.count
        hi = n if hi is None else min(hi, n)
        heap = np.frombuffer(self.mappings()[0], np.uint8, h.keys_size - 8 * (n + 1), h.keys_offset + 8 * (n + 1))
        offsets = self.key_offsets()[lo : max(lo, hi) + 1].astype(np.int64)
        if len(offsets) and ((np.diff(offsets) < 0).any() or offsets[-1] > heap.size):
            raise errors.CorruptFileError(f"{self.path}: keys section offsets of rows {lo}-{hi} are out of order")
        return EncodedKeys(offsets, heap)

    def prefetch_keys(self, lo: int, hi: int) -> None:
        """Ask the disk for the keys of rows ``[lo, hi)`` (a hint: clipped to the keys section).

        The lookup mapping has read-ahead off, so an iteration over the keys asks ahead itself.
        """
        h, n = self.header, self.count
        lo, hi = min(lo, n), min(hi, n)
        if lo >= hi:
            return
        lookup = self.mappings()[0]
        heap, size = h.keys_offset + 8 * (n + 1), h.keys_size - 8 * (n + 1)
        first, last = (min(int(o), size) for o in self.key_offsets()[[lo, hi]])
        for at, length in ((h.keys_offset + 8 * lo, 8 * (hi - lo + 1)), (heap + first, last - first)):
            if length > 0:
                page = at - at % mmap.PAGESIZE
                lookup.madvise(mmap.MADV_WILLNEED, page, at + length - page)

    def read_into(self, out: np.ndarray) -> None:
        """Fill ``out``, a C-contiguous ``(count, dim)`` array, with every record.

        ``pread`` in large requests gets the kernel's full read-ahead, at the disk's sequential speed on a
        cold file, where page faults on a mapping read ahead a little at a time.  The first request is
        small, so read-ahead starts small and grows as for any sequential reader (a large first request
        makes the kernel read its first megabytes synchronously).  The kernel copies at half speed when
        ``out`` and its page-aligned source differ mod 64 bytes, and the path may name another file by
        now: then the core copies from the mapping instead.
        """
        fd = self._reopen() if out.ctypes.data % 64 == 0 else None
        if fd is None:
            m = self.matrix
            _core.copy_all(
                np.array([m.ctypes.data], np.uintp),
                np.array([0, len(m)], np.uint64),
                self.dim * self.dtype.itemsize,
                out,
            )
            return
        view, at = out.reshape(-1).view(np.uint8).data, self.header.records_offset
        try:
            done = 0
            while done < view.nbytes:
                got = os.preadv(fd, [view[done : done + (READ_STEP if done else FIRST_READ)]], at + done)
                if got == 0:
                    raise errors.TruncatedFileError(
                        f"{self.path} ends at byte {at + done}, inside its records: "
                        "it was truncated after it was opened"
                    )
                done += got
        finally:
            os.close(fd)

    def _reopen(self) -> int | None:
        """A new descriptor of ``path`` if it still names the mapped file, else None."""
        if not hasattr(os, "preadv"):
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == self._file_id:
            return fd
        os.close(fd)
        return None

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata object, a dict of the writer's own record under ``"embfile"`` and the user's keys."""
        h = self.header
        raw = self.mappings()[1][h.meta_offset : h.meta_offset + h.meta_size]
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise errors.CorruptFileError(f"{self.path}: metadata is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise errors.CorruptFileError(f"{self.path}: metadata is not a JSON object")
        return meta

    def sums(self) -> np.ndarray:
        """The checksums section: one CRC per records block, then those of index, keys, meta.

        Read through the lookup mapping: a dataset's open reads each file's keys CRC, and a fault on the bulk
        mapping would read around it as far as the disk's read-ahead goes (8 MiB on some virtual disks).
        """
        h = self.header
        return np.frombuffer(
            self.mappings()[0], "<u4", count=h.n_blocks + len(h.checked_sections), offset=h.sums_offset
        )

    def stored_crc(self, section: str) -> int:
        """The stored CRC-32C of the ``index``, ``keys``, ``meta`` or (ragged) ``ranges`` section."""
        return int(self.sums()[self.header.n_blocks + self.header.checked_sections.index(section)])

    def problems(self) -> list[str]:
        """Everything wrong in the file, found by reading all of it: checksums, padding, the index walk."""
        h, problems = self.header, []
        sums = self.sums()
        with memoryview(self.mappings()[1]) as whole:
            records = whole[h.records_offset : h.records_offset + h.records_size]
            bad = np.flatnonzero(_core.crc32c_blocks(records, h.block_bytes) != sums[: h.n_blocks])
            record_bytes = h.dim * self.dtype.itemsize
            for b in bad.tolist():
                lo = b * h.block_bytes
                hi = min(lo + h.block_bytes, h.records_size)
                rows = f"rows {lo // record_bytes}-{(hi - 1) // record_bytes}"
                if h.ragged:  # the records owning those rows
                    owners = np.searchsorted(self.ranges(), [lo // record_bytes, (hi - 1) // record_bytes], "right") - 1
                    rows = f"{rows} of records {owners[0]}-{owners[1]}"
                problems.append(
                    f"records block {b} (bytes {h.records_offset + lo}-{h.records_offset + hi}, "
                    f"{rows}) does not match its checksum"
                )
            for i, name in enumerate(h.checked_sections):
                off, size = h.offset(name), h.size(name)
                if _core.crc32c(whole[off : off + size]) != sums[h.n_blocks + i]:
                    problems.append(f"{name} section does not match its checksum")
            del records
        empty = np.flatnonzero(np.diff(self.ranges().astype(np.int64)) <= 0) if h.ragged else np.empty(0, np.int64)
        if len(empty):
            problems.append(f"ranges section: record {int(empty[0])} does not own at least one row")
        for lo, hi in h.gaps():
            if np.frombuffer(self.mappings()[1], np.uint8, hi - lo, lo).any():
                problems.append(f"padding bytes {lo}-{hi} are not zero")
        ok, where = self.table()._check_index()
        if not ok:
            problems.append(f"index structure is invalid at sorted position {where}")
        return problems

    def close(self) -> None:
        """Let go of the mappings (arrays already handed out keep theirs alive)."""
        if self._table is not None:
            self._table._detach()
            self._table = None
        self.lookup_map = self.bulk_map = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.count} x {self.dim} {self.dtype.name}"
        return f"<MappedFile {self.path!r}: {state}>"


def attach(table: _core.Table, segments: Sequence[MappedFile], parts: Sequence[MappedFile]) -> None:
    """Attach ``table`` to the key index of ``segments`` and the records of ``parts`` (both in row order)."""
    table._attach([s.key_segment() for s in segments], [p.records_part() for p in parts], parts[0].dim, parts[0].dtype)


def _open_twice(path: str, attempts: int = 100) -> tuple[io.BufferedReader, io.BufferedReader, os.stat_result]:
    """Two open files of the file at ``path``, and its ``stat``.  A writer renaming a new file onto
    ``path`` between the two opens makes them differ: then open both again, so the reader gets the
    old file or the new one, whole."""
    for _ in range(attempts):
        f = open(path, "rb")
        try:
            g = open(path, "rb")
        except BaseException:
            f.close()
            raise
        st = os.fstat(f.fileno())
        if os.path.samestat(st, os.fstat(g.fileno())):
            return f, g, st
        f.close()
        g.close()
    raise OSError(f"{path} was replaced {attempts} times while being opened")
