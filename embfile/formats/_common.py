"""What every converter shares: the .emb sink, atomic outputs of other formats, gzipped inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import os
import tokenize
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

from embfile import _core, errors
from embfile._staging import DISK_FULL, Staging, disk_full, require_space
from embfile._stream import Source
from embfile.writer import Writer, write_source

GZIP = b"\x1f\x8b"
GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)  # of a damaged or cut .gz, as it is read
NPY_ERRORS = (ValueError, EOFError, SyntaxError, tokenize.TokenError)  # numpy's, of a damaged .npy (its header
# is a Python literal, parsed as one)


@contextlib.contextmanager
def damage_named(path: str, what: str, kinds: tuple[type[BaseException], ...]) -> Iterator[None]:
    """The errors a library raises reading a damaged file (``kinds``, and an ``OSError`` with no errno, or
    EINVAL from a seek to an offset the file's own bytes gave) as one ConversionError: ``path``, ``what`` it
    is (``"a damaged HDF5 file"``) and the library's first line; an ``OSError`` of the system (a missing file,
    a failing disk) passes."""
    try:
        yield
    except errors.EmbFileError:
        raise
    except kinds as e:
        raise errors.ConversionError(f"{path}: {what} ({first_line(e)})") from None
    except OSError as e:
        if e.errno not in (None, errno.EINVAL):
            raise
        raise errors.ConversionError(f"{path}: {what} ({first_line(e)})") from None


def chunks_damage_named(source: Source, path: str, what: str, kinds: tuple[type[BaseException], ...]) -> Source:
    """``source``, its chunks (read as they are asked for) with :func:`damage_named`'s errors."""

    def chunks() -> Iterator[Any]:
        with damage_named(path, what, kinds):
            yield from source.chunks

    return dataclasses.replace(source, chunks=chunks())


def first_line(e: BaseException) -> str:
    """What an error says, in one line (a library's may run to many)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else e  # (a KeyError's str is its repr)
    return (str(text).strip().splitlines() or [type(e).__name__])[0]


def gzipped(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GZIP)) == GZIP


def opened(path: str) -> IO[bytes]:
    """The file at ``path`` for reading, through gzip if it is gzipped (a ``.fasta.gz``, ``.vec.gz``)."""
    return gzip.open(path, "rb") if gzipped(path) else open(path, "rb")  # type: ignore[return-value]


def holds_objects(path: str | IO[bytes]) -> bool:
    """Whether the ``.npy`` file at ``path`` (or open as a file) holds Python objects (pickled), from its header
    alone."""
    with open(path, "rb") if isinstance(path, str) else contextlib.nullcontext(path) as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            return bool(read_header(f)[2].hasobject)
        except NPY_ERRORS:  # not an .npy header (an .npz, say): np.load says what it is
            return False


def write_emb(
    source: Source,
    dst: str | os.PathLike[str],
    dtype: object = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
) -> str:
    """Stream ``source`` into the .emb file ``dst`` (atomic: on any error, no file appears).

    The output's metadata is the source's user metadata, then ``metadata``, then ``"source"``: where
    the records came from, and ``"sources"``: every conversion's, oldest first (an input converted before
    carries its own).
    """
    meta = {k: v for k, v in source.metadata.items() if k != "embfile"}
    earlier = meta.get("sources") or ([meta["source"]] if "source" in meta else [])
    meta.update(metadata or {})
    meta["source"] = source.description
    meta["sources"] = [*earlier, source.description]
    try:
        write_source(
            source,
            lambda dim, dt, ragged: Writer(dst, dim, dt, meta, ragged=ragged),
            dtype,
            progress=progress and dst,
            prefetch=True,
        )
    except errors.DuplicateKeyError as e:  # found as the output is finished: say in what
        where = source.description.get("path") or f"the {source.description.get('object', 'input')}"
        if str(e).startswith(str(where)):
            raise
        raise errors.DuplicateKeyError(f"{where}: {e}", e.key, e.rows) from None
    return os.fspath(dst)


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike[str], nbytes: int = 0) -> Iterator[str]:
    """A temporary path beside ``dst``; renamed onto ``dst`` (and fsynced) only if the block succeeds.
    A write of about ``nbytes`` that the disk cannot hold is refused before it starts."""
    require_space(dst, nbytes)
    staging = Staging(dst)
    try:
        yield staging.path
        staging.commit()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(dst, e.errno) from e
        raise
    finally:
        staging.discard()


def start_writeback(path: str) -> None:
    """Have the kernel start writing ``path``'s dirty pages now, so the disk works while the next
    part is encoded and the final fsync is short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _core.start_writeback(fd, 0, 0)  # a length of 0: to the end of the file
    finally:
        os.close(fd)
