"""Inputs that are arrays already: another .emb, a ``.npy`` matrix with a keys file, a pickled dict."""

from __future__ import annotations

import collections.abc
import dataclasses
import gzip
import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile import errors
from embfile._stream import Chunk, Source, chunk_rows, source_of
from embfile.dataset import Dataset, EmbFile
from embfile.shards import ShardedEmbFile


def read_emb(path: str | os.PathLike[str]) -> Source:
    """Another .emb file or dataset folder (to change its dtype, or on the way to another format)."""
    db: Dataset = ShardedEmbFile(path) if os.path.isdir(path) else EmbFile(path)
    source = source_of(db)
    return dataclasses.replace(source, chunks=_closing(db, source.chunks), metadata=db.metadata)


def _closing(db: Dataset, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    with db:
        yield from chunks


def read_npy(path: str | os.PathLike[str], *, keys: str | os.PathLike[str] | None = None) -> Source:
    """A 2-d ``.npy`` matrix (memory-mapped, never pickled) and a UTF-8 text file of keys, one a line.

    ``keys`` defaults to the matrix's name with ``.txt`` for ``.npy`` (``emb.npy`` -> ``emb.txt``).
    """
    path = os.fspath(path)
    keys = os.fspath(keys) if keys else os.path.splitext(path)[0] + ".txt"
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise errors.ConversionError(f"{path}: not a numeric .npy matrix ({e})") from None
    if not isinstance(m, np.ndarray):  # np.load opens an .npz archive whatever its name
        m.close()
        raise errors.ConversionError(f"{path}: an .npz archive, not an .npy matrix: --from npz reads it")
    if m.ndim != 2 or m.dtype.kind not in "iuf":
        raise errors.ConversionError(f"{path}: holds {m.shape} {m.dtype}, not an (n, dim) matrix of numbers")
    if not os.path.exists(keys):
        raise errors.ConversionError(f"{path}: no keys file {keys}; name it with keys= (--keys)")
    desc = {"format": "npy", "path": os.path.abspath(path), "keys": os.path.abspath(keys)}
    return Source(m.shape[1], m.dtype.newbyteorder("="), m.shape[0], _npy_chunks(m, keys), desc)


def _npy_chunks(m: np.ndarray, keys_path: str) -> Iterator[Chunk]:
    n = m.shape[0]
    step = chunk_rows(m.shape[1] * m.dtype.itemsize)
    with open(keys_path, encoding="utf-8", newline="") as lines:
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            keys = [line.removesuffix("\n").removesuffix("\r") for _, line in zip(range(hi - lo), lines)]
            if len(keys) != hi - lo:
                raise errors.ConversionError(f"{keys_path}: {lo + len(keys)} keys for {n} rows")
            yield keys, np.asarray(m[lo:hi])
        extra = sum(1 for _ in lines)
        if extra:
            raise errors.ConversionError(f"{keys_path}: {n + extra} keys for {n} rows")


def read_pickle(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Source:
    """A pickled ``dict {key: vector}``.  Loading a pickle runs code: only with ``trust_pickle=True``.

    The whole dict is loaded (pickle cannot be read in parts).
    """
    path = os.fspath(path)
    if not trust_pickle:
        raise errors.ConversionError(
            f"{path}: loading a pickle runs code; if you trust where it came from, pass trust_pickle=True "
            "(--trust-pickle)"
        )
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:  # a .pkl.gz: read through gzip
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        hint = "; a torch.save file? --from torch reads it" if "persistent" in str(e) else ""
        why = " ".join(str(e).split())
        raise errors.ConversionError(f"{path}: not a pickle this Python can load ({why}){hint}") from None
    if not isinstance(data, collections.abc.Mapping):
        raise errors.ConversionError(f"{path}: holds a {type(data).__name__}, not a dict of vectors")
    if not data:
        raise errors.ConversionError(f"{path}: the dict is empty, so it has no dimension")
    v0 = np.asarray(next(iter(data.values())))
    if v0.ndim != 1 or v0.dtype.kind not in "iuf":
        raise errors.ConversionError(f"{path}: the first vector has shape {v0.shape} of {v0.dtype}, not (dim,)")
    desc = {"format": "pickle", "path": os.path.abspath(path)}
    return Source(v0.shape[0], v0.dtype.newbyteorder("="), len(data), _dict_chunks(data, v0), desc)


def _dict_chunks(data: collections.abc.Mapping[Any, Any], v0: np.ndarray) -> Iterator[Chunk]:
    step = chunk_rows(v0.nbytes)
    items = iter(data.items())
    while batch := [kv for _, kv in zip(range(step), items)]:
        matrix = np.empty((len(batch), v0.shape[0]), v0.dtype)
        for i, (key, v) in enumerate(batch):
            v = np.asarray(v)
            if not isinstance(key, str):
                raise errors.ConversionError(f"key {key!r} is a {type(key).__name__}; embfile keys are str")
            if v.shape != v0.shape or v.dtype != v0.dtype:
                raise errors.ConversionError(
                    f"key {key!r}: vector has shape {v.shape} of {v.dtype}, "
                    f"expected {v0.shape} of {v0.dtype} like the first"
                )
            matrix[i] = v
        yield [k for k, _ in batch], matrix
