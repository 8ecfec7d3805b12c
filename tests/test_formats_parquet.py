"""Parquet <-> .emb with tables written by pyarrow, pandas and Hugging Face datasets; EmbFile.to_arrow."""

import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import AWKWARD_KEYS, assert_store

import embfile


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    keys = AWKWARD_KEYS + [f"doc-{i}" for i in range(2000)]
    d = {k: rng.standard_normal(48).astype(np.float32) for k in keys}
    d["doc-5"][[0, 7]] = [np.nan, -np.inf]
    return d


def test_fixed_size_list_from_pyarrow(tmp_path, data):
    values = pa.array(np.concatenate(list(data.values())))
    table = pa.table({"id": list(data), "emb": pa.FixedSizeListArray.from_arrays(values, 48)})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=300)
    embfile.convert(tmp_path / "t.parquet", tmp_path / "t.emb")
    assert_store(tmp_path / "t.emb", data)
    assert list(embfile.open(tmp_path / "t.emb")) == list(data)


def test_pandas_list_of_double(tmp_path, data):
    df = pd.DataFrame(
        {
            "seqid": list(data),
            "embedding": [v.astype(np.float64) for v in data.values()],
            "length": np.arange(len(data)),
        }
    )
    df.to_parquet(tmp_path / "p.parquet")
    assert pa.types.is_list(pq.read_schema(tmp_path / "p.parquet").field("embedding").type)
    embfile.convert(tmp_path / "p.parquet", tmp_path / "p.emb", dtype="float32")
    assert_store(tmp_path / "p.emb", data)  # float32 -> float64 -> float32 is exact


def test_hugging_face_datasets(tmp_path, data):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(
        {"text_id": list(data), "embeddings": [v.tolist() for v in data.values()]},
        features=datasets.Features(
            {"text_id": datasets.Value("string"), "embeddings": datasets.Sequence(datasets.Value("float32"))}
        ),
    )
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    embfile.convert(tmp_path / "hf.parquet", tmp_path / "hf.emb")
    assert_store(tmp_path / "hf.emb", data)


def test_large_list_and_folder_of_files(tmp_path, data):
    keys, m = list(data), np.stack(list(data.values()))
    os.makedirs(tmp_path / "shards" / "part=1")
    for i, lo in enumerate(range(0, len(keys), 700)):
        hi = min(lo + 700, len(keys))
        vectors = pa.LargeListArray.from_arrays(np.arange(0, (hi - lo + 1) * 48, 48), pa.array(m[lo:hi].ravel()))
        sub = "part=1/" if i % 2 else ""
        pq.write_table(pa.table({"key": keys[lo:hi], "v": vectors}), tmp_path / "shards" / f"{sub}{i:03d}.parquet")
    (tmp_path / "shards" / "_SUCCESS").write_text("")
    embfile.convert(tmp_path / "shards", tmp_path / "s.emb")
    assert_store(tmp_path / "s.emb", data)


def test_wide_layout(tmp_path, data):
    m = np.stack(list(data.values()))
    df = pd.DataFrame(m, columns=[f"dim_{i}" for i in range(48)])
    df.insert(0, "name", list(data))
    df["label"] = 1.5  # a numeric column that is not part of the vector
    df.to_parquet(tmp_path / "w.parquet")
    with pytest.raises(embfile.ConversionError, match=r"wide_prefix= \(--wide-prefix\)"):
        embfile.convert(tmp_path / "w.parquet", tmp_path / "w.emb")
    embfile.convert(tmp_path / "w.parquet", tmp_path / "w.emb", wide_prefix="dim_")
    assert_store(tmp_path / "w.emb", data)
    embfile.convert(tmp_path / "w.parquet", tmp_path / "w2.emb", wide_columns=["dim_3", "dim_1"])
    assert_store(tmp_path / "w2.emb", {k: v[[3, 1]] for k, v in data.items()})
    # a key and numbered columns of numbers: one a dimension, unnamed (was "no column is the vector column")
    pd.DataFrame(m, index=pd.Index(list(data), name="id")).to_parquet(tmp_path / "pandas.parquet")  # 0, 1, ...
    df.drop(columns="label").to_parquet(tmp_path / "dims.parquet")
    for name in ("pandas", "dims"):
        embfile.convert(tmp_path / f"{name}.parquet", tmp_path / f"{name}.emb")
        assert_store(tmp_path / f"{name}.emb", data)
    df.drop(columns=["label", "dim_7"]).to_parquet(tmp_path / "gap.parquet")  # not numbered as dimensions are
    with pytest.raises(embfile.ConversionError, match="no column is the vector column"):
        embfile.convert(tmp_path / "gap.parquet", tmp_path / "x.emb")


def test_bad_tables_give_clear_errors(tmp_path):
    def write(name, **columns):
        pq.write_table(pa.table(columns), tmp_path / name, row_group_size=4)
        return tmp_path / name

    keys = [f"k{i}" for i in range(10)]
    vecs = [[1.0, 2.0]] * 10
    ragged = write("ragged.parquet", key=keys, v=vecs[:7] + [[1.0, 2.0, 3.0]] + vecs[8:])
    with pytest.raises(embfile.ConversionError, match=r"row 7 \(key 'k7'\) has a vector of 3 values, not 2"):
        embfile.convert(ragged, tmp_path / "o.emb")
    nulls = write("nulls.parquet", key=keys, v=vecs[:5] + [None] + vecs[6:])
    with pytest.raises(embfile.ConversionError, match=r"row 5 \(key 'k5'\) has a null vector"):
        embfile.convert(nulls, tmp_path / "o.emb")
    all_null = write("allnull.parquet", key=keys, v=pa.array([None] * 10, pa.list_(pa.float32())))
    with pytest.raises(embfile.ConversionError, match="holds no vectors"):
        embfile.convert(all_null, tmp_path / "o.emb")
    late = tmp_path / "late.parquet"  # the dim is found past the first read of a few rows
    pq.write_table(
        pa.table(
            {
                "key": [f"k{i}" for i in range(300)],
                "v": pa.array([None] * 299 + [[1.0, 2.0, 3.0]], pa.list_(pa.float32())),
            }
        ),
        late,
    )
    with pytest.raises(embfile.ConversionError, match=r"row 0 \(key 'k0'\) has a null vector"):
        embfile.convert(late, tmp_path / "o.emb")
    null_int = write("nullint.parquet", key=keys, v=[[1, 2]] * 9 + [[1, None]])
    with pytest.raises(embfile.ConversionError, match=r"row 9 \(key 'k9'\) has a null value"):
        embfile.convert(null_int, tmp_path / "o.emb")
    null_float = write("nullfloat.parquet", key=keys, v=vecs[:9] + [[1.0, None]])
    embfile.convert(null_float, tmp_path / "nan.emb")
    assert np.isnan(embfile.open(tmp_path / "nan.emb")["k9"][1])
    os.unlink(tmp_path / "nan.emb")
    null_key = write("nullkey.parquet", key=keys[:3] + [None] + keys[4:], v=vecs)
    with pytest.raises(embfile.ConversionError, match="row 3 has a null key"):
        embfile.convert(null_key, tmp_path / "o.emb")
    dup = write("dup.parquet", key=keys[:9] + ["k2"], v=vecs)
    with pytest.raises(embfile.WriterError, match="duplicate key 'k2'"):
        embfile.convert(dup, tmp_path / "o.emb")
    two = write("two.parquet", a=keys, b=keys, v=vecs)
    with pytest.raises(embfile.ConversionError, match=r"columns \['a', 'b'\].*key_column= \(--key-column\)"):
        embfile.convert(two, tmp_path / "o.emb")
    with pytest.raises(embfile.ConversionError, match="no column 'x'"):
        embfile.convert(two, tmp_path / "o.emb", key_column="a", vector_column="x")
    text = write("text.parquet", key=keys, v=[["a"]] * 10)
    with pytest.raises(embfile.ConversionError, match="no column is the vector column"):
        embfile.convert(text, tmp_path / "o.emb")
    assert not os.path.exists(tmp_path / "o.emb")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_empty_table(tmp_path):
    table = pa.table({"key": pa.array([], pa.string()), "v": pa.array([], pa.list_(pa.float32(), 16))})
    pq.write_table(table, tmp_path / "e.parquet")
    embfile.convert(tmp_path / "e.parquet", tmp_path / "e.emb")
    with embfile.open(tmp_path / "e.emb") as db:
        assert len(db) == 0 and db.dim == 16 and db.dtype == np.float32
    embfile.convert(tmp_path / "e.emb", tmp_path / "back.parquet")
    assert pq.read_table(tmp_path / "back.parquet").num_rows == 0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int8", "uint64"])
def test_roundtrip_parquet_emb_parquet(tmp_path, data, dtype):
    keys = list(data)
    m = np.stack(list(data.values()))
    m = m.astype(dtype) if dtype[0] == "f" else np.nan_to_num(np.abs(m) * 10, posinf=0).astype(dtype)
    values = pa.array(m.ravel())
    pq.write_table(
        pa.table({"key": keys, "vector": pa.FixedSizeListArray.from_arrays(values, 48)}), tmp_path / "a.parquet"
    )
    embfile.convert(tmp_path / "a.parquet", tmp_path / "a.emb", metadata={"model": "e5"})
    embfile.convert(tmp_path / "a.emb", tmp_path / "b.parquet", row_group_size=500)
    f = pq.ParquetFile(tmp_path / "b.parquet")
    assert f.metadata.num_row_groups == -(-len(keys) // 500)
    back = f.read()
    assert back["key"].to_pylist() == keys
    item = pa.field("item", pa.from_numpy_dtype(np.dtype(dtype)), nullable=False)
    assert back.schema.field("vector").type == pa.list_(item, 48)  # no nulls anywhere, and declared so
    assert not back.schema.field("vector").nullable and not back.schema.field("key").nullable
    got = np.stack(back["vector"].to_numpy(zero_copy_only=False))
    assert got.tobytes() == m.tobytes()
    df = pd.read_parquet(tmp_path / "b.parquet")  # pandas reads it as it is
    assert df["key"].tolist() == keys
    assert np.stack(df["vector"].to_numpy()).tobytes() == m.tobytes()
    embfile.convert(tmp_path / "b.parquet", tmp_path / "c.emb")  # and back: metadata survives
    assert embfile.open(tmp_path / "c.emb").metadata["model"] == "e5"


def test_output_read_by_hugging_face_datasets(tmp_path, data):
    datasets = pytest.importorskip("datasets")
    embfile.write(tmp_path / "a.emb", data)
    embfile.convert(tmp_path / "a.emb", tmp_path / "a.parquet")
    ds = datasets.Dataset.from_parquet(str(tmp_path / "a.parquet"), cache_dir=str(tmp_path / "cache"))
    assert ds["key"][:] == list(data)
    got = np.asarray(ds.with_format("numpy")["vector"][:])
    assert got.tobytes() == np.stack(list(data.values())).tobytes()


def test_to_arrow_shares_memory(tmp_path, data):
    embfile.write(tmp_path / "a.emb", data)
    db = embfile.open(tmp_path / "a.emb")
    t = db.to_arrow()
    assert t.schema.field("key").type == pa.large_string()
    assert not any(f.nullable for f in t.schema) and not t.schema.field("vector").type.value_field.nullable
    assert t["key"].to_pylist() == list(data)
    values = t["vector"].chunk(0).values.to_numpy()
    assert np.shares_memory(values, db.matrix) or values.ctypes.data == db.matrix.ctypes.data
    assert values.tobytes() == np.stack(list(data.values())).tobytes()
    db.close()
    assert t["key"][3].as_py() == list(data)[3]  # still valid after close, like any view


@pytest.mark.parametrize("damage", ["key offsets", "ranges", "utf-8"])
def test_to_arrow_refuses_a_damaged_keys_or_ranges_section(tmp_path, damage):
    """Arrow trusts the offsets and strings it is given: an offset going backwards inside its section
    (opening checks only the ends) would make it read outside them."""
    keys, ragged = [f"k{i}" for i in range(300)], damage == "ranges"
    records = [np.ones((2, 4), np.float32)] * 300 if ragged else np.ones((300, 4))
    path = tmp_path / "a.emb"
    embfile.write(path, dict(zip(keys, records)), **({"ragged": True} if ragged else {}))
    with embfile.open(path) as db:
        h = db.files[0].header
    at, value = {
        "key offsets": (h.keys_offset + 8 * 101, (3).to_bytes(8, "little")),
        "ranges": (h.ranges_offset + 8 * 101, (3).to_bytes(8, "little")),
        "utf-8": (h.keys_offset + 8 * 301, b"\xff"),
    }[damage]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)
    why = "Invalid UTF8 sequence at string index 0" if damage == "utf-8" else "non-monotonic offset at slot 101"
    with (
        embfile.open(path) as db,
        pytest.raises(embfile.CorruptFileError, match=f"a.emb: keys or ranges section damaged: .*{why}"),
    ):
        db.to_arrow()


@pytest.fixture
def residues():
    """Per-residue matrices of 1 to 60 rows of 16 values."""
    rng = np.random.default_rng(11)
    return {
        f"P{i:04d}": rng.standard_normal((int(n), 16)).astype(np.float32)
        for i, n in enumerate(rng.integers(1, 60, 300))
    }


def assert_ragged(path, residues, dtype=np.float32):
    with embfile.open(path) as db:
        assert db.ragged and list(db) == list(residues) and db.dtype == dtype
        for k, m in residues.items():
            np.testing.assert_array_equal(db[k], m.astype(dtype))
        db.verify()


def test_list_of_lists_from_pandas_and_pyarrow(tmp_path, residues):
    pd.DataFrame({"id": list(residues), "emb": [m.tolist() for m in residues.values()]}).to_parquet(
        tmp_path / "pandas.parquet", row_group_size=70
    )
    assert pq.read_schema(tmp_path / "pandas.parquet").field("emb").type == pa.list_(pa.list_(pa.float64()))
    embfile.convert(tmp_path / "pandas.parquet", tmp_path / "p.emb", dtype="float32")
    assert_ragged(tmp_path / "p.emb", residues)
    embfile.convert(tmp_path / "pandas.parquet", tmp_path / "mean.emb", pool="mean", dtype="float32")
    assert_store(
        tmp_path / "mean.emb", {k: m.astype(np.float64).mean(0).astype(np.float32) for k, m in residues.items()}
    )

    rows = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(list(residues.values())).ravel()), 16)
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(m) for m in residues.values()])]).astype(np.int32))
    table = pa.table({"id": list(residues), "emb": pa.ListArray.from_arrays(offsets, rows)})
    pq.write_table(table, tmp_path / "fixed.parquet", row_group_size=100)
    embfile.convert(tmp_path / "fixed.parquet", tmp_path / "f.emb")
    assert_ragged(tmp_path / "f.emb", residues)


def test_hugging_face_nested_sequences(tmp_path, residues):
    datasets = pytest.importorskip("datasets")
    some = dict(list(residues.items())[:40])
    ds = datasets.Dataset.from_dict({"id": list(some), "embedding": [m.tolist() for m in some.values()]})
    ds = ds.cast_column("embedding", datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    embfile.convert(tmp_path / "hf.parquet", tmp_path / "hf.emb")
    assert_ragged(tmp_path / "hf.emb", some)


def test_ragged_out_and_back(tmp_path, residues):
    embfile.write(tmp_path / "r.emb", residues, ragged=True, dtype="float16")
    embfile.convert(tmp_path / "r.emb", tmp_path / "r.parquet", row_group_size=1000)
    t = pq.read_table(tmp_path / "r.parquet")
    assert t.schema.field("vector").type.value_type == pa.list_(pa.field("item", pa.float16(), nullable=False), 16)
    assert pq.ParquetFile(tmp_path / "r.parquet").num_row_groups > 1
    embfile.convert(tmp_path / "r.parquet", tmp_path / "back.emb")
    assert_ragged(tmp_path / "back.emb", residues, np.float16)


def test_bad_matrices_name_the_key(tmp_path):
    def convert(emb):
        pq.write_table(pa.table({"id": ["a", "b", "c"], "emb": emb}), tmp_path / "bad.parquet")
        embfile.convert(tmp_path / "bad.parquet", tmp_path / "o.emb")

    with pytest.raises(embfile.ConversionError, match=r"row 1 \(key 'b'\) has a residue of 3 values, not 2"):
        convert([[[1.0, 2.0]], [[1.0, 2.0], [1.0, 2.0, 3.0]], [[0.0, 0.0]]])
    with pytest.raises(embfile.ConversionError, match=r"row 2 \(key 'c'\) has a matrix of no rows"):
        convert([[[1.0, 2.0]], [[1.0, 2.0]], []])
    with pytest.raises(embfile.ConversionError, match=r"row 0 \(key 'a'\) has a null matrix"):
        convert([None, [[1.0, 2.0]], [[1.0, 2.0]]])
    with pytest.raises(embfile.ConversionError, match=r"row 1 \(key 'b'\) has a null residue"):
        convert([[[1.0, 2.0]], [None], [[1.0, 2.0]]])
    assert not os.path.exists(tmp_path / "o.emb")


def test_a_folder_of_two_splits_is_refused_not_merged(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.table({"id": [f"{split}-a"], "v": [[1.0, 2.0]]}), folder / f"{split}-00000-of-00001.parquet")
    with pytest.raises(embfile.ConversionError, match="holds the splits test, train of a dataset"):
        embfile.convert(folder, tmp_path / "o.emb")
    (folder / "test-00000-of-00001.parquet").unlink()
    embfile.convert(folder, tmp_path / "o.emb")  # one split in parts is one dataset
    assert list(embfile.open(tmp_path / "o.emb")) == ["train-a"]


def test_a_delta_lake_table_converts_its_current_version(tmp_path):
    """A Delta Lake table's folder holds the Parquet files of every version: its log names the current one's
    (a deleted row's old file stays until VACUUM). Files of one table written at other times differ in their
    list items' names and string types (deltalake writes string views), and read as one."""
    deltalake = pytest.importorskip("deltalake")
    table = tmp_path / "table"
    deltalake.write_deltalake(table, pa.table({"id": ["a", "b", "c"], "emb": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}))
    deltalake.write_deltalake(table, pa.table({"id": ["d"], "emb": [[7.0, 8.0]]}), mode="append")
    deltalake.DeltaTable(table).delete("id = 'b'")  # rewrites the first file without it; the old one stays
    assert len(list(table.glob("*.parquet"))) == 3
    embfile.convert(table, tmp_path / "t.emb")
    assert_store(tmp_path / "t.emb", {"a": [1.0, 2.0], "c": [5.0, 6.0], "d": [7.0, 8.0]})
    partitioned = pa.table({"id": ["a", "b"], "emb": [[1.0], [2.0]], "part": ["x", "y"]})
    deltalake.write_deltalake(tmp_path / "parts", partitioned, partition_by=["part"])
    embfile.convert(tmp_path / "parts", tmp_path / "parts.emb")
    assert_store(tmp_path / "parts.emb", {"a": [1.0], "b": [2.0]})
    deltalake.write_deltalake(tmp_path / "dv", partitioned, configuration={"delta.enableDeletionVectors": "true"})
    with pytest.raises(embfile.ConversionError, match="dv: a Delta Lake table with deletionVectors: its Parquet"):
        embfile.convert(tmp_path / "dv", tmp_path / "dv.emb")
    for name, marker, what in (  # laid out as their tables are (not written by their tools)
        ("iceberg", "metadata/v1.metadata.json", "an Apache Iceberg table"),
        ("hudi", ".hoodie/hoodie.properties", "an Apache Hudi table"),
    ):
        (tmp_path / name / "data").mkdir(parents=True)
        pq.write_table(pa.table({"id": ["a"], "emb": [[1.0]]}), tmp_path / name / "data/0.parquet")
        (tmp_path / name / marker).parent.mkdir()
        (tmp_path / name / marker).write_text("{}")
        with pytest.raises(embfile.ConversionError, match=f"{name}: {what}; its folder holds files its current"):
            embfile.convert(tmp_path / name, tmp_path / "x.emb")


def test_arrow_ipc_feather_and_hugging_face_save_to_disk(tmp_path, data):
    import pyarrow.feather as feather

    datasets = pytest.importorskip("datasets")
    values = pa.array(np.concatenate(list(data.values())))
    table = pa.table({"id": list(data), "emb": pa.FixedSizeListArray.from_arrays(values, 48)})
    feather.write_feather(table, tmp_path / "t.feather", chunksize=300)
    with pa.OSFile(str(tmp_path / "t.arrows"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=700)
    embfile.convert(tmp_path / "t.feather", tmp_path / "f.emb")
    assert_store(tmp_path / "f.emb", data)
    embfile.convert(tmp_path / "t.arrows", tmp_path / "s.emb", src_format="arrow")
    assert_store(tmp_path / "s.emb", data)

    ds = datasets.Dataset.from_dict(
        {"text_id": list(data), "embeddings": [v.tolist() for v in data.values()]},
        features=datasets.Features(
            {"text_id": datasets.Value("string"), "embeddings": datasets.Sequence(datasets.Value("float32"))}
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"), max_shard_size="100KB")  # several .arrow files, named in state.json
    assert len([n for n in os.listdir(tmp_path / "hf") if n.endswith(".arrow")]) > 1
    embfile.convert(tmp_path / "hf", tmp_path / "hf.emb")
    assert_store(tmp_path / "hf.emb", data)
    assert list(embfile.open(tmp_path / "hf.emb")) == list(data)
    embfile.convert(ds, tmp_path / "obj.emb")  # the Dataset object itself
    assert_store(tmp_path / "obj.emb", data)
    shuffled = ds.shuffle(seed=1)
    embfile.convert(shuffled, tmp_path / "shuffled.emb")
    assert list(embfile.open(tmp_path / "shuffled.emb")) == shuffled["text_id"]
    splits = datasets.DatasetDict({"train": ds, "test": ds.select(range(3))})  # what load_dataset gives
    with pytest.raises(TypeError, match=r"a DatasetDict of the splits \['test', 'train'\]: .* e.g. ds\['train'\]"):
        embfile.convert(splits, tmp_path / "x.emb")  # was datasets' "Invalid key: slice(None, None, None)"
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(embfile.ConversionError, match=r"DatasetDict of the splits \['test', 'train'\]: convert one"):
        embfile.convert(tmp_path / "splits", tmp_path / "x.emb")  # was "no .arrow files in this folder"
    embfile.convert(tmp_path / "splits" / "train", tmp_path / "train.emb")
    assert_store(tmp_path / "train.emb", data)
    embfile.convert(ds.to_iterable_dataset(), tmp_path / "streamed.emb")  # streaming=True's: read once, in order
    assert_store(tmp_path / "streamed.emb", data)
    assert list(embfile.open(tmp_path / "streamed.emb")) == list(data)
    assert not os.path.exists(tmp_path / "x.emb")


def test_tables_in_memory_pandas_and_arrow_streams(tmp_path):
    pd = pytest.importorskip("pandas")
    data = {f"P{i:05d}": np.random.default_rng(i).random(6).astype(np.float32) for i in range(50)}
    frame = pd.DataFrame({"id": list(data), "embedding": list(data.values()), "length": range(50)})
    embfile.convert(frame, tmp_path / "a.emb")  # was "expected a path, a pyarrow.Table or a datasets.Dataset"
    assert_store(tmp_path / "a.emb", data)
    source = embfile.open(tmp_path / "a.emb").metadata["source"]  # what it was, not a path that never was
    assert source == {"format": "table", "object": "DataFrame", "key_column": "id", "vector_column": "embedding"}
    embfile.convert(frame.set_index("id")[["embedding"]], tmp_path / "b.emb")  # the ids as the index
    assert_store(tmp_path / "b.emb", data)
    table = pa.table(frame)
    stream = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(10))
    embfile.convert(stream, tmp_path / "c.emb")  # an Arrow stream (a DuckDB result, say), read once
    assert_store(tmp_path / "c.emb", data)
    twice = pa.concat_tables([table, table.slice(7, 1)])
    with pytest.raises(embfile.DuplicateKeyError, match="^the RecordBatchReader: duplicate key 'P00007'"):
        embfile.convert(pa.RecordBatchReader.from_batches(twice.schema, twice.to_batches(10)), tmp_path / "x.emb")
    keys = list(data)
    embfile.write_shards(tmp_path / "ds", {k: data[k] for k in keys[:10]})
    embfile.append(tmp_path / "ds", frame.iloc[10:].rename(columns={"id": "name"}), key_column="name")
    assert_store(tmp_path / "ds", data)
    with pytest.raises(TypeError, match=r"a table goes through embfile.convert\(table, path\)"):
        embfile.write(tmp_path / "x.emb", frame)
    column = frame.set_index("id")["embedding"]  # a Series of vectors indexed by key: a mapping
    embfile.write(tmp_path / "d.emb", column)
    assert_store(tmp_path / "d.emb", data)
    embfile.write_shards(tmp_path / "ds2", column.iloc[:10])
    embfile.append(tmp_path / "ds2", column.iloc[10:])
    assert_store(tmp_path / "ds2", data)
    with pytest.raises(TypeError, match=r"write\(\) takes a Series of vectors indexed by key \(str\); this one's"):
        embfile.write(tmp_path / "x.emb", frame["embedding"])  # numbered from 0: no keys
    with pytest.raises(TypeError, match=r"a Series of vectors indexed by key is a mapping: embfile.write"):
        embfile.convert(column, tmp_path / "x.emb")  # it said "ArrowInvalid: Cannot import schema"
    residues = pd.DataFrame({"id": ["a"], "rows": [np.ones((3, 6))]})
    with pytest.raises(embfile.ConversionError, match="a DataFrame that Arrow cannot take"):
        embfile.convert(residues, tmp_path / "x.emb")
    assert not os.path.exists(tmp_path / "x.emb")


def test_one_row_group_of_list_vectors_converts_in_flat_memory(tmp_path):
    """A list-typed Parquet file written as a single row group (pandas' default for small frames, and what
    some tools write at any size) is read a buffer at a time: the converter's peak memory (VmHWM of its own
    process) is the same for a file four times larger."""
    import subprocess
    import sys

    script = (
        "import sys, embfile; embfile.convert(sys.argv[1], sys.argv[2]); "
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    )
    peaks = []
    for n in (6000, 24000):  # 48 and 196 MB of float32 vectors, few keys: any growth would be the data's
        rng = np.random.default_rng(n)
        values = pa.array(rng.standard_normal(n * 2048).astype(np.float32))
        offsets = pa.array(np.arange(0, (n + 1) * 2048, 2048, dtype=np.int32))
        table = pa.table({"id": [f"k{i}" for i in range(n)], "v": pa.ListArray.from_arrays(offsets, values)})
        pq.write_table(table, tmp_path / f"{n}.parquet", row_group_size=n)
        assert pq.ParquetFile(tmp_path / f"{n}.parquet").num_row_groups == 1
        del table, values
        out = subprocess.run(
            [sys.executable, "-c", script, tmp_path / f"{n}.parquet", tmp_path / f"{n}.emb"],
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(int(out.stdout.split()[-1]) / 1024)
    assert peaks[1] < peaks[0] + 40, f"peak MB {peaks[0]:.0f} for 48 MB of vectors, {peaks[1]:.0f} for 196 MB"


def test_on_error_skip_skips_bad_rows_and_reports_them(tmp_path):
    table = pa.table(
        {
            "id": ["a", "b", None, "d", "e", "f"],
            "v": [[1.0, 2.0], None, [3.0, 4.0], [5.0], [6.0, 7.0], [8.0, None]],  # a null float reads as NaN
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(embfile.ConversionError, match=r"row 1 \(key 'b'\) has a null vector"):
        embfile.convert(tmp_path / "t.parquet", tmp_path / "o.emb")
    assert not os.path.exists(tmp_path / "o.emb")
    embfile.convert(tmp_path / "t.parquet", tmp_path / "o.emb", on_error="skip")
    with embfile.open(tmp_path / "o.emb") as db:
        assert list(db) == ["a", "e", "f"] and np.isnan(db["f"][1])
    with open(tmp_path / "o.emb.skipped.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert [(s["key"], s["where"].split(": ")[-1]) for s in skipped] == [
        ("b", "row 1"),
        (None, "row 2"),
        ("d", "row 3"),
    ]
    assert "has a vector of 1 values, not 2" in skipped[2]["error"]
    from test_cli import cli

    p = cli(
        "convert", tmp_path / "t.parquet", tmp_path / "c.emb", "--on-error", "skip", "--report", tmp_path / "r.jsonl"
    )
    assert "skipped 3 records, listed in" in p.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3
