"""Dask reads and writes embfile datasets (``pip install "embfile[dask]"``).

>>> embfile.dask.to_embfile(ddf, "esm2/", key="id", vector="emb", mode="append")   # doctest: +SKIP
>>> ddf = embfile.dask.read_embfile("esm2/")                                       # doctest: +SKIP
>>> x = embfile.open("esm2/").to_dask_array()        # Dataset.to_dask_array            # doctest: +SKIP

Writing is one task per partition and one commit at the end, as ``to_parquet`` does (:mod:`embfile.jobs`:
every key exactly once, whatever tasks were retried or whose worker died; a failed job commits nothing).
Reading gives a DataFrame of ``key`` and ``vector`` columns backed by Arrow (``vector`` a
``fixed_size_list`` of the stored type), one partition per shard or slice of one; graphs hold paths, never
data.  The folder is on a file system every worker sees, or at a URL (``s3://``, ``gs://``, ``hdfs://``;
``storage_options`` go to fsspec): tasks then upload what they write, and the commit reads only their keys.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embfile._extras import require

dask = require("dask", "dask")
dd = require("dask.dataframe", "dask")
da = require("dask.array", "dask")
bag = require("dask.bag", "dask")
pa = require("pyarrow", "dask")
pd = require("pandas", "dask")

from embfile import errors, jobs  # noqa: E402
from embfile._stream import Chunk, RaggedChunk, as_matrix, as_vector, chunk_rows  # noqa: E402
from embfile.changes import changed_runs  # noqa: E402
from embfile.dataset import Dataset, ReadPart  # noqa: E402
from embfile.shards import open as open_dataset  # noqa: E402
from embfile.shards import open_part  # noqa: E402

PathLike = str | os.PathLike[str]


def to_embfile(
    data: Any,
    path: PathLike,
    key: str | Sequence[str] | Any = "key",
    vector: str | Sequence[str] = "vector",
    *,
    mode: str = "error",
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    shard_bytes: int = 1 << 30,
    on_duplicate: str = "error",
    retries: int = 0,
    ragged: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Write ``data`` to the dataset folder ``path`` as one new version, and return its number.

    ``data`` is a Dask DataFrame (``key`` names its key column; ``vector`` a column of vectors, or a list of
    columns, one per dimension), a Dask Bag of ``(key, vector)`` pairs, or a 2-d Dask Array (``key`` then
    holds its keys: a sequence, or a Dask Array of strings chunked as its rows).  ``ragged=True``: per-residue
    records, each a ``(length, dim)`` matrix (a DataFrame column of 2-d arrays or of lists of vectors, or a
    Bag of ``(key, matrix)`` pairs).  ``mode``: ``"error"`` (a new dataset), ``"append"`` or ``"overwrite"``
    (either creates it if absent); ``dtype`` defaults to the array's, float32 otherwise.  A task that raises
    is tried again ``retries`` times (a task whose worker dies is always tried again, as Dask does); the files
    of every failed attempt are removed.  ``path`` may be a URL (see the module; ``storage_options`` go to
    fsspec, on every worker).
    """
    if dtype is None:
        dtype = data.dtype if isinstance(data, da.Array) else "float32"
    job = jobs.start_job(
        path,
        None,
        dtype,
        metadata,
        shard_bytes=shard_bytes,
        mode=mode,
        on_duplicate=on_duplicate,
        ragged=ragged,
        storage_options=storage_options,
    )
    try:
        parts = [dask.delayed(_write_part)(job, i, p) for i, p in enumerate(_partitions(data, key, vector, ragged))]
        manifest = dask.delayed(jobs.commit_job)(job, parts).compute(retries=retries)
    except BaseException:
        jobs.abort_job(job)
        raise
    return int(manifest.version)


def _partitions(data: Any, key: Any, vector: Any, ragged: bool) -> list[Any]:
    """One delayed ``(kind, partition, key, vector)`` per partition of ``data``."""
    if isinstance(data, dd.DataFrame):
        if ragged and not isinstance(vector, str):
            raise ValueError("ragged records come in one column (of 2-d arrays or of lists of vectors)")
        if key not in data.columns and key == data.index.name:  # ids as the index, as pandas users keep them
            data = data.reset_index()
        named = [key, *([vector] if isinstance(vector, str) else vector)]
        missing = [c for c in named if c not in data.columns]
        if missing:
            raise ValueError(
                f"no column {missing[0]!r} in the DataFrame; its columns: {', '.join(map(str, data.columns))}"
            )
        if isinstance(vector, str) and vector in data.columns and _is_text(data[vector].dtype):
            raise ValueError(
                f"column {vector!r} holds text, not vectors: Dask makes strings of a column of arrays (option "
                "'dataframe.convert-string'); give it Arrow lists (as read from Parquet), or set that option to False"
            )
        return [dask.delayed(tuple)(["frame", p, key, vector]) for p in data.to_delayed()]
    if isinstance(data, bag.Bag):
        return [dask.delayed(tuple)(["pairs", p, None, None]) for p in data.to_delayed()]
    if isinstance(data, da.Array):
        if ragged:
            raise ValueError("an array holds one vector per row; ragged records come in a DataFrame or a Bag")
        if data.ndim != 2:
            raise ValueError(f"to_embfile() takes a 2-d array, not one of shape {data.shape}")
        rows = data.rechunk({1: -1}).to_delayed()[:, 0]
        bounds = np.cumsum([0, *data.chunks[0]])
        if isinstance(key, da.Array):
            keys = key.rechunk((data.chunks[0],)).to_delayed()
        else:
            keys = [list(key[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
            if bounds[-1] != len(key):
                raise ValueError(f"{len(key)} keys for {bounds[-1]} rows")
        return [dask.delayed(tuple)(["array", m, k, None]) for m, k in zip(rows, keys)]
    raise TypeError(f"to_embfile() takes a Dask DataFrame, Bag or Array, not {type(data).__name__}")


def _write_part(job: jobs.Job, part: int, partition: tuple[str, Any, Any, Any]) -> jobs.PartResult:
    return jobs.write_part(job, part, _chunks(*partition, job.ragged))


def _chunks(kind: str, data: Any, key: Any, vector: Any, ragged: bool) -> Iterator[Chunk | RaggedChunk]:
    """A partition as ``(keys, matrix)`` chunks, or ragged ``(keys, rows, lengths)``."""
    if kind == "array":
        keys = np.asarray(key).tolist()
        yield keys, np.asarray(data)
    elif kind == "frame":
        if isinstance(vector, str):  # a column of lists (Arrow-backed, as from Parquet) or of arrays
            column = data[vector]
            if isinstance(column.dtype, pd.ArrowDtype):
                arrow = jobs.arrow_records if ragged else jobs.arrow_chunk
                yield arrow(_arrow(data[key]), _arrow(column), None)
            elif ragged:
                yield _records(_keys(data[key]), column.to_numpy())
            else:
                keys = _keys(data[key])
                yield keys, _stacked(keys, column.to_numpy())
        else:
            yield _keys(data[key]), data[list(vector)].to_numpy()
    else:  # pairs, read a chunk at a time: a partition may be a generator
        items = iter(data)
        while batch := list(itertools.islice(items, 4096)):
            keys, values = [k for k, _ in batch], [v for _, v in batch]
            yield _records(keys, values) if ragged else (keys, _stacked(keys, values))


def _keys(column: Any) -> list[Any]:
    """A key column's keys: integer ids as their decimal text, as the Parquet reader takes them."""
    keys: list[Any] = (column.astype(str) if pd.api.types.is_integer_dtype(column.dtype) else column).tolist()
    return keys


def _stacked(keys: list[Any], vectors: Sequence[Any]) -> np.ndarray:
    """``vectors`` as a matrix, or the WriterError naming the first key whose vector is not like the first one."""
    if not len(vectors):
        return np.empty((0, 0))
    try:
        return np.stack([np.asarray(v) for v in vectors])
    except ValueError:
        dim = len(as_vector(keys[0], vectors[0], None))
        for k, v in zip(keys, vectors):
            as_vector(k, v, dim)
        raise


def _records(keys: list[Any], records: Any) -> RaggedChunk:
    """Per-residue records as one ragged chunk, each a ``(length, dim)`` matrix of the first one's ``dim``
    (else a WriterError naming its key)."""
    matrices: list[np.ndarray] = []
    for key, record in zip(keys, records):
        try:
            m = np.asarray(record)
            if m.dtype == object:  # vectors held one by one (a list column read without Arrow)
                m = np.stack(list(m))
        except ValueError:
            raise errors.WriterError(f"key {key!r}: the record's vectors differ in length") from None
        matrices.append(as_matrix(key, m, matrices[0].shape[1] if matrices else None))
    lengths = np.array([len(m) for m in matrices], np.int64)
    return keys, np.concatenate(matrices) if matrices else np.empty((0, 0)), lengths


def _is_text(dtype: Any) -> bool:
    return isinstance(dtype, pd.StringDtype) or (
        isinstance(dtype, pd.ArrowDtype) and pa.types.is_string(dtype.pyarrow_dtype)
    )


def _arrow(series: Any) -> Any:
    """A pandas column as one Arrow array."""
    array = pa.array(series)
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def read_embfile(
    path: PathLike,
    version: int | str | None = None,
    rows_per_partition: int | None = None,
    *,
    since: int | str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """The dataset at ``path`` (a file, or a folder's latest version or ``version``) as a Dask DataFrame of
    ``key`` (string) and ``vector`` (a ``fixed_size_list`` of the stored type; of per-residue records a
    ``large_list`` of them) columns, Arrow-backed; one partition per shard, or slices of about
    ``rows_per_partition`` rows (default: about 128 MiB of records).  With ``since``, only the records added or
    replaced since that version (:func:`embfile.changes`): an incremental read.  At a URL, each task fetches
    its rows by range requests (the checksum blocks holding them, checked, and its file's keys), not its file."""
    with open_dataset(path, version, storage_options=storage_options) as ds:  # tasks read files of this version
        meta = _frame(ds, 0, 0)
        step = rows_per_partition or chunk_rows(ds.dim * ds.dtype.itemsize) * 8
        parts = ds.read_parts(step, None if since is None else changed_runs(ds, since, storage_options))
    tasks = [(part, storage_options) for part in parts]
    return dd.from_map(_read_part, tasks, meta=meta, divisions=None, enforce_metadata=False)


def _read_part(task: tuple[ReadPart, dict[str, Any] | None]) -> Any:
    part, storage_options = task
    with open_part(part, storage_options) as ds:  # its file alone
        return _frame(ds, part.lo, part.hi)


def _frame(ds: Dataset, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` as a pandas DataFrame, of the same column types in every partition (nullable ones:
    Dask's transport makes every column nullable, and pandas cannot concatenate two types that differ)."""
    table = ds._arrow_rows(lo, hi)  # from the file holding them alone
    vector = pa.list_(pa.field("item", pa.from_numpy_dtype(ds.dtype)), ds.dim)
    if ds.ragged:
        vector = pa.large_list(pa.field("item", vector))
    schema = pa.schema([("key", pa.string()), ("vector", vector)])
    return table.cast(schema).to_pandas(types_mapper=pd.ArrowDtype)
