"""Batches handed from DataLoader worker processes to the main process through buffers each worker keeps.

PyTorch moves every tensor a worker returns into a new shared-memory segment and passes its file descriptor
to the main process through a socket, which for a batch of a megabyte costs several times the gather that
made it.  Here a worker makes its batches in (or copies its outputs into) a small set of files in
``/dev/shm`` that it creates once and reuses, and sends only their names; the main process maps each file the
first time it sees it (and then unlinks it) and wraps the bytes in a tensor.  The files are named after the
process that started the worker, which removes what a killed worker leaves; a worker removes its own as it
exits.

A buffer goes back to its worker only when the main process has dropped every tensor and view on it: a
finalizer on the tensor's storage clears the buffer's flag in a table the two processes share.  A batch the
user keeps is never overwritten; the worker then takes another buffer, up to :data:`MAX_BUFFERS`, and past
that hands the batch over PyTorch's own way.  Where ``/dev/shm`` is missing, everything goes that way.
"""

from __future__ import annotations

import functools
import glob
import math
import mmap
import multiprocessing.util
import os
import secrets
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

SHM = "/dev/shm"
MAX_BUFFERS = 32  # per worker: batches the main process may hold at once before the worker stops reusing
FLAGS_BYTES = 4 * MAX_BUFFERS


def each_tensor(batch: Any, f: Callable[[torch.Tensor], Any]) -> Any:
    """``f`` of each tensor of ``batch`` (a tensor, or a tuple or list holding some), the rest as it is."""
    if isinstance(batch, torch.Tensor):
        return f(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(each_tensor(b, f) for b in batch)
    return batch


def _mapped(path: str, size: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Buffers:
    """A worker's side: its buffers and the table of which ones the main process still holds."""

    def __init__(self) -> None:
        # named after the process that started this worker, which removes what a killed worker leaves
        self.prefix = os.path.join(SHM, f"embfile-{os.getppid()}-{os.getpid()}-{secrets.token_hex(4)}")
        self.flags_path = f"{self.prefix}-flags"
        self.flags = np.frombuffer(_mapped(self.flags_path, FLAGS_BYTES, create=True), np.int32)
        self.slots: list[tuple[str, torch.Tensor]] = []  # (path, the file's bytes)
        self.reserved: list[int] = []  # slots lent out for a batch to be made in (array()), not yet leased
        self.created = 0
        multiprocessing.util.Finalize(self, self.close, exitpriority=10)  # runs as a DataLoader worker exits

    @staticmethod
    def available() -> bool:
        return os.path.isdir(SHM) and os.access(SHM, os.W_OK)

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A new array in a free buffer, for a batch to be made in and then handed over without a copy
        (None if every buffer is held).  One lent before and not handed over since is free again: its batch
        went another way (a collate that stacked it anew)."""
        self._release_reserved()
        nbytes = math.prod(shape) * dtype.itemsize
        slot = self._slot(nbytes)
        if slot is None:
            return None
        self.reserved.append(slot)
        return self.slots[slot][1].numpy()[:nbytes].view(dtype).reshape(shape)

    def hand_over(self, batch: Any) -> Any:
        """``batch`` (a tensor, or a tuple or list holding some) with each CPU tensor in a buffer: in place if
        it is one made in :meth:`array`, else copied."""
        out = each_tensor(batch, self._lease)
        self._release_reserved()  # lent, but what came back was made elsewhere
        return out

    def _release_reserved(self) -> None:
        for slot in self.reserved:
            self.flags[slot] = 0
        self.reserved.clear()

    def _lease(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or nbytes == 0:
            return t
        slot = next((s for s in self.reserved if self.slots[s][1].data_ptr() == t.data_ptr()), None)
        if slot is not None and t.is_contiguous():
            self.reserved.remove(slot)
        else:
            slot = self._slot(nbytes)
            if slot is None:
                return t  # the main process holds every buffer: PyTorch's own way
            self.slots[slot][1][:nbytes].view(t.dtype).view(t.shape).copy_(t)
        path, data = self.slots[slot]
        return Lease(path, len(data), self.flags_path, slot, str(t.dtype).removeprefix("torch."), tuple(t.shape))

    def _slot(self, nbytes: int) -> int | None:
        """A free buffer of at least ``nbytes``, marked held; None if the main process holds them all."""
        held: list[int] = self.flags[: len(self.slots)].tolist()
        if 0 in held:
            slot = held.index(0)
        elif len(self.slots) < MAX_BUFFERS:
            slot = len(self.slots)
            self.slots.append(("", torch.empty(0, dtype=torch.uint8)))
        else:
            return None
        path, data = self.slots[slot]
        if len(data) < nbytes:  # a new file, a little larger than needed (the last batch may be smaller)
            _unlink(path)
            path = f"{self.prefix}-{self.created}"
            self.created += 1
            size = -(-nbytes * 5 // 4 // mmap.PAGESIZE) * mmap.PAGESIZE
            self.slots[slot] = (path, torch.frombuffer(_mapped(path, size, create=True), dtype=torch.uint8))
        self.flags[slot] = 1
        return slot

    def close(self) -> None:
        for path, _ in self.slots:
            _unlink(path)
        _unlink(self.flags_path)


class Lease:
    """A buffer's name and what it holds; unpickled in the main process as the tensor itself."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _receive, self.args


_OPEN: dict[str, np.ndarray] = {}  # the main process's mappings of workers' files (and flag tables), by name


def _open(path: str, size: int) -> np.ndarray:
    m = _OPEN.get(path)
    if m is None:
        _sweep()
        m = _OPEN[path] = np.frombuffer(_mapped(path, size, create=False), np.uint8)
        _unlink(path)
    return m


def _sweep(everything: bool = False) -> None:
    """Forget the mappings of this process's workers that have ended (a tensor keeps its own), and remove the
    files such a worker left (a killed one's, made and not yet sent); at exit, every one of its workers'."""
    for path in [p for p in _OPEN if not _alive(_worker(p))]:
        del _OPEN[path]
    for left in glob.glob(os.path.join(SHM, f"embfile-{os.getpid()}-*")):
        if everything or not _alive(_worker(left)):
            _unlink(left)


# At exit, after multiprocessing has ended the (daemonic) workers (a priority below 0): whatever they left.
multiprocessing.util.Finalize(None, _sweep, kwargs={"everything": True}, exitpriority=-1)


def _worker(path: str) -> int:
    return int(os.path.basename(path).split("-")[2])


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (an exited child not yet waited for counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _receive(path: str, size: int, flags_path: str, slot: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor over a buffer, as a numpy array (one torch call: this runs once a batch in the busiest process),
    whose finalizer gives the buffer back once no tensor or view holds the array."""
    as_numpy, as_torch = _dtypes(dtype)
    array = _open(path, size)[: math.prod(shape) * as_numpy.itemsize].view(as_numpy).reshape(shape)
    weakref.finalize(array, _open(flags_path, FLAGS_BYTES).view(np.int32).__setitem__, slot, 0)
    out = torch.from_numpy(array)
    return out if as_torch is None else out.view(as_torch)


@functools.cache
def _dtypes(name: str) -> tuple[np.dtype, torch.dtype | None]:
    """The numpy dtype a torch dtype's bytes are read as, and the torch dtype to view them as where numpy
    has no such type (bfloat16, float8, ...: their bytes as unsigned integers of their width)."""
    dtype = getattr(torch, name)
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype, None
    except TypeError:
        return np.dtype(f"u{torch.empty(0, dtype=dtype).element_size()}"), dtype


_BUFFERS: dict[int, Buffers] = {}


def worker_buffers() -> Buffers | None:
    """This DataLoader worker's buffers (made on first use), or None outside a worker or without /dev/shm."""
    pid = os.getpid()
    buffers = _BUFFERS.get(pid)
    if buffers is None and torch.utils.data.get_worker_info() is not None and Buffers.available():
        _BUFFERS.clear()  # a forked worker inherits its parent's table: not its own
        buffers = _BUFFERS[pid] = Buffers()
    return buffers
