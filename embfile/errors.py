"""The embfile exception family.

Every problem with a file's contents raises a subclass of :class:`EmbFileError`;
operating-system errors (a missing file, a full disk) pass through as
``OSError``.  Classes also derive from the builtin a caller would catch
(``ValueError`` for bad data, ``KeyError`` for a missing key).
"""

from __future__ import annotations

from collections.abc import Iterable


class EmbFileError(Exception):
    """Base class of every embfile error."""


class FormatError(EmbFileError, ValueError):
    """The file is not a valid .emb file."""


class NotAnEmbFileError(FormatError):
    """The file does not start with the .emb magic number."""


class UnsupportedVersionError(FormatError):
    """The file was written in a format version this embfile cannot read."""


class TruncatedFileError(FormatError):
    """The file is shorter than its header says."""


class CorruptFileError(FormatError):
    """A structure inside the file is inconsistent."""


class ChecksumError(CorruptFileError):
    """Stored checksums do not match the bytes (found by ``verify()``)."""

    def __init__(self, message: str, problems: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class KeyNotFoundError(EmbFileError, KeyError):
    """A key is not in the file.  ``args[0]`` is the key, as for any ``KeyError``; an operation that was
    given the key (``remove``, ``subset``) also says where it looked."""

    def __init__(self, key: object, message: str | None = None) -> None:
        super().__init__(key)
        self.message = message

    def __str__(self) -> str:
        return self.message or KeyError.__str__(self)


class WriterError(EmbFileError, ValueError):
    """Data given to a writer cannot be stored (duplicate key, wrong shape or dtype, overflow)."""


class DuplicateKeyError(WriterError):
    """Two records have the same key; ``key`` is it and ``rows`` are the two rows."""

    def __init__(self, message: str, key: str, rows: tuple[int, int]) -> None:
        super().__init__(message)
        self.key, self.rows = key, rows


class DiskFullError(WriterError, OSError):
    """The disk (or quota, or file size limit) ran out during a write; the destination is as it was."""


class ShardError(EmbFileError, ValueError):
    """The files of a sharded dataset do not fit together (dim, dtype, duplicate keys, stale index)."""


class ConversionError(EmbFileError, ValueError):
    """An input to a converter has a layout or contents embfile cannot take in (the message says which option helps)."""


class ClosedFileError(EmbFileError, ValueError):
    """An operation on a closed file or writer."""


class CommitConflictError(EmbFileError):
    """Another writer committed the version this one was about to commit; nothing was changed."""


class VersionNotFoundError(EmbFileError, LookupError):
    """A dataset has no version of that number (never committed, or removed by vacuum)."""


class RemoteError(EmbFileError, OSError):
    """A remote dataset could not be read: the server kept failing, answered with other bytes than asked for
    (a Range ignored, a response cut short), or the object changed since it was opened.  Names the URL."""


class CacheError(EmbFileError, OSError):
    """The local cache of remote datasets cannot hold what is asked of it (its disk is full, or a download
    does not match its checksums)."""
