"""embfile: one file of fixed-size embedding vectors, looked up by string key.

>>> import embfile
>>> embfile.write("db.emb", {"P69905": vec_a, "P68871": vec_b})   # doctest: +SKIP
>>> db = embfile.open("db.emb")                                     # doctest: +SKIP
>>> db["P69905"]                                                    # doctest: +SKIP
"""
__version__ = "0.1.0"

from embfile.errors import (  # noqa: E402
    ChecksumError,
    ClosedFileError,
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
    WriterError,
)
from embfile.reader import EmbFile, open  # noqa: E402
from embfile.writer import Writer, write  # noqa: E402
from embfile.shards import ShardedEmbFile, ShardWriter, write_index, write_shards  # noqa: E402
from embfile.formats import (  # noqa: E402
    convert,
    from_esm,
    from_hdf5,
    from_npy,
    from_parquet,
    from_pickle,
    to_hdf5,
    to_parquet,
)

__all__ = [
    "open", "write", "EmbFile", "Writer", "ShardedEmbFile", "ShardWriter", "write_shards", "write_index",
    "EmbFileError", "FormatError", "NotAnEmbFileError", "UnsupportedVersionError", "TruncatedFileError",
    "CorruptFileError", "ChecksumError", "KeyNotFoundError", "WriterError", "DuplicateKeyError", "DiskFullError",
    "ShardError", "ConversionError", "ClosedFileError",
    "convert", "from_hdf5", "from_parquet", "from_esm", "from_npy", "from_pickle", "to_hdf5", "to_parquet",
    "__version__",
]
