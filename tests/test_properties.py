"""Property-based tests: any keys, any dtype and dim, write then open gives back the same mapping."""

import numpy as np
from conftest import reference_lookup
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import embfile
from embfile import _core
from embfile._format import disk_dtype

DTYPES = ["float16", "bfloat16", "float32", "float64"] + [f"{s}int{b}" for s in ("", "u") for b in (8, 16, 32, 64)]

# Unicode keys, short enough to collide on prefixes, plus their own prefixes and extensions.
base_keys = st.text(st.characters(codec="utf-8"), max_size=12)


@st.composite
def key_sets(draw):
    keys = draw(st.lists(base_keys, max_size=60, unique=True))
    extra = []
    for k in keys[:10]:  # prefixes of each other
        extra += [k[: len(k) // 2], k + "\x00", k + "a"]
    return list(dict.fromkeys(keys + extra))


@st.composite
def files(draw):
    keys = draw(key_sets())
    dtype = disk_dtype(draw(st.sampled_from(DTYPES)))
    dim = draw(st.integers(1, 9))
    if dtype.name == "bfloat16":  # any bit pattern: hypothesis has no bfloat16 of its own
        matrix = draw(hnp.arrays(np.uint16, (len(keys), dim))).view(dtype)
    else:
        elements = hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True) if dtype.kind == "f" else None
        matrix = draw(hnp.arrays(dtype, (len(keys), dim), elements=elements))
    bucket_keys = draw(st.sampled_from([1, 2, 16, 100]))
    return keys, matrix, bucket_keys


def same(a, b):
    return a.tobytes() == b.tobytes()  # bit-exact, NaN payloads included


@given(f=files())
def test_roundtrip_any_keys_dtypes_dims(tmp_path_factory, f):
    keys, matrix, bucket_keys = f
    path = tmp_path_factory.mktemp("p") / "x.emb"
    embfile.write(path, (keys, matrix), bucket_keys=bucket_keys)
    with embfile.open(path) as db:
        assert len(db) == len(keys) and list(db) == keys
        assert db.dtype == matrix.dtype and db.dim == matrix.shape[1]
        assert same(np.asarray(db.matrix), matrix) and same(db.to_numpy(), matrix)
        for i, k in enumerate(keys):
            assert same(db[k], matrix[i])
        if keys:
            order = np.random.default_rng(len(keys)).permutation(len(keys))
            picked = [keys[i] for i in order]
            assert same(db.get_batch(picked), np.stack([db[k] for k in picked]))
        db.verify()


def at_offset(nbytes, offset):
    """A writable uint8 buffer of ``nbytes`` starting ``offset`` bytes past a 64-byte boundary."""
    buf = np.empty(nbytes + 128, np.uint8)
    start = (offset - buf.ctypes.data) % 64
    return buf[start : start + nbytes]


@given(
    record_bytes=st.integers(1, 1100),
    n=st.integers(0, 30),
    src_offset=st.integers(0, 63),
    dst_offset=st.integers(0, 63),
    data=st.data(),
)
def test_core_copies_exact_bytes_at_any_size_and_alignment(record_bytes, n, src_offset, dst_offset, data):
    """The core's gather and copy (vector loop, unaligned head and tail, records split over two
    shards) against numpy, for records below and above the vector loop's threshold."""
    src = at_offset(n * record_bytes, src_offset).reshape(n, record_bytes)
    src[:] = np.random.default_rng(record_bytes).integers(0, 256, src.shape, np.uint8)
    cut = data.draw(st.integers(0, n))
    bases = np.array([src.ctypes.data, src.ctypes.data + cut * record_bytes], np.uintp)
    starts = np.array([0, cut, n], np.uint64)
    rows = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=40)) if n else [], np.uint64)
    out = at_offset(len(rows) * record_bytes, dst_offset).reshape(len(rows), record_bytes)
    _core.gather(bases, starts, record_bytes, rows, out)
    assert same(out, src[rows.astype(np.intp)])
    whole = at_offset(n * record_bytes, dst_offset).reshape(n, record_bytes)
    _core.copy_all(bases, starts, record_bytes, whole)
    assert same(whole, src)


@given(f=files(), probes=st.lists(base_keys, max_size=30))
def test_lookups_agree_with_the_oracle(tmp_path_factory, f, probes):
    keys, matrix, bucket_keys = f
    path = tmp_path_factory.mktemp("o") / "x.emb"
    embfile.write(path, (keys, matrix), bucket_keys=bucket_keys)
    db = embfile.open(path)
    for probe in probes + [k + "~" for k in keys[:5]] + [k[:-1] for k in keys[:5]]:
        want = reference_lookup(keys, probe)
        assert (probe in db) == (want is not None)
        if want is None:
            try:
                db[probe]
                raise AssertionError(f"{probe!r} found but absent")
            except KeyError as e:
                assert isinstance(e, embfile.KeyNotFoundError)
        else:
            assert db.row(probe) == want


@given(keys=st.lists(base_keys, min_size=1, max_size=30), data=st.data())
def test_duplicates_are_always_refused(tmp_path_factory, keys, data):
    # a duplicate by construction, anywhere in the list (filtering random lists for one is too slow)
    keys.insert(data.draw(st.integers(0, len(keys))), data.draw(st.sampled_from(keys)))
    path = tmp_path_factory.mktemp("d") / "x.emb"
    try:
        embfile.write(path, (keys, np.zeros((len(keys), 1))))
        raise AssertionError("duplicates accepted")
    except embfile.WriterError as e:
        assert "duplicate key" in str(e)
    assert not path.exists()
