"""Vectors kept as text: CSV and TSV tables, JSON Lines, and the word2vec / GloVe / fastText text format.

Text is how many vectors leave the tool that made them: a table exported with its ids (``id,v0,v1,...``, or a
column of lists), one JSON object a line as embedding APIs' results are saved (``{"id": ..., "embedding": [...]}``),
or the word-vector text format (a key and its values a line, separated by spaces, after an optional
``count dim`` line; word2vec ends each line with a space).  Arrow's parsers read each file a block at a time
(on its threads), and the columns go where a Parquet file's would (:func:`~embfile.formats.parquet.read_parts`):
a table of a key (its only text column) and columns of numbers only is one column per dimension.
"""

from __future__ import annotations

import os
from typing import Any

from embfile import errors
from embfile._extras import require
from embfile._stream import Source
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
    """A CSV (or, by its name or ``delimiter``, TSV) table with a header row; columns as for Parquet, and a
    table of one text column and numbers only taken as the key and one column per dimension."""
    pa = require("pyarrow", "parquet")
    from pyarrow import csv

    path = os.fspath(path)
    if delimiter is None:
        delimiter = "\t" if path.lower().endswith((".tsv", ".tab")) else ","
    part = _stream(
        path,
        lambda: csv.open_csv(
            path, csv.ReadOptions(block_size=BLOCK_BYTES), csv.ParseOptions(delimiter=delimiter), csv.ConvertOptions()
        ),
    )
    if not (vector_column or wide_prefix or wide_columns):
        wide_columns = _numbers_beside_the_key(pa, part.schema, key_column)
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
    part = _stream(path, lambda: json.open_json(path, json.ReadOptions(block_size=BLOCK_BYTES)))
    return read_parts(path, "jsonl", [part], key_column, vector_column, wide_prefix, wide_columns, pool, on_error)


def read_word2vec(path: str | os.PathLike[str], *, pool: str | None = None, on_error: str = "error") -> Source:
    """The word-vector text format: ``key v1 v2 ... vD`` a line, after an optional ``count dim`` line; float32,
    as the tools that write it hold them."""
    pa = require("pyarrow", "parquet")
    from pyarrow import csv

    path = os.fspath(path)
    start = word_vectors_header(path)
    if start is None:
        raise errors.ConversionError(f"{path}: not word vectors as text (a key and its values a line)")
    header, dim = start
    types = {"f0": pa.string(), **{f"f{i}": pa.float32() for i in range(1, dim + 1)}}  # as word2vec keeps them
    part = _stream(
        path,
        lambda: csv.open_csv(
            path,
            csv.ReadOptions(block_size=BLOCK_BYTES, autogenerate_column_names=True, skip_rows=int(header)),
            csv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False),
            csv.ConvertOptions(column_types=types),
        ),
    )
    names = part.schema.names
    if part.schema.field(names[-1]).type == pa.null():  # word2vec's space at the end of each line
        names = names[:-1]
    if len(names) < 2:
        raise errors.ConversionError(f"{path}: not word vectors as text (a key and its values a line)")
    return read_parts(path, "word2vec", [part], "f0", None, None, names[1:], pool, on_error)


def word_vectors_header(path: str) -> tuple[bool, int] | None:
    """Whether the word-vector text file ``path`` starts with a ``count dim`` line, and its dimension; None if
    its first lines are not word vectors (a key and numbers, separated by spaces; numeric keys, as node2vec's,
    only after a count line, as gensim writes them: without one, a line of numbers is a matrix's row)."""
    with open(path, "rb") as f:
        lines = [f.readline(1 << 20).split(b" ") for _ in range(2)]
    first, second = ([x for x in line if x.strip()] for line in lines)
    header = len(first) == 2 and all(x.strip().isdigit() for x in first)
    vector = second if header else first
    try:
        values = [float(x) for x in vector[1:]]
    except ValueError:
        return None
    if not values or (not header and _number(vector[0])):  # numbers only, no count line: a matrix (np.savetxt)
        return None
    return header, len(values)


def _number(field: bytes) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _stream(path: str, start: Any) -> StreamPart:
    """The record batches of the reader ``start()`` opens, read once; a parse error (of any block), or column
    names that are not UTF-8 (Arrow decodes them only when asked), a ConversionError naming ``path``."""
    import pyarrow as pa

    try:
        part = StreamPart(path, _batches(path, start()))
        _ = part.schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        what = "its column names are not UTF-8" if isinstance(e, UnicodeDecodeError) else _first_line(e)
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
        except pa.ArrowInvalid as e:
            raise errors.ConversionError(f"{path}: {_first_line(e)}") from None
        yield batch


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]


def _numbers_beside_the_key(pa: Any, schema: Any, key_column: str | None) -> list[str] | None:
    """The other columns of a table of a key (``key_column``, or its only text column) and two or more columns
    of numbers only: one column per dimension (``id,v0,v1,...``); else None (a vector column, to be found)."""
    if key_column is None:
        text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        if len(text) != 1:
            return None
        key_column = text[0]
    rest = [f for f in schema if f.name != key_column]
    numeric = all(pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in rest)
    return [f.name for f in rest] if numeric and len(rest) >= 2 and key_column in schema.names else None
