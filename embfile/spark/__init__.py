"""Spark (4.0 or newer) reads and writes embfile datasets through its Python Data Source API
(``pip install "embfile[spark]"``).

>>> embfile.spark.register(spark)                                              # doctest: +SKIP
>>> df.write.format("embfile").mode("append").option("key", "id").save("esm2/") # doctest: +SKIP
>>> embfile.spark.read(spark, "esm2/")                                         # doctest: +SKIP
>>> embfile.spark.lookup(ids, "esm2/", key_col="id")                           # doctest: +SKIP

Writing: each task writes its partition's shards, and the driver commits them as one new version of the
folder (:mod:`embfile.jobs`: every key exactly once, whatever tasks failed or ran twice; a failed job commits
nothing).  ``mode("append")`` adds to a dataset (a key it holds is an error, or with ``option("on_duplicate",
"replace")`` replaces it), ``mode("overwrite")`` writes its next version; either creates the dataset if there
is none.  Options: ``key`` and ``vector`` (the columns, default ``key`` and ``vector``), ``dtype`` (default:
the vector column's element type), ``shard_bytes`` (default 1 GiB).  The vector column is an array of numbers
or Spark ML's ``vector`` (dense or sparse, written dense); one of ``array<array<T>>`` is written as
per-residue (ragged) records.

Reading: a DataFrame ``key string, vector array<T>``, one input partition per shard or slice of a shard (option
``rows_per_partition``): :func:`read` reads it on the JVM (:mod:`embfile.spark._jvm`), ``spark.read.format(
"embfile")`` by Python workers, as Arrow batches from the mapping.  Per-residue records read as ``vector
array<array<T>>``.  ``T`` is the stored type, except float16
and bfloat16 (read as float: Spark has no half types); uint64 has no Spark type.  Option ``version`` reads an
earlier one; option ``since`` only the records added or replaced since that version (:func:`embfile.changes`).

The folder is on a file system every executor and the driver see (a shared mount), or at a URL (``s3://``,
``gs://``, ``hdfs://``): tasks upload the shards they write, the commit reads only their keys, and a read
task fetches its rows (the checksum blocks holding them, checked) and its file's keys.  Option
``storage_options`` (a JSON object) goes to fsspec on every task; credentials are better left to the
environment each executor has (``AWS_*`` variables, an instance role), as an option's value shows in Spark's
plans.  With pyspark installed, ``spark.read.format("embfile")``
works without :func:`register` too: Spark finds the ``pyspark_embfile`` module embfile installs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile._extras import require

require("pyspark", "spark")
pa = require("pyarrow", "spark")

from pyspark.sql import DataFrame, SparkSession  # noqa: E402
from pyspark.sql.datasource import (  # noqa: E402
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import ArrayType, DoubleType, StructType, _parse_datatype_string  # noqa: E402

from embfile import errors, jobs, remote  # noqa: E402
from embfile._stream import Chunk, RaggedChunk, record_cuts  # noqa: E402
from embfile.changes import changed_runs  # noqa: E402
from embfile.dataset import Dataset, ReadPart  # noqa: E402
from embfile.shards import open as open_dataset  # noqa: E402
from embfile.shards import open_part  # noqa: E402
from embfile.spark import _jvm  # noqa: E402

ROWS_PER_BATCH = 8192  # rows per Arrow batch a read task hands to Spark
PARTITION_BYTES = 128 << 20  # records per read task, by default

# numpy dtype -> (Spark SQL type, Arrow type of the values Spark gets)
SPARK_TYPES = {
    "float16": ("float", pa.float32()),
    "bfloat16": ("float", pa.float32()),
    "float32": ("float", pa.float32()),
    "float64": ("double", pa.float64()),
    "int8": ("byte", pa.int8()),
    "int16": ("short", pa.int16()),
    "int32": ("int", pa.int32()),
    "int64": ("long", pa.int64()),
    "uint8": ("short", pa.int16()),
    "uint16": ("int", pa.int32()),
    "uint32": ("long", pa.int64()),
}
# Spark element type -> the dtype stored by default
STORED = {"float": "float32", "double": "float64", "byte": "int8", "short": "int16", "int": "int32", "long": "int64"}


def register(spark: SparkSession) -> None:
    """Make ``format("embfile")`` available to ``spark`` (needed only where Spark does not find
    ``pyspark_embfile`` by itself)."""
    spark.dataSource.register(EmbfileDataSource)


class EmbfileDataSource(DataSource):
    """The ``embfile`` format of ``spark.read`` and ``df.write`` (see the module)."""

    @classmethod
    def name(cls) -> str:
        return "embfile"

    def _path(self) -> str:
        path = self.options.get("path")
        if not path:
            raise errors.EmbFileError("embfile: give the dataset's path to load() or save()")
        return str(path)

    def schema(self) -> str:
        with open_dataset(
            self._path(), _version(self.options.get("version")), storage_options=_storage(self.options)
        ) as ds:
            return f"key string, vector {_spark_column(ds)}"

    def reader(self, schema: StructType) -> DataSourceReader:
        return _Reader(self._path(), self.options)

    def writer(self, schema: StructType, overwrite: bool) -> DataSourceArrowWriter:
        return _Writer(self._path(), self.options, schema, overwrite)


@dataclasses.dataclass
class _Rows(InputPartition):
    """A task's records, of one file (:meth:`embfile.Dataset.read_parts`)."""

    part: ReadPart


class _Reader(DataSourceReader):
    def __init__(self, path: str, options: Any) -> None:
        self.path, self.version, self.since = path, _version(options.get("version")), _version(options.get("since"))
        self.rows_per_partition = int(options.get("rows_per_partition", 0))
        self.storage_options = _storage(options)

    def partitions(self) -> list[_Rows]:
        with open_dataset(self.path, self.version, storage_options=self.storage_options) as ds:
            # every task reads a file of the version planned here
            runs = _runs_since(ds, self.since, self.storage_options)
            return [_Rows(part) for part in ds.read_parts(_step(ds, self.rows_per_partition), runs)]

    def read(self, partition: InputPartition) -> Iterator[Any]:
        assert isinstance(partition, _Rows)
        first, last = partition.part.lo, partition.part.hi
        with open_part(partition.part, self.storage_options) as ds:  # its file alone
            ds.fetch_records(first, last)  # at a URL: its rows' checksum blocks, checked
            _, value_type = _spark_type(ds)
            if ds.ragged:
                yield from _record_batches(ds, first, last, value_type)
                return
            out_type = pa.list_(pa.field("element", value_type))
            # this task's rows (Arrow has no bfloat16: those come from the mapping)
            table = ds._arrow_rows(first, last) if ds.dtype.name != "bfloat16" else None
            for lo in range(first, last, ROWS_PER_BATCH):
                hi = min(last, lo + ROWS_PER_BATCH)
                if table is not None:
                    part = table.slice(lo - first, hi - lo).combine_chunks()
                    keys, values = part.column(0).chunk(0), part.column(1).chunk(0).flatten()
                else:
                    rows = np.arange(lo, hi, dtype=np.uint64)
                    keys, values = pa.array(ds.keys_at(rows)), _values(ds.take(rows))
                offsets = pa.array(np.arange(0, (hi - lo) * ds.dim + 1, ds.dim, dtype=np.int32))
                yield pa.RecordBatch.from_arrays(
                    [keys.cast(pa.string()), pa.ListArray.from_arrays(offsets, values.cast(value_type), out_type)],
                    names=["key", "vector"],
                )


@dataclasses.dataclass
class _Written(WriterCommitMessage):
    result: jobs.PartResult


class _Writer(DataSourceArrowWriter):
    def __init__(self, path: str, options: Any, schema: StructType, overwrite: bool) -> None:
        self.key, self.vector = options.get("key", "key"), options.get("vector", "vector")
        fields = {f.name: f.dataType for f in schema.fields}
        for column in (self.key, self.vector):
            if column not in fields:
                raise errors.WriterError(
                    f"embfile: no column {column!r} (option key / vector); columns: {list(fields)}"
                )
        column = fields[self.vector]
        self.ml_vectors = type(column).__name__ == "VectorUDT"  # Spark ML's vectors, dense or sparse, of doubles
        if self.ml_vectors:
            column = ArrayType(DoubleType(), containsNull=False)
        inner = column.elementType if isinstance(column, ArrayType) else None
        self.ragged = isinstance(inner, ArrayType)  # per-residue records: an array of vectors each
        element = inner if self.ragged else column
        if not isinstance(element, ArrayType) or element.elementType.simpleString() not in STORED:
            raise errors.WriterError(
                f"embfile: column {self.vector!r} is {column.simpleString()}, not an array of numbers "
                "(or, per residue, of arrays of numbers)"
            )
        dtype = options.get("dtype") or STORED[element.elementType.simpleString()]
        self.job = jobs.start_job(
            path,
            None,
            dtype,
            shard_bytes=int(options.get("shard_bytes", 1 << 30)),
            mode="overwrite" if overwrite else "append",  # either makes a dataset where there is none
            on_duplicate=options.get("on_duplicate", "error"),
            ragged=self.ragged,
            storage_options=_storage(options),
        )

    def write(self, iterator: Iterator[Any]) -> _Written:
        from pyspark import TaskContext

        context = TaskContext.get()
        part = context.partitionId() if context is not None else 0
        chunks = (_chunk(batch, self.key, self.vector, self.job, self.ml_vectors) for batch in iterator)
        return _Written(jobs.write_part(self.job, part, chunks))

    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        jobs.commit_job(self.job, [m.result if isinstance(m, _Written) else None for m in messages])

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        jobs.abort_job(self.job)


def lookup(
    df: DataFrame,
    path: str,
    key_col: str = "key",
    out_col: str = "vector",
    storage_options: dict[str, Any] | None = None,
) -> DataFrame:
    """``df`` with a column ``out_col`` of the vectors of its ``key_col`` keys (null for a key not in the
    dataset), read from the latest version of the dataset at ``path`` without reading the rest of it: each task
    opens the dataset by path and gathers its keys (at a URL, by range reads)."""
    if key_col not in df.columns:
        raise ValueError(f"embfile: no column {key_col!r} (key_col); columns: {df.columns}")
    with open_dataset(path, None, storage_options=storage_options) as ds:
        _, value_type = _spark_type(ds)
        column, version = _spark_column(ds), ds.version
    schema = StructType([*df.schema.fields]).add(out_col, _parse_datatype_string(column))

    def gather(batches: Iterator[Any]) -> Iterator[Any]:
        with open_dataset(path, version, storage_options=storage_options) as ds:
            out_type = pa.list_(pa.field("element", value_type))
            for batch in batches:
                keys = jobs.text_keys(batch.column(key_col)).to_pylist()  # integer ids as written
                rows = ds.find_rows(["" if k is None else k for k in keys])
                found = rows >= 0
                if ds.ragged:  # in runs of about ROWS_PER_BATCH rows: Spark's lists count values in 32 bits
                    lengths = np.zeros(len(keys), np.int64)
                    lengths[found] = ds._extents(rows[found].astype(np.uint64))[1]
                    for a, b in _runs(lengths):
                        records = _nested(ds, rows[a:b][found[a:b]], value_type, found[a:b])
                        part = batch.slice(a, b - a)
                        yield pa.RecordBatch.from_arrays([*part.columns, records], names=[*part.schema.names, out_col])
                    continue
                matrix = np.zeros((len(keys), ds.dim), ds.dtype)
                matrix[found] = ds.take(rows[found])
                values = _values(matrix).cast(value_type)
                offsets = pa.array(np.arange(0, len(keys) * ds.dim + 1, ds.dim, dtype=np.int32))
                vectors = pa.ListArray.from_arrays(offsets, values, out_type, mask=pa.array(~found))
                yield pa.RecordBatch.from_arrays([*batch.columns, vectors], names=[*batch.schema.names, out_col])

    return df.mapInArrow(gather, schema)


def read(
    spark: SparkSession,
    path: str,
    version: int | str | None = None,
    rows_per_partition: int = 0,
    storage_options: dict[str, Any] | None = None,
    since: int | str | None = None,
) -> DataFrame:
    """``spark.read.format("embfile").load(path)``, read by a JVM reader instead of Python workers.

    The same DataFrame (``key string, vector array<T>``, one partition per file or slice of a file), read
    several times faster: no row crosses from Python to the JVM.  The reader is compiled against the running
    Spark at the first read on a machine (seconds, then cached; it needs a JDK's ``javac``); where it
    cannot be, this warns once and reads through the Python data source.  The driver opens the dataset to plan
    the read, so its files are checked as :func:`embfile.open` checks them.  A URL (``s3://``, ``https://``...)
    is read through the Python data source too (``storage_options`` go to fsspec): the JVM reader reads files
    every executor sees, and there each task fetches its rows by range requests.  With ``since`` (option ``since``),
    only the records added or replaced since that version (:func:`embfile.changes`): an incremental read.
    """
    if remote.is_url(path):
        return _python_read(spark, path, version, rows_per_partition, storage_options, since)
    with open_dataset(path, version, storage_options=storage_options) as ds:  # (a local path takes none)
        _spark_type(ds)
        planned, dtype, ragged = ds.version, ds.dtype.name, ds.ragged
        parts = _jvm.partitions(ds, ds.slices(_step(ds, rows_per_partition), _runs_since(ds, since, None)))
    try:
        _jvm.load(spark)
    except _jvm.Unavailable as e:
        _warn_once(f"embfile.spark.read: {e}; reading through the Python data source")
        return _python_read(spark, path, planned, rows_per_partition, since=since)
    reader = spark.read.format(_jvm.CLASS).option("dtype", dtype).option("ragged", str(ragged).lower())
    return reader.option("partitions", parts).load()


def _python_read(
    spark: SparkSession,
    path: str,
    version: int | str | None,
    rows_per_partition: int,
    storage_options: dict[str, Any] | None = None,
    since: int | str | None = None,
) -> DataFrame:
    reader = spark.read.format("embfile").option("rows_per_partition", rows_per_partition)
    if storage_options:
        reader = reader.option("storage_options", json.dumps(storage_options))
    if since is not None:
        reader = reader.option("since", since)
    return reader.option("version", "" if version is None else version).load(str(path))


def _storage(options: Any) -> dict[str, Any] | None:
    """The ``storage_options`` option (a JSON object, for fsspec), or None."""
    text = options.get("storage_options")
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.EmbFileError(f"embfile: option storage_options is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise errors.EmbFileError("embfile: option storage_options must be a JSON object")
    return value


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _step(ds: Dataset, rows_per_partition: int) -> int:
    """Rows a read partition reads: about 128 MiB of them, unless ``rows_per_partition``."""
    return rows_per_partition or max(1, PARTITION_BYTES // (ds.dim * ds.dtype.itemsize))


def _runs_since(ds: Dataset, since: int | str | None, storage_options: dict[str, Any] | None) -> Any:
    """The runs of records changed ``since`` a version, if given (else None: every record)."""
    return None if since is None else changed_runs(ds, since, storage_options)


def _version(value: Any) -> int | str | None:
    """An option naming a version: by number, or by a tag's name."""
    if value in (None, ""):
        return None
    text = str(value)
    return int(text) if text.isdigit() else text


def _spark_type(ds: Dataset) -> tuple[str, Any]:
    """The Spark type of ``ds``'s elements and the Arrow type Spark takes them in."""
    if ds.dtype.name not in SPARK_TYPES:
        raise errors.EmbFileError(f"{ds.path}: {ds.dtype.name} vectors have no Spark type")
    return SPARK_TYPES[ds.dtype.name]


def _spark_column(ds: Dataset) -> str:
    """The Spark type of ``ds``'s records: ``array<T>``, or of per-residue records ``array<array<T>>``."""
    vector = f"array<{_spark_type(ds)[0]}>"
    return f"array<{vector}>" if ds.ragged else vector


def _record_batches(ds: Dataset, lo: int, hi: int, value_type: Any) -> Iterator[Any]:
    """Per-residue records ``[lo, hi)`` as Arrow batches of ``key`` and ``vector`` (a list of lists), about
    ROWS_PER_BATCH rows each (Spark's lists count their values in 32 bits)."""
    # of the file holding them alone, checked as to_arrow checks (Arrow has no bfloat16: those from the mapping)
    table = ds._arrow_rows(lo, hi) if ds.dtype.name != "bfloat16" else None
    out_type = pa.list_(pa.field("element", pa.list_(pa.field("element", value_type))))
    if table is not None:  # this task's records' lengths
        lengths = np.diff(np.asarray(table.column(1).combine_chunks().offsets))
    else:
        lengths = ds._extents(np.arange(lo, hi, dtype=np.uint64))[1]
    for a, b in _runs(lengths):
        if table is not None:
            part = table.slice(a, b - a).combine_chunks()
            keys, records = part.column(0).chunk(0), part.column(1).chunk(0).cast(out_type)
        else:
            rows = np.arange(lo + a, lo + b, dtype=np.uint64)
            keys, records = pa.array(ds.keys_at(rows)), _nested(ds, rows, value_type)
        yield pa.RecordBatch.from_arrays([keys.cast(pa.string()), records], names=["key", "vector"])


def _runs(lengths: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive ranges of the records of these ``lengths`` (rows each), about ROWS_PER_BATCH rows each, cut
    between records."""
    cuts = record_cuts(lengths, ROWS_PER_BATCH)
    return list(zip(cuts, cuts[1:]))


def _nested(ds: Dataset, rows: np.ndarray, value_type: Any, found: np.ndarray | None = None) -> Any:
    """The per-residue records at ``rows`` as an Arrow list of lists of ``value_type`` (null where ``found`` is
    False: ``rows`` holds only the found ones)."""
    packed, offsets = ds.take(rows, pad=False) if len(rows) else (np.empty((0, ds.dim), ds.dtype), np.zeros(1))
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, len(packed) * ds.dim + 1, ds.dim, dtype=np.int32)),
        _values(packed).cast(value_type),
        pa.list_(pa.field("element", value_type)),
    )
    lengths = np.diff(offsets).astype(np.int32)
    if found is not None:  # no rows for a key not found
        lengths, found_lengths = np.zeros(len(found), np.int32), lengths
        lengths[found] = found_lengths
    outer = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=outer[1:])
    out_type = pa.list_(pa.field("element", inner.type))
    return pa.ListArray.from_arrays(pa.array(outer), inner, out_type, mask=None if found is None else pa.array(~found))


def _values(matrix: np.ndarray) -> Any:
    """The values of ``matrix`` as an Arrow array (bfloat16, which Arrow lacks, widened to float32: exactly)."""
    return pa.array((matrix.astype(np.float32) if matrix.dtype.name == "bfloat16" else matrix).reshape(-1))


def _chunk(batch: Any, key: str, vector: str, job: jobs.Job, ml_vectors: bool = False) -> Chunk | RaggedChunk:
    """An Arrow batch of Spark rows as ``(keys, matrix)``, or ragged ``(keys, rows, lengths)``; a column of
    Spark ML vectors as the lists of their values."""
    try:
        arrow = jobs.arrow_records if job.ragged else jobs.arrow_chunk
        vectors = _dense(batch.column(vector)) if ml_vectors else batch.column(vector)
        return arrow(batch.column(key), vectors, job.dim)
    except errors.WriterError as e:
        raise errors.WriterError(f"embfile: {e}") from None


def _dense(column: Any) -> Any:
    """Spark ML vectors as Arrow gives them (``struct<type, size, indices, values>``: type 1 dense, its
    ``values`` the vector; type 0 sparse, ``size`` zeros but at ``indices``) as lists of their values."""
    kinds = column.field("type").fill_null(1).to_numpy(zero_copy_only=False)
    values = column.field("values")
    mask = column.is_null()
    if (kinds == 1).all():
        return pa.ListArray.from_arrays(values.offsets, values.values, mask=mask)
    sizes = column.field("size").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    held = np.diff(np.asarray(values.offsets))  # values each row holds
    lengths = np.where(kinds == 1, held, sizes)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.zeros(int(offsets[-1]))
    flat[np.repeat(kinds == 1, lengths)] = values.flatten().to_numpy()[np.repeat(kinds == 1, held)]
    for i in np.flatnonzero(kinds == 0).tolist():
        flat[offsets[i] + np.asarray(column.field("indices")[i].values)] = np.asarray(values[i].values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat), mask=mask)


__all__ = ["register", "read", "lookup", "EmbfileDataSource"]
