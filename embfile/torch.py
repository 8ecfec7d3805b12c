"""PyTorch adapters (``pip install "embfile[torch]"``): a map-style ``Dataset`` and an
``IterableDataset`` of block-shuffled batches.

Both take a path (a file or a sharded folder) or an open store.  Stores pickle
by path, so the datasets work in DataLoader workers under ``fork`` and
``spawn`` alike.
"""
import numpy as np
import torch
import torch.utils.data

from embfile import epochs
from embfile.reader import open as _open


def _store(source):
    return source if isinstance(source, epochs.BatchSource) else _open(source)


class Dataset(torch.utils.data.Dataset):
    """Item ``i`` is the vector at row ``i``, or of ``keys[i]`` when ``keys`` is given, as a tensor.

    A DataLoader's batch is fetched with one native gather (``__getitems__``).
    Single items are copied out of the read-only mapping (a tensor over it
    could not be written safely); batches come from a new array.
    """

    def __init__(self, source, keys=None):
        self.store = _store(source)
        self.keys = None if keys is None else list(keys)
        if self.keys is not None:
            self.store.rows(self.keys)  # a missing key fails here, naming it, not in a worker

    def __len__(self):
        return len(self.keys) if self.keys is not None else len(self.store)

    def _rows(self, indices):
        if self.keys is None:
            return np.asarray(indices, dtype=np.int64)
        return self.store.rows([self.keys[i] for i in indices])

    def __getitem__(self, index):
        return torch.from_numpy(self.store.take(self._rows([index]))[0])

    def __getitems__(self, indices):
        return list(torch.from_numpy(self.store.take(self._rows(indices))))


class IterableDataset(torch.utils.data.IterableDataset):
    """Block-shuffled batches of one epoch (:meth:`EmbFile.iter_batches`) as tensors.

    Use with ``DataLoader(ds, batch_size=None, num_workers=k)``: each worker
    takes every k-th batch of the rank's sequence, so the loader yields the
    same batches in the same order for any ``k``.  ``rank`` and ``world_size``
    default to ``torch.distributed``'s when it is initialised.  Yields tensors
    sharing memory with the new batch arrays (``(keys, tensor)`` with
    ``keys=True``), passed through ``transform`` if given.

    Call :meth:`set_epoch` before each epoch.  To resume, save
    ``ds.state_dict(batches_seen)`` and call ``ds.load_state_dict(state)`` on a
    dataset made the same way before iterating again.
    """

    def __init__(self, source, batch_size=100, *, shuffle=True, seed=0, epoch=0, block_size=None,
                 buffer_blocks=epochs.BUFFER_BLOCKS, rank=None, world_size=None, drop_last=False,
                 keys=False, transform=None):
        self.store = _store(source)
        if rank is None or world_size is None:
            ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if ddp else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if ddp else 1) if world_size is None else world_size
        self.options = dict(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                            block_size=block_size, buffer_blocks=buffer_blocks, rank=rank,
                            world_size=world_size, drop_last=drop_last, keys=keys)
        self.transform = transform
        self._start = 0
        self._batches()  # check the options here, not in a worker

    def _batches(self, worker=0, num_workers=1):
        return epochs.Batches(self.store, **self.options, worker=worker, num_workers=num_workers,
                              start=self._start)

    def set_epoch(self, epoch):
        """Read epoch ``epoch`` next, from its start."""
        self.options["epoch"] = epochs._count(epoch, "epoch")
        self._start = 0

    def __len__(self):
        """Batches the next pass yields (for this rank)."""
        return len(self._batches())

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for batch in self._batches(worker, num_workers):
            if self.options["keys"]:
                batch = (batch[0], torch.from_numpy(batch[1]))
            else:
                batch = torch.from_numpy(batch)
            yield self.transform(batch) if self.transform is not None else batch

    def state_dict(self, batches_seen):
        """The resume point after the loader yielded ``batches_seen`` batches of this pass."""
        it = self._batches()
        position = min(self._start + epochs._count(batches_seen, "batches_seen") * it.batch_size,
                       it._hi - it._lo)
        return {**it._config(), "position": position}

    def load_state_dict(self, state):
        """Resume at ``state`` (from :meth:`state_dict`) on the next pass."""
        self.options["epoch"] = state["epoch"]
        self._start = 0
        self._batches().load_state_dict(state)  # checks that the state fits these options
        self._start = state["position"]
