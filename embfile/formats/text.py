"""Vectors kept as text: CSV and TSV tables, JSON Lines, and the word2vec / GloVe / fastText text format.

Text is how many vectors leave the tool that made them: a table exported with its ids (``id,v0,v1,...``, or a
column of lists), one JSON object a line as embedding APIs' results are saved (``{"id": ..., "embedding": [...]}``),
or the word-vector text format (a key and its values a line, separated by spaces, after an optional
``count dim`` line; word2vec ends each line with a space).  Arrow's parsers read each file a block at a time
(on its threads), and the columns go where a Parquet file's would (:func:`~embfile.formats.parquet.read_parts`):
a table of a key (its only text column) and columns of numbers only is one column per dimension.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

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
            path,
            csv.ReadOptions(block_size=BLOCK_BYTES),
            csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),  # numpy prints arrays over lines
            csv.ConvertOptions(),
        ),
        _lists_as_text,
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
    layout = word_vectors_header(path)
    if layout is None:
        raise errors.ConversionError(f"{path}: not word vectors as text (a key and its values a line)")
    dim = layout.dim
    names = [f"f{i}" for i in range(dim + 1 + layout.trailing_space)]  # not the first line's: its key may hold
    # spaces
    types = {"f0": pa.string(), **{f"f{i}": pa.float32() for i in range(1, dim + 1)}}  # as word2vec keeps them
    spaced: list[str] = []  # lines of more fields than the first: keys holding spaces, read apart

    def longer(row: Any) -> str:
        if row.actual_columns <= row.expected_columns:
            return "error"
        spaced.append(row.text)
        return "skip"

    part = _stream(
        path,
        lambda: csv.open_csv(
            path,
            csv.ReadOptions(block_size=BLOCK_BYTES, column_names=names, skip_rows=int(layout.count_line)),
            csv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False, invalid_row_handler=longer),
            csv.ConvertOptions(column_types=types),
        ),
        functools.partial(_with_spaced_keys, spaced, dim),
    )
    return read_parts(path, "word2vec", [part], "f0", None, None, names[1 : dim + 1], pool, on_error)


class WordVectors(NamedTuple):
    """How a word-vector text file is laid out, read off its first lines."""

    count_line: bool  # starts with ``count dim``
    dim: int
    trailing_space: bool  # each line ends with a space (word2vec's C tool)


def word_vectors_header(path: str) -> WordVectors | None:
    """How the word-vector text file ``path`` is laid out; None if its first lines are not word vectors (a key
    and numbers, separated by spaces; numeric keys, as node2vec's, only after a count line, as gensim writes
    them: without one, a line of numbers is a matrix's row)."""
    with open(path, "rb") as f:
        lines = [f.readline(1 << 20).split(b" ") for _ in range(2)]
    first, second = ([x for x in line if x.strip()] for line in lines)
    count_line = len(first) == 2 and all(x.strip().isdigit() for x in first)
    fields = second if count_line else first
    values = len(list(itertools.takewhile(_number, reversed(fields))))  # the key before them may hold spaces
    if values == len(fields):  # numbers only: a numeric key after a count line, else a matrix's row (np.savetxt)
        values -= 1 if count_line else len(fields)
    if not values or (count_line and values != int(first[1])):
        return None
    return WordVectors(count_line, values, not lines[count_line][-1].strip())


def _number(field: bytes) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _stream(path: str, start: Any, parse: Any = None) -> StreamPart:
    """The record batches of the reader ``start()`` opens, read once (through ``parse(path, batches)`` if
    given); a parse error (of any block), or column names that are not UTF-8 (Arrow decodes them only when
    asked), a ConversionError naming ``path``."""
    import pyarrow as pa

    try:
        batches = _batches(path, start())
        part = StreamPart(path, parse(path, batches) if parse else batches)
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


def _with_spaced_keys(spaced: list[str], dim: int, path: str, batches: Iterator[Any]) -> Iterator[Any]:
    """``batches``, each followed by the lines Arrow's parser set aside since the one before: lines whose key
    holds spaces (GloVe 840B's ``. . .``, ``at name@domain.com``), the last ``dim`` fields their values."""
    import pyarrow as pa

    for batch in batches:
        yield batch
        if spaced:
            lines, spaced[:] = list(spaced), []
            keys, values = zip(*(_spaced_key(path, line, dim) for line in lines))
            matrix = np.stack(values)
            columns = [pa.array(keys, pa.string()), *(pa.array(matrix[:, j]) for j in range(dim))]
            columns += [pa.nulls(len(lines))] * (batch.num_columns - len(columns))  # word2vec's last space
            yield pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _spaced_key(path: str, line: str, dim: int) -> tuple[str, np.ndarray]:
    key, *values = line.rstrip(" ").rsplit(" ", dim)
    try:
        if _number(key.rsplit(" ", 1)[-1].encode()):
            raise ValueError
        return key, np.array(values, np.float32)
    except ValueError:
        raise errors.ConversionError(f"{path}: not a key and {dim} numbers: {line[:80]!r}") from None


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
    text = next((v for v in column.to_pylist() if v is not None), "").strip()
    if not (text.startswith("[") and text.endswith("]")):
        return False
    numbers = text[1:-1].replace(",", " ").split()
    return bool(numbers) and all(x == "..." or _number(x.encode()) for x in numbers)  # (summarised: refused)


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
            else _first_line(e)
        )
        raise errors.ConversionError(f"{path}: column {name!r}: {why}") from None
    return pa.ListArray.from_arrays(pieces.offsets, values, mask=pieces.is_null())


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
