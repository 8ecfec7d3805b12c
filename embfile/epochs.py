"""Epochs: every record once, in a block-shuffled order, cut into batches.

Training reads every record once per epoch in random order.  One read per
record is slow on a cold disk; reading whole blocks in file order gives
correlated batches.  The order here is the middle way (as FFCV and Mosaic
Streaming do it):

1. the ``n`` rows are cut into blocks of ``block_size`` consecutive rows (the
   last block may be shorter), and the blocks are shuffled;
2. consecutive groups of ``buffer_blocks`` shuffled blocks form *windows*, and
   the rows of each window are shuffled together;
3. the epoch is the windows' rows one after another.  Rank ``r`` of ``W`` takes
   positions ``[r*n//W, (r+1)*n//W)`` of it (or ``n//W`` each, cut to whole
   batches, with ``drop_last``) and cuts them into batches.

Every shuffle is the core's Fisher-Yates driven by ``(seed, epoch, window)``
(``_core.stream_seed``), so the order depends on nothing else: not on numpy's
generators, the number of loader workers or the machine.  A window's blocks
are sequential reads; the next window is asked of the operating system
(``madvise(WILLNEED)``) while the current one is cut into batches, and each
batch is gathered straight from the mapped file into a fresh array by the core,
without the GIL: one copy per record.
"""
import bisect
import contextlib
import mmap
import operator
import queue
import sys
import threading

import numpy as np

from embfile import _core, errors

BLOCK_BYTES = 1 << 20  # default block: about 1 MiB of records, one sequential read
BUFFER_BLOCKS = 64  # default window: 64 blocks mixed together
_BLOCK_ORDER_STREAM = (1 << 64) - 1  # the random stream of the block order (windows use 0, 1, ...)


def _count(value, name, low=0):
    """``value`` as an int >= ``low``: TypeError for non-integers, ValueError below ``low``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}, not {value}")
    return value


class EpochPlan:
    """The order of one epoch over ``n`` rows, computed window by window (see the module).

    Costs ``O(n / block_size)`` memory for the block order; a window's rows are
    made when asked for.
    """

    def __init__(self, n, *, block_size, buffer_blocks=BUFFER_BLOCKS, seed=0, epoch=0, shuffle=True):
        self.n = _count(n, "n")
        self.block_size = _count(block_size, "block_size", 1)
        self.buffer_blocks = _count(buffer_blocks, "buffer_blocks", 1)
        self.seed = _count(seed, "seed")
        self.epoch = _count(epoch, "epoch")
        if self.seed >= 1 << 64 or self.epoch >= 1 << 64:
            raise ValueError("seed and epoch must fit in 64 bits")
        self.shuffle = bool(shuffle)
        n_blocks = -(-self.n // self.block_size)
        self.blocks = np.arange(n_blocks, dtype=np.uint64)
        if self.shuffle:
            _core.shuffle(self.blocks, _core.stream_seed(self.seed, self.epoch, _BLOCK_ORDER_STREAM))
        sizes = np.full(n_blocks, self.block_size, dtype=np.int64)
        if n_blocks:
            sizes[-1] = self.n - (n_blocks - 1) * self.block_size
        firsts = np.arange(0, n_blocks, self.buffer_blocks)
        window_sizes = np.add.reduceat(sizes[self.blocks.astype(np.int64)], firsts) if n_blocks else sizes
        self.window_starts = np.concatenate([[0], np.cumsum(window_sizes)]).astype(np.int64).tolist()
        self._cached = (-1, None)

    @property
    def n_windows(self):
        return len(self.window_starts) - 1

    def window_blocks(self, w):
        """The blocks of window ``w``, in the shuffled block order."""
        return self.blocks[w * self.buffer_blocks:(w + 1) * self.buffer_blocks]

    def window_rows(self, w):
        """The rows of window ``w`` in epoch order (a new uint64 array; the last one is cached)."""
        if self._cached[0] == w:
            return self._cached[1]
        blocks = self.window_blocks(w)
        rows = (blocks[:, None] * np.uint64(self.block_size)
                + np.arange(self.block_size, dtype=np.uint64)).ravel()
        if len(rows) > self.window_starts[w + 1] - self.window_starts[w]:
            rows = rows[rows < self.n]  # the window holding the short last block
        if self.shuffle:
            _core.shuffle(rows, _core.stream_seed(self.seed, self.epoch, w))
        self._cached = (w, rows)
        return rows

    def window_of(self, position):
        """The window holding epoch position ``position`` (< n)."""
        w = self._cached[0]
        if w >= 0 and self.window_starts[w] <= position < self.window_starts[w + 1]:
            return w
        return bisect.bisect_right(self.window_starts, position) - 1

    def rows(self, start, stop):
        """The rows at epoch positions ``[start, stop)``, as a uint64 array (read-only use)."""
        parts = []
        while start < stop:
            w = self.window_of(start)
            first, end = self.window_starts[w], min(stop, self.window_starts[w + 1])
            parts.append(self.window_rows(w)[start - first:end - first])
            start = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty(0, np.uint64)])

    def order(self):
        """The whole epoch's rows in order (``O(n)`` memory: for measuring and testing)."""
        return self.rows(0, self.n) if self.n else np.empty(0, np.uint64)


def rank_share(n, rank, world_size, batch_size, drop_last):
    """Positions ``[lo, hi)`` of the epoch that ``rank`` of ``world_size`` reads.

    Without ``drop_last`` the shares tile ``[0, n)`` and differ in size by at
    most one; with it, every rank gets the same number of whole batches.
    """
    if drop_last:
        per = n // world_size
        lo = rank * per
        return lo, lo + per // batch_size * batch_size
    return rank * n // world_size, (rank + 1) * n // world_size


class Batches:
    """An iterator over the batches of one epoch for one rank (see :meth:`EmbFile.iter_batches`).

    Yields ``(keys, matrix)`` (or ``matrix`` with ``keys=False``), ``matrix`` a
    new ``(b, dim)`` array, each passed through ``transform`` if one is given.
    ``worker`` and ``num_workers`` let several copies of the iterator (loader
    workers) each take every ``num_workers``-th batch of the same sequence;
    ``start`` skips that many records of the rank's share (a resume point).

    ``state_dict()`` gives the position reached; ``load_state_dict(state)`` on
    an iterator made with the same arguments continues from it, with exactly
    the records not yet yielded.
    """

    _reader = None  # the read-ahead thread, started by the first batch

    def __init__(self, source, batch_size=100, *, shuffle=True, seed=0, epoch=0, block_size=None,
                 buffer_blocks=BUFFER_BLOCKS, rank=0, world_size=1, drop_last=False, keys=True,
                 transform=None, worker=0, num_workers=1, start=0, read_ahead=1):
        self.batch_size = _count(batch_size, "batch_size", 1)
        world_size = _count(world_size, "world_size", 1)
        num_workers = _count(num_workers, "num_workers", 1)
        if not _count(rank, "rank") < world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if not _count(worker, "worker") < num_workers:
            raise ValueError(f"worker {worker} is not below num_workers {num_workers}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, not {type(transform).__name__}")
        self._source = source
        self._layout = source._layout()
        if block_size is None:
            block_size = max(1, BLOCK_BYTES // self._layout[2])
        self.plan = EpochPlan(len(source), block_size=block_size, buffer_blocks=buffer_blocks,
                              seed=seed, epoch=epoch, shuffle=shuffle)
        self.rank, self.world_size, self.drop_last = rank, world_size, bool(drop_last)
        self._lo, self._hi = rank_share(self.plan.n, rank, world_size, self.batch_size, self.drop_last)
        self._keys, self._transform = bool(keys), transform
        self._worker, self._num_workers = worker, num_workers
        self._read_ahead = _count(read_ahead, "read_ahead")
        self._window = -1  # the window being read
        self._hinted = self._asked = -1  # windows up to these have been asked for / mapped in
        self._pos = 0  # records of this rank's share yielded (by all workers, up to this one's next)
        self.load_state_dict({**self._config(), "position": start})

    def __iter__(self):
        return self

    def __len__(self):
        """Batches this iterator still yields."""
        first = self._lo + self._pos + self._worker * self.batch_size
        left = -(-(self._hi - first) // self.batch_size) if first < self._hi else 0
        return -(-left // self._num_workers)

    def __next__(self):
        start = self._lo + self._pos + self._worker * self.batch_size
        if start >= self._hi:
            self.close()
            raise StopIteration
        try:
            self._source._require_open()
        except errors.ClosedFileError:
            self.close()
            raise
        stop = min(start + self.batch_size, self._hi)
        self._enter(self.plan.window_of(start))
        rows = self.plan.rows(start, stop)
        bases, starts, record_bytes, _ = self._layout
        matrix = np.empty((stop - start, self._source.dim), self._source.dtype)
        _core.gather(bases, starts, record_bytes, rows, matrix)
        self._pos += self._num_workers * self.batch_size
        batch = (self._source._keys_at(rows), matrix) if self._keys else matrix
        return self._transform(batch) if self._transform is not None else batch

    def _enter(self, w):
        """Start on window ``w``: release the one before; have the reader ask the kernel for
        the windows up to ``read_ahead + 1`` ahead and map in those up to ``read_ahead`` ahead
        (so the disk always has the next window queued while one is being mapped)."""
        if w == self._window:
            return
        if self._reader is None:
            self._reader = ReadAhead(self._layout)
        if self._window >= 0:
            self._reader.release(self._ranges(self._window))
        self._window = w
        last = self.plan.n_windows - 1
        for ahead in range(max(w, self._hinted + 1), min(w + self._read_ahead + 1, last) + 1):
            self._reader.hint(self._ranges(ahead))
            self._hinted = ahead
        for ahead in range(max(w, self._asked + 1), min(w + self._read_ahead, last) + 1):
            if self._reader.backlog() > 2 * self._read_ahead + 2:
                break  # the reader is behind (a fast consumer): fault pages in here instead of queueing more
            self._reader.populate(self._ranges(ahead))
            self._asked = ahead

    def _ranges(self, w):
        """Row ranges ``(lo, hi)`` of window ``w``'s blocks in file order, adjacent ones merged."""
        size, n = self.plan.block_size, self.plan.n
        blocks = np.sort(self.plan.window_blocks(w)).astype(np.int64)
        if not len(blocks):
            return []
        runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)
        return [(int(r[0]) * size, min(n, (int(r[-1]) + 1) * size)) for r in runs]

    def close(self, wait=True):
        """Stop the read-ahead thread and release the pages this iterator mapped.
        (Runs by itself at the end of the epoch and when the iterator is collected.)"""
        reader, self._reader = self._reader, None
        if reader is not None:
            for w in range(max(self._window, 0), self._asked + 1):  # the current and mapped-ahead windows
                reader.release(self._ranges(w))
            reader.stop(wait)

    def __del__(self):
        self.close(wait=False)

    def state_dict(self):
        """Where this iterator is, as a dict of ints and bools (JSON-friendly)."""
        if self._num_workers != 1:
            raise ValueError("with several workers the loader knows the position: "
                             "use embfile.torch.IterableDataset.state_dict(batches_seen)")
        return {**self._config(), "position": self._pos}

    def load_state_dict(self, state):
        """Continue from ``state`` (from :meth:`state_dict` of an iterator made the same way)."""
        want = self._config()
        for name, value in want.items():
            if state.get(name) != value:
                raise ValueError(f"state was saved with {name}={state.get(name)!r}, "
                                 f"this iterator has {name}={value!r}")
        position = _count(state["position"], "position")
        if position > self._hi - self._lo:
            raise ValueError(f"position {position} is past this rank's {self._hi - self._lo} records")
        self._pos = position

    def _config(self):
        p = self.plan
        return {"records": p.n, "seed": p.seed, "epoch": p.epoch, "shuffle": p.shuffle,
                "block_size": p.block_size, "buffer_blocks": p.buffer_blocks, "rank": self.rank,
                "world_size": self.world_size, "drop_last": self.drop_last}


class BatchSource:
    """Adds :meth:`iter_batches`, :meth:`take` and :meth:`to_numpy` to a store that has
    ``_layout()``, ``_keys_at(rows)``, ``_read_into(out)``, ``dim``, ``dtype``, ``len``
    and ``_require_open()`` (an .emb file or a sharded set)."""

    def iter_batches(self, batch_size=100, *, shuffle=True, seed=0, epoch=0, block_size=None,
                     buffer_blocks=BUFFER_BLOCKS, rank=0, world_size=1, drop_last=False,
                     keys=True, transform=None):
        """Batches of one epoch: every record once, in a block-shuffled order.

        Yields ``(keys, matrix)`` (``matrix`` alone with ``keys=False``), ``matrix``
        a new ``(b, dim)`` array.  Blocks of ``block_size`` consecutive records
        (default: about 1 MiB) are shuffled, and each window of ``buffer_blocks``
        blocks is shuffled as a whole, so reads stay sequential while batches mix
        records from all over the file.  The order depends only on ``(seed,
        epoch)``; without ``shuffle`` it is row order.  ``rank`` of ``world_size``
        reads its own part (every record once across ranks; with ``drop_last``
        every rank gets the same number of whole batches).  ``transform`` is
        applied to each batch.  The returned :class:`Batches` has ``len`` and
        ``state_dict()`` / ``load_state_dict()`` for resuming.

        Examples
        --------
        >>> for keys, x in db.iter_batches(256, seed=1, epoch=e):   # doctest: +SKIP
        ...     loss = model(torch.from_numpy(x))
        """
        self._require_open()
        return Batches(self, batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                       block_size=block_size, buffer_blocks=buffer_blocks, rank=rank,
                       world_size=world_size, drop_last=drop_last, keys=keys, transform=transform)


    def take(self, rows):
        """A new ``(len(rows), dim)`` array of the records at ``rows`` (ints), in that order."""
        self._require_open()
        rows = np.asarray(rows)
        if rows.ndim != 1 or not (rows.dtype.kind in "iu" or rows.size == 0):
            raise TypeError(f"take() needs a 1-d sequence of row numbers, not {rows.dtype} {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must be from 0 to {len(self) - 1}")
        out = np.empty((len(rows), self.dim), self.dtype)
        bases, starts, record_bytes, _ = self._layout()
        _core.gather(bases, starts, record_bytes, rows.astype(np.uint64), out)
        return out

    def to_numpy(self):
        """All vectors as a new in-memory ``(n, dim)`` array, in row order.

        Read with large ``pread`` calls at the disk's sequential speed on a cold
        file (``np.array(db.matrix)`` copies in interleaved streams that defeat
        read-ahead).  From a cached file a helper thread also faults in the new
        array's pages ahead of the copy.  The array's data starts on a page boundary.
        """
        self._require_open()
        out = aligned_empty((len(self), self.dim), self.dtype)
        with faulted_in_ahead(out) if self._mostly_cached() else contextlib.nullcontext():
            self._read_into(out)
        return out

    def _mostly_cached(self):
        """Whether most of the first 64 MiB of records are in the page cache: then the copy sets the
        pace of a full read and faulting in ahead wins (0.51 GB warm: 96 against 114 ms).  When the
        disk does, the helper's page allocations compete with the read-ahead's (cold: 228 against
        197 ms)."""
        bases, starts, record_bytes, _ = self._layout()
        length = min(int(starts[1] - starts[0]) * record_bytes, 64 << 20) if len(bases) else 0
        return length > 0 and _core.resident_fraction(int(bases[0]), length) >= 0.5


def aligned_empty(shape, dtype, align=4096):
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


# Linux 5.14's MADV_POPULATE_WRITE (Python's mmap module does not name it yet)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else None)
POPULATE_STEP = 8 << 20  # pages faulted in per madvise call of the helper thread


@contextlib.contextmanager
def faulted_in_ahead(out):
    """Fault in the pages of ``out``, a new array, on a helper thread while the caller fills it.

    The first write to new memory makes the kernel zero each page (and, in a VM
    whose free memory went back to the host, fault it in from the host): as
    slow as the copy that fills it, or slower.  Done on another core, ahead of
    the copy, it leaves the copy alone on the critical path.  Only whole pages
    inside ``out`` are touched; without ``MADV_POPULATE_WRITE`` the copy
    faults the pages in itself, as it would anyway.
    """
    start = out.ctypes.data
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (start + out.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if MADV_POPULATE_WRITE is None or hi - lo < 2 * POPULATE_STEP:
        yield
        return
    stop = threading.Event()

    def populate():
        for at in range(lo, hi, POPULATE_STEP):
            if stop.is_set():
                return
            try:
                _core.advise(at, min(POPULATE_STEP, hi - at), MADV_POPULATE_WRITE)
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


def page_ranges(layout, lo, hi):
    """The page-aligned ``(address, length)`` ranges holding rows ``[lo, hi)`` of a layout."""
    bases, starts, record_bytes, _ = layout
    out = []
    first = int(np.searchsorted(starts, lo, side="right")) - 1
    for s in range(max(first, 0), len(bases)):
        a, b = max(lo, int(starts[s])), min(hi, int(starts[s + 1]))
        if a >= hi:
            break
        if a < b:
            start = int(bases[s]) + (a - int(starts[s])) * record_bytes
            end = int(bases[s]) + (b - int(starts[s])) * record_bytes
            aligned = start // mmap.PAGESIZE * mmap.PAGESIZE
            out.append((aligned, end - aligned))
    return out


def advise(layout, lo, hi, advice):
    """``madvise`` the pages of rows ``[lo, hi)`` (the layout's owner keeps them mapped)."""
    for address, length in page_ranges(layout, lo, hi):
        _core.advise(address, length, advice)


class ReadAhead:
    """A thread that reads upcoming windows into memory and lets go of finished ones.

    A hint asks the kernel for all of a window's pages at once (``WILLNEED``:
    the reads queue up together); populating maps them in (``POPULATE_READ``,
    which waits for them), so the main thread's gather finds them in place and
    takes no page faults; releasing unmaps a finished window (``DONTNEED``; the
    page cache keeps it), so resident memory stays at about ``read_ahead + 1``
    windows.  All of it runs here, in order, without the GIL.
    """

    def __init__(self, layout):
        self._layout = layout  # holds the mapping alive for the thread
        self._jobs = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._queued = self._done = 0  # counts of jobs (a lagging reader must not pile up releases)
        self._thread = threading.Thread(target=self._run, name="embfile-read-ahead", daemon=True)
        self._thread.start()

    def hint(self, ranges):
        self._put(ranges, mmap.MADV_WILLNEED)

    def populate(self, ranges):
        self._put(ranges, POPULATE_READ)

    def release(self, ranges):
        self._put(ranges, mmap.MADV_DONTNEED)

    def _put(self, ranges, advice):
        self._queued += 1
        self._jobs.put((ranges, advice))

    def backlog(self):
        """Jobs queued and not yet done."""
        return self._queued - self._done

    def stop(self, wait=True):
        """Finish the releases asked for, skip the rest, end the thread (and wait for it)."""
        self._stopping.set()
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _run(self):
        while (job := self._jobs.get()) is not None:
            ranges, advice = job
            if advice == mmap.MADV_DONTNEED or not self._stopping.is_set():
                for lo, hi in ranges:
                    try:
                        advise(self._layout, lo, hi, advice)
                    except OSError:
                        pass  # POPULATE_READ before Linux 5.14: the WILLNEED hint alone then
            self._done += 1


POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python's mmap names it from 3.13


def shuffle_quality(order, block_size=None):
    """How well ``order`` (an epoch's file rows, a permutation of ``0..n-1``) is shuffled.

    Returns a dict of:

    - ``gap_entropy``: the entropy in bits of the distribution of gaps
      ``|order[i+1] - order[i]|`` between consecutive records (Mosaic
      Streaming's measure: higher is better, file order scores 0; the estimate
      depends on ``n``, so compare with a random permutation of the same ``n``);
    - ``displacement``: the mean of ``|epoch position - file position|`` over
      ``n`` (a full permutation: about 1/3; file order: 0);
    - ``rank_correlation``: Spearman's correlation between file position and
      epoch position (a full permutation: about 0; file order: 1);
    - ``neighbour_rate`` (with ``block_size``): the fraction of consecutive
      records less than ``block_size`` rows apart in the file (a full
      permutation: about ``2 * block_size / n``).
    """
    order = np.asarray(order, dtype=np.int64)
    n = len(order)
    if n < 2:
        raise ValueError("shuffle quality needs at least two records")
    gaps = np.abs(np.diff(order))
    counts = np.bincount(gaps)
    p = counts[counts > 0] / (n - 1)
    position = np.arange(n, dtype=np.float64)
    out = {
        "gap_entropy": float(-(p * np.log2(p)).sum()) + 0.0,
        "displacement": float(np.abs(position - order).mean() / n),
        "rank_correlation": float(np.corrcoef(position, order)[0, 1]),
    }
    if block_size is not None:
        out["neighbour_rate"] = float((gaps < block_size).mean())
    return out
