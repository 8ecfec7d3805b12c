"""The .emb format, version 1.1: its constants and the one codec of its header.

Sections in comments refer to FORMAT.md.  :class:`Header` packs, unpacks and validates the 256-byte
header; the reader, the writer, ``verify``, the fuzzers and the tests all go through it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from embfile import _core, errors
from embfile._extras import require

MAGIC = b"\x89EMB\r\n\x1a\n"  # "Header": PNG-style, catches text-mode mangling
FOREIGN = {  # the first bytes of files users convert from: opening one says what it is and how to convert it
    b"\x89HDF\r\n\x1a\n": ("hdf5", "HDF5"),
    b"PAR1": ("parquet", "Parquet"),
    b"\x93NUMPY": ("npy", "a .npy array"),
    b"ARROW1": ("arrow", "an Arrow IPC file"),  # the IPC file format (Feather v2)
    b"PK\x03\x04": ("zip", "a zip (torch.save, np.savez)"),
    b"\x80": ("pickle", "a pickle"),  # protocol 2 and later
}
EXTENSIONS = {  # the formats file names say (formats.detect_format, output_format; open()'s errors)
    ".emb": "emb",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
    ".pkl": "pickle",
    ".pickle": "pickle",
    ".npy": "npy",
    ".npz": "npz",
    ".pt": "torch",
    ".pth": "torch",
    ".safetensors": "safetensors",
    ".lance": "lance",
    ".zarr": "zarr",
    ".csv": "csv",
    ".tsv": "csv",
    ".tab": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".vec": "word2vec",
    ".txt": "word2vec",  # GloVe's
    ".bin": "word2vec",  # word2vec's binary format (GoogleNews-vectors-negative300.bin)
}
VERSION = (1, 1)  # "Versioning": a reader refuses a newer major version
FIXED_VERSION = (1, 0)  # files without ragged records are written as 1.0, readable by every 1.x reader
PAGE = 4096  # "Alignment": records and index start on a page

# "Header": little-endian, 256 bytes, CRC-32C of bytes [0, 252) in the last 4.
_STRUCT = struct.Struct(
    "<8sHHI"  # magic, major, minor, header size
    "QQQ"  # file size, count, dim
    "II"  # dtype code, flags
    "QQQQQQQQQQ"  # (offset, size) of records, index, keys, metadata, checksums
    "QQI4x"  # checksum block bytes, index buckets, common-prefix length
    "QQQ"  # 1.1, ragged files: rows, (offset, size) of ranges; zero otherwise
    "76x"  # reserved, zero
)
HEADER_SIZE = _STRUCT.size + 4
SECTIONS = ("records", "index", "keys", "ranges", "meta", "sums")
RAGGED = 1  # "Flags": records of their own length (1.1)
KNOWN_FLAGS = RAGGED

# "Records": element types by code, stored little-endian.
DTYPES = {
    1: "float16",
    4: "bfloat16",  # numpy's through ml_dtypes (the extra "bfloat16")
    2: "float32",
    3: "float64",
    10: "int8",
    11: "uint8",
    12: "int16",
    13: "uint16",
    14: "int32",
    15: "uint32",
    16: "int64",
    17: "uint64",
}
DTYPE_CODES = {name: code for code, name in DTYPES.items()}
NEW_DTYPES = {"bfloat16"}  # since 1.1

# "Limits"
MAX_KEY_BYTES = 65535
MAX_META_BYTES = 64 << 20
MAX_DIM = 1 << 31
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = PAGE, 1 << 40
DEFAULT_BLOCK_BYTES = 1 << 20  # "Checksums": one CRC per MiB of records
DEFAULT_BUCKET_KEYS = 16  # "Index": keys per bucket, a few cache lines


def disk_dtype(dtype: object) -> np.dtype:
    """The little-endian dtype records of ``dtype`` are stored as; ``"bfloat16"`` imports ml_dtypes, which
    gives numpy that type (or says which extra installs it)."""
    if dtype == "bfloat16":
        require("ml_dtypes", "bfloat16")
    little: np.dtype = np.dtype(dtype).newbyteorder("<")  # type: ignore[call-overload]
    return little


def kind(dtype: np.dtype) -> str:
    """numpy's kind letter of ``dtype``, with bfloat16 (``"V"`` to numpy) counted as the float it is."""
    return "f" if dtype.name == "bfloat16" else dtype.kind


def valid_block_bytes(block: int) -> bool:
    """Whether ``block`` is a checksum block size the format allows ("Checksums")."""
    return MIN_BLOCK_BYTES <= block <= MAX_BLOCK_BYTES and block & (block - 1) == 0


class Header(NamedTuple):
    """The 256-byte header of an .emb file ("Header"), field by field.

    :meth:`unpack` and :meth:`pack` convert without judging (the fuzzers pack absurd values on purpose);
    :meth:`validate` checks everything FORMAT.md "Validity" asks of a reader at open.  A named tuple, not a
    dataclass: opening a file makes one, and opening costs the same at every size, so it must be cheap.
    """

    magic: bytes
    major: int
    minor: int
    header_size: int
    file_size: int
    count: int  # type: ignore[assignment]  # FORMAT.md's name; it hides tuple.count, unused here
    dim: int
    dtype_code: int
    flags: int
    records_offset: int
    records_size: int
    index_offset: int
    index_size: int
    keys_offset: int
    keys_size: int
    meta_offset: int
    meta_size: int
    sums_offset: int
    sums_size: int
    block_bytes: int
    n_buckets: int
    lcp_len: int
    rows: int = 0
    ranges_offset: int = 0
    ranges_size: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """The fields of the first 252 bytes of ``data``, unchecked (the CRC is not read)."""
        return cls._make(_STRUCT.unpack_from(data))

    def pack(self) -> bytes:
        """The 256 header bytes: the fields, then their CRC-32C."""
        head = _STRUCT.pack(*self)
        return head + _core.crc32c(head).to_bytes(4, "little")

    @staticmethod
    def stored_crc_matches(data: bytes | bytearray | memoryview) -> bool:
        """Whether the CRC in bytes [252, 256) of ``data`` is that of bytes [0, 252)."""
        return _core.crc32c(bytes(data[: _STRUCT.size])) == int.from_bytes(data[_STRUCT.size : HEADER_SIZE], "little")

    @classmethod
    def read(cls, head: bytes, size: int, path: str) -> Header:
        """The checked header of the file at ``path`` of ``size`` bytes, from its first bytes ``head``.

        Raises the :class:`~embfile.FormatError` subclass that says what is wrong, in the order
        FORMAT.md "Versioning" asks for: a newer major version is named as such, never as damage.
        """
        if head[: len(MAGIC)] != MAGIC:
            if size < HEADER_SIZE and MAGIC.startswith(head[: len(MAGIC)]):
                raise errors.TruncatedFileError(f"{path}: truncated: {size} bytes, shorter than the header")
            raise errors.NotAnEmbFileError(f"{path}: not an .emb file {_what(head, path)}")
        if size < HEADER_SIZE or len(head) < HEADER_SIZE:
            raise errors.TruncatedFileError(f"{path}: truncated: {size} bytes, shorter than the header")
        h = cls.unpack(head)
        if h.major != VERSION[0]:
            raise errors.UnsupportedVersionError(
                f"{path}: format version {h.major}.{h.minor}; this embfile reads {VERSION[0]}.x"
            )
        if not cls.stored_crc_matches(head):
            raise errors.CorruptFileError(f"{path}: header is corrupted (checksum mismatch)")
        h.validate(size, path)
        return h

    def validate(self, size: int, path: str) -> None:
        """Check every field against the format and against the real file ``size`` ("Validity")."""

        def bad(what: str) -> errors.CorruptFileError:
            return errors.CorruptFileError(f"{path}: {what}")

        if size < self.file_size:
            raise errors.TruncatedFileError(
                f"{path}: truncated: {size} bytes, header says {self.file_size}; {self.where(size)}"
            )
        if size > self.file_size:
            raise bad(f"{size - self.file_size} unexpected bytes after the end ({self.file_size} bytes)")
        if self.header_size != HEADER_SIZE:
            raise bad(f"unknown header size {self.header_size}")
        if self.flags & ~KNOWN_FLAGS:
            raise errors.UnsupportedVersionError(
                f"{path}: uses features this embfile does not know (flags {self.flags & ~KNOWN_FLAGS:#x}); "
                "a newer embfile reads it"
            )
        if self.dtype_code not in DTYPES:  # the header's checksum matched: a newer writer's type
            raise errors.UnsupportedVersionError(
                f"{path}: element type code {self.dtype_code} is unknown to this embfile; a newer embfile reads it"
            )
        if not 1 <= self.dim <= MAX_DIM:
            raise bad(f"dim {self.dim} is outside 1 to {MAX_DIM}")
        if self.ragged:
            if self.ranges_size != 8 * (self.count + 1) or self.rows < self.count:
                raise bad(
                    f"ranges section ({self.ranges_size} bytes) does not fit {self.count} records, {self.rows} rows"
                )
        elif (self.rows, self.ranges_offset, self.ranges_size) != (0, 0, 0):
            raise bad("ranges fields set in a file without ragged records")
        if self.records_size != self.n_rows * self.dim * self.dtype.itemsize:
            raise bad(
                f"records section size {self.records_size} does not hold {self.n_rows} x {self.dim} {self.dtype.name}"
            )
        for name, offset, align in (
            ("records", self.records_offset, PAGE),
            ("index", self.index_offset, PAGE),
            ("keys", self.keys_offset, 8),
            ("ranges", self.ranges_offset, 8),
            ("sums", self.sums_offset, 4),
        ):
            if offset % align:
                raise bad(f"{name} section offset {offset} is not a multiple of {align}")
        end = PAGE
        for name, off, n in self.sections_in_file_order():
            if off < end or off + n > size:
                raise bad(f"{name} section [{off}, {off + n}) overlaps another or runs past the end ({size})")
            end = off + n
        if not valid_block_bytes(self.block_bytes):
            raise bad(f"checksum block size {self.block_bytes} is not a power of two in range")
        if self.sums_size != 4 * (self.n_blocks + len(self.checked_sections)):
            raise bad(f"checksums section size {self.sums_size} does not match the records")
        if self.keys_size < 8 * (self.count + 1):
            raise bad(f"keys section ({self.keys_size} bytes) too small for {self.count} keys")
        if self.meta_size > MAX_META_BYTES or self.lcp_len > MAX_KEY_BYTES:
            raise bad("metadata or key prefix longer than the format allows")

    @property
    def dtype(self) -> np.dtype:
        """The stored element type (little-endian); only for a known ``dtype_code``."""
        return disk_dtype(DTYPES[self.dtype_code])

    @property
    def ragged(self) -> bool:
        """Whether each record owns a range of rows ("Ragged records")."""
        return bool(self.flags & RAGGED)

    @property
    def n_rows(self) -> int:
        """Rows of the records section: one per record, or of a ragged file, ``rows``."""
        return self.rows if self.ragged else self.count

    @property
    def checked_sections(self) -> tuple[str, ...]:
        """The sections after the records whose CRC-32C the sums section holds, in its order ("Checksums")."""
        return ("index", "keys", "meta", "ranges") if self.ragged else ("index", "keys", "meta")

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def n_blocks(self) -> int:
        """Checksum blocks of the records section ("Checksums")."""
        return -(-self.records_size // self.block_bytes)

    def offset(self, section: str) -> int:
        return int(getattr(self, f"{section}_offset"))

    def size(self, section: str) -> int:
        return int(getattr(self, f"{section}_size"))

    def sections_in_file_order(self) -> list[tuple[str, int, int]]:
        """``(name, offset, size)`` of every section, by offset."""
        sections = [(name, self.offset(name), self.size(name)) for name in SECTIONS if name != "ranges" or self.ragged]
        sections.sort(key=lambda t: t[1])
        return sections

    def gaps(self) -> Iterator[tuple[int, int]]:
        """The byte ranges no section covers (header page tail, alignment padding): all zero."""
        lo = HEADER_SIZE
        for _, off, n in self.sections_in_file_order():
            if off > lo:
                yield lo, off
            lo = max(lo, off + n)

    def where(self, at: int) -> str:
        """Where byte ``at`` falls, in words: which section (and records block), or which gap."""
        for name, lo, _ in self.sections_in_file_order():
            if lo <= at < lo + self.size(name):
                if name == "records" and MIN_BLOCK_BYTES <= self.block_bytes:
                    return f"the file ends inside the records section (block {(at - lo) // self.block_bytes})"
                return f"the file ends inside the {name} section"
        return "the file ends between sections"


FIELDS = Header._fields
# The largest value each field can hold (what a fuzzer may set it to).
FIELD_MAX = {
    name: (1 << 8 * struct.calcsize(code)) - 1
    for name, code in zip(FIELDS, re.findall(r"\d*[a-wyzA-Z]", _STRUCT.format.lstrip("<")))  # not padding: x
    if name != "magic"
}


def _what(head: bytes, path: str) -> str:
    """What a file that is not an .emb file is, from its first bytes: a format embfile converts, or the bytes."""
    kind = next((kind for magic, (_, kind) in FOREIGN.items() if head.startswith(magic)), None)
    command = f"`embfile convert {path} {os.path.splitext(path.removesuffix('.gz'))[0]}.emb`"
    if kind is not None:
        return f"but {kind}: {command} converts it"
    if EXTENSIONS.get(os.path.splitext(path.lower().removesuffix(".gz"))[1], "emb") != "emb":  # text, say
        return f"(starts with {head[:8]!r}); if it holds vectors, {command} converts it"
    return f"(starts with {head[:8]!r})"
