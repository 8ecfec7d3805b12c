"""Files that list keys: a matrix's ids (``--keys``), the keys ``subset``, ``remove`` and ``get`` take.

Users keep them as they come: one a line, the FASTA file the sequences were embedded from, a JSON list or an
``.npy`` array saved beside the matrix, or the table of metadata beside it (LAION's ``metadata_0.parquet``
beside ``img_emb_0.npy``); any of them gzipped.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from embfile._extras import require
from embfile.formats._common import GZIP_ERRORS, NPY_ERRORS, holds_objects, opened
from embfile.formats.parquet import key_column_of


def keys_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys a file lists, in its order: one a line (UTF-8; blank lines skipped; ``"-"``: standard input),
    or, in a FASTA file, each record's id (its header's first word, as Biopython's ``record.id``), the order
    its sequences were embedded in; a JSON list (``.json``), a 1-d ``.npy`` array of strings or integers
    (``np.save("ids.npy", ids)``; integers as their decimal text), or a Parquet table's key column (found as
    a table's is).  Gzipped too (``uniprot_sprot.fasta.gz``)."""
    path = os.fspath(path)
    if path != "-" and _starts(path, b"\x93NUMPY"):
        return _npy_keys(path)
    if path != "-" and _starts(path, b"PAR1"):
        return _parquet_keys(path)
    if path.lower().removesuffix(".gz").endswith(".json"):
        return _json_keys(path)
    lines = []
    with sys.stdin.buffer if path == "-" else opened(path) as f:
        try:
            for number, line in enumerate(f, 1):
                try:
                    text = line.rstrip(b"\r\n").decode("utf-8-sig" if number == 1 else "utf-8")  # (Windows' BOM)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not UTF-8 text ({e.reason})") from None
                if text:
                    lines.append(text)
        except GZIP_ERRORS as e:
            raise ValueError(f"{path}: a damaged gzip file ({e})") from None
    if not lines or not lines[0].startswith(">"):
        return lines
    headers = [line[1:].split(maxsplit=1) for line in lines if line.startswith(">")]
    empty = next((i for i, words in enumerate(headers) if not words), None)
    if empty is not None:
        raise ValueError(f"{path}: FASTA record {empty + 1} has a header with no id")
    return [words[0] for words in headers]


def _starts(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _json_keys(path: str) -> list[str]:
    with opened(path) as f:
        try:
            keys = json.load(f)
        except (ValueError, *GZIP_ERRORS) as e:  # (UnicodeDecodeError is a ValueError)
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(keys, list) or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
        raise ValueError(f"{path}: not a JSON list of keys (strings or integers)")
    return [str(k) for k in keys]


def _npy_keys(path: str) -> list[str]:
    if holds_objects(path):
        raise ValueError(
            f"{path}: an array of Python objects, which only a pickle holds; save the keys as strings "
            "(np.save(path, np.array(keys, dtype=str)))"
        )
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, *NPY_ERRORS) as e:
        raise ValueError(f"{path}: a damaged .npy file ({e})") from None
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise ValueError(f"{path}: a {ids.dtype} array of shape {ids.shape}, not a list of keys (strings or integers)")
    try:
        return [k.decode() if isinstance(k, bytes) else str(k) for k in ids.tolist()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a key is not UTF-8 ({e.reason})") from None


def _parquet_keys(path: str) -> list[str]:
    pq = require("pyarrow.parquet", "parquet")
    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # Arrow's errors on a damaged file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    column = key_column_of(table.schema_arrow)
    if column is None:
        raise ValueError(
            f"{path}: cannot tell which of its columns ({', '.join(table.schema_arrow.names)}) holds the keys; "
            "name one id or key, or write the keys one a line"
        )
    try:
        keys = table.read(columns=[column]).column(0)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    if keys.null_count:
        raise ValueError(f"{path}: column {column!r} holds a null key")
    try:
        return [str(k) for k in keys.to_pylist()]
    except UnicodeDecodeError as e:  # Parquet's strings are not checked as they are read
        raise ValueError(f"{path}: a key of column {column!r} is not UTF-8 ({e.reason})") from None
