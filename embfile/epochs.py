"""Epochs: every record once, in a block-shuffled order, cut into batches.

Training reads every record once per epoch in random order.  One read per record is slow on a cold
disk; reading whole blocks in file order gives correlated batches.  The order here is the middle way
(as FFCV and Mosaic Streaming do it):

1. the ``n`` rows are cut into blocks of ``block_size`` consecutive rows (the last block may be
   shorter), and the blocks are shuffled;
2. consecutive groups of ``buffer_blocks`` shuffled blocks form *windows*, and the rows of each window
   are shuffled together;
3. the epoch is the windows' rows one after another.  Rank ``r`` of ``W`` takes positions
   ``[r*n//W, (r+1)*n//W)`` of it (or ``n//W`` each, cut to whole batches, with ``drop_last``) and
   cuts them into batches.

Ragged records (per-residue embeddings) are read by record, each batch padded to its longest record with a
mask, or by row (``unit="row"``: every residue once, for per-residue heads).  With a ``token_budget`` the
records of the rank's part of each window are sorted by length and cut into batches of at most that many
padded rows (and at most ``batch_size`` records, if given), and those batches are shuffled: little padding,
the same block-shuffled epoch, every record once.  A window then holds at least ``WINDOW_BUDGETS`` budgets of
rows (more blocks than ``buffer_blocks`` if need be), so that records of about the same length meet in it.

Every shuffle is the core's Fisher-Yates driven by ``(seed, epoch, window)`` (``_core.stream_seed``),
so the order depends on nothing else: not on numpy's generators, the number of loader workers or the
machine.  A window's blocks are sequential reads; the next window is asked of the operating system
while the current one is cut into batches, and each batch is gathered straight from the mapped file
into a fresh array by the core, without the GIL: one copy per record.
"""

from __future__ import annotations

import bisect
import collections.abc
import dataclasses
import difflib
import operator
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from embfile import _core, errors
from embfile._direct import DirectWindows
from embfile._pages import Layout, ReadAhead

BLOCK_BYTES = 1 << 20  # default block: about 1 MiB of records, one sequential read
BUFFER_BLOCKS = 64  # default window: 64 blocks mixed together
_BLOCK_ORDER_STREAM = (1 << 64) - 1  # the random stream of the block order (windows use 0, 1, ...)
_BUDGET_STREAM = 1 << 63  # the order of window w's budgeted batches: stream 2**63 + w
DEFAULT_BATCH_SIZE = 100  # records, without a token budget
WINDOW_BUDGETS = 64  # under a token budget, a window holds at least this many budgets of rows
PADDING_TOLERANCE = 0.04  # and a batch stops short rather than pad more than this share of its rows
READS = ("auto", "mapped", "direct")
UNITS = ("record", "row")


def default_block_size(record_bytes: int) -> int:
    """Records in a default block: as many as fill :data:`BLOCK_BYTES`, at least one."""
    return max(1, BLOCK_BYTES // record_bytes)


def refuse_unknown(options: Collection[str], known: Collection[str], caller: str) -> None:
    """A TypeError for the first of ``options`` not among ``known``, naming the one it is likely a typo of."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, 1)
        hint = f"did you mean {close[0]!r}?" if close else f"options are {', '.join(sorted(known))}"
        raise TypeError(f"{caller} has no option {unknown[0]!r}: {hint}")


def count(value: object, name: str, low: int = 0) -> int:
    """``value`` as an int >= ``low``: TypeError for non-integers (bool included), ValueError below ``low``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if number < low:
        raise ValueError(f"{name} must be at least {low}, not {number}")
    return number


@dataclasses.dataclass(frozen=True)
class ResidueTargets:
    """Targets of per-residue records, one per row (a label per residue): the records' targets back to back,
    record ``i``'s at ``values[offsets[i]:offsets[i + 1]]``, gathered and padded as the records are."""

    values: np.ndarray  # (rows, *shape)
    offsets: np.ndarray  # (records + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def of(self, records: np.ndarray) -> list[np.ndarray]:
        """Each record's targets."""
        return [self.values[self.offsets[r] : self.offsets[r + 1]] for r in records.tolist()]

    def batch(self, records: np.ndarray, pad: bool) -> np.ndarray:
        """The records' targets as their vectors are batched: zero-padded ``(records, longest, *shape)``, or
        packed back to back."""
        parts = self.of(records)
        if not pad:
            return np.concatenate(parts) if parts else self.values[:0]
        longest = max((len(p) for p in parts), default=0)
        out = np.zeros((len(parts), longest, *self.values.shape[1:]), self.values.dtype)
        for i, p in enumerate(parts):
            out[i, : len(p)] = p
        return out


def aligned_targets(
    targets: Any, keys: Collection[str], lengths: np.ndarray | None = None
) -> np.ndarray | ResidueTargets:
    """``targets`` (labels to train on) as an array, one per item of ``keys``: given in their order (an array,
    a tensor or a sequence), or by key (a mapping, or a pandas Series or DataFrame indexed by key); one number,
    or one array of a shape all share, each.
    Of per-residue records (``lengths``, their rows), targets whose first dimension is each record's length
    are a label per residue (:class:`ResidueTargets`)."""
    if isinstance(targets, collections.abc.Mapping):
        missing = [k for k in keys if k not in targets]
        if missing:
            raise KeyError(f"targets has no target for {len(missing)} of the {len(keys)} keys, {missing[0]!r} first")
        targets = [targets[k] for k in keys]
    elif _indexed_by_key(targets):
        targets = _by_key(targets, keys)
    elif hasattr(targets, "detach"):  # a torch tensor
        targets = targets.detach().cpu().numpy()
    if not isinstance(targets, collections.abc.Collection) or isinstance(targets, (str, bytes)):
        raise TypeError(f"targets must be one per item, in a mapping or a sequence, not {type(targets).__name__}")
    if len(targets) != len(keys):
        raise ValueError(f"{len(targets)} targets for {len(keys)} items")
    if lengths is not None and [np.shape(t)[:1] for t in targets] == [(n,) for n in lengths.tolist()]:
        parts = [_numbers(t) for t in targets]  # a label per residue
        if len({p.shape[1:] for p in parts}) > 1:
            raise ValueError("per-residue targets differ in shape past their first dimension")
        offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return ResidueTargets(np.concatenate(parts) if parts else np.zeros(0), offsets)
    try:
        array = np.asarray(targets)
    except ValueError:  # numpy: "inhomogeneous shape"
        residues = (
            " (of per-residue records, or one per residue: as many as its record's rows)" if lengths is not None else ""
        )
        raise ValueError(
            f"targets differ in shape: one number, or one array of a shape all share, per item{residues}"
        ) from None
    return _numbers(array)


def _indexed_by_key(targets: Any) -> bool:
    """Whether ``targets`` is a pandas Series or DataFrame whose index holds keys (labels read with
    ``index_col="id"``), not numbers (whose rows are taken in order, as an array's)."""
    index: Any = getattr(targets, "index", None)
    if not (hasattr(targets, "to_numpy") and hasattr(index, "get_indexer")):
        return False
    if index.inferred_type in ("integer", "empty"):
        return False
    if index.inferred_type not in ("string", "unicode"):
        raise TypeError(
            f"targets' index holds {index.inferred_type} values: index the targets by key (str), or by number "
            "to take them in order"
        )
    return True


def _by_key(targets: Any, keys: Collection[str]) -> np.ndarray:
    """The rows of ``targets`` (indexed by key) for ``keys``, in their order."""
    index = targets.index
    if not index.is_unique:
        twice = index[index.duplicated()][0]
        raise ValueError(f"targets' index holds {twice!r} more than once: one target per key")
    rows = index.get_indexer(list(keys))
    if (rows < 0).any():
        first = list(keys)[int(np.flatnonzero(rows < 0)[0])]
        raise KeyError(f"targets has no target for {int((rows < 0).sum())} of the {len(keys)} keys, {first!r} first")
    return np.asarray(targets.to_numpy()[rows])


def _numbers(target: Any) -> np.ndarray:
    array = target.detach().cpu().numpy() if hasattr(target, "detach") else np.asarray(target)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"targets must be numbers, one (or one array of them) per item, not {array.dtype}")
    return array


@dataclasses.dataclass(frozen=True)
class EpochOptions:
    """How one epoch is read: its order, this reader's share of it, and the shape of its batches.

    Checked when made, so a bad option fails where it is given, not in a loader worker.

    Attributes
    ----------
    batch_size : int or None
        Records per batch (default 100; the last batch of a share may be shorter, unless ``drop_last``).  With
        a ``token_budget``, at most this many records in a batch (default: as many as the budget holds), as
        fairseq's ``--batch-size`` caps its ``--max-tokens`` batches.
    shuffle : bool
        Block-shuffle the order; without it, row order.
    seed : int
        With ``epoch``, all the order depends on (below 2**64).
    epoch : int
        The epoch's number (below 2**64): each epoch has its own order.
    block_size : int or None
        Consecutive rows read together; default about 1 MiB of records.
    buffer_blocks : int
        Shuffled blocks whose rows are mixed together (a window).
    rank : int
        This reader's part of the epoch, below ``world_size``.
    world_size : int
        Readers sharing the epoch: every record goes to one of them, once.
    drop_last : bool
        Give every rank the same number of whole batches (what DDP needs so that no rank waits).
    keys : bool
        Yield ``(keys, matrix)`` pairs; ``False`` yields matrices alone.
    unit : str
        Of a ragged dataset, ``"record"`` (a batch of records, padded) or ``"row"`` (a batch of rows, every
        row of every record once; the keys say whose).
    token_budget : int or None
        Of a ragged dataset read by record: batches of records of similar length, each at most this many
        padded rows (a longer record alone), instead of ``batch_size`` records each.
    pad : bool
        Of a ragged dataset read by record: batches padded, with a mask; ``False`` packs their rows with
        offsets.
    read : str
        How windows are read: ``"mapped"`` through the mapping (read ahead on a thread), ``"direct"`` with
        ``O_DIRECT`` reads into buffers of the epoch's own (the mapping where the file system refuses it),
        ``"auto"`` (default) direct when the records are not in the page cache and one reader reads the windows
        (not loader workers, which share the page cache).  The batches are the same.
    """

    batch_size: int | None = None
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0
    block_size: int | None = None
    buffer_blocks: int = BUFFER_BLOCKS
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False
    keys: bool = True
    unit: str = "record"
    token_budget: int | None = None
    pad: bool = True
    read: str = "auto"

    def __post_init__(self) -> None:
        size = DEFAULT_BATCH_SIZE if self.batch_size is None and self.token_budget is None else self.batch_size
        checked: dict[str, object] = {"batch_size": None if size is None else count(size, "batch_size", 1)}
        if self.read not in READS:
            raise ValueError(f"read must be one of {', '.join(map(repr, READS))}, not {self.read!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(map(repr, UNITS))}, not {self.unit!r}")
        if self.token_budget is not None:
            checked["token_budget"] = count(self.token_budget, "token_budget", 1)
            if self.unit == "row":
                raise ValueError('token_budget= batches records; unit="row" batches rows')
        for name in ("seed", "epoch"):
            if count(getattr(self, name), name) >= 1 << 64:
                raise ValueError("seed and epoch must fit in 64 bits")
        if self.block_size is not None:
            checked["block_size"] = count(self.block_size, "block_size", 1)
        checked["buffer_blocks"] = count(self.buffer_blocks, "buffer_blocks", 1)
        checked["world_size"] = world_size = count(self.world_size, "world_size", 1)
        if not count(self.rank, "rank") < world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        checked.update((name, bool(getattr(self, name))) for name in ("shuffle", "drop_last", "keys", "pad"))
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: the checked values replace the given ones


OPTIONS = tuple(f.name for f in dataclasses.fields(EpochOptions) if f.name != "batch_size")  # keyword options


class EpochPlan:
    """The order of one epoch over ``n`` rows, computed window by window (see the module).

    Costs ``O(n / block_size)`` memory for the block order; a window's rows are made when asked for.
    """

    def __init__(
        self,
        n: int,
        *,
        block_size: int,
        buffer_blocks: int = BUFFER_BLOCKS,
        seed: int = 0,
        epoch: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.n = count(n, "n")
        self.block_size = count(block_size, "block_size", 1)
        self.buffer_blocks = count(buffer_blocks, "buffer_blocks", 1)
        self.seed = count(seed, "seed")
        self.epoch = count(epoch, "epoch")
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
        self.window_starts: list[int] = np.concatenate([[0], np.cumsum(window_sizes)]).astype(np.int64).tolist()
        self._cached: tuple[int, np.ndarray | None] = (-1, None)

    @property
    def n_windows(self) -> int:
        return len(self.window_starts) - 1

    def window_blocks(self, w: int) -> np.ndarray:
        """The blocks of window ``w``, in the shuffled block order."""
        return self.blocks[w * self.buffer_blocks : (w + 1) * self.buffer_blocks]

    def window_rows(self, w: int) -> np.ndarray:
        """The rows of window ``w`` in epoch order (a new uint64 array; the last one is cached)."""
        cached_w, cached_rows = self._cached
        if cached_w == w and cached_rows is not None:
            return cached_rows
        blocks = self.window_blocks(w)
        rows: np.ndarray = (
            blocks[:, None] * np.uint64(self.block_size) + np.arange(self.block_size, dtype=np.uint64)
        ).ravel()
        if len(rows) > self.window_starts[w + 1] - self.window_starts[w]:
            rows = rows[rows < self.n]  # the window holding the short last block
        if self.shuffle:
            _core.shuffle(rows, _core.stream_seed(self.seed, self.epoch, w))
        self._cached = (w, rows)
        return rows

    def window_ranges(self, w: int) -> list[tuple[int, int]]:
        """Row ranges ``(lo, hi)`` of window ``w``'s blocks in file order, adjacent ones merged (what a
        reader of the window asks the disk for)."""
        blocks = np.sort(self.window_blocks(w)).astype(np.int64)
        if not len(blocks):
            return []
        ends = np.flatnonzero(np.diff(blocks) != 1)  # the last block of each run but the last run
        firsts = np.concatenate([blocks[:1], blocks[ends + 1]]) * self.block_size
        stops = np.minimum((np.concatenate([blocks[ends], blocks[-1:]]) + 1) * self.block_size, self.n)
        return list(zip(firsts.tolist(), stops.tolist()))

    def window_of(self, position: int) -> int:
        """The window holding epoch position ``position`` (< n)."""
        w = self._cached[0]
        if w >= 0 and self.window_starts[w] <= position < self.window_starts[w + 1]:
            return w
        return bisect.bisect_right(self.window_starts, position) - 1

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The rows at epoch positions ``[start, stop)``, as a uint64 array (read-only use)."""
        parts = []
        while start < stop:
            w = self.window_of(start)
            first, end = self.window_starts[w], min(stop, self.window_starts[w + 1])
            parts.append(self.window_rows(w)[start - first : end - first])
            start = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty(0, np.uint64)])

    def order(self) -> np.ndarray:
        """The whole epoch's rows in order (``O(n)`` memory: for measuring and testing)."""
        return self.rows(0, self.n) if self.n else np.empty(0, np.uint64)


def rank_share(n: int, rank: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of the epoch that ``rank`` of ``world_size`` reads.

    Without ``drop_last`` the shares tile ``[0, n)`` and differ in size by at most one; with it, every
    rank gets the same number of whole batches.
    """
    if drop_last:
        per = n // world_size
        lo = rank * per
        return lo, lo + per // batch_size * batch_size
    return rank * n // world_size, (rank + 1) * n // world_size


class Rows(Protocol):
    """What an epoch reads from: a dataset's rows, their keys and where they are mapped."""

    dim: int
    dtype: np.dtype

    @property
    def ragged(self) -> bool: ...
    def __len__(self) -> int: ...
    def keys_at(self, rows: np.ndarray) -> list[str]: ...
    def lengths(self) -> np.ndarray: ...
    def _gather_ragged(self, records: np.ndarray, pad: bool) -> tuple[np.ndarray, np.ndarray]: ...
    def _epoch_reads(self) -> tuple[Layout, Fetch | None]: ...
    def _direct_parts(self) -> list[tuple[str, int, int, int]]: ...
    def _require_attached(self) -> None: ...


Fetch = Callable[[Sequence[tuple[int, int]]], Callable[[], None]]
"""Fetches a window's record ranges ``(lo, hi)`` before they are read; returns what to call once they are read."""


class Fetches:
    """Windows fetched on a thread ahead of their reading, for a source whose records must be fetched before
    they are read (a dataset at a URL).  The window being read waits for its own fetch; the next ``ahead`` are
    fetched meanwhile, one after another.  A window is read once the reader waits for a later one, or closes."""

    def __init__(
        self, fetch: Fetch, ranges: Callable[[int], list[tuple[int, int]]], n_windows: int, ahead: int
    ) -> None:
        self._fetch, self._ranges, self._n_windows, self._ahead = fetch, ranges, n_windows, ahead  # windows to fetch
        self._pool: ThreadPoolExecutor | None = None  # started by the first wait
        self._futures: dict[int, Future[Callable[[], None]]] = {}
        self._fetched: dict[int, Callable[[], None]] = {}  # windows fetched: each one's call once it is read
        self.done = -1  # windows up to this one are fetched

    def wait(self, first: int, last: int) -> None:
        """Return once windows ``first`` to ``last`` are fetched (raising what their fetch raised), the next ones
        under way; windows before ``first`` are read, and those queued dropped (other workers' batches)."""
        for w in [w for w in self._futures if w < first]:
            _drop(self._futures.pop(w))
        for w in [w for w in self._fetched if w < first]:
            self._fetched.pop(w)()
        if last <= self.done:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="embfile-fetch")
        for w in range(max(first, self.done + 1), min(last + self._ahead, self._n_windows - 1) + 1):
            if w not in self._futures:
                self._futures[w] = self._pool.submit(self._fetch, self._ranges(w))
        for w in range(max(first, self.done + 1), last + 1):
            self._fetched[w] = self._futures.pop(w).result()
        self.done = last

    def close(self) -> None:
        """Stop fetching ahead (a fetch under way ends by itself), every window fetched counted read; a later
        :meth:`wait` starts again."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for future in self._futures.values():
            _drop(future)
        self._futures.clear()
        fetched, self._fetched = self._fetched, {}
        for read in fetched.values():
            read()


def _drop(future: Future[Callable[[], None]]) -> None:
    """Cancel a window's fetch, or, under way, count the window read once fetched."""
    if not future.cancel():
        future.add_done_callback(lambda f: f.exception() is None and f.result()())


def budget_cuts(
    lengths: np.ndarray, budget: int, most: int | None = None, tolerance: float = PADDING_TOLERANCE
) -> np.ndarray:
    """Where to cut records of ascending ``lengths`` into batches (each as long as its last record): the indices
    that start a new batch.  Greedily, a batch takes the next record unless it holds ``most`` records already,
    or its padded rows would then pass ``budget`` or its padding ``tolerance`` of the budget; so where lengths
    are dense batches fill the budget, and where they are sparse (the long tail) a batch stops a little short
    rather than pad."""
    cuts, start, useful = [], 0, 0
    most = most or len(lengths)
    for i, length in enumerate(lengths.tolist()):
        padded = (i - start + 1) * length
        if i > start and (i - start == most or padded > budget or padded - useful - length > tolerance * budget):
            cuts.append(i)
            start, useful, padded = i, 0, length
        useful += length
    return np.array(cuts, np.int64)


class BudgetBatches:
    """The batches of positions ``[lo, hi)`` of an epoch under a token budget (see the module): the part of
    each window in turn, its records sorted by length, cut by :func:`budget_cuts`, the batches shuffled.

    A window's batches are made when asked for (the last window's are kept); the count of batches before a
    window is known once every window before it was made.
    """

    def __init__(
        self, plan: EpochPlan, lengths: np.ndarray, lo: int, hi: int, budget: int, most: int | None = None
    ) -> None:
        self.plan, self.lengths, self.lo, self.hi, self.budget, self.most = plan, lengths, lo, hi, budget, most
        self.windows = range(plan.window_of(lo), plan.window_of(hi - 1) + 1) if lo < hi else range(0)
        self._firsts = [0]  # the number of batches before each window made so far
        self._cached: tuple[int, list[np.ndarray]] = (-1, [])

    def window(self, i: int) -> list[np.ndarray]:
        """The batches of the ``i``-th window of the share, in the order they are read (rows, uint64)."""
        if self._cached[0] == i:
            return self._cached[1]
        w, starts = self.windows[i], self.plan.window_starts
        rows = self.plan.rows(max(self.lo, starts[w]), min(self.hi, starts[w + 1]))
        rows = rows[np.argsort(self.lengths[rows], kind="stable")]
        batches = np.split(rows, budget_cuts(self.lengths[rows], self.budget, self.most))
        order = np.arange(len(batches), dtype=np.uint64)
        if self.plan.shuffle:
            _core.shuffle(order, _core.stream_seed(self.plan.seed, self.plan.epoch, _BUDGET_STREAM + w))
        self._cached = (i, [batches[k] for k in order.tolist()])
        return self._cached[1]

    def _counted(self, i: int) -> None:
        while len(self._firsts) <= i + 1 and len(self._firsts) <= len(self.windows):
            self._firsts.append(self._firsts[-1] + len(self.window(len(self._firsts) - 1)))

    def batch(self, j: int) -> tuple[int, np.ndarray] | None:
        """The window of batch ``j`` and its rows, or None past the last."""
        i = bisect.bisect_right(self._firsts, j) - 1
        while i < len(self.windows):
            self._counted(i)
            if j < self._firsts[i + 1]:
                return self.windows[i], self.window(i)[j - self._firsts[i]]
            i += 1
        return None

    def __len__(self) -> int:
        self._counted(len(self.windows) - 1)
        return self._firsts[-1]


class Batches:
    """An iterator over the batches of one epoch for one rank (see :meth:`embfile.Dataset.iter_batches`).

    Yields ``(keys, matrix)`` (or ``matrix`` with ``keys=False``), ``matrix`` a new ``(b, dim)`` array,
    each passed through ``transform`` if one is given; of ragged records ``(keys, padded, mask)`` (or
    ``(keys, rows, offsets)`` without ``pad``).  ``worker`` and ``num_workers`` let several copies
    of the iterator (loader workers) each take every ``num_workers``-th batch of the same sequence;
    ``start`` skips that many records of the rank's share (a resume point; under a token budget, batches).
    ``read_ahead`` windows are read ahead on a thread (0: none, the gather faults pages in itself).
    ``out(rows)``, if given, returns the ``(rows, dim)`` array a fixed-width batch is gathered into (None:
    a new one), for a loader that hands batches over in buffers of its own.  ``targets``, one per record
    (or one per residue; from ``aligned_targets``), adds each batch's targets after its vectors, batched as
    they are.

    ``state_dict()`` gives the position reached; ``load_state_dict(state)`` on an iterator made with the
    same options continues from it, with exactly the records not yet yielded.
    """

    _reader: ReadAhead | None = None  # the read-ahead thread, started by the first batch
    _direct: DirectWindows | None = None  # or the O_DIRECT reader of a cold epoch
    _fetches: Fetches | None = None  # or, at a URL, the windows' records fetched ahead

    def __init__(
        self,
        source: Rows,
        options: EpochOptions,
        *,
        transform: Callable[[Any], Any] | None = None,
        worker: int = 0,
        num_workers: int = 1,
        start: int = 0,
        read_ahead: int = 1,
        out: Callable[[int], np.ndarray | None] | None = None,
        targets: np.ndarray | ResidueTargets | None = None,
    ) -> None:
        num_workers = count(num_workers, "num_workers", 1)
        if not count(worker, "worker") < num_workers:
            raise ValueError(f"worker {worker} is not below num_workers {num_workers}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, not {type(transform).__name__}")
        self.options = options
        self.batch_size = options.batch_size or 0  # (under a token budget, a batch's most records; 0: no most)
        self._source = source
        self._layout, fetch = source._epoch_reads()
        ragged = source.ragged
        if not ragged and options.token_budget is not None:
            raise ValueError("token_budget= batches ragged records; this dataset has one row per record")
        self._by_row = ragged and options.unit == "row"
        if isinstance(targets, np.ndarray) and self._by_row:
            raise ValueError("targets= here are one per record; unit='row' batches rows: give one per residue")
        self._targets = targets
        lengths = source.lengths() if ragged else None
        self._row_of = np.concatenate([[0], np.cumsum(lengths)]) if lengths is not None else None  # record: row
        n = int(self._row_of[-1]) if self._row_of is not None and self._by_row else len(source)
        mean_rows = 1 if self._by_row or lengths is None else max(1, int(lengths.mean())) if len(lengths) else 1
        block_size = options.block_size or default_block_size(self._layout.record_bytes * mean_rows)
        budget = options.token_budget
        buffer_blocks = options.buffer_blocks
        if budget is not None:  # records sorted by length within a window pad little only if it holds many batches
            buffer_blocks = max(buffer_blocks, -(-WINDOW_BUDGETS * budget // (block_size * mean_rows)))
        self.plan = EpochPlan(
            n,
            block_size=block_size,
            buffer_blocks=buffer_blocks,
            seed=options.seed,
            epoch=options.epoch,
            shuffle=options.shuffle,
        )
        self._lo, self._hi = rank_share(
            self.plan.n, options.rank, options.world_size, self.batch_size, options.drop_last and budget is None
        )
        self._budget: BudgetBatches | None = None
        if budget is not None and lengths is not None:
            self._budget = BudgetBatches(self.plan, lengths, self._lo, self._hi, budget, options.batch_size)
            shares = [rank_share(n, r, options.world_size, 1, False) for r in range(options.world_size)]
            self._n_batches = (  # with drop_last, as many batches as the rank with the fewest
                min(len(BudgetBatches(self.plan, lengths, a, b, budget, options.batch_size)) for a, b in shares)
                if options.drop_last
                else None
            )
        self._transform = transform
        self._out = out
        self._worker, self._num_workers = worker, num_workers
        self._read_ahead = count(read_ahead, "read_ahead")
        self._window_layout: Layout | None = None  # of the direct path: the window being read
        one_reader = num_workers == 1 and self._read_ahead > 0
        if fetch is not None:  # read through the mapping of the partial copies, once fetched
            last = self.plan.window_of(self._hi - 1) if self._hi > self._lo else -1  # of this rank's share
            self._fetches = Fetches(fetch, self._record_ranges, last + 1, max(self._read_ahead, 1))
        elif options.read == "direct" or (options.read == "auto" and one_reader and not self._layout.cached()):
            try:
                self._direct = DirectWindows(source._direct_parts(), self._layout.record_bytes)
            except OSError:
                pass  # O_DIRECT refused here: the mapped path
        self._window = -1  # the window being read
        self._hinted = self._asked = -1  # windows up to these have been asked for / mapped in
        self._pos = 0  # records of this rank's share yielded (by all workers, up to this one's next)
        self.load_state_dict({**self._config(), "position": start})

    @property
    def share(self) -> int:
        """Records of the epoch this rank reads."""
        return self._hi - self._lo

    def __iter__(self) -> Batches:
        return self

    @property
    def n_batches(self) -> int:
        """Under a token budget, the batches of this rank's epoch."""
        assert self._budget is not None
        if self._n_batches is None:
            self._n_batches = len(self._budget)
        return self._n_batches

    def __len__(self) -> int:
        """Batches this iterator still yields."""
        if self._budget is not None:
            first = self._pos + self._worker
            return -(-(self.n_batches - first) // self._num_workers) if first < self.n_batches else 0
        first = self._lo + self._pos + self._worker * self.batch_size
        left = -(-(self._hi - first) // self.batch_size) if first < self._hi else 0
        return -(-left // self._num_workers)

    def __next__(self) -> Any:
        if self._budget is not None:
            j = self._pos + self._worker
            found = self._budget.batch(j) if j < self.n_batches else None
            window, rows = found if found is not None else (-1, None)
            step = self._num_workers
        else:
            start = self._lo + self._pos + self._worker * self.batch_size
            stop = min(start + self.batch_size, self._hi)
            window, rows = (self.plan.window_of(start), None) if start < self._hi else (-1, None)
            step = self._num_workers * self.batch_size
        if window < 0:
            self.close()
            raise StopIteration
        try:
            self._source._require_attached()
        except errors.ClosedFileError:
            self.close()
            raise
        if self._fetches is not None:
            self._fetched(window, window if rows is not None else self.plan.window_of(stop - 1))
        self._enter(window)
        if self._direct is not None:  # the rows of the batch's windows (it may run into the next ones)
            last = window if rows is not None else self.plan.window_of(stop - 1)
            for w in range(window, last + 1):
                self._direct.start(w, self._ranges(w))
            self._window_layout = self._direct.layout(range(window, last + 1))
        if rows is None:
            rows = self.plan.rows(start, stop)
        self._pos += step
        batch = self._read(rows)
        return self._transform(batch) if self._transform is not None else batch

    def _read(self, rows: np.ndarray) -> Any:
        """The batch of ``rows`` (epoch items: records, or of ``unit="row"`` rows), with their keys."""
        keys = self._source.keys_at(rows) if self.options.keys and not self._by_row else None
        if self._row_of is not None and not self._by_row:  # ragged records
            data: tuple[np.ndarray, ...] = (
                self._source._gather_ragged(rows, self.options.pad)
                if self._window_layout is None
                else self._gather_ragged_window(rows)
            )
        else:
            given = self._out(len(rows)) if self._out is not None else None
            matrix = np.empty((len(rows), self._source.dim), self._source.dtype) if given is None else given
            (self._window_layout or self._layout).gather(rows, matrix)
            data = (matrix,)
        if self.options.keys and self._by_row:  # the key of each row's record
            assert self._row_of is not None
            keys = self._source.keys_at((np.searchsorted(self._row_of, rows, "right") - 1).astype(np.uint64))
        if isinstance(self._targets, ResidueTargets):
            by_row = self._targets.values[rows] if self._by_row else self._targets.batch(rows, self.options.pad)
            data = (*data, by_row)
        elif self._targets is not None:
            data = (*data, self._targets[rows])
        if keys is not None:
            return (keys, *data)
        return data if len(data) > 1 else data[0]

    def _gather_ragged_window(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ragged records from the direct path's window buffers, as the dataset's own ragged gather gives them:
        padded with zeros and a mask, or packed with int64 offsets."""
        assert self._row_of is not None and self._window_layout is not None
        first = self._row_of[records]
        length = self._row_of[records + 1] - first
        offsets = np.zeros(len(records) + 1, np.int64)
        np.cumsum(length, out=offsets[1:])
        rows = (np.repeat(first - offsets[:-1], length) + np.arange(offsets[-1])).astype(np.uint64)
        packed = np.empty((offsets[-1], self._source.dim), self._source.dtype)
        self._window_layout.gather(rows, packed)
        if not self.options.pad:
            return packed, offsets
        longest = int(length.max()) if len(records) else 0
        mask = np.arange(longest, dtype=np.uint64) < length.astype(np.uint64)[:, None]
        out = np.zeros((len(records), longest, self._source.dim), self._source.dtype)
        out[mask] = packed
        return out, mask

    def _fetched(self, first: int, last: int) -> None:
        """Have windows ``first`` to ``last`` fetched (see :class:`Fetches`); if the source's files became whole
        meanwhile (a download), read those instead from now on."""
        assert self._fetches is not None
        if last > self._fetches.done:
            self._layout, fetch = self._source._epoch_reads()
            if fetch is None:
                self._fetches.close()
                self._fetches = None
                return
            self._fetches.wait(first, last)

    def _record_ranges(self, w: int) -> list[tuple[int, int]]:
        """Record ranges ``(lo, hi)`` of window ``w`` (of ``unit="row"``, the records holding its rows)."""
        ranges = self.plan.window_ranges(w)
        if not self._by_row:
            return ranges
        assert self._row_of is not None
        lo, hi = np.array(ranges, np.int64).reshape(-1, 2).T
        first = np.searchsorted(self._row_of, lo, "right") - 1
        end = np.searchsorted(self._row_of, hi, "left")
        return list(zip(first.tolist(), end.tolist()))

    def _enter(self, w: int) -> None:
        """Start on window ``w``: release the one before; have the reader ask the kernel for the windows
        up to ``read_ahead + 1`` ahead and map in those up to ``read_ahead`` ahead (so the disk always
        has the next window queued while one is being mapped).  ``read_ahead=0``: none of this (a file in
        the page cache, read by several loader workers, each of which would map and unmap every window)."""
        if w == self._window or self._read_ahead == 0 or self._fetches is not None:
            self._window = w
            return
        if self._direct is not None:
            for done in [d for d in self._direct.windows if d < w]:
                self._direct.release(done)
            self._window = w
            for ahead in range(w, min(w + self._read_ahead, self.plan.n_windows - 1) + 1):
                self._direct.start(ahead, self._ranges(ahead))
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

    def _ranges(self, w: int) -> list[tuple[int, int]]:
        """Row ranges ``(lo, hi)`` of window ``w``'s blocks in file order, adjacent ones merged."""
        ranges = self.plan.window_ranges(w)
        if self._row_of is not None and not self._by_row:  # ragged records: their rows
            return [(int(self._row_of[lo]), int(self._row_of[hi])) for lo, hi in ranges]
        return ranges

    def close(self, wait: bool = True) -> None:
        """Stop the read-ahead thread and release the pages this iterator mapped.
        (Runs by itself at the end of the epoch and when the iterator is collected.)"""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        if self._fetches is not None:
            self._fetches.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            for w in range(max(self._window, 0), self._asked + 1):  # the current and mapped-ahead windows
                reader.release(self._ranges(w))
            reader.stop(wait)

    def __del__(self) -> None:
        self.close(wait=False)

    def state_dict(self) -> dict[str, Any]:
        """Where this iterator is, as a dict of ints and bools (JSON-friendly)."""
        if self._num_workers != 1:
            raise ValueError(
                "with several workers the loader knows the position: "
                "use embfile.torch.IterableDataset.state_dict(batches_seen)"
            )
        return {**self._config(), "position": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of an iterator made the same way)."""
        check_state(state, self._config(), "iterator")
        position = count(state["position"], "position")
        if self._budget is not None and position > self.n_batches:
            raise ValueError(f"position {position} is past this rank's {self.n_batches} batches")
        if self._budget is None and position > self.share:
            raise ValueError(f"position {position} is past this rank's {self.share} records")
        self._pos = position

    def _config(self) -> dict[str, Any]:
        o = self.options
        return {
            **order_config(self.plan, o),
            **({"unit": o.unit} if self._by_row else {}),
            **({"token_budget": o.token_budget, "batch_size": o.batch_size} if self._budget is not None else {}),
        }


def order_config(plan: EpochPlan, options: EpochOptions) -> dict[str, Any]:
    """What fixes an epoch's order and a rank's share of it: a saved position means the same records only
    where all of these are the same."""
    return {
        "records": plan.n,
        "seed": plan.seed,
        "epoch": plan.epoch,
        "shuffle": plan.shuffle,
        "block_size": plan.block_size,
        "buffer_blocks": plan.buffer_blocks,
        "rank": options.rank,
        "world_size": options.world_size,
        "drop_last": options.drop_last,
    }


def check_state(state: dict[str, Any], want: dict[str, Any], holder: str) -> None:
    """ValueError naming the first setting ``state`` was saved with that the ``holder`` resuming it lacks."""
    for name, value in want.items():
        if state.get(name) != value:
            raise ValueError(f"state was saved with {name}={state.get(name)!r}, this {holder} has {name}={value!r}")


def shuffle_quality(order: np.ndarray, block_size: int | None = None) -> dict[str, float]:
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
