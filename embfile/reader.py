"""Reading .emb files: :func:`open` and :class:`EmbFile`.

Opening reads and checks the 256-byte header, maps the file, and checks every
section against the file size: constant time whatever the number of keys.
Lookups then run in the native core over the mapping, so nothing but the
pages a lookup touches is ever read.
"""
import collections.abc
import io
import itertools
import json
import mmap
import os

import numpy as np

from embfile import _core, epochs, errors
from embfile import _format as F

READ_STEP = 64 << 20  # to_numpy's pread size: large enough for the kernel's full read-ahead
FIRST_READ = 64 << 10  # to_numpy's first pread: small, so that read-ahead starts small and ramps up
KEYS_AHEAD = 1 << 16  # keys asked of the disk ahead of an iteration (the lookup mapping has no read-ahead)


def open(path):  # noqa: A001 - the module's entry point, like gzip.open
    """Open an .emb file, or a sharded dataset (a folder or a list of .emb files), for reading.

    Parameters
    ----------
    path : str or os.PathLike, or a list of them

    Returns
    -------
    EmbFile, or ShardedEmbFile for a folder or a list

    Raises
    ------
    FormatError
        If the file is not a readable .emb file (with a subclass saying why).
    OSError
        If the file cannot be opened.

    Examples
    --------
    >>> with embfile.open("db.emb") as db:          # doctest: +SKIP
    ...     v = db["sp|P69905|HBA_HUMAN"]
    """
    if isinstance(path, (list, tuple)) or os.path.isdir(os.fspath(path)):
        from embfile.shards import ShardedEmbFile
        return ShardedEmbFile(path)
    return EmbFile(path)


class RowOrderMapping(collections.abc.Mapping):
    """A Mapping whose ``values()`` and ``items()`` read by row (``record``), in row order:
    no lookup per key, and so none that a damaged index could fail."""

    def values(self):
        return _ValuesByRow(self)

    def items(self):
        return _ItemsByRow(self)


class _ValuesByRow(collections.abc.ValuesView):
    def __iter__(self):
        for row in range(len(self._mapping)):
            yield self._mapping.record(row)


class _ItemsByRow(collections.abc.ItemsView):
    def __iter__(self):
        for row, key in enumerate(self._mapping):
            yield key, self._mapping.record(row)


class EmbFile(_core._Reader, epochs.BatchSource, RowOrderMapping):
    """A read-only ``Mapping[str, ndarray]`` over one .emb file.

    ``db[key]`` is a read-only view of shape ``(dim,)`` into the mapped file: no
    copy is made, and the view stays valid after :meth:`close` (the mapping is
    released when the last view is gone).  :meth:`get_batch` returns a new array.
    Keys, values and items iterate in row order, which is the order the
    vectors were written in.

    An ``EmbFile`` pickles by path, so it can be handed to worker processes;
    a forked child may keep using the parent's object.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        # Two mappings, each over its own open file (read-ahead state is kept per
        # open file): lookups want no read-ahead, whole-matrix reads the default.
        # (MADV_SEQUENTIAL made copying the matrix out 40x slower here: not used.)
        f, g, st = _open_twice(self.path)
        with f, g:
            h = _read_header(os.pread(f.fileno(), F.PAGE, 0), st.st_size, self.path)
            self._lookup_map = mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mm.madvise(mmap.MADV_RANDOM)
            self._bulk = mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ)
        self._h, self._file_id = h, (st.st_dev, st.st_ino)
        self.dtype = F.disk_dtype(F.DTYPES[h["dtype_code"]])
        self.dim = h["dim"]
        n, keys = h["count"], h["keys_offset"]
        first, last = self._key_offsets()[[0, -1]]
        if first != 0 or last != h["keys_size"] - 8 * (n + 1):
            raise errors.CorruptFileError(f"{self.path}: keys section offsets do not span it")
        self._attach(mm, self.dtype, n, self.dim, h["records_offset"], keys, h["keys_size"],
                     h["index_offset"], h["index_size"], h["lcp_len"], h["n_buckets"])

    @property
    def matrix(self):
        """All vectors as a read-only ``(n, dim)`` view, in row order."""
        self._require_open()
        n, dim = len(self), self.dim
        flat = np.frombuffer(self._bulk, self.dtype, count=n * dim, offset=self._h["records_offset"])
        return flat.reshape(n, dim)

    def _layout(self):
        """What the core's gather needs: ``(bases, starts, record_bytes, owner)``.  The records
        stay mapped while ``owner`` (an array over the mapping) lives."""
        m = self.matrix
        return (np.array([m.ctypes.data], np.uintp), np.array([0, len(m)], np.uint64),
                self.dim * self.dtype.itemsize, m)

    _keys_at = _core._Reader.keys_at

    def __iter__(self):
        self._require_open()
        return itertools.chain.from_iterable(self._key_chunks())  # no Python frame per key

    def _key_chunks(self):
        for start in range(0, len(self), 4096):  # decoded in chunks: fast, and bounded in memory
            if start % KEYS_AHEAD == 0:  # the next stretch of keys is read while this one is decoded
                self._prefetch_keys(start and start + KEYS_AHEAD, start + 2 * KEYS_AHEAD)
            yield self.keys_between(start, start + 4096)

    def _prefetch_keys(self, lo, hi):
        """Ask the disk for the keys of rows ``[lo, hi)`` (a hint: clipped to the keys section)."""
        h, n = self._h, len(self)
        lo, hi = min(lo, n), min(hi, n)
        if lo >= hi:
            return
        heap, size = h["keys_offset"] + 8 * (n + 1), h["keys_size"] - 8 * (n + 1)
        offsets = self._key_offsets()
        first, last = (min(int(o), size) for o in offsets[[lo, hi]])
        for at, length in ((h["keys_offset"] + 8 * lo, 8 * (hi - lo + 1)), (heap + first, last - first)):
            if length > 0:
                page = at - at % mmap.PAGESIZE
                self._lookup_map.madvise(mmap.MADV_WILLNEED, page, at + length - page)

    def _read_into(self, out):
        """Fill ``out``, a C-contiguous ``(n, dim)`` array, with every record.

        ``pread`` in 64 MiB requests gets the kernel's full read-ahead, at the
        disk's sequential speed on a cold file; page faults on the mapping read
        ahead 8 MiB at a time (70-85% of it here).  The first request is 64 KiB:
        read-ahead then starts small and grows as for any sequential reader,
        where a first request of 64 MiB starts it with 8 MiB read synchronously
        (a cold 0.1 GB read took 10% longer).  The kernel copies at half
        speed when ``out`` and its page-aligned source differ mod 64 bytes, and
        the path may name another file by now: then the core copies from the
        mapping instead.
        """
        fd = self._reopen() if out.ctypes.data % 64 == 0 else None
        if fd is None:
            bases, starts, record_bytes, _ = self._layout()
            _core.copy_all(bases, starts, record_bytes, out)
            return
        view, at = memoryview(out.reshape(-1).view(np.uint8)), self._h["records_offset"]
        try:
            done = 0
            while done < view.nbytes:
                got = os.preadv(fd, [view[done:done + (READ_STEP if done else FIRST_READ)]], at + done)
                if got == 0:
                    raise errors.TruncatedFileError(
                        f"{self.path} ends at byte {at + done}, inside its records: "
                        "it was truncated after it was opened")
                done += got
        finally:
            os.close(fd)

    def _reopen(self):
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

    def _key_offsets(self):
        """The keys section's ``count + 1`` byte offsets (key i is bytes [o[i], o[i+1]) after them)."""
        h = self._h
        return np.frombuffer(self._lookup_map, "<u8", count=h["count"] + 1, offset=h["keys_offset"])

    def to_arrow(self, key_column="key", vector_column="vector"):
        """A ``pyarrow.Table`` of ``(key: large_string, vector: fixed_size_list<dtype>[dim])``, not null,
        sharing memory with the mapped file: no copy, valid after :meth:`close`.  Needs pyarrow."""
        from embfile.formats.parquet import emb_to_arrow
        return emb_to_arrow(self, key_column, vector_column)

    def _chunks(self, rows):
        """``(lo, hi, matrix[lo:hi])`` for consecutive row ranges, for exports.

        Each range's pages leave this process's memory once the next is asked for
        (they stay in the page cache), so a pass over a file larger than RAM keeps
        a bounded resident size.
        """
        layout = self._layout()
        m = layout[-1]
        for lo in range(0, len(self), rows):
            hi = min(lo + rows, len(self))
            yield lo, hi, m[lo:hi]
            epochs.advise(layout, lo, hi, mmap.MADV_DONTNEED)

    @property
    def metadata(self):
        """The metadata object: the writer's own record under ``"embfile"``, plus the user's keys."""
        self._require_open()
        h = self._h
        raw = self._bulk[h["meta_offset"]:h["meta_offset"] + h["meta_size"]]
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise errors.CorruptFileError(f"{self.path}: metadata is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise errors.CorruptFileError(f"{self.path}: metadata is not a JSON object")
        return meta

    def _sums(self):
        """The checksums section: one CRC per records block, then those of index, keys, meta."""
        h = self._h
        nblocks = -(-h["records_size"] // h["block_bytes"])
        return np.frombuffer(self._bulk, "<u4", count=nblocks + 3, offset=h["sums_offset"])

    def _stored_crc(self, section):
        """The stored CRC-32C of the ``index``, ``keys`` or ``meta`` section."""
        self._require_open()
        return int(self._sums()[-3:][("index", "keys", "meta").index(section)])

    def verify(self):
        """Check every checksum and the whole index; raise :class:`ChecksumError` naming each damaged part.

        Reads the entire file once.  Returns ``None`` when everything holds.
        """
        self._require_open()
        h, problems = self._h, []
        sums = self._sums()
        nblocks = len(sums) - 3
        with memoryview(self._bulk) as whole:
            records = whole[h["records_offset"]:h["records_offset"] + h["records_size"]]
            bad = np.flatnonzero(_core.crc32c_blocks(records, h["block_bytes"]) != sums[:nblocks])
            record_bytes = self.dim * self.dtype.itemsize
            for b in bad.tolist():
                lo = b * h["block_bytes"]
                hi = min(lo + h["block_bytes"], h["records_size"])
                problems.append(
                    f"records block {b} (bytes {h['records_offset'] + lo}-{h['records_offset'] + hi}, "
                    f"rows {lo // record_bytes}-{(hi - 1) // record_bytes}) does not match its checksum")
            for i, name in enumerate(("index", "keys", "meta")):
                off, size = h[f"{name}_offset"], h[f"{name}_size"]
                if _core.crc32c(whole[off:off + size]) != sums[nblocks + i]:
                    problems.append(f"{name} section does not match its checksum")
            del records
        for lo, hi in _gaps(h):
            if np.frombuffer(self._bulk, np.uint8, hi - lo, lo).any():
                problems.append(f"padding bytes {lo}-{hi} are not zero")
        ok, where = self._check_index()
        if not ok:
            problems.append(f"index structure is invalid at sorted position {where}")
        if problems:
            raise errors.ChecksumError(f"{self.path}: " + "; ".join(problems), problems)

    def close(self):
        """Release the file.  Arrays already returned stay valid."""
        self._detach()
        self._bulk = self._lookup_map = None

    def _require_open(self):
        if self._bulk is None:
            raise errors.ClosedFileError(f"{self.path}: operation on a closed EmbFile")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        return (open, (self.path,))

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__

    def __repr__(self):
        state = "closed" if self._bulk is None else f"{self._h['count']} x {self.dim} {self.dtype.name}"
        return f"<EmbFile {self.path!r}: {state}>"


def _gaps(h):
    """The byte ranges no section covers (header page tail, alignment padding): all zero."""
    lo = F.HEADER_SIZE
    for name in sorted(F.SECTIONS, key=lambda s: h[f"{s}_offset"]):
        if h[f"{name}_offset"] > lo:
            yield lo, h[f"{name}_offset"]
        lo = max(lo, h[f"{name}_offset"] + h[f"{name}_size"])


def _where(h, at):
    """Where byte ``at`` falls, in words: which section (and records block), or which gap."""
    for name in F.SECTIONS:
        lo = h[f"{name}_offset"]
        if lo <= at < lo + h[f"{name}_size"]:
            if name == "records" and F.MIN_BLOCK_BYTES <= h["block_bytes"]:
                return f"the file ends inside the records section (block {(at - lo) // h['block_bytes']})"
            return f"the file ends inside the {name} section"
    return "the file ends between sections"


def _open_twice(path, attempts=100):
    """Two open files of the file at ``path``, and its ``stat``.  A writer renaming a
    new file onto ``path`` between the two opens makes them differ: then open both
    again, so the reader gets the old file or the new one, whole."""
    for _ in range(attempts):
        f = io.open(path, "rb")
        try:
            g = io.open(path, "rb")
        except BaseException:
            f.close()
            raise
        st = os.fstat(f.fileno())
        if os.path.samestat(st, os.fstat(g.fileno())):
            return f, g, st
        f.close()
        g.close()
    raise OSError(f"{path} was replaced {attempts} times while being opened")


def _read_header(head, size, path):
    """Parse and check the header page against the file size (FORMAT.md "Header")."""
    if size < F.HEADER_SIZE and F.MAGIC.startswith(head[:len(F.MAGIC)]):
        raise errors.TruncatedFileError(f"{path}: truncated: {size} bytes, shorter than the header")
    if head[:len(F.MAGIC)] != F.MAGIC:
        raise errors.NotAnEmbFileError(f"{path}: not an .emb file (starts with {head[:8]!r})")
    if size < F.HEADER_SIZE:
        raise errors.TruncatedFileError(f"{path}: truncated: {size} bytes, shorter than the header")
    h = dict(zip(F.HEADER_FIELDS, F.HEADER.unpack_from(head)))
    if h["major"] != F.VERSION[0]:
        raise errors.UnsupportedVersionError(
            f"{path}: format version {h['major']}.{h['minor']}; this embfile reads {F.VERSION[0]}.x")
    if _core.crc32c(head[:F.HEADER.size]) != int.from_bytes(head[F.HEADER.size:F.HEADER_SIZE], "little"):
        raise errors.CorruptFileError(f"{path}: header is corrupted (checksum mismatch)")

    def bad(what):
        return errors.CorruptFileError(f"{path}: {what}")

    if size < h["file_size"]:
        raise errors.TruncatedFileError(
            f"{path}: truncated: {size} bytes, header says {h['file_size']}; {_where(h, size)}")
    if size > h["file_size"]:
        raise bad(f"{size - h['file_size']} unexpected bytes after the end ({h['file_size']} bytes)")
    if h["header_size"] != F.HEADER_SIZE or h["flags"] != 0:
        raise bad(f"unknown header size {h['header_size']} or flags {h['flags']:#x}")
    if h["dtype_code"] not in F.DTYPES:
        raise bad(f"unknown dtype code {h['dtype_code']}")
    itemsize = np.dtype(F.DTYPES[h["dtype_code"]]).itemsize
    if not 1 <= h["dim"] <= F.MAX_DIM:
        raise bad(f"dim {h['dim']} is outside 1 to {F.MAX_DIM}")
    if h["records_size"] != h["count"] * h["dim"] * itemsize:
        raise bad(f"records section size {h['records_size']} does not hold "
                  f"{h['count']} x {h['dim']} {F.DTYPES[h['dtype_code']]}")
    for name, align in (("records", F.PAGE), ("index", F.PAGE), ("keys", 8), ("sums", 4)):
        if h[f"{name}_offset"] % align:
            raise bad(f"{name} section offset {h[f'{name}_offset']} is not a multiple of {align}")
    end = F.PAGE
    for name in sorted(F.SECTIONS, key=lambda s: h[f"{s}_offset"]):
        off, n = h[f"{name}_offset"], h[f"{name}_size"]
        if off < end or off + n > size:
            raise bad(f"{name} section [{off}, {off + n}) overlaps another or runs past the end ({size})")
        end = off + n
    block = h["block_bytes"]
    if not (F.MIN_BLOCK_BYTES <= block <= F.MAX_BLOCK_BYTES and block & (block - 1) == 0):
        raise bad(f"checksum block size {block} is not a power of two in range")
    if h["sums_size"] != 4 * (-(-h["records_size"] // block) + 3):
        raise bad(f"checksums section size {h['sums_size']} does not match the records")
    if h["keys_size"] < 8 * (h["count"] + 1):
        raise bad(f"keys section ({h['keys_size']} bytes) too small for {h['count']} keys")
    if h["meta_size"] > F.MAX_META_BYTES or h["lcp_len"] > F.MAX_KEY_BYTES:
        raise bad("metadata or key prefix longer than the format allows")
    return h
