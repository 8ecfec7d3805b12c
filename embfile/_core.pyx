# cython: language_level=3, embedsignature=True, embedsignature.format=python, boundscheck=False, wraparound=False, auto_pickle=False, autotestdict=False
"""The native core's Python face: the key-index table every dataset reads through, and the byte loops.

Policy, messages and I/O live in Python (dataset.py, file.py, writer.py); this module
only moves bytes and turns the core's status codes into exceptions, through one table.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from cpython.ref cimport Py_INCREF, PyObject, PyTypeObject
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t

import operator

import numpy as np
cimport numpy as cnp

from embfile._core cimport *
from embfile import errors

cnp.import_array()

# A cold random gather reads each record's pages alone (sparse lookups read nothing else), until an eighth of the
# records have been gathered at random: then a random epoch is likely, and it reads the aligned 64 KiB pieces
# holding its records, whose neighbours later batches find cached (bench_gathers, bench_loaders).
cdef enum:
    PREFETCH_EPOCH_CHUNK = 65536


cpdef size_t prefetch_chunk(uint64_t gathered, uint64_t n):
    """The piece a cold random gather reads around each record, after ``gathered`` of ``n`` records."""
    return PREFETCH_EPOCH_CHUNK if gathered * 8 >= n else sysconf(_SC_PAGESIZE)

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_WILLNEED
    int mincore(void *addr, size_t length, unsigned char *vec)

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE

cdef extern from "<errno.h>":
    int errno

cdef extern from *:
    """
    #include <errno.h>
    #include <fcntl.h>
    static int emb_start_writeback(int fd, long long offset, long long length) {
    #ifdef SYNC_FILE_RANGE_WRITE
        return sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE);
    #else
        (void)fd, (void)offset, (void)length; /* elsewhere the final fsync does it all */
        return 0;
    #endif
    }
    static int emb_range_lock(int fd, int kind, long long start, long long length, int wait) {
    #ifdef F_OFD_SETLK
        struct flock lk = {0};
        lk.l_type = (short)kind;
        lk.l_whence = SEEK_SET;
        lk.l_start = start;
        lk.l_len = length;
        return fcntl(fd, wait ? F_OFD_SETLKW : F_OFD_SETLK, &lk);
    #else
        (void)fd, (void)kind, (void)start, (void)length, (void)wait;
        errno = EOPNOTSUPP;
        return -1;
    #endif
    }
    static int emb_punch_hole(int fd, long long offset, long long length) {
    #ifdef FALLOC_FL_PUNCH_HOLE
        return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    #else
        (void)fd, (void)offset, (void)length;
        errno = EOPNOTSUPP;
        return -1;
    #endif
    }
    """
    int emb_start_writeback(int fd, long long offset, long long length) nogil
    int emb_punch_hole(int fd, long long offset, long long length) nogil
    int emb_range_lock(int fd, int kind, long long start, long long length, int wait) nogil
    int EAGAIN, EACCES

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef extern from "numpy/arrayobject.h":
    PyTypeObject PyArray_Type
    object PyArray_NewFromDescr(PyTypeObject *subtype, cnp.PyArray_Descr *descr, int nd,
                                cnp.npy_intp *dims, cnp.npy_intp *strides, void *data,
                                int flags, PyObject *obj)
    int PyArray_SetBaseObject(cnp.ndarray arr, PyObject *obj) except -1
    int NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_ALIGNED

MAX_KEY_BYTES = EMB_MAX_KEY_BYTES


# The one table from a core status to the exception it becomes: (class, what the message says).
_ERRORS = {
    EMB_NOT_FOUND: (errors.KeyNotFoundError, None),
    EMB_E_CORRUPT: (errors.CorruptFileError, "index structure is corrupted"),
    EMB_E_DUPLICATE: (errors.DuplicateKeyError, "duplicate key"),
    EMB_E_NOMEM: (MemoryError, "out of memory"),
    EMB_E_LIMIT: (errors.WriterError, f"a key is longer than {EMB_MAX_KEY_BYTES} bytes, or a bucket holds no keys"),
    EMB_E_RANGE: (IndexError, "a row is past the last record"),
}


cdef int _check(int rc, what, key=None, rows=None) except -1:
    """Raise the exception for core status ``rc`` (nothing for ``EMB_OK``).

    ``what`` says what was being done; ``key`` names the key a lookup missed or found twice, ``rows``
    the rows of a duplicate.
    """
    if rc == EMB_OK:
        return 0
    cls, says = _ERRORS.get(rc, (errors.EmbFileError, f"core status {rc}"))
    if rc == EMB_NOT_FOUND:
        raise cls(key)
    if rc == EMB_E_DUPLICATE:
        raise cls(f"duplicate key {key!r} (rows {rows[0]} and {rows[1]})", key, rows)
    raise cls(f"{what}: {says}")


cdef inline const uint8_t *_utf8(object key, size_t *n) except NULL:
    cdef Py_ssize_t size
    if not PyUnicode_Check(key):
        raise TypeError(f"embfile keys are str, not {type(key).__name__}")
    cdef const char *p = PyUnicode_AsUTF8AndSize(key, &size)
    n[0] = <size_t>size
    return <const uint8_t *>p


cdef enum:
    # WILLNEED reads at most the device's read-ahead size per call (read_ahead_kb, or max_sectors_kb if larger)
    # and ignores the rest of the range: asked in steps no larger than the smallest default, every page is read,
    # the reads queued together (the cost of a call is in its pages, not in the number of calls)
    HINT_STEP = 128 * 1024


cdef inline size_t _hint(uintptr_t lo, uintptr_t hi) noexcept nogil:
    """``madvise(WILLNEED)`` the page-aligned ``[lo, hi)`` in steps the kernel reads whole (it drops what lies
    past its read-ahead size); returns the calls made.  A hint: its failure changes nothing."""
    cdef size_t calls = 0
    while lo < hi:
        madvise(<void *>lo, HINT_STEP if hi - lo > HINT_STEP else hi - lo, MADV_WILLNEED)
        lo += HINT_STEP
        calls += 1
    return calls


cdef inline void _will_need(const uint8_t *p, uint64_t n) noexcept nogil:
    """Ask the kernel to read ``[p, p + n)`` ahead, in large requests: a ragged record spans many pages of the
    lookup mapping, where read-ahead is off, and faulting them in one by one costs a disk round trip each."""
    cdef uintptr_t start
    if n > 2 * 4096:
        start = <uintptr_t>p & ~(<uintptr_t>4095)
        _hint(start, <uintptr_t>p + n)


cdef inline size_t _part_of(const uint64_t *starts, size_t n_parts, uint64_t row) noexcept nogil:
    """The part with ``starts[part] <= row < starts[part + 1]``."""
    cdef size_t lo = 0, hi = n_parts, mid
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if starts[mid] <= row:
            lo = mid
        else:
            hi = mid
    return lo


cdef inline uint64_t _load_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


def row_number(row, n):
    """``row`` as an index into ``n`` records (negative counts from the end), or IndexError / TypeError."""
    try:
        r = operator.index(row)
    except TypeError:
        raise TypeError(f"a row number is an int, not {type(row).__name__}") from None
    if r < 0:
        r += n
    if not 0 <= r < n:
        raise IndexError(f"row {row} out of range for {n} records")
    return r


cdef tuple _encoded(keys, caller):
    """``keys`` (a sequence of str, a numpy string array, or UTF-8 back to back as ``embfile._keys.EncodedKeys``)
    as ``(sequence, pointers, lengths)``: the address and length of each key's UTF-8, valid while the sequence
    lives.  TypeError for anything else."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"{caller}() takes a sequence of keys, not a single key (db[key] gives one)")
    heap, offsets = getattr(keys, "heap", None), getattr(keys, "offsets", None)
    if isinstance(heap, np.ndarray) and heap.dtype == np.uint8 and heap.flags.c_contiguous and offsets is not None:
        offsets = np.asarray(offsets, dtype=np.int64)
        return keys, (heap.ctypes.data + offsets[:-1]).astype(np.uintp), np.diff(offsets).astype(np.uintp)
    try:
        if isinstance(keys, np.ndarray):
            seq = keys.tolist()
        else:  # an Arrow array's items are its scalars: its keys are the str of to_pylist()
            seq = keys.to_pylist() if hasattr(keys, "to_pylist") else list(keys)
    except TypeError:
        raise TypeError(f"{caller}() takes a sequence of str keys, not {type(keys).__name__}") from None
    ptrs = np.empty(len(seq), dtype=np.uintp)
    lens = np.empty(len(seq), dtype=np.uintp)
    cdef uintptr_t[::1] pv = ptrs
    cdef size_t[::1] lv = lens
    cdef Py_ssize_t i
    for i in range(len(seq)):
        pv[i] = <uintptr_t>_utf8(seq[i], &lv[i])
    return seq, ptrs, lens


ctypedef struct segment_t:
    emb_index_t ix
    const uint8_t *key_offsets
    const uint8_t *key_bytes
    uint64_t key_bytes_len
    uint64_t first_row      # the dataset row of the segment's row 0
    uint64_t n
    Py_buffer buf


cdef int _lookup(const segment_t *segs, size_t n_segs, const uint8_t *key, size_t klen,
                        uint64_t *row) noexcept nogil:
    """Find ``key`` in the segments, newest first: ``EMB_OK`` with its dataset row, or a status."""
    cdef size_t s = n_segs
    cdef int rc
    while s:
        s -= 1
        rc = emb_lookup(&segs[s].ix, key, klen, row)
        if rc == EMB_OK:
            row[0] += segs[s].first_row
            return EMB_OK
        if rc != EMB_NOT_FOUND:
            return rc
    return EMB_NOT_FOUND


cdef class Table:
    """Rows of ``dim`` elements found by string key: the native engine under every dataset.

    The keys live in one or more *segments*, each the index and keys sections of one mapped .emb file
    covering consecutive dataset rows in row order (a single file's own; a folder's key index, one segment
    per commit); the records are the records sections of one or more mapped files (*parts*), part after part.
    A lookup searches the segments, newest first, and then points into the part that holds the row, all
    without a Python frame.

    Holds a buffer on every mapping for as long as it is attached.  Arrays it hands out keep their
    part's mapping (not this object) alive, so detaching never leaves a view over unmapped memory.
    """
    cdef bint _open
    cdef segment_t *_segs
    cdef size_t _n_segs
    cdef Py_buffer *_part_bufs
    cdef const uint8_t **_bases
    cdef uint64_t *_starts
    cdef const uint8_t **_ranges  # ragged parts: each record's first row, count + 1 u64 (else NULL)
    cdef uint64_t *_part_rows
    cdef bint _ragged
    cdef size_t _n_parts
    cdef list _owners
    cdef object _descr
    cdef uint64_t _n, _dim, _record_bytes
    cdef uint64_t _random_rows  # gathered by get_batch so far: past an eighth of the records, an epoch is likely

    def _attach(self, segments, parts, uint64_t dim, dtype):
        """Bind the mappings; the caller has checked every section against its file's size.

        ``segments`` lists, in row order, ``(mapping, n, keys_offset, keys_size, index_offset, index_size,
        lcp_len, n_buckets)`` of the files holding the key index; ``parts`` lists ``(mapping,
        records_offset, count, ranges_offset, rows)`` in row order (``ranges_offset`` 0 for fixed-width
        records, one row each; else every part is ragged).  The segments' ``n`` and the parts' counts add up
        alike.
        """
        cdef size_t i, k = len(parts), m = len(segments)
        cdef uint64_t total = 0, keys = 0
        cdef const uint8_t *base
        cdef segment_t *seg
        if self._open:
            raise ValueError("a Table is attached once at a time")
        for _, _, count, _, _ in parts:
            total += <uint64_t>count
        for segment in segments:
            keys += <uint64_t>segment[1]
        if total != keys:
            raise errors.CorruptFileError(f"the key index has {keys} keys, the records {total}")
        self._part_bufs = <Py_buffer *>PyMem_Calloc(k if k else 1, sizeof(Py_buffer))
        self._bases = <const uint8_t **>PyMem_Calloc(k if k else 1, sizeof(uint8_t *))
        self._starts = <uint64_t *>PyMem_Calloc(k + 1, sizeof(uint64_t))
        self._ranges = <const uint8_t **>PyMem_Calloc(k if k else 1, sizeof(uint8_t *))
        self._part_rows = <uint64_t *>PyMem_Calloc(k if k else 1, sizeof(uint64_t))
        self._segs = <segment_t *>PyMem_Calloc(m if m else 1, sizeof(segment_t))
        if (self._part_bufs == NULL or self._bases == NULL or self._starts == NULL or self._segs == NULL
                or self._ranges == NULL or self._part_rows == NULL):
            raise MemoryError("attaching a table")
        self._open = True
        self._owners = []
        self._ragged = k > 0 and parts[0][3] != 0
        for i in range(k):
            mapping, records_offset, count, ranges_offset, rows = parts[i]
            if (ranges_offset != 0) != self._ragged:
                raise errors.ShardError("ragged and fixed-width records in one dataset")
            PyObject_GetBuffer(mapping, &self._part_bufs[i], PyBUF_SIMPLE)
            self._n_parts = i + 1
            self._owners.append(mapping)
            self._bases[i] = <const uint8_t *>self._part_bufs[i].buf + <uint64_t>records_offset
            self._starts[i + 1] = self._starts[i] + <uint64_t>count
            if self._ragged:
                self._ranges[i] = <const uint8_t *>self._part_bufs[i].buf + <uint64_t>ranges_offset
                self._part_rows[i] = rows
        self._descr = np.dtype(dtype)
        self._n, self._dim = total, dim
        self._record_bytes = dim * self._descr.itemsize
        keys = 0
        for i in range(m):
            mapping, n, keys_offset, keys_size, index_offset, index_size, lcp_len, n_buckets = segments[i]
            seg = &self._segs[i]
            PyObject_GetBuffer(mapping, &seg.buf, PyBUF_SIMPLE)
            self._n_segs = i + 1
            base = <const uint8_t *>seg.buf.buf
            seg.n, seg.first_row = n, keys
            seg.key_offsets = base + <uint64_t>keys_offset
            seg.key_bytes = seg.key_offsets + 8 * (seg.n + 1)
            seg.key_bytes_len = <uint64_t>keys_size - 8 * (seg.n + 1)
            keys += seg.n
            _check(emb_index_open(&seg.ix, base + <uint64_t>index_offset, index_size, lcp_len, n_buckets, n),
                   "index section")

    def _detach(self):
        """Release every mapping (idempotent)."""
        if self._open:
            self._open = False
            self._release()
            self._owners = None

    cdef void _release(self) noexcept:
        """Release the buffers and free the arrays, so that the table can be attached again."""
        cdef size_t i
        for i in range(self._n_segs):
            PyBuffer_Release(&self._segs[i].buf)
        for i in range(self._n_parts):
            PyBuffer_Release(&self._part_bufs[i])
        self._n_segs = self._n_parts = 0
        PyMem_Free(self._segs)
        PyMem_Free(self._part_bufs)
        PyMem_Free(self._bases)
        PyMem_Free(self._starts)
        PyMem_Free(<void *>self._ranges)
        PyMem_Free(self._part_rows)
        self._segs, self._part_bufs, self._bases, self._starts = NULL, NULL, NULL, NULL
        self._ranges, self._part_rows = NULL, NULL

    def __dealloc__(self):
        self._release()

    @property
    def segments(self):
        """How many key-index segments a lookup may search."""
        return self._n_segs

    cdef inline int _live(self) except -1:
        if not self._open:
            raise errors.ClosedFileError(f"{getattr(self, 'path', None) or 'dataset'}: operation on a closed "
                                         f"{type(self).__name__}")
        return 0

    cdef object _view(self, uint64_t row):
        """A read-only array over record ``row`` (below ``_n``), owned by its part's mapping: ``(dim,)``, or
        ``(length, dim)`` of a ragged record."""
        cdef size_t lo = _part_of(self._starts, self._n_parts, row)
        cdef cnp.npy_intp dims[2]
        cdef uint64_t first = row - self._starts[lo], length = 1
        if self._ragged:
            _check(emb_extents(self._ranges, self._starts, self._part_rows, self._n_parts, &row, 1, &first,
                               &length), f"ranges of record {row}")
        dims[0], dims[1] = <cnp.npy_intp>length, <cnp.npy_intp>self._dim
        if self._ragged:
            _will_need(self._bases[lo] + first * self._record_bytes, length * self._record_bytes)
        Py_INCREF(self._descr)  # NewFromDescr steals it
        arr = PyArray_NewFromDescr(&PyArray_Type, <cnp.PyArray_Descr *>self._descr, 2 if self._ragged else 1,
                                   dims + (0 if self._ragged else 1), NULL,
                                   <void *>(self._bases[lo] + first * self._record_bytes),
                                   NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED, NULL)
        owner = self._owners[lo]
        Py_INCREF(owner)  # SetBaseObject steals it
        PyArray_SetBaseObject(arr, <PyObject *>owner)
        return arr

    cdef inline bint _find(self, key, uint64_t *row) except -1:
        """True and the row if ``key`` is present, False if not; raises on corruption."""
        cdef size_t n
        self._live()
        cdef const uint8_t *p = _utf8(key, &n)
        cdef int rc
        if self._n_segs == 1:  # one file, or a compacted folder: the direct call (measured ~60 ns faster)
            rc = emb_lookup(&self._segs[0].ix, p, n, row)
        else:
            rc = _lookup(self._segs, self._n_segs, p, n, row)
        if rc == EMB_NOT_FOUND:
            return False
        if rc != EMB_OK:  # the message only on failure: formatting it costs more than the search
            _check(rc, f"looking up {key!r}")
        return True

    def __getitem__(self, key):
        cdef uint64_t row
        if self._find(key, &row):
            return self._view(row)
        _check(EMB_NOT_FOUND, "", key)

    def __contains__(self, key):
        cdef uint64_t row
        return self._find(key, &row)

    def __len__(self):
        self._live()
        return self._n

    def record(self, row):
        """The vector at ``row`` (negative counts from the end), a read-only view like ``db[key]``."""
        self._live()
        return self._view(row_number(row, self._n))

    def row(self, key):
        """The row number of one key (``KeyNotFoundError``, a ``KeyError``, if absent)."""
        cdef uint64_t row
        if self._find(key, &row):
            return row
        _check(EMB_NOT_FOUND, "", key)

    def rows(self, keys):
        """Row numbers of ``keys`` (any sequence of str, or a numpy string array), as int64."""
        self._live()
        seq, ptrs, lens = _encoded(keys, "rows")
        cdef size_t k = len(seq), i, failed = 0
        out = np.empty(k, dtype=np.int64)
        cdef uintptr_t[::1] pv = ptrs
        cdef size_t[::1] lv = lens
        cdef int64_t[::1] ov = out
        cdef int rc = EMB_OK
        if k and self._n_segs == 1:
            with nogil:
                rc = emb_lookup_many(&self._segs[0].ix, <const uint8_t *const *>&pv[0], &lv[0], k,
                                     <uint64_t *>&ov[0], &failed)
        elif k:
            with nogil:
                for i in range(k):
                    rc = _lookup(self._segs, self._n_segs, <const uint8_t *>pv[i], lv[i], <uint64_t *>&ov[i])
                    if rc != EMB_OK:
                        failed = i
                        break
        _check(rc, "looking up keys", seq[failed] if rc != EMB_OK else None)
        return out

    def find_rows(self, keys):
        """Row numbers of ``keys`` as int64, -1 for each key that is absent (no exception for those)."""
        self._live()
        seq, ptrs, lens = _encoded(keys, "find_rows")
        cdef size_t k = len(seq), i
        out = np.empty(k, dtype=np.int64)
        cdef uintptr_t[::1] pv = ptrs
        cdef size_t[::1] lv = lens
        cdef int64_t[::1] ov = out
        cdef int rc = EMB_OK
        with nogil:
            for i in range(k):
                rc = _lookup(self._segs, self._n_segs, <const uint8_t *>pv[i], lv[i], <uint64_t *>&ov[i])
                if rc == EMB_NOT_FOUND:
                    ov[i] = -1
                elif rc != EMB_OK:
                    break
        if rc != EMB_NOT_FOUND:
            _check(rc, "looking up keys")
        return out

    def probe(self, keys, haves):
        """Look ``keys`` up in a table attached to partial copies of its segment files (remote files whose
        pages are fetched as needed).  ``haves[s]`` is a uint8 array, nonzero for each 4096-byte page of
        segment ``s``'s file that is present; nothing else is read.

        Returns ``(rows, needs)``: ``rows`` int64, the row of each key found, -1 if absent, -2 if pages are
        missing to tell; ``needs`` a ``(m, 3)`` uint64 array of ``(segment, first page, last page)`` to fetch
        before probing again.  A key found, or absent with every page it needed present, is settled.
        """
        self._live()
        seq, ptrs, lens = _encoded(keys, "probe")
        if len(haves) != self._n_segs:
            raise ValueError(f"probe() needs one page map per segment ({self._n_segs}), not {len(haves)}")
        cdef size_t k = len(seq), i, s, m = 0, m_key
        cdef size_t n_segs = self._n_segs
        cdef emb_probe_t *prs = <emb_probe_t *>PyMem_Calloc(n_segs if n_segs else 1, sizeof(emb_probe_t))
        if prs == NULL:
            raise MemoryError("probe")
        cdef const uint8_t[::1] hv
        rows = np.full(k, -1, dtype=np.int64)
        needs = np.empty((k * n_segs, 3), dtype=np.uint64)
        cdef int64_t[::1] ov = rows
        cdef uint64_t[:, ::1] nv = needs
        cdef uintptr_t[::1] pv = ptrs
        cdef size_t[::1] lv = lens
        cdef uint64_t row
        cdef int rc = EMB_OK
        try:
            for s in range(n_segs):
                hv = haves[s]
                prs[s].base = <const uint8_t *>self._segs[s].buf.buf
                prs[s].have = &hv[0] if hv.shape[0] else NULL
                prs[s].n_pages = hv.shape[0]
            with nogil:
                for i in range(k):
                    s, m_key = n_segs, m
                    while s:  # every segment, so that all the pages a key lacks are asked for at once
                        s -= 1
                        rc = emb_lookup_probe(&self._segs[s].ix, &prs[s], <const uint8_t *>pv[i], lv[i], &row)
                        if rc == EMB_OK:
                            ov[i] = <int64_t>(row + self._segs[s].first_row)
                            m = m_key  # settled: what newer segments lacked is not needed
                            break
                        if rc == EMB_NEED:
                            ov[i] = -2
                            nv[m, 0], nv[m, 1], nv[m, 2] = s, prs[s].need_first, prs[s].need_last
                            m += 1
                        elif rc != EMB_NOT_FOUND:
                            break
                    if rc != EMB_OK and rc != EMB_NOT_FOUND and rc != EMB_NEED:
                        break
        finally:
            PyMem_Free(prs)
        if rc != EMB_OK and rc != EMB_NOT_FOUND and rc != EMB_NEED:
            _check(rc, f"looking up {seq[i]!r}")
        return rows, needs[:m]

    @property
    def ragged(self):
        """Whether each record is a ``(length, dim)`` matrix of its own length (per-residue embeddings)."""
        self._live()
        return bool(self._ragged)

    def get_batch(self, keys, pad=True):
        """A new array of the records of ``keys``, in that order: ``(len(keys), dim)``.

        Of a ragged dataset, with ``pad`` a ``(len(keys), longest, dim)`` array, zero past each record's
        length, and a boolean ``(len(keys), longest)`` mask of the real rows; without, the rows packed one
        record after another and ``len(keys) + 1`` offsets (record ``i`` is ``rows[offsets[i]:offsets[i+1]]``).
        """
        if isinstance(keys, (str, bytes)):  # here, to name the call the user made
            raise TypeError("get_batch() takes a sequence of keys, not a single key (db[key] gives one)")
        rows = self.rows(keys)
        if self._ragged:
            return self._gather_ragged(rows.view(np.uint64), pad)
        out = np.empty((len(rows), self._dim), dtype=self._descr)
        cdef int64_t[::1] rv = rows
        cdef cnp.ndarray o = out
        cdef size_t k = len(rows)
        cdef int rc = EMB_OK
        cdef const uint64_t[::1] order
        cdef size_t chunk = prefetch_chunk(self._random_rows, self._n)
        self._random_rows += k
        if k > 1:  # records not in the page cache: read together, not one page fault at a time
            order = np.sort(rows.view(np.uint64))
            with nogil:
                if not _resident(self._bases, self._starts, self._n_parts, self._record_bytes, &order[0], k, 8):
                    _prefetch(self._bases, self._starts, self._n_parts, self._record_bytes, &order[0], k, chunk)
        if k:
            with nogil:
                rc = emb_gather(self._bases, self._starts, self._n_parts, self._record_bytes,
                                <const uint64_t *>&rv[0], k, <uint8_t *>cnp.PyArray_DATA(o))
        _check(rc, "gathering records")
        return out

    def _extents(self, records):
        """Each of ``records``' (a uint64 array) first row in its part and its length, both uint64."""
        self._live()
        cdef const uint64_t[::1] iv = records
        first = np.empty(len(records), np.uint64)
        length = np.empty(len(records), np.uint64)
        cdef uint64_t[::1] fv = first, lv = length
        cdef size_t k = len(records)
        cdef int rc = EMB_OK
        if not self._ragged:
            raise TypeError("extents of a fixed-width dataset")
        if k:
            with nogil:
                rc = emb_extents(self._ranges, self._starts, self._part_rows, self._n_parts, &iv[0], k,
                                 &fv[0], &lv[0])
        _check(rc, "ranges section")
        return first, length

    def _gather_ragged(self, records, pad, out=None):
        """The records at ``records`` (a uint64 array): padded with a mask, or packed with offsets; padded into
        ``out`` if given (a writable C-contiguous ``(k, longest, dim)`` array of the stored type, its padding
        zeroed here: memory reused, as a DataLoader worker's shared buffers are)."""
        first, length = self._extents(records)
        cdef size_t k = len(records)
        cdef uint64_t longest = length.max() if k else 0
        offsets = np.zeros(k + 1, np.int64)
        np.cumsum(length, out=offsets[1:])
        # Padding: where it is most of the batch, new memory the kernel zeroes lazily (np.zeros); else an
        # empty array whose padding alone is zeroed here (calloc would zero the whole batch first).
        cdef int zero_pad = pad and 2 * offsets[k] >= k * longest
        if out is not None:
            shape = (k, longest, self._dim)
            if not (pad and isinstance(out, np.ndarray) and out.shape == shape and out.dtype == self._descr
                    and out.flags.c_contiguous and out.flags.writeable):
                raise ValueError(f"_gather_ragged() output must be a writable C-contiguous {self._descr} array "
                                 f"of shape {shape}")
            zero_pad = 1
        elif pad:
            out = (np.empty if zero_pad else np.zeros)((k, longest, self._dim), dtype=self._descr)
        else:
            out = np.empty((offsets[k], self._dim), dtype=self._descr)
        cdef const uint64_t[::1] iv = records
        cdef const uint64_t[::1] fv = first, lv = length
        cdef cnp.ndarray o = out
        cdef uint64_t stride = longest if pad else 0
        cdef size_t i, part
        if k:
            with nogil:
                for i in range(k):  # every record's pages asked of the disk at once, then copied in order
                    part = _part_of(self._starts, self._n_parts, iv[i])
                    _will_need(self._bases[part] + fv[i] * self._record_bytes, lv[i] * self._record_bytes)
                emb_gather_ragged(self._bases, self._starts, self._n_parts, self._record_bytes, &iv[0], &fv[0],
                                  &lv[0], k, stride, zero_pad, <uint8_t *>cnp.PyArray_DATA(o))
        if pad:
            return out, np.arange(longest, dtype=np.uint64) < length[:, None]
        return out, offsets

    cdef object _key_of(self, uint64_t row):
        """The key at dataset ``row`` (below ``_n``), checked against its segment's keys section."""
        cdef size_t lo = 0, hi = self._n_segs, mid
        while hi - lo > 1:  # the segment with first_row <= row < the next one's
            mid = lo + (hi - lo) // 2
            if self._segs[mid].first_row <= row:
                lo = mid
            else:
                hi = mid
        cdef segment_t *seg = &self._segs[lo]
        cdef uint64_t local = row - seg.first_row
        cdef uint64_t start = _load_u64(seg.key_offsets + 8 * local)
        cdef uint64_t end = _load_u64(seg.key_offsets + 8 * (local + 1))
        if start > end or end > seg.key_bytes_len:
            raise errors.CorruptFileError(f"keys section: offsets of row {row} are out of range")
        try:
            return PyUnicode_DecodeUTF8(<const char *>seg.key_bytes + start, end - start, NULL)
        except UnicodeDecodeError as e:
            raise errors.CorruptFileError(f"keys section: key at row {row} is not UTF-8") from e

    def key(self, row):
        """The key stored at ``row`` (row order is write order; negative counts from the end)."""
        self._live()
        return self._key_of(row_number(row, self._n))

    def keys_between(self, uint64_t start, uint64_t stop):
        """The keys of rows ``start`` to ``stop`` (clipped to the dataset), as a list."""
        self._live()
        return [self._key_of(i) for i in range(start, min(stop, self._n))]

    def keys_at(self, rows):
        """The keys of ``rows`` (a uint64 array), as a list."""
        self._live()
        cdef const uint64_t[::1] rv = rows
        cdef uint64_t r
        for r in rv:
            if r >= self._n:
                raise IndexError(f"row {r} out of range for {self._n} records")
        return [self._key_of(r) for r in rv]

    def _check_index(self):
        """Full walk of every segment's index (verify); returns (ok, the first failing segment's sorted
        position where it failed)."""
        self._live()
        cdef uint64_t where = 0
        cdef int rc = EMB_OK
        cdef size_t s
        cdef uint8_t[::1] sv
        cdef segment_t *seg
        for s in range(self._n_segs):
            seg = &self._segs[s]
            seen = np.zeros((seg.n + 7) // 8 + 1, dtype=np.uint8)
            sv = seen
            with nogil:
                rc = emb_index_check(&seg.ix, seg.key_offsets, seg.key_bytes, seg.key_bytes_len, &sv[0], &where)
            if rc != EMB_OK:
                return False, where
        return True, where


def crc32c(const uint8_t[::1] data, uint32_t crc=0):
    """CRC-32C of a buffer, chained like ``zlib.crc32``."""
    cdef size_t n = data.shape[0]
    if n == 0:
        return crc
    with nogil:
        crc = emb_crc32c(crc, &data[0], n)
    return crc


def crc32c_blocks(const uint8_t[::1] data, uint64_t block):
    """CRC-32C of each ``block``-byte block of a buffer, as a uint32 array."""
    cdef uint64_t n = data.shape[0]
    out = np.zeros((n + block - 1) // block, dtype=np.uint32)
    cdef uint32_t[::1] ov = out
    if n:
        with nogil:
            emb_crc32c_blocks(&data[0], n, block, &ov[0])
    return out


def gather(const uintptr_t[::1] bases, const uint64_t[::1] starts, uint64_t record_bytes,
           const uint64_t[::1] rows, cnp.ndarray out):
    """Copy global ``rows`` of records spread over mapped shards into ``out`` (C-contiguous,
    ``len(rows) * record_bytes`` bytes): shard ``s`` holds rows ``starts[s]`` to ``starts[s+1]``
    at address ``bases[s]``, which the caller keeps mapped."""
    cdef size_t k = rows.shape[0], n_shards = bases.shape[0]
    if starts.shape[0] != n_shards + 1 or n_shards == 0:
        raise ValueError("gather needs one more start than shards")
    if not out.flags.c_contiguous or <uint64_t>out.nbytes != k * record_bytes or not out.flags.writeable:
        raise ValueError("gather output must be a writable C-contiguous array of the rows' size")
    cdef int rc = EMB_OK
    if k:
        with nogil:
            rc = emb_gather(<const uint8_t *const *>&bases[0], &starts[0], n_shards, record_bytes,
                            &rows[0], k, <uint8_t *>cnp.PyArray_DATA(out))
    _check(rc, f"gathering records of {starts[n_shards]}")


cdef bint _resident(const uint8_t *const *bases, const uint64_t *starts, size_t n_parts, uint64_t record_bytes,
                    const uint64_t *rows, size_t k, size_t sample) noexcept nogil:
    """Whether the first page of each of ``sample`` records spread over ``rows`` is in the page cache (no
    sample: not known to be)."""
    cdef size_t page = sysconf(_SC_PAGESIZE), i, p
    cdef unsigned char v = 0
    cdef uintptr_t at
    if sample == 0:
        return False
    for i in range(sample if sample < k else k):
        p = 0
        while p + 1 < n_parts and rows[i * k // sample] >= starts[p + 1]:
            p += 1
        at = <uintptr_t>bases[p] + (rows[i * k // sample] - starts[p]) * record_bytes
        if mincore(<void *>(at - at % page), 1, &v) != 0 or not (v & 1):
            return False
    return True


cdef size_t _prefetch(const uint8_t *const *bases, const uint64_t *starts, size_t n_parts, uint64_t record_bytes,
                      const uint64_t *rows, size_t k, size_t chunk) noexcept nogil:
    """``madvise(WILLNEED)`` the ``chunk``-aligned pieces (a multiple of the page size) of the records section
    holding ``rows`` (ascending), one call per run of pieces that touch: the kernel queues all their reads at
    once.  Returns the calls made (a failed hint changes nothing)."""
    cdef size_t i, p = 0, run_part = 0, calls = 0
    cdef uintptr_t lo, hi, base, end, run_lo = 0, run_hi = 0
    for i in range(k):
        while p + 1 < n_parts and rows[i] >= starts[p + 1]:
            p += 1
        base = <uintptr_t>bases[p]
        end = base + (starts[p + 1] - starts[p]) * record_bytes
        lo = base + (rows[i] - starts[p]) * record_bytes
        hi = lo + record_bytes
        lo -= (lo - base) % chunk  # the records section starts on a page: so does every piece
        hi = hi + (chunk - (hi - base) % chunk) % chunk
        hi = end if hi > end else hi
        if run_hi and p == run_part and lo <= run_hi:
            run_hi = hi if hi > run_hi else run_hi
            continue
        if run_hi:
            calls += _hint(run_lo, run_hi)
        run_lo, run_hi, run_part = lo, hi, p
    if run_hi:
        calls += _hint(run_lo, run_hi)
    return calls


def prefetch(const uintptr_t[::1] bases, const uint64_t[::1] starts, uint64_t record_bytes,
             const uint64_t[::1] rows, size_t sample=8, size_t chunk=4096):
    """Before a gather of ``rows`` (ascending) from mapped parts: unless a sample of them is in the page cache
    already, ask the kernel for all their pages at once, so the gather waits for many reads in flight instead
    of one page fault at a time.  Returns the ``madvise`` calls made (0: they looked cached)."""
    cdef size_t k = rows.shape[0], n = bases.shape[0], calls = 0
    if starts.shape[0] != n + 1 or n == 0:
        raise ValueError("prefetch needs one more start than parts")
    if chunk == 0 or chunk % sysconf(_SC_PAGESIZE):
        raise ValueError("prefetch chunk must be a multiple of the page size")
    if k:
        with nogil:
            if not _resident(<const uint8_t *const *>&bases[0], &starts[0], n, record_bytes, &rows[0], k, sample):
                calls = _prefetch(<const uint8_t *const *>&bases[0], &starts[0], n, record_bytes, &rows[0], k, chunk)
    return calls


DOT_KINDS = {"float32": EMB_DOT_F32, "float16": EMB_DOT_F16, "bfloat16": EMB_DOT_BF16, "int8": EMB_DOT_I8,
             "uint8": EMB_DOT_U8}  # the element types dot() reads as they are stored


def dot(cnp.ndarray block, queries, int threads=2, out=None):
    """``queries @ block.T`` as a float32 ``(q, n)`` array (into ``out`` if given: its rows may be longer than
    ``n``, as a view of a bigger buffer, but each must be contiguous), for a ``(n, dim)`` block of one of
    :data:`DOT_KINDS` whose rows are each contiguous (a view of the mapping, or of the leading ``dim`` values of
    its records: nothing is copied; values widened in registers) and ``(q, dim)`` queries; the GIL released,
    the rows split over ``threads`` threads."""
    kind = DOT_KINDS.get(block.dtype.name, -1) if block.dtype.isnative else -1
    if kind < 0 or not _rows_contiguous(block):
        raise ValueError(f"dot() takes a 2-d block of {', '.join(DOT_KINDS)} with contiguous rows")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != block.shape[1]:
        raise ValueError(f"dot() takes queries of shape (q, {block.shape[1]}), not {q.shape}")
    cdef uint64_t n = block.shape[0], stride = _row_stride(block)
    cdef uint32_t dim = block.shape[1], nq = q.shape[0]
    cdef int k = kind
    out = _scores_out(out, nq, n, "dot()")
    cdef cnp.ndarray qa = q, oa = out
    cdef uint64_t ld = out.strides[0] // 4
    with nogil:
        emb_dot(<const uint8_t *>cnp.PyArray_DATA(block), n, dim, stride, k,
                <const float *>cnp.PyArray_DATA(qa), nq, <float *>cnp.PyArray_DATA(oa), ld, threads)
    return out


def hamming(cnp.ndarray block, queries, int threads=2, out=None):
    """The bits that differ between each row of a ``(n, nbytes)`` block of packed bits (uint8 or int8) whose
    rows are each contiguous (a view of the mapping, or of the leading bytes of its records: nothing copied)
    and each of ``(q, nbytes)`` queries, as a float32 ``(q, n)`` array (into ``out`` as for :func:`dot`); the
    GIL released, the rows split over ``threads`` threads."""
    if block.dtype.itemsize != 1 or block.dtype.kind not in "iu" or not _rows_contiguous(block):
        raise ValueError("hamming() takes a 2-d block of uint8 or int8 with contiguous rows")
    q = np.ascontiguousarray(queries).view(np.uint8) if np.asarray(queries).dtype.itemsize == 1 else None
    if q is None or q.ndim != 2 or q.shape[1] != block.shape[1]:
        raise ValueError(f"hamming() takes byte queries of shape (q, {block.shape[1]})")
    cdef uint64_t n = block.shape[0], stride = _row_stride(block)
    cdef uint32_t nbytes = block.shape[1], nq = q.shape[0]
    out = _scores_out(out, nq, n, "hamming()")
    cdef cnp.ndarray qa = q, oa = out
    cdef uint64_t ld = out.strides[0] // 4
    with nogil:
        emb_hamming(<const uint8_t *>cnp.PyArray_DATA(block), n, nbytes, stride,
                    <const uint8_t *>cnp.PyArray_DATA(qa), nq, <float *>cnp.PyArray_DATA(oa), ld, threads)
    return out


def _scores_out(out, nq, n, what):
    """``out``, checked to take ``(nq, n)`` float32 scores a row at a time; a new array if None."""
    if out is None:
        return np.empty((nq, n), dtype=np.float32)
    if out.shape != (nq, n) or out.dtype != np.float32 or not _rows_contiguous(out) or not out.flags.writeable:
        raise ValueError(f"{what} output must be a writable float32 array of shape ({nq}, {n}) with contiguous rows")
    return out


def _rows_contiguous(a):
    """Whether a 2-d array's rows are each contiguous, at a stride of whole items (a view of a wider buffer)."""
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize) and (a.shape[0] <= 1 or (
        a.strides[0] % a.itemsize == 0 and a.strides[0] >= a.shape[1] * a.itemsize))


def _row_stride(a):
    """The bytes from one row of ``a`` to the next (of one row, which numpy may give any stride: its length)."""
    return a.strides[0] if a.shape[0] > 1 else a.shape[1] * a.itemsize


def widen(cnp.ndarray block, int threads=2, out=None):
    """A float32 copy (into ``out`` if given) of a C-contiguous float16 array (F16C where the CPU has it), the
    GIL released."""
    if block.dtype != np.float16 or not block.flags.c_contiguous:
        raise ValueError("widen() takes a C-contiguous float16 array")
    if out is None:
        out = np.empty((<object>block).shape, dtype=np.float32)
    elif out.shape != (<object>block).shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("widen() output must be a C-contiguous float32 array of the block's shape")
    cdef cnp.ndarray oa = out
    cdef uint64_t n = block.size
    with nogil:
        emb_widen_f16(<const uint8_t *>cnp.PyArray_DATA(block), n, <float *>cnp.PyArray_DATA(oa), threads)
    return out


def pool(cnp.ndarray block, offsets, str how, int threads=2):
    """One float32 vector per record of a C-contiguous ``(rows, dim)`` block of one of :data:`DOT_KINDS`, record
    ``i`` being rows ``offsets[i]`` to ``offsets[i + 1]`` (at least one): their ``"mean"`` (summed in float64)
    or ``"max"`` (NaN where a row holds NaN); the GIL released, the records split over ``threads`` threads."""
    kind = DOT_KINDS.get(block.dtype.name, -1) if block.dtype.isnative else -1
    if block.ndim != 2 or not block.flags.c_contiguous or kind < 0:
        raise ValueError(f"pool() takes a C-contiguous 2-d block of {', '.join(DOT_KINDS)}")
    if how not in ("mean", "max"):
        raise ValueError(f"pool() pools by 'mean' or 'max', not {how!r}")
    o = np.ascontiguousarray(offsets, dtype=np.int64)
    if o.ndim != 1 or len(o) < 1 or o[0] < 0 or o[-1] > block.shape[0] or (len(o) > 1 and (np.diff(o) <= 0).any()):
        raise ValueError(f"pool() takes offsets rising strictly from 0 to at most {block.shape[0]}")
    cdef uint64_t n = len(o) - 1
    cdef uint32_t dim = block.shape[1]
    cdef int k = kind, h = EMB_POOL_MEAN if how == "mean" else EMB_POOL_MAX, status
    out = np.empty((n, dim), dtype=np.float32)
    cdef cnp.ndarray oa = out, offs = o
    with nogil:
        status = emb_pool(<const uint8_t *>cnp.PyArray_DATA(block), dim, k, <const int64_t *>cnp.PyArray_DATA(offs),
                          n, h, <float *>cnp.PyArray_DATA(oa), threads)
    if status == EMB_E_NOMEM:
        raise MemoryError("pool(): out of memory")
    return out


cdef class TopK:
    """The best ``k`` (score, row) of each of ``q`` queries, merged block after block in the core (a heap per
    query): larger scores first (smaller with ``smaller``), NaN last, equal scores by row."""
    cdef readonly object scores, rows, count
    cdef uint32_t k, q
    cdef int smaller

    cdef int threads

    def __init__(self, uint32_t q, uint32_t k, bint smaller, int threads=2):
        self.q, self.k, self.smaller, self.threads = q, k, smaller, threads
        self.scores = np.empty((q, k), np.float32)
        self.rows = np.empty((q, k), np.int64)
        self.count = np.zeros(q, np.uint32)

    def add(self, scores, rows):
        """Merge ``scores`` ``(q, n)`` of the dataset rows ``rows`` (ascending, past every row merged before)."""
        s = scores if scores.dtype == np.float32 and _rows_contiguous(scores) else np.ascontiguousarray(scores, np.float32)
        r = np.ascontiguousarray(rows, dtype=np.int64)
        if s.ndim != 2 or s.shape[0] != self.q or r.shape[0] != s.shape[1]:
            raise ValueError(f"TopK.add() takes ({self.q}, {len(r)}) scores, not {s.shape}")
        cdef cnp.ndarray sa = s, ra = r, hs = self.scores, hr = self.rows, c = self.count
        cdef uint64_t n = s.shape[1], ld = max(s.strides[0] // 4, 1)
        with nogil:
            emb_topk_merge(<const float *>cnp.PyArray_DATA(sa), ld, n, self.q, <const int64_t *>cnp.PyArray_DATA(ra),
                           self.k, self.smaller, <float *>cnp.PyArray_DATA(hs), <int64_t *>cnp.PyArray_DATA(hr),
                           <uint32_t *>cnp.PyArray_DATA(c), self.threads)

    def result(self):
        """``(scores, rows)`` ``(q, m)``, best first, ``m`` the number kept (at most ``k``)."""
        m = int(self.count.min()) if self.q else 0
        sign = -1.0 if self.smaller else 1.0
        scores, rows = sign * self.scores[:, :m], self.rows[:, :m]
        key = np.where(np.isnan(scores), np.inf, -sign * scores)
        order = np.lexsort((rows, key), axis=1)
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def copy_all(const uintptr_t[::1] bases, const uint64_t[::1] starts, uint64_t record_bytes,
             cnp.ndarray out):
    """Copy every record of a layout (as for :func:`gather`) into ``out``, in row order:
    one pass in address order over each shard, so read-ahead keeps up on a cold file."""
    cdef size_t s, n_shards = bases.shape[0]
    if starts.shape[0] != n_shards + 1:
        raise ValueError("copy_all needs one more start than shards")
    if (not out.flags.c_contiguous or not out.flags.writeable
            or <uint64_t>out.nbytes != starts[n_shards] * record_bytes):
        raise ValueError("copy_all output must be a writable C-contiguous array of every record")
    cdef uint8_t *dst = <uint8_t *>cnp.PyArray_DATA(out)
    with nogil:
        for s in range(n_shards):
            emb_copy(dst + starts[s] * record_bytes, <const uint8_t *>bases[s],
                     (starts[s + 1] - starts[s]) * record_bytes)


def hint(uintptr_t addr, size_t length):
    """Ask the kernel to read a page-aligned range of a mapping the caller keeps alive, every page of it
    (``WILLNEED`` in steps it reads whole), without the GIL; returns the calls made."""
    cdef size_t calls
    with nogil:
        calls = _hint(addr, addr + length)
    return calls


def advise(uintptr_t addr, size_t length, int advice):
    """``madvise`` a page-aligned range of a mapping the caller keeps alive, without the GIL
    (``MADV_POPULATE_READ`` blocks until the pages are read: run it off the main thread)."""
    cdef int rc
    with nogil:
        rc = madvise(<void *>addr, length, advice)
    if rc:
        raise OSError(errno, "madvise failed")


def resident_fraction(uintptr_t addr, size_t length):
    """The fraction of the pages of a page-aligned range of a file mapping that are in the
    page cache (``mincore``)."""
    cdef size_t page = sysconf(_SC_PAGESIZE), pages = (length + page - 1) // page, i, resident = 0
    if pages == 0:
        return 1.0
    vec = np.zeros(pages, np.uint8)
    cdef unsigned char[::1] v = vec
    cdef int rc
    with nogil:
        rc = mincore(<void *>addr, length, &v[0])
        if rc == 0:
            for i in range(pages):
                resident += v[i] & 1
    if rc:
        raise OSError(errno, "mincore failed")
    return resident / pages


def start_writeback(int fd, long long offset, long long length):
    """Start writing a file range's dirty pages to disk, without waiting or evicting them
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing)."""
    cdef int rc
    with nogil:
        rc = emb_start_writeback(fd, offset, length)
    if rc:
        raise OSError(errno, "sync_file_range failed")


def range_lock(int fd, int kind, long long start, long long length, bint wait=False):
    """Set (``F_RDLCK``, ``F_WRLCK``) or clear (``F_UNLCK``) the lock of this open file description on a byte
    range (Linux ``F_OFD_SETLK``; ``wait``: ``F_OFD_SETLKW``): whether it was set, not if another description
    holds a conflicting lock."""
    cdef int rc
    with nogil:
        rc = emb_range_lock(fd, kind, start, length, wait)
    if rc and (errno == EAGAIN or errno == EACCES):
        return False
    if rc:
        raise OSError(errno, "fcntl(F_OFD_SETLK) failed")
    return True


def punch_hole(int fd, long long offset, long long length):
    """Give a file range's disk space back, the file keeping its size: the range reads as zeros after
    (Linux ``fallocate(PUNCH_HOLE)``; ``OSError`` where the system or the file system cannot)."""
    cdef int rc
    with nogil:
        rc = emb_punch_hole(fd, offset, length)
    if rc:
        raise OSError(errno, "fallocate(PUNCH_HOLE) failed")


def stream_seed(uint64_t seed, uint64_t epoch, uint64_t stream):
    """The seed of random stream ``stream`` in ``epoch`` of a run seeded ``seed``."""
    return emb_stream_seed(seed, epoch, stream)


def shuffle(uint64_t[::1] items, uint64_t seed):
    """Shuffle ``items`` in place, uniformly, as a function of ``seed`` alone."""
    cdef uint64_t n = items.shape[0]
    if n > 1:
        with nogil:
            emb_shuffle(&items[0], n, seed)


def sort_keys(const uint8_t[::1] heap, const uint64_t[::1] offsets):
    """Rows in key order, as uint64 (key ``r`` is ``heap[offsets[r]:offsets[r + 1]]``).

    Raises :class:`~embfile.DuplicateKeyError` naming the key and both rows if two keys are equal.
    """
    cdef uint64_t n = offsets.shape[0] - 1
    perm = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] pv = perm
    cdef uint64_t dup[2]
    cdef const uint8_t *hp = &heap[0] if heap.shape[0] else NULL
    dup[0] = dup[1] = 0
    cdef int rc = EMB_OK
    if n:
        with nogil:
            rc = emb_sort_keys(hp, &offsets[0], n, &pv[0], dup)
    key = None
    if rc == EMB_E_DUPLICATE:
        key = bytes(heap[offsets[dup[0]]:offsets[dup[0] + 1]]).decode("utf-8", "replace")
    _check(rc, f"sorting keys (row {dup[0]})", key, (dup[0], dup[1]))
    return perm


def build_index(const uint8_t[::1] heap, const uint64_t[::1] offsets,
                const uint64_t[::1] perm, uint32_t bucket_keys):
    """The index section for keys sorted by ``perm``: ``(bytes array, n_buckets, lcp_len)``."""
    cdef uint64_t n = perm.shape[0], size = 0, nb = 0, lcp = 0
    cdef const uint8_t *hp = &heap[0] if heap.shape[0] else NULL
    cdef const uint64_t *pp = &perm[0] if n else NULL
    cdef int rc
    with nogil:
        rc = emb_index_build(hp, &offsets[0], pp, n, bucket_keys, NULL, &size, &nb, &lcp)
    _check(rc, "building the index")
    out = np.zeros(size, dtype=np.uint8)
    cdef uint8_t[::1] ov = out
    if size:
        with nogil:
            rc = emb_index_build(hp, &offsets[0], pp, n, bucket_keys, &ov[0], &size, &nb, &lcp)
        _check(rc, "building the index")
    return out, nb, lcp
