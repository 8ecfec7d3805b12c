"""HDF5 <-> .emb with files written the way ProtTrans, bio_embeddings and bulk writers write them."""

import hashlib
import os

import h5py
import numpy as np
import pytest
from conftest import AWKWARD_KEYS, assert_store

import embfile


def prott5_name(fasta_header):
    """ProtTrans prott5_embedder.py: the id after '>', stripped, '/' and '.' replaced by '_'."""
    return fasta_header.strip().replace("/", "_").replace(".", "_")


def write_prott5(path, embeddings):
    """As prott5_embedder.py writes its output: one create_dataset(seq_id, data=emb) per protein."""
    with h5py.File(path, "w") as hf:
        for seq_id, emb in embeddings.items():
            hf.create_dataset(seq_id, data=emb)


@pytest.fixture
def proteins():
    rng = np.random.default_rng(1)
    headers = AWKWARD_KEYS + [f"sp|Q{i:05d}|TEST_HUMAN/{i}.x" for i in range(300)]
    return {prott5_name(h): rng.standard_normal(1024).astype(np.float16) for h in headers}


def test_prott5_per_protein(tmp_path, proteins):
    proteins["sp|P69905|HBA_HUMAN"][:3] = [np.nan, np.inf, -np.inf]
    write_prott5(tmp_path / "prott5.h5", proteins)
    embfile.from_hdf5(tmp_path / "prott5.h5", tmp_path / "p.emb")
    assert_store(tmp_path / "p.emb", proteins)
    meta = embfile.open(tmp_path / "p.emb").metadata
    assert meta["source"]["format"] == "hdf5" and meta["source"]["layout"] == "per-key"


def test_per_residue_becomes_ragged_or_pooled(tmp_path):
    rng = np.random.default_rng(2)
    residues = {f"P{i}": rng.standard_normal((10 + i, 64)).astype(np.float16) for i in range(20)}
    residues["P_one"] = rng.standard_normal(64).astype(np.float16)  # ProtTrans squeezes a 1-residue peptide
    write_prott5(tmp_path / "res.h5", residues)
    embfile.convert(tmp_path / "res.h5", tmp_path / "r.emb")
    with embfile.open(tmp_path / "r.emb") as db:
        assert db.ragged and db.dtype == np.float16 and sorted(db) == sorted(residues)
        for k, m in residues.items():
            np.testing.assert_array_equal(db[k], m.reshape(-1, 64))
    for how, reduce in [("mean", lambda m: m.astype(np.float32).mean(0)), ("max", lambda m: m.max(0))]:
        embfile.convert(tmp_path / "res.h5", tmp_path / f"{how}.emb", pool=how)
        expected = {k: reduce(v.reshape(-1, 64)).astype(np.float16) for k, v in residues.items()}
        assert_store(tmp_path / f"{how}.emb", expected)
        assert embfile.open(tmp_path / f"{how}.emb").metadata["source"]["pool"] == how
    # and back out, one (L, D) dataset per key, as ProtTrans wrote them
    embfile.convert(tmp_path / "r.emb", tmp_path / "back.h5")
    with h5py.File(tmp_path / "back.h5") as f:
        for k, m in residues.items():
            np.testing.assert_array_equal(f[k][()], m.reshape(-1, 64))
    with pytest.raises(embfile.ConversionError, match="layout='per-key'"):
        embfile.convert(tmp_path / "r.emb", tmp_path / "bulk.h5", layout="bulk")


def test_bio_embeddings_per_residue_keys_from_an_attribute(tmp_path):
    rng = np.random.default_rng(10)
    residues = {k: rng.random((3 + len(k) % 9, 32)).astype(np.float32) for k in AWKWARD_KEYS}
    with h5py.File(tmp_path / "embeddings_file.h5", "w") as f:  # bio_embeddings: md5 names, the id an attribute
        for k, m in residues.items():
            f.create_dataset(hashlib.md5(k.encode()).hexdigest(), data=m).attrs["original_id"] = k
    embfile.convert(tmp_path / "embeddings_file.h5", tmp_path / "r.emb", key_attr="original_id")
    with embfile.open(tmp_path / "r.emb") as db:
        assert db.ragged and sorted(db) == sorted(residues)
        for k, m in residues.items():
            np.testing.assert_array_equal(db[k], m)


def test_scikit_bio_embed_files(tmp_path):
    skbio = pytest.importorskip("skbio")
    from skbio.embedding import ProteinEmbedding

    rng = np.random.default_rng(9)
    seqs = ["MKVLAAGIVG", "ACDEFGHIKLMNPQ", "WY", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]
    objs = [ProteinEmbedding(rng.standard_normal((len(s), 8)).astype(np.float32), s) for s in seqs]
    skbio.io.write((o for o in objs), format="embed", into=str(tmp_path / "sk.h5"))
    embfile.convert(tmp_path / "sk.h5", tmp_path / "sk.emb")
    with embfile.open(tmp_path / "sk.emb") as db:
        assert db.ragged and list(db) == seqs  # scikit-bio keys a record by its sequence
        for s, o in zip(seqs, objs):
            np.testing.assert_array_equal(db[s], o.embedding)  # the last one too, which its writer half drops
    assert embfile.open(tmp_path / "sk.emb").metadata["source"]["layout"] == "skbio"


def test_bio_embeddings_original_id(tmp_path):
    rng = np.random.default_rng(3)
    data = {k: rng.random(128).astype(np.float32) for k in AWKWARD_KEYS}
    with h5py.File(tmp_path / "reduced_embeddings_file.h5", "w") as f:
        for k, v in data.items():
            ds = f.create_dataset(hashlib.md5(k.encode()).hexdigest(), data=v)
            ds.attrs["original_id"] = k
    embfile.convert(tmp_path / "reduced_embeddings_file.h5", tmp_path / "b.emb", key_attr="original_id")
    assert_store(tmp_path / "b.emb", data)
    with pytest.raises(embfile.ConversionError, match="no attribute 'nope'"):
        embfile.convert(tmp_path / "reduced_embeddings_file.h5", tmp_path / "c.emb", key_attr="nope")
    with h5py.File(tmp_path / "reduced_embeddings_file.h5", "a") as f:  # two sequences, one original id
        f.create_dataset("another-md5", data=data[AWKWARD_KEYS[0]]).attrs["original_id"] = AWKWARD_KEYS[0]
    with pytest.raises(embfile.DuplicateKeyError, match=r"reduced_embeddings_file.h5: duplicate key .* \(rows"):
        embfile.convert(tmp_path / "reduced_embeddings_file.h5", tmp_path / "c.emb", key_attr="original_id")
    assert not (tmp_path / "c.emb").exists()  # the message named the file (it said the key and rows alone)


@pytest.mark.parametrize("ids_kind", ["vlen", "fixed", "int"])
def test_bulk_layouts(tmp_path, ids_kind):
    rng = np.random.default_rng(4)
    n = 5000
    keys = [f"{k}#{i}" for i, k in enumerate(AWKWARD_KEYS * (n // len(AWKWARD_KEYS) + 1))][:n]
    if ids_kind == "int":
        keys = [str(i * 7) for i in range(n)]
    matrix = rng.standard_normal((n, 96))
    with h5py.File(tmp_path / "bulk.h5", "w") as f:
        if ids_kind == "vlen":
            f.create_dataset("ids", data=keys, dtype=h5py.string_dtype())
        elif ids_kind == "fixed":
            f.create_dataset("ids", data=np.array([k.encode() for k in keys]))
        else:
            f.create_dataset("ids", data=np.arange(n) * 7)
        f.create_dataset("embeddings", data=matrix, chunks=(333, 96), compression="gzip")
        f.attrs["model"] = "prot_t5_xl_half_uniref50-enc"
    embfile.convert(tmp_path / "bulk.h5", tmp_path / "b.emb", dtype="float32")
    assert_store(tmp_path / "b.emb", dict(zip(keys, matrix)), dtype=np.float32)
    with embfile.open(tmp_path / "b.emb") as db:
        assert list(db) == keys  # bulk input keeps its row order


def test_bulk_names_and_ambiguity(tmp_path):
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f.create_dataset("a", data=np.zeros((3, 4)))
        f.create_dataset("b", data=np.ones((3, 4)))
        f.create_dataset("names", data=["x", "y", "z"], dtype=h5py.string_dtype())
    embfile.convert(tmp_path / "two.h5", tmp_path / "b.emb", ids="names", vectors="b")
    assert_store(tmp_path / "b.emb", {"x": np.ones(4), "y": np.ones(4), "z": np.ones(4)})
    with pytest.raises(embfile.ConversionError, match="no dataset 'c'"):
        embfile.convert(tmp_path / "two.h5", tmp_path / "c.emb", ids="names", vectors="c")
    with pytest.raises(embfile.ConversionError, match="'names' holds object"):  # two matrices: per-key, per-residue
        embfile.convert(tmp_path / "two.h5", tmp_path / "c.emb")


def test_empty_and_wrong_inputs(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(embfile.ConversionError, match="no datasets"):
        embfile.convert(tmp_path / "empty.h5", tmp_path / "e.emb")
    with h5py.File(tmp_path / "bulk0.h5", "w") as f:
        f.create_dataset("ids", shape=(0,), dtype=h5py.string_dtype())
        f.create_dataset("vectors", shape=(0, 8), dtype="f4")
    embfile.convert(tmp_path / "bulk0.h5", tmp_path / "e.emb")
    with embfile.open(tmp_path / "e.emb") as db:
        assert len(db) == 0 and db.dim == 8
    with h5py.File(tmp_path / "mixed.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(8, "f4"))
        f.create_dataset("b", data=np.zeros(8, "f8"))
    with pytest.raises(embfile.ConversionError, match="'/b'.*mixed types|'b'.*mixed types"):
        embfile.convert(tmp_path / "mixed.h5", tmp_path / "m.emb")
    with h5py.File(tmp_path / "shapes.h5", "w") as f:
        f.create_dataset("a", data=np.zeros(8, "f4"))
        f.create_dataset("b", data=np.zeros(9, "f4"))
    with pytest.raises(embfile.ConversionError, match=r"'b' has shape \(9,\), expected \(8,\)"):
        embfile.convert(tmp_path / "shapes.h5", tmp_path / "m.emb")
    with pytest.raises(embfile.ConversionError, match="no group"):
        embfile.convert(tmp_path / "shapes.h5", tmp_path / "m.emb", group="/nope")
    assert not os.path.exists(tmp_path / "m.emb")
    assert sorted(os.listdir(tmp_path)) == ["bulk0.h5", "e.emb", "empty.h5", "mixed.h5", "shapes.h5"]


def test_nested_groups_make_keys_with_slashes(tmp_path):
    data = {"a/b": np.arange(4.0), "a/c/d": np.ones(4), "e": np.zeros(4)}
    with h5py.File(tmp_path / "g.h5", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    embfile.convert(tmp_path / "g.h5", tmp_path / "g.emb")
    assert_store(tmp_path / "g.emb", data)
    embfile.convert(tmp_path / "g.h5", tmp_path / "sub.emb", group="a")
    assert_store(tmp_path / "sub.emb", {"b": np.arange(4.0), "c/d": np.ones(4)})


@pytest.mark.parametrize("layout", ["bulk", "per-key"])
def test_roundtrip_h5_emb_h5(tmp_path, layout):
    rng = np.random.default_rng(5)
    keys = [k.replace("/", "_") for k in AWKWARD_KEYS] + ["nan"]
    data = {k: rng.standard_normal(33).astype(np.float32) for k in keys}
    data["nan"][:] = np.nan
    embfile.write(tmp_path / "a.emb", data, metadata={"model": "m"})
    embfile.to_hdf5(tmp_path / "a.emb", tmp_path / "a.h5", layout=layout, compression="gzip")
    with h5py.File(tmp_path / "a.h5", "r") as f:  # as another tool would read it
        if layout == "bulk":
            got = dict(zip(f["keys"].asstr()[()], f["vectors"][()]))
            assert f["vectors"].chunks[1] == 33 and f["vectors"].compression == "gzip"
        else:
            got = {k: f[k][()] for k in f}
    assert sorted(got) == sorted(data)
    for k, v in data.items():
        assert got[k].tobytes() == v.tobytes()
    embfile.convert(tmp_path / "a.h5", tmp_path / "b.emb")
    assert_store(tmp_path / "b.emb", data)
    assert embfile.open(tmp_path / "b.emb").metadata["model"] == "m"  # carried through the HDF5 file


def test_per_key_output_refuses_unnameable_keys(tmp_path):
    embfile.write(tmp_path / "a.emb", {"ok": np.zeros(2), "bad/": np.ones(2)})
    with pytest.raises(embfile.ConversionError, match="'bad/' cannot be an HDF5 dataset name"):
        embfile.to_hdf5(tmp_path / "a.emb", tmp_path / "a.h5", layout="per-key")
    assert not os.path.exists(tmp_path / "a.h5")
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_source_untouched_and_no_output_on_failure(tmp_path):
    rng = np.random.default_rng(6)
    data = {f"k{i:06d}": rng.random(2048).astype(np.float32) for i in range(3000)}  # two 16 MiB chunks
    data["k002999"] = rng.random(2047).astype(np.float32)  # the last one breaks the conversion
    write_prott5(tmp_path / "in.h5", data)
    before = (tmp_path / "in.h5").read_bytes()
    embfile.write(tmp_path / "out.emb", {"old": np.zeros(3)})
    with pytest.raises(embfile.ConversionError, match="k002999"):
        embfile.convert(tmp_path / "in.h5", tmp_path / "out.emb")
    assert (tmp_path / "in.h5").read_bytes() == before
    assert list(embfile.open(tmp_path / "out.emb")) == ["old"]  # the earlier file is still there
    assert sorted(os.listdir(tmp_path)) == ["in.h5", "out.emb"]


def test_per_key_storage_variants(tmp_path):
    """Contiguous (read directly), chunked and compressed (read by HDF5), big-endian, and a user block."""
    rng = np.random.default_rng(12)
    data = {f"P{i:03d}": rng.standard_normal(300).astype(np.float32) for i in range(40)}
    with h5py.File(tmp_path / "mixed.h5", "w") as f:
        for i, (k, v) in enumerate(data.items()):
            kw = [{}, {"chunks": (100,)}, {"compression": "gzip"}, {"compression": "lzf", "shuffle": True}][i % 4]
            f.create_dataset(k, data=v, **kw)
        f.create_dataset("unwritten", shape=(300,), dtype="f4")  # no storage allocated: the fill value
    embfile.convert(tmp_path / "mixed.h5", tmp_path / "m.emb")
    assert_store(tmp_path / "m.emb", {**data, "unwritten": np.zeros(300, np.float32)})

    with h5py.File(tmp_path / "be.h5", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v.astype(">f4"))
    embfile.convert(tmp_path / "be.h5", tmp_path / "be.emb")
    assert_store(tmp_path / "be.emb", data)

    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    with open(tmp_path / "ub.h5", "r+b") as f:
        f.write(b"a user block, as some tools prepend")
    embfile.convert(tmp_path / "ub.h5", tmp_path / "ub.emb", src_format="hdf5")
    assert_store(tmp_path / "ub.emb", data)


def test_error_while_writing_stops_the_reader(tmp_path):
    rng = np.random.default_rng(13)
    data = {f"k{i:05d}": rng.random(4096).astype(np.float32) for i in range(2500)}
    data["k02400"][7] = 1e6  # does not fit in float16: the writer refuses it after several chunks
    write_prott5(tmp_path / "in.h5", data)
    with pytest.raises(embfile.WriterError, match="key 'k02400': value 1000000.0 does not fit in float16"):
        embfile.convert(tmp_path / "in.h5", tmp_path / "out.emb", dtype="float16")
    assert sorted(os.listdir(tmp_path)) == ["in.h5"]
