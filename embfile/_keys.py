"""Keys as UTF-8 bytes back to back, the way an .emb keys section and an Arrow string array hold them."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import sys
import typing
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EncodedKeys:
    """Keys already encoded as UTF-8, back to back: key ``i`` is ``heap[offsets[i]:offsets[i + 1]]``.

    The layout of an .emb file's keys section and of an Arrow string array: a writer takes the bytes as they
    are, where a list of ``str`` costs a Python object and an encode per key.  The bytes must be valid UTF-8
    (as they are in both).  Slicing gives the keys of a range of rows; an index, one key as ``str``.
    """

    offsets: np.ndarray  # (n + 1,) int64, ascending; need not start at 0
    heap: np.ndarray  # uint8

    @classmethod
    def of_arrow(cls, array: Any) -> EncodedKeys:
        """The keys of an Arrow ``string`` or ``large_string`` array without nulls (no copy)."""
        width = np.int64 if str(array.type) in ("large_string", "large_utf8") else np.int32
        _, offsets, data = array.buffers()
        raw = np.frombuffer(offsets, width)[array.offset : array.offset + len(array) + 1]
        heap = np.frombuffer(data, np.uint8) if data is not None else np.empty(0, np.uint8)
        return cls(raw.astype(np.int64), heap)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @typing.overload
    def __getitem__(self, index: int) -> str: ...
    @typing.overload
    def __getitem__(self, index: slice) -> EncodedKeys: ...
    def __getitem__(self, index: int | slice) -> str | EncodedKeys:
        if isinstance(index, slice):
            lo, hi, _ = index.indices(len(self))
            return EncodedKeys(self.offsets[lo : max(lo, hi) + 1], self.heap)
        lo, hi = self.offsets[index : index + 2] if index >= 0 else self.offsets[index - 1 : index + 1 or None]
        return bytes(self.heap[lo:hi]).decode("utf-8", "replace")

    def tolist(self) -> list[str]:
        """The keys as ``str``."""
        return [self[i] for i in range(len(self))]


def key_list(keys: Iterable[str], what: str) -> list[str]:
    """``keys`` as a list; one ``str`` refused (its characters would pass for keys), ``what`` naming the
    argument in the message."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"{what} takes an iterable of keys, not a single key")
    try:
        return keys.to_pylist() if hasattr(keys, "to_pylist") else list(keys)  # Arrow's items are its scalars
    except TypeError:
        raise TypeError(f"{what} takes an iterable of keys, not {type(keys).__name__}") from None


def keys_file(path: str | os.PathLike[str]) -> list[str]:
    """The keys a file lists, in its order: one a line (UTF-8; blank lines skipped; ``"-"``: standard input),
    or, in a FASTA file, each record's id (its header's first word, as Biopython's ``record.id``), the order
    its sequences were embedded in; a JSON list (``.json``), or a 1-d ``.npy`` array of strings or integers
    (``np.save("ids.npy", ids)``; integers as their decimal text).  Gzipped too (``uniprot_sprot.fasta.gz``)."""
    path = os.fspath(path)
    if path != "-" and _starts(path, b"\x93NUMPY"):
        return _npy_keys(path)
    if path.lower().removesuffix(".gz").endswith(".json"):
        return _json_keys(path)
    lines = []
    with sys.stdin.buffer if path == "-" else _opened(path) as f:
        try:
            for number, line in enumerate(f, 1):
                try:
                    text = line.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: line {number} is not UTF-8 text ({e.reason})") from None
                if text:
                    lines.append(text)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
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


def _opened(path: str) -> typing.IO[bytes]:
    """The file at ``path``, read through gzip if it is gzipped."""
    return gzip.open(path, "rb") if _starts(path, b"\x1f\x8b") else open(path, "rb")  # type: ignore[return-value]


def _json_keys(path: str) -> list[str]:
    with _opened(path) as f:
        try:
            keys = json.load(f)
        except (ValueError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # (UnicodeDecodeError is a ValueError)
            raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(keys, list) or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
        raise ValueError(f"{path}: not a JSON list of keys (strings or integers)")
    return [str(k) for k in keys]


def _npy_keys(path: str) -> list[str]:
    try:
        ids = np.load(path, allow_pickle=False)
    except ValueError:
        raise ValueError(
            f"{path}: an array of Python objects, which only a pickle holds; save the keys as strings "
            "(np.save(path, np.array(keys, dtype=str)))"
        ) from None
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise ValueError(f"{path}: a {ids.dtype} array of shape {ids.shape}, not a list of keys (strings or integers)")
    try:
        return [k.decode() if isinstance(k, bytes) else str(k) for k in ids.tolist()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a key is not UTF-8 ({e.reason})") from None
