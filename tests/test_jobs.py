"""The write by many tasks (embfile.jobs), engine-free: duplicate attempts, lost results, failed jobs, and two
jobs appending to one dataset at once."""

import os
import threading

import numpy as np
import pytest

import embfile
from embfile import folder as layout
from embfile import jobs


def part(n, lo, dim=4):
    keys = [f"k{i}" for i in range(lo, lo + n)]
    return keys, np.full((n, dim), lo, np.float32) + np.arange(n, dtype=np.float32)[:, None]


def job_files(job):
    return {n for n in os.listdir(os.path.join(job.folder, layout.SHARDS)) if n.lstrip(".").startswith(job.token)}


def test_of_two_attempts_of_a_partition_one_is_committed_and_the_other_removed(tmp_path):
    job = jobs.start_job(tmp_path / "ds", None, "float32", shard_bytes=30 * 16)
    first = jobs.write_part(job, 0, [part(100, 0)])
    speculative = jobs.write_part(job, 0, [part(100, 0)])  # the same partition, run twice
    second = jobs.write_part(job, 1, [part(50, 100)])
    assert len(job_files(job)) == 4 + 4 + 2
    manifest = jobs.commit_job(job, [first, speculative, second, None])
    assert manifest.count == 150 and len(job_files(job)) == 6
    with embfile.open(tmp_path / "ds") as db:
        assert sorted(db) == sorted(part(150, 0)[0]) and db["k120"].tolist() == [120] * 4


def test_a_failed_task_removes_its_files_and_a_failed_job_commits_nothing(tmp_path):
    job = jobs.start_job(tmp_path / "ds", None, "float32", shard_bytes=30 * 16)
    jobs.write_part(job, 0, [part(100, 0)])

    def broken():
        yield part(40, 100)
        raise RuntimeError("the task died")

    with pytest.raises(RuntimeError):
        jobs.write_part(job, 1, broken())
    assert len(job_files(job)) == 4  # the failed attempt took its own shard with it
    jobs.abort_job(job)
    assert not (tmp_path / "ds").exists()  # the job made the folder and committed nothing
    embfile.write_shards(tmp_path / "ds", part(10, 0))
    job = jobs.start_job(tmp_path / "ds", None, mode="append")
    jobs.write_part(job, 0, [part(10, 500)])
    jobs.abort_job(job)
    assert layout.latest_version(tmp_path / "ds") == 1 and job_files(job) == set()


def test_partitions_of_different_dims_are_refused(tmp_path):
    job = jobs.start_job(tmp_path / "ds", None)
    results = [jobs.write_part(job, 0, [part(5, 0, dim=4)]), jobs.write_part(job, 1, [part(5, 5, dim=3)])]
    with pytest.raises(embfile.WriterError, match="partition 1 has vectors of dim 3, partition 0 of dim 4"):
        jobs.commit_job(job, results)
    assert not (tmp_path / "ds").exists()


def test_two_jobs_appending_at_once_both_commit(tmp_path):
    embfile.write_shards(tmp_path / "ds", part(10, 0))
    errors = []

    def append(lo):
        try:
            for round in range(5):
                job = jobs.start_job(tmp_path / "ds", None, mode="append")
                results = [jobs.write_part(job, p, [part(20, lo + 100 * round + 20 * p)]) for p in range(3)]
                jobs.commit_job(job, results)
        except Exception as e:  # reported below: a thread's exception would be lost
            errors.append(e)

    threads = [threading.Thread(target=append, args=(lo,)) for lo in (1000, 9000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with embfile.open(tmp_path / "ds") as db:
        assert db.version == 11 and len(db) == 10 + 2 * 5 * 60
        db.verify()


def test_a_ragged_job_cuts_shards_between_records_and_names_what_is_wrong(tmp_path):
    pa = pytest.importorskip("pyarrow")
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 12, 200)
    rows = rng.random((int(lengths.sum()), 4)).astype(np.float32)
    keys = [f"r{i}" for i in range(200)]
    job = jobs.start_job(tmp_path / "ds", None, "float32", shard_bytes=20 * 16, ragged=True)  # 20 rows a shard
    halves = [
        (keys[:90], rows[: lengths[:90].sum()], lengths[:90]),
        (keys[90:], rows[lengths[:90].sum() :], lengths[90:]),
    ]
    jobs.commit_job(job, [jobs.write_part(job, 0, halves), None])
    with embfile.open(tmp_path / "ds") as db:
        ends = np.cumsum(lengths)
        assert db.ragged and all(np.array_equal(db[k], rows[e - n : e]) for k, e, n in zip(keys, ends, lengths))
        for shard in db.files:  # at most 20 rows, or one longer record
            assert np.diff(shard.ranges().astype(np.int64)).sum() <= 20 or len(shard) == 1
    nested = pa.list_(pa.list_(pa.float32()))
    for records, says in (
        ([[[1.0, 2.0]], [[1.0, 2.0], None]], "key 'b': a null row"),
        ([[[1.0, 2.0]], []], "key 'b': record has no rows"),
        ([[[1.0, 2.0]], [[1.0, 2.0], [3.0]]], "key 'b': vector of 1 elements, not 2"),
        ([[[1.0, 2.0]], None], "key 'b': a null record"),
    ):
        with pytest.raises(embfile.WriterError, match=says):
            jobs.arrow_records(pa.array(["a", "b"]), pa.array(records, nested), None)
    flat = pa.list_(pa.float32())
    for names, vectors, says in (  # an engine's batch of one vector per key: each null named
        (["a", "b"], [[1.0, 2.0], None], "key 'b': a null vector"),
        (["a", "b"], [[1.0, 2.0], [3.0, None]], "key 'b': a null element"),
        (["a", None], [[1.0, 2.0], [3.0, 4.0]], r"a null key \(record 1 of a batch of 2\)"),
    ):
        with pytest.raises(embfile.WriterError, match=says):
            jobs.arrow_chunk(pa.array(names, pa.string()), pa.array(vectors, flat), None)
    with pytest.raises(embfile.WriterError, match="holds ragged records; ragged=False does not fit it"):
        jobs.start_job(tmp_path / "ds", None, mode="append")
