"""Datasets that grow: append, remove, compact, merge, subset and vacuum against a dict oracle, DatasetWriter,
and appenders in real processes racing to commit."""

import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import embfile
from embfile import folder as layout
from embfile import segments

DIM = 3
KEYS = st.sampled_from([f"k{i:03d}" for i in range(60)])


def vectors(keys, seed):
    return np.random.default_rng(seed).standard_normal((len(keys), DIM)).astype(np.float32)


def assert_holds(db, truth):
    """``db`` is ``truth`` (a dict key -> vector), read every way, and its files check out."""
    assert len(db) == len(truth) and set(db) == set(truth)
    if truth:
        keys = sorted(truth)
        np.testing.assert_array_equal(db.get_batch(keys), np.stack([truth[k] for k in keys]))
        np.testing.assert_array_equal(db.to_numpy(), np.stack([truth[k] for k in db]))
    assert "absent" not in db and db.find_rows(["absent"]).tolist() == [-1]
    db.verify()


def no_leftovers(folder):
    """Every file in the folder is named by a version, and no operation's staging is left."""
    named = set().union(*(m.files() for m in layout.history(folder)))
    present = {f"{sub}/{n}" for sub in (layout.SHARDS, layout.INDEX) for n in os.listdir(folder / sub)}
    assert present == named, present ^ named
    assert os.listdir(folder / layout.STAGING) == []


class Growing(RuleBasedStateMachine):
    """Random sequences of operations on one dataset; after each, every version reopened and compared with
    the dict it was at that version."""

    def __init__(self):
        super().__init__()
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="embfile-grow-"))
        self.path = self.tmp / "ds"
        self.versions = {}  # version -> the dict it holds
        self.seed = 0

    def teardown(self):
        shutil.rmtree(self.tmp)

    @property
    def truth(self):
        return self.versions[max(self.versions)]

    def committed(self, version, truth):
        assert version == max(self.versions) + 1
        self.versions[version] = truth

    @initialize(keys=st.lists(KEYS, min_size=1, max_size=20, unique=True), per_shard=st.integers(1, 8))
    def start(self, keys, per_shard):
        m = vectors(keys, 0)
        embfile.write_shards(self.path, (keys, m), shard_bytes=per_shard * DIM * 4)
        self.versions[1] = dict(zip(keys, m))

    @rule(keys=st.lists(KEYS, min_size=1, max_size=12, unique=True), replace=st.booleans(), per_shard=st.integers(1, 8))
    def append(self, keys, replace, per_shard):
        self.seed += 1
        m = vectors(keys, self.seed)
        present = [k for k in keys if k in self.truth]
        if present and not replace:
            with pytest.raises(embfile.DuplicateKeyError, match=repr(present[0])[1:-1]):
                embfile.append(self.path, (keys, m), shard_bytes=per_shard * DIM * 4)
            return
        how = "replace" if replace else "error"
        version = embfile.append(self.path, (keys, m), how, shard_bytes=per_shard * DIM * 4)
        self.committed(version, {**self.truth, **dict(zip(keys, m))})

    @rule(keys=st.lists(KEYS, min_size=1, max_size=10, unique=True), ignore=st.booleans())
    def remove(self, keys, ignore):
        absent = [k for k in keys if k not in self.truth]
        if absent and not ignore:
            with pytest.raises(embfile.KeyNotFoundError, match=absent[0]):
                embfile.remove(self.path, keys)
            return
        version = embfile.remove(self.path, keys, missing="ignore" if ignore else "error")
        if len(absent) == len(keys):
            assert version == max(self.versions)  # nothing removed: no version
            return
        self.committed(version, {k: v for k, v in self.truth.items() if k not in keys})

    @rule(per_shard=st.integers(1, 30))
    def compact(self, per_shard):
        before = max(self.versions)
        version = embfile.compact(self.path, shard_bytes=per_shard * DIM * 4)
        with embfile.open(self.path) as db:
            assert db.segments <= max(1, -(-len(db) // segments.SEGMENT_KEYS)) or version == before
        if version != before:
            self.committed(version, dict(self.truth))

    @rule(keys=st.lists(KEYS, max_size=10, unique=True), to_file=st.booleans())
    def subset(self, keys, to_file):
        self.seed += 1
        dst = self.tmp / f"subset{self.seed}{'.emb' if to_file else ''}"
        embfile.subset(self.path, dst, keys, missing="ignore")
        with embfile.open(dst) as db:
            assert_holds(db, {k: v for k, v in self.truth.items() if k in keys})
            with embfile.open(self.path) as whole:
                assert list(db) == [k for k in whole if k in keys]  # in the dataset's row order

    @rule()
    def merge_with_a_file(self):
        self.seed += 1
        other = self.tmp / f"other{self.seed}.emb"
        embfile.write(other, ([f"other{self.seed}"], vectors([0], self.seed)))
        embfile.merge([self.path, other], self.tmp / f"merged{self.seed}")
        with embfile.open(self.tmp / f"merged{self.seed}") as db:
            assert_holds(db, {**self.truth, f"other{self.seed}": vectors([0], self.seed)[0]})

    @invariant()
    def every_version_holds_what_it_held(self):
        if not self.versions:
            return
        for version, truth in self.versions.items():
            with embfile.open(self.path, version=version) as db:
                assert db.version == version
                assert_holds(db, truth)
        with embfile.open(self.path) as db:
            assert db.version == max(self.versions)
            assert max((s.count for s in db.manifest.segments), default=0) <= segments.SEGMENT_KEYS
            if len(db) <= segments.SEGMENT_KEYS:
                assert db.segments <= max(1, int(np.log2(max(len(db), 1))) + 1)
        no_leftovers(self.path)


Growing.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_operations_against_a_dict = Growing.TestCase


class GrowingInSmallSegments(Growing):
    """The same with segments of 5 keys at most: commits, merges and compactions that write several."""

    def __init__(self):
        super().__init__()
        self.cap, segments.SEGMENT_KEYS = segments.SEGMENT_KEYS, 5

    def teardown(self):
        segments.SEGMENT_KEYS = self.cap
        super().teardown()


GrowingInSmallSegments.TestCase.settings = Growing.TestCase.settings
test_operations_in_small_segments_against_a_dict = GrowingInSmallSegments.TestCase


@pytest.fixture
def ds(tmp_path):
    path = tmp_path / "ds"
    keys = [f"p{i:04d}" for i in range(1000)]
    embfile.write_shards(path, (keys, vectors(keys, 1)), shard_bytes=100 * DIM * 4, metadata={"model": "m"})
    return path


def test_a_duplicate_append_commits_nothing_and_names_the_key(ds):
    with pytest.raises(embfile.DuplicateKeyError, match=r"key 'p0500' is already in the dataset \(version 1\)"):
        embfile.append(ds, (["new", "p0500"], np.zeros((2, DIM))))
    assert layout.latest_version(ds) == 1
    no_leftovers(ds)
    with pytest.raises(embfile.ShardError, match="'twice' is in two shards"):
        embfile.append(ds, (["twice", "x", "twice"], np.zeros((3, DIM))), shard_bytes=DIM * 4)
    assert layout.latest_version(ds) == 1


def test_a_merge_names_the_sources_a_key_is_in_and_takes_mappings_as_the_first_is(ds, tmp_path):
    other = tmp_path / "other.emb"
    embfile.write(other, (["q0", "p0007"], np.ones((2, DIM), np.float32)))
    for sources, where in [
        ([ds, other], rf"{ds} \(row 7\) and {other} \(row 1\)"),
        (
            [other, {"x": np.zeros(DIM)}, (["y", "p0007"], np.zeros((2, DIM)))],
            rf"{other} \(row 1\) and source 2 \(row 1\)",
        ),
        ([other, other], f"{other}, given twice"),
    ]:
        with pytest.raises(embfile.DuplicateKeyError, match=rf"merge\(\): key '(p0007|q0)' is in {where}"):
            embfile.merge(sources, tmp_path / "merged.emb")
        assert not (tmp_path / "merged.emb").exists()
    ragged = tmp_path / "ragged.emb"
    embfile.write(ragged, {"r1": np.ones((2, DIM))}, ragged=True)
    embfile.merge([ragged, {"r2": np.zeros((3, DIM))}], tmp_path / "both.emb")  # matrices, as the first holds
    with embfile.open(tmp_path / "both.emb") as db:
        assert db.ragged and db.lengths(["r1", "r2"]).tolist() == [2, 3]
    with pytest.raises(
        embfile.WriterError, match=r"other\.emb holds one vector per key, .*ragged\.emb per-residue .*db\.pool"
    ):
        embfile.merge([other, ragged], tmp_path / "mixed.emb")


def test_append_takes_what_convert_reads_and_keeps_the_datasets_dtype_and_metadata(ds, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    table = pa.table({"id": ["q1", "q2"], "emb": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]})
    pq.write_table(table, tmp_path / "new.parquet")
    version = embfile.append(ds, tmp_path / "new.parquet")
    with embfile.open(ds) as db:
        assert (db.version, len(db), db.dtype, db.manifest.metadata) == (version, 1002, np.float32, {"model": "m"})
        np.testing.assert_array_equal(db["q2"], [4, 5, 6])
    with pytest.raises(embfile.WriterError, match="holds vectors of dim 3, not 2"):
        embfile.append(ds, (["r"], np.zeros((1, 2))))
    with pytest.raises(embfile.WriterError, match="no dataset to append to"):
        embfile.append(tmp_path / "nothing", (["r"], np.zeros((1, 3))))
    with pytest.raises(embfile.ShardError, match="not a versioned dataset: nothing there"):
        embfile.remove(tmp_path / "nothing", ["r"])


def test_appends_cost_a_segment_each_and_the_index_stays_logarithmic(ds):
    for i in range(40):
        embfile.append(ds, ([f"a{i}-{j}" for j in range(10)], np.full((10, DIM), i)))
    with embfile.open(ds) as db:
        sizes = [s.count for s in db.manifest.segments]
        assert all(a >= 2 * b for a, b in zip(sizes, sizes[1:])), sizes  # each at least twice the next
        assert db.segments <= 6 and len(db) == 1400
        np.testing.assert_array_equal(db["a7-3"], [7, 7, 7])
        assert db.manifest.segments[0].path == layout.read_manifest(ds, 1).segments[0].path  # never rewritten
    embfile.compact(ds)
    with embfile.open(ds) as db:
        assert db.segments == 1 and len(db.files) == 1 and db["a7-3"].tolist() == [7, 7, 7]


def test_segments_stay_bounded_so_no_write_holds_every_key(tmp_path, monkeypatch):
    """Finishing a segment holds its keys in memory; a write, merge or compaction of more keys than a segment
    takes writes several, none holding more keys at its finish, and a key in two of them is still found.
    (``SEGMENT_KEYS`` made small here.)"""
    from embfile import jobs

    held = []  # the keys each segment held as it was finished: what its memory at that moment is for

    class Counted(segments.Writer):
        def close(self):
            if f"/{layout.INDEX}/" in self.path:
                held.append(len(self))
            super().close()

    monkeypatch.setattr(segments, "SEGMENT_KEYS", 1000)
    monkeypatch.setattr(segments, "Writer", Counted)
    path = tmp_path / "ds"
    truth = {f"k{i:05d}": v for i, v in enumerate(vectors(range(9500), 1))}
    embfile.write_shards(path, (list(truth), np.stack(list(truth.values()))), shard_bytes=700 * DIM * 4)
    for lo, n in ((9500, 800), (10300, 100)):
        keys = [f"k{i:05d}" for i in range(lo, lo + n)]
        embfile.append(path, (keys, vectors(keys, lo)))
        truth.update(zip(keys, vectors(keys, lo)))
    embfile.remove(path, ["k00003", "k08999", "k10350"])
    for k in ("k00003", "k08999", "k10350"):
        del truth[k]
    with embfile.open(path) as db:
        assert [s.count for s in db.manifest.segments] == [999, *[1000] * 7, 999, 500, 800, 99]  # none past 1000
        assert_holds(db, truth)
    assert held[:10] == [1000] * 9 + [500] and max(held) == 1000  # the write of 9,500 keys: 10 segments
    held.clear()
    embfile.compact(path)
    assert held == [1000] * 10 + [397]  # 10,397 keys merged: the most any segment held at once was 1,000
    with embfile.open(path) as db:
        assert [s.count for s in db.manifest.segments] == [1000] * 10 + [397]
        assert_holds(db, truth)
    no_leftovers(path)

    job = jobs.start_job(tmp_path / "job", None, "float32")  # a key in two segments of one commit
    parts = [
        jobs.write_part(job, i, [(keys, np.zeros((len(keys), 2)))])
        for i, keys in enumerate([[f"a{i}" for i in range(1500)], ["b", "a10"]])
    ]
    with pytest.raises(embfile.ShardError, match=r"'a10' is in two partitions: 0 \(row 10\) and 1 \(row 1\)"):
        jobs.commit_job(job, parts)
    assert not (tmp_path / "job").exists()


def test_remove_rewrites_only_the_shards_holding_the_keys(ds):
    before = layout.read_manifest(ds)
    embfile.remove(ds, ["p0150", "p0151"])
    after = layout.read_manifest(ds)
    changed = {s.path for s in before.shards} - {s.path for s in after.shards}
    assert len(changed) == 1 and len(after.shards) == len(before.shards)
    with pytest.raises(embfile.KeyNotFoundError, match=r"'p0150' is not in .*\(version 2\)"):
        embfile.remove(ds, ["p0150"])
    embfile.remove(ds, [f"p{i:04d}" for i in range(1000) if i not in (150, 151)])
    with embfile.open(ds) as db:
        assert len(db) == 0 and list(db) == [] and db.find_rows(["p0001"]).tolist() == [-1]
    embfile.append(ds, (["back"], np.ones((1, DIM))))
    with embfile.open(ds) as db:
        assert list(db) == ["back"]


def test_vacuum_keeps_what_kept_versions_and_open_handles_use(ds):
    embfile.append(ds, (["a"], np.ones((1, DIM))))
    embfile.remove(ds, ["p0001"])
    old = embfile.open(ds, version=1)
    assert embfile.vacuum(ds, keep=1) == []  # superseded less than a day ago
    assert embfile.vacuum(ds, keep=2, grace=0) == [1]
    assert layout.versions(ds) == [2, 3]
    np.testing.assert_array_equal(
        old.get_batch(["p0001", "p0999"]), vectors([f"p{i:04d}" for i in range(1000)], 1)[[1, 999]]
    )
    old.close()
    with pytest.raises(embfile.VersionNotFoundError, match="its versions are 2 to 3"):
        embfile.open(ds, version=1)
    (ds / layout.LATEST).write_text("1\n")  # a hint naming a version vacuum removed: the versions are the truth
    assert layout.latest_version(ds) == 3
    no_leftovers(ds)
    embfile.vacuum(ds, keep=1, grace=0)
    no_leftovers(ds)
    with embfile.open(ds) as db:
        assert len(db) == 1000 and "a" in db and "p0001" not in db


def _read_tagged(path, name):
    with embfile.open(path, version=name) as db:
        return db.version, len(db)


def test_a_tag_names_a_version_that_every_vacuum_keeps(ds, capsys):
    keys = [f"p{i:04d}" for i in range(1000)]
    assert embfile.tag(ds, "release-1") == 1 and embfile.tag(ds, "release-1", version=1) == 1  # again: a no-op
    embfile.append(ds, (["a"], np.ones((1, DIM))))
    embfile.remove(ds, ["p0001"])  # version 3 rewrites the shard holding it
    embfile.append(ds, (["b"], np.ones((1, DIM))))
    assert embfile.tag(ds, "weekly", version="release-1") == 1
    assert embfile.tag(ds, "weekly", version=3, replace=True) == 3
    assert embfile.tags(ds) == {"release-1": 1, "weekly": 3}
    assert embfile.vacuum(ds, keep=1, grace=0) == [2]
    assert layout.versions(ds) == [1, 3, 4]
    with embfile.open(ds, version="release-1") as db:  # every file of a tagged version is kept
        assert db.version == 1 and len(db) == 1000
        np.testing.assert_array_equal(db.get_batch(keys), vectors(keys, 1))
        worker = multiprocessing.get_context("spawn").Pool(1)
        with worker:
            embfile.tag(ds, "release-1", version=4, replace=True)  # a moved tag: a handle keeps its version
            assert worker.apply(len, (db,)) == 1000
    assert _read_tagged(ds, "release-1") == (4, 1001)
    assert embfile.changes(ds, since="weekly", version="release-1") == embfile.Changes(3, 4, ["b"], [], [])
    with pytest.raises(embfile.VersionNotFoundError, match="no version 2; its versions are 1, 3 to 4"):
        embfile.open(ds, version=2)
    with pytest.raises(ValueError, match="tag 'weekly' names version 3; replace=True moves it"):
        embfile.tag(ds, "weekly", version=4)
    for bad in ("2026", "", "a/b", ".hidden", "x" * 129, 7):
        with pytest.raises(ValueError, match="cannot name a tag"):
            embfile.tag(ds, bad)
    with pytest.raises(embfile.VersionNotFoundError, match="no version 2"):
        embfile.tag(ds, "gone", version=2)
    embfile.untag(ds, "weekly")
    with pytest.raises(embfile.VersionNotFoundError, match="no tag 'weekly'; its tags are release-1"):
        embfile.open(ds, version="weekly")
    with pytest.raises(embfile.VersionNotFoundError, match="no tag 'weekly'"):
        embfile.untag(ds, "weekly")
    assert embfile.vacuum(ds, keep=1, grace=0) == [1, 3]
    no_leftovers(ds)
    (ds / layout.TAGS / "broken.json").write_text("{not json")
    with pytest.raises(embfile.CorruptFileError, match="broken.json: not a tag"):
        embfile.open(ds, version="broken")
    with pytest.raises(embfile.CorruptFileError, match="broken.json: not a tag"):
        embfile.vacuum(ds, keep=1)  # never a vacuum that cannot tell which versions are tagged
    (ds / layout.TAGS / "broken.json").unlink()
    from embfile import cli

    assert cli.main(["tag", str(ds), "v4-final"]) == 0
    assert capsys.readouterr().err.strip() == f"{ds}: tag v4-final names version 4"
    assert cli.main(["versions", str(ds)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("release-1 v4-final")
    assert cli.main(["tag", str(ds), "v4-final", "--delete"]) == 0
    assert cli.main(["tag", str(ds), "v4-final", "--delete", "--replace"]) == 1
    assert capsys.readouterr().err.strip().endswith("embfile: error: --delete takes no --version or --replace")


def test_vacuum_leaves_the_files_of_a_running_operation(ds):
    with layout.Transaction(ds) as tx:
        name = tx.new_name(layout.SHARDS)
        embfile.write(tx.path(name), (["wip"], np.ones((1, DIM), np.float32)))
        embfile.vacuum(ds, keep=1, grace=0)
        assert os.path.exists(tx.path(name))
    assert not os.path.exists(tx.path(name))  # never committed: removed by its own close


def test_vacuum_removes_the_temporaries_of_killed_writers_once_stale(ds):
    """A writer killed between writing a manifest, a tag or a hint and linking it into place leaves its
    temporary file; a vacuum removes it once no write could still be using it (an hour on)."""
    embfile.tag(ds, "t")
    stale, fresh = [], []
    for sub in (layout.META, layout.VERSIONS, layout.TAGS):
        for made, kept in ((stale, 7200), (fresh, 60)):
            path = ds / sub / f".{layout.unique_name()}.tmp"
            path.write_bytes(b"{}")
            os.utime(path, (time.time() - kept, time.time() - kept))
            made.append(path)
    embfile.vacuum(ds, keep=1, grace=0)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in fresh)
    assert embfile.tags(ds) == {"t": 1} and layout.latest_version(ds) == 1


def test_dataset_writer_commits_each_full_shard_and_resumes(tmp_path):
    path = tmp_path / "job"
    keys = [f"s{i:04d}" for i in range(250)]
    m = vectors(keys, 2)
    with embfile.DatasetWriter(path, dim=DIM, shard_bytes=100 * DIM * 4) as w:
        for k, v in zip(keys[:150], m[:150]):
            w.add(k, v)
        assert layout.latest_version(path) == 2  # version 1 is the empty dataset, 2 the first full shard
        assert len(w.done_keys()) == 150 and "s0149" in w.done_keys() and "s0150" not in w.done_keys()
        with pytest.raises(embfile.DuplicateKeyError, match=r"'s0003' is already in the dataset \(version 2\)"):
            w.add_batch(["fresh", "s0003"], m[:2])
        # the first key at fault in the batch's order: one of the shard in progress, then one stored
        with pytest.raises(embfile.DuplicateKeyError, match=r"'s0140' is already in the dataset \(the records add"):
            w.add_batch(["fresh", "s0140", "s0003"], m[:3])
        with pytest.raises(embfile.DuplicateKeyError, match=r"'twice' is already in the dataset \(the records add"):
            w.add_batch(["fresh", "twice", "twice"], m[:3])
        assert "fresh" not in w.done_keys()
    with pytest.raises(embfile.WriterError, match="resume=True continues it"):
        embfile.DatasetWriter(path, dim=DIM)
    with embfile.DatasetWriter(path, dim=DIM, shard_bytes=100 * DIM * 4, resume=True) as w:
        done = w.done_keys()
        assert sorted(done) == keys[:150]
        for k, v in zip(keys, m):
            if k not in done:
                w.add(k, v)
    with embfile.open(path) as db:
        assert_holds(db, dict(zip(keys, m)))
        assert [v.operation["name"] for v in layout.history(path)] == ["write"] + ["write-shard"] * 3
    no_leftovers(path)


@pytest.mark.parametrize("ragged", [False, True])
def test_a_bad_batch_is_refused_whole_by_every_writer_and_adds_nothing(tmp_path, ragged):
    """A batch is added all or not at all, also where the sharded writers cut it over shards (they added the
    shards' parts before the bad one) and where its matrix has rows no key owns (they dropped those)."""
    writers = {
        "file.emb": lambda p: embfile.Writer(p, DIM, "float16", ragged=ragged),
        "shards": lambda p: embfile.ShardWriter(p, DIM, "float16", shard_bytes=8 * DIM * 2, ragged=ragged),
        "dataset": lambda p: embfile.DatasetWriter(p, DIM, "float16", shard_bytes=8 * DIM * 2, ragged=ragged),
    }
    keys, too_large = [f"k{i}" for i in range(40)], np.ones((40, DIM))
    too_large[30] = 1e6  # past float16: found in the fourth shard's part
    bad = [  # (keys, matrix, lengths), the message
        (
            ["a", "b"],
            np.ones((3, DIM)),
            [1, 1] if ragged else None,
            "the matrix has 3" if ragged else r"shape \(3, 3\)",
        ),
        (keys, too_large, [1] * 40 if ragged else None, "key 'k30': value 1000000.0 does not fit in float16"),
    ]
    if ragged:
        bad.append((keys[:2], np.ones((20, DIM)), [19, 0], "key 'k1': length 0"))
    for name, make in writers.items():
        with make(tmp_path / name) as w:
            for batch_keys, matrix, lengths, message in bad:
                with pytest.raises(embfile.WriterError, match=message):
                    w.add_batch(batch_keys, matrix, lengths)
            w.add_batch(["c", "d"], np.ones((2, DIM)), [1, 1] if ragged else None)
        with embfile.open(tmp_path / name) as db:
            assert list(db) == ["c", "d"], name


def test_an_exception_inside_a_dataset_writer_keeps_what_was_added(tmp_path):
    path = tmp_path / "job"
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with embfile.DatasetWriter(path, dim=DIM, shard_bytes=10 * DIM * 4) as w:
            for i in range(25):
                w.add(f"s{i}", np.full(DIM, i))
            raise RuntimeError("CUDA out of memory")
    with embfile.open(path) as db:
        assert len(db) == 25 and db["s24"].tolist() == [24] * DIM
    no_leftovers(path)


def _append_many(path, worker, n):
    for i in range(n):
        embfile.append(path, ([f"w{worker}-{i}"], np.full((1, DIM), worker)))


def test_appenders_in_two_processes_both_commit_every_time(ds):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(ds, w, 15)) for w in range(2)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):  # a reader meanwhile always sees one whole version
        with embfile.open(ds) as db:
            assert len(db) == db.manifest.count == 1000 + db.version - 1
            seen.add(db.version)
    for p in procs:
        p.join()
        assert p.exitcode == 0
    with embfile.open(ds) as db:
        assert db.version == 31 and len(db) == 1030
        assert {f"w{w}-{i}" for w in range(2) for i in range(15)} <= set(db)
    assert [m.parent for m in layout.history(ds)[1:]] == list(range(1, 31))
    no_leftovers(ds)


def _tag_many(path, worker, n):
    for i in range(n):
        embfile.tag(path, f"w{worker}-{i}")
        if i % 3 == 0:
            embfile.untag(path, f"w{worker}-{i}")


def test_racing_taggers_leave_a_tag_list_naming_every_tag(ds):
    """The tags.json hint (for readers that cannot list a folder) is exact once the writers are done, however their
    changes interleave: each lists the tags again after writing it, until two listings agree."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_tag_many, args=(ds, w, 12)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    hint = layout.tag_list((ds / layout.TAG_LIST).read_bytes(), "tags.json")
    assert hint == embfile.tags(ds) and len(hint) == 4 * 8


def test_a_tag_made_while_another_writer_lists_is_in_the_tag_list(ds, monkeypatch):
    """The interleaving that loses a tag from a hint written once: writer A lists the tags, writer B makes a
    tag and writes its hint, A writes its older list over it.  A lists again after writing, and writes again."""
    embfile.tag(ds, "a")
    listing = layout.tags

    def racing(folder):
        found = listing(folder)
        if "b" not in found:  # B's whole tag, between A's listing and A's write
            monkeypatch.setattr(layout, "tags", listing)
            embfile.tag(ds, "b")
            monkeypatch.setattr(layout, "tags", racing)
        return found

    monkeypatch.setattr(layout, "tags", racing)
    layout.write_tag_list(ds)
    monkeypatch.setattr(layout, "tags", listing)
    assert layout.tag_list((ds / layout.TAG_LIST).read_bytes(), "tags.json") == {"a": 1, "b": 1}
