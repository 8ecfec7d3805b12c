"""Converters between .emb and the files our users have: HDF5, Parquet, ESM ``.pt`` folders, ``.npy``, ``.npz``,
``torch.save`` and safetensors files, Lance datasets, Zarr groups, pickles, and text: CSV, JSON Lines and
word vectors.

Every input is read as a :class:`~embfile.formats._common.Source` that streams
``(keys, matrix)`` chunks of about 16 MiB, so a conversion holds one chunk and
the keys in memory whatever the input size.  Every output is written beside its
destination and renamed into place only when complete.

>>> embfile.convert("prott5.h5", "prott5.emb", dtype="float16")        # doctest: +SKIP
>>> embfile.convert("prott5.emb", "prott5.parquet")                   # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import Any

from embfile import _format as F
from embfile import errors
from embfile._staging import Staging
from embfile._stream import KeyRule, Source, binarized, leading, normalized, pooled, rekeyed
from embfile.dataset import Dataset
from embfile.folder import is_versioned
from embfile.formats._common import GZIP, damage_named, write_emb
from embfile.formats.arrays import read_emb, read_npy, read_pickle
from embfile.formats.esm import read_esm
from embfile.formats.hdf5 import read_hdf5, to_hdf5
from embfile.formats.parquet import read_arrow, read_lance, read_parquet, read_table, to_arrow, to_parquet
from embfile.formats.tensors import read_npz, read_safetensors, read_torch, read_zarr, to_safetensors
from embfile.formats.text import read_csv, read_jsonl, to_csv
from embfile.formats.word2vec import read_word2vec, to_word2vec, word_vectors_layout
from embfile.shards import shard_paths

READERS: dict[str, Callable[..., Source]] = {
    "emb": read_emb,
    "hdf5": read_hdf5,
    "parquet": read_parquet,
    "arrow": read_arrow,
    "esm": read_esm,
    "pickle": read_pickle,
    "npy": read_npy,
    "npz": read_npz,
    "torch": read_torch,
    "safetensors": read_safetensors,
    "lance": read_lance,
    "zarr": read_zarr,
    "csv": read_csv,
    "jsonl": read_jsonl,
    "word2vec": read_word2vec,
}
WRITERS: dict[str, Callable[..., str]] = {  # and "emb", through write_emb
    "hdf5": to_hdf5,
    "parquet": to_parquet,
    "arrow": to_arrow,
    "safetensors": to_safetensors,
    "word2vec": to_word2vec,
    "csv": to_csv,
}
_MAGIC = {F.MAGIC: "emb", **{magic: fmt for magic, (fmt, _) in F.FOREIGN.items() if fmt not in ("zip", "pickle")}}
FASTTEXT_MODEL = (793712314).to_bytes(4, "little")  # fastText's .bin models start with it


def from_hdf5(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> str:
    """HDF5 -> .emb.  Options: ``group``, ``layout`` ("bulk" or "per-key", detected),
    ``key_attr`` (take keys from this dataset attribute, e.g. "original_id"), ``ids`` and ``vectors`` (bulk
    dataset names).  Per-residue ``(L, D)`` datasets (and scikit-bio's ``embed`` files, ``layout="skbio"``)
    become a ragged file, or with ``pool="mean"`` (``"max"``, ``"first"``, ``"last"``) one vector per key."""
    return write_emb(read_hdf5(src, **options), dst, dtype, metadata, progress)


def from_parquet(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> str:
    """Parquet file or folder -> .emb.  Options: ``key_column``, ``vector_column`` (detected when
    only one fits), or ``wide_prefix`` / ``wide_columns`` for one column per dimension (found without them
    when the other columns are numbered columns of numbers: ``v0, v1, ...``).  A column of
    per-residue matrices (``list<list<float>>``, ``list<fixed_size_list>``) becomes a ragged file, or with
    ``pool`` one vector per key."""
    return write_emb(read_parquet(src, **options), dst, dtype, metadata, progress)


def from_esm(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> str:
    """Folder of fair-esm ``extract.py`` ``.pt`` files -> .emb (needs torch).  Options: ``layer``,
    ``per_residue=True`` (the per-residue ``representations`` as a ragged file, not ``mean_representations``),
    ``pool="mean"`` (those representations pooled)."""
    return write_emb(read_esm(src, **options), dst, dtype, metadata, progress)


def from_npy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    **options: Any,
) -> str:
    """``.npy`` matrix plus a file of its keys -> .emb.  Option: ``keys`` (the file: one key a line, or the
    FASTA file the rows were embedded from; default the matrix's name with ``.txt``)."""
    return write_emb(read_npy(src, **options), dst, dtype, metadata, progress)


def from_pickle(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    trust_pickle: bool = False,
) -> str:
    """Pickled ``dict {key: vector}`` (or per-residue matrices, or ids and a matrix) -> .emb, only with
    ``trust_pickle=True``: loading a pickle runs code."""
    return write_emb(read_pickle(src, trust_pickle=trust_pickle), dst, dtype, metadata, progress)


def convert(
    src: Any,
    dst: str | os.PathLike[str],
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    dtype: object = None,
    dims: int | None = None,
    normalize: bool = False,
    binary: bool = False,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    key: KeyRule | None = None,
    report: str | os.PathLike[str] | None = None,
    **options: Any,
) -> str:
    r"""Convert ``src`` to ``dst``, in the formats their contents and names say.

    ``src`` is a path, an open embfile dataset, or a table in memory (to an .emb file): a ``pyarrow.Table``, a
    ``datasets.Dataset``, a pandas or polars DataFrame.
    Formats: ``emb``, ``hdf5``, ``parquet``, ``arrow`` (IPC files and streams, Feather, Hugging Face
    ``save_to_disk`` folders), ``safetensors``, ``word2vec`` (its text format, as GloVe and fastText write it,
    and its binary one), ``csv`` (and TSV); as inputs only ``esm``, ``npy``, ``npz``, ``torch``, ``lance``,
    ``zarr``, ``pickle`` and ``jsonl``.
    ``src_format`` / ``dst_format`` override the detection.
    ``dtype`` sets the stored element type; ``dims`` keeps the first ``dims`` values of each vector (a Matryoshka
    embedding's prefix: OpenAI's text-embedding-3 at 256 of 3072); ``normalize`` scales each float vector (after the
    cut) to unit length, as Matryoshka models ask of a prefix, so a dot product is a cosine; ``binary`` writes each
    vector's signs as packed bits (binary quantization: uint8 records of ``dim / 8`` bytes, searched by
    ``metric="hamming"``; no ``dtype`` with it); ``metadata`` adds to the source's.  Other options go to the reader
    or the writer they belong to (see :func:`from_hdf5`, :func:`from_parquet`, :func:`from_esm`, :func:`from_npy`,
    :func:`from_pickle`, :func:`to_hdf5`, :func:`to_parquet`); one that neither takes is a ``TypeError``.  ``key``
    derives each key from the source's: a function, or a regular expression whose first group (else whole match) is
    the key (``r"\|([^|]+)\|"``: ``sp|P69905|HBA_HUMAN`` -> ``P69905``); two source keys that become one are an
    error.
    ``on_error="skip"`` (every input with records that can be bad: all but ``emb``, ``npy``, ``esm``) skips a
    bad record instead of failing, and lists each one skipped, where and why, as JSON lines in ``report``
    (default ``DST.skipped.jsonl``).  A repeated key is an error, raised before any vector is read wherever
    the keys come apart from the vectors (an ids array, a key column).
    Between two formats other than .emb the data passes through a temporary .emb
    beside ``dst``.
    """
    if not isinstance(src, (str, os.PathLike, Dataset)):  # a table in memory
        if dst_format not in (None, "emb") or output_format(dst) != "emb":
            raise ValueError("an in-memory table converts to .emb; convert that file further")
        source = _shaped(rekeyed(read_table(src, **options), key), dtype, dims, normalize, binary)
        return write_emb(source, dst, dtype, metadata, progress)
    sf = "emb" if isinstance(src, Dataset) else src_format or detect_format(src)
    df = dst_format or output_format(dst)
    if sf not in READERS:
        raise ValueError(f"unknown input format {sf!r}; one of {sorted(READERS)}")
    if df not in {"emb", *WRITERS}:
        raise ValueError(f"unknown output format {df!r}; one of {sorted({'emb', *WRITERS})}")
    reader_opts, writer_opts = _split_options(options, READERS[sf], WRITERS.get(df), sf, df)
    if (
        sf == "emb"
        and df != "emb"
        and not isinstance(src, Dataset)
        and os.path.isfile(src)
        and not reader_opts
        and (dtype, dims, metadata, key) == (None,) * 4
        and not (normalize or binary)
    ):
        return WRITERS[df](src, dst, progress=progress, **writer_opts)  # straight from the file's mapping
    source = _shaped(_read(sf, src, reader_opts, key), dtype, dims, normalize, binary)
    if df == "emb":
        write_emb(source, dst, dtype, metadata, progress)
    else:
        staging = Staging(dst, folder=True)
        try:
            middle = write_emb(source, os.path.join(staging.path, "middle.emb"), dtype, metadata, progress)
            WRITERS[df](middle, dst, progress=progress, **writer_opts)
        finally:
            staging.discard()
    _report(source, dst, report)
    return os.fspath(dst)


def _shaped(source: Source, dtype: object, dims: int | None, normalize: bool, binary: bool) -> Source:
    """``source`` cut to ``dims``, normalized, binarized, as :func:`convert` is asked (in that order)."""
    if binary and dtype is not None:
        raise ValueError("binary=True writes packed bits as uint8: leave dtype unset")
    return binarized(normalized(leading(source, dims), normalize), binary)


def _report(source: Source, dst: str | os.PathLike[str], report: str | os.PathLike[str] | None) -> None:
    """Under ``on_error="skip"``, write the records the reader skipped to ``report``, one JSON object a line
    (none: an empty file, so that a report always says what the last conversion skipped)."""
    if source.on_error is not None and source.on_error.policy == "skip":
        with open(report or f"{os.fspath(dst)}.skipped.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in source.on_error.skipped)


def read(
    src: str | os.PathLike[str], *, src_format: str | None = None, key: KeyRule | None = None, **options: Any
) -> Source:
    """Open any input :func:`~embfile.convert` takes (or an embfile dataset folder) as a stream of records.

    ``key`` derives the keys as for :func:`~embfile.convert`; ``options`` go to the reader of its format.
    """
    sf = src_format or detect_format(src)
    if sf not in READERS:
        raise ValueError(f"unknown input format {sf!r}; one of {sorted(READERS)}")
    reader_opts, _ = _split_options(options, READERS[sf], None, sf, "emb")
    return _read(sf, src, reader_opts, key)


def _read(sf: str, src: str | os.PathLike[str] | Dataset, options: dict[str, Any], key: KeyRule | None) -> Source:
    """The records of ``src``, read by the reader of format ``sf``; pooled here if it takes no ``pool`` (any
    reader of per-residue ``(L, D)`` records: torch, safetensors, npz, Zarr, pickles)."""
    reader = READERS[sf]
    pool = None if "pool" in inspect.signature(reader).parameters else options.pop("pool", None)
    return pooled(rekeyed(reader(src, **options), key), pool)


def _split_options(
    options: dict[str, Any], reader: Callable[..., Any], writer: Callable[..., Any] | None, sf: str, df: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    def takes(f: Callable[..., Any]) -> set[str]:
        return set(inspect.signature(f).parameters) - {"src", "dst", "path", "progress"}

    r, w = takes(reader) | {"pool"}, takes(writer) if writer else set()  # every reader's records pool (_read)
    unknown = set(options) - r - w
    if unknown:
        raise TypeError(f"option {sorted(unknown)[0]!r} applies to neither {sf} input nor {df} output")
    return ({k: v for k, v in options.items() if k in r}, {k: v for k, v in options.items() if k in w})


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of an existing input, from its first bytes (a folder: from what it holds)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if is_versioned(path) or shard_paths(path):
            return "emb"  # an embfile dataset
        if os.path.exists(os.path.join(path, "zarr.json")) or os.path.exists(os.path.join(path, ".zgroup")):
            return "zarr"  # a group of format 3 or 2
        if os.path.isdir(os.path.join(path, "_versions")) and os.path.isdir(os.path.join(path, "data")):
            return "lance"
        names = [f for _, _, fs in os.walk(path) for f in fs]
        if os.path.exists(os.path.join(path, "state.json")):
            return "arrow"  # datasets' save_to_disk
        for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".arrow", "arrow"), (".pt", "esm")):
            if any(n.endswith(ext) for n in names):
                return fmt
        raise errors.ConversionError(f"{path}: a folder with no .parquet or .pt files")
    with open(path, "rb") as f:
        head = f.read(9)
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return fmt
    if head.startswith(b"PK\x03\x04"):  # a zip: np.savez's members are .npy files, torch.save's a data.pkl
        return _zip_format(path)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path):
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(FASTTEXT_MODEL):
        raise errors.ConversionError(
            f"{path}: a fastText model, not word vectors: convert the .vec file fastText writes beside it, or "
            "save the vectors with gensim (load_facebook_vectors, then save_word2vec_format)"
        )
    ext = os.path.splitext(path)[1].lower()
    if head.startswith(GZIP) and ext == ".gz":  # by the name inside: a .vec.gz, .csv.gz, .pkl.gz
        ext = os.path.splitext(path[: -len(ext)])[1].lower()
    if ext in (".pkl", ".pickle") or head[:1] == b"\x80":
        return "pickle"
    if ext in F.EXTENSIONS and (F.EXTENSIONS[ext] != "word2vec" or word_vectors_layout(path) is not None):
        return F.EXTENSIONS[ext]  # e.g. HDF5 with a user block before its signature
    raise errors.ConversionError(f"{path}: cannot tell its format; name it with src_format= (--from)")


def _zip_format(path: str) -> str:
    import zipfile

    with damage_named(path, "a damaged zip file", (zipfile.BadZipFile, NotImplementedError, UnicodeDecodeError)):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()  # (a name flagged UTF-8 is decoded as it is read)
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    raise errors.ConversionError(f"{path}: a zip file, but neither an .npz archive nor a torch.save file")


def output_format(path: str | os.PathLike[str]) -> str:
    """The format an output's name asks for."""
    name = os.fspath(path).lower()
    fmt = F.EXTENSIONS.get(os.path.splitext(name.removesuffix(".gz") if name.endswith(".gz") else name)[1])
    if fmt is None or fmt not in ("emb", *WRITERS) or (name.endswith(".gz") and fmt not in ("word2vec", "csv")):
        raise errors.ConversionError(
            f"{path}: cannot tell the output format from its name; use .emb, .h5, .parquet, .arrow, "
            ".safetensors, .csv, .tsv or .vec, .txt, .bin (word vectors; text also .gz), or dst_format= (--to)"
        )
    return fmt


__all__ = [
    "convert",
    "read",
    "from_hdf5",
    "from_parquet",
    "from_esm",
    "from_npy",
    "from_pickle",
    "to_hdf5",
    "to_parquet",
    "detect_format",
    "output_format",
]
