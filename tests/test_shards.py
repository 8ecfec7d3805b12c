"""Sharded datasets: writing, the index, one Mapping over many files, and what is refused."""

import multiprocessing
import os
import pickle

import numpy as np
import pytest

import embfile
from embfile.shards import INDEX_NAME


@pytest.fixture
def data():
    rng = np.random.default_rng(2)
    keys = [f"UniRef50_{i:06d}" for i in range(2000)]
    rng.shuffle(keys)  # shards are not key ranges: every shard spans the whole key space
    return keys, rng.random((2000, 5)).astype(np.float32)


@pytest.fixture
def folder(tmp_path, data):
    path = tmp_path / "ds"
    embfile.write_shards(path, data, shard_bytes=300 * 20, metadata={"model": "prot_t5"})
    return path


@pytest.fixture
def legacy(tmp_path, data):
    """A folder in 0.1's layout: part-*.emb files and _index.emb."""
    keys, matrix = data
    path = tmp_path / "legacy"
    path.mkdir()
    for i, lo in enumerate(range(0, 2000, 300)):
        embfile.write(path / f"part-{i:05d}.emb", (keys[lo : lo + 300], matrix[lo : lo + 300]))
    embfile.write_index(path)
    return path


def test_write_shards_splits_by_size_and_indexes(folder, data):
    keys, matrix = data
    assert sorted(os.listdir(folder)) == ["_embfile", "shards"]
    with embfile.open(folder) as db:
        assert db.version == 1 and db.manifest.operation == {"name": "write", "records": 2000}
        assert [f.count for f in db.files] == [300] * 6 + [200]
        assert all(f.metadata["model"] == "prot_t5" for f in db.files)
        assert sorted(os.listdir(folder / "shards")) == sorted(os.path.basename(f.path) for f in db.files)
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".")]


def test_a_folder_in_the_0_1_layout_still_opens(legacy, data):
    keys, matrix = data
    with embfile.open(legacy) as db:
        assert db.version is None and len(db.files) == 7 and list(db) == keys
        np.testing.assert_array_equal(db.get_batch(keys[::-7]), matrix[::-7])
        db.verify()


def test_one_mapping_over_all_shards(folder, data):
    keys, matrix = data
    with embfile.open(folder) as db:
        assert isinstance(db, embfile.ShardedEmbFile) and len(db.shards) == 7
        assert len(db) == 2000 and db.dim == 5 and db.dtype == np.float32
        assert list(db) == keys  # dataset row order: shard 0's rows first
        for i in (0, 299, 300, 1999):
            np.testing.assert_array_equal(db[keys[i]], matrix[i])
            assert db.row(keys[i]) == i and db.key(i) == keys[i]
            np.testing.assert_array_equal(db.record(i), matrix[i])
        assert "nope" not in db and db.get("nope") is None
        with pytest.raises(KeyError, match="nope"):
            db["nope"]
        pick = [keys[i] for i in (1999, 0, 650, 300, 299)]
        np.testing.assert_array_equal(db.get_batch(pick), matrix[[1999, 0, 650, 300, 299]])
        np.testing.assert_array_equal(db.rows(pick), [1999, 0, 650, 300, 299])
        np.testing.assert_array_equal(db.take([5, 1500]), matrix[[5, 1500]])
        np.testing.assert_array_equal(db.to_numpy(), matrix)
        seen = []
        for k, m in db.iter_batches(128, seed=1, block_size=50):
            np.testing.assert_array_equal(m, matrix[db.rows(k)])
            seen += k
        assert sorted(seen) == sorted(keys)
        first_blocks = {db.row(k) // 300 for k in seen[:128]}
        assert len(first_blocks) > 3  # a batch mixes records of several shards
        db.verify()


def test_a_list_of_files_without_an_index(folder, data):
    keys, matrix = data
    with embfile.open(folder) as db:
        paths = [f.path for f in db.files][::-1]
    with embfile.open(paths) as db:
        assert len(db) == 2000
        np.testing.assert_array_equal(db.get_batch(keys[:10]), matrix[:10])
        assert db.key(0) == keys[1800]  # the list's order, not the names'


def test_an_engine_read_plans_parts_of_one_file_each_and_opens_them_alone(folder, data, tmp_path):
    from embfile.shards import open_part

    keys, matrix = data
    with embfile.open(folder) as db:
        parts = db.read_parts(100, runs=[(250, 420), (1990, 2000)])
        order = db.keys_between(0, 2000)
    assert [(p.lo, p.hi) for p in parts] == [(250, 300), (0, 100), (100, 120), (190, 200)]  # files of 300 records
    for p, (lo, hi) in zip(parts, [(250, 300), (300, 400), (400, 420), (1990, 2000)]):
        with open_part(p) as one:
            assert len(one.files) == 1 and one.keys_between(p.lo, p.hi) == order[lo:hi]
            np.testing.assert_array_equal(
                one.take(np.arange(p.lo, p.hi)), matrix[[keys.index(k) for k in order[lo:hi]]]
            )
    with embfile.open(folder) as db:
        assert [(p.lo, p.hi) for p in db.read_parts(100, runs=[])] == [(0, 0)]  # no records: one empty task
    os.replace(parts[1].path, tmp_path / "moved.emb")
    embfile.write(parts[1].path, (["other"], matrix[:1]))  # a file replaced under its name
    with pytest.raises(embfile.ShardError, match=r"is not the file the read was planned with \(1 records"):
        open_part(parts[1])


def test_a_key_in_two_shards_is_refused_naming_both(tmp_path):
    embfile.write(tmp_path / "a.emb", (["x", "dup"], np.zeros((2, 3))))
    embfile.write(tmp_path / "b.emb", (["y", "z", "dup"], np.ones((3, 3))))
    with pytest.raises(embfile.ShardError, match=r"'dup' is in two shards: .*a.emb \(row 1\) and .*b.emb \(row 2\)"):
        embfile.open(tmp_path)
    with pytest.raises(embfile.ShardError, match="'dup'"):
        embfile.write_index(tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()


def test_shards_that_do_not_fit_together(tmp_path):
    embfile.write(tmp_path / "a.emb", (["x"], np.zeros((1, 3), np.float32)))
    embfile.write(tmp_path / "b.emb", (["y"], np.zeros((1, 4), np.float32)))
    with pytest.raises(embfile.ShardError, match="b.emb has dim 4 and dtype float32, .*a.emb dim 3"):
        embfile.open(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(embfile.ShardError, match="no .emb shards"):
        embfile.open(tmp_path / "empty")


def test_a_stale_index_is_refused_until_rebuilt(legacy, data):
    embfile.write(legacy / "part-00007.emb", (["extra"], np.ones((1, 5), np.float32)))
    with pytest.raises(embfile.ShardError, match="does not describe the shards.*write_index"):
        embfile.open(legacy)
    embfile.write_index(legacy)
    with embfile.open(legacy) as db:
        assert len(db) == 2001 and db["extra"][0] == 1
    embfile.write(legacy / "part-00007.emb", (["other"], np.ones((1, 5), np.float32)))  # same size
    with pytest.raises(embfile.ShardError, match="does not describe"):
        embfile.open(legacy)


def test_shard_writer_publishes_the_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        with embfile.ShardWriter(target, 3, shard_bytes=24) as w:
            w.add_batch(["a", "b", "c"], np.zeros((3, 3)))
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(embfile.ShardError, match="'a' is in two shards"):
        with embfile.ShardWriter(target, 3, shard_bytes=24) as w:
            w.add_batch(["a", "b", "c"], np.zeros((3, 3)))
            w.add("a", np.ones(3))
    assert os.listdir(tmp_path) == []
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(embfile.WriterError, match="not an empty folder"):
        embfile.ShardWriter(target, 3)
    assert os.listdir(target) == ["keep.txt"] and len(os.listdir(tmp_path)) == 1


def test_an_emb_file_streams_into_shards(tmp_path, data):
    keys, matrix = data
    embfile.write(tmp_path / "big.emb", data)
    with embfile.open(tmp_path / "big.emb") as src:
        embfile.write_shards(tmp_path / "ds", src, shard_bytes=4096)
    with embfile.open(tmp_path / "ds") as db:
        assert len(db.shards) == 10 and list(db) == keys
        np.testing.assert_array_equal(db.take(np.arange(2000)), matrix)


def _sum_of(db, keys):
    return float(db.get_batch(keys).sum())


def test_pickles_into_worker_processes(folder, data):
    keys, matrix = data
    db = embfile.open(folder)
    assert pickle.loads(pickle.dumps(db))[keys[7]].tolist() == matrix[7].tolist()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.starmap(_sum_of, [(db, keys[i : i + 500]) for i in range(0, 2000, 500)])
    np.testing.assert_allclose(got, [matrix[i : i + 500].sum() for i in range(0, 2000, 500)], rtol=1e-5)
    db.close()
    with pytest.raises(embfile.ClosedFileError):
        db["x"]
