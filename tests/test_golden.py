"""Golden files: .emb files of format 1.0 written by embfile 0.1.0, committed and never regenerated.

Each ``tests/golden/v1.0/NAME.emb`` sits beside ``NAME.json``, its expected contents in a readable form:
dtype, dim, keys in row order, vectors, metadata and the writer options used.  Every run reads every file
through every read path and compares (today's reader still reads what an earlier release wrote), and
writes the same input again and compares the bytes (the writer's output did not drift).  The writer's own
record (creation time, embfile version) is the golden file's, so that comparison is exact.

``python tests/test_golden.py`` wrote the files once, with embfile 0.1.0; ``folder_legacy/`` is a sharded
folder in 0.1's layout (``part-*.emb`` and ``_index.emb``), written by ``write_shards`` of that layout and only
read.  A new format version gets a new folder beside this one, and these files stay as they are:
``tests/golden/v1.1/`` holds format 1.1's ragged (per-residue) files and a bfloat16 file, written once by
``python tests/test_golden.py --v1.1`` (embfile 0.2.0.dev0).
"""

import json
import math
import pathlib
import sys

import ml_dtypes
import numpy as np
import pytest

import embfile
from embfile._format import disk_dtype, kind

GOLDEN = pathlib.Path(__file__).parent / "golden" / "v1.0"
V11 = pathlib.Path(__file__).parent / "golden" / "v1.1"
HOME = {p.stem: folder for folder in (GOLDEN, V11) for p in folder.glob("*.json")}  # name -> its folder
ALL_SPECS = {name: json.loads((folder / f"{name}.json").read_text(encoding="utf-8")) for name, folder in HOME.items()}
RAGGED_SPECS = {name: spec for name, spec in ALL_SPECS.items() if "lengths" in spec}
SPECS = {name: spec for name, spec in ALL_SPECS.items() if "lengths" not in spec}
FILES = sorted(name for name, spec in SPECS.items() if spec.get("layout") != "folder")
FOLDERS = sorted(name for name, spec in SPECS.items() if spec.get("layout") == "folder")


def load_case(name):
    """The expected contents of ``NAME.emb`` (or the folder ``NAME``): (spec, keys, matrix)."""
    spec = SPECS[name]
    dtype = disk_dtype(spec["dtype"])
    matrix = np.array(spec["vectors"], dtype=np.float64 if kind(dtype) == "f" else object)
    matrix = matrix.reshape(len(spec["keys"]), spec["dim"]).astype(dtype)
    return spec, spec["keys"], matrix


def same_bits(a, b):
    """Arrays equal bit for bit (NaN payloads and the sign of zero included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_the_golden_set_is_complete():
    dtypes = {SPECS[n]["dtype"] for n in FILES}
    assert dtypes == {
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
    }
    assert {"empty", "one_record", "awkward_keys", "metadata", "many_buckets"} <= set(FILES)
    assert all((HOME[n] / f"{n}.emb").exists() for n in FILES)
    assert FOLDERS == ["folder_legacy"]  # 0.1's sharded layout: part-*.emb and _index.emb


@pytest.mark.parametrize("name", FILES + FOLDERS)
def test_golden_file_reads_as_written(name):
    spec, keys, want = load_case(name)
    folder = spec.get("layout") == "folder"
    with embfile.open(HOME[name] / (name if folder else f"{name}.emb")) as db:
        assert (len(db), db.dim, db.dtype) == (len(keys), spec["dim"], disk_dtype(spec["dtype"]))
        assert {f.header.version for f in db.files} == {"1.1" if HOME[name] == V11 else "1.0"}
        assert list(db) == keys
        if folder:
            assert {k: v for k, v in db.metadata.items() if k != "embfile"} == spec["metadata"]
            assert len(db.files) == -(-len(keys) * spec["dim"] * want.itemsize // spec["shard_bytes"])
        else:
            assert db.metadata == spec["metadata"]
            assert same_bits(db.matrix, want)
        assert same_bits(db.to_numpy(), want)
        for row, key in enumerate(keys):
            assert key in db and db.row(key) == row and db.key(row) == key
            assert same_bits(db[key], want[row])
        assert same_bits(db.get_batch(keys[::-1]), want[::-1])
        np.testing.assert_array_equal(db.rows(keys), np.arange(len(keys)))
        assert same_bits(db.take(np.arange(len(keys))[::-1]), want[::-1])
        if keys:
            epoch = [(k, v) for ks, m in db.iter_batches(3, seed=1) for k, v in zip(ks, m)]
            assert sorted(k for k, _ in epoch) == sorted(keys)
            assert all(same_bits(v, want[db.row(k)]) for k, v in epoch)
        assert "absent \x00 key" not in db and db.get("absent \x00 key") is None
        db.verify()


@pytest.mark.parametrize("name", FILES)
def test_writing_the_same_input_gives_the_same_bytes(name, tmp_path, monkeypatch):
    spec, keys, matrix = load_case(name)
    record = spec["metadata"]["embfile"]
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # the record is replaced below; keep the clock out anyway
    write_case(tmp_path / "again.emb", spec, keys, matrix, record, monkeypatch)
    assert (tmp_path / "again.emb").read_bytes() == (HOME[name] / f"{name}.emb").read_bytes()


def write_case(path, spec, keys, matrix, record=None, monkeypatch=None):
    """Write one golden case the way it was written first: one Writer, one add_batch."""
    user = {k: v for k, v in spec["metadata"].items() if k != "embfile"}
    if record is not None:  # the golden file's creation time and version, not today's
        from embfile import writer

        original = writer.Writer._writer_record
        monkeypatch.setattr(writer.Writer, "_writer_record", lambda self, n: {**original(self, n), **record})
    with embfile.Writer(path, spec["dim"], spec["dtype"], user or None, **spec["options"]) as w:
        w.add_batch(keys, matrix)


def load_ragged(name):
    """The expected contents of ``v1.1/NAME.emb``: (spec, {key: (length, dim) matrix})."""
    spec = RAGGED_SPECS[name]
    rows = np.array(spec["rows"], dtype=np.float64).reshape(-1, spec["dim"]).astype(spec["dtype"])
    ends = np.cumsum(spec["lengths"])
    return spec, {k: rows[e - n : e] for k, n, e in zip(spec["keys"], spec["lengths"], ends)}


def test_the_ragged_golden_set_is_there():
    assert sorted(RAGGED_SPECS) == ["ragged_float16", "ragged_float32"]


@pytest.mark.parametrize("name", sorted(RAGGED_SPECS))
def test_ragged_golden_file_reads_as_written(name):
    spec, records = load_ragged(name)
    with embfile.open(V11 / f"{name}.emb") as db:
        assert db.ragged and db.header.version == "1.1" and db.metadata == spec["metadata"]
        assert list(db) == spec["keys"] and db.lengths().tolist() == spec["lengths"]
        for k, m in records.items():
            assert same_bits(np.array(db[k]), m)
        rows, offsets = db.get_batch(spec["keys"][::-1], pad=False)
        assert same_bits(rows, np.concatenate([records[k] for k in spec["keys"][::-1]]))
        db.verify()


@pytest.mark.parametrize("name", sorted(RAGGED_SPECS))
def test_writing_the_same_ragged_input_gives_the_same_bytes(name, tmp_path, monkeypatch):
    spec, records = load_ragged(name)
    from embfile import writer

    original = writer.Writer._writer_record
    record = spec["metadata"]["embfile"]
    monkeypatch.setattr(writer.Writer, "_writer_record", lambda self, n: {**original(self, n), **record})
    user = {k: v for k, v in spec["metadata"].items() if k != "embfile"}
    with embfile.Writer(tmp_path / "again.emb", spec["dim"], spec["dtype"], user or None, ragged=True) as w:
        for k, m in records.items():
            w.add(k, m)
    assert (tmp_path / "again.emb").read_bytes() == (V11 / f"{name}.emb").read_bytes()


# ---- how the files were made (once, with embfile 0.1.0; the ragged ones with 0.2.0.dev0) -----------


def _values(dtype, n, dim):
    """Values that exercise ``dtype``: its extremes, zero, and (floats) -0.0, NaN, infinities, subnormals."""
    dt = disk_dtype(dtype)
    if kind(dt) == "f":
        fi = ml_dtypes.finfo(dt)
        special = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            float(fi.max),
            float(-fi.max),
            float(fi.smallest_subnormal),
            float(fi.tiny),
            math.inf,
            -math.inf,
            math.nan,
            float(fi.eps),
        ]
    else:
        ii = np.iinfo(dt)
        special = [0, 1, int(ii.max), int(ii.min), int(ii.max) - 1, int(ii.min) + 1, 7, 100]
    flat = [special[i % len(special)] for i in range(n * dim)]
    return np.array(flat, dtype=object).reshape(n, dim).astype(dt)


def _cases():
    dtypes = ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
    for dt in dtypes:
        keys = [f"{dt}-{i}" for i in range(6)]
        yield f"dtype_{dt}", keys, _values(dt, 6, 5), {"dtype": dt}, {}
    yield "empty", [], np.zeros((0, 8), np.float32), {}, {}
    yield "one_record", ["only"], np.arange(3, dtype=np.float32)[None], {}, {}
    awkward = [
        "",
        " ",
        "a",
        "ab",
        "abc",
        "a/b",
        "a b  c",
        "sp|P69905|HBA_HUMAN",
        "\x00nul",
        "tab\there",
        "protéine α-7 β",
        "蛋白质-1",
        "🧬",
        "x" * 300,
        "ÿ",
        "\u0080",
        "z\n",
    ]
    yield "awkward_keys", awkward, _values("float32", len(awkward), 2), {}, {"bucket_keys": 3}
    meta = {
        "model": "esm2_t33_650M_UR50D",
        "layer": 33,
        "pooling": "mean",
        "note": "ünïcödé ✓",
        "nested": {"list": [1, 2.5, None, True, "x"], "empty": {}},
    }
    yield "metadata", ["k1", "k2"], np.ones((2, 4), np.float64), {}, {"metadata": meta}
    keys = [f"UniRef50_A0A{i:06d}" for i in range(120)]  # a long common prefix, many buckets, blocks
    yield "many_buckets", keys, _values("float32", 120, 16), {}, {"bucket_keys": 4, "block_bytes": 4096}


def make_golden(folder=GOLDEN, cases=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, keys, matrix, _, extra in cases or _cases():
        options = {k: v for k, v in extra.items() if k != "metadata"}
        path = folder / f"{name}.emb"
        with embfile.Writer(path, matrix.shape[1], matrix.dtype, extra.get("metadata"), **options) as w:
            w.add_batch(keys, matrix)
        with embfile.open(path) as db:
            metadata = db.metadata
        spec = {"dtype": matrix.dtype.name, "dim": matrix.shape[1], "options": options, "metadata": metadata}
        lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in spec.items()]
        lines.append(f' "keys": {json.dumps(keys, ensure_ascii=False)},')
        rows = [json.dumps([float(v) if kind(matrix.dtype) == "f" else v.item() for v in row]) for row in matrix]
        lines.append(' "vectors": [' + ",\n  ".join(rows) + "]")
        (folder / f"{name}.json").write_text("{\n" + "\n".join(lines) + "\n}\n", encoding="utf-8")


def make_golden_v11():
    make_golden(V11, [("dtype_bfloat16", [f"bfloat16-{i}" for i in range(6)], _values("bfloat16", 6, 5), {}, {})])
    lengths = [3, 1, 7, 2, 12, 1, 5]
    keys = ["sp|P69905|HBA_HUMAN", "peptide-1", "protéine α-7", "", "UniRef50_A0A000001", "🧬", "x" * 80]
    for dtype in ("float16", "float32"):
        name = f"ragged_{dtype}"
        rows = _values(dtype, sum(lengths), 4)
        with embfile.Writer(V11 / f"{name}.emb", 4, dtype, {"model": "prott5", "per_residue": True}, ragged=True) as w:
            w.add_batch(keys, rows, lengths)
        with embfile.open(V11 / f"{name}.emb") as db:
            metadata = db.metadata
        spec = {"dtype": dtype, "dim": 4, "metadata": metadata, "keys": keys, "lengths": lengths}
        lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in spec.items()]
        lines.append(' "rows": [' + ",\n  ".join(json.dumps([v.item() for v in row]) for row in rows) + "]")
        (V11 / f"{name}.json").write_text("{\n" + "\n".join(lines) + "\n}\n", encoding="utf-8")


if __name__ == "__main__":
    folder = V11 if "--v1.1" in sys.argv else GOLDEN
    if any(folder.glob("*.emb")) and "--force" not in sys.argv:
        sys.exit(f"{folder} holds golden files already: they are never regenerated")
    make_golden_v11() if folder == V11 else make_golden()
