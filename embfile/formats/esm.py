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
from embfile._stream import Chunk, Source, chunk_rows


def read_esm(path: str | os.PathLike[str], *, layer: int | None = None, pool: str | None = None) -> Source:
    """Open a folder of ESM ``.pt`` files for streaming (see :func:`embfile.formats.from_esm`)."""
    torch = require("torch", "torch")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise errors.ConversionError(f"{path}: ESM input is a folder of .pt files")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".pt"))
    if not files:
        raise errors.ConversionError(f"{path}: no .pt files in this folder")
    if pool not in (None, "mean"):
        raise ValueError(f"pool must be 'mean' or None, not {pool!r}")
    first = _load(torch, files[0])
    field = "representations" if pool else "mean_representations"
    if field not in first:
        hint = (
            "; per-residue 'representations' are there: pass pool='mean' (--pool mean)"
            if "representations" in first and not pool
            else ""
        )
        raise errors.ConversionError(f"{files[0]}: no {field!r} in this file (it has {sorted(first)}){hint}")
    layers = sorted(first[field])
    if layer is None:
        if len(layers) != 1:
            raise errors.ConversionError(f"{files[0]}: layers {layers} present; choose one with layer= (--layer)")
        layer = layers[0]
    layer = int(layer)
    v = _vector(files[0], first, field, layer, pool)
    desc = {
        "format": "esm",
        "path": os.path.abspath(path),
        "layer": layer,
        "representation": field,
        **({"pool": pool} if pool else {}),
    }
    chunks = _chunks(torch, files, field, layer, pool, v.shape[0], v.dtype)
    return Source(v.shape[0], v.dtype, len(files), chunks, desc)


def _load(torch: ModuleType, file: str) -> dict[str, Any]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file it cannot read
        raise errors.ConversionError(f"{file}: not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or "label" not in data:
        raise errors.ConversionError(f"{file}: not an ESM extract.py output (no 'label')")
    return data


def _vector(file: str, data: dict[str, Any], field: str, layer: int, pool: str | None) -> np.ndarray:
    reps = data.get(field, {})
    if layer not in reps:
        raise errors.ConversionError(f"{file}: no layer {layer} in {field!r} (it has {sorted(reps)})")
    t = reps[layer].detach().cpu()
    if pool:
        if t.ndim != 2 or t.shape[0] == 0:
            raise errors.ConversionError(f"{file}: {field}[{layer}] has shape {tuple(t.shape)}, not (L, D)")
        return np.asarray(t.double().mean(0).numpy(), np.dtype(str(t.dtype).removeprefix("torch.")))
    if t.ndim != 1:
        raise errors.ConversionError(f"{file}: {field}[{layer}] has shape {tuple(t.shape)}, not (D,)")
    return np.asarray(t.numpy())


def _chunks(
    torch: ModuleType, files: list[str], field: str, layer: int, pool: str | None, dim: int, dtype: np.dtype
) -> Iterator[Chunk]:
    step = chunk_rows(dim * dtype.itemsize)
    for lo in range(0, len(files), step):
        batch = files[lo : lo + step]
        keys, matrix = [], np.empty((len(batch), dim), dtype)
        for i, file in enumerate(batch):
            data = _load(torch, file)
            v = _vector(file, data, field, layer, pool)
            if v.shape != (dim,) or v.dtype != dtype:
                raise errors.ConversionError(
                    f"{file}: vector of shape {v.shape} {v.dtype}, expected ({dim},) {dtype} like the first file"
                )
            keys.append(str(data["label"]))
            matrix[i] = v
        yield keys, matrix
