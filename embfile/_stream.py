"""What flows into a writer: a :class:`Source` of ``(keys, matrix)`` chunks, whatever the input.

``embfile.write``, ``write_shards`` and every converter turn their input into a Source, and
:func:`embfile.writer.write_source` is the one path from a Source into a writer.  A conversion holds one
chunk and the keys in memory, whatever the input's size.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import itertools
import os
import queue
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from embfile import _core, errors
from embfile import _format as F
from embfile._keys import EncodedKeys

CHUNK_BYTES = 8 << 20  # records read and written per step: with read-ahead, the memory bound of a conversion
POOLINGS = ("mean", "max", "first", "last")  # what makes one vector of a ragged record's rows
POOL_THREADS = min(os.cpu_count() or 1, 8)

Chunk = tuple[list[str] | EncodedKeys, np.ndarray]  # keys, and their records: one row each
RaggedChunk = tuple[list[str] | EncodedKeys, np.ndarray, np.ndarray]  # keys, their rows, each key's row count


@dataclasses.dataclass
class Source:
    """An input opened for streaming: what it holds, and its records in chunks.

    ``chunks`` yields ``(keys, matrix)`` pairs: a list of str and a ``(b, dim)`` array that stays valid
    after the next chunk is read (chunks may be read ahead); of a ``ragged`` source ``(keys, rows, lengths)``,
    the records' rows one after another and each key's number of rows.  ``count`` is the number of records if known
    in advance (for the progress bar); ``description`` says where the records came from (a converter
    puts it into the output's metadata under ``"source"``); ``metadata`` is user metadata the input
    carries (an .emb file's, or what an earlier embfile export left in a Parquet or HDF5 file).
    """

    dim: int
    dtype: np.dtype
    count: int | None
    chunks: Iterator[Any]  # Chunk, or RaggedChunk
    description: dict[str, Any]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    ragged: bool = False
    on_error: OnError | None = None  # the records its reader skipped, if it was asked to


@dataclasses.dataclass
class OnError:
    """What a reader does with a bad record (a null vector, one of the wrong length or type): raise its error
    (``"error"``, the default), or skip it and note where, which key and why (``"skip"``)."""

    policy: str = "error"
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.policy not in ("error", "skip"):
            raise ValueError(f"on_error must be 'error' or 'skip', not {self.policy!r}")

    def __call__(self, error: errors.ConversionError, where: str, key: object) -> None:
        """Raise ``error``, or note the record it is about and go on."""
        if self.policy == "error":
            raise error
        self.skipped.append({"where": where, "key": key, "error": str(error)})


def require_unique(keys: list[str], where: str) -> None:
    """Raise the :class:`~embfile.DuplicateKeyError` naming the first key ``keys`` holds twice and both its
    rows, so an input whose keys come first fails before a vector is read (the writer's own native sort)."""
    encoded = [k.encode("utf-8", "surrogatepass") for k in keys]
    require_unique_encoded(np.frombuffer(b"".join(encoded), np.uint8), [len(e) for e in encoded], where)


def require_unique_encoded(heap: np.ndarray, lengths: Any, where: str, rows: np.ndarray | None = None) -> None:
    """:func:`require_unique` of keys encoded one after another in ``heap``; ``rows`` maps their positions
    to the input's rows (when some rows are left out)."""
    offsets = np.zeros(len(lengths) + 1, np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    try:
        _core.sort_keys(heap, offsets)
    except errors.DuplicateKeyError as e:
        a, b = sorted(int(r) for r in (e.rows if rows is None else rows[list(e.rows)]))
        raise errors.DuplicateKeyError(f"{where}: duplicate key {e.key!r} (rows {a} and {b})", e.key, (a, b)) from None


def chunk_rows(record_bytes: int, multiple: int = 1) -> int:
    """Rows per chunk: about CHUNK_BYTES, a multiple of ``multiple`` (an input's own chunking)."""
    rows = max(1, CHUNK_BYTES // max(1, record_bytes))
    return max(multiple, rows // multiple * multiple)


def array_of(value: Any) -> np.ndarray:
    """``value`` as a numpy array; a torch tensor as a model leaves it (needing grad, on a GPU, bfloat16) too."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # numpy's through ml_dtypes, bit for bit
            value = value.view(torch.int16).numpy().view(F.disk_dtype("bfloat16"))
        else:
            value = value.numpy()
    return np.asarray(value)


def unpadded(m: np.ndarray, lengths: Any, keys: Sequence[object] | EncodedKeys) -> tuple[np.ndarray, np.ndarray]:
    """Of a zero-padded batch ``(B, longest, dim)`` (a model's output for B sequences) and each record's
    length, the records' rows one after another, as a ragged writer stores them, and the lengths."""
    n = array_of(lengths)
    if len(m) != len(keys) or n.shape != (len(keys),) or n.dtype.kind not in "iu":
        raise errors.WriterError(
            f"a padded batch of shape {m.shape} for {len(keys)} keys takes {len(keys)} integer lengths, "
            f"not {n.dtype} {n.shape}"
        )
    longer = np.flatnonzero(n > m.shape[1])
    if longer.size:
        i = int(longer[0])
        raise errors.WriterError(f"key {keys[i]!r}: length {n[i]}, more than the padded batch's {m.shape[1]} rows")
    return m[np.arange(m.shape[1]) < n[:, None]], n


def as_vector(key: object, vector: object, dim: int | None) -> np.ndarray:
    """``vector`` as a 1-d numeric array of ``dim`` elements (any length if None), or the error naming ``key``."""
    v = array_of(vector)
    if F.kind(v.dtype) not in "biufc":
        if isinstance(vector, np.ndarray):
            raise errors.WriterError(f"key {key!r}: cannot store {v.dtype} values; expected numbers")
        raise TypeError(f"key {key!r}: expected a vector of numbers, not {type(vector).__name__}")
    if v.ndim != 1 or (dim is not None and v.shape != (dim,)):
        expected = f"({dim},)" if dim is not None else "1-d"
        hint = "; per-residue (length, dim) records are written with ragged=True" if v.ndim == 2 else ""
        raise errors.WriterError(f"key {key!r}: vector has shape {v.shape}, expected {expected}{hint}")
    return v


def as_matrix(key: object, matrix: object, dim: int | None) -> np.ndarray:
    """``matrix`` as a ragged record: a 2-d numeric array of at least one row of ``dim`` elements (any if
    None), or the error naming ``key``."""
    m = array_of(matrix)
    if F.kind(m.dtype) not in "biufc":
        if isinstance(matrix, np.ndarray):
            raise errors.WriterError(f"key {key!r}: cannot store {m.dtype} values; expected numbers")
        raise TypeError(f"key {key!r}: expected a matrix of numbers, not {type(matrix).__name__}")
    if m.ndim != 2 or (dim is not None and m.shape[1] != dim):
        width = dim if dim is not None else "dim"
        hint = " (a vector: this dataset is ragged)" if m.ndim == 1 else ""
        raise errors.WriterError(f"key {key!r}: record has shape {m.shape}, expected (length, {width}){hint}")
    if len(m) == 0:
        raise errors.WriterError(f"key {key!r}: record has no rows; a ragged record has at least one")
    return m


def is_table(data: Any) -> bool:
    """Whether ``data`` is a table in memory that :func:`embfile.formats.parquet.read_table` reads (told by its
    type's name and what it has: this module imports no table library)."""
    name = type(data).__name__
    return not is_series(data) and (
        name in ("Table", "DataFrame", "DatasetDict", "IterableDataset")
        or hasattr(data, "__arrow_c_stream__")
        or (hasattr(data, "with_format") and hasattr(data, "column_names"))
    )


def is_series(data: Any) -> bool:
    """Whether ``data`` is a pandas Series: of vectors indexed by key, a mapping."""
    return type(data).__name__ == "Series" and hasattr(data, "index") and hasattr(data, "items")


def source_of(
    data: Any, caller: str = "write()", ragged: bool | None = None, on_error: OnError | None = None
) -> Source:
    """``data`` as a Source: an open dataset (streamed from its mapping), a ``(keys, matrix)`` pair or a
    mapping ``{key: vector}`` (or a pandas Series of vectors indexed by key); with ``ragged``, a mapping
    ``{key: (length, dim) matrix}`` (a dataset is ragged or not of itself).  ``on_error`` skips (and notes)
    a mapping's bad values instead of raising.
    A dataset is recognised by the native table every dataset extends: this module cannot import
    dataset.py, which imports the writer (``Dataset.pool`` writes), which imports this module."""
    if isinstance(data, _core.Table):
        return _dataset_source(data, ragged)
    if isinstance(data, tuple) and len(data) == 2:
        keys, matrix = data
        matrix = array_of(matrix)
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
    if is_series(data) and len(data) and data.index.inferred_type not in ("string", "unicode"):
        raise TypeError(
            f"{caller} takes a Series of vectors indexed by key (str); this one's index holds "
            f"{data.index.inferred_type} values (set_index the key column first)"
        )
    if not isinstance(data, collections.abc.Mapping) and not is_series(data):
        hint = "; a table goes through embfile.convert(table, path), which finds its key and vector columns"
        raise TypeError(
            f"{caller} takes a mapping or a (keys, matrix) pair, not {type(data).__name__}"
            + (hint if is_table(data) else "")
        )
    items = iter(data.items())
    check = as_matrix if ragged else as_vector
    bad = on_error or OnError()
    first = next(_good(items, check, None, bad, caller), None)
    if first is None:
        if bad.skipped:
            raise errors.ConversionError(f"{caller}: no good record: {bad.skipped[0]['error']}")
        raise errors.WriterError("cannot infer dim from an empty mapping; use a Writer with dim instead")
    dim, dtype = first[1].shape[-1], first[1].dtype
    rest = _good(items, check, dim, bad, caller)
    records: Iterator[Any] = (
        _ragged_mapping_chunks(first, rest, dim, dtype) if ragged else _mapping_chunks(first, rest, first[1])
    )
    return Source(dim, dtype, len(data), records, {"format": "mapping"}, ragged=bool(ragged), on_error=on_error)


def _good(
    items: Iterator[tuple[Any, Any]],
    check: Callable[[Any, Any, int | None], np.ndarray],
    dim: int | None,
    bad: OnError,
    where: str,
) -> Iterator[tuple[Any, np.ndarray]]:
    """``(key, array)`` of the items whose value ``check`` takes; the others raise, or are skipped by ``bad``."""
    for key, value in items:
        try:
            yield key, check(key, value, dim)
        except (errors.WriterError, TypeError) as e:
            if bad.policy == "error":
                raise
            bad(errors.ConversionError(str(e)), where, key)


def _dataset_source(data: Any, ragged: bool | None) -> Source:
    """An open dataset's records, streamed from its mapping (a ragged one's as such)."""
    if ragged is not None and ragged != data.ragged:
        what = "ragged" if data.ragged else "not ragged"
        raise errors.WriterError(f"{data.path or 'the dataset'} is {what}; ragged={ragged} does not fit it")
    record_bytes = data.dim * data.dtype.itemsize
    chunks: Iterator[Any] = (
        _ragged_dataset_chunks(data, chunk_rows(record_bytes))
        if data.ragged
        else _dataset_chunks(data, chunk_rows(record_bytes))
    )
    return Source(
        data.dim,
        data.dtype.newbyteorder("="),
        len(data),
        chunks,
        {"format": "emb", "path": os.path.abspath(data.path) if data.path else None},
        {k: v for k, v in data.metadata.items() if k != "embfile"},
        ragged=data.ragged,
    )


def _dataset_chunks(data: Any, step: int) -> Iterator[Chunk]:
    for lo, hi, block in data.chunks(step):
        yield data.keys_between(lo, hi), block


def _ragged_dataset_chunks(data: Any, rows: int) -> Iterator[RaggedChunk]:
    for lo, hi, block, offsets in data.ragged_chunks(rows):
        yield data.keys_between(lo, hi), block, np.diff(offsets)


def _ragged_mapping_chunks(
    first: tuple[Any, Any], items: Iterator[tuple[Any, Any]], dim: int, dtype: np.dtype
) -> Iterator[RaggedChunk]:
    step = chunk_rows(dim * dtype.itemsize)
    batch, rows = [], 0
    for key, m in itertools.chain([first], items):
        batch.append((key, m))
        rows += len(m)
        if rows >= step:
            yield _packed(batch)
            batch, rows = [], 0
    if batch:
        yield _packed(batch)


def _packed(batch: list[tuple[Any, np.ndarray]]) -> RaggedChunk:
    return [k for k, _ in batch], np.concatenate([m for _, m in batch]), np.array([len(m) for _, m in batch])


def _mapping_chunks(first: tuple[Any, Any], items: Iterator[tuple[Any, Any]], v0: np.ndarray) -> Iterator[Chunk]:
    step = chunk_rows(v0.nbytes)
    batch = [first]
    for item in items:
        batch.append(item)
        if len(batch) >= step:
            yield _stacked(batch)
            batch = []
    if batch:
        yield _stacked(batch)


def _stacked(batch: list[tuple[Any, np.ndarray]]) -> Chunk:
    return [k for k, _ in batch], np.stack([v for _, v in batch])


def record_cuts(lengths: np.ndarray, rows: int) -> list[int]:
    """Where records of these ``lengths`` (rows each) are cut into runs of about ``rows`` rows: 0, after the last
    record ending within each multiple of ``rows``, and ``len(lengths)`` (sorted, once each: a record longer
    than ``rows`` runs alone)."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return sorted({0, len(lengths), *np.searchsorted(ends, np.arange(rows, total, rows), "right").tolist()})


def pool_rows(block: np.ndarray, offsets: np.ndarray, how: str) -> Any:
    """One row per record of ``block`` (record ``i`` its rows ``offsets[i]`` to ``offsets[i + 1]``, at least
    one each), pooled ``how``: a mean summed in float64, as float32 (float64 for other types than the core's);
    a maximum of the rows' type.  The types the core reads are pooled there, on every core; others by numpy."""
    starts = offsets[:-1]
    if how == "first":
        return block[starts]
    if how == "last":
        return block[offsets[1:] - 1]
    if block.dtype.name in _core.DOT_KINDS and block.dtype.isnative and block.flags.c_contiguous:
        out = _core.pool(block, offsets, how, POOL_THREADS)
        return out if how == "mean" else out.astype(block.dtype)  # float32 holds each of these types exactly
    if how == "max":
        return np.maximum.reduceat(block, starts)
    sums = np.add.reduceat(block, starts, dtype=np.float64)
    return sums / np.diff(offsets)[:, None]


def pooled(source: Source, how: str | None) -> Source:
    """A ragged ``source`` pooled ``how`` into one vector per key (``None``: as it is).  The mean of float16
    records stays float16, of integers becomes float32."""
    if how is None:
        return source
    if how not in POOLINGS:
        raise ValueError(f"pool must be one of {', '.join(map(repr, POOLINGS))}, not {how!r}")
    if not source.ragged:
        raise errors.ConversionError(
            f"{source.description.get('path', 'the input')}: one vector per key already; pool= applies to "
            "per-residue (L, D) input"
        )
    dtype = np.dtype(np.float32) if how == "mean" and source.dtype.kind in "iu" else source.dtype

    def chunks() -> Iterator[Chunk]:
        for keys, rows, lengths in source.chunks:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            yield keys, pool_rows(rows, offsets, how).astype(dtype, copy=False)

    return dataclasses.replace(
        source, dtype=dtype, chunks=chunks(), description={**source.description, "pool": how}, ragged=False
    )


def leading(source: Source, dims: int | None) -> Source:
    """``source`` with the first ``dims`` values of each vector kept (of per-residue records, of each row): a
    Matryoshka embedding cut to the prefix it was trained to hold (``None``: as it is)."""
    if dims is None:
        return source
    if not isinstance(dims, (int, np.integer)) or isinstance(dims, bool) or not 1 <= dims <= source.dim:
        raise ValueError(f"dims must be an int from 1 to {source.dim} (the input's values a vector), not {dims!r}")

    def chunks() -> Iterator[Any]:
        for keys, x, *lengths in source.chunks:
            yield (keys, np.ascontiguousarray(x[:, :dims]), *lengths)  # a copy: the chunk's rows are longer

    return dataclasses.replace(
        source, dim=int(dims), chunks=chunks(), description={**source.description, "dims": int(dims)}
    )


def normalized(source: Source, normalize: bool) -> Source:
    """``source`` with each vector (of per-residue records, each row) scaled to unit length, so a dot product
    of two is their cosine; after :func:`leading`, a Matryoshka prefix re-normalized as its models ask.  A zero
    vector stays zero.  Of float vectors only (bfloat16 too), kept in their type."""
    if not normalize:
        return source
    if F.kind(source.dtype) != "f":
        raise ValueError(
            f"normalize= scales float vectors; {source.description.get('path', 'the input')} holds "
            f"{source.dtype.name} (convert it to float32 first)"
        )
    wide = np.float64 if source.dtype == np.float64 else np.float32

    def chunks() -> Iterator[Any]:
        for keys, x, *lengths in source.chunks:
            xf = x.astype(wide, copy=False)
            norms = np.sqrt(np.einsum("ij,ij->i", xf, xf))
            norms[norms == 0] = 1
            yield (keys, (xf / norms[:, None]).astype(source.dtype, copy=False), *lengths)

    return dataclasses.replace(source, chunks=chunks(), description={**source.description, "normalized": True})


def binarized(source: Source, binary: bool) -> Source:
    """``source`` with each vector (of per-residue records, each row) as its signs, packed 8 to a byte
    (``np.packbits(x > 0)``, the binary quantization of embedding models: uint8 records of ``dim / 8`` bytes,
    the last padded with zero bits), for ``metric="hamming"`` search.  Of signed vectors only."""
    if not binary:
        return source
    if F.kind(source.dtype) not in "fi":
        raise ValueError(
            f"binary= packs the signs of vectors; {source.description.get('path', 'the input')} holds "
            f"{source.dtype.name}, which has none"
        )

    def chunks() -> Iterator[Any]:
        for keys, x, *lengths in source.chunks:
            yield (keys, np.packbits(x.astype(np.float32, copy=False) > 0, axis=1), *lengths)

    description = {**source.description, "binary": True, "binary_dims": source.dim}
    return dataclasses.replace(
        source, dtype=np.dtype(np.uint8), dim=-(-source.dim // 8), chunks=chunks(), description=description
    )


KeyRule = Callable[[str], str] | str  # a function of the source key, or a regular expression


def rekeyed(source: Source, key: KeyRule | None) -> Source:
    r"""``source`` with each key replaced by ``key(old)``, or by the first group (else the whole match) of the
    regular expression ``key`` searched in it (``None``: as it is): ``r"\|([^|]+)\|"`` takes ``P69905`` of
    ``sp|P69905|HBA_HUMAN``.  A key the pattern does not match, or two source keys that become one, is a
    :class:`~embfile.ConversionError` naming them, raised as soon as it is read."""
    if key is None:
        return source
    if isinstance(key, str):
        try:
            pattern = re.compile(key)
        except re.error as e:
            raise ValueError(f"key pattern {key!r}: {e}") from None

        def matched(old: str) -> str:
            m = pattern.search(old)
            if m is None:
                raise errors.ConversionError(f"key {old!r} does not match the key pattern {key!r}")
            return m.group(1) if pattern.groups else m.group(0)

        rule: Callable[[str], str] = matched
    elif callable(key):
        rule = key
    else:
        raise TypeError(f"key= takes a function or a regular expression, not {type(key).__name__}")
    where = source.description.get("path") or source.description.get("format", "the input")

    def chunks() -> Iterator[Any]:
        seen: dict[str, str] = {}
        for keys, *records in source.chunks:
            new = []
            for old in keys.tolist() if isinstance(keys, EncodedKeys) else keys:
                k = rule(old)
                if not isinstance(k, str) or not k:
                    raise errors.ConversionError(f"{where}: key {old!r} became {k!r}, not a non-empty str")
                first = seen.setdefault(k, old)
                if first != old:
                    raise errors.ConversionError(f"{where}: keys {first!r} and {old!r} both become {k!r}")
                new.append(k)
            yield (new, *records)

    return dataclasses.replace(source, chunks=chunks(), description={**source.description, "key": str(key)})


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
