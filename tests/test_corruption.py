"""Bad input gets a clear embfile error: foreign, truncated, patched and bit-flipped files."""

import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import embfile
from embfile import _format as F


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    keys = [f"sp|P{i:05d}|PROT_HUMAN" for i in range(3000)]
    # 3000 x 128 float32 = 1.5 MB of records: two checksum blocks
    embfile.write(tmp_path / "good.emb", (keys, rng.random((3000, 128), dtype=np.float32)))
    return tmp_path / "good.emb", keys


def header(path):
    return F.Header.unpack(path.read_bytes())


def patch_header(path, fix_crc=True, **fields):
    """Overwrite named header fields; with fix_crc, as an adversary who recomputes the checksum."""
    data = bytearray(path.read_bytes())
    packed = F.Header.unpack(data)._replace(**fields).pack()
    data[: F.HEADER_SIZE if fix_crc else F.HEADER_SIZE - 4] = packed if fix_crc else packed[:-4]
    path.write_bytes(data)


def exercise(path, keys):
    """Every read path; only embfile errors (or KeyError for a lookup) may come out."""
    with embfile.open(path) as db:
        for k in keys[:50] + ["absent"]:
            try:
                db[k]
            except KeyError:
                pass
        try:
            db.get_batch(keys[:100])
        except KeyError:
            pass
        list(db)
        assert isinstance(db.metadata, dict)
        np.asarray(db.matrix).sum()
        db.verify()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x89EM",
        b"hello world\n" * 1000,
        pickle.dumps({"a": [1.0]}),
        b"\x89HDF\r\n\x1a\n" + bytes(5000),
        b"PAR1" + bytes(5000),
    ],
)
def test_foreign_files_are_not_emb(tmp_path, content):
    p = tmp_path / "foreign.emb"
    p.write_bytes(content)
    with pytest.raises(embfile.FormatError, match="not an .emb file|truncated"):
        embfile.open(p)


def test_real_hdf5_and_parquet_are_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("seq1", data=np.zeros(4))
    pq.write_table(pa.table({"id": ["a"], "v": [[1.0, 2.0]]}), tmp_path / "x.parquet")
    for name, kind in (("x.h5", "HDF5"), ("x.parquet", "Parquet")):  # said what its first bytes are, not how
        stem = tmp_path / name.split(".")[0]
        with pytest.raises(
            embfile.NotAnEmbFileError, match=rf"not an .emb file but {kind}: `embfile convert .*{name} {stem}.emb`"
        ):
            embfile.open(tmp_path / name)
    (tmp_path / "words.vec.gz").write_bytes(b"\x1f\x8b...")  # no magic of its own: by its name, text to convert
    with pytest.raises(
        embfile.NotAnEmbFileError, match=r"; if it holds vectors, `embfile convert .*words.vec.gz .*words.emb"
    ):
        embfile.open(tmp_path / "words.vec.gz")
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(embfile.NotAnEmbFileError, match=r"notes.md: not an .emb file \(starts with b'# notes'\)$"):
        embfile.open(tmp_path / "notes.md")


def test_future_major_version(good):
    path, _ = good
    patch_header(path, fix_crc=False, major=2)
    with pytest.raises(embfile.UnsupportedVersionError, match=r"version 2\.0.*reads 1\.x"):
        embfile.open(path)


def test_newer_minor_version_is_read(good):
    path, keys = good
    patch_header(path, minor=7)
    assert embfile.open(path)[keys[0]].shape == (128,)


def test_truncation_at_every_section_boundary(good):
    path, keys = good
    data = path.read_bytes()
    h = header(path)
    cuts = {8, 100, F.HEADER_SIZE - 1, F.HEADER_SIZE, F.PAGE - 1, F.PAGE, len(data) - 1}
    for s in F.SECTIONS:
        cuts |= {h.offset(s), h.offset(s) + 1, h.offset(s) + h.size(s) // 2}
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(embfile.TruncatedFileError, match="truncated") as info:
            embfile.open(path)
        assert str(cut) in str(info.value) or cut < F.HEADER_SIZE


def test_trailing_bytes(good):
    path, _ = good
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(embfile.CorruptFileError, match="4 unexpected bytes"):
        embfile.open(path)


def test_header_damage_is_caught_by_its_checksum(good):
    path, _ = good
    patch_header(path, fix_crc=False, count=10)
    with pytest.raises(embfile.CorruptFileError, match="header is corrupted"):
        embfile.open(path)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(count=2**62), "does not hold"),
        (dict(dim=2**40), "outside 1 to"),
        (dict(dim=0, records_size=0), "outside 1 to"),
        (dict(dtype_code=99), "element type code 99 is unknown to this embfile; a newer embfile reads it"),
        (dict(flags=2), "does not know \\(flags 0x2\\)"),
        (dict(flags=1), "ranges section"),  # ragged, without its section
        (dict(rows=5), "ranges fields set"),
        (dict(flags=1, rows=10**6, ranges_offset=8, ranges_size=8 * 3001), "does not hold"),
        (dict(index_offset=2**63), "runs past the end"),
        (dict(keys_size=2**60), "runs past the end"),
        (dict(keys_offset=F.PAGE), "overlaps"),
        (dict(records_offset=F.PAGE + 8), "not a multiple"),
        (dict(block_bytes=12345), "power of two"),
        (dict(block_bytes=F.PAGE), "checksums section size"),
        (dict(n_buckets=2**60), "index"),
        (dict(lcp_len=70000), "prefix"),
        (dict(meta_size=0), "JSON"),
    ],
)
def test_hostile_header_fields(good, fields, message):
    path, keys = good
    if "file_size" not in fields:
        fields["file_size"] = path.stat().st_size
    patch_header(path, **fields)
    with pytest.raises(embfile.FormatError, match=message):
        exercise(path, keys)


def _bucket_area(path):
    """(file offset of the first bucket, its entry count) in a valid file."""
    h = header(path)
    n_top = -(-h.n_buckets // 32)
    fence = h.index_offset + -(-(((h.lcp_len + 7) // 8 * 8) + 8 * n_top) // F.PAGE) * F.PAGE
    area = fence + -(-(16 * h.n_buckets) // F.PAGE) * F.PAGE
    first = int.from_bytes(path.read_bytes()[fence + 8 : fence + 16], "little")
    return area + first


def test_broken_index_order(good):
    path, keys = good
    data = bytearray(path.read_bytes())
    b = _bucket_area(path)
    m = int.from_bytes(data[b : b + 4], "little")
    p = b + 8  # swap the first two prefixes of the first bucket
    data[p : p + 8], data[p + 8 : p + 16] = data[p + 8 : p + 16], data[p : p + 8]
    path.write_bytes(bytes(data))
    db = embfile.open(path)  # open stays constant-time: damage shows where it is read
    outcomes = []
    for k in sorted(keys)[:m]:
        try:
            outcomes.append(db[k] is not None)
        except embfile.CorruptFileError:
            outcomes.append("corrupt")
        except KeyError:
            outcomes.append("missing")
    # the first key stops at a larger prefix; the second reads the disorder
    assert outcomes[:2] == ["missing", "corrupt"]
    with pytest.raises(embfile.ChecksumError, match="index section does not match") as info:
        db.verify()
    assert any("index structure" in p for p in info.value.problems)


def test_index_pointing_outside_the_area(good):
    path, keys = good
    data = bytearray(path.read_bytes())
    b = _bucket_area(path)
    data[b : b + 4] = (10**6).to_bytes(4, "little")  # a bucket claiming a million entries
    path.write_bytes(bytes(data))
    db = embfile.open(path)
    with pytest.raises(embfile.CorruptFileError, match="index"):
        db.get_batch(sorted(keys)[:5])


@pytest.mark.parametrize("section", ["records", "index", "keys", "meta", "sums"])
def test_verify_names_the_damaged_section(good, section):
    path, keys = good
    h = header(path)
    data = bytearray(path.read_bytes())
    at = h.offset(section) + h.size(section) - 3
    data[at] ^= 0x10
    path.write_bytes(bytes(data))
    db = embfile.open(path)
    with pytest.raises(embfile.ChecksumError) as info:
        db.verify()
    text = str(info.value)
    if section == "records":
        assert "records block 1 " in text and "rows 2048-2999" in text
    elif section == "sums":
        assert "does not match" in text
    else:
        assert f"{section} section does not match" in text


@pytest.mark.parametrize("where", ["header page", "between sections"])
def test_verify_checks_padding(tmp_path, where):
    path = tmp_path / "pad.emb"
    embfile.write(path, (["a", "b", "c"], np.ones((3, 5), dtype=np.float32)))  # 60 bytes of records
    h = header(path)
    data = bytearray(path.read_bytes())
    at = 1000 if where == "header page" else h.records_offset + h.records_size + 10
    assert at < h.index_offset
    data[at] = 1
    path.write_bytes(bytes(data))
    gap = (256, 4096) if where == "header page" else (h.records_offset + 60, h.index_offset)
    with pytest.raises(embfile.ChecksumError, match=f"padding bytes {gap[0]}-{gap[1]} are not zero"):
        embfile.open(path).verify()


def test_verify_passes_on_a_good_file(good):
    embfile.open(good[0]).verify()


@given(data=st.data())
def test_random_damage_only_raises_embfile_errors(good, data):
    path, keys = good
    original = path.read_bytes()
    try:
        damaged = bytearray(original)
        how = data.draw(st.sampled_from(["flip", "truncate", "zero"]))
        if how == "truncate":
            damaged = damaged[: data.draw(st.integers(0, len(original) - 1))]
        else:
            for _ in range(data.draw(st.integers(1, 8))):
                i = data.draw(st.integers(0, len(original) - 1))
                damaged[i] = 0 if how == "zero" else damaged[i] ^ (1 << data.draw(st.integers(0, 7)))
        path.write_bytes(bytes(damaged))
        if bytes(damaged) == original:
            return
        with pytest.raises(embfile.EmbFileError):
            exercise(path, keys)  # every change is found: by open, a read, or verify
    finally:
        path.write_bytes(original)
