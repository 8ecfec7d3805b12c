"""Exact nearest-neighbour search over a dataset: a streaming scan of the mapping with a running top-k.

The records are read a block at a time straight from the mapping and scored against every query, and each
block's scores are merged into a running best ``k`` per query (a heap in the core: most scores are rejected
by one comparison).  A few queries (up to ``KERNEL_QUERIES`` of the stored type) over float32, float16,
bfloat16, int8 or uint8 records go to the core's ``dot``: one pass over the mapping, narrow values widened in
registers, the rows split over the cores, nothing copied; the scan then runs at the speed memory delivers the
rows.  Many queries, or other types, are one matrix product per block (numpy's BLAS) on the block
converted to float32 (float64 for float64 files): compute-bound, where BLAS is at its best.  Narrow types stay
longer with the kernel, as BLAS would first need the block widened into a copy.  Memory stays flat
in the number of records.  Cosine and l2 need each record's norm: computed once per handle and kept.

A ragged dataset (per-residue records) is searched through :class:`Pooled`: each record's rows pooled into one
vector as the scan reaches them.

Records of packed bits (uint8 or int8: ``np.packbits``, the binary quantization of embedding models) are searched
by ``hamming`` distance, the bits that differ, counted in the core with the CPU's popcount; queries packed alike.

``dims`` searches the leading values of each record alone (:class:`Leading`): Matryoshka embeddings (OpenAI's
text-embedding-3, nomic-embed, ...) are trained so a prefix is an embedding of its own, and a scan of 256 of 1536
values reads a sixth of the memory.  The kernels take the records' stride: nothing is copied.

Order: best first (highest similarity for ``cosine`` and ``ip``, smallest distance for ``l2`` and ``hamming``);
equal scores in row order.  Scores are float32.  A record holding NaN scores NaN and ranks after every other;
a query holding NaN or infinity is refused (it would score every record alike); a zero vector has cosine
similarity 0 with every query.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from embfile import _core
from embfile import _format as F
from embfile._keys import key_list
from embfile._stream import POOLINGS, pool_rows


class Dataset(Protocol):
    """What a search reads of a dataset (:class:`embfile.Dataset` has it all)."""

    dim: int
    dtype: np.dtype
    _norms: dict[int, tuple[np.ndarray, np.ndarray]] | None

    def __len__(self) -> int: ...
    def chunks(self, rows: int, release: bool = True) -> Iterator[tuple[int, int, np.ndarray]]: ...
    def keys_at(self, rows: np.ndarray) -> list[str]: ...
    def find_rows(self, keys: Sequence[str]) -> np.ndarray: ...
    def rows(self, keys: Sequence[str]) -> np.ndarray: ...
    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray: ...


METRICS = ("cosine", "ip", "l2", "hamming")
BLOCK_BYTES = 64 << 20  # records scored at a time (for BLAS, converted to float32: a bounded copy)
KERNEL_BLOCK_BYTES = 256 << 20  # for the kernel, which copies nothing: fewer waits for both threads to end
# up to this many queries, the core's kernel (values widened in registers); more, BLAS on a float32 copy
KERNEL_QUERIES = {"float32": 12, "float16": 16, "bfloat16": 16, "int8": 16, "uint8": 16}
THREADS = min(os.cpu_count() or 1, 8)
GATHER_SHARE = 32  # ``among`` fewer than a 32nd of the records: gathered, else found in a scan of all


def search(
    ds: Dataset,
    queries: Any,
    k: int = 10,
    metric: str = "cosine",
    exclude: Iterable[str] | None = None,
    exclude_rows: np.ndarray | None = None,
    among: Iterable[str] | None = None,
    dims: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, keys)`` of the ``k`` records nearest each query (see :meth:`embfile.Dataset.search`).

    ``exclude_rows``: a ``(Q,)`` array of one row per query to leave out (-1: none), for searches by stored key.
    ``among``: the keys of the only records scored (gathered a block at a time), else every record's.
    ``dims``: the leading values of each record compared, else all of them.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, not {k!r}")
    q = np.asarray(queries)
    single = q.ndim == 1
    q = np.atleast_2d(q)
    if q.dtype.kind in "US":
        raise ValueError("queries are vectors; search_keys() searches by stored keys")
    shapes = f"({ds.dim},) or (Q, {ds.dim})"
    if dims is not None:
        if not isinstance(dims, (int, np.integer)) or isinstance(dims, bool) or not 1 <= dims <= ds.dim:
            raise ValueError(f"dims must be an int from 1 to {ds.dim} (the values of each record), not {dims!r}")
        shapes = f"({dims},) or (Q, {dims}), or the whole ({ds.dim},) or (Q, {ds.dim}) cut to {dims}"
        if q.ndim == 2 and q.shape[1] == ds.dim:  # a model's whole embedding, cut as the records are
            q = q[:, :dims]
        ds = Leading(ds, int(dims))
    if q.ndim != 2 or q.shape[1] != ds.dim or F.kind(q.dtype) not in "biuf":
        raise ValueError(f"queries must be numbers of shape {shapes}, not {q.dtype} {q.shape}")
    work = np.float64 if ds.dtype == np.float64 else np.float32
    if metric == "hamming":
        q = _packed_bits(ds, q)
    else:
        if q.dtype.kind == "f":
            _refuse_unfinite(q, "NaN or infinity")
        with np.errstate(over="ignore"):
            q = q.astype(work)
        _refuse_unfinite(q, f"values beyond {np.dtype(work)}, which the search computes in")
    if exclude_rows is not None and len(exclude_rows) != len(q):
        raise ValueError(f"{len(exclude_rows)} query_keys for {len(q)} queries: one key each")
    candidates = None if among is None else np.unique(ds.rows(key_list(among, "among")))
    excluded = np.zeros(0, np.int64) if exclude is None else _rows_of(ds, exclude)
    if candidates is not None:
        candidates = np.setdiff1d(candidates, excluded, assume_unique=True)
    n_candidates = len(ds) - len(excluded) if candidates is None else len(candidates)
    if not len(q):
        shape = (0, min(k, n_candidates))
        return np.empty(shape, work), np.empty(shape, object)
    if metric == "cosine":
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)
    extra = 0 if exclude_rows is None else 1  # one more, for the row each query leaves out
    best = _core.TopK(len(q), min(k + extra, n_candidates), metric in ("l2", "hamming"), THREADS)
    q_sq = (q * q).sum(axis=1) if metric == "l2" else None
    kernel = len(q) <= KERNEL_QUERIES.get(ds.dtype.name, 0) or metric == "hamming"
    width = ds.dtype.itemsize if kernel else max(ds.dtype.itemsize, np.dtype(work).itemsize)  # bytes per element held
    # a few candidates are gathered (a copy: no larger a block than BLAS's converted one); more, the scan's
    # blocks are scored and only the rows wanted kept, as gathering scattered rows costs more than reading all
    gather = candidates is not None and len(candidates) * GATHER_SHARE < len(ds)
    wanted = None
    if not gather and (candidates is not None or excluded.size):
        wanted = np.ones(len(ds), bool) if candidates is None else np.zeros(len(ds), bool)
        wanted[excluded if candidates is None else candidates] = candidates is not None
    step = max(1, (KERNEL_BLOCK_BYTES if kernel and not gather else BLOCK_BYTES) // (ds.dim * width))
    scores_buffer = np.empty((len(q), min(step, len(ds))), work)  # reused: a fresh array per block costs faults
    widened = np.empty((min(step, len(ds)), ds.dim), np.float32) if ds.dtype == np.float16 and not kernel else None
    for rows, block in _blocks(ds, step, candidates if gather else None):
        scores = scores_buffer[:, : len(rows)]  # (Q, rows): each query's scores contiguous, for the top-k
        if metric == "hamming":
            _core.hamming(block, q, THREADS, out=scores)
        elif kernel:
            _core.dot(block, q, THREADS, out=scores)
        else:
            x = (
                block.astype(work, copy=False)
                if widened is None
                else _core.widen(np.ascontiguousarray(block), THREADS, widened[: len(block)])
            )
            np.matmul(q, x.T, out=scores)
        if metric == "cosine":
            n = _norms(ds, rows, block, work)
            np.divide(scores, n, out=scores, where=n > 0)
            scores[:, n == 0] = 0
        elif metric == "l2":
            assert q_sq is not None
            n = _norms(ds, rows, block, work)
            scores = (n * n)[None, :] - 2 * scores + q_sq[:, None]
            np.sqrt(np.maximum(scores, 0, out=scores), out=scores)
        if wanted is not None:
            kept = wanted[rows[0] : rows[-1] + 1]  # (the scan's rows: consecutive)
            rows, scores = rows[kept], scores[:, kept]
        best.add(scores, rows)
    scores, rows = best.result()
    if exclude_rows is not None:  # drop each query's own row (or, if it is not among them, the last)
        keep = rows != exclude_rows[:, None]
        keep[keep.all(axis=1), -1] = False
        width = max(0, rows.shape[1] - 1)
        scores, rows = scores[keep].reshape(-1, width), rows[keep].reshape(-1, width)
        scores, rows = scores[:, :k], rows[:, :k]
    keys = np.empty(rows.shape, object)
    keys.flat[:] = ds.keys_at(rows.reshape(-1).astype(np.uint64)) if rows.size else []
    if single:
        return scores[0], keys[0]
    return scores, keys


def search_keys(
    ds: Dataset,
    keys: Sequence[str],
    k: int = 10,
    metric: str = "cosine",
    exclude_self: bool = True,
    among: Iterable[str] | None = None,
    dims: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Search with the stored vectors of ``keys`` as the queries; each key's own record left out (by row, not
    by distance: an identical vector under another key is still found)."""
    keys = key_list(keys, "search_keys()")
    rows = ds.rows(keys)
    queries = ds.take(rows)
    compared = queries if dims is None else queries[:, :dims]  # (NaN past the prefix counts for nothing)
    bad = np.flatnonzero(~np.isfinite(compared).all(axis=1)) if F.kind(queries.dtype) == "f" else np.zeros(0, int)
    if bad.size:
        raise ValueError(f"key {keys[bad[0]]!r} holds NaN or infinity: it would score every record alike")
    return search(ds, queries, k, metric, exclude_rows=rows if exclude_self else None, among=among, dims=dims)


class Leading:
    """The leading ``dim`` values of each record of a dataset, as views of its blocks (rows a record's length
    apart, which the core's kernels take as they are), for a search of Matryoshka embeddings' prefixes.  The
    norms of the prefix are kept with the dataset's, by their length."""

    def __init__(self, ds: Dataset, dim: int) -> None:
        self._ds, self.dim, self.dtype = ds, dim, ds.dtype
        if ds._norms is None:
            ds._norms = {}
        self._norms: dict[int, tuple[np.ndarray, np.ndarray]] | None = ds._norms  # shared, by length
        self.keys_at, self.find_rows, self.rows = ds.keys_at, ds.find_rows, ds.rows

    def __len__(self) -> int:
        return len(self._ds)

    def chunks(self, rows: int, release: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
        for lo, hi, block in self._ds.chunks(rows, release):
            yield lo, hi, block[:, : self.dim]

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        taken: np.ndarray = self._ds.take(rows)[:, : self.dim]
        return taken


class Pooled:
    """A ragged dataset as one vector per record, its rows pooled ``how`` (``"mean"``, ``"max"``, ``"first"``,
    ``"last"``) as a search's scan reaches them: float32 (float64 for float64 files), a mean summed as
    :meth:`embfile.Dataset.pool` sums it.  Nothing is written or kept between searches, so every search reads
    every row; a per-protein file made once (``db.pool(how, out=...)``) is the faster choice for many."""

    def __init__(self, ds: Any, how: str) -> None:
        if how not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLINGS))}, not {how!r}")
        self._ds, self._how = ds, how
        self.dim = ds.dim
        self.dtype = np.dtype(np.float64 if ds.dtype == np.float64 else np.float32)
        self._norms: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self.keys_at, self.find_rows, self.rows = ds.keys_at, ds.find_rows, ds.rows

    def __len__(self) -> int:
        return len(self._ds)

    def chunks(self, rows: int, release: bool = True) -> Iterator[tuple[int, int, np.ndarray]]:
        """Pooled vectors of consecutive records, of about ``rows`` stored rows at a time (so at most ``rows``
        records)."""
        for lo, hi, block, offsets in self._ds.ragged_chunks(rows):
            yield lo, hi, np.ascontiguousarray(pool_rows(block, offsets, self._how), self.dtype)

    def take(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        packed, offsets = self._ds.take(rows, pad=False)
        pooled: np.ndarray = pool_rows(packed, offsets, self._how).astype(self.dtype)
        return pooled


def _packed_bits(ds: Dataset, q: np.ndarray) -> np.ndarray:
    """Queries for a Hamming search, in the stored type: packed bits, as the records hold them."""
    if ds.dtype.itemsize != 1 or ds.dtype.kind not in "iu":
        raise ValueError(
            f"hamming compares packed bits: records of uint8 or int8 (np.packbits, binary quantization), not {ds.dtype}"
        )
    packed = q.astype(ds.dtype)
    if q.dtype.kind not in "iu" or not np.array_equal(packed, q):
        what = f"these hold values beyond {ds.dtype}" if q.dtype.kind in "iu" else f"not {q.dtype}"
        raise ValueError(f"hamming queries are packed bits (np.packbits) of {ds.dtype}, as stored; {what}")
    return packed


def _refuse_unfinite(q: np.ndarray, what: str) -> None:
    """A query of NaN or infinity would score every record alike (NaN, or 0 for cosine), and the search would
    return the first rows."""
    bad = np.flatnonzero(~np.isfinite(q).all(axis=1))
    if bad.size:
        raise ValueError(f"query {bad[0]} holds {what} ({bad.size} of {len(q)} queries do)")


def _rows_of(ds: Dataset, keys: Iterable[str]) -> np.ndarray:
    rows = ds.find_rows(key_list(keys, "exclude"))
    return np.unique(rows[rows >= 0])


def _blocks(ds: Dataset, step: int, candidates: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, block)``: every record, ``step`` rows at a time, straight from the mapping (its pages stay
    mapped: the next search finds them); or only the rows of ``candidates``, gathered ``step`` at a time."""
    if candidates is None:
        for lo, hi, block in ds.chunks(step, release=False):
            yield np.arange(lo, hi), block
        return
    for i in range(0, len(candidates), step):
        rows = candidates[i : i + step]
        yield rows, ds.take(rows)


def _norms(ds: Dataset, rows: np.ndarray, block: np.ndarray, work: Any) -> np.ndarray:
    """The norms of ``rows`` (``block`` holds them, as stored, or their leading values): computed once per
    handle and number of values, then kept."""
    if ds._norms is None:
        ds._norms = {}
    kept = ds._norms.get(block.shape[1])
    if kept is None:
        kept = ds._norms[block.shape[1]] = (np.zeros(len(ds), work), np.zeros(len(ds), bool))
    values, known = kept
    at = slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) and rows[-1] - rows[0] + 1 == len(rows) else rows
    if not known[at].all():
        x = block.astype(work, copy=False)
        values[at] = np.sqrt(np.einsum("ij,ij->i", x, x))
        known[at] = True
    return values[at]
