"""Constants of the .emb format, version 1.0; sections refer to FORMAT.md."""
import struct

import numpy as np

MAGIC = b"\x89EMB\r\n\x1a\n"  # "Header": PNG-style, catches text-mode mangling
VERSION = (1, 0)  # "Versioning": a reader refuses a newer major version
PAGE = 4096  # "Alignment": records and index start on a page

# "Header": little-endian, 256 bytes, CRC-32C of bytes [0, 252) in the last 4.
HEADER = struct.Struct(
    "<8sHHI"  # magic, major, minor, header size
    "QQQ"  # file size, count, dim
    "II"  # dtype code, flags
    "QQ" "QQ" "QQ" "QQ" "QQ"  # (offset, size) of records, index, keys, metadata, checksums
    "QQI"  # checksum block bytes, index buckets, common-prefix length
    "104x"  # reserved, zero
)
HEADER_SIZE = HEADER.size + 4
HEADER_FIELDS = (
    "magic", "major", "minor", "header_size", "file_size", "count", "dim", "dtype_code", "flags",
    "records_offset", "records_size", "index_offset", "index_size", "keys_offset", "keys_size",
    "meta_offset", "meta_size", "sums_offset", "sums_size", "block_bytes", "n_buckets", "lcp_len",
)
SECTIONS = ("records", "index", "keys", "meta", "sums")

# "Records": element types by code, stored little-endian.
DTYPES = {
    1: "float16", 2: "float32", 3: "float64",
    10: "int8", 11: "uint8", 12: "int16", 13: "uint16", 14: "int32", 15: "uint32",
    16: "int64", 17: "uint64",
}
DTYPE_CODES = {np.dtype(name): code for code, name in DTYPES.items()}

# "Limits"
MAX_KEY_BYTES = 65535
MAX_META_BYTES = 64 << 20
MAX_DIM = 1 << 31
MIN_BLOCK_BYTES, MAX_BLOCK_BYTES = PAGE, 1 << 40
DEFAULT_BLOCK_BYTES = 1 << 20  # "Checksums": one CRC per MiB of records
DEFAULT_BUCKET_KEYS = 16  # "Index": keys per bucket, a few cache lines


def disk_dtype(dtype):
    """The little-endian dtype records of ``dtype`` are stored as."""
    return np.dtype(dtype).newbyteorder("<")
