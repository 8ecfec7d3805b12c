"""Dask reads and writes embfile datasets, on a real LocalCluster of 2 worker processes (tests/conftest.py):
round trips from DataFrames, Bags and Arrays, graphs that hold paths, and a worker killed mid-write."""

import collections
import os
import pickle
import signal

import numpy as np
import pytest

import embfile
from embfile import folder as layout

dd = pytest.importorskip("dask.dataframe")
da = pytest.importorskip("dask.array")
dbag = pytest.importorskip("dask.bag")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
import dask  # noqa: E402

import embfile.dask  # noqa: E402


def data(n, lo=0, dim=6, dtype=np.float32):
    ids = np.arange(lo, lo + n)
    return [f"k{i}" for i in ids], (ids[:, None] / np.arange(1, dim + 1)).astype(dtype)


def stray_files(path):
    named = set().union(*(m.files() for m in layout.history(path)))
    return {f"shards/{n}" for n in os.listdir(path / "shards")} - named


def test_dataframe_to_embfile_to_dataframe(dask_client, tmp_path):
    keys, matrix = data(2000)
    emb = pd.Series(list(matrix), dtype=pd.ArrowDtype(pa.list_(pa.float32())))  # as read from Parquet
    pdf = pd.DataFrame({"id": keys, "emb": emb})
    version = embfile.dask.to_embfile(dd.from_pandas(pdf, npartitions=5), tmp_path / "ds", key="id", vector="emb")
    with embfile.open(tmp_path / "ds") as db:  # written by Dask, read by embfile
        assert (version, db.version, len(db), db.dtype) == (1, 1, 2000, np.float32)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    back = embfile.dask.read_embfile(tmp_path / "ds", rows_per_partition=300)
    assert back.npartitions >= 7
    out = back.compute()
    assert out["key"].tolist() == keys  # row order: the partitions' order
    np.testing.assert_array_equal(np.stack(out["vector"].to_numpy()), matrix)
    assert str(out["vector"].dtype).startswith("fixed_size_list<item: float>[6]")
    assert stray_files(tmp_path / "ds") == set()


def test_bag_and_array_and_wide_columns(dask_client, tmp_path):
    keys, matrix = data(500, dtype=np.float64)
    bag = dbag.from_sequence(list(zip(keys, matrix)), npartitions=4)
    embfile.dask.to_embfile(bag, tmp_path / "bag", dtype="float16")
    with embfile.open(tmp_path / "bag") as db:
        assert db.dtype == np.float16
        np.testing.assert_array_equal(db.get_batch(keys), matrix.astype(np.float16))
    embfile.dask.to_embfile(bag, tmp_path / "bf16", dtype="bfloat16")  # a name the workers resolve themselves
    with embfile.open(tmp_path / "bf16") as db:
        assert db.dtype.name == "bfloat16"
        np.testing.assert_array_equal(db.get_batch(keys), matrix.astype(db.dtype))
    x = da.from_array(matrix, chunks=(120, 6))
    embfile.dask.to_embfile(x, tmp_path / "arr", key=keys)
    embfile.dask.to_embfile(
        x[:100], tmp_path / "arr", key=da.from_array(np.array(keys[:100]), chunks=50), mode="overwrite"
    )
    with embfile.open(tmp_path / "arr") as db, embfile.open(tmp_path / "arr", version=1) as v1:
        assert db.dtype == np.float64 and len(db) == 100 and len(v1) == 500
        np.testing.assert_array_equal(v1.get_batch(keys), matrix)
    wide = dd.from_pandas(pd.DataFrame({"id": keys, **{f"d{j}": matrix[:, j] for j in range(6)}}), npartitions=3)
    embfile.dask.to_embfile(wide, tmp_path / "wide", key="id", vector=[f"d{j}" for j in range(6)], dtype="float64")
    with embfile.open(tmp_path / "wide") as db:
        np.testing.assert_array_equal(db.get_batch(keys), matrix)


def test_append_replace_and_a_failed_job(dask_client, tmp_path):
    keys, matrix = data(300)
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=50 * 6 * 4)
    more_keys, more = data(100, lo=250)  # 50 of them already there
    vectors = pd.Series(list(more + 1000), dtype=pd.ArrowDtype(pa.list_(pa.float32())))
    frame = dd.from_pandas(pd.DataFrame({"key": more_keys, "vector": vectors}), npartitions=2)
    with pytest.raises(embfile.DuplicateKeyError, match="'k250' is already in the dataset"):
        embfile.dask.to_embfile(frame, tmp_path / "ds", mode="append")
    assert layout.latest_version(tmp_path / "ds") == 1 and stray_files(tmp_path / "ds") == set()
    assert embfile.dask.to_embfile(frame, tmp_path / "ds", mode="append", on_duplicate="replace") == 2
    with embfile.open(tmp_path / "ds") as db:
        assert len(db) == 350 and db["k260"][0] == 1260 and db["k10"][0] == 10

    def fails(part):
        raise RuntimeError("injected")

    bad = dbag.from_sequence(list(zip(keys, matrix)), npartitions=3).map_partitions(fails)
    with pytest.raises(RuntimeError, match="injected"):
        embfile.dask.to_embfile(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing committed, nothing left


def test_an_incremental_read_gives_the_records_changed_since_a_version(dask_client, tmp_path):
    keys, matrix = data(300)
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=50 * 6 * 4)  # version 1
    embfile.append(tmp_path / "ds", data(100, lo=300), shard_bytes=50 * 6 * 4)  # 2
    embfile.append(tmp_path / "ds", (keys[10:20], matrix[10:20] + 1), on_duplicate="replace")  # 3
    embfile.compact(tmp_path / "ds")  # 4: the same records, in new shards
    frame = embfile.dask.read_embfile(tmp_path / "ds", since=1, rows_per_partition=30).compute()
    assert sorted(frame["key"]) == sorted(keys[10:20] + data(100, lo=300)[0])
    vectors = {k: np.asarray(v) for k, v in zip(frame["key"], frame["vector"])}
    assert vectors["k15"][0] == 16 and vectors["k350"][0] == 350
    assert len(embfile.dask.read_embfile(tmp_path / "ds", since=3).compute()) == 0  # compaction changes nothing
    assert embfile.dask.read_embfile(tmp_path / "ds", version=2, since=1, rows_per_partition=30).npartitions == 4


def _killed_on_first_attempt(marker):
    """A partition function that writes some records, then kills its own worker, the first time it runs."""

    def pairs(part):
        for i, item in enumerate(part):
            yield item
            if i == 700 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    return pairs


def test_a_worker_killed_mid_write_leaves_every_key_once(dask_client, tmp_path):
    keys, matrix = data(4000)
    bag = dbag.from_sequence(list(zip(keys, matrix)), npartitions=2)
    killing = bag.map_partitions(_killed_on_first_attempt(str(tmp_path / "killed")))
    embfile.dask.to_embfile(killing, tmp_path / "ds", shard_bytes=200 * 6 * 4)  # shards of 200 records
    assert (tmp_path / "killed").exists()  # a worker did die mid-write
    with embfile.open(tmp_path / "ds") as db:
        assert len(db) == 4000 and sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    assert stray_files(tmp_path / "ds") == set()


def test_dask_array_graph_holds_paths_not_data(dask_client, tmp_path):
    keys, matrix = data(3000, dim=16)
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=1000 * 16 * 4)
    with embfile.open(tmp_path / "ds") as db:
        x = db.to_dask_array()
        assert x.shape == (3000, 16) and x.chunks[0] == (1000, 1000, 1000)
        assert len(pickle.dumps(dict(x.__dask_graph__()))) < 20_000  # 192 KB of vectors are not in it
        assert dask.base.tokenize(x) == dask.base.tokenize(embfile.open(tmp_path / "ds").to_dask_array())
        np.testing.assert_array_equal(x.compute(), matrix)
        np.testing.assert_allclose(x.mean(axis=0).compute(), matrix.mean(axis=0), rtol=1e-6)


class _RaisingOnFirstPass:
    """A partition read afresh by each attempt, whose first reading fails after 300 records."""

    def __init__(self, items, marker):
        self.items, self.marker = items, marker

    def __iter__(self):
        for i, item in enumerate(self.items):
            yield item
            if i == 300 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                raise RuntimeError("injected: the first attempt fails")


def test_a_task_raising_on_its_first_attempt_is_retried(dask_client, tmp_path):
    keys, matrix = data(1000)
    bag = dbag.from_sequence(list(zip(keys, matrix)), npartitions=2)
    failing = bag.map_partitions(_RaisingOnFirstPass, str(tmp_path / "raised"))
    embfile.dask.to_embfile(failing, tmp_path / "ds", shard_bytes=100 * 6 * 4, retries=1)
    assert (tmp_path / "raised").exists()
    with embfile.open(tmp_path / "ds") as db:
        assert len(db) == 1000 and sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    assert stray_files(tmp_path / "ds") == set()


def test_an_array_is_written_by_a_fresh_process_that_imported_nothing_else(tmp_path):
    """embfile.dask imports what it uses itself (dask.bag was once used without its import)."""
    import subprocess
    import sys

    code = (
        "import numpy as np, dask.array as da, embfile, embfile.dask, sys\n"
        "x = da.from_array(np.ones((10, 3), np.float32), chunks=5)\n"
        "embfile.dask.to_embfile(x, sys.argv[1], key=[f'k{i}' for i in range(10)])\n"
        "print(len(embfile.open(sys.argv[1])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ds")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "10", out.stderr


def test_a_read_task_builds_arrow_from_its_own_file_alone(damaged_second_shard):
    """A partition's task makes Arrow of the file holding its rows, not of the whole dataset (each file's keys
    are checked as Arrow is made of them: a task per file checking every file cost the number of files squared):
    a damaged shard fails the task reading it, naming it, and no other."""
    path, damaged, keys, matrix = damaged_second_shard
    df = embfile.dask.read_embfile(path)
    assert df.npartitions == 4
    first, *_ = dask.compute(df.partitions[0], scheduler="sync")
    assert list(first["key"]) == keys[:300]
    np.testing.assert_array_equal(np.stack(first["vector"].to_numpy()), matrix[:300])
    with pytest.raises(embfile.CorruptFileError, match=f"{damaged}: keys or ranges section damaged"):
        dask.compute(df.partitions[1], scheduler="sync")


def residues(n, lo=0, dim=4, seed=0):
    """Per-residue records: key i holds 1 to 40 rows."""
    rng = np.random.default_rng(seed)
    return {f"r{i}": rng.random((int(rng.integers(1, 41)), dim)).astype(np.float32) for i in range(lo, lo + n)}


def test_per_residue_records_round_trip_and_survive_a_killed_worker(dask_client, tmp_path):
    records = residues(600)
    keys = list(records)
    rows = pd.Series(  # as read from Parquet: list<list<float>>
        [[list(map(float, v)) for v in r] for r in records.values()],
        dtype=pd.ArrowDtype(pa.list_(pa.list_(pa.float32()))),
    )
    frame = dd.from_pandas(pd.DataFrame({"id": keys, "res": rows}), npartitions=3)
    embfile.dask.to_embfile(frame, tmp_path / "ds", key="id", vector="res", ragged=True, shard_bytes=300 * 4 * 4)
    with embfile.open(tmp_path / "ds") as db:
        assert db.ragged and len(db) == 600 and len(db.files) > 6
        for shard in db.files:  # at most 300 rows, or one longer record: never a record split
            lengths = np.diff(shard.ranges().astype(np.int64))
            assert 0 < lengths.sum() <= 300 or len(lengths) == 1
        assert all(np.array_equal(db[k], records[k]) for k in keys)
    back = embfile.dask.read_embfile(tmp_path / "ds", rows_per_partition=500)
    assert back.npartitions >= 20
    out = back.compute()
    assert out["key"].tolist() == keys
    assert all(np.array_equal(np.stack(v), records[k]) for k, v in zip(keys, out["vector"]))

    more = residues(3000, lo=600, seed=1)  # a Bag of (key, matrix) pairs, a worker killed mid-write
    bag = dbag.from_sequence(list(more.items()), npartitions=2)
    killing = bag.map_partitions(_killed_on_first_attempt(str(tmp_path / "killed")))
    embfile.dask.to_embfile(killing, tmp_path / "ds", mode="append", ragged=True, shard_bytes=4000 * 4 * 4)
    assert (tmp_path / "killed").exists()
    with embfile.open(tmp_path / "ds") as db:
        assert len(db) == 3600 and sorted(db) == sorted([*keys, *more])
        assert all(np.array_equal(db[k], more[k]) for k in more)
    assert stray_files(tmp_path / "ds") == set()

    objects = pd.DataFrame({"key": ["a", "b"], "vector": [np.ones((2, 4)), [[0.0] * 4] * 3]})  # arrays, lists
    with dask.config.set({"dataframe.convert-string": False}):  # else Dask makes strings of them
        embfile.dask.to_embfile(dd.from_pandas(objects, npartitions=1), tmp_path / "obj", ragged=True)
    with embfile.open(tmp_path / "obj") as db:
        assert db["a"].shape == (2, 4) and db["b"].shape == (3, 4) and db.dtype == np.float32


def test_per_residue_mistakes_are_one_line_and_write_nothing(dask_client, tmp_path):
    fixed_keys, matrix = data(10, dim=4)
    embfile.write_shards(tmp_path / "fixed", (fixed_keys, matrix))
    pairs = dbag.from_sequence(list(residues(20).items()), npartitions=2)
    with pytest.raises(embfile.WriterError, match="holds one row per record; ragged=True does not fit it"):
        embfile.dask.to_embfile(pairs, tmp_path / "fixed", mode="append", ragged=True)
    wrong = [("a", np.ones((2, 4))), ("b", np.ones((2, 5)))]
    empty = [("a", np.ones((2, 4))), ("b", np.ones((0, 4)))]
    for bad, says in ((wrong, r"key 'b': record has shape \(2, 5\)"), (empty, "key 'b': record has no rows")):
        with pytest.raises(embfile.WriterError, match=says):
            embfile.dask.to_embfile(dbag.from_sequence(bad, npartitions=1), tmp_path / "new", ragged=True)
        assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="an array holds one vector per row"):
        embfile.dask.to_embfile(da.ones((4, 4)), tmp_path / "new", key=list("abcd"), ragged=True)
    arrays = pd.DataFrame({"key": ["a", "b"], "vector": [np.ones(4), np.zeros(4)]})  # Dask makes text of them
    for ragged in (False, True):
        with pytest.raises(ValueError, match="column 'vector' holds text, not vectors.*convert-string"):
            embfile.dask.to_embfile(dd.from_pandas(arrays, npartitions=1), tmp_path / "new", ragged=ragged)
    assert not (tmp_path / "new").exists()


def test_mistakes_of_one_vector_per_key_are_one_line_and_write_nothing(dask_client, tmp_path):
    """A column not in the DataFrame is named with the columns there are; a vector of another length than the
    first, in a column of arrays or a Bag of pairs, is a WriterError naming its key; nothing is left."""
    keys, matrix = data(20, dim=4)
    frame = pd.DataFrame({"id": keys, "emb": list(matrix)})
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(frame, npartitions=2)
        with pytest.raises(ValueError, match="no column 'idx' in the DataFrame; its columns: id, emb"):
            embfile.dask.to_embfile(ddf, tmp_path / "new", key="idx", vector="emb")
        frame.at[13, "emb"] = np.ones(5, np.float32)
        short = dd.from_pandas(frame, npartitions=2)
        with pytest.raises(embfile.WriterError, match=rf"key '{keys[13]}': vector has shape \(5,\), expected \(4,\)"):
            embfile.dask.to_embfile(short, tmp_path / "new", key="id", vector="emb")
    pairs = dbag.from_sequence([*zip(keys, matrix), ("odd", np.ones(3))], npartitions=1)
    with pytest.raises(embfile.WriterError, match=r"key 'odd': vector has shape \(3,\), expected \(4,\)"):
        embfile.dask.to_embfile(pairs, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_integer_ids_the_index_as_key_and_keys_twice(dask_client, tmp_path):
    """Integer ids (a NumPy or an Arrow column, as the Parquet reader takes them) are stored as their decimal text,
    and ids kept as the index are taken by name; they were "embfile keys are str, not int" and "no column". A key
    twice names its partitions and rows there (it said "rows 0 and 1", of no one file the user has)."""
    _, matrix = data(40, dim=4)
    emb = pd.Series(list(matrix), dtype=pd.ArrowDtype(pa.list_(pa.float32())))
    frames = {
        "numpy": pd.DataFrame({"id": np.arange(40), "emb": emb}),
        "arrow": pd.DataFrame({"id": pd.Series(np.arange(40), dtype=pd.ArrowDtype(pa.int64())), "emb": emb}),
        "index": pd.DataFrame({"emb": emb.set_axis(pd.Index([f"p{i}" for i in range(40)], name="id"))}),
    }
    for name, frame in frames.items():
        embfile.dask.to_embfile(dd.from_pandas(frame, npartitions=3), tmp_path / name, key="id", vector="emb")
        with embfile.open(tmp_path / name) as db:
            keys = [f"p{i}" for i in range(40)] if name == "index" else [str(i) for i in range(40)]
            np.testing.assert_array_equal(db.get_batch(keys), matrix)
    twice = pd.DataFrame({"id": [f"k{i}" for i in (0, 1, 2, 3, 1)], "emb": list(np.ones((5, 4), np.float32))})
    with dask.config.set({"dataframe.convert-string": False}):
        across = dd.from_pandas(twice, npartitions=2, sort=False)
        within = dd.from_pandas(twice.iloc[1:], npartitions=1)
        with pytest.raises(embfile.ShardError, match=r"key 'k1' is in two partitions: 0 \(row 1\) and 1 \(row 1\)"):
            embfile.dask.to_embfile(across, tmp_path / "twice", key="id", vector="emb")
        with pytest.raises(embfile.DuplicateKeyError, match=r"key 'k1' is twice in partition 0 \(rows 0 and 3\)"):
            embfile.dask.to_embfile(within, tmp_path / "twice", key="id", vector="emb")
    assert not (tmp_path / "twice").exists()


def test_a_dataset_at_an_s3_url_written_and_read_by_the_workers(dask_client, s3, tmp_path, monkeypatch):
    """Tasks upload their shards and a killed worker's leave no object; a read task fetches its rows of its
    shard, and the driver plans a per-residue read from the files' ranges sections alone."""
    from embfile.remote.dataset import read_manifest

    monkeypatch.setenv("EMBFILE_CACHE", str(tmp_path / "driver-cache"))
    opts, url, fs = s3.storage_options(), "s3://embs/dask", s3.filesystem()
    keys, matrix = data(6000, dim=256)
    x = da.from_array(matrix, chunks=(2000, 256))
    version = embfile.dask.to_embfile(x[:2000], url, key=keys[:2000], shard_bytes=400 << 10, storage_options=opts)
    bag = dbag.from_sequence(list(zip(keys[2000:], matrix[2000:])), npartitions=2)
    killing = bag.map_partitions(_killed_on_first_attempt(str(tmp_path / "killed")))
    appended = embfile.dask.to_embfile(killing, url, mode="append", shard_bytes=400 << 10, storage_options=opts)
    assert (version, appended) == (1, 2) and (tmp_path / "killed").exists()  # a worker did die mid-write
    with embfile.open(url, storage_options=opts) as db:
        remote = embfile.remote.store.Remote(url, opts)
        manifests = [read_manifest(remote, v) for v in (1, 2)]
        assert len(db) == 6000 and sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    shards = {f"shards/{p.rsplit('/', 1)[-1]}" for p in fs.ls("embs/dask/shards", refresh=True)}
    assert shards == {s.path for m in manifests for s in m.shards}  # nothing of the killed attempt is left

    with embfile.open(url, storage_options=opts) as db:
        expected_keys, expected = db.keys_between(0, 6000), db.to_numpy()
    big = "s3://embs/dask-big"  # shards of 4 MiB, partitions of 500 KiB: a task reads a quarter of a shard
    embfile.write_shards(big, (expected_keys, expected), shard_bytes=4 << 20, storage_options=opts)
    planned = embfile.dask.read_embfile(big, rows_per_partition=500, storage_options=opts)
    since = len(s3.gets())
    one = planned.partitions[1].compute()
    assert one["key"].tolist() == expected_keys[500:1000]
    np.testing.assert_array_equal(np.stack(one["vector"].to_numpy()), expected[500:1000])
    read = fetched(s3, since, "/embs/dask-big/shards/")
    with embfile.open(big, storage_options=opts) as db:
        first = f"/embs/dask-big/{db.manifest.shards[0].path}"
    assert list(read) == [first]  # its own file alone: no other file's header or index
    assert 500 * 1024 < read[first] < fs.size(first.lstrip("/")) / 2  # the checksum block of its rows, its keys
    with embfile.open(big, storage_options=opts) as db:
        since = len(s3.gets())
        x = db.to_dask_array()  # planned from what opening read: no record downloaded
        assert len(x.chunks[0]) == 2 and fetched(s3, since, "/embs/dask-big/").total() == 0
        np.testing.assert_array_equal(x[:1000].compute(), expected[:1000])  # its chunk's file alone
        assert list(fetched(s3, since, "/embs/dask-big/")) == [first]
        np.testing.assert_array_equal(x.compute(), expected)
    back = embfile.dask.read_embfile(url, rows_per_partition=1000, storage_options=opts)
    out = back.compute()
    assert out["key"].tolist() == expected_keys
    np.testing.assert_array_equal(np.stack(out["vector"].to_numpy()), expected)

    records = residues(400, dim=64)
    pairs = dbag.from_sequence(list(records.items()), npartitions=2)
    embfile.dask.to_embfile(pairs, "s3://embs/dask-ragged", ragged=True, shard_bytes=800 * 64 * 4, storage_options=opts)
    since = len(s3.gets())
    back = embfile.dask.read_embfile("s3://embs/dask-ragged", rows_per_partition=500, storage_options=opts)
    stored = sum(fs.size(p) for p in fs.ls("embs/dask-ragged/shards", refresh=True))
    assert back.npartitions >= 8 and fetched(s3, since, "/embs/dask-ragged/shards/").total() < stored / 4
    out = back.compute()
    assert sorted(out["key"]) == sorted(records)
    assert all(np.array_equal(np.stack(v), records[k]) for k, v in zip(out["key"], out["vector"]))


def test_a_read_task_at_a_url_checks_what_it_fetches(s3, tmp_path, monkeypatch):
    """A task reads its rows by range requests: the checksum blocks holding them, each checked."""
    monkeypatch.setenv("EMBFILE_CACHE", str(tmp_path / "cache"))
    opts, fs, url = s3.storage_options(), s3.filesystem(), "s3://embs/dask-damaged"
    keys, matrix = data(3000, dim=256)  # 1 KiB records: 1,024 to a checksum block
    embfile.write_shards(url, (keys, matrix), shard_bytes=4 << 20, storage_options=opts)
    with embfile.open(url, storage_options=opts) as db:
        path, records_offset = f"embs/dask-damaged/{db.manifest.shards[0].path}", db.files[0].header.records_offset
    raw = bytearray(fs.cat_file(path))
    raw[records_offset + 1500 * 1024 + 7] ^= 1  # row 1500, in block 1
    fs.pipe_file(path, bytes(raw))
    frame = embfile.dask.read_embfile(url, rows_per_partition=500, storage_options=opts)
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(np.stack(frame.partitions[0].compute()["vector"].to_numpy()), matrix[:500])
        with pytest.raises(embfile.ChecksumError, match=r"dask-damaged/shards/.*: records block 1 does not match"):
            frame.partitions[3].compute()  # rows 1500-1999


def fetched(s3, since, prefix):
    """Bytes the S3 server has sent of each object under ``prefix`` since request ``since``."""
    sizes = collections.Counter()
    for _, path, rng in s3.gets()[since:]:
        if path.startswith(prefix):
            assert rng, f"{path} was read whole, without a range"
            a, b = rng[len("bytes=") :].split("-")
            sizes[path] += int(b) - int(a) + 1
    return sizes
