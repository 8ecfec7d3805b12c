"""Vectors kept as text: CSV and TSV tables and JSON Lines (word vectors are :mod:`embfile.formats.word2vec`'s).

Text is how many vectors leave the tool that made them: a table exported with its ids (``id,v0,v1,...``, or a
column of lists), or one JSON object a line as embedding APIs' results are saved (``{"id": ..., "embedding":
[...]}``).  Arrow's parsers read each file a block at a time (on its threads; gzipped by its name), and the
columns go where a Parquet file's would (:func:`~embfile.formats.parquet.read_parts`): a table of a key and
columns of numbers only is one column per dimension.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile import errors
from embfile._extras import require
from embfile._stream import CHUNK_BYTES, Source, progress_bar
from embfile.dataset import EmbFile
from embfile.formats._common import atomic_output, first_line
from embfile.formats.parquet import StreamPart, read_parts

BLOCK_BYTES = 16 << 20  # text parsed at a time


def read_csv(
    path: str | os.PathLike[str],
    *,
    delimiter: str | None = None,
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """A CSV (or, by its name or ``delimiter``, TSV) table with a header row; columns as for Parquet."""
    require("pyarrow", "parquet")
    from pyarrow import csv

    path = os.fspath(path)
    if delimiter is None:
        delimiter = "\t" if path.lower().removesuffix(".gz").endswith((".tsv", ".tab")) else ","
    part = stream_part(
        path,
        lambda: csv.open_csv(
            path,
            csv.ReadOptions(block_size=BLOCK_BYTES),
            csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),  # numpy prints arrays over lines
            csv.ConvertOptions(),
        ),
        _lists_as_text,
    )
    return read_parts(path, "csv", [part], key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    key_column: str | None = None,
    vector_column: str | None = None,
    wide_prefix: str | None = None,
    wide_columns: list[str] | None = None,
    pool: str | None = None,
    on_error: str = "error",
) -> Source:
    """JSON Lines: one object a line, its fields the columns (as for Parquet)."""
    require("pyarrow", "parquet")
    from pyarrow import json

    path = os.fspath(path)
    part = stream_part(path, lambda: json.open_json(path, json.ReadOptions(block_size=BLOCK_BYTES)))
    return read_parts(path, "jsonl", [part], key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def is_number(field: bytes) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def stream_part(path: str, start: Any, parse: Any = None) -> StreamPart:
    """The record batches of the reader ``start()`` opens, read once (through ``parse(path, batches)`` if
    given); a parse error (of any block), or column names that are not UTF-8 (Arrow decodes them only when
    asked), a ConversionError naming ``path``."""
    import pyarrow as pa

    try:
        batches = _batches(path, start())
        part = StreamPart(path, parse(path, batches) if parse else batches)
        _ = part.schema.names
    except (pa.ArrowInvalid, pa.ArrowIOError, UnicodeDecodeError) as e:  # (IOError: a damaged .gz, say)
        what = "its column names are not UTF-8" if isinstance(e, UnicodeDecodeError) else first_line(e)
        raise errors.ConversionError(f"{path}: {what}") from None
    return part


def _batches(path: str, reader: Any) -> Any:
    """The record batches of ``reader``, a parse error of a later block a ConversionError naming ``path``."""
    import pyarrow as pa

    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, pa.ArrowIOError) as e:
            raise errors.ConversionError(f"{path}: {first_line(e)}") from None
        yield batch


def _lists_as_text(path: str, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` with each text column of lists of numbers (``"[0.1, 0.2]"``, as pandas ``to_csv`` writes a
    column of lists, or ``"[0.1 0.2]"`` of numpy arrays) as a column of lists of float64, found by the first
    value of the first rows."""
    import pyarrow as pa

    lists = None
    for batch in batches:
        if not batch.num_rows:
            continue
        if lists is None:
            lists = [f.name for f in batch.schema if pa.types.is_string(f.type) and _a_list(batch[f.name])]
        for name in lists:
            i = batch.schema.get_field_index(name)
            batch = batch.set_column(i, name, _parsed_lists(path, name, batch[name]))
        yield batch


def _a_list(column: Any) -> bool:
    present = column.drop_null()
    text = present[0].as_py().strip() if len(present) else ""
    if not (text.startswith("[") and text.endswith("]")):
        return False
    numbers = text[1:-1].replace(",", " ").split()
    return bool(numbers) and all(x == "..." or is_number(x.encode()) for x in numbers)  # (summarised: refused)


def _parsed_lists(path: str, name: str, column: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    pieces = pc.split_pattern_regex(pc.utf8_trim(column, "[] \t\r\n"), r"[,\s]+")
    try:
        values = pieces.flatten().cast(pa.float64())
    except pa.ArrowInvalid as e:
        summarised = pc.any(pc.equal(pieces.flatten(), "...")).as_py()
        why = (
            "arrays printed summarised, values left out as '...' (numpy prints long arrays so; save "
            "them as lists, .tolist(), or as Parquet)"
            if summarised
            else first_line(e)
        )
        raise errors.ConversionError(f"{path}: column {name!r}: {why}") from None
    return pa.ListArray.from_arrays(pieces.offsets, values, mask=pieces.is_null())


def to_csv(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    delimiter: str | None = None,
    key_column: str = "key",
    progress: bool = False,
) -> str:
    """Write the .emb file ``src`` as a CSV table at ``dst`` (atomic; TSV by its name or ``delimiter``; gzipped
    for a ``.gz`` name), for R, spreadsheets and pandas: a header row, then each key and its values, one column
    a dimension (``key_column``, ``v0``, ``v1``, ...), as :func:`read_csv` reads it back.  Each value is the
    shortest text that reads back as it was (half floats as float32); per-residue records are refused."""
    from pyarrow import csv

    name = os.fspath(dst).lower().removesuffix(".gz")
    delimiter = delimiter or ("\t" if name.endswith((".tsv", ".tab")) else ",")
    with text_output(src, dst, "a table's row is one a key", progress) as (db, out, chunks):
        dtype = np.dtype(np.float32) if db.dtype.kind == "f" and db.dtype.itemsize < 4 else db.dtype
        options = csv.WriteOptions(include_header=False, delimiter=delimiter)
        names = [key_column, *(f"v{j}" for j in range(db.dim))]
        out.write((delimiter.join(names) + "\n").encode())  # as pandas writes it (Arrow quotes every name)
        for keys, block in chunks:
            csv.write_csv(rows_table(keys, np.asarray(block, dtype), names), out, options)
    return os.fspath(dst)


@contextlib.contextmanager
def text_output(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], per_record: str, progress: bool, value_bytes: int = 16
) -> Iterator[tuple[Any, Any, Iterator[tuple[Any, np.ndarray]]]]:
    """The .emb file ``src`` open, an output stream at ``dst`` (atomic; gzipped for a ``.gz`` name), and the
    file's records in chunks (its keys as an Arrow array, its values as stored), the progress bar following
    them.  Per-residue records are refused (``per_record`` says why)."""
    pa = require("pyarrow", "parquet")
    with EmbFile(src) as db, progress_bar(len(db), progress, os.path.basename(os.fspath(dst))) as bar:
        if db.ragged:
            raise errors.ConversionError(
                f"{src}: per-residue records; {per_record}: pool them with pool='mean' (--pool mean)"
            )
        keys = db.to_arrow()["key"]

        def chunks() -> Iterator[tuple[Any, np.ndarray]]:
            for lo, hi, block in db.chunks(max(1, CHUNK_BYTES // (db.dim * db.dtype.itemsize))):
                yield keys.slice(lo, hi - lo), block
                bar.update(hi - lo)

        gz = os.fspath(dst).lower().endswith(".gz")
        with atomic_output(dst, db.header.keys_size + len(db) * db.dim * value_bytes) as tmp:
            with pa.output_stream(tmp, compression="gzip" if gz else None) as out:
                yield db, out, chunks()


def rows_table(keys: Any, matrix: np.ndarray, names: list[str] | None = None) -> Any:
    """A table of ``keys`` and one column a dimension of ``matrix``, to be written as text rows."""
    import pyarrow as pa

    columns = [keys, *(pa.array(matrix[:, j]) for j in range(matrix.shape[1]))]
    return pa.Table.from_arrays(columns, names or [f"f{j}" for j in range(len(columns))])
