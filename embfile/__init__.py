"""embfile: embedding vectors stored by string key, in files that open in constant time.

>>> import embfile
>>> embfile.write("db.emb", {"P69905": vec_a, "P68871": vec_b})   # doctest: +SKIP
>>> db = embfile.open("db.emb")                                     # doctest: +SKIP
>>> db["P69905"]                                                    # doctest: +SKIP
"""

from __future__ import annotations

from embfile._version import __version__
from embfile.changes import Changes, changes
from embfile.dataset import Dataset, EmbFile
from embfile.dataset_writer import DatasetWriter, ShardWriter
from embfile.epochs import EpochOptions
from embfile.errors import (
    CacheError,
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
    RemoteError,
    ShardError,
    TruncatedFileError,
    UnsupportedVersionError,
    VersionNotFoundError,
    WriterError,
)
from embfile.formats import (
    from_esm,
    from_hdf5,
    from_npy,
    from_parquet,
    from_pickle,
    to_hdf5,
    to_parquet,
)
from embfile.remote import prefetch
from embfile.remote.upload import (  # a URL or a path
    append,
    compact,
    convert,
    history,
    merge,
    remove,
    subset,
    tag,
    tags,
    untag,
    vacuum,
    write,
    write_shards,
)
from embfile.shards import ShardedEmbFile, open, write_index
from embfile.writer import Writer

__all__ = [
    "open",
    "write",
    "Dataset",
    "EmbFile",
    "ShardedEmbFile",
    "Writer",
    "ShardWriter",
    "DatasetWriter",
    "write_shards",
    "append",
    "remove",
    "merge",
    "subset",
    "compact",
    "vacuum",
    "history",
    "tag",
    "untag",
    "tags",
    "changes",
    "Changes",
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
    "RemoteError",
    "CacheError",
    "prefetch",
    "__version__",
]
