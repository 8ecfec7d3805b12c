"""Word vectors as word2vec, GloVe and fastText keep them: the text format and word2vec's binary one.

The text format is a key and its values a line, separated by spaces, after an optional ``count dim`` line
(word2vec ends each line with a space).  Arrow's CSV parser reads it a block at a time, on its threads; a line
of more fields than the others is a key holding spaces (GloVe 840B's ``. . .``), read apart by its last
``dim`` values.  The binary format (``GoogleNews-vectors-negative300.bin``, gensim's ``binary=True``) is the
``count dim`` line, then each key, a space and ``dim`` little-endian float32 (word2vec's C tool puts a newline
after each).  Either may be gzipped (fastText's ``cc.en.300.vec.gz``), and both are read once, as a stream.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from embfile import _format as F
from embfile import errors
from embfile._extras import require
from embfile._stream import Chunk, Source, pooled
from embfile.formats._common import GZIP_ERRORS, gzipped, opened
from embfile.formats.parquet import read_parts
from embfile.formats.text import BLOCK_BYTES, is_number, rows_table, stream_part, text_output


class WordVectors(NamedTuple):
    """How a word-vector file is laid out, read off its first bytes."""

    count_line: bool  # starts with ``count dim``
    dim: int
    trailing_space: bool  # each line ends with a space (word2vec's C tool)
    binary: bool  # word2vec's binary format
    records: int  # as the count line says, or 0


def read_word2vec(path: str | os.PathLike[str], *, pool: str | None = None, on_error: str = "error") -> Source:
    """Word vectors (text or word2vec's binary format, gzipped or not): float32, as the tools that write them
    hold them."""
    path = os.fspath(path)
    layout = word_vectors_layout(path)
    if layout is None:
        raise errors.ConversionError(f"{path}: not word vectors (a key and its values a line, or word2vec's binary)")
    if layout.binary:
        if not gzipped(path) and 4 * layout.dim > os.path.getsize(path):
            raise errors.ConversionError(
                f"{path}: its first line says {layout.dim} values a record, more than it holds"
            )
        desc = {"format": "word2vec", "binary": True, "path": os.path.abspath(path)}
        return pooled(
            Source(layout.dim, np.dtype(np.float32), layout.records, _binary_chunks(path, layout), desc), pool
        )
    pa = require("pyarrow", "parquet")
    from pyarrow import csv

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

    _quiet_undecodable_rows()
    part = stream_part(
        path,
        lambda: csv.open_csv(
            pa.input_stream(path, compression="gzip" if gzipped(path) else None),
            csv.ReadOptions(block_size=BLOCK_BYTES, column_names=names, skip_rows=int(layout.count_line)),
            csv.ParseOptions(delimiter=" ", quote_char=False, double_quote=False, invalid_row_handler=longer),
            csv.ConvertOptions(column_types=types),
        ),
        functools.partial(_with_spaced_keys, spaced, dim),
    )
    return read_parts(path, "word2vec", [part], "f0", None, None, names[1 : dim + 1], pool, on_error)


def _quiet_undecodable_rows() -> None:
    """Have Python's hook for unraisable exceptions (as it is now) pass over one: Arrow decodes a line it sets
    aside as UTF-8 before calling the handler above, and a line that is not gives the handler no call and the
    user a traceback, as the line is refused anyway (a ConversionError names it)."""
    hook = sys.unraisablehook
    if getattr(hook, "passes_over_rows", False):
        return

    def quiet(unraisable: Any) -> None:
        if not (
            isinstance(unraisable.exc_value, UnicodeDecodeError)
            and getattr(unraisable.object, "__qualname__", "") == "read_word2vec.<locals>.longer"
        ):
            hook(unraisable)

    quiet.passes_over_rows = True  # type: ignore[attr-defined]
    sys.unraisablehook = quiet


def word_vectors_layout(path: str) -> WordVectors | None:
    """How the word-vector file ``path`` is laid out; None if its first bytes are not word vectors (a key and
    numbers, separated by spaces; numeric keys, as node2vec's, only after a count line, as gensim writes them:
    without one, a line of numbers is a matrix's row)."""
    try:
        with opened(path) as f:
            head = f.read(1 << 20)
    except GZIP_ERRORS as e:
        raise errors.ConversionError(f"{path}: a damaged gzip file ({e})") from None
    first, _, rest = head.removeprefix(codecs.BOM_UTF8).partition(b"\n")  # (Arrow passes over it too)
    fields = first.split()
    count_line = len(fields) == 2 and all(x.isdigit() for x in fields)
    count, dim = map(int, fields) if count_line else (0, 0)
    lines = [first.split(b" "), rest.partition(b"\n")[0].split(b" ")]
    fields = [x for x in lines[count_line] if x.strip()]
    values = len(list(itertools.takewhile(is_number, reversed(fields))))  # the key before them may hold spaces
    if values == len(fields):  # numbers only: a numeric key after a count line, else a matrix's row (np.savetxt)
        values -= 1 if count_line else len(fields)
    if values and (not count_line or values == dim):
        return WordVectors(count_line, values, not lines[count_line][-1].strip(), False, count)
    if count_line and dim and b" " in rest[: F.MAX_KEY_BYTES + 1]:  # a line of text it is not: binary
        return WordVectors(True, dim, False, True, count)
    return None


def _binary_chunks(path: str, layout: WordVectors) -> Iterator[Chunk]:
    """The records of a word2vec binary file, those of a block of the file at a time."""
    record, n = 4 * layout.dim, 0
    with opened(path) as f:
        at, data = len(f.readline()), bytearray()  # ``data[0]``'s offset in the file, and the bytes not yet read
        while n < layout.records:
            try:
                block = f.read(BLOCK_BYTES)
            except GZIP_ERRORS as e:
                raise errors.ConversionError(f"{path}: a damaged gzip file ({e})") from None
            data += block
            keys: list[str] = []
            vectors: list[bytearray] = []
            pos = space = 0
            while n + len(keys) < layout.records:
                while data[pos : pos + 1] == b"\n":  # word2vec's C tool ends each record with one
                    pos += 1
                space = data.find(b" ", pos, pos + F.MAX_KEY_BYTES + 1)
                if space < 0 or space + 1 + record > len(data):
                    break
                try:
                    keys.append(data[pos:space].decode())
                except UnicodeDecodeError:
                    raise errors.ConversionError(f"{path}: the key at byte {at + pos} is not UTF-8") from None
                vectors.append(data[space + 1 : space + 1 + record])
                pos = space + 1 + record
            if keys:
                yield keys, np.frombuffer(b"".join(vectors), "<f4").reshape(len(keys), layout.dim)
                n += len(keys)
            if n < layout.records and not block:
                raise errors.ConversionError(f"{path}: ends after {n} of the {layout.records} records it counts")
            if space < 0 and len(data) - pos > F.MAX_KEY_BYTES:
                raise errors.ConversionError(f"{path}: no key ends at byte {at + pos}: not word2vec's binary format")
            del data[:pos]
            at += pos


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
        if is_number(key.rsplit(" ", 1)[-1].encode()):
            raise ValueError
        return key, np.array(values, np.float32)
    except ValueError:
        raise errors.ConversionError(f"{path}: not a key and {dim} numbers: {line[:80]!r}") from None


def to_word2vec(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, binary: bool | None = None, progress: bool = False
) -> str:
    """Write the .emb file ``src`` as word vectors at ``dst`` (atomic), for the tools that read them (gensim's
    ``load_word2vec_format``, spaCy's ``init vectors``, fastText's ``-pretrainedVectors``): a ``count dim``
    line, then each key and its values; in word2vec's binary format (float32, each record ending in a newline,
    as its C tool writes them) with ``binary`` (default: for a ``.bin`` name), else as text; gzipped for a
    ``.gz`` name.  A key holding whitespace is refused (the format separates fields by spaces), and so are
    per-residue records (pool them)."""
    from pyarrow import csv

    binary = os.fspath(dst).lower().removesuffix(".gz").endswith(".bin") if binary is None else binary
    with text_output(src, dst, "word vectors are one a key", progress, 4 if binary else 16) as (db, out, chunks):
        dtype = db.dtype if db.dtype == np.float64 and not binary else np.dtype("<f4")  # the format's type
        options = csv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")
        out.write(f"{len(db)} {db.dim}\n".encode())
        for keys, block in chunks:
            _refuse_spaced_keys(src, keys)
            matrix = np.asarray(block, dtype)
            if binary:
                out.write(b"".join(k + b" " + v.tobytes() + b"\n" for k, v in zip(_utf8(keys), matrix)))
            else:
                csv.write_csv(rows_table(keys, matrix), out, options)
    return os.fspath(dst)


def _refuse_spaced_keys(src: Any, keys: Any) -> None:
    import pyarrow.compute as pc

    spaced = pc.match_substring_regex(keys, r"\s")
    if pc.any(spaced).as_py():
        key = keys.filter(spaced)[0].as_py()
        raise errors.ConversionError(
            f"{src}: key {key!r} holds whitespace, which word vectors separate fields with; "
            "subset the file without it, or convert to another format"
        )


def _utf8(keys: Any) -> list[bytes]:
    return [k.encode() for k in keys.to_pylist()]
