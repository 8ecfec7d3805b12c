"""bfloat16, a stored dtype of its own (numpy's through ml_dtypes): kept bit for bit from torch and
safetensors, cast on request, refused by the formats that have no such type."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import embfile
from embfile.torch import Dataset, IterableDataset

BF16 = np.dtype(ml_dtypes.bfloat16)


def bits(a):
    return np.asarray(a).view(np.uint16)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(4)
    m = rng.standard_normal((300, 16)).astype(np.float32) * 100
    m[0, :4] = [np.nan, np.inf, -0.0, 1e-39]  # NaN, infinity, the sign of zero, a subnormal
    return {f"P{i:05d}": v for i, v in enumerate(m)}


def test_stored_as_bfloat16_in_format_1_1(tmp_path, vectors):
    m = np.stack(list(vectors.values()))
    embfile.write(tmp_path / "a.emb", vectors, dtype="bfloat16")
    with embfile.open(tmp_path / "a.emb") as db:
        assert db.dtype == BF16 and db.header.dtype_code == 4 and db.header.version == "1.1"
        assert np.array_equal(bits(db.matrix), bits(m.astype(BF16)))  # rounded as ml_dtypes rounds
        assert np.array_equal(bits(db.get_batch(["P00007", "P00000"])), bits(m[[7, 0]].astype(BF16)))
        assert np.array_equal(bits(db["P00000"]), bits(m[0].astype(BF16)))
        db.verify()
    embfile.write_shards(tmp_path / "folder", vectors, dtype="bfloat16", shard_bytes=4096)
    embfile.append(tmp_path / "folder", {"new": np.full(16, 1.5, np.float32)})  # cast to the folder's type
    with embfile.open(tmp_path / "folder") as ds:
        manifest = json.loads(next((tmp_path / "folder" / "_embfile" / "versions").glob("*2.json")).read_text())
        assert ds.dtype == BF16 and manifest["format_version"] == "1.1" and ds["new"][0] == 1.5


def test_torch_and_safetensors_bfloat16_kept_bit_for_bit(tmp_path, vectors):
    keys = list(vectors)
    t = torch.from_numpy(np.stack(list(vectors.values()))).to(torch.bfloat16)
    want = t.view(torch.int16).numpy().view(np.uint16)
    torch.save({k: t[i] for i, k in enumerate(keys)}, tmp_path / "dict.pt")
    torch.save((keys, t), tmp_path / "pair.pt")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({"embeddings": t}, tmp_path / "m.safetensors", metadata={"ids": json.dumps(keys)})
    for name in ("dict.pt", "pair.pt", "m.safetensors"):
        embfile.convert(tmp_path / name, tmp_path / f"{name}.emb")
        with embfile.open(tmp_path / f"{name}.emb") as db:
            assert db.dtype == BF16 and list(db) == keys and np.array_equal(bits(db.matrix), want), name
    embfile.convert(tmp_path / "pair.pt.emb", tmp_path / "out.safetensors")
    back = safetensors_torch.load_file(tmp_path / "out.safetensors")["embeddings"]
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_writers_take_tensors_as_a_model_leaves_them(tmp_path, vectors):
    """A model's output written as it is: tensors that need grad, and bfloat16 ones, to every writer and every
    way of giving records (numpy refused the first, and numpy has no bfloat16)."""
    keys = list(vectors)[1:7]  # no NaN: compared with array_equal
    layer = torch.nn.Linear(16, 16)
    out = layer(torch.from_numpy(np.stack([vectors[k] for k in keys])))  # requires grad
    half = out.detach().to(torch.bfloat16)
    want = {k: out[i].detach().numpy() for i, k in enumerate(keys)}
    embfile.write(tmp_path / "dict.emb", {k: out[i] for i, k in enumerate(keys)})
    embfile.write(tmp_path / "pair.emb", (keys, half))
    with embfile.DatasetWriter(tmp_path / "ds", dim=16, dtype="float32") as w:
        w.add_batch(keys[:3], out[:3])
        w.add(keys[3], half[3])
        w.add_batch(keys[4:], half[4:])
    with embfile.Writer(tmp_path / "ragged.emb", dim=16, ragged=True) as w:
        w.add("a", out[:2])
        w.add_batch(["b", "c"], half[2:6], lengths=[1, 3])
    with embfile.open(tmp_path / "dict.emb") as db:
        assert db.dtype == np.float32 and all(np.array_equal(db[k], want[k]) for k in keys)
    with embfile.open(tmp_path / "pair.emb") as db:
        assert db.dtype == BF16 and np.array_equal(bits(db.matrix), bits(half.view(torch.int16).numpy()))
    with embfile.open(tmp_path / "ds") as db:
        np.testing.assert_array_equal(db.get_batch(keys[:3]), out[:3].detach().numpy())
        np.testing.assert_array_equal(db.get_batch(keys[3:]), half[3:].float().numpy())  # widened exactly
    with embfile.open(tmp_path / "ragged.emb") as db:
        np.testing.assert_array_equal(db["a"], out[:2].detach().numpy())
        np.testing.assert_array_equal(db["c"], half[3:6].float().numpy())


def test_cast_on_request(tmp_path, vectors):
    m = np.stack(list(vectors.values()))
    embfile.write(tmp_path / "b.emb", vectors, dtype="bfloat16")
    embfile.convert(tmp_path / "b.emb", tmp_path / "f32.emb", dtype="float32")
    with embfile.open(tmp_path / "f32.emb") as db:  # bfloat16 -> float32 is exact
        assert db.dtype == np.float32 and np.array_equal(bits(db.matrix.astype(BF16)), bits(m.astype(BF16)))
    embfile.convert(tmp_path / "b.emb", tmp_path / "f16.emb", dtype="float16")
    with embfile.open(tmp_path / "f16.emb") as db:
        np.testing.assert_allclose(db.matrix[1:], m[1:].astype(BF16).astype(np.float16), rtol=0)
    embfile.write(tmp_path / "big.emb", {"ok": np.ones(2), "huge": np.array([1.0, 1e30])}, dtype="bfloat16")
    with pytest.raises(embfile.WriterError, match=r"key 'huge': value 1.*e\+30 does not fit in float16"):
        embfile.convert(tmp_path / "big.emb", tmp_path / "x.emb", dtype="float16")
    assert not (tmp_path / "x.emb").exists()


@pytest.mark.parametrize("out", ["x.parquet", "x.arrow", "x.h5"])
def test_formats_without_bfloat16_say_so(tmp_path, vectors, out):
    embfile.write(tmp_path / "b.emb", vectors, dtype="bfloat16")
    r = subprocess.run(
        [sys.executable, "-m", "embfile", "convert", str(tmp_path / "b.emb"), str(tmp_path / out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "has no bfloat16 type" in r.stderr and "float32" in r.stderr and not (tmp_path / out).exists()
    embfile.convert(tmp_path / "b.emb", tmp_path / out, dtype="float32")
    assert (tmp_path / out).exists()


def test_search_pool_and_torch(tmp_path, vectors):
    m = np.stack(list(vectors.values()))[1:]  # no NaN
    keys = list(vectors)[1:]
    embfile.write(tmp_path / "b.emb", dict(zip(keys, m)), dtype="bfloat16")
    wide = m.astype(BF16).astype(np.float32)
    with embfile.open(tmp_path / "b.emb") as db:
        scores, found = db.search(wide[:3], k=5, metric="l2")
        d = np.linalg.norm(wide[:3, None] - wide[None], axis=2)
        np.testing.assert_allclose(scores, np.sort(d, axis=1)[:, :5], rtol=1e-4, atol=1e-2)
        assert [f[0] for f in found] == keys[:3]
        item = Dataset(db)[5]
        assert item.dtype == torch.bfloat16
        assert np.array_equal(bits(item.view(torch.int16).numpy()), bits(m[5].astype(BF16)))
        batch = next(iter(IterableDataset(db, 32, shuffle=False)))
        assert batch.dtype == torch.bfloat16 and batch.shape == (32, 16)
    rows = {k: np.tile(v, (1 + i % 3, 1)) for i, (k, v) in enumerate(zip(keys, m))}
    embfile.write(tmp_path / "r.emb", rows, dtype="bfloat16", ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        pooled = db.pool("mean")
        assert pooled.dtype == BF16 and np.array_equal(bits(pooled), bits(m.astype(BF16)))


def test_without_ml_dtypes_one_line_names_the_extra(tmp_path):
    embfile.write(tmp_path / "b.emb", {"k": np.ones(4)}, dtype="bfloat16")
    blocked = "import sys; sys.modules['ml_dtypes'] = None; from embfile.cli import run; sys.argv[1:] = {}; run()"
    r = subprocess.run(
        [sys.executable, "-c", blocked.format(["info", str(tmp_path / "b.emb")])], capture_output=True, text=True
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().endswith("this needs ml_dtypes: pip install 'embfile[bfloat16]'")
