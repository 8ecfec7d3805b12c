"""What flows into a writer: a :class:`Source` of ``(keys, matrix)`` chunks, whatever the input.

``embfile.write``, ``write_shards`` and every converter turn their input into a Source, and
:func:`embfile.writer.write_source` is the one path from a Source into a writer.  A conversion holds one
chunk and the keys in memory, whatever the input's size.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from embfile import errors
from embfile._keys import EncodedKeys
from embfile.dataset import Dataset

CHUNK_BYTES = 8 << 20  # records read and written per step: with read-ahead, the memory bound of a conversion

Chunk = tuple[list[str] | EncodedKeys, np.ndarray]


@dataclasses.dataclass
class Source:
    """An input opened for streaming: what it holds, and its records in chunks.

    ``chunks`` yields ``(keys, matrix)`` pairs: a list of str and a ``(b, dim)`` array that stays valid
    after the next chunk is read (chunks may be read ahead).  ``count`` is the number of records if known
    in advance (for the progress bar); ``description`` says where the records came from (a converter
    puts it into the output's metadata under ``"source"``); ``metadata`` is user metadata the input
    carries (an .emb file's, or what an earlier embfile export left in a Parquet or HDF5 file).
    """

    dim: int
    dtype: np.dtype
    count: int | None
    chunks: Iterator[Chunk]
    description: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


def chunk_rows(record_bytes: int, multiple: int = 1) -> int:
    """Rows per chunk: about CHUNK_BYTES, a multiple of ``multiple`` (an input's own chunking)."""
    rows = max(1, CHUNK_BYTES // max(1, record_bytes))
    return max(multiple, rows // multiple * multiple)


def as_vector(key: object, vector: object, dim: int | None) -> np.ndarray:
    """``vector`` as a 1-d numeric array of ``dim`` elements (any length if None), or the error naming ``key``."""
    v = np.asarray(vector)
    if v.dtype.kind not in "biufc" and not isinstance(vector, np.ndarray):
        raise TypeError(f"key {key!r}: expected a vector of numbers, not {type(vector).__name__}")
    if v.ndim != 1 or (dim is not None and v.shape != (dim,)):
        expected = f"({dim},)" if dim is not None else "1-d"
        raise errors.WriterError(f"key {key!r}: vector has shape {v.shape}, expected {expected}")
    return v


def source_of(data: Any, caller: str = "write()") -> Source:
    """``data`` as a Source: an open dataset (streamed from its mapping), a ``(keys, matrix)`` pair or a
    mapping ``{key: vector}``."""
    if isinstance(data, Dataset):
        step = chunk_rows(data.dim * data.dtype.itemsize)
        meta = {k: v for k, v in data.metadata.items() if k != "embfile"}
        return Source(
            data.dim,
            data.dtype.newbyteorder("="),
            len(data),
            _dataset_chunks(data, step),
            {"format": "emb", "path": os.path.abspath(data.path) if data.path else None},
            meta,
        )
    if isinstance(data, tuple) and len(data) == 2:
        keys, matrix = data
        matrix = np.asarray(matrix)
        keys = keys.tolist() if isinstance(keys, np.ndarray) else list(keys)
        if matrix.ndim != 2:
            raise errors.WriterError(f"matrix must be 2-d, got shape {matrix.shape}")
        if matrix.shape[0] != len(keys):
            raise errors.WriterError(
                f"matrix has shape {matrix.shape}, expected ({len(keys)}, {matrix.shape[1]}) for {len(keys)} keys"
            )
        step = chunk_rows(matrix.shape[1] * matrix.dtype.itemsize)
        chunks = ((keys[lo : lo + step], matrix[lo : lo + step]) for lo in range(0, max(len(keys), 1), step))
        return Source(matrix.shape[1], matrix.dtype, len(keys), chunks, {"format": "arrays"})
    if not isinstance(data, collections.abc.Mapping):
        raise TypeError(f"{caller} takes a mapping or a (keys, matrix) pair, not {type(data).__name__}")
    items = iter(data.items())
    first = next(items, None)
    if first is None:
        raise errors.WriterError("cannot infer dim from an empty mapping; use a Writer with dim instead")
    v0 = as_vector(first[0], first[1], None)
    return Source(v0.shape[0], v0.dtype, len(data), _mapping_chunks(first, items, v0), {"format": "mapping"})


def _dataset_chunks(data: Dataset, step: int) -> Iterator[Chunk]:
    for lo, hi, block in data.chunks(step):
        yield data.keys_between(lo, hi), block


def _mapping_chunks(first: tuple[Any, Any], items: Iterator[tuple[Any, Any]], v0: np.ndarray) -> Iterator[Chunk]:
    dim, step = v0.shape[0], chunk_rows(v0.nbytes)
    batch = [first]
    for item in items:
        batch.append(item)
        if len(batch) >= step:
            yield _stacked(batch, dim)
            batch = []
    if batch:
        yield _stacked(batch, dim)


def _stacked(batch: list[tuple[Any, Any]], dim: int) -> Chunk:
    vectors = [as_vector(k, v, dim) for k, v in batch]
    return [k for k, _ in batch], np.stack(vectors)


def prefetched(chunks: Iterable[Chunk], depth: int = 2) -> Iterator[Chunk]:
    """Iterate ``chunks`` in a thread that reads up to ``depth`` ahead, so reading the input overlaps
    writing the output (the readers and the writer release the GIL while they wait)."""
    q: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(item: tuple[Any, BaseException | None]) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                return q.put(item, timeout=0.1)

    def produce() -> None:
        try:
            for item in chunks:
                if stop.is_set():
                    break
                put((item, None))
            put((end, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((None, e))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

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


class ProgressBar(Protocol):
    def __enter__(self) -> ProgressBar: ...
    def __exit__(self, *exc: object) -> None: ...
    def update(self, n: int = 1) -> Any: ...
    def set_postfix_str(self, s: str) -> Any: ...


def progress_bar(total: int | None, enabled: bool, desc: str | os.PathLike[str] | None = None) -> ProgressBar:
    """A tqdm bar on stderr (records done, rate, time left), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    desc = os.path.basename(os.fspath(desc)) if desc is not None else None
    bar: ProgressBar = tqdm(
        total=total, desc=desc, unit=" records", unit_scale=True, dynamic_ncols=True, mininterval=0.5, leave=False
    )
    return bar


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass
