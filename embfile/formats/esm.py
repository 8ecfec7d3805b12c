"""A folder of fair-esm ``extract.py`` outputs: one ``{label}.pt`` per sequence.

Each file is a ``torch.save``'d dict with ``"label"`` and, depending on ``--include``,
``"mean_representations"`` ``{layer: Tensor(D)}`` or ``"representations"``
``{layer: Tensor(L, D)}``.  Files are loaded with ``weights_only=True``, so they
cannot run code.  A ``/`` in a label makes subfolders (esm#691): the whole tree is read,
and the key is the label stored in the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from embfile import errors
from embfile._extras import require
from embfile._stream import Chunk, RaggedChunk, Source, chunk_rows, pooled


def read_esm(
    path: str | os.PathLike[str], *, layer: int | None = None, per_residue: bool = False, pool: str | None = None
) -> Source:
    """Open a folder of ESM ``.pt`` files for streaming (see :func:`embfile.formats.from_esm`): each file's
    ``mean_representations``, or with ``per_residue`` (or ``pool``) its per-residue ``representations`` as
    ragged records (pooled with ``pool``)."""
    torch = require("torch", "torch")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise errors.ConversionError(f"{path}: ESM input is a folder of .pt files")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".pt"))
    if not files:
        raise errors.ConversionError(f"{path}: no .pt files in this folder")
    first = _load(torch, files[0])
    per_residue = per_residue or pool is not None
    field = "representations" if per_residue else "mean_representations"
    if field not in first:
        hint = (
            "; per-residue 'representations' are there: per_residue=True (--per-residue) keeps them, "
            "pool='mean' (--pool mean) pools them"
            if "representations" in first and not per_residue
            else ""
        )
        raise errors.ConversionError(f"{files[0]}: no {field!r} in this file (it has {sorted(first)}){hint}")
    layers = sorted(first[field])
    if layer is None:
        if len(layers) != 1:
            raise errors.ConversionError(f"{files[0]}: layers {layers} present; choose one with layer= (--layer)")
        layer = layers[0]
    layer = int(layer)
    v = _tensor(files[0], first, field, layer, 2 if per_residue else 1)
    desc = {"format": "esm", "path": os.path.abspath(path), "layer": layer, "representation": field}
    if per_residue:
        rows = _ragged_chunks(torch, files, field, layer, v.shape[1], v.dtype)
        return pooled(Source(v.shape[1], v.dtype, len(files), rows, desc, ragged=True), pool)
    return Source(v.shape[0], v.dtype, len(files), _chunks(torch, files, field, layer, v.shape[0], v.dtype), desc)


def _load(torch: ModuleType, file: str) -> dict[str, Any]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise errors.ConversionError(f"{file}: not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "label" not in data:
        raise errors.ConversionError(f"{file}: not an ESM extract.py output (no 'label')")
    return data


def _tensor(file: str, data: dict[str, Any], field: str, layer: int, ndim: int) -> np.ndarray:
    """``data[field][layer]`` as numpy: ``(D,)`` (``ndim`` 1) or ``(L, D)`` with ``L > 0`` (``ndim`` 2)."""
    reps = data.get(field, {})
    if layer not in reps:
        raise errors.ConversionError(f"{file}: no layer {layer} in {field!r} (it has {sorted(reps)})")
    t = reps[layer].detach().cpu()
    if t.ndim != ndim or (ndim == 2 and t.shape[0] == 0):
        raise errors.ConversionError(
            f"{file}: {field}[{layer}] has shape {tuple(t.shape)}, not {'(L, D)' if ndim == 2 else '(D,)'}"
        )
    return np.asarray(t.numpy())


def _ragged_chunks(
    torch: ModuleType, files: list[str], field: str, layer: int, dim: int, dtype: np.dtype
) -> Iterator[RaggedChunk]:
    step = chunk_rows(dim * dtype.itemsize)
    keys: list[str] = []
    blocks: list[np.ndarray] = []
    rows = 0
    for file in files:
        data = _load(torch, file)
        m = _tensor(file, data, field, layer, 2)
        if m.dtype != dtype and np.can_cast(m.dtype, dtype, "safe"):
            m = m.astype(dtype)
        if m.shape[1] != dim or m.dtype != dtype:
            raise errors.ConversionError(
                f"{file}: representation of shape {m.shape} {m.dtype}, expected (L, {dim}) {dtype} like the first file"
            )
        keys.append(str(data["label"]))
        blocks.append(m)
        rows += len(m)
        if rows >= step or file == files[-1]:
            yield keys, np.concatenate(blocks), np.array([len(b) for b in blocks])
            keys, blocks, rows = [], [], 0


def _chunks(torch: ModuleType, files: list[str], field: str, layer: int, dim: int, dtype: np.dtype) -> Iterator[Chunk]:
    step = chunk_rows(dim * dtype.itemsize)
    for lo in range(0, len(files), step):
        batch = files[lo : lo + step]
        keys, matrix = [], np.empty((len(batch), dim), dtype)
        for i, file in enumerate(batch):
            data = _load(torch, file)
            v = _tensor(file, data, field, layer, 1)
            if v.dtype != dtype and np.can_cast(v.dtype, dtype, "safe"):  # float16 files among float32 ones
                v = v.astype(dtype)
            if v.shape != (dim,) or v.dtype != dtype:
                raise errors.ConversionError(
                    f"{file}: vector of shape {v.shape} {v.dtype}, expected ({dim},) {dtype} like the first file"
                )
            keys.append(str(data["label"]))
            matrix[i] = v
        yield keys, matrix
