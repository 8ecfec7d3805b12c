"""What every converter shares: the streamed source, the .emb sink, atomic outputs, progress."""
import contextlib
import dataclasses
import importlib
import os
import queue
import threading
from typing import Iterator

import numpy as np

from embfile import _core
from embfile._staging import DISK_FULL, Staging, disk_full, require_space
from embfile.writer import Writer

CHUNK_BYTES = 8 << 20  # records read and written per step: with read-ahead, the memory bound of a conversion


def chunk_rows(record_bytes, multiple=1):
    """Rows per step: about CHUNK_BYTES, a multiple of ``multiple`` (an input's own chunking)."""
    rows = max(1, CHUNK_BYTES // max(1, record_bytes))
    return max(multiple, rows // multiple * multiple)


@dataclasses.dataclass
class Source:
    """An input opened for streaming: what it holds, and its records in chunks.

    ``chunks`` yields ``(keys, matrix)`` pairs: a list of str and a ``(b, dim)``
    array that stays valid after the next chunk is read (chunks are read ahead).
    ``count`` is the number of records if known in advance (for the progress bar);
    ``description`` goes into the output's metadata under ``"source"``; ``metadata``
    is user metadata an earlier embfile export left in the input, carried over.
    """

    dim: int
    dtype: np.dtype
    count: "int | None"
    chunks: Iterator
    description: dict
    metadata: dict = dataclasses.field(default_factory=dict)


def write_emb(source, dst, dtype=None, metadata=None, progress=False):
    """Stream ``source`` into the .emb file ``dst`` (atomic: on any error, no file appears)."""
    meta = {k: v for k, v in source.metadata.items() if k != "embfile"}
    meta.update(metadata or {})
    meta["source"] = source.description
    with progress_bar(source.count, progress, os.path.basename(os.fspath(dst))) as bar, \
            Writer(dst, source.dim, dtype or source.dtype, meta) as w:
        for keys, matrix in prefetched(source.chunks):
            w.add_batch(keys, matrix)
            bar.update(len(keys))
        bar.set_postfix_str("sorting keys, writing the index")
    return os.fspath(dst)


def prefetched(chunks, depth=2):
    """Iterate ``chunks`` in a thread that reads up to ``depth`` ahead, so reading the input
    overlaps writing the output (the readers and the writer release the GIL while they wait)."""
    q, stop, end = queue.Queue(depth), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                return q.put(item, timeout=0.1)

    def produce():
        try:
            for item in chunks:
                if stop.is_set():
                    break
                put((item, None))
            put((end, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((None, e))
        finally:
            if hasattr(chunks, "close"):
                chunks.close()

    thread = threading.Thread(target=produce, name="embfile-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def atomic_output(dst, nbytes=0):
    """A temporary path beside ``dst``; renamed onto ``dst`` (and fsynced) only if the block succeeds.
    A write of about ``nbytes`` that the disk cannot hold is refused before it starts."""
    require_space(dst, nbytes)
    staging = Staging(dst)
    try:
        yield staging.path
        staging.commit()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(dst, e.errno) from e
        raise
    finally:
        staging.discard()


def start_writeback(path):
    """Have the kernel start writing ``path``'s dirty pages now, so the disk works while the next
    part is encoded and the final fsync is short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _core.start_writeback(fd, 0, 0)  # a length of 0: to the end of the file
    finally:
        os.close(fd)


def progress_bar(total, enabled, desc=None):
    """A tqdm bar on stderr (records done, rate, time left), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=" records", unit_scale=True, dynamic_ncols=True,
                mininterval=0.5, leave=False)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass


def require(module, extra):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"this needs {module.split('.')[0]}: pip install 'embfile[{extra}]'") from None
