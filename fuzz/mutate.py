"""Structured damage to valid .emb files: what a bad disk, a bad transfer or an adversary does.

A mutation is a list of operations (plain tuples, so hypothesis can shrink and
print them) plus whether to *reseal*: recompute the header checksum and the
section checksums afterwards, as an adversary would, so the damage gets past
the checksums and reaches the structural checks and the read paths behind them.

    ("flip", bit)                      flip one bit of the file
    ("truncate", length)               keep the first ``length`` bytes
    ("append", data)                   add bytes at the end
    ("field", name, value)             set a header field (any u64, however absurd)
    ("point", section, other)          point a section's offset at another section
    ("swap", section, width, i, j)     swap two ``width``-byte items inside a section
    ("copy", section, width, i, j)     copy item ``i`` over item ``j`` (duplicated entries)
    ("fill", section, start, length, byte)   overwrite a run inside a section
"""

import numpy as np
from hypothesis import strategies as st

from embfile import _core
from embfile import _format as F

FIELDS = list(F.FIELD_MAX)


def header(data):
    return F.Header.unpack(data) if len(data) >= F.HEADER_SIZE else None


def apply(original, ops, reseal=False):
    """The bytes of ``original`` after ``ops``; with ``reseal``, checksums recomputed to match."""
    data = bytearray(original)
    for op in ops:
        kind, args = op[0], op[1:]
        h = header(data)
        if kind == "flip" and data:
            bit = args[0] % (8 * len(data))
            data[bit // 8] ^= 1 << (bit % 8)
        elif kind == "truncate":
            del data[args[0] :]
        elif kind == "append":
            data += args[0]
        elif h is None:
            continue
        elif kind == "field":
            name, value = args
            _put_fields(data, h, **{name: value & F.FIELD_MAX[name]})
        elif kind == "point":
            section, other = args
            _put_fields(data, h, **{f"{section}_offset": h.offset(other)})
        elif kind in ("swap", "copy", "fill"):
            section = args[0]
            lo, size = h.offset(section), h.size(section)
            lo, hi = min(lo, len(data)), min(lo + size, len(data))
            if kind == "fill":
                start, length, byte = args[1:]
                a = lo + start % max(1, hi - lo)
                data[a : min(hi, a + length)] = bytes([byte]) * len(data[a : min(hi, a + length)])
                continue
            width, i, j = args[1:]
            items = (hi - lo) // width
            if items < 2:
                continue
            a, b = lo + (i % items) * width, lo + (j % items) * width
            item_a, item_b = bytes(data[a : a + width]), bytes(data[b : b + width])
            data[b : b + width] = item_a
            if kind == "swap":
                data[a : a + width] = item_b
    if reseal:
        _reseal(data)
    return bytes(data)


def _put_fields(data, h, **fields):
    """Write header ``h`` with ``fields`` changed into ``data``, keeping the stored CRC as it was."""
    data[: F.HEADER_SIZE - 4] = h._replace(**fields).pack()[:-4]


def _reseal(data):
    """Recompute the section checksums (where the header lets us find them) and the header's."""
    h = header(data)
    if h is None:
        return
    sections_fit = all(h.offset(s) + h.size(s) <= len(data) for s in F.SECTIONS)
    if sections_fit and F.valid_block_bytes(h.block_bytes):
        rec = bytes(data[h.records_offset : h.records_offset + h.records_size])
        sums = [*_core.crc32c_blocks(rec, h.block_bytes).tolist()]
        sums += [_core.crc32c(bytes(data[h.offset(s) : h.offset(s) + h.size(s)])) for s in h.checked_sections]
        packed = np.array(sums, "<u4").tobytes()[: h.sums_size]
        data[h.sums_offset : h.sums_offset + len(packed)] = packed
    data[: F.HEADER_SIZE] = h.pack()


def extremes(original):
    """Header values worth trying: edges of the integer types and of this file's layout."""
    h = header(original)
    size = len(original)
    values = {
        0,
        1,
        7,
        8,
        F.PAGE - 1,
        F.PAGE,
        F.PAGE + 8,
        size - 1,
        size,
        size + 1,
        size + F.PAGE,
        2**31,
        2**32 - 1,
        2**32,
        2**40,
        2**62,
        2**63 - 1,
        2**63,
        2**64 - 8,
        2**64 - 1,
    }
    values |= {h.offset(s) for s in F.SECTIONS} | {h.size(s) for s in F.SECTIONS}
    values |= {h.count + 1, h.count - 1, h.dim + 1, h.n_buckets + 1, max(0, h.n_buckets - 1)}
    return sorted(v for v in values if v >= 0)


def operations(original):
    """A hypothesis strategy for one operation on ``original``."""
    n = len(original)
    sections = st.sampled_from(F.SECTIONS)
    index = st.integers(0, 1 << 20)
    return st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 8 * n - 1)),
        st.tuples(st.just("truncate"), st.integers(0, n - 1)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("field"), st.sampled_from(FIELDS), st.sampled_from(extremes(original))),
        st.tuples(st.just("point"), sections, sections),
        st.tuples(st.just("swap"), sections, st.sampled_from([4, 8, 16]), index, index),
        st.tuples(st.just("copy"), sections, st.sampled_from([4, 8, 16]), index, index),
        st.tuples(st.just("fill"), sections, index, st.integers(1, 64), st.sampled_from([0, 1, 0x7F, 0xFF])),
    )


def mutations(original):
    """A hypothesis strategy for ``(ops, reseal)`` on ``original``."""
    return st.tuples(st.lists(operations(original), min_size=1, max_size=4), st.booleans())


def write_seeds(folder):
    """Small valid files that between them reach every part of the format; ``{name: (path, keys)}``."""
    import os

    import embfile

    rng = np.random.default_rng(0)
    shapes = {
        # many 4 KiB checksum blocks, 4 keys a bucket: several fence groups
        "blocks": (
            [f"sp|P{i:05d}|PROT_HUMAN" for i in range(300)],
            "float32",
            32,
            dict(block_bytes=4096, bucket_keys=4),
        ),
        # keys equal in their first 8 bytes after a long common prefix: the whole-key path
        "prefixes": ([f"UniRef50_{i:012d}" for i in range(0, 4000, 37)], "float16", 3, dict(bucket_keys=2)),
        "awkward": (
            ["sp|P69905|HBA_HUMAN", "protéine α-7 β", "蛋白质-1", "x" * 3000, "a b  c", "", "\x00"],
            "int8",
            1,
            {},
        ),
        "empty": ([], "float64", 4, {}),
    }
    seeds = {}
    for name, (keys, dtype, dim, options) in shapes.items():
        path = os.path.join(folder, f"{name}.emb")
        matrix = (rng.standard_normal((len(keys), dim)) * 50).astype(dtype)
        embfile.write(path, (keys, matrix), metadata={"seed": name}, **options)
        seeds[name] = (path, keys)
    # per-residue records: a ranges section, 4 KiB checksum blocks across records
    keys = [f"P{i:05d}" for i in range(60)]
    path = os.path.join(folder, "ragged.emb")
    records = {k: rng.standard_normal((int(rng.integers(1, 40)), 16)).astype("float16") for k in keys}
    embfile.write(path, records, ragged=True, metadata={"seed": "ragged"}, block_bytes=4096, bucket_keys=4)
    seeds["ragged"] = (path, keys)
    return seeds
