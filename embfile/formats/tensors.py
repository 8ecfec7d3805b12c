"""Tensor containers: ``.npz`` archives, ``torch.save`` files, safetensors files and Zarr groups.

Each holds either one array per key (``(D,)`` vectors, or ``(L, D)`` per-residue matrices, read as ragged
records) or one ``(n, D)`` matrix beside its ids (an array of strings or integers, for safetensors a JSON
list in the file's metadata, or a keys file beside it: a list or the FASTA file the rows were embedded from).
Nothing here runs code: ``.npz`` is read without pickle, ``torch.save`` files with ``weights_only=True``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from embfile import _format as F
from embfile import errors
from embfile._extras import require
from embfile._stream import OnError, Source, array_of, chunk_rows, is_series, is_table, require_unique, source_of
from embfile.dataset import EmbFile
from embfile.formats._common import (
    GZIP_ERRORS,
    NPY_ERRORS,
    atomic_output,
    chunks_damage_named,
    damage_named,
    first_line,
    holds_objects,
)
from embfile.formats.keys import keys_file
from embfile.formats.parquet import memory_part, read_parts


class _Lazy(collections.abc.Mapping[str, np.ndarray]):
    """Named arrays loaded one at a time, when asked for (a conversion then holds one chunk of them)."""

    def __init__(self, names: list[str], load: Callable[[str], np.ndarray]) -> None:
        self.names, self.load = names, load

    def __getitem__(self, name: str) -> np.ndarray:
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _source(
    path: str,
    fmt: str,
    arrays: collections.abc.Mapping[str, Any],
    ids: str | None,
    vectors: str | None,
    id_list: list[str] | None = None,
    on_error: str | OnError = "error",
    key_file: str | os.PathLike[str] | None = None,
    named_by_key: bool = False,
) -> Source:
    """The records of named ``arrays``: the matrix ``vectors`` with the ids ``ids`` (an array, ``id_list``, or
    the file ``key_file``), found by shape when not named (a repeated id is an error before any vector is read);
    else one array per key (``on_error="skip"``: one that is not a vector, or not of the first's shape, is
    skipped).  One ``(n, dim)`` array alone is a matrix whose keys are in a file beside it, unless the arrays
    are ``named_by_key`` (a dict's: one per-residue record)."""
    bad = on_error if isinstance(on_error, OnError) else OnError(on_error)
    names = list(arrays)
    if not names:
        raise errors.ConversionError(f"{path}: holds no arrays: nothing to convert")
    desc: dict[str, Any] = {"format": fmt, "path": os.path.abspath(path)}
    alone = not (ids or vectors or id_list or named_by_key) and len(names) == 1 and np.ndim(arrays[names[0]]) == 2
    if key_file is None and alone:
        key_file = os.path.splitext(path)[0] + ".txt"  # a matrix alone: its keys are in a file beside it
    if key_file is not None:
        if ids:
            raise errors.ConversionError(f"{path}: ids= and keys= both say where the ids are: pass one")
        ids, vectors = None, vectors or _the_matrix(path, arrays, names)
        if vectors in names and len(np.shape(arrays[vectors])) == 2:
            of = path if len(names) == 1 else f"{path} ({vectors})"
            id_list = listed_keys(key_file, np.shape(arrays[vectors])[0], of)
            desc["keys"] = os.path.abspath(key_file)
    pair = (ids, vectors) if ids or vectors else _pair(arrays, names, id_list)
    if pair is not None:
        ids, vectors = pair
        if vectors is None:  # the ids named: the matrix is the one 2-d array
            vectors = _the_matrix(path, arrays, names)
        if vectors not in names:
            raise errors.ConversionError(f"{path}: no array {vectors!r}; arrays are {names[:8]}")
        matrix = arrays[vectors]
        keys = id_list if ids is None else _ids(path, arrays, ids, names)
        if keys is None:
            raise errors.ConversionError(f"{path}: which array holds the ids of {vectors!r}? name it with ids= (--ids)")
        if len(np.shape(matrix)) != 2 or len(keys) != np.shape(matrix)[0]:
            raise errors.ConversionError(
                f"{path}: {vectors!r} has shape {np.shape(matrix)}, not ({len(keys)}, dim) for {len(keys)} ids"
            )
        require_unique(keys, path)
        return dataclasses.replace(
            _matrix_source(keys, matrix), description={**desc, "ids": ids, "vectors": vectors}, on_error=bad
        )
    first = np.asarray(arrays[names[0]])
    if first.ndim not in (1, 2) or F.kind(first.dtype) not in "iuf":
        raise errors.ConversionError(
            f"{path}: {names[0]!r} holds {first.shape} {first.dtype}: neither a vector nor an (L, dim) matrix of "
            "numbers; name the ids and the matrix with ids= and vectors= (--ids, --vectors)"
        )
    return dataclasses.replace(source_of(arrays, path, ragged=first.ndim == 2, on_error=bad), description=desc)


def _the_matrix(path: str, arrays: collections.abc.Mapping[str, Any], names: list[str]) -> str:
    mats = [n for n in names if np.ndim(arrays[n]) == 2]
    if len(mats) != 1:
        raise errors.ConversionError(f"{path}: which array is the matrix? name it with vectors= (--vectors)")
    return mats[0]


def listed_keys(keys: str | os.PathLike[str], rows: int, of: str) -> list[str]:
    """The keys of the ``rows`` rows of the matrix ``of``, from the file ``keys``: one a line, or the ids of
    a FASTA file's records (see :func:`embfile._keys.keys_file`); a wrong count or a repeat is an error."""
    keys = os.fspath(keys)
    if not os.path.exists(keys):
        raise errors.ConversionError(
            f"{of}: a matrix of {rows} rows without ids, and no keys file {keys}: name a file of its keys, one a "
            "line or the FASTA file its rows were embedded from, with keys= (--keys)"
        )
    try:
        names = keys_file(keys)
    except ValueError as e:
        raise errors.ConversionError(str(e)) from None
    if len(names) != rows:
        raise errors.ConversionError(f"{keys}: {len(names)} keys for {rows} rows of {of}")
    require_unique(names, keys)
    return names


def _matrix_source(keys: list[str], matrix: Any) -> Source:
    """``keys`` beside an ``(n, dim)`` array, read some rows at a time (whole chunks of a Zarr array)."""
    n, dim = np.shape(matrix)
    dtype = np.dtype(matrix.dtype)
    step = chunk_rows(dim * dtype.itemsize, getattr(matrix, "chunks", (1,))[0])
    chunks = ((keys[lo : lo + step], np.asarray(matrix[lo : lo + step])) for lo in range(0, max(n, 1), step))
    return Source(dim, dtype, n, chunks, {})


def _pair(
    arrays: collections.abc.Mapping[str, Any], names: list[str], id_list: list[str] | None
) -> tuple[Any, Any] | None:
    """``(ids, vectors)`` names when the container is one matrix and its ids (a few arrays at most)."""
    if len(names) > 4:
        return None
    shapes = {n: np.shape(arrays[n]) for n in names}
    mats = [n for n, s in shapes.items() if len(s) == 2]
    if len(mats) != 1:
        return None
    rows = shapes[mats[0]][0]
    if id_list is not None and len(id_list) == rows:
        return None, mats[0]
    idss = [n for n, s in shapes.items() if s == (rows,) and np.asarray(arrays[n]).dtype.kind in "USTOiu"]
    return (idss[0], mats[0]) if len(idss) == 1 else None


def _ids(path: str, arrays: collections.abc.Mapping[str, Any], name: str, names: list[str]) -> list[str]:
    if name not in names:
        raise errors.ConversionError(f"{path}: no array {name!r}; arrays are {names[:8]}")
    raw = np.asarray(arrays[name])
    if raw.ndim != 1 or raw.dtype.kind not in "USTOiu":
        raise errors.ConversionError(f"{path}: {name!r} holds {raw.shape} {raw.dtype}, not a list of ids")
    if raw.dtype.kind == "S":
        return [b.decode() for b in raw.tolist()]
    return [str(k) for k in raw.tolist()]


KeysFile = str | os.PathLike[str] | None


# a zip's directory, member or header, or its deflate, damaged (a version number past the last: not implemented)
NPZ_DAMAGE = (zipfile.BadZipFile, NotImplementedError, UnicodeDecodeError, *NPY_ERRORS, *GZIP_ERRORS)


def read_npz(
    path: str | os.PathLike[str],
    *,
    ids: str | None = None,
    vectors: str | None = None,
    keys: KeysFile = None,
    on_error: str = "error",
) -> Source:
    """An ``np.savez`` archive, read without pickle: ``ids`` and an ``(n, dim)`` matrix (found by shape, or
    named), or one array per key.  ``keys``: a file of the matrix's keys, one a line, or the FASTA file its
    rows were embedded from, in place of ``ids``."""
    path = os.fspath(path)
    with damage_named(path, "a damaged .npz archive", NPZ_DAMAGE):
        archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise errors.ConversionError(f"{path}: an .npy matrix, not an .npz archive: --from npy reads it")

    def member(name: str) -> np.ndarray:
        assert archive.zip is not None  # (until the archive is closed)
        with archive.zip.open(f"{name}.npy") as f:
            if holds_objects(f):
                raise errors.ConversionError(f"{path}: {name!r} holds Python objects, which only a pickle holds")
        return archive[name]

    with damage_named(path, "a damaged .npz archive", NPZ_DAMAGE):
        source = _source(path, "npz", _Lazy(list(archive.files), member), ids, vectors, None, on_error, keys)
    return chunks_damage_named(source, path, "a damaged .npz archive", NPZ_DAMAGE)


def read_torch(
    path: str | os.PathLike[str],
    *,
    ids: str | None = None,
    vectors: str | None = None,
    keys: KeysFile = None,
    on_error: str = "error",
) -> Source:
    """A ``torch.save`` file, loaded with ``weights_only=True`` (it cannot run code): a dict ``{id: tensor}``,
    a pair ``(ids, tensor)``, a dict holding the ids and the matrix (found by shape, or named), or the
    matrix alone with a file of its keys, ``keys`` (default: the file's name with ``.txt``; see
    :func:`loaded_source`)."""
    torch = require("torch", "torch")
    path = os.fspath(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise errors.ConversionError(f"{path}: not a torch file it can load safely ({type(e).__name__}: {e})") from None

    return loaded_source(path, "torch", data, ids, vectors, on_error, keys)


def loaded_source(
    path: str, fmt: str, data: Any, ids: str | None, vectors: str | None, on_error: str, keys: KeysFile = None
) -> Source:
    """The records of an object a file held (``torch.save``, a pickle, ``np.save`` of a dict): a dict
    ``{id: vector}`` (or ``{id: (L, dim) matrix}``), a pair ``(ids, matrix)``, a dict holding the ids and
    the matrix, an ``(n, dim)`` matrix alone, or a table (a pandas DataFrame: ``ids`` and ``vectors`` name its
    columns) or a pandas Series of vectors by key.  ``keys`` is a file of the matrix's keys, one a line or the
    FASTA file its rows were embedded from (for a matrix alone, default: ``path``'s name with ``.txt``).  A
    key not a str is refused, or skipped under ``on_error="skip"``."""

    def array(value: Any) -> Any:  # a tensor as an array (bfloat16 kept); anything else as it is, for errors
        return array_of(value) if hasattr(value, "detach") else value

    if hasattr(data, "index") and type(data).__name__ in ("DataFrame", "Series"):
        _check_arrow_backed(data, path)
    if is_table(data):  # a DataFrame (pandas' to_pickle): its columns as a table's
        part = memory_part(data, path)
        return read_parts(path, fmt, [part], key_column=ids, vector_column=vectors, on_error=on_error)
    if is_series(data):  # pandas: of vectors indexed by key
        data = dict(data.items())
    if isinstance(data, (tuple, list)) and len(data) == 2:
        held, matrix = data
        id_list = [str(k) for k in (held.tolist() if hasattr(held, "tolist") else held)]
        return _source(path, fmt, {"vectors": array(matrix)}, None, "vectors", id_list, on_error, keys)
    if len(getattr(data, "shape", ())) == 2:
        return _source(path, fmt, {"matrix": array(data)}, None, None, None, on_error, keys)
    if not isinstance(data, collections.abc.Mapping):
        raise errors.ConversionError(f"{path}: holds a {type(data).__name__}, not a dict of vectors or (ids, matrix)")
    bad = OnError(on_error)
    for key in (k for k in data if not isinstance(k, str)):
        bad(errors.ConversionError(f"key {key!r} is a {type(key).__name__}; embfile keys are str"), path, key)
    names = [k for k in data if isinstance(k, str)]
    return _source(path, fmt, _Lazy(names, lambda k: array(data[k])), ids, vectors, None, bad, keys, named_by_key=True)


def _check_arrow_backed(frame: Any, path: str) -> None:
    """The Arrow arrays a pandas DataFrame or Series from a pickle keeps its strings in, checked whole: one a
    damaged pickle made (offsets past its data) crashes pyarrow as pandas reads it."""
    pa = sys.modules.get("pyarrow")
    if pa is None:  # (pandas imports it to hold strings in it: without it, there are none)
        return

    def arrays() -> Iterator[Any]:  # the labels first: taking a column reads its label
        yield frame.index
        if frame.ndim == 1:
            yield frame
            return
        yield frame.columns
        yield from (frame.iloc[:, i] for i in range(frame.shape[1]))

    for values in arrays():
        try:
            arrow = values.array.__arrow_array__  # (pandas' arrays over Arrow have it; a MultiIndex has no array)
        except (AttributeError, ValueError, TypeError):
            continue
        try:
            arrow().validate(full=True)
        except pa.ArrowException as e:
            what = f"{type(frame).__name__}: {first_line(e)}"
            raise errors.ConversionError(f"{path}: a damaged pickle ({what})") from None


def read_safetensors(
    path: str | os.PathLike[str],
    *,
    ids: str | None = None,
    vectors: str | None = None,
    keys: KeysFile = None,
    on_error: str = "error",
) -> Source:
    """A safetensors file: one tensor per key, or one ``(n, dim)`` matrix with its ids in a second tensor,
    as a JSON list in the file's metadata under ``ids`` (default ``"ids"``), or in a file ``keys`` (one a
    line, or the FASTA file its rows were embedded from)."""
    safetensors = require("safetensors", "safetensors")
    path = os.fspath(path)
    try:
        f = safetensors.safe_open(path, framework="np")
    except Exception as e:  # its errors are of its own types
        raise errors.ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    names = list(f.keys())
    meta = f.metadata() or {}
    id_list = None
    if (ids or "ids") in meta and keys is None:
        try:
            id_list = [str(k) for k in json.loads(meta[ids or "ids"])]
        except (ValueError, TypeError):
            raise errors.ConversionError(f"{path}: metadata {ids or 'ids'!r} is not a JSON list of ids") from None
        ids = None

    def load(name: str) -> np.ndarray:
        if f.get_slice(name).get_dtype() == "BF16":
            F.disk_dtype("bfloat16")  # safetensors reads it as numpy's bfloat16 once ml_dtypes is imported
        return np.asarray(f.get_tensor(name))

    if id_list is not None:
        if vectors is None and len(names) != 1:
            raise errors.ConversionError(
                f"{path}: ids in the metadata, and {len(names)} tensors: name one with vectors="
            )
        return _source(path, "safetensors", _Lazy(names, load), None, vectors or names[0], id_list)
    return _source(path, "safetensors", _Lazy(names, load), ids, vectors, None, on_error, keys)


def read_zarr(
    path: str | os.PathLike[str],
    *,
    ids: str | None = None,
    vectors: str | None = None,
    keys: KeysFile = None,
    group: str | None = None,
    on_error: str = "error",
) -> Source:
    """A Zarr group (format 2 or 3; ``group``, a path inside the store): an ids array (strings or integers;
    or ``keys``, a file of them, one a line or the FASTA file the rows were embedded from) beside an
    ``(n, dim)`` matrix (found by shape, or named), read a chunk at a time; or one array per key."""
    zarr = require("zarr", "zarr")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    with damage_named(path, "not a readable Zarr group", ZARR_DAMAGE):
        root = zarr.open_group(path, mode="r", path=group or "")
        arrays = dict(sorted(root.arrays()))  # zarr lists members in no fixed order
        source = _source(path, "zarr", arrays, ids, vectors, None, on_error, keys)
    return chunks_damage_named(source, path, "not a readable Zarr group", ZARR_DAMAGE)


# zarr's, of metadata it cannot parse (ValueError, TypeError: a field misnamed) or a chunk its codec cannot
# decode (RuntimeError), or an array missing (FileNotFoundError, KeyError)
ZARR_DAMAGE = (ValueError, TypeError, RuntimeError, KeyError, FileNotFoundError)


def to_safetensors(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, vectors: str = "embeddings", progress: bool = False
) -> str:
    """Write the .emb file ``src`` as safetensors at ``dst`` (atomic): one ``(n, dim)`` tensor ``vectors`` with
    the keys, in row order, as a JSON list under ``"ids"`` in the file's metadata (and the .emb metadata under
    ``"embfile.metadata"``), as :func:`read_safetensors` reads it back.  Per-residue records are refused:
    safetensors has no ragged tensor (convert to HDF5 or Parquet, or pool them)."""
    safetensors_numpy = require("safetensors.numpy", "safetensors")
    with EmbFile(src) as db:
        if db.ragged:
            raise errors.ConversionError(
                f"{src}: per-residue records: safetensors has no ragged tensor; pool them with pool='mean' "
                "(--pool mean)"
            )
        metadata = {"ids": json.dumps(list(db), ensure_ascii=False), "embfile.metadata": json.dumps(db.metadata)}
        with atomic_output(dst, 2 * db.matrix.nbytes) as tmp:
            safetensors_numpy.save_file({vectors: np.ascontiguousarray(db.matrix)}, tmp, metadata=metadata)
    return os.fspath(dst)
