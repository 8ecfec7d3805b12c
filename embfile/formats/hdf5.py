"""HDF5 in and out, in the layouts our users' tools write.

* per-key: one dataset per key, as ProtTrans' ``prott5_embedder.py`` writes it (shape ``(D,)``,
  or ``(L, D)`` per residue: ragged records, or pooled on request), or bio_embeddings (the id in an
  attribute);
* bulk: a 1-d ids dataset (strings or integers) beside an ``(n, D)`` matrix;
* scikit-bio's ``embed`` format: per-residue rows of every sequence in one ``embedding`` matrix, the
  sequences' bytes in ``id``, and where each ends in ``idptr`` (and ``embedding_ptr``).

Per-key input is read through h5py's low-level API straight into the chunk buffer
(the high-level ``f[key][()]`` costs several times as much per dataset).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from embfile import errors
from embfile._extras import require
from embfile._stream import Chunk, OnError, RaggedChunk, Source, chunk_rows, pooled, progress_bar, require_unique
from embfile.dataset import EmbFile
from embfile.formats._common import atomic_output, chunks_damage_named, damage_named, start_writeback

META_ATTR = "embfile_metadata"  # where exports keep the .emb metadata (JSON), and imports find it
LAYOUTS = ("bulk", "per-key", "skbio")
DAMAGE = (RuntimeError, KeyError, ValueError, TypeError, SystemError)  # h5py's (and OSErrors of no errno), of a file
# HDF5 cannot walk: a damaged link, heap, header, type or dataspace
_MAX_BULK_MEMBERS = 8  # a group with more members than this is taken as per-key


def read_hdf5(
    path: str | os.PathLike[str],
    *,
    group: str = "/",
    layout: str | None = None,
    key_attr: str | None = None,
    pool: str | None = None,
    ids: str | None = None,
    vectors: str | None = None,
    on_error: str = "error",
) -> Source:
    """Open an HDF5 file of embeddings for streaming (see :func:`embfile.formats.from_hdf5`).
    ``on_error="skip"`` skips a per-key dataset of another shape, of a type the first's cannot hold exactly,
    or without its ``key_attr``, and notes it (a type that casts exactly is read converted)."""
    bad = OnError(on_error)
    h5py = require("h5py", "hdf5")
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, not {layout!r}")
    path = os.fspath(path)
    with damage_named(path, "a damaged HDF5 file", DAMAGE):
        source = _read_hdf5(h5py, path, group, layout, key_attr, pool, ids, vectors, bad)
    return chunks_damage_named(source, path, "a damaged HDF5 file", DAMAGE)


def _read_hdf5(
    h5py: Any,
    path: str,
    group: str,
    layout: str | None,
    key_attr: str | None,
    pool: str | None,
    ids: str | None,
    vectors: str | None,
    bad: OnError,
) -> Source:
    with h5py.File(path, "r") as f:
        if group not in f or not isinstance(f[group], h5py.Group):
            raise errors.ConversionError(f"{path}: no group {group!r}")
        g = f[group]
        meta = _stored_metadata(f)
        if layout is None:
            layout = "bulk" if ids or vectors else "skbio" if _is_skbio(g) else "bulk" if _bulk_pair(g) else "per-key"
        if layout == "bulk":
            if key_attr or pool:
                raise errors.ConversionError(f"{path}: key_attr and pool apply to per-residue layouts only")
            return _read_bulk(h5py, path, g, ids, vectors, meta)
        if ids or vectors:
            raise errors.ConversionError(f"{path}: ids and vectors name the datasets of the bulk layout")
        if layout == "skbio":
            return pooled(_read_skbio(path, g, meta), pool)
        return pooled(_read_per_key(h5py, path, g, key_attr, meta, bad), pool)


def _stored_metadata(f: Any) -> dict[str, Any]:
    try:
        meta = json.loads(f.attrs.get(META_ATTR, "{}"))
    except (TypeError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _bulk_pair(g: Any) -> tuple[str, str] | None:
    """``(ids, vectors)`` names if ``g`` holds exactly one matrix and one matching 1-d ids dataset."""
    names: list[str] = []
    g.id.links.iterate(lambda name: names.append(name.decode()) if len(names) <= _MAX_BULK_MEMBERS else 1)
    if len(names) > _MAX_BULK_MEMBERS:
        return None
    members = [(n, g.get(n)) for n in names]
    mats = [(n, d) for n, d in members if _is_dataset(d) and d.ndim == 2 and d.dtype.kind in "iuf"]
    if len(mats) != 1:
        return None
    rows = mats[0][1].shape[0]
    idss = [n for n, d in members if _is_dataset(d) and d.shape == (rows,) and _ids_kind(d) is not None]
    return (idss[0], mats[0][0]) if len(idss) == 1 else None


def _is_dataset(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "dtype") and hasattr(obj, "shape")


def _ids_kind(d: Any) -> str | None:
    import h5py

    if h5py.check_string_dtype(d.dtype) is not None or d.dtype.kind == "S":
        return "str"
    return "int" if d.dtype.kind in "iu" else None


def _read_bulk(h5py: Any, path: str, g: Any, ids: str | None, vectors: str | None, meta: dict[str, Any]) -> Source:
    if not (ids and vectors):
        found = _bulk_pair(g)
        if found is None:
            raise errors.ConversionError(
                f"{path}: cannot tell which datasets hold the ids and the vectors in {g.name!r}; "
                "name them with ids= and vectors= (--ids, --vectors)"
            )
        ids, vectors = ids or found[0], vectors or found[1]
    for name in (ids, vectors):
        if not _is_dataset(g.get(name)):
            raise errors.ConversionError(f"{path}: no dataset {name!r} in {g.name!r}")
    vd, idd = g[vectors], g[ids]
    if vd.ndim != 2 or vd.dtype.kind not in "iuf":
        raise errors.ConversionError(
            f"{path}: {vectors!r} has shape {vd.shape} of {vd.dtype}, not an (n, dim) matrix of numbers"
        )
    if idd.shape != (vd.shape[0],) or _ids_kind(idd) is None:
        raise errors.ConversionError(
            f"{path}: {ids!r} has shape {idd.shape} of {idd.dtype}, not {vd.shape[0]} string or integer ids"
        )
    n, dim = vd.shape
    dtype = vd.dtype.newbyteorder("=")
    step = chunk_rows(dim * dtype.itemsize, vd.chunks[0] if vd.chunks else 1)
    desc = {"format": "hdf5", "path": os.path.abspath(path), "layout": "bulk", "ids": idd.name, "vectors": vd.name}
    keys: list[str] = []  # every id first: a repeated one is an error before any vector is read
    for lo in range(0, n, 1 << 16):
        raw = idd[lo : lo + (1 << 16)]
        keys += raw.astype(str).tolist() if _ids_kind(idd) == "int" else _decode(raw, path, ids, lo)
    require_unique(keys, path)
    return Source(dim, dtype, n, _bulk_chunks(path, vd.name, keys, dim, dtype, step), desc, meta)


def _bulk_chunks(path: str, vectors: str, keys: list[str], dim: int, dtype: np.dtype, step: int) -> Iterator[Chunk]:
    import h5py

    with h5py.File(path, "r") as f:
        vd = f[vectors]
        for lo in range(0, len(keys), step):
            hi = min(lo + step, len(keys))
            out = np.empty((hi - lo, dim), dtype)
            vd.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
            yield keys[lo:hi], out


def _decode(raw: np.ndarray, path: str, name: str, lo: int) -> list[str]:
    try:
        return [b.decode() for b in raw]
    except UnicodeDecodeError:
        for i, b in enumerate(raw):
            try:
                b.decode()
            except UnicodeDecodeError:
                raise errors.ConversionError(f"{path}: {name}[{lo + i}] = {bytes(b)!r} is not UTF-8") from None
        raise


def _dataset_names(h5py: Any, g: Any) -> list[bytes]:
    """Paths (relative to ``g``, in name order) of every dataset under ``g``, nested groups included."""
    names = []

    def visit(name: bytes, info: Any) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            names.append(name)

    h5py.h5o.visit(g.id, visit, info=True)
    return names


def _read_per_key(h5py: Any, path: str, g: Any, key_attr: str | None, meta: dict[str, Any], bad: OnError) -> Source:
    """One dataset per key: ``(D,)`` vectors, or per-residue ``(L, D)`` matrices read as ragged records (a
    ``(D,)`` among them is one row: ProtTrans squeezes a one-residue peptide)."""
    names = _dataset_names(h5py, g)
    if not names:
        raise errors.ConversionError(f"{path}: no datasets under {g.name!r}: nothing to convert")
    first = g[names[0].decode()]
    if first.dtype.kind not in "iuf":
        raise errors.ConversionError(f"{path}: dataset {first.name!r} holds {first.dtype}, not numbers")
    if first.ndim not in (1, 2):
        raise errors.ConversionError(f"{path}: dataset {first.name!r} has shape {first.shape}, not (dim,) or (L, dim)")
    dim = first.shape[-1]
    dtype = first.dtype.newbyteorder("=")
    desc = {"format": "hdf5", "path": os.path.abspath(path), "layout": "per-key", "group": g.name}
    if key_attr:
        desc["key_attr"] = key_attr
    if first.ndim == 2:
        rows = _per_residue_chunks(h5py, path, g.name, names, dim, dtype, key_attr, bad)
        return Source(dim, dtype, len(names), rows, desc, meta, ragged=True, on_error=bad)
    vectors = _per_key_chunks(h5py, path, g.name, names, dim, dtype, key_attr, bad)
    return Source(dim, dtype, len(names), vectors, desc, meta, on_error=bad)


def _per_residue_chunks(
    h5py: Any,
    path: str,
    group: str,
    names: list[bytes],
    dim: int,
    dtype: np.dtype,
    key_attr: str | None,
    bad: OnError,
) -> Iterator[RaggedChunk]:
    step = chunk_rows(dim * dtype.itemsize)
    with h5py.File(path, "r") as f:
        gid = f[group].id
        want = h5py.h5d.open(gid, names[0]).get_type()
        keys: list[str] = []
        blocks: list[np.ndarray] = []
        rows = 0
        for name in names:
            ds = h5py.h5d.open(gid, name)
            where = f"{path}: dataset {name.decode()!r}"
            shape = (1, dim) if ds.shape == (dim,) else ds.shape
            try:
                _same_type(h5py, ds, want, dtype, where)
                if len(shape) != 2 or shape[1] != dim or shape[0] == 0:
                    raise errors.ConversionError(f"{where} has shape {ds.shape}, expected (L, {dim}) with L > 0")
                key = _attr_key(h5py, ds, key_attr, where) if key_attr else name.decode()
            except errors.ConversionError as e:
                bad(e, path, name.decode())
                continue
            block = np.empty(shape, dtype)
            ds.read(h5py.h5s.ALL, h5py.h5s.ALL, block)  # HDF5 converts a type that casts exactly
            keys.append(key)
            blocks.append(block)
            rows += shape[0]
            if rows >= step:
                yield keys, np.concatenate(blocks), np.array([len(b) for b in blocks])
                keys, blocks, rows = [], [], 0
        if keys:
            yield keys, np.concatenate(blocks), np.array([len(b) for b in blocks])


def _is_skbio(g: Any) -> bool:
    return all(_is_dataset(g.get(name)) for name in ("embedding", "id", "idptr"))


def _read_skbio(path: str, g: Any, meta: dict[str, Any]) -> Source:
    """scikit-bio's ``embed`` HDF5: each sequence's rows of ``embedding``, keyed by the sequence itself."""
    emb, ids = g["embedding"], g["id"]
    if emb.ndim != 2 or emb.dtype.kind not in "iuf" or ids.ndim != 1:
        raise errors.ConversionError(f"{path}: not scikit-bio's embed layout (embedding {emb.shape} {emb.dtype})")
    id_ends = _ends(g["idptr"][()], len(ids), path, "idptr")
    row_ends = _ends(g["embedding_ptr"][()], len(emb), path, "embedding_ptr") if "embedding_ptr" in g else id_ends
    if len(row_ends) != len(id_ends):
        raise errors.ConversionError(f"{path}: idptr and embedding_ptr name {len(id_ends)} and {len(row_ends)} records")
    dim, dtype = emb.shape[1], emb.dtype.newbyteorder("=")
    desc = {"format": "hdf5", "path": os.path.abspath(path), "layout": "skbio", "group": g.name}
    chunks = _skbio_chunks(path, g.file.filename, g.name, id_ends, row_ends, dim, dtype)
    return Source(dim, dtype, len(id_ends), chunks, desc, meta, ragged=True)


def _ends(pointers: np.ndarray, total: int, path: str, name: str) -> np.ndarray:
    """Where each record ends, from scikit-bio's cumulative ``pointers``: its writer leaves out the last one,
    which ends where the data does (and its reader then skips that record: here it is kept)."""
    ends = np.asarray(pointers, np.int64).reshape(-1)
    if not len(ends) or ends[-1] < total:
        ends = np.append(ends, total)
    starts = np.concatenate([[0], ends[:-1]])
    if (ends <= starts).any() or ends[-1] != total:
        raise errors.ConversionError(f"{path}: {name} is not increasing up to {total}")
    return ends


def _skbio_chunks(
    path: str, filename: str, group: str, id_ends: np.ndarray, row_ends: np.ndarray, dim: int, dtype: np.dtype
) -> Iterator[RaggedChunk]:
    import h5py

    step = chunk_rows(dim * dtype.itemsize)
    with h5py.File(filename, "r") as f:
        emb, ids = f[group]["embedding"], f[group]["id"]
        lo = 0
        while lo < len(row_ends):
            first_row = int(row_ends[lo - 1]) if lo else 0
            hi = max(lo + 1, int(np.searchsorted(row_ends, first_row + step, "right")))
            rows = emb[first_row : int(row_ends[hi - 1])].astype(dtype, copy=False)
            first_id = int(id_ends[lo - 1]) if lo else 0
            raw = ids[first_id : int(id_ends[hi - 1])].tobytes()
            cuts = (id_ends[lo:hi] - first_id).tolist()
            keys = [raw[a:b].decode("utf-8", "replace") for a, b in zip([0, *cuts[:-1]], cuts)]
            yield keys, rows, np.diff(np.concatenate([[first_row], row_ends[lo:hi]]))
            lo = hi


def _per_key_chunks(
    h5py: Any,
    path: str,
    group: str,
    names: list[bytes],
    dim: int,
    dtype: np.dtype,
    key_attr: str | None,
    bad: OnError,
) -> Iterator[Chunk]:
    record = dim * dtype.itemsize
    step = chunk_rows(record)
    with h5py.File(path, "r") as f, open(path, "rb") as raw:
        gid = f[group].id
        first = h5py.h5d.open(gid, names[0])
        want = first.get_type()
        # Contiguous, unfiltered datasets are read with a plain pread at the offset HDF5
        # gives: a third of the cost of H5Dread per dataset.  Not with a user block
        # (offsets would need shifting) or non-native byte order.
        direct_ok = f.userblock_size == 0 and first.dtype.isnative
        for lo in range(0, len(names), step):
            batch = names[lo : lo + step]
            buf = np.empty((len(batch), dim), dtype)
            keys, direct, good = [], [], []
            for i, name in enumerate(batch):
                ds = h5py.h5d.open(gid, name)
                where = f"{path}: dataset {name.decode()!r}"
                try:
                    same = _same_type(h5py, ds, want, dtype, where)
                    if ds.shape != (dim,):
                        raise errors.ConversionError(
                            f"{where} has shape {ds.shape}, expected ({dim},) as the first dataset"
                        )
                    key = _attr_key(h5py, ds, key_attr, where) if key_attr else name.decode()
                except errors.ConversionError as e:
                    bad(e, path, name.decode())
                    continue
                offset = ds.get_offset() if direct_ok and same else None
                if offset is not None and ds.get_storage_size() == record:
                    direct.append((offset, i))
                else:
                    ds.read(h5py.h5s.ALL, h5py.h5s.ALL, buf[i])  # HDF5 converts a type that casts exactly
                keys.append(key)
                good.append(i)
            rows = buf.view(np.uint8).reshape(len(batch), record)
            for offset, i in sorted(direct):  # in file order: sequential reads for read-ahead
                if os.preadv(raw.fileno(), [rows[i]], offset) != record:
                    raise errors.ConversionError(f"{path}: truncated inside dataset {batch[i].decode()!r}")
            yield keys, buf if len(good) == len(batch) else buf[good]


def _same_type(h5py: Any, ds: Any, want: Any, dtype: np.dtype, where: str) -> bool:
    """Whether dataset ``ds`` holds the first dataset's type ``want``; one that casts to it exactly (float16
    among float32) is read converted, any other is an error."""
    if ds.get_type() == want:
        return True
    theirs = h5py.Dataset(ds).dtype
    if theirs.kind in "iuf" and np.can_cast(theirs, dtype, "safe"):
        return False
    raise errors.ConversionError(f"{where} holds {theirs}, the first dataset {dtype}: mixed types")


def _attr_key(h5py: Any, ds: Any, key_attr: str, where: str) -> str:
    value = h5py.Dataset(ds).attrs.get(key_attr)
    if value is None:
        raise errors.ConversionError(f"{where} has no attribute {key_attr!r} to take its key from")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(())[()]
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode()
    return str(value)


def to_hdf5(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    layout: str | None = None,
    ids: str = "keys",
    vectors: str = "vectors",
    compression: str | None = None,
    progress: bool = False,
) -> str:
    """Write the .emb file ``src`` to HDF5 at ``dst`` (atomic).

    ``layout="bulk"`` (the default for one vector per key) writes a variable-length UTF-8 ``ids`` dataset
    and an ``(n, dim)`` ``vectors`` dataset, chunked about 1 MiB per chunk, optionally compressed
    (``compression="gzip"`` or ``"lzf"``).  ``layout="per-key"`` (the default, and the only layout, for
    per-residue records) writes one dataset per key at the root, as ProtTrans does: ``(dim,)``, or
    ``(length, dim)`` (a ``/`` in a key makes groups, which :func:`~embfile.from_hdf5` reads back as the same
    key).  The .emb metadata goes into the root attribute ``embfile_metadata`` as JSON.
    """
    h5py = require("h5py", "hdf5")
    if layout not in (None, "bulk", "per-key"):
        raise ValueError(f"layout must be 'bulk' or 'per-key', not {layout!r}")
    with EmbFile(src) as db, progress_bar(len(db), progress, os.path.basename(os.fspath(dst))) as bar:
        layout = layout or ("per-key" if db.ragged else "bulk")
        if db.ragged and layout != "per-key":
            raise errors.ConversionError(f"{src}: per-residue records are written per key: layout='per-key'")
        if db.dtype.name == "bfloat16":
            raise errors.ConversionError(f"{src}: HDF5 has no bfloat16 type; export a float32 copy (dtype='float32')")
        meta = json.dumps(db.metadata, ensure_ascii=False)
        size = db.header.keys_size + (0 if compression else db.matrix.nbytes)
        with atomic_output(dst, size) as tmp, h5py.File(tmp, "w") as f:
            f.attrs[META_ATTR] = meta
            step = _write_bulk if layout == "bulk" else _write_per_key
            for done in step(h5py, db, f, ids, vectors, compression):
                f.flush()
                start_writeback(tmp)
                bar.update(done)
    return os.fspath(dst)


def _write_bulk(h5py: Any, db: EmbFile, f: Any, ids: str, vectors: str, compression: str | None) -> Iterator[int]:
    n, dim, record = len(db), db.dim, db.dim * db.dtype.itemsize
    kd = f.create_dataset(ids, shape=(n,), dtype=h5py.string_dtype())
    if n:
        rows = min(n, max(1, (1 << 20) // record))
        vd = f.create_dataset(vectors, shape=(n, dim), dtype=db.dtype, chunks=(rows, dim), compression=compression)
    else:
        vd = f.create_dataset(vectors, shape=(0, dim), dtype=db.dtype)
    for lo, hi, block in db.chunks(chunk_rows(record, vd.chunks[0] if vd.chunks else 1)):
        vd.write_direct(np.ascontiguousarray(block), np.s_[0 : hi - lo], np.s_[lo:hi])
        kd[lo:hi] = db.keys_between(lo, hi)
        yield hi - lo


def _write_per_key(h5py: Any, db: EmbFile, f: Any, ids: str, vectors: str, compression: str | None) -> Iterator[int]:
    step = chunk_rows(db.dim * db.dtype.itemsize)
    for lo, hi, block, offsets in db.ragged_chunks(step):
        records = (block[a:b] for a, b in zip(offsets[:-1], offsets[1:])) if db.ragged else block
        for key, vector in zip(db.keys_between(lo, hi), records):
            parts = key.split("/")
            if not key or any(p in ("", ".") for p in parts):
                raise errors.ConversionError(
                    f"key {key!r} cannot be an HDF5 dataset name; use layout='bulk' (--layout bulk)"
                )
            try:
                f.create_dataset(key, data=vector, compression=compression)
            except ValueError as e:  # "a/b" after "a": a name taken by a dataset or a group
                raise errors.ConversionError(
                    f"key {key!r} clashes with another key as an HDF5 path ({e}); use layout='bulk'"
                ) from None
        yield hi - lo
