"""ESM .pt folders, .npy + keys, .npz, torch.save and safetensors files, pickles, format detection and
conversions between other formats."""

import codecs
import contextlib
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AWKWARD_KEYS, assert_store

import embfile
from embfile.formats import detect_format

torch = pytest.importorskip("torch")


def write_esm_extract(folder, labels, dim=1280, layers=(33,), per_tok=False, mean=True):
    """As fair-esm scripts/extract.py writes them: {label}.pt per sequence (subfolders for '/')."""
    rng = np.random.default_rng(8)
    expected = {}
    for label in labels:
        reps = {
            layer: torch.tensor(rng.standard_normal((5 + len(label) % 7, dim)), dtype=torch.float32) for layer in layers
        }
        result = {"label": label}
        if per_tok:
            result["representations"] = {layer: t.clone() for layer, t in reps.items()}
        if mean:
            result["mean_representations"] = {layer: t.mean(0).clone() for layer, t in reps.items()}
        path = os.path.join(folder, f"{label}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(result, path)
        expected[label] = reps
    return expected


def mutated(seeds, count, seed, cut, insert=b""):
    """``count`` of the files ``seeds`` (name -> bytes), each with a few bytes changed, cut out (up to ``cut``)
    or, if ``insert`` is given, put in (from those bytes): ``(name, bytes)``."""
    import random

    pick = random.Random(seed)
    for _ in range(count):
        name, data = pick.choice(list(seeds.items()))
        data = bytearray(data)
        for _ in range(pick.randint(1, 4)):
            i, roll = pick.randrange(len(data)), pick.random()
            if roll < 0.4:
                data[i] = pick.randrange(256)
            elif roll < 0.7 or not insert:
                del data[i : i + pick.randint(1, cut)]
            else:
                data[i:i] = bytes(pick.choice(insert) for _ in range(pick.randint(1, 4)))
        yield name, bytes(data)


def assert_refused(src, dst, message):
    """Converting ``src`` is one ConversionError matching ``message``, and nothing is left at ``dst``."""
    with pytest.raises(embfile.ConversionError, match=message):
        embfile.convert(src, dst)
    assert not os.path.exists(dst)


def test_esm_folder(tmp_path):
    labels = [k for k in AWKWARD_KEYS if len(k) < 200] + ["UniRef90_A/B", "x/y/z"]  # '/' makes subfolders
    reps = write_esm_extract(tmp_path / "esm", labels, dim=64)
    assert detect_format(tmp_path / "esm") == "esm"
    embfile.convert(tmp_path / "esm", tmp_path / "e.emb")
    assert_store(tmp_path / "e.emb", {k: r[33].mean(0).numpy() for k, r in reps.items()})
    assert embfile.open(tmp_path / "e.emb").metadata["source"]["layer"] == 33


def test_esm_layers_and_pooling(tmp_path):
    reps = write_esm_extract(tmp_path / "esm", ["a", "b"], dim=16, layers=(6, 12), per_tok=True, mean=False)
    with pytest.raises(embfile.ConversionError, match=r"per_residue=True \(--per-residue\) keeps them"):
        embfile.convert(tmp_path / "esm", tmp_path / "e.emb")
    with pytest.raises(embfile.ConversionError, match=r"layers \[6, 12\].*--layer"):
        embfile.convert(tmp_path / "esm", tmp_path / "e.emb", pool="mean")
    embfile.convert(tmp_path / "esm", tmp_path / "e.emb", pool="mean", layer=12)
    want = {k: r[12].double().mean(0).float().numpy() for k, r in reps.items()}
    assert_store(tmp_path / "e.emb", want)
    embfile.convert(tmp_path / "esm", tmp_path / "r.emb", per_residue=True, layer=6)
    with embfile.open(tmp_path / "r.emb") as db:
        assert db.ragged and db.metadata["source"]["representation"] == "representations"
        for k, r in reps.items():
            np.testing.assert_array_equal(db[k], r[6].numpy())


def test_esm_refuses_code(tmp_path):
    os.makedirs(tmp_path / "esm")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"label": "x", "mean_representations": {33: torch.zeros(4)}, "evil": Evil()}, tmp_path / "esm" / "x.pt")
    with pytest.raises(embfile.ConversionError, match="not a readable torch file"):
        embfile.convert(tmp_path / "esm", tmp_path / "e.emb")
    assert not os.path.exists(tmp_path / "pwned")


def test_npy_with_keys(tmp_path):
    rng = np.random.default_rng(9)
    keys = AWKWARD_KEYS + [f"n{i}" for i in range(100)]
    m = rng.standard_normal((len(keys), 20)).astype(np.float16)
    np.save(tmp_path / "emb.npy", m)
    (tmp_path / "emb.txt").write_text("".join(k + "\n" for k in keys), encoding="utf-8")
    embfile.convert(tmp_path / "emb.npy", tmp_path / "n.emb")
    assert_store(tmp_path / "n.emb", dict(zip(keys, m)))
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(embfile.ConversionError, match="2 keys for 109 rows"):
        embfile.convert(tmp_path / "emb.npy", tmp_path / "x.emb", keys=tmp_path / "short.txt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(embfile.ConversionError, match="obj.npy: holds pickled Python objects"):
        embfile.convert(tmp_path / "obj.npy", tmp_path / "x.emb")
    assert not os.path.exists(tmp_path / "x.emb")


def test_pickle_needs_trust(tmp_path):
    rng = np.random.default_rng(10)
    data = {f"seq{i:010d}": rng.random(1280) for i in range(300)}  # the "Pickle vs HDF5" study's dict
    with open(tmp_path / "d.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(embfile.ConversionError, match=r"runs code.*trust_pickle=True \(--trust-pickle\)"):
        embfile.convert(tmp_path / "d.pkl", tmp_path / "d.emb")
    embfile.convert(tmp_path / "d.pkl", tmp_path / "d.emb", trust_pickle=True)
    assert_store(tmp_path / "d.emb", data)
    data["seq0000000007"] = np.zeros(5)
    with open(tmp_path / "bad.pkl", "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(embfile.WriterError, match=r"key .seq0000000007.: vector has shape \(5,\)"):
        embfile.convert(tmp_path / "bad.pkl", tmp_path / "bad.emb", trust_pickle=True)


def test_pickles_hold_what_torch_files_hold(tmp_path):
    """Per-residue matrices, an (ids, matrix) pair, a dict of ids and a matrix, and np.save of a dict (a pickle
    in an .npy file) convert as torch.save files of them do; each was refused ("the first vector has shape
    (3, 4)", "holds a tuple", "not a numeric .npy matrix")."""
    rng = np.random.default_rng(11)
    residues = {f"P{i}": rng.random((1 + i % 3, 4)).astype(np.float32) for i in range(20)}
    keys, m = list(residues), rng.random((20, 4)).astype(np.float32)
    objects = {"residues": residues, "pair": (keys, m), "named": {"ids": keys, "embeddings": m}}
    for name, data in objects.items():
        with open(tmp_path / f"{name}.pkl", "wb") as f:
            pickle.dump(data, f)
    np.save(tmp_path / "dict.npy", residues, allow_pickle=True)
    with pytest.raises(embfile.ConversionError, match=r"dict.npy: holds pickled Python objects .* trust_pickle=True"):
        embfile.convert(tmp_path / "dict.npy", tmp_path / "x.emb")
    for name in ("residues.pkl", "dict.npy"):
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", trust_pickle=True)
        with embfile.open(tmp_path / f"{name}.emb") as db:
            assert db.ragged and all(np.array_equal(db[k], v) for k, v in residues.items())
    embfile.convert(tmp_path / "residues.pkl", tmp_path / "pooled.emb", trust_pickle=True, pool="mean")
    with embfile.open(tmp_path / "residues.pkl.emb") as db, embfile.open(tmp_path / "pooled.emb") as pooled:
        np.testing.assert_array_equal(pooled.get_batch(keys), db.pool("mean")[db.rows(keys)])
    pd = pytest.importorskip("pandas")  # pandas' to_pickle: a table (by its columns) or a Series by key
    pd.DataFrame({"id": keys, "embedding": list(m), "length": 7}).to_pickle(tmp_path / "frame.pkl")
    pd.DataFrame(m, index=keys).to_pickle(tmp_path / "wide.pkl")  # a column a dimension, the ids its index
    pd.Series(list(m), index=keys).to_pickle(tmp_path / "series.pkl")
    for name in ("pair.pkl", "named.pkl", "frame.pkl", "wide.pkl", "series.pkl"):  # frames: "a matrix without ids"
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", trust_pickle=True)
        assert_store(tmp_path / f"{name}.emb", dict(zip(keys, m)))
    pd.DataFrame({"id": keys, "a": list(m), "b": list(m)}).to_pickle(tmp_path / "two.pkl")
    with pytest.raises(embfile.ConversionError, match=r"two.pkl: columns \['a', 'b'\] could each be"):
        embfile.convert(tmp_path / "two.pkl", tmp_path / "x.emb", trust_pickle=True)
    embfile.convert(tmp_path / "two.pkl", tmp_path / "b.emb", trust_pickle=True, vectors="b")
    assert_store(tmp_path / "b.emb", dict(zip(keys, m)))


def test_detection_and_options(tmp_path, study):
    path, keys, matrix = study
    assert detect_format(path) == "emb"
    embfile.convert(path, tmp_path / "x.data", dst_format="hdf5")
    assert detect_format(tmp_path / "x.data") == "hdf5"
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(embfile.ConversionError, match="cannot tell its format"):
        embfile.convert(tmp_path / "x.txt", tmp_path / "y.emb")
    with pytest.raises(embfile.ConversionError, match="cannot tell the output format"):
        embfile.convert(path, tmp_path / "y.xlsx")
    with pytest.raises(TypeError, match="'layer' applies to neither emb input nor parquet output"):
        embfile.convert(path, tmp_path / "y.parquet", layer=3)


def test_between_other_formats_and_dtype_change(tmp_path, study):
    path, keys, matrix = study
    embfile.convert(path, tmp_path / "a.h5")
    embfile.convert(tmp_path / "a.h5", tmp_path / "a.parquet", dtype="float16", row_group_size=100)
    t = pq.read_table(tmp_path / "a.parquet")
    assert t["key"].to_pylist() == keys
    np.testing.assert_array_equal(np.stack(t["vector"].to_numpy(zero_copy_only=False)), matrix.astype(np.float16))
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "a.parquet", "study.emb"]  # no middle file left
    embfile.convert(path, tmp_path / "small.emb", dtype="float32")
    assert_store(tmp_path / "small.emb", dict(zip(keys, matrix)), dtype=np.float32)
    meta = embfile.open(tmp_path / "small.emb").metadata
    assert meta["model"] == "esm2_t33_650M_UR50D" and meta["source"]["format"] == "emb"
    with h5py.File(tmp_path / "a.h5") as f:
        assert "model" in f.attrs["embfile_metadata"]


MEMORY_PROBE = """
import sys, embfile
def peak():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
import h5py, pyarrow.parquet
base = peak()
embfile.convert(sys.argv[1], sys.argv[2])
print(peak() - base)
"""


def test_conversion_memory_is_bounded(tmp_path):
    """Peak memory does not grow with the input: 64 MiB and 256 MiB inputs convert in the same memory."""
    import subprocess
    import sys

    import pyarrow as pa

    def make(n, dim=1024):
        keys = [f"k{i:08d}" for i in range(n)]
        folder = tmp_path / str(n)
        folder.mkdir()
        with (
            h5py.File(folder / "bulk.h5", "w") as f,
            pq.ParquetWriter(
                folder / "t.parquet", pa.schema([("key", pa.string()), ("v", pa.list_(pa.float32()))])
            ) as w,
        ):
            f.create_dataset("ids", data=keys, dtype=h5py.string_dtype())
            m = f.create_dataset("vectors", shape=(n, dim), dtype="f4")
            for lo in range(0, n, 4096):
                block = np.random.default_rng(lo).standard_normal((4096, dim), dtype=np.float32)
                m[lo : lo + 4096] = block
                w.write_table(pa.table({"key": keys[lo : lo + 4096], "v": list(block)}))
        return folder

    def peak(folder, src):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, str(folder / src), str(folder / "o.emb")],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout)

    small, large = make(16384), make(65536)
    for src in ("bulk.h5", "t.parquet"):
        a, b = peak(small, src), peak(large, src)
        assert b - a < 32 and b < 200, f"{src}: {a:.0f} MiB for 64 MiB of input, {b:.0f} MiB for 256 MiB"


@pytest.fixture
def vectors():
    rng = np.random.default_rng(21)
    keys = [k for k in AWKWARD_KEYS if k] + [f"UniRef50_{i:06d}" for i in range(500)]
    return {k: rng.standard_normal(24).astype(np.float32) for k in keys}


def test_npz_archives_as_numpy_writes_them(tmp_path, vectors):
    keys, m = list(vectors), np.stack(list(vectors.values()))
    np.savez(tmp_path / "pair.npz", ids=np.array(keys), embeddings=m)
    np.savez_compressed(tmp_path / "ints.npz", ids=np.arange(len(keys)), embeddings=m)
    per_key = {k: v for k, v in vectors.items() if "/" not in k}  # np.savez names members by key
    np.savez(tmp_path / "per_key.npz", **per_key)
    residues = {k: np.tile(v, (1 + i % 4, 1)).astype(np.float16) for i, (k, v) in enumerate(per_key.items())}
    np.savez_compressed(tmp_path / "residues.npz", **residues)
    assert detect_format(tmp_path / "pair.npz") == "npz"
    embfile.convert(tmp_path / "pair.npz", tmp_path / "a.emb")
    assert_store(tmp_path / "a.emb", vectors)
    embfile.convert(tmp_path / "ints.npz", tmp_path / "b.emb")
    assert_store(tmp_path / "b.emb", {str(i): v for i, v in enumerate(vectors.values())})
    embfile.convert(tmp_path / "per_key.npz", tmp_path / "c.emb")
    assert_store(tmp_path / "c.emb", per_key)
    embfile.convert(tmp_path / "residues.npz", tmp_path / "r.emb")
    with embfile.open(tmp_path / "r.emb") as db:
        assert db.ragged and all(np.array_equal(db[k], m) for k, m in residues.items())
    torch.save({k: torch.from_numpy(m) for k, m in residues.items()}, tmp_path / "residues.pt")
    for name in ("residues.npz", "residues.pt"):  # pool= was "applies to neither npz input nor emb output"
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", pool="max")
        assert_store(tmp_path / f"{name}.emb", {k: m.max(axis=0) for k, m in residues.items()})
    with pytest.raises(embfile.ConversionError, match="one vector per key already; pool= applies to per-residue"):
        embfile.convert(tmp_path / "pair.npz", tmp_path / "x.emb", pool="mean")


def test_torch_save_files_load_without_running_code(tmp_path, vectors):
    keys, m = list(vectors), torch.from_numpy(np.stack(list(vectors.values())))
    torch.save({k: torch.from_numpy(v) for k, v in vectors.items()}, tmp_path / "dict.pt")
    torch.save((keys, m), tmp_path / "pair.pt")
    torch.save({"ids": keys, "embeddings": m}, tmp_path / "named.pth")
    for name in ("dict.pt", "pair.pt", "named.pth"):
        assert detect_format(tmp_path / name) == "torch"
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb")
        assert_store(tmp_path / f"{name}.emb", vectors)


def test_safetensors_files(tmp_path, vectors):
    st = pytest.importorskip("safetensors.numpy")
    keys, m = list(vectors), np.stack(list(vectors.values()))
    st.save_file(dict(vectors), tmp_path / "per_key.safetensors")
    st.save_file({"embeddings": m}, tmp_path / "meta.safetensors", metadata={"ids": json.dumps(keys)})
    st.save_file({"embeddings": m, "ids": np.arange(len(keys))}, tmp_path / "ints.safetensors")
    assert detect_format(tmp_path / "meta.safetensors") == "safetensors"
    embfile.convert(tmp_path / "per_key.safetensors", tmp_path / "a.emb")
    assert_store(tmp_path / "a.emb", vectors)
    embfile.convert(tmp_path / "meta.safetensors", tmp_path / "b.emb")
    assert_store(tmp_path / "b.emb", vectors)
    embfile.convert(tmp_path / "ints.safetensors", tmp_path / "c.emb")
    assert_store(tmp_path / "c.emb", {str(i): v for i, v in enumerate(vectors.values())})


def test_a_matrix_without_ids_takes_its_keys_from_a_list_or_the_fasta_file(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    keys = [f"sp|P{i:05d}|PROT_HUMAN" for i in range(7)] + ["UniRef50_Q8WZ42/1-100", "ε.1"]
    m = np.random.default_rng(3).standard_normal((len(keys), 24)).astype(np.float32)
    vectors = dict(zip(keys, m))
    fasta = "".join(f">{k} some protein OS=Homo sapiens\nMVLSPADKTN\nVKAAWGKV\n" for k in keys)
    (tmp_path / "seqs.fasta").write_text(fasta, encoding="utf-8")
    (tmp_path / "emb.txt").write_text("".join(k + "\n" for k in keys) + "\n", encoding="utf-8")  # a blank last line
    torch.save(torch.from_numpy(m), tmp_path / "emb.pt")  # each was "holds a Tensor, not a dict", or was read
    np.savez(tmp_path / "emb.npz", embeddings=m)  # as one per-residue record named 'embeddings'
    st.save_file({"embeddings": m}, tmp_path / "emb.safetensors")
    with open(tmp_path / "emb.pkl", "wb") as f:
        pickle.dump(m, f)
    np.save(tmp_path / "emb.npy", m)
    for name in ("emb.pt", "emb.npz", "emb.safetensors", "emb.pkl", "emb.npy"):
        trust = {"trust_pickle": True} if name.endswith(".pkl") else {}
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", **trust)  # emb.txt beside it
        assert_store(tmp_path / f"{name}.emb", vectors)
        embfile.convert(tmp_path / name, tmp_path / f"{name}.fasta.emb", keys=tmp_path / "seqs.fasta", **trust)
        assert_store(tmp_path / f"{name}.fasta.emb", vectors)
    np.save(tmp_path / "ids.npy", np.array(keys))  # the keys as users save them beside their matrix
    (tmp_path / "ids.json").write_text(json.dumps(keys))
    (tmp_path / "seqs.fasta.gz").write_bytes(gzip.compress(fasta.encode()))
    (tmp_path / "windows.txt").write_bytes(codecs.BOM_UTF8 + "".join(k + "\r\n" for k in keys).encode())  # Notepad's
    for name in ("ids.npy", "ids.json", "seqs.fasta.gz", "windows.txt"):  # the BOM made the first key '\ufeffsp|...'
        embfile.convert(tmp_path / "emb.npy", tmp_path / f"{name}.emb", keys=tmp_path / name)
        assert_store(tmp_path / f"{name}.emb", vectors)
    meta = {"url": [f"https://x/{i}.jpg" for i in range(9)], "caption": ["a cat"] * 9, "key": keys, "width": [64] * 9}
    pq.write_table(pa.table(meta), tmp_path / "metadata_0.parquet")  # LAION's metadata beside img_emb_0.npy
    embfile.convert(tmp_path / "emb.npy", tmp_path / "laion.emb", keys=tmp_path / "metadata_0.parquet")
    assert_store(tmp_path / "laion.emb", vectors)
    pq.write_table(pa.table({k: v for k, v in meta.items() if k != "key"}), tmp_path / "unkeyed.parquet")
    with pytest.raises(embfile.ConversionError, match=r"unkeyed.parquet: cannot tell which of its columns \(url, "):
        embfile.convert(tmp_path / "emb.npy", tmp_path / "x.emb", keys=tmp_path / "unkeyed.parquet")
    np.save(tmp_path / "numbers.npy", np.arange(9) * 10)
    embfile.convert(tmp_path / "emb.npy", tmp_path / "numbers.emb", keys=tmp_path / "numbers.npy")
    assert_store(tmp_path / "numbers.emb", {str(i * 10): v for i, v in enumerate(m)})
    torch.save({"P1": torch.ones(5, 24)}, tmp_path / "one.pt")  # a dict's one entry: a per-residue record, by key
    embfile.convert(tmp_path / "one.pt", tmp_path / "one.emb")
    with embfile.open(tmp_path / "one.emb") as db:
        assert db.ragged and list(db) == ["P1"]
    (tmp_path / "emb.txt").unlink()
    with pytest.raises(embfile.ConversionError, match="emb.pt: a matrix of 9 rows without ids, and no keys file"):
        embfile.convert(tmp_path / "emb.pt", tmp_path / "x.emb")
    mistakes = {
        ">a\nMV\n>b\nMV\n": "short.fasta: 2 keys for 9 rows of",
        ">a\nMV\n> \nMV\n": "FASTA record 2 has a header with no id",
        "".join(f">k{i // 2} {i}\nM\n" for i in range(9)): "duplicate key 'k0'",
    }
    for text, message in mistakes.items():
        (tmp_path / "short.fasta").write_text(text)
        with pytest.raises(embfile.EmbFileError, match=message):
            embfile.convert(tmp_path / "emb.npz", tmp_path / "x.emb", keys=tmp_path / "short.fasta")
    (tmp_path / "latin.txt").write_bytes("a\nb\n\xe9\n".encode("latin-1"))
    np.save(tmp_path / "objects.npy", np.array(keys, dtype=object))
    np.save(tmp_path / "matrix.npy", m)
    (tmp_path / "dict.json").write_text(json.dumps({"ids": keys}))
    (tmp_path / "cut.fasta.gz").write_bytes(gzip.compress(fasta.encode())[:-20])
    for name, message in (
        ("latin.txt", "latin.txt: line 3 is not UTF-8 text"),
        ("objects.npy", "objects.npy: an array of Python objects, which only a pickle holds; save the keys as"),
        ("matrix.npy", r"matrix.npy: a float32 array of shape \(9, 24\), not a list of keys"),
        ("dict.json", "dict.json: not a JSON list of keys"),
        ("cut.fasta.gz", "cut.fasta.gz: a damaged gzip file"),
    ):
        with pytest.raises(embfile.ConversionError, match=message):
            embfile.convert(tmp_path / "emb.npy", tmp_path / "x.emb", keys=tmp_path / name)
    assert not os.path.exists(tmp_path / "x.emb")
    cli = [sys.executable, "-m", "embfile"]
    subprocess.run(
        [*cli, "convert", tmp_path / "emb.pt", tmp_path / "cli.emb", "--keys", tmp_path / "seqs.fasta"], check=True
    )
    two = "".join(fasta.splitlines(keepends=True)[:6])  # the first two records
    (tmp_path / "two.fasta").write_text(two, encoding="utf-8")
    subprocess.run(
        [*cli, "subset", tmp_path / "cli.emb", tmp_path / "two.emb", "--keys", tmp_path / "two.fasta"], check=True
    )
    assert_store(tmp_path / "two.emb", {k: vectors[k] for k in keys[:2]})


def test_keys_files_mutated_only_raise_value_errors(tmp_path):
    """A damaged keys file of any kind (lines, FASTA, gzipped, JSON, .npy, Parquet) gives its keys or one
    ValueError naming it (the commands print it as one line), never another exception."""

    from embfile.formats.keys import keys_file

    keys = [f"k{i}é" for i in range(30)]
    np.save(tmp_path / "seed.npy", np.array(keys))
    pq.write_table(pa.table({"id": keys}), tmp_path / "seed.parquet")
    seeds = {
        "k.txt": "".join(k + "\n" for k in keys).encode(),
        "k.fasta.gz": gzip.compress("".join(f">{k} x\nMV\n" for k in keys).encode()),
        "k.json": json.dumps(keys).encode(),
        "k.npy": (tmp_path / "seed.npy").read_bytes(),
        "k.parquet": (tmp_path / "seed.parquet").read_bytes(),
    }
    for name, data in mutated(seeds, 300, seed=2, cut=64):
        (tmp_path / name).write_bytes(data)
        try:
            got = keys_file(tmp_path / name)
        except ValueError as e:
            assert str(e).startswith(str(tmp_path / name)), e
        else:
            assert all(isinstance(k, str) for k in got)
    np.save(tmp_path / "m.npy", np.ones((3, 2)))  # a matrix whose header numpy cannot parse: it said SyntaxError
    (tmp_path / "m.npy").write_bytes((tmp_path / "m.npy").read_bytes().replace(b"'descr'", b"'de\0cr'"))
    with pytest.raises(embfile.ConversionError, match="m.npy: not a numeric .npy matrix"):
        embfile.convert(tmp_path / "m.npy", tmp_path / "m.emb", keys=tmp_path / "k.json")


def test_keys_derived_from_fasta_headers(tmp_path):
    headers = ["sp|P69905|HBA_HUMAN Hemoglobin subunit alpha", "sp|P68871|HBB_HUMAN Hemoglobin subunit beta"]
    vectors = {h: np.full(4, i, np.float32) for i, h in enumerate(headers)}
    embfile.write(tmp_path / "h.emb", vectors)
    embfile.convert(tmp_path / "h.emb", tmp_path / "k.emb", key=r"\|([^|]+)\|")
    assert list(embfile.open(tmp_path / "k.emb")) == ["P69905", "P68871"]
    embfile.convert(tmp_path / "h.emb", tmp_path / "f.emb", key=lambda h: h.split()[0])
    assert list(embfile.open(tmp_path / "f.emb")) == ["sp|P69905|HBA_HUMAN", "sp|P68871|HBB_HUMAN"]
    embfile.write(tmp_path / "two.emb", {"sp|P69905|A": np.ones(4), "tr|P69905|B": np.zeros(4)})
    with pytest.raises(embfile.ConversionError, match=r"keys 'sp\|P69905\|A' and 'tr\|P69905\|B' both become 'P69905'"):
        embfile.convert(tmp_path / "two.emb", tmp_path / "x.emb", key=r"\|([^|]+)\|")
    with pytest.raises(embfile.ConversionError, match="does not match the key pattern"):
        embfile.convert(tmp_path / "two.emb", tmp_path / "x.emb", key=r"^UniRef")
    assert not os.path.exists(tmp_path / "x.emb")


def test_esm_files_of_float16_among_float32_are_cast(tmp_path):
    folder = tmp_path / "esm"
    folder.mkdir()
    for i, dt in enumerate([torch.float32, torch.float16, torch.float32]):
        torch.save(
            {"label": f"s{i}", "mean_representations": {33: torch.full((4,), i + 0.5, dtype=dt)}}, folder / f"s{i}.pt"
        )
    embfile.convert(folder, tmp_path / "e.emb")
    with embfile.open(tmp_path / "e.emb") as db:
        assert db.dtype == np.float32 and db["s1"][0] == 1.5


def test_out_to_arrow_and_safetensors_and_back(tmp_path, vectors):
    embfile.write(tmp_path / "a.emb", vectors, metadata={"model": "esm2"})
    embfile.convert(tmp_path / "a.emb", tmp_path / "a.arrow")
    import pyarrow as pa

    with pa.memory_map(str(tmp_path / "a.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    assert table.column("key").to_pylist() == list(vectors)
    embfile.convert(tmp_path / "a.arrow", tmp_path / "b.emb")
    assert_store(tmp_path / "b.emb", vectors)
    assert embfile.open(tmp_path / "b.emb").metadata["model"] == "esm2"
    pytest.importorskip("safetensors")
    embfile.convert(tmp_path / "a.emb", tmp_path / "a.safetensors")
    embfile.convert(tmp_path / "a.safetensors", tmp_path / "c.emb")
    assert_store(tmp_path / "c.emb", vectors)
    embfile.write(tmp_path / "r.emb", {"k": np.ones((2, 3))}, ragged=True)
    with pytest.raises(embfile.ConversionError, match="safetensors has no ragged tensor"):
        embfile.convert(tmp_path / "r.emb", tmp_path / "r.safetensors")
    embfile.convert(tmp_path / "r.emb", tmp_path / "r.arrow")  # Arrow has: a list of fixed-size lists
    embfile.convert(tmp_path / "r.arrow", tmp_path / "r2.emb")
    assert embfile.open(tmp_path / "r2.emb")["k"].shape == (2, 3)


def test_lance_datasets(tmp_path, vectors):
    lance = pytest.importorskip("lance")
    import pyarrow as pa

    keys, m = list(vectors), np.stack(list(vectors.values()))
    column = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])
    half = len(keys) // 2
    path = str(tmp_path / "emb.lance")
    lance.write_dataset(pa.table({"id": keys[:half], "vector": column[:half]}), path)
    lance.write_dataset(pa.table({"id": keys[half:], "vector": column[half:]}), path, mode="append")  # 2 fragments
    lance.dataset(path).delete("id = 'UniRef50_000007'")  # deleted rows are not read
    assert detect_format(path) == "lance"
    embfile.convert(path, tmp_path / "a.emb")
    assert_store(tmp_path / "a.emb", {k: v for k, v in vectors.items() if k != "UniRef50_000007"})
    with embfile.open(tmp_path / "a.emb") as db:
        assert db.metadata["source"]["format"] == "lance"


def test_zarr_groups(tmp_path, vectors):
    zarr = pytest.importorskip("zarr")
    keys, m = list(vectors), np.stack(list(vectors.values()))
    for fmt in (2, 3):  # zarr 2's layout (.zgroup, what anndata and older tools write) and zarr 3's
        g = zarr.open_group(tmp_path / f"v{fmt}.zarr", mode="w", zarr_format=fmt)
        g.create_array("ids", shape=(len(keys),), dtype=str)[:] = np.array(keys, dtype=object)
        g.create_array("embeddings", shape=m.shape, dtype=m.dtype, chunks=(64, m.shape[1]))[:] = m
        assert detect_format(tmp_path / f"v{fmt}.zarr") == "zarr"
        embfile.convert(tmp_path / f"v{fmt}.zarr", tmp_path / f"v{fmt}.emb")
        assert_store(tmp_path / f"v{fmt}.emb", vectors)
    g = zarr.open_group(tmp_path / "nested.zarr", mode="w")
    inner = g.create_group("esm2")
    inner.create_array("seq_ids", data=np.arange(len(keys)))
    inner.create_array("mean", data=m.astype(np.float16))
    inner.create_array("other", data=m[:3])
    embfile.convert(tmp_path / "nested.zarr", tmp_path / "n.emb", group="esm2", ids="seq_ids", vectors="mean")
    assert_store(tmp_path / "n.emb", {str(i): v.astype(np.float16) for i, v in enumerate(m)})
    g = zarr.open_group(tmp_path / "per_key.zarr", mode="w")
    per_key = {k: v for k, v in vectors.items() if k.startswith("UniRef50_00004")}  # names a folder may have
    for k, v in per_key.items():
        g.create_array(k, data=v)
    embfile.convert(tmp_path / "per_key.zarr", tmp_path / "p.emb")
    assert_store(tmp_path / "p.emb", per_key)


def test_on_error_skip_for_per_key_inputs(tmp_path):
    """A bad record of any per-key input is skipped and reported under on_error="skip", and is a one-line
    error by default; a vector of a type that casts exactly to the first's is read cast."""
    good = {f"P{i}": np.full(4, i, np.float32) for i in range(6)}
    wrong = {"short": np.ones(3, np.float32), "text": np.array(["a", "b", "c", "d"])}
    with h5py.File(tmp_path / "pk.h5", "w") as f:
        for k, v in good.items():
            f[k] = v
        f["short"] = wrong["short"]
        f["wide"] = np.ones(4, np.float64)  # float32 cannot hold it exactly
        f["half"] = np.full(4, 0.5, np.float16)  # float32 can: read cast
        f["matrix"] = np.ones((2, 4), np.float32)
    np.savez(tmp_path / "pk.npz", **good, **wrong)
    torch.save({**{k: torch.from_numpy(v) for k, v in good.items()}, "short": torch.ones(3)}, tmp_path / "pk.pt")
    with open(tmp_path / "pk.pkl", "wb") as f:
        pickle.dump({**good, "short": [1.0, 2.0], 7: np.ones(4, np.float32), "half": np.ones(4, np.float16)}, f)
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(tmp_path / "pk.zarr", mode="w")
    for k, v in {**good, "short": wrong["short"]}.items():
        g.create_array(k, data=v)
    cases = {
        "pk.h5": ({"short", "wide", "matrix"}, {"half"}),
        "pk.npz": ({"short", "text"}, set()),
        "pk.pt": ({"short"}, set()),
        "pk.pkl": ({"short", 7}, {"half"}),
        "pk.zarr": ({"short"}, set()),
    }
    for name, (skipped, cast) in cases.items():
        src, out = tmp_path / name, tmp_path / f"{name}.emb"
        extra = {"trust_pickle": True} if name.endswith(".pkl") else {}
        with pytest.raises(embfile.EmbFileError):
            embfile.convert(src, out, **extra)
        assert not out.exists()
        embfile.convert(src, out, on_error="skip", **extra)
        with embfile.open(out) as db:
            assert set(db) == set(good) | cast, name
            assert all(np.array_equal(db[k], v) for k, v in good.items())
        with open(f"{out}.skipped.jsonl", encoding="utf-8") as f:
            report = [json.loads(line) for line in f]
        assert {r["key"] for r in report} == skipped, name
        assert all(r["error"] and r["where"] for r in report)
    r = subprocess.run(
        [sys.executable, "-m", "embfile", "convert", tmp_path / "pk.npz", tmp_path / "cli.emb", "--on-error", "skip"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "skipped 2 records" in r.stderr


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "lance", "npz", "zarr", "safetensors", "torch", "h5", "npy"])
def test_a_repeated_key_fails_before_any_vector_is_read(tmp_path, fmt):
    import pyarrow as pa

    keys = [f"k{i}" for i in range(1000)] + ["k7"]  # the repeat is the last row
    m = np.ones((len(keys), 4), np.float32)
    src = tmp_path / f"dup.{fmt}"
    table = pa.table({"id": keys, "v": pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), 4)})
    if fmt == "parquet":
        pq.write_table(table, src)
    elif fmt == "arrow":
        with pa.ipc.new_file(str(src), table.schema) as w:
            w.write_table(table)
    elif fmt == "lance":
        pytest.importorskip("lance").write_dataset(table, str(src))
    elif fmt == "npz":
        np.savez(src, ids=np.array(keys), emb=m)
    elif fmt == "zarr":
        g = pytest.importorskip("zarr").open_group(src, mode="w")
        g.create_array("ids", shape=(len(keys),), dtype=str)[:] = np.array(keys, dtype=object)
        g.create_array("emb", data=m)
    elif fmt == "safetensors":
        pytest.importorskip("safetensors.numpy").save_file({"emb": m}, src, metadata={"ids": json.dumps(keys)})
    elif fmt == "torch":
        torch.save((keys, torch.from_numpy(m)), src)
    elif fmt == "h5":
        with h5py.File(src, "w") as f:
            f["ids"], f["emb"] = np.array(keys, dtype=object).astype(h5py.string_dtype()), m
    else:
        np.save(src, m)
        (tmp_path / "dup.txt").write_text("\n".join(keys) + "\n")
    with pytest.raises(embfile.DuplicateKeyError, match=r"duplicate key 'k7' \(rows 7 and 1000\)") as e:
        embfile.formats.read(src)  # opening the input, before a single chunk of vectors is read
    assert e.value.key == "k7" and e.value.rows == (7, 1000)


def test_vectors_kept_as_text_csv_json_lines_and_word_vectors(tmp_path):
    """Tables exported as CSV or TSV (one column per dimension, or a column of lists as text), JSON Lines as
    embedding APIs' results are saved (a column of lists beside the text), and the word2vec / GloVe / fastText
    text format (keys holding spaces too, as GloVe 840B's)."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(3)
    data = {k: rng.standard_normal(5) for k in ["doc-1", "doc 2", "ünï", "sp|P69905|HBA_HUMAN"]}
    wide = pd.DataFrame(list(data.values()), index=list(data), columns=[f"v{i}" for i in range(5)])
    wide.rename_axis("id").to_csv(tmp_path / "wide.csv")  # pandas' export: id,v0,...,v4
    wide.rename_axis("id").to_csv(tmp_path / "wide.tsv", sep="\t")
    with open(tmp_path / "api.jsonl", "w") as f:
        f.writelines(json.dumps({"id": k, "embedding": v.tolist(), "text": "..."}) + "\n" for k, v in data.items())
    lists = pd.DataFrame({"id": list(data), "text": ["a, b", "c", "d", "e"], "embedding": list(data.values())})
    lists.assign(embedding=[v.tolist() for v in data.values()]).to_csv(tmp_path / "lists.csv", index=False)
    for name in ("wide.tsv", "api.jsonl"):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    for name in ("wide.csv", "wide.tsv", "api.jsonl", "lists.csv", "wide.tsv.gz", "api.jsonl.gz"):  # key: named id
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb")
        assert_store(tmp_path / f"{name}.emb", data)
    assert detect_format(tmp_path / "wide.tsv") == "csv" and detect_format(tmp_path / "api.jsonl") == "jsonl"
    (tmp_path / "numbered.csv").write_text("id,v0,v1,v2\n7,0.5,1,2\n9,1,2,3\n")  # integer ids, one column a dimension
    embfile.convert(tmp_path / "numbered.csv", tmp_path / "numbered.emb")
    assert_store(tmp_path / "numbered.emb", {"7": np.array([0.5, 1, 2]), "9": np.array([1.0, 2, 3])})
    long = lists.assign(embedding=[np.float32(v.tolist() * 3) for v in data.values()])  # numpy prints them over lines
    long.to_csv(tmp_path / "arrays.csv", index=False)
    embfile.convert(tmp_path / "arrays.csv", tmp_path / "arrays.emb")
    with embfile.open(tmp_path / "arrays.emb") as db:
        np.testing.assert_allclose(db.get_batch(list(data)), np.stack(long["embedding"]), rtol=1e-6)
    long.assign(embedding=[np.ones(1001)] * 4).to_csv(tmp_path / "summarised.csv", index=False)  # "[1. 1. ... 1.]"
    with pytest.raises(embfile.ConversionError, match="'embedding': arrays printed summarised, values left out"):
        embfile.convert(tmp_path / "summarised.csv", tmp_path / "out.emb")

    words = {". . .": rng.random(3), "the": rng.random(3), "Köln": rng.random(3), "at name@domain.com": rng.random(3)}
    lines = [f"{w} " + " ".join(f"{x:.6f}" for x in v) for w, v in words.items()]
    (tmp_path / "w2v.vec").write_text(f"{len(words)} 3\n" + "".join(line + " \n" for line in lines))  # word2vec's
    (tmp_path / "glove.txt").write_text("".join(line + "\n" for line in lines))  # GloVe's: no count, no end space
    bom = codecs.BOM_UTF8.decode()  # as a Windows editor saves text: the count line was taken for a word
    (tmp_path / "bom.vec").write_text(bom + f"{len(words)} 3\n" + "".join(line + "\n" for line in lines))
    want = {w: np.array(line.split()[-3:], np.float32) for w, line in zip(words, lines)}  # float32, as word2vec
    for name in ("w2v.vec", "glove.txt", "bom.vec"):
        cli = [sys.executable, "-m", "embfile", "convert", tmp_path / name, tmp_path / f"{name}.emb"]
        subprocess.run(cli, check=True, capture_output=True)
        assert_store(tmp_path / f"{name}.emb", want)

    nodes = "2 3\n17 0.5 0.25 1\n4 1 2 3\n"  # node2vec's (gensim's): numeric keys, after the count line
    (tmp_path / "nodes.txt").write_text(nodes)
    embfile.convert(tmp_path / "nodes.txt", tmp_path / "nodes.emb")
    assert_store(tmp_path / "nodes.emb", {"17": np.float32([0.5, 0.25, 1]), "4": np.float32([1, 2, 3])})
    np.savetxt(tmp_path / "matrix.txt", np.ones((2, 3)))  # numbers alone: a matrix without its keys
    with pytest.raises(embfile.ConversionError, match="matrix.txt: cannot tell its format"):
        embfile.convert(tmp_path / "matrix.txt", tmp_path / "out.emb")

    (tmp_path / "short.vec").write_text("".join(line + "\n" for line in lines[1:3]) + "Bonn 0.5 0.25\n")
    (tmp_path / "long.vec").write_text("".join(line + "\n" for line in lines[1:3]) + "Bonn 7 0.5 0.25 1\n")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "embedding": [1.0, 2.0]}\n{"id": "b", "embedding": [1.0,\n')
    (tmp_path / "latin.vec").write_bytes(b"a 1 2 3\nb \xff 1 2 3\n")  # a long line Arrow cannot decode: one line too
    cli = [sys.executable, "-m", "embfile", "convert", tmp_path / "latin.vec", tmp_path / "out.emb"]
    assert subprocess.run(cli, capture_output=True, text=True).stderr.count("\n") == 1
    for name, message in (
        ("short.vec", "short.vec: CSV parse error: Expected 4 columns, got 3"),
        ("long.vec", "long.vec: not a key and 3 numbers: 'Bonn 7 0.5 0.25 1'"),
        ("bad.jsonl", "bad.jsonl: "),
    ):
        assert_refused(tmp_path / name, tmp_path / "out.emb", message)


def test_word_vectors_binary_and_gzipped_as_gensim_and_word2vec_write_them(tmp_path):
    """word2vec's binary format (GoogleNews-vectors-negative300.bin) as gensim writes it and as word2vec's C tool
    does (a newline after each record), and word vectors gzipped (fastText's cc.en.300.vec.gz)."""
    gensim = pytest.importorskip("gensim")
    rng = np.random.default_rng(5)
    words = ["the", "Köln", "</s>", "New_York", "ß"]
    vectors = rng.standard_normal((len(words), 7)).astype(np.float32)
    kv = gensim.models.KeyedVectors(7)
    kv.add_vectors(words, vectors)
    want = dict(zip(words, vectors))
    for name, binary in (("w.bin", True), ("w.bin.gz", True), ("w.vec.gz", False), ("w.txt", False)):
        kv.save_word2vec_format(str(tmp_path / name), binary=binary)  # gzipped by its name
        assert detect_format(tmp_path / name) == "word2vec"
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb")
        assert_store(tmp_path / f"{name}.emb", want if binary else {w: np.float32(kv[w]) for w in words})
    c_tool = b"5 7\n" + b"".join(w.encode() + b" " + v.astype("<f4").tobytes() + b"\n" for w, v in want.items())
    (tmp_path / "c.bin").write_bytes(c_tool)
    embfile.convert(tmp_path / "c.bin", tmp_path / "c.emb")
    assert_store(tmp_path / "c.emb", want)
    for name, data, message in (
        ("cut.bin", c_tool[:-40], "cut.bin: ends after 3 of the 5 records it counts"),
        ("huge.bin", b"5 900000000\n" + c_tool[4:], "huge.bin: its first line says 900000000 values a record"),
        ("latin1.bin", c_tool.replace("Köln".encode(), "Köln".encode("latin-1")), "the key at byte 37 is not UTF-8"),
    ):
        (tmp_path / name).write_bytes(data)
        assert_refused(tmp_path / name, tmp_path / "out.emb", message)
    fasttext = gensim.models.FastText([words], vector_size=4, min_count=1, workers=1)
    gensim.models.fasttext.save_facebook_model(fasttext, str(tmp_path / "cc.bin"))  # a model, not its vectors
    with pytest.raises(embfile.ConversionError, match="cc.bin: a fastText model, not word vectors: convert the .vec"):
        embfile.convert(tmp_path / "cc.bin", tmp_path / "out.emb")
    kv.save_word2vec_format(str(tmp_path / "words.bin"), binary=True)
    model = gensim.models.KeyedVectors.load_word2vec_format(str(tmp_path / "words.bin"), binary=True)
    embfile.convert(tmp_path / "c.emb", tmp_path / "back.emb")  # and what gensim reads back is what we stored
    with embfile.open(tmp_path / "back.emb") as db:
        np.testing.assert_array_equal(db.get_batch(words), model[words])


def test_word_vectors_written_for_gensim_and_the_tools_that_read_them(tmp_path):
    """.emb -> word2vec text (.vec, .txt), binary (.bin) and gzipped, read back by gensim: float32 values exact;
    a key holding whitespace, or per-residue records, refused with nothing written."""
    gensim = pytest.importorskip("gensim")
    rng = np.random.default_rng(6)
    keys = ["the", "Köln", "</s>", "New_York"]
    vectors = rng.standard_normal((4, 9)).astype(np.float32)
    embfile.write(tmp_path / "words.emb", (keys, vectors))
    embfile.write(tmp_path / "half.emb", (keys, vectors.astype(np.float16)))
    for name in ("w.vec", "w.txt", "w.bin", "w.vec.gz", "w.bin.gz", "half.bin"):
        src = tmp_path / ("half.emb" if name.startswith("half") else "words.emb")
        embfile.convert(src, tmp_path / name)
        kv = gensim.models.KeyedVectors.load_word2vec_format(str(tmp_path / name), binary=".bin" in name)
        assert kv.index_to_key == keys and kv.vectors.dtype == np.float32
        want = vectors.astype(np.float16) if name.startswith("half") else vectors
        np.testing.assert_array_equal(kv[keys], want.astype(np.float32))
    embfile.write(tmp_path / "spaced.emb", (["a", "New York"], vectors[:2]))
    embfile.write(tmp_path / "residues.emb", {"P1": np.ones((3, 9), np.float32)}, ragged=True)
    for name, message in (
        ("spaced.emb", "spaced.emb: key 'New York' holds whitespace, which word vectors separate fields with"),
        (
            "residues.emb",
            r"residues.emb: per-residue records; word vectors are one a key: pool them with pool='mean' \(--pool mean",
        ),
    ):
        assert_refused(tmp_path / name, tmp_path / "out.vec", message)


def test_tables_written_as_csv_for_pandas_and_r(tmp_path):
    """.emb -> CSV or TSV (gzipped too), a header row and one column a dimension, read back by pandas exactly
    (keys holding the delimiter or quotes quoted), and by embfile's own reader."""
    pd = pytest.importorskip("pandas")
    keys = ["a,b", 'say "hi"', "tab\there", "ü"]
    vectors = np.random.default_rng(7).standard_normal((4, 5)).astype(np.float32)
    embfile.write(tmp_path / "v.emb", (keys, vectors))
    embfile.write(tmp_path / "half.emb", (keys, vectors.astype(np.float16)))
    for name, sep in (("v.csv", ","), ("v.tsv", "\t"), ("v.csv.gz", ","), ("half.csv", ",")):
        embfile.convert(tmp_path / ("half.emb" if name.startswith("half") else "v.emb"), tmp_path / name)
        table = pd.read_csv(tmp_path / name, sep=sep, index_col="key")
        want = vectors.astype(np.float16) if name.startswith("half") else vectors
        assert list(table.index) == keys and list(table.columns) == [f"v{j}" for j in range(5)]
        np.testing.assert_array_equal(table.to_numpy(np.float32), want.astype(np.float32))
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", dtype="float32")  # (text: float64 unless asked)
        assert_store(tmp_path / f"{name}.emb", dict(zip(keys, want.astype(np.float32))))
    embfile.write(tmp_path / "residues.emb", {"P1": np.ones((3, 5), np.float32)}, ragged=True)
    message = "residues.emb: per-residue records; a table's row is one a key"
    assert_refused(tmp_path / "residues.emb", tmp_path / "out.csv", message)


def test_gensim_models_and_keyed_vectors_saved_with_save(tmp_path):
    """gensim's own format (a pickle, large arrays stored beside it): a Word2Vec's or FastText's words, a
    Doc2Vec's documents (tags as keys), KeyedVectors; only with trust_pickle, as every pickle."""
    models = pytest.importorskip("gensim.models")
    sentences = [["the", "cat", "sat"], ["the", "dog", "ran"], ["a", "cat", "ran"]] * 5
    word2vec = models.Word2Vec(sentences, vector_size=6, min_count=1, seed=1, workers=1)
    tagged = [models.doc2vec.TaggedDocument(s, [f"doc{i}"]) for i, s in enumerate(sentences)]
    doc2vec = models.Doc2Vec(tagged, vector_size=6, min_count=1, seed=1, workers=1)
    fasttext = models.FastText(sentences, vector_size=6, min_count=1, seed=1, workers=1)
    word2vec.save(str(tmp_path / "w2v.model"))
    word2vec.wv.save(str(tmp_path / "words.kv"), sep_limit=0)  # its vectors in words.kv.vectors.npy
    doc2vec.save(str(tmp_path / "d2v.model"))
    fasttext.save(str(tmp_path / "ft.model"))
    for name, vectors in (
        ("w2v.model", word2vec.wv),
        ("words.kv", word2vec.wv),
        ("d2v.model", doc2vec.dv),
        ("ft.model", fasttext.wv),
    ):
        with pytest.raises(embfile.ConversionError, match="loading a pickle runs code"):
            embfile.convert(tmp_path / name, tmp_path / f"{name}.emb")
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb", trust_pickle=True)
        assert_store(tmp_path / f"{name}.emb", {k: vectors[k] for k in vectors.index_to_key})


@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")  # zarr's, of a damaged zarr.json
def test_binary_inputs_mutated_only_raise_conversion_errors(tmp_path):
    """A damaged HDF5 file (per key, bulk, per residue), .npz archive, torch or safetensors file, Zarr group,
    Lance dataset, Parquet file, Arrow IPC file or stream, or pickled pandas DataFrame or Series converts or raises an
    EmbFileError naming it, and leaves nothing at the output.  Before, more than half of the damaged HDF5
    files and .npz archives raised h5py's or zipfile's errors (OSError, RuntimeError, KeyError, BadZipFile)
    without the file's name, damaged Zarr chunks zstd's RuntimeError, a damaged Parquet footer or page
    pyarrow's (one in five), and an Arrow file or a pickled frame whose string offsets point past their data
    crashed the interpreter (pyarrow reads both without checking them): the regressions below run in a
    process of their own."""
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(20)]
    table = pa.table({"id": words, "emb": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(60)), 3)})
    pq.write_table(table, tmp_path / "seed.parquet", row_group_size=7, compression="none")
    pd.DataFrame(rng.random((20, 3)), index=pd.Index(words, name="id")).to_parquet(tmp_path / "wide.parquet")
    with pa.OSFile(str(tmp_path / "seed.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=7)
    with pa.OSFile(str(tmp_path / "seed.arrows"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=7)
    seeds = {name: (tmp_path / f"seed.{name.split('.')[1]}").read_bytes() for name in ("x.parquet", "x.arrow")}
    seeds["s.arrows"] = (tmp_path / "seed.arrows").read_bytes()
    seeds["w.parquet"] = (tmp_path / "wide.parquet").read_bytes()
    frame = pd.DataFrame({"id": words, "emb": list(rng.random((20, 3)))})
    seeds["frame.pkl"] = pickle.dumps(frame)
    seeds["series.pkl"] = pickle.dumps(frame.set_index("id")["emb"])
    vectors = rng.random((12, 8)).astype(np.float32)
    with h5py.File(tmp_path / "seed.h5", "w") as f:  # ProtTrans': a dataset a protein
        for w, v in zip(words, vectors):
            f[w] = v
    with h5py.File(tmp_path / "bulk.h5", "w") as f:
        f["ids"], f["embeddings"] = np.array(words[:12], dtype="S"), vectors
    with h5py.File(tmp_path / "residues.h5", "w") as f:
        for w in words[:12]:
            f[w] = rng.random((3, 8)).astype(np.float16)
    np.savez(tmp_path / "seed.npz", ids=np.array(words[:12]), embeddings=vectors)
    torch.save(dict(zip(words, torch.from_numpy(vectors))), tmp_path / "seed.pt")
    st = pytest.importorskip("safetensors.numpy")
    st.save_file(dict(zip(words, vectors)), tmp_path / "seed.safetensors")
    for name in ("seed.h5", "bulk.h5", "residues.h5", "seed.npz", "seed.pt", "seed.safetensors"):
        seeds[name] = (tmp_path / name).read_bytes()
    for name, data in mutated(seeds, 700, seed=2, cut=16, insert=b"\x00\x01\xff"):
        (tmp_path / name).write_bytes(data)
        options = {"trust_pickle": True} if ".pkl" in name else {"src_format": "arrow"} if ".arrow" in name else {}
        try:
            embfile.convert(tmp_path / name, tmp_path / "out.emb", **options)
        except embfile.EmbFileError:
            assert not os.path.exists(tmp_path / "out.emb")
        (tmp_path / "out.emb").unlink(missing_ok=True)

    zarr = pytest.importorskip("zarr")  # a folder: each mutation damages one of its files
    store = zarr.open_group(tmp_path / "seed.zarr", mode="w")
    store.create_array("ids", shape=(12,), dtype=str)[:] = np.array(words[:12], dtype=object)
    store.create_array("embeddings", data=vectors, chunks=(4, 8))
    parts = sorted(p.relative_to(tmp_path / "seed.zarr") for p in (tmp_path / "seed.zarr").rglob("*") if p.is_file())
    for i, (name, data) in enumerate(
        mutated({str(p): (tmp_path / "seed.zarr" / p).read_bytes() for p in parts}, 150, 3, 8)
    ):
        shutil.copytree(tmp_path / "seed.zarr", tmp_path / f"m{i}.zarr")
        (tmp_path / f"m{i}.zarr" / name).write_bytes(data)  # was zstd's RuntimeError, zarr's TypeError
        with contextlib.suppress(embfile.EmbFileError):
            embfile.convert(tmp_path / f"m{i}.zarr", tmp_path / "out.emb")
        (tmp_path / "out.emb").unlink(missing_ok=True)

    lance = pytest.importorskip("lance")  # its manifest damaged: a Rust panic, pyo3's PanicException (a BaseException)
    lance.write_dataset(table, tmp_path / "seed.lance")
    (manifest,) = (tmp_path / "seed.lance" / "_versions").glob("*.manifest")
    for i, (_, data) in enumerate(mutated({"m": manifest.read_bytes()}, 60, 4, 8)):
        shutil.copytree(tmp_path / "seed.lance", tmp_path / f"m{i}.lance")
        (tmp_path / f"m{i}.lance" / "_versions" / manifest.name).write_bytes(data)
        with contextlib.suppress(embfile.EmbFileError):
            embfile.convert(tmp_path / f"m{i}.lance", tmp_path / "out.emb", vector_column="emb")
        (tmp_path / "out.emb").unlink(missing_ok=True)

    def past_their_data(data, width):  # the last string offset of "w0".."w19" moved far past the text
        good = np.array([0, 2, 4], np.dtype(f"i{width}")).tobytes()
        assert data.count(good) >= 1
        return data.replace(good, np.array([0, 2, 60000], np.dtype(f"i{width}")).tobytes())

    with pa.OSFile(str(tmp_path / "three.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table.slice(0, 2))
    (tmp_path / "bad.arrow").write_bytes(past_their_data((tmp_path / "three.arrow").read_bytes(), 4))
    (tmp_path / "bad.pkl").write_bytes(past_their_data(pickle.dumps(frame.iloc[:2].set_index("id")["emb"]), 8))
    for name, *options in (("bad.arrow",), ("bad.pkl", "--trust-pickle")):
        out = subprocess.run(
            [sys.executable, "-m", "embfile", "convert", tmp_path / name, tmp_path / "out.emb", *options],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr  # not -7 (SIGBUS) or -11
        assert "offset for slot 2 out of bounds: 60000" in out.stderr and not os.path.exists(tmp_path / "out.emb")


def test_text_inputs_mutated_only_raise_conversion_errors(tmp_path):
    """Text is where hand-made and half-written files are: a mutated CSV, JSON Lines or word-vector file, or a
    gzipped one (or pickle) damaged, converts or raises an EmbFileError, and leaves nothing at the output."""

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(20)]
    seeds = {
        "x.vec": "3 4\n" + "".join(f"{w} " + " ".join(f"{x:.3f}" for x in rng.random(4)) + " \n" for w in words[:3]),
        "x.csv": "id,v0,v1,v2\n" + "".join(f"{w},{','.join(f'{x:.3f}' for x in rng.random(3))}\n" for w in words),
        "lists.csv": "id,vector\n" + "".join(f'{w},"{rng.random(3).round(3).tolist()}"\n' for w in words),
        "x.bin": "3 4\n" + "".join(f"{w} " + "\x00\x00\x00@" * 4 for w in words[:3]),
        "spaced.txt": "".join(f"{w} x " + " ".join(f"{x:.3f}" for x in rng.random(4)) + "\n" for w in words[:3]),
        "x.jsonl": "".join(json.dumps({"id": w, "embedding": rng.random(3).round(3).tolist()}) + "\n" for w in words),
    }
    seeds = {name: text.encode() for name, text in seeds.items()}
    for name in ("x.vec", "x.csv", "x.bin", "x.jsonl"):  # gzipped: damage is found by the decompressor
        seeds[f"{name}.gz"] = gzip.compress(seeds[name])
    seeds["x.pkl.gz"] = gzip.compress(pickle.dumps({w: rng.random(3) for w in words}))
    regressions = [  # text Arrow does not check: it said UnicodeDecodeError
        ("x.jsonl", b'{"id": "a\xff", "embedding": [1, 2]}\n', "x.jsonl: a key of rows 0 to 0 is not UTF-8"),
        ("x.csv", b"i\xffd,v0,v1\na,1,2\n", "x.csv: its column names are not UTF-8"),
    ]
    for name, data, message in regressions:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(embfile.ConversionError, match=message):
            embfile.convert(tmp_path / name, tmp_path / "out.emb")
    for name, data in mutated(seeds, 600, seed=1, cut=8, insert=b' ,\n"[]{}0.e-\tx\xff'):
        (tmp_path / name).write_bytes(data)
        try:
            embfile.convert(tmp_path / name, tmp_path / "out.emb", **({"trust_pickle": True} if ".pkl" in name else {}))
        except embfile.EmbFileError:
            assert not os.path.exists(tmp_path / "out.emb")
        (tmp_path / "out.emb").unlink(missing_ok=True)
