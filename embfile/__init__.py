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
    CorruptFileError,
    EmbFileError,
    FormatError,
    KeyNotFoundError,
    NotAnEmbFileError,
    TruncatedFileError,
    UnsupportedVersionError,
    WriterError,
)
from embfile.reader import EmbFile, open  # noqa: E402
from embfile.writer import Writer, write  # noqa: E402

__all__ = [
    "open", "write", "EmbFile", "Writer", "EmbFileError", "FormatError", "NotAnEmbFileError",
    "UnsupportedVersionError", "TruncatedFileError", "CorruptFileError", "ChecksumError",
    "KeyNotFoundError", "WriterError", "ClosedFileError", "__version__",
]
