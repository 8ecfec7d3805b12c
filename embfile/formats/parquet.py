"""Parquet (and Arrow) in and out; Lance datasets in.

Input: a file or a folder of files with one string key column and the vectors as ``fixed_size_list``,
``list`` or ``large_list`` of numbers (what pyarrow, pandas, Hugging Face datasets and polars write), or one
numeric column per dimension ("wide": found when the other columns are numbered, ``v0, v1, ...``, else
selected by a prefix or a list); or per-residue matrices as a list of such lists (``list<list<float>>``,
``list<fixed_size_list>``), read as ragged records.  Read a batch at a time, never whole.
A null float value is read as NaN (pandas writes NaN as null); a null vector, a
null integer or a vector of the wrong length is an error naming its row and key.

Output: a ``key`` column and a ``fixed_size_list<dtype>[dim]`` ``vector`` column (per-residue
records: ``large_list<fixed_size_list<dtype>[dim]>``), both declared not null (an .emb file has no
null key, vector or value, and pyarrow encodes required columns faster), written row group by row
group from the mapped records themselves (:meth:`~embfile.Dataset.to_arrow` wraps the mapping; nothing is copied before
Parquet encodes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embfile import errors
from embfile._extras import require
from embfile._stream import (
    Chunk,
    OnError,
    RaggedChunk,
    Source,
    chunk_rows,
    pooled,
    progress_bar,
    require_unique_encoded,
)
from embfile.dataset import ARROW_METADATA_KEY, EmbFile
from embfile.formats._common import atomic_output, damage_named, start_writeback

ROW_GROUP_BYTES = 64 << 20  # default row group: about this many bytes of vectors
STREAM_ROWS = 4096  # rows a streamed datasets.IterableDataset gives at a time
# A file named for a dataset split (train.parquet, test-00000-of-00002.parquet as Hugging Face writes them)
_SPLIT = re.compile(r"(train|test|validation|valid|val|dev)(?=[-_.\d])", re.IGNORECASE)


def to_parquet(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    row_group_size: int | None = None,
    compression: str = "snappy",
    key_column: str = "key",
    vector_column: str = "vector",
    progress: bool = False,
) -> str:
    """Write the .emb file ``src`` to Parquet at ``dst`` (atomic).

    ``row_group_size`` is in rows (default: about 64 MiB of vectors).  Keys are
    written as ``string``, vectors as ``fixed_size_list``, neither nullable;
    ``compression`` applies to the keys only, since embedding values barely
    compress.  The .emb metadata is kept in the schema metadata under
    ``embfile.metadata``.
    """
    pa = require("pyarrow", "parquet")
    pq = require("pyarrow.parquet", "parquet")
    with EmbFile(src) as db, progress_bar(len(db), progress, os.path.basename(os.fspath(dst))) as bar:
        record = db.dim * db.dtype.itemsize
        rows = row_group_size or max(1, ROW_GROUP_BYTES // record)
        table = db.to_arrow(key_column, vector_column)
        key_field = pa.field(key_column, pa.string(), nullable=False)
        schema = pa.schema([key_field, table.schema.field(vector_column)], metadata=table.schema.metadata)
        with atomic_output(dst, db.header.keys_size + db.matrix.nbytes) as tmp:
            with pq.ParquetWriter(
                tmp,
                schema,
                compression={key_column: compression, vector_column: "none"},
                use_dictionary=[key_column],
                write_statistics=[key_column],
            ) as w:
                for lo, hi, *_ in db.ragged_chunks(rows):
                    part = table.slice(lo, hi - lo)
                    w.write_table(
                        part.set_column(0, key_field, part[key_column].cast(pa.string())), row_group_size=hi - lo
                    )
                    start_writeback(tmp)
                    bar.update(hi - lo)
                if not len(db):
                    w.write_table(table.cast(schema))
    return os.fspath(dst)


def arrow_errors(name: str) -> contextlib.AbstractContextManager[None]:
    """What Arrow says of a damaged input (a Parquet footer or page that does not decode, an IPC message cut
    short, names that are not UTF-8) as a ConversionError naming ``name``."""
    import pyarrow as pa

    return damage_named(name, "a damaged table", (pa.ArrowException, UnicodeDecodeError))


class Part:
    """One file (or in-memory table) of a tabular input: its schema, rows, and record batches of some columns."""

    one_pass = False  # its batches can be read once only (a stream)

    def __init__(
        self, name: str, schema: Any, num_rows: int | None, batches: Callable[[int, list[str]], Iterator[Any]]
    ) -> None:
        self.name, self.schema, self.num_rows, self._batches = name, schema, num_rows, batches

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[Any]:
        with arrow_errors(self.name):
            yield from self._batches(batch_size, columns)


class StreamPart(Part):
    """A stream of record batches, read once (an Arrow stream, a streamed ``datasets.IterableDataset``): its
    first batches, read to learn its schema and dimension, are kept and given again first; the rest once."""

    one_pass = True

    def __init__(self, name: str, record_batches: Iterator[Any]) -> None:
        self._source, self._head, self._read = record_batches, [], False
        for batch in self._source:
            self._head.append(batch)
            if batch.num_rows:
                break
        if not self._head:
            raise errors.ConversionError(f"{name}: an empty stream, nothing to convert")
        super().__init__(name, self._head[0].schema, None, sliced(self._once))

    def _once(self) -> Iterator[Any]:
        yield from self._head
        if self._read:
            raise errors.ConversionError(f"{self.name}: a stream is read once, and its start held no vector")
        self._read = True
        yield from self._source


def parquet_part(path: str) -> Part:
    """A Parquet file, read a column-chunk buffer at a time: a huge row group is never loaded whole."""
    pa = require("pyarrow", "parquet")
    pq = require("pyarrow.parquet", "parquet")
    with arrow_errors(path):
        schema = pq.read_schema(path)
        rows = pq.read_metadata(path).num_rows
    plain = _without_views(schema)

    def batches(size: int, columns: list[str]) -> Iterator[Any]:
        read = pq.ParquetFile(path, buffer_size=8 << 20, pre_buffer=False).iter_batches(size, columns=columns)
        if plain.equals(schema):
            return iter(read)
        return (b.cast(pa.schema([plain.field(c) for c in b.schema.names])) for b in read)

    return Part(path, plain, rows, batches)


def _without_views(schema: Any) -> Any:
    """``schema`` with its string views as strings (what deltalake and Polars may write: keys are read from
    the layout of Arrow's ``string``)."""
    import pyarrow as pa

    def plain(t: Any) -> Any:
        return pa.large_string() if pa.types.is_string_view(t) else t

    return pa.schema([f.with_type(plain(f.type)) for f in schema], metadata=schema.metadata)


def arrow_part(path: str) -> Part:
    """An Arrow IPC file (Feather v2) or stream (what Hugging Face ``save_to_disk`` writes), memory-mapped."""
    pa = require("pyarrow", "parquet")

    def reader() -> Any:
        source = pa.memory_map(path)
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            try:
                return pa.ipc.open_stream(source)
            except pa.ArrowInvalid as e:
                raise errors.ConversionError(f"{path}: not an Arrow IPC file or stream ({e})") from None

    def batches_of(r: Any) -> Iterator[Any]:
        return (r.get_batch(i) for i in range(r.num_record_batches)) if hasattr(r, "num_record_batches") else iter(r)

    def record_batches() -> Iterator[Any]:  # each checked whole as it is read: a damaged one would be read past
        for batch in batches_of(reader()):  # its ends
            batch.validate(full=True)
            yield batch

    with arrow_errors(path):
        first = reader()
        rows = sum(b.num_rows for b in batches_of(first))  # (counted from the messages: no value is read)
    return Part(path, first.schema, rows, sliced(record_batches))


def table_part(table: Any, name: str) -> Part:
    """An in-memory Arrow table (of a ``datasets.Dataset``, say)."""
    return Part(name, table.schema, table.num_rows, sliced(lambda: iter(table.to_batches())))


def sliced(record_batches: Callable[[], Iterator[Any]]) -> Callable[[int, list[str]], Iterator[Any]]:
    """Record batches of some columns, cut to at most ``size`` rows (views: nothing is copied)."""

    def batches(size: int, columns: list[str]) -> Iterator[Any]:
        for batch in record_batches():
            batch = batch.select(columns)
            for lo in range(0, batch.num_rows, size):
                yield batch.slice(lo, size)

    return batches


def read_parquet(
    path: str | os.PathLike[str],
    *,
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """Open a Parquet file or folder for streaming (see :func:`embfile.formats.from_parquet`); a column of
    per-residue matrices is read as ragged records, pooled with ``pool``.  ``on_error="skip"`` skips a row with
    a null key or vector, or a vector of the wrong length, and notes it (``Source.on_error``)."""
    path = os.fspath(path)
    parts = [parquet_part(f) for f in _parquet_files(path)]
    return read_parts(path, "parquet", parts, key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def read_parts(
    path: str,
    fmt: str,
    parts: list[Part],
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """The records of tabular ``parts`` of one schema: a key column and a vector column (detected when only one
    fits), or one column per dimension (found when the other columns are numbered columns of numbers); a column of
    per-residue matrices as ragged records (pooled with ``pool``)."""
    pa = require("pyarrow", "parquet")
    schema = parts[0].schema
    for other in parts[1:]:
        if _columns(other.schema) != _columns(schema):
            raise errors.ConversionError(f"{other.name}: schema differs from {parts[0].name}'s")
    if key_column is None:
        strings = any(_is_string(f.type) for f in schema)
        key_column = key_column_of(schema) or _only(
            schema,
            _is_string if strings else _is_int,
            "key column (strings or integers)",
            path,
            "key_column",
            "--key-column",
        )
    if key_column not in schema.names:
        raise errors.ConversionError(f"{path}: no column {key_column!r}; columns are {schema.names}")
    if not _is_key(schema.field(key_column).type):
        raise errors.ConversionError(
            f"{path}: key column {key_column!r} is {schema.field(key_column).type}, not strings or integers"
        )
    if not any(p.one_pass for p in parts):  # (a stream's repeated key is found as the output is finished)
        _require_unique_keys(parts, key_column, path)
    if not (vector_column or wide_prefix or wide_columns):
        wide_columns = _numbers_beside(schema, key_column)
    if wide_prefix or wide_columns:
        if vector_column:
            raise errors.ConversionError("give vector_column or wide_prefix/wide_columns, not both")
        columns = list(wide_columns or [n for n in schema.names if n.startswith(wide_prefix)])
        for c in columns:
            if c not in schema.names or not _is_number(schema.field(c).type):
                raise errors.ConversionError(f"{path}: wide column {c!r} is missing or not numeric")
        if not columns:
            raise errors.ConversionError(f"{path}: no column starts with {wide_prefix!r}")
        dim, dtype = len(columns), np.result_type(*(_numpy_dtype(schema.field(c).type) for c in columns))
    else:
        if vector_column is None:
            vector_column = _only(
                schema,
                lambda t: _is_vector(t) or _is_matrix(t),
                "vector column (a list of numbers, or of lists of numbers)",
                path,
                "vector_column",
                "--vector-column",
                hint="; for one column per dimension pass wide_prefix= (--wide-prefix)",
            )
        if vector_column not in schema.names:
            raise errors.ConversionError(f"{path}: no column {vector_column!r}; columns are {schema.names}")
        vtype = schema.field(vector_column).type
        if _is_matrix(vtype):
            return pooled(_read_matrices(path, fmt, parts, schema, key_column, vector_column), pool)
        if not _is_vector(vtype):
            raise errors.ConversionError(f"{path}: column {vector_column!r} is {vtype}, not a list of numbers")
        columns = [vector_column]
        dtype = _numpy_dtype(vtype.value_type)
        dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else _first_length(parts, vector_column)
    count = _rows(parts)
    desc = {
        "format": fmt,
        "path": os.path.abspath(path),
        "key_column": key_column,
        **({"wide_columns": columns} if wide_prefix or wide_columns else {"vector_column": vector_column}),
    }
    meta = _stored_metadata(schema)
    bad = OnError(on_error)
    chunks = _chunks(parts, key_column, columns, dim, dtype, bool(wide_prefix or wide_columns), bad)
    return pooled(Source(dim, dtype, count, chunks, desc, meta, on_error=bad), pool)


def _columns(schema: Any) -> list[tuple[str, Any]]:
    """The columns of ``schema`` and their types, as the records are read from them: the names writers give a
    list's items (``item``, ``element``) and the width of its offsets left out."""
    import pyarrow as pa

    def kind(t: Any) -> Any:
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return ("list", kind(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return ("list", t.list_size, kind(t.value_type))
        return "string" if _is_string(t) else str(t)

    return [(f.name, kind(f.type)) for f in schema]


def _rows(parts: list[Part]) -> int | None:
    """The rows of ``parts``, if known (a stream's are not)."""
    counts = [p.num_rows for p in parts]
    return None if None in counts else sum(c for c in counts if c is not None)


def _require_unique_keys(parts: list[Part], key_column: str, path: str) -> None:
    """Read the key column alone first (little beside the vectors), so that a repeated key is an error naming
    both rows (counted over the files in order; null keys left out) before any vector is read."""
    pa = require("pyarrow", "parquet")
    heaps, lengths, rows = [], [], []
    start = 0
    for part in parts:
        for batch in part.iter_batches(1 << 16, [key_column]):
            keys = batch.column(0).cast(pa.large_string())  # integers as their decimal text, as they are stored
            where = np.arange(start, start + len(keys))
            if keys.null_count:
                where = where[np.asarray(keys.is_valid())]
                keys = keys.drop_null()
            offsets = np.frombuffer(keys.buffers()[1], np.int64)[keys.offset : keys.offset + len(keys) + 1]
            data = keys.buffers()[2]
            if data is not None and len(keys):
                heaps.append(np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]])
            lengths.append(np.diff(offsets))
            rows.append(where)
            start += batch.num_rows
    if rows:
        heap = np.concatenate(heaps) if heaps else np.zeros(0, np.uint8)
        require_unique_encoded(heap, np.concatenate(lengths), path, np.concatenate(rows))


def _read_matrices(path: str, fmt: str, parts: list[Part], schema: Any, key_column: str, column: str) -> Source:
    """A column of per-residue matrices (a list of rows, each a list of numbers) as ragged records."""
    import pyarrow as pa

    row_type = schema.field(column).type.value_type
    dtype = _numpy_dtype(row_type.value_type)
    dim = row_type.list_size if pa.types.is_fixed_size_list(row_type) else _first_row_length(parts, column)
    desc = {"format": fmt, "path": os.path.abspath(path), "key_column": key_column, "vector_column": column}
    count = _rows(parts)
    rows = _matrix_chunks(parts, key_column, column, dim, dtype)
    return Source(dim, dtype, count, rows, desc, _stored_metadata(schema), ragged=True)


def _first_row_length(parts: list[Part], column: str) -> int:
    for part in parts:
        for batch in part.iter_batches(64, [column]):
            rows = batch.column(0).drop_null().flatten().drop_null()
            if len(rows):
                return len(rows[0])
    raise errors.ConversionError(f"{parts[0].name}: column {column!r} holds no rows, so it has no dimension")


def _matrix_chunks(parts: list[Part], key_column: str, column: str, dim: int, dtype: np.dtype) -> Iterator[RaggedChunk]:
    import pyarrow as pa

    step = max(64, chunk_rows(dim * dtype.itemsize) // 256)  # records of some hundred rows each
    row = 0
    for part in parts:
        f = part.name
        for batch in part.iter_batches(step, [key_column, column]):
            keys = batch.column(key_column)
            if keys.null_count:
                raise errors.ConversionError(f"{f}: row {row + _first_null(keys)} has a null key")
            keys = (keys.cast("string") if _is_int(keys.type) else keys).to_pylist()
            matrices = batch.column(column)
            if matrices.null_count:
                i = _first_null(matrices)
                raise errors.ConversionError(f"{f}: row {row + i} (key {keys[i]!r}) has a null matrix")
            lengths = np.diff(_values(matrices.offsets))
            if (lengths == 0).any():
                i = int(np.flatnonzero(lengths == 0)[0])
                raise errors.ConversionError(f"{f}: row {row + i} (key {keys[i]!r}) has a matrix of no rows")
            rows = matrices.flatten()
            owner = np.repeat(np.arange(len(keys)), lengths)
            if rows.null_count:
                i = int(owner[_first_null(rows)])
                raise errors.ConversionError(f"{f}: row {row + i} (key {keys[i]!r}) has a null residue")
            widths = (
                np.full(len(rows), dim) if pa.types.is_fixed_size_list(rows.type) else np.diff(_values(rows.offsets))
            )
            bad = np.flatnonzero(widths != dim)
            if bad.size:
                i = int(owner[bad[0]])
                raise errors.ConversionError(
                    f"{f}: row {row + i} (key {keys[i]!r}) has a residue of {widths[bad[0]]} values, not {dim}"
                )
            values = rows.flatten()
            if values.null_count and dtype.kind != "f":
                i = int(owner[_first_null(values) // dim])
                raise errors.ConversionError(f"{f}: row {row + i} (key {keys[i]!r}) has a null value")
            yield keys, _values(values).reshape(-1, dim), lengths
            row += batch.num_rows


TABLE_FORMATS = {  # a folder with one of these holds the files of every version of a table, not one version
    "metadata": "an Apache Iceberg table",
    ".hoodie": "an Apache Hudi table",
}


def _parquet_files(path: str) -> list[str]:
    if os.path.isdir(os.path.join(path, "_delta_log")):
        return _delta_files(path)
    for marker, what in TABLE_FORMATS.items():
        if os.path.isdir(os.path.join(path, marker)) and (marker != "metadata" or _iceberg(path)):
            raise errors.ConversionError(
                f"{path}: {what}; its folder holds files its current version no longer reads: read the table "
                "with its engine (embfile.spark.write of spark.read.table(...), say)"
            )
    if os.path.isdir(path):
        files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(path)
            for f in fs
            if f.endswith((".parquet", ".pq")) and not f.startswith((".", "_"))
        )
        if not files:
            raise errors.ConversionError(f"{path}: no .parquet files in this folder")
        splits = sorted({m.group(1).lower() for f in files if (m := _SPLIT.match(os.path.basename(f)))})
        if len(splits) > 1:
            raise errors.ConversionError(
                f"{path}: holds the splits {', '.join(splits)} of a dataset, not one dataset in parts: convert "
                "each split's files (a file, or a folder of one split) on its own"
            )
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [path]


def _iceberg(path: str) -> bool:
    return any(f.endswith(".metadata.json") for f in os.listdir(os.path.join(path, "metadata")))


def _delta_files(path: str) -> list[str]:
    """The Parquet files of a Delta Lake table's current version (its folder holds every version's), as its
    log says (read by the ``deltalake`` package); a partitioning column is not in them, the others are."""
    deltalake = require("deltalake", "delta")
    table = deltalake.DeltaTable(path)
    beyond = set(table.protocol().reader_features or ()) & {"deletionVectors", "columnMapping"}
    if beyond:
        raise errors.ConversionError(
            f"{path}: a Delta Lake table with {' and '.join(sorted(beyond))}: its Parquet files alone do not hold "
            "its rows; read it with Spark (embfile.spark.write of spark.read.format('delta').load(...))"
        )
    files = [u.removeprefix("file://") for u in table.file_uris()]
    if not files:
        raise errors.ConversionError(f"{path}: a Delta Lake table with no rows (version {table.version()})")
    return files


def _is_string(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_int(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(t))


def _is_number(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_key(t: Any) -> bool:
    return _is_string(t) or _is_int(t)


def _is_vector(t: Any) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and _is_number(
        t.value_type
    )


KEY_NAMES = ("id", "_id", "key")  # what embedding datasets name their ids column (any case)


def key_column_of(schema: Any) -> str | None:
    """A table's key column, found without being named: the one of strings or integers named as ids columns
    are (``id`` beside ``title`` and ``text``), else its only string column, else its only integer one; None
    if none fits or several do."""
    named = [f.name for f in schema if f.name.lower() in KEY_NAMES and _is_key(f.type)]
    found = named or [f.name for f in schema if _is_string(f.type)] or [f.name for f in schema if _is_int(f.type)]
    return str(found[0]) if len(found) == 1 else None


def _numbers_beside(schema: Any, key_column: str) -> list[str] | None:
    """The other columns of a table of a key column and numbered columns of numbers (``id,v0,v1,...``,
    ``dim_1,dim_2,...``, a pandas DataFrame's ``0,1,...``): one a dimension; else None (a vector column, to
    be found).  A column named otherwise (``label``) or out of order is not taken as a dimension."""
    rest = [f.name for f in schema if f.name != key_column]
    numbered = [m for m in (re.fullmatch(r"(.*?)(\d+)", name) for name in rest) if m]
    if len(rest) < 2 or len(numbered) != len(rest) or not all(_is_number(schema.field(n).type) for n in rest):
        return None
    numbers = [int(m[2]) for m in numbered]
    in_order = numbers[0] in (0, 1) and numbers == list(range(numbers[0], numbers[0] + len(rest)))
    return rest if in_order and len({m[1] for m in numbered}) == 1 else None


def _only(
    schema: Any, test: Callable[[Any], bool], what: str, path: str, option: str, flag: str, hint: str = ""
) -> str:
    found = [f.name for f in schema if test(f.type)]
    if len(found) != 1:
        which = f"columns {found} could each be" if found else "no column is"
        raise errors.ConversionError(f"{path}: {which} the {what}; name it with {option}= ({flag}){hint}")
    return str(found[0])


def _stored_metadata(schema: Any) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(ARROW_METADATA_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _is_matrix(t: Any) -> bool:
    """A list of vectors (per-residue rows)."""
    import pyarrow as pa

    return bool((pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_vector(t.value_type))


def _first_length(parts: list[Part], column: str) -> int:
    """The length of the first non-null vector: the dim of a ``list`` column."""
    for part in parts:
        for batch in part.iter_batches(1024, [column]):
            arr = batch.column(0).drop_null()
            if len(arr):
                return len(arr[0])
    raise errors.ConversionError(f"{parts[0].name}: column {column!r} holds no vectors, so it has no dimension")


def _chunks(
    parts: list[Part], key_column: str, columns: list[str], dim: int, dtype: np.dtype, wide: bool, bad: OnError
) -> Iterator[Chunk]:

    step = max(1, chunk_rows(dim * dtype.itemsize) // 4)  # arrow holds several times a batch while decoding
    row = 0
    for part in parts:
        f = part.name
        for batch in part.iter_batches(step, [key_column, *columns]):
            first_row, row = row, row + batch.num_rows
            if not wide:
                batch = _without_bad_rows(batch, f, first_row, key_column, columns[0], dim, bad)
            keys = batch.column(key_column)
            if keys.null_count:
                raise errors.ConversionError(f"{f}: row {first_row + _first_null(keys)} has a null key")
            try:
                keys = (keys.cast("string") if _is_int(keys.type) else keys).to_pylist()
            except UnicodeDecodeError:  # a reader that does not check its text (JSON)
                raise errors.ConversionError(f"{f}: a key of rows {first_row} to {row - 1} is not UTF-8") from None
            if wide:
                matrix = np.empty((batch.num_rows, dim), dtype)
                for j, c in enumerate(columns):
                    col = batch.column(c)
                    if col.null_count and dtype.kind != "f":
                        i = _first_null(col)
                        raise errors.ConversionError(f"{f}: row {first_row + i} (key {keys[i]!r}) is null in {c!r}")
                    matrix[:, j] = _values(col)
            else:
                values = batch.column(columns[0]).flatten()
                matrix = _values(values).reshape(batch.num_rows, dim)
            yield keys, matrix


def _without_bad_rows(batch: Any, f: str, first_row: int, key_column: str, column: str, dim: int, bad: OnError) -> Any:
    """``batch`` without its rows of a null key, a null vector, a vector of other than ``dim`` values, or (of
    integers) a null value: each raised, or skipped and noted, as ``bad`` says."""
    import pyarrow as pa

    keys, vectors = batch.column(key_column), batch.column(column)
    fixed = pa.types.is_fixed_size_list(vectors.type)
    lengths = np.full(len(vectors), dim) if fixed else np.diff(_values(vectors.offsets))
    null_key = keys.is_null().to_numpy(zero_copy_only=False)
    null_vector = vectors.is_null().to_numpy(zero_copy_only=False)
    null_value = np.zeros(len(vectors), bool)
    integers = not pa.types.is_floating(vectors.type.value_type)
    if integers and vectors.flatten().null_count:  # null floats become NaN, as pandas wrote them
        owner = np.repeat(np.arange(len(vectors)), np.where(null_vector, 0, lengths))
        null_value[owner[vectors.flatten().is_null().to_numpy(zero_copy_only=False)]] = True
    wrong = null_key | null_vector | (lengths != dim) | null_value
    if not wrong.any():
        return batch
    for i in np.flatnonzero(wrong).tolist():
        key = keys[i].as_py()
        what = (
            "has a null key"
            if null_key[i]
            else f"(key {key!r}) has a null vector"
            if null_vector[i]
            else f"(key {key!r}) has a vector of {lengths[i]} values, not {dim}"
            if lengths[i] != dim
            else f"(key {key!r}) has a null value"
        )
        bad(errors.ConversionError(f"{f}: row {first_row + i} {what}"), f"{f}: row {first_row + i}", key)
    return batch.filter(pa.array(~wrong))


def _values(arr: Any) -> np.ndarray:
    """A numeric arrow array as numpy without a copy (null floats read as NaN, as pandas wrote them).

    ``np.frombuffer`` on its data buffer: ``to_numpy`` would first import pandas (0.3 s).
    """
    if arr.null_count:
        return np.asarray(arr.to_numpy(zero_copy_only=False))
    dtype = _numpy_dtype(arr.type)
    return np.frombuffer(arr.buffers()[1], dtype, len(arr), arr.offset * dtype.itemsize)


def _numpy_dtype(t: Any) -> np.dtype:
    import pyarrow as pa

    if not _is_number(t):
        raise TypeError(f"{t} is not a numeric arrow type")
    return np.dtype(
        ("f" if pa.types.is_floating(t) else "u" if pa.types.is_unsigned_integer(t) else "i") + str(t.bit_width // 8)
    )


def _first_null(arr: Any) -> int:
    return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])


def read_arrow(
    path: str | os.PathLike[str],
    *,
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """Open an Arrow IPC file or stream (Feather v2), or a Hugging Face ``save_to_disk`` folder (its
    ``state.json`` names the files, in order), for streaming; columns as for Parquet."""
    path = os.fspath(path)
    parts = [arrow_part(f) for f in _arrow_files(path)]
    return read_parts(path, "arrow", parts, key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def read_lance(
    path: str | os.PathLike[str],
    *,
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """Open a Lance dataset (its latest version; deleted rows are not read) for streaming, in its row order;
    columns as for Parquet."""
    lance = require("lance", "lance")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not os.path.isdir(os.path.join(path, "_versions")):
        raise errors.ConversionError(f"{path}: not a Lance dataset (it has no _versions folder)")
    # a Rust panic (of a damaged manifest) reaches Python as pyo3's PanicException, a BaseException
    panics = tuple(c for c in BaseException.__subclasses__() if c.__name__ == "PanicException")
    unreadable: tuple[type[BaseException], ...] = (ValueError, OSError, *panics)
    try:
        dataset = lance.dataset(path)
        schema, rows = dataset.schema, dataset.count_rows()
    except unreadable as e:  # what lance could not read, without its Rust source lines
        why = re.sub(r",? /\S+\.rs:\d+:\d+", "", (str(e).splitlines() or [type(e).__name__])[0])
        raise errors.ConversionError(f"{path}: not a readable Lance dataset ({why})") from None

    def batches(size: int, columns: list[str]) -> Iterator[Any]:
        with damage_named(path, "not a readable Lance dataset", (ValueError, *panics)):
            yield from dataset.to_batches(columns=columns, batch_size=size)

    part = Part(path, schema, rows, batches)
    return read_parts(path, "lance", [part], key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def read_table(data: Any, **options: Any) -> Source:
    """A table in memory, columns as for Parquet: a ``pyarrow.Table``, a ``datasets.Dataset``, a pandas DataFrame
    (a named index is a column: the ids, as pandas users keep them) or a polars one; or a stream, read once: an
    Arrow stream (a ``RecordBatchReader``, a DuckDB result) or a streamed ``datasets.IterableDataset``."""
    name = type(data).__name__
    source = read_parts(f"a {name}", "arrow", [memory_part(data, f"a {name}")], **options)
    where = {k: v for k, v in source.description.items() if k != "path"}  # no file: what it was, in memory
    return dataclasses.replace(source, description={**where, "format": "table", "object": name})


def memory_part(data: Any, name: str) -> Part:
    """A table in memory (as :func:`read_table` takes them) as a part named ``name``."""
    pa = require("pyarrow", "parquet")
    kind = type(data).__name__
    if kind == "DatasetDict":  # what datasets.load_dataset gives: one Dataset per split
        split = "train" if "train" in data else sorted(data)[0]
        raise TypeError(f"a DatasetDict of the splits {sorted(data)}: convert one split, e.g. ds[{split!r}]")
    if kind == "IterableDataset" and hasattr(data, "with_format"):  # datasets' streaming=True: read once
        tables = data.with_format("arrow").iter(batch_size=STREAM_ROWS)
        return StreamPart(name, (b for t in tables for b in t.to_batches()))
    if hasattr(data, "with_format") and hasattr(data, "column_names"):  # a datasets.Dataset, in its order
        return table_part(data.with_format("arrow")[:], name)
    if isinstance(data, pa.Table) or kind == "DataFrame":  # in memory: pandas (with its index), polars
        try:
            return table_part(pa.table(data), name)
        except (pa.ArrowException, TypeError, ValueError) as e:
            what = name if name == f"a {kind}" else f"{name}: a {kind}"  # in memory, or a pickle's
            raise errors.ConversionError(f"{what} that Arrow cannot take: {e}") from None
    if kind == "Series":  # pandas: of vectors indexed by key, a mapping (Arrow would take it as a stream)
        raise TypeError("a Series of vectors indexed by key is a mapping: embfile.write(path, series) writes it")
    if hasattr(data, "__arrow_c_stream__"):  # a stream (a RecordBatchReader, a DuckDB result): read once
        return StreamPart(name, iter(pa.RecordBatchReader.from_stream(data)))
    raise TypeError(f"expected a path or a table (pyarrow, pandas, polars, datasets), not {kind}")


def _arrow_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or folder")
        return [path]
    splits = os.path.join(path, "dataset_dict.json")
    if os.path.exists(splits):  # datasets' save_to_disk of a DatasetDict: a folder a split
        names = sorted(n for n in os.listdir(path) if os.path.exists(os.path.join(path, n, "state.json")))
        first = os.path.join(path, "train" if "train" in names else (names or ["SPLIT"])[0])
        raise errors.ConversionError(
            f"{path}: a Hugging Face DatasetDict of the splits {names}: convert one split's folder ({first})"
        )
    state = os.path.join(path, "state.json")
    if os.path.exists(state):  # datasets' save_to_disk
        try:
            with open(state, encoding="utf-8") as f:
                names = [d["filename"] for d in json.load(f)["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise errors.ConversionError(f"{state}: not a datasets state file ({e})") from None
        return [os.path.join(path, n) for n in names]
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith((".arrow", ".feather", ".ipc")))
    if not files:
        raise errors.ConversionError(f"{path}: no .arrow files in this folder")
    return files


def to_arrow(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    key_column: str = "key",
    vector_column: str = "vector",
    progress: bool = False,
) -> str:
    """Write the .emb file ``src`` as an Arrow IPC file (Feather v2) at ``dst`` (atomic): the table of
    :meth:`~embfile.Dataset.to_arrow`, in record batches of about 64 MiB, uncompressed, so a reader can map it."""
    pa = require("pyarrow", "parquet")
    with EmbFile(src) as db, progress_bar(len(db), progress, os.path.basename(os.fspath(dst))) as bar:
        table = db.to_arrow(key_column, vector_column)
        with atomic_output(dst, db.header.keys_size + db.matrix.nbytes) as tmp:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
                for lo, hi, *_ in db.ragged_chunks(max(1, ROW_GROUP_BYTES // (db.dim * db.dtype.itemsize))):
                    w.write_table(table.slice(lo, hi - lo))
                    bar.update(hi - lo)
    return os.fspath(dst)
