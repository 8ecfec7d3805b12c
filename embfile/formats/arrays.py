"""Inputs that are arrays already: another .emb, a ``.npy`` matrix with a keys file, a pickle (a gensim model too)."""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile import errors
from embfile._stream import Chunk, Source, chunk_rows, pooled, source_of
from embfile.dataset import Dataset
from embfile.formats._common import NPY_ERRORS, holds_objects, opened
from embfile.formats.tensors import KeysFile, listed_keys, loaded_source
from embfile.shards import open as open_dataset


def read_emb(
    path: str | os.PathLike[str] | Dataset, *, pool: str | None = None, version: int | str | None = None
) -> Source:
    """Another .emb file or dataset folder (to change its dtype, or on the way to another format), of a folder
    its latest version or ``version``, or an open dataset (one at a URL, say); per-residue records pooled
    ``pool`` into one vector per key, as :meth:`embfile.Dataset.pool` does."""
    if isinstance(path, Dataset):
        if version is not None:
            raise ValueError("version= applies to a path; an open dataset is the version it was opened at")
        return pooled(dataclasses.replace(source_of(path), metadata=path.metadata), pool)
    db: Dataset = open_dataset(path, version)
    source = source_of(db)
    return pooled(dataclasses.replace(source, chunks=_closing(db, source.chunks), metadata=db.metadata), pool)


def _closing(db: Dataset, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    with db:
        yield from chunks


def read_npy(path: str | os.PathLike[str], *, keys: KeysFile = None, trust_pickle: bool = False) -> Source:
    """A 2-d ``.npy`` matrix (memory-mapped, never pickled) and a file of its keys: UTF-8 text, one a line,
    or the FASTA file its rows were embedded from (each record's id, in order).

    ``keys`` defaults to the matrix's name with ``.txt`` for ``.npy`` (``emb.npy`` -> ``emb.txt``).  An
    ``.npy`` of Python objects (``np.save`` of a dict) is read as a pickle is, only with ``trust_pickle=True``.
    """
    path = os.fspath(path)
    if holds_objects(path):
        if not trust_pickle:
            raise errors.ConversionError(
                f"{path}: holds pickled Python objects (np.save of a dict, say): loading them runs code; if you "
                "trust where it came from, pass trust_pickle=True (--trust-pickle)"
            )
        data = np.load(path, allow_pickle=True)
        return loaded_source(path, "npy", data.item() if data.ndim == 0 else data, None, None, "error", keys)
    keys = os.fspath(keys) if keys else os.path.splitext(path)[0] + ".txt"
    try:
        m = np.load(path, mmap_mode="r", allow_pickle=False)
    except NPY_ERRORS as e:
        raise errors.ConversionError(f"{path}: not a numeric .npy matrix ({e})") from None
    if not isinstance(m, np.ndarray):  # np.load opens an .npz archive whatever its name
        m.close()
        raise errors.ConversionError(f"{path}: an .npz archive, not an .npy matrix: --from npz reads it")
    if m.ndim != 2 or m.dtype.kind not in "iuf":
        raise errors.ConversionError(f"{path}: holds {m.shape} {m.dtype}, not an (n, dim) matrix of numbers")
    desc = {"format": "npy", "path": os.path.abspath(path), "keys": os.path.abspath(keys)}
    names = listed_keys(keys, m.shape[0], path)  # all first: a wrong count or a repeat fails at once
    return Source(m.shape[1], m.dtype.newbyteorder("="), m.shape[0], _npy_chunks(m, names), desc)


def _npy_chunks(m: np.ndarray, keys: list[str]) -> Iterator[Chunk]:
    step = chunk_rows(m.shape[1] * m.dtype.itemsize)
    for lo in range(0, len(keys), step):
        yield keys[lo : lo + step], np.asarray(m[lo : lo + step])


def read_pickle(
    path: str | os.PathLike[str],
    *,
    trust_pickle: bool = False,
    ids: str | None = None,
    vectors: str | None = None,
    keys: KeysFile = None,
    on_error: str = "error",
) -> Source:
    """A pickled ``dict {key: vector}`` (or ``{key: (L, dim) matrix}``: ragged records), a pair ``(ids,
    matrix)``, a dict holding the ids and the matrix, or a matrix and a file of its ``keys``, as a
    ``torch.save`` file holds them; or a pandas DataFrame (its columns found as a table's, ``ids`` and
    ``vectors`` naming them) or Series of vectors by key, as ``to_pickle`` writes them.  Loading a pickle runs
    code: only with ``trust_pickle=True``.

    The whole object is loaded (pickle cannot be read in parts).  A vector of a type that casts exactly to the
    first's is cast; ``on_error="skip"`` skips (and notes) one of another shape or type, or a key not a str.
    """
    path = os.fspath(path)
    if not trust_pickle:
        raise errors.ConversionError(
            f"{path}: loading a pickle runs code; if you trust where it came from, pass trust_pickle=True "
            "(--trust-pickle)"
        )
    try:
        with opened(path) as f:  # a .pkl.gz: read through gzip
            data = pickle.load(f)
    except Exception as e:  # a damaged pickle (or .gz) fails in any of a dozen ways, a class it names in more
        hint = "; a torch.save file? --from torch reads it" if "persistent" in str(e) else ""
        why = " ".join(str(e).split())
        raise errors.ConversionError(f"{path}: not a pickle this Python can load ({why}){hint}") from None
    return loaded_source(path, "pickle", _gensim_vectors(path, data), ids, vectors, on_error, keys)


def _gensim_vectors(path: str, data: Any) -> Any:
    """Of a gensim model or ``KeyedVectors`` saved with its ``save``, ``(keys, matrix)``: a ``Doc2Vec``'s
    documents, a ``Word2Vec``'s or ``FastText``'s words.  gensim loads it again, to attach the arrays it
    stored beside the pickle (``NAME.vectors.npy``, mapped); anything else is returned as it is."""
    if not hasattr(type(data), "_load_specials"):  # gensim.utils.SaveLoad's (asked of the class: pandas' objects
        # answer an instance's by looking the name up in their index, which a damaged pickle's crashes)
        return data
    loaded = type(data).load(path, mmap="r")
    vectors = next((v for v in (getattr(loaded, "dv", None), getattr(loaded, "wv", None)) if v is not None), loaded)
    return list(vectors.index_to_key), vectors.vectors
