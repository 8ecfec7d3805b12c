"""embfile: embedding vectors stored by string key, in files that open in constant time.

>>> import embfile
>>> embfile.write("db.emb", {"P69905": vec_a, "P68871": vec_b})   # doctest: +SKIP
>>> db = embfile.open("db.emb")                                     # doctest: +SKIP
>>> db["P69905"]                                                    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from embfile._version import __version__
from embfile.dataset import Dataset, EmbFile
from embfile.epochs import EpochOptions
from embfile.errors import (
    ChecksumError,
    ClosedFileError,
    CommitConflictError,
    ConversionError,
    CorruptFileError,
    DiskFullError,
    DuplicateKeyError,
    EmbFileError,
    FormatError,
    KeyNotFoundError,
    NotAnEmbFileError,
    ShardError,
    TruncatedFileError,
    UnsupportedVersionError,
    VersionNotFoundError,
    WriterError,
)
from embfile.formats import (
    convert,
    from_esm,
    from_hdf5,
    from_npy,
    from_parquet,
    from_pickle,
    to_hdf5,
    to_parquet,
)
from embfile.shards import ShardedEmbFile, ShardWriter, write_index, write_shards
from embfile.writer import Writer, write


def open(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], version: int | None = None) -> Dataset:
    """Open an .emb file, or a sharded dataset (a folder or a list of .emb files), for reading.

    Opening reads the header (and a folder's manifest) and maps the files: constant time, whatever the
    number of keys.

    Parameters
    ----------
    path : str, os.PathLike or list
        An .emb file, a dataset folder, or a list of shard files.
    version : int, optional
        Of a versioned dataset folder, the version to open (default: the latest); ``ds.version`` says which
        one a handle reads.

    Returns
    -------
    Dataset
        An :class:`EmbFile` for a file, a :class:`ShardedEmbFile` for a folder or a list.

    Raises
    ------
    FormatError
        If a file is not a readable .emb file (with a subclass saying why).
    ShardError
        If the files of a sharded dataset do not fit together.
    VersionNotFoundError
        If a dataset folder has no such version.
    OSError
        If a file cannot be opened.

    Examples
    --------
    >>> with embfile.open("db.emb") as db:          # doctest: +SKIP
    ...     v = db["sp|P69905|HBA_HUMAN"]
    """
    if isinstance(path, (list, tuple)) or os.path.isdir(os.fspath(path)):  # type: ignore[arg-type]
        return ShardedEmbFile(path, version)
    if version is not None:
        raise ValueError("version= applies to a dataset folder, not to one .emb file")
    return EmbFile(path)  # type: ignore[arg-type]


__all__ = [
    "open",
    "write",
    "Dataset",
    "EmbFile",
    "ShardedEmbFile",
    "Writer",
    "ShardWriter",
    "write_shards",
    "write_index",
    "EpochOptions",
    "convert",
    "from_hdf5",
    "from_parquet",
    "from_esm",
    "from_npy",
    "from_pickle",
    "to_hdf5",
    "to_parquet",
    "EmbFileError",
    "FormatError",
    "NotAnEmbFileError",
    "UnsupportedVersionError",
    "TruncatedFileError",
    "CorruptFileError",
    "ChecksumError",
    "KeyNotFoundError",
    "WriterError",
    "DuplicateKeyError",
    "DiskFullError",
    "ShardError",
    "ConversionError",
    "ClosedFileError",
    "CommitConflictError",
    "VersionNotFoundError",
    "__version__",
]
