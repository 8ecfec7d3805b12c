"""PyTorch adapters (``pip install "embfile[torch]"``): a map-style ``Dataset`` and its ``BatchSampler``, an
``IterableDataset`` of block-shuffled batches, and :func:`collate`, which pads per-residue records into a
batch with a mask.

Both take a path (a file or a sharded folder) or an open dataset.  Datasets pickle by path, so these work
in DataLoader workers under ``fork`` and ``spawn`` alike.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import mmap
import os
import sys
import warnings
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.utils.data

import embfile
from embfile._handover import Buffers, each_tensor, worker_buffers
from embfile._keys import key_list
from embfile._pages import WindowReader
from embfile.epochs import (
    OPTIONS,
    Batches,
    EpochOptions,
    EpochPlan,
    ResidueTargets,
    aligned_targets,
    check_state,
    count,
    default_block_size,
    order_config,
    rank_share,
    refuse_unknown,
)

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | embfile.Dataset


def _dataset(source: Source) -> embfile.Dataset:
    return source if isinstance(source, embfile.Dataset) else embfile.open(source)


def tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(array)``, sharing memory; a bfloat16 array, which torch cannot take from numpy, by
    its bits."""
    if array.dtype.kind == "V" and array.dtype.name == "bfloat16":  # kind first: name is slow, this is per batch
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def collate(items: Sequence[Any]) -> Any:
    """A DataLoader batch of items: stacked (items that are the rows of one batch, as :class:`Dataset` gives
    them, as that batch, not copied), or of per-residue ``(length, dim)`` items a zero-padded ``(batch,
    longest, dim)`` tensor and a boolean ``(batch, longest)`` mask of the real rows; of ``(item, target)``
    pairs, that batch and then the targets stacked.  What is not a sequence of items of one shape's rank, one
    or two, is a batch already (the item of a DataLoader without a ``batch_size``, from a batch sampler or
    :class:`IterableDataset`), and is passed on as it is.  In a DataLoader worker, the batch goes to the main
    process through the worker's reused shared-memory buffers."""
    batch = _stacked(items)
    buffers = worker_buffers()
    return buffers.hand_over(batch) if buffers is not None else batch


def _stacked(items: Sequence[Any]) -> Any:
    if isinstance(items, _Batch):
        return items.batch
    if _with_targets(items):
        xs, ys = zip(*items)
        batch = _stacked(list(xs))
        targets = _zero_padded(ys) if len({y.shape for y in ys}) > 1 else torch.stack(ys)  # per residue: padded
        return (*batch, targets) if isinstance(batch, tuple) else (batch, targets)
    if not _items(items):
        return items
    if items[0].dim() == 1:
        batch = _rows_of_one(items)
        return torch.stack(list(items)) if batch is None else batch
    out = _zero_padded(items)
    return out, torch.arange(out.shape[1]) < torch.tensor([len(t) for t in items])[:, None]


def _zero_padded(items: Sequence[torch.Tensor]) -> torch.Tensor:
    """``items`` of different lengths, one after another in a batch, zeros past each one's end."""
    out = items[0].new_zeros((len(items), max(len(t) for t in items), *items[0].shape[1:]))
    for i, t in enumerate(items):
        out[i, : len(t)] = t
    return out


def _with_targets(batch: Any) -> bool:
    """Whether ``batch`` is ``(item, target)`` pairs, as a :class:`Dataset` with targets gives its items."""
    return (
        isinstance(batch, (list, tuple))
        and len(batch) > 0
        and all(isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], torch.Tensor) for t in batch)
        and _items([t[0] for t in batch])
    )


def _items(batch: Any) -> bool:
    """Whether ``batch`` is items for :func:`collate` to batch: tensors of one or two dimensions, all alike."""
    if not isinstance(batch, (list, tuple)):
        return False
    ranks = {t.dim() if isinstance(t, torch.Tensor) else -1 for t in batch}
    return ranks == {1} or ranks == {2}


def _rows_of_one(items: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 2-d tensor whose rows ``items`` are, in order, if they are."""
    base = items[0]._base if items else None
    if base is None or base.dim() != 2 or len(base) != len(items) or base.dtype != items[0].dtype:
        return None
    stride = base.stride(0) * base.element_size()
    first = base.data_ptr()
    if all(t._base is base and t.data_ptr() == first + i * stride for i, t in enumerate(items)):
        return base
    return None


class Dataset(torch.utils.data.Dataset):
    """Item ``i`` is the vector at row ``i``, or of ``keys[i]`` when ``keys`` is given, as a tensor (of a
    ragged dataset, the record's ``(length, dim)`` rows: batch them with ``collate_fn=embfile.torch.collate``).

    With ``targets`` (the labels to train on: one number, or one array of a shape all share, per item, in the
    items' order or as a mapping from key), item ``i`` is ``(x, target)`` and a batch ``(x, targets)`` (of a
    ragged dataset ``(padded, mask, targets)``).

    A DataLoader's batch is fetched with one native gather (``__getitems__``; pass
    ``collate_fn=embfile.torch.collate`` to use it as it is).  Given a list of indices, as a DataLoader does
    with ``batch_size=None, sampler=BatchSampler(...)``, the item is that batch itself, with no per-row step at
    all.  Single items are copied out of the read-only mapping (a tensor over it could not be written safely);
    batches come from a new array, or in a DataLoader worker from one of its shared buffers.
    """

    _ahead: tuple[int, WindowReader] | None = None  # this process's read-ahead thread and its pid

    def __init__(self, source: Source, keys: Sequence[str] | None = None, targets: Any = None) -> None:
        self.store = _dataset(source)
        self.keys = None if keys is None else key_list(keys, "Dataset(keys=)")
        # the keys' rows, looked up once (a missing key fails here, naming it, not in a worker)
        self._key_rows = None if self.keys is None else self.store.rows(self.keys)
        self.targets = None
        if targets is not None:
            lengths = self.store.lengths(self.keys) if self.store.ragged else None
            self.targets = aligned_targets(targets, self.keys or self.store.keys(), lengths)
        # the items in the file's order (None: they are in it), for BatchSampler's blocks, and their rows
        self._file_order: np.ndarray | None = None
        self._rows_in_file_order = self._key_rows
        if self._key_rows is not None and not bool(np.all(np.diff(self._key_rows) > 0)):
            self._file_order = np.argsort(self._key_rows, kind="stable")
            self._rows_in_file_order = self._key_rows[self._file_order]
        self._runs_of_file = self._rows_in_file_order is None or _runs_of_file(self._rows_in_file_order)

    def __len__(self) -> int:
        return len(self.keys) if self.keys is not None else len(self.store)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ahead": None}  # a thread stays in its process

    def _rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        return indices if self._key_rows is None else self._key_rows[indices]

    def __getitem__(self, index: int | Sequence[int] | np.ndarray) -> Any:
        if isinstance(index, (int, np.integer)):
            return self._items([index], None)[0]
        return collate(self._items(index, collate))

    def __getitems__(self, indices: Sequence[int] | np.ndarray) -> list[Any]:
        return self._items(indices, _collate_fn(sys._getframe(1)))

    def _items(self, indices: Sequence[int] | np.ndarray, collate_fn: Any) -> list[Any]:
        """The items of ``indices``, for ``collate_fn`` to batch; for :func:`collate`, the batch whole, with no
        item made."""
        whole = collate_fn is collate
        indices = self._in_range(indices)
        targets = self._targets(np.asarray(indices), whole)
        if self.store.ragged:
            if whole:  # padded in one native gather, as collate would pad the records
                return _Batch((*self._padded(indices), *targets))
            rows, offsets = self.store.take(self._rows(indices), pad=False)
            if collate_fn is torch.utils.data.default_collate and len(set(np.diff(offsets).tolist())) > 1:
                raise TypeError(
                    "per-residue records of different lengths do not stack: pass collate_fn=embfile.torch.collate "
                    "to the DataLoader (it pads them and gives the mask)"
                )
            items = [tensor(rows[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
            return list(zip(items, *targets)) if targets else items
        batch = self._gather(indices)
        if not targets:
            return _Batch(batch, () if whole else batch.unbind(0))
        return _Batch((batch, *targets), () if whole else zip(batch.unbind(0), *targets))

    def _in_range(self, indices: Sequence[int] | np.ndarray) -> Sequence[int] | np.ndarray:
        """``indices``, a negative one counted from the end as Python counts; one out of range an IndexError."""
        if isinstance(indices, _BlockRows):  # BatchSampler's: in range by construction
            return indices
        try:
            at: np.ndarray | None = np.asarray(indices, np.int64)
        except ValueError:  # batches of different lengths
            at = None
        if at is None or at.ndim != 1:  # a DataLoader batching the batches of a batch sampler given as its sampler
            raise TypeError(
                "a batch of batches: a batch sampler gives whole batches, so give the DataLoader batch_size=None "
                "with sampler=BatchSampler(...), or batch_sampler=BatchSampler(...)"
            )
        n = len(self)
        if not len(at) or (at.min() >= 0 and at.max() < n):
            return at  # (converted once, for what follows)
        bad = at[(at < -n) | (at >= n)]
        if len(bad):
            raise IndexError(f"index {int(bad[0])} is out of range for {n} items")
        return np.where(at < 0, at + n, at)

    def _targets(self, items: np.ndarray, whole: bool) -> tuple[Any, ...]:
        """The targets of ``items``: none, or as a batch (``whole``), or as one tensor per item."""
        if self.targets is None:
            return ()
        if isinstance(self.targets, ResidueTargets):
            if whole:
                return (torch.from_numpy(self.targets.batch(items, pad=True)),)
            return ([torch.from_numpy(t) for t in self.targets.of(items)],)
        batch = torch.from_numpy(self.targets[items])
        return (batch,) if whole else (batch.unbind(0),)

    def _gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The ``(len(indices), dim)`` batch, gathered in a DataLoader worker straight into a shared buffer."""
        chunk, windows = self._windows(indices)
        rows = self.store._row_numbers(self._rows(indices))
        buffers = worker_buffers()
        out = buffers.array((len(rows), self.store.dim), self.store.dtype) if buffers is not None else None
        if out is None:
            out = np.empty((len(rows), self.store.dim), self.store.dtype)
        info = torch.utils.data.get_worker_info()  # a worker gathers one of num_workers shares of the epoch
        with self.store._reading(rows, windows) as layout:
            layout.gather_random(rows, out, chunk, info.num_workers if info is not None else 1)
        return tensor(out)

    def _padded(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-residue records of ``indices``, zero-padded, and the mask of their rows: gathered in a
        DataLoader worker straight into one of its shared buffers."""
        _, windows = self._windows(indices)
        rows = self.store._row_numbers(self._rows(indices))
        buffers = worker_buffers()
        out = None
        with self.store._reading(rows, windows):
            if buffers is not None and len(rows):
                longest = int(self.store._extents(rows)[1].max())
                out = buffers.array((len(rows), longest, self.store.dim), self.store.dtype)
            padded, mask = self.store._gather_ragged(rows, True, out)
        return tensor(padded), torch.from_numpy(mask)

    def _windows(self, indices: Sequence[int] | np.ndarray) -> tuple[int, tuple[str, ...]]:
        """Of a batch of :class:`BatchSampler`'s, which comes from a few blocks of the file (of a dataset of
        keys, if they cover at least every second row): the bytes of a block, read whole where not cached since
        the batches after it want the rest, and the names of its windows (at a URL, fetched as an epoch fetches
        them).  The first batch of a window also has the next window read ahead on a thread of this process (and
        at a URL held there for the batches of this process).  Of any other batch: ``0, ()``."""
        if not isinstance(indices, _BlockRows) or not self._runs_of_file:
            return 0, ()
        if indices.ahead:
            self._reader().windows([(name, self._row_ranges(positions)) for name, positions in indices.ahead])
        return _block_chunk(self.store), indices.windows

    def _row_ranges(self, positions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The rows spanned by each range of positions in the items' file order."""
        rows = self._rows_in_file_order
        if rows is None:
            return list(positions)
        return [(int(rows[lo]), int(rows[hi - 1]) + 1) for lo, hi in positions]

    def _reader(self) -> WindowReader:
        """This process's read-ahead thread, started on first use (a forked worker has its parent's object, not
        its thread), stopped when the dataset goes."""
        pid, reader = self._ahead or (-1, None)
        if reader is None or pid != os.getpid():
            reader = self.store._read_ahead()
            weakref.finalize(self, reader.stop, False)
            self._ahead = os.getpid(), reader
        return reader


def _runs_of_file(rows: np.ndarray) -> bool:
    """Whether these rows (of the items in file order) run through the file, at least every second row (so a
    block of the sampler's is a stretch of the file worth reading whole)."""
    return len(rows) < 2 or (bool(np.all(np.diff(rows) > 0)) and 2 * len(rows) >= int(rows[-1] - rows[0]) + 1)


def _block_chunk(store: embfile.Dataset) -> int:
    """The bytes of a default block of ``store``'s records, rounded up to whole pages."""
    record_bytes = store.dim * store.dtype.itemsize
    return -(-default_block_size(record_bytes) * record_bytes // mmap.PAGESIZE) * mmap.PAGESIZE


class _BlockRows(np.ndarray):
    """A batch of :class:`BatchSampler`: item numbers from a few blocks of the file, the names of its windows
    (``EPOCH:NUMBER``, alike in every process), and with the first batch of a window, the windows after it to
    read ahead (names, and ranges of positions in the items' file order): what the type says to
    :class:`Dataset`, in a worker too (all pickle with the array)."""

    windows: tuple[str, ...] = ()
    ahead: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        # as bytes, which pickle in a third of an array's time
        return _block_rows, (bytearray(np.ascontiguousarray(self, np.int64)), self.windows, self.ahead)


def _block_rows(
    rows: bytearray, windows: tuple[str, ...] = (), ahead: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
) -> _BlockRows:
    """A :class:`_BlockRows` back from its pickle (in the process that gathers it)."""
    out = np.frombuffer(rows, np.int64).view(_BlockRows)
    out.windows, out.ahead = windows, ahead
    return out


class BatchSampler(torch.utils.data.Sampler[np.ndarray]):
    """Batches of item numbers of a map-style :class:`Dataset`, in the block-shuffled order of
    :meth:`embfile.Dataset.iter_batches` (the same epoch for the same options), as numpy arrays.

    In the place of ``torch.utils.data.BatchSampler(RandomSampler(ds), ...)``::

        DataLoader(ds, batch_size=None, sampler=embfile.torch.BatchSampler(ds, 256, seed=0), num_workers=k)

    A batch is one gather of rows from one window of the file instead of rows from anywhere: a cold file is
    read in runs, and an index array crosses to a worker in one piece, not as 256 Python ints.  Options are
    those of :class:`~embfile.epochs.EpochOptions` that order an epoch (``seed``, ``epoch``, ``shuffle``,
    ``drop_last``, ``block_size``, ``buffer_blocks``, ``rank``, ``world_size``: ``torch.distributed``'s by
    default).  Over a Dataset made with ``keys``, blocks are runs of those keys in the file's order, whatever
    order they were given in; an embfile dataset (or its path) stands for every row of it.  Call
    :meth:`set_epoch` before each epoch; to resume, save ``sampler.state_dict(batches_seen)``, then
    ``load_state_dict(state)``.
    """

    def __init__(self, dataset: Dataset | Source, batch_size: int, **options: Any) -> None:
        ordering = {"seed", "epoch", "shuffle", "drop_last", "block_size", "buffer_blocks", "rank", "world_size"}
        refuse_unknown(options, ordering, "BatchSampler()")
        if not isinstance(dataset, Dataset):  # an embfile dataset or its path: the batches of its every row
            dataset = Dataset(dataset)
        self.batch_size = count(batch_size, "batch_size", 1)
        self.options = EpochOptions(batch_size, **_distributed(options))
        self._n, self._record_bytes = len(dataset), dataset.store.dim * dataset.store.dtype.itemsize
        self._file_order = dataset._file_order  # blocks are runs of the file, whatever order keys were given in
        self._start = 0
        self._plan()  # check the options here

    def _plan(self) -> tuple[EpochPlan, int, int]:
        o = self.options
        block_size = o.block_size or default_block_size(self._record_bytes)
        plan = EpochPlan(
            self._n, block_size=block_size, buffer_blocks=o.buffer_blocks, seed=o.seed, epoch=o.epoch, shuffle=o.shuffle
        )
        return plan, *rank_share(self._n, o.rank, o.world_size, self.batch_size, o.drop_last)

    def set_epoch(self, epoch: int) -> None:
        """Order epoch ``epoch`` next, from its start."""
        self.options = dataclasses.replace(self.options, epoch=count(epoch, "epoch"))
        self._start = 0

    def __len__(self) -> int:
        _, lo, hi = self._plan()
        return -(-max(0, hi - lo - self._start) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        plan, lo, hi = self._plan()
        epoch = f"{zlib.crc32(repr(self._config()).encode()):08x}"  # names this epoch's windows in any process
        asked, due = -1, lo + self._start  # windows up to ``asked`` are read ahead; a batch reaching ``due`` asks
        for first in range(lo + self._start, hi, self.batch_size):
            stop = min(first + self.batch_size, hi)
            positions = plan.rows(first, stop)
            items = positions if self._file_order is None else self._file_order[positions]
            rows = items.astype(np.int64).view(_BlockRows)
            rows.windows = tuple(f"{epoch}:{w}" for w in range(plan.window_of(first), plan.window_of(stop - 1) + 1))
            if stop > due:  # the batch enters a window: the one after it is read ahead (first, this one too)
                ahead = range(max(asked + 1, plan.window_of(first)), min(plan.window_of(stop - 1) + 2, plan.n_windows))
                rows.ahead = tuple((f"{epoch}:{w}", tuple(plan.window_ranges(w))) for w in ahead)
                asked = max(asked, ahead.stop - 1)
                due = plan.window_starts[asked] if asked < plan.n_windows - 1 else hi
            yield rows

    def state_dict(self, batches_seen: int) -> dict[str, Any]:
        """The resume point after the loader yielded ``batches_seen`` batches of this pass."""
        _, lo, hi = self._plan()
        position = min(self._start + count(batches_seen, "batches_seen") * self.batch_size, hi - lo)
        return {**self._config(), "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`state_dict` of a sampler made the same way) on the next pass."""
        self.options = dataclasses.replace(self.options, epoch=count(state["epoch"], "epoch"))
        check_state(state, self._config(), "sampler")
        self._start = count(state["position"], "position")

    def _config(self) -> dict[str, Any]:
        return {**order_config(self._plan()[0], self.options), "batch_size": self.batch_size}


def _distributed(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``rank`` and ``world_size`` taken from ``torch.distributed`` where not given."""
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    if options.get("rank") is None:
        options = {**options, "rank": torch.distributed.get_rank() if ddp else 0}
    if options.get("world_size") is None:
        options = {**options, "world_size": torch.distributed.get_world_size() if ddp else 1}
    return options


class _Batch(list[Any]):
    """A batch gathered whole, which :func:`collate` takes back as it is, with its items (rows any collate can
    stack), or none when it goes to :func:`collate`."""

    def __init__(self, batch: Any, items: Iterable[Any] = ()) -> None:
        super().__init__(items)
        self.batch = batch


def _collate_fn(caller: FrameType) -> Any:
    """The collate function of ``caller``, the frame that asked :meth:`Dataset.__getitems__` for a batch, if it
    is a DataLoader's fetcher.  One passing the batch straight to :func:`collate` gets it whole: a tensor per row
    is as costly to make as the gather of the whole batch, and :func:`collate` would throw them away (of
    per-residue records, pad them in Python); any other collate, or a caller not recognised, gets them."""
    return getattr(caller.f_locals.get("self"), "collate_fn", None)


class IterableDataset(torch.utils.data.IterableDataset):
    """Block-shuffled batches of one epoch (:meth:`embfile.Dataset.iter_batches`) as tensors.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: each worker takes every k-th batch of the
    rank's sequence, so the loader yields the same batches in the same order for any ``k``.  ``rank`` and
    ``world_size`` default to ``torch.distributed``'s when it is initialised; the other options are those
    of :class:`~embfile.epochs.EpochOptions` (``keys`` defaults to False here).  Yields tensors sharing
    memory with the new batch arrays (``(keys, tensor)`` with ``keys=True``; of ragged records
    ``(padded, mask)`` or, under ``pad=False``, ``(rows, offsets)``; with ``targets``, one per record as a
    mapping from key or in row order, the batch's targets last), passed through ``transform`` if given.

    Call :meth:`set_epoch` before each epoch.  To resume, save ``ds.state_dict(batches_seen)`` and call
    ``ds.load_state_dict(state)`` on a dataset made the same way before iterating again.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        targets: Any = None,
        **options: Any,
    ) -> None:
        refuse_unknown(options, OPTIONS, f"{type(self).__name__}()")
        self.store = _dataset(source)
        self.options = EpochOptions(batch_size, **{"keys": False, **_distributed(options)})
        self.transform = transform
        lengths = self.store.lengths() if self.store.ragged and targets is not None else None
        self.targets = None if targets is None else aligned_targets(targets, self.store.keys(), lengths)
        self._start = 0
        self._batches()  # check the options here, not in a worker

    def _batches(self, worker: int = 0, num_workers: int = 1, buffers: Buffers | None = None) -> Batches:
        out, read_ahead = None, 1
        if buffers is not None:  # in a worker: gather each batch straight into a buffer for the main process
            shape, dtype = (self.store.dim,), self.store.dtype
            out = lambda rows: buffers.array((rows, *shape), dtype)
            read_ahead = 0 if self.store._epoch_reads()[0].cached() else 1  # warm: every worker would map each window
        return Batches(
            self.store,
            self.options,
            worker=worker,
            num_workers=num_workers,
            start=self._start,
            out=out,
            read_ahead=read_ahead,
            targets=self.targets,
        )

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next, from its start."""
        self.options = dataclasses.replace(self.options, epoch=count(epoch, "epoch"))
        self._start = 0

    def __len__(self) -> int:
        """Batches the next pass yields (for this rank)."""
        return len(self._batches())

    def __iter__(self) -> Iterator[Any]:
        fetcher = sys._getframe(1).f_locals.get("self")  # what asked for the first batch: a DataLoader's fetcher?
        if getattr(fetcher, "auto_collation", False):
            raise TypeError(
                "IterableDataset yields whole batches: give the DataLoader batch_size=None (it would stack "
                "batch_size of them into one)"
            )
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        buffers = worker_buffers()
        for batch in self._batches(worker, num_workers, buffers):
            batch = self._tensors(batch)
            if self.transform is not None:
                batch = self.transform(batch)
            yield buffers.hand_over(batch) if buffers is not None else batch

    def _tensors(self, batch: Any) -> Any:
        if isinstance(batch, tuple):  # keys, then one array or two (ragged)
            first = 1 if self.options.keys else 0
            return (*batch[:first], *(tensor(a) for a in batch[first:]))
        return tensor(batch)

    def state_dict(self, batches_seen: int) -> dict[str, Any]:
        """The resume point after the loader yielded ``batches_seen`` batches of this pass."""
        it = self._batches()
        if self.options.token_budget is not None:  # positions count batches
            position = min(self._start + count(batches_seen, "batches_seen"), it.n_batches)
            return {**it.state_dict(), "position": position}
        position = min(self._start + count(batches_seen, "batches_seen") * it.batch_size, it.share)
        return {**it.state_dict(), "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`state_dict`) on the next pass."""
        self.options = dataclasses.replace(self.options, epoch=state["epoch"])
        self._start = 0
        self._batches().load_state_dict(state)  # checks that the state fits these options
        self._start = state["position"]


class Loader:
    """The batches of :class:`IterableDataset` as a loader of their own, for training without DataLoader
    worker processes: what workers are otherwise there for is done here.  The batches are gathered on this
    thread (without the GIL, with windows read ahead on another); ``transform`` runs on ``threads`` threads,
    several batches at once and yielded in order (numpy and torch release the GIL); with ``pin_memory``
    each batch is copied to pinned memory on those threads too, and with ``device`` handed to it without
    waiting (``non_blocking``).  ``batch_size`` defaults to 256 records (with a ``token_budget``, to no cap);
    ``targets`` are as :class:`IterableDataset` takes them; the other options are those of
    :class:`~embfile.epochs.EpochOptions`.

    Exactly once, determinism, DDP ranks and resume are the dataset's: :meth:`state_dict` takes no count,
    since the loader knows how many batches it yielded.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        threads: int = 2,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
        **options: Any,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, not {type(transform).__name__}")
        if "num_workers" in options:
            raise TypeError(
                "Loader() starts no worker processes (threads= sets the threads its transform runs on); for "
                "workers, DataLoader(IterableDataset(...), batch_size=None, num_workers=k)"
            )
        refuse_unknown(options, (*OPTIONS, "targets"), "Loader()")
        if batch_size is None and options.get("token_budget") is None:
            batch_size = 256
        self.dataset = IterableDataset(source, batch_size, **options)
        self.transform, self.threads = transform, count(threads, "threads")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn(
                "pin_memory=True needs a CUDA device; none is available, so memory is not pinned", stacklevel=2
            )
            pin_memory = False
        self.pin_memory = pin_memory
        self.device = None if device is None else torch.device(device)
        self._seen = 0

    def __len__(self) -> int:
        """Batches the next pass yields (for this rank)."""
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next, from its start."""
        self.dataset.set_epoch(epoch)
        self._seen = 0

    def state_dict(self) -> dict[str, Any]:
        """The resume point after the batches this pass has yielded so far."""
        return self.dataset.state_dict(self._seen)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from :meth:`state_dict`) on the next pass."""
        self.dataset.load_state_dict(state)
        self._seen = 0

    def __iter__(self) -> Iterator[Any]:
        self._seen = 0
        batches = map(self.dataset._tensors, self.dataset._batches())
        pooled = self.threads and (self.transform is not None or self.pin_memory)
        prepared = self._prepared(batches) if pooled else map(self._prepare, batches)
        for batch in prepared:
            if self.device is not None:
                batch = each_tensor(batch, lambda t: t.to(self.device, non_blocking=self.pin_memory))
            self._seen += 1
            yield batch

    def _prepare(self, batch: Any) -> Any:
        if self.transform is not None:
            batch = self.transform(batch)
        return each_tensor(batch, torch.Tensor.pin_memory) if self.pin_memory else batch

    def _prepared(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``_prepare`` of each batch on the pool, ``threads + 1`` at a time, in order."""
        with concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="embfile-loader") as pool:
            pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
            try:
                for batch in batches:
                    pending.append(pool.submit(self._prepare, batch))
                    if len(pending) > self.threads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()
