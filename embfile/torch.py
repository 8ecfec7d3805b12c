"""PyTorch adapters (``pip install "embfile[torch]"``): a map-style ``Dataset``, an ``IterableDataset``
of block-shuffled batches, and :func:`collate`, which pads per-residue records into a batch with a mask.

Both take a path (a file or a sharded folder) or an open dataset.  Datasets pickle by path, so these work
in DataLoader workers under ``fork`` and ``spawn`` alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data

import embfile
from embfile.epochs import Batches, EpochOptions, count

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | embfile.Dataset


def _dataset(source: Source) -> embfile.Dataset:
    return source if isinstance(source, embfile.Dataset) else embfile.open(source)


def tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy(array)``, sharing memory; a bfloat16 array, which torch cannot take from numpy, by
    its bits."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def collate(items: Sequence[torch.Tensor]) -> Any:
    """A DataLoader batch of items: stacked, or of per-residue ``(length, dim)`` items a zero-padded
    ``(batch, longest, dim)`` tensor and a boolean ``(batch, longest)`` mask of the real rows."""
    if not items or items[0].dim() == 1:
        return torch.stack(list(items))
    longest = max(len(t) for t in items)
    out = items[0].new_zeros((len(items), longest, items[0].shape[1]))
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for i, t in enumerate(items):
        out[i, : len(t)] = t
        mask[i, : len(t)] = True
    return out, mask


class Dataset(torch.utils.data.Dataset):
    """Item ``i`` is the vector at row ``i``, or of ``keys[i]`` when ``keys`` is given, as a tensor (of a
    ragged dataset, the record's ``(length, dim)`` rows: batch them with ``collate_fn=embfile.torch.collate``).

    A DataLoader's batch is fetched with one native gather (``__getitems__``).  Single items are copied
    out of the read-only mapping (a tensor over it could not be written safely); batches come from a
    new array.
    """

    def __init__(self, source: Source, keys: Sequence[str] | None = None) -> None:
        self.store = _dataset(source)
        self.keys = None if keys is None else list(keys)
        if self.keys is not None:
            self.store.rows(self.keys)  # a missing key fails here, naming it, not in a worker

    def __len__(self) -> int:
        return len(self.keys) if self.keys is not None else len(self.store)

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        if self.keys is None:
            return np.asarray(indices, dtype=np.int64)
        return self.store.rows([self.keys[i] for i in indices])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        if self.store.ragged:
            rows, offsets = self.store.take(self._rows(indices), pad=False)
            return [tensor(rows[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
        return list(tensor(self.store.take(self._rows(indices))))


class IterableDataset(torch.utils.data.IterableDataset):
    """Block-shuffled batches of one epoch (:meth:`embfile.Dataset.iter_batches`) as tensors.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: each worker takes every k-th batch of the
    rank's sequence, so the loader yields the same batches in the same order for any ``k``.  ``rank`` and
    ``world_size`` default to ``torch.distributed``'s when it is initialised; the other options are those
    of :class:`~embfile.epochs.EpochOptions` (``keys`` defaults to False here).  Yields tensors sharing
    memory with the new batch arrays (``(keys, tensor)`` with ``keys=True``; of ragged records
    ``(padded, mask)`` or, under ``pad=False``, ``(rows, offsets)``), passed through ``transform`` if given.

    Call :meth:`set_epoch` before each epoch.  To resume, save ``ds.state_dict(batches_seen)`` and call
    ``ds.load_state_dict(state)`` on a dataset made the same way before iterating again.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int = 100,
        *,
        transform: Callable[[Any], Any] | None = None,
        **options: Any,
    ) -> None:
        self.store = _dataset(source)
        if options.get("rank") is None or options.get("world_size") is None:
            ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
            if options.get("rank") is None:
                options["rank"] = torch.distributed.get_rank() if ddp else 0
            if options.get("world_size") is None:
                options["world_size"] = torch.distributed.get_world_size() if ddp else 1
        self.options = EpochOptions(batch_size, **{"keys": False, **options})
        self.transform = transform
        self._start = 0
        self._batches()  # check the options here, not in a worker

    def _batches(self, worker: int = 0, num_workers: int = 1) -> Batches:
        return Batches(self.store, self.options, worker=worker, num_workers=num_workers, start=self._start)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` next, from its start."""
        self.options = dataclasses.replace(self.options, epoch=count(epoch, "epoch"))
        self._start = 0

    def __len__(self) -> int:
        """Batches the next pass yields (for this rank)."""
        return len(self._batches())

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in self._batches(worker, num_workers):
            if isinstance(batch, tuple):  # keys, then one array or two (ragged)
                first = 1 if self.options.keys else 0
                batch = (*batch[:first], *(tensor(a) for a in batch[first:]))
            else:
                batch = tensor(batch)
            yield self.transform(batch) if self.transform is not None else batch

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
