"""Spark reads and writes embfile datasets, on a real Spark in local mode (tests/conftest.py): round trips,
versions, lookups, and tasks that fail and are retried with every key still committed exactly once."""

import os

import numpy as np
import pytest

import embfile
from embfile import folder as layout

pytest.importorskip("pyspark")
import embfile.spark


def frame(spark, n, lo=0, partitions=4, dim=8, element="float"):
    """``key`` k{i}, ``vector`` [i, i/2, ..., 1] (dim elements) for i in [lo, lo + n)."""
    values = ", ".join(f"cast(id / {j + 1} as {element})" for j in range(dim))
    return spark.range(lo, lo + n, numPartitions=partitions).selectExpr(
        "concat('k', cast(id as string)) as id", f"array({values}) as emb"
    )


def expected(n, lo=0, dim=8, dtype=np.float32):
    ids = np.arange(lo, lo + n)
    return [f"k{i}" for i in ids], (ids[:, None] / np.arange(1, dim + 1)).astype(dtype)


def save(df, path, mode="append", **options):
    w = df.write.format("embfile").mode(mode).option("key", "id").option("vector", "emb")
    for k, v in options.items():
        w = w.option(k, v)
    w.save(str(path))


def stray_files(path):
    named = set().union(*(m.files() for m in layout.history(path)))
    return {f"shards/{n}" for n in os.listdir(path / "shards")} - named


def test_spark_to_embfile_to_spark(spark, tmp_path):
    ds = tmp_path / "ds"
    save(frame(spark, 3000, partitions=5), ds, shard_bytes=400 * 8 * 4)  # several shards per task
    keys, matrix = expected(3000)
    with embfile.open(ds) as db:  # written by Spark, read by embfile
        assert (db.version, len(db), db.dtype, db.manifest.operation["name"]) == (1, 3000, np.float32, "write")
        assert len(db.files) > 5
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
        db.verify()
    df = spark.read.format("embfile").option("rows_per_partition", 700).load(str(ds))  # found by Spark itself
    assert df.schema.simpleString() == "struct<key:string,vector:array<float>>"
    assert df.rdd.getNumPartitions() >= 5
    rows = sorted(df.collect(), key=lambda r: int(r.key[1:]))
    assert [r.key for r in rows] == keys
    np.testing.assert_array_equal(np.array([r.vector for r in rows], np.float32), matrix)
    assert stray_files(ds) == set()


@pytest.mark.parametrize(
    "element,dtype,stored,read",
    [
        ("double", None, np.float64, "double"),
        ("float", "float16", np.float16, "float"),
        ("int", None, np.int32, "int"),
    ],
)
def test_types_round_trip(spark, tmp_path, element, dtype, stored, read):
    ds = tmp_path / "ds"
    save(frame(spark, 200, element=element), ds, **({"dtype": dtype} if dtype else {}))
    keys, matrix = expected(200, dtype=stored)
    with embfile.open(ds) as db:
        assert db.dtype == stored
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    df = spark.read.format("embfile").load(str(ds))
    assert df.schema.simpleString() == f"struct<key:string,vector:array<{read}>>"
    got = {r.key: r.vector for r in df.collect()}
    np.testing.assert_array_equal(
        np.array([got[k] for k in keys]), matrix.astype(np.float32 if read == "float" else stored)
    )


def test_embfile_to_spark_and_versions(spark, tmp_path):
    keys, matrix = expected(500)
    embfile.write(tmp_path / "one.emb", (keys, matrix))
    assert spark.read.format("embfile").load(str(tmp_path / "one.emb")).count() == 500  # a single file
    ds = tmp_path / "ds"
    embfile.write_shards(ds, (keys, matrix), shard_bytes=100 * 8 * 4)
    save(frame(spark, 100, lo=500), ds)  # append
    with pytest.raises(Exception, match="'k0' is already in the dataset"):
        save(frame(spark, 10), ds)  # keys it holds: the job fails, nothing is committed
    assert layout.latest_version(ds) == 2 and stray_files(ds) == set()
    save(frame(spark, 10).selectExpr("id", "transform(emb, x -> x + 1000) as emb"), ds, on_duplicate="replace")
    save(frame(spark, 50, lo=7000), ds, mode="overwrite")
    with embfile.open(ds) as db, embfile.open(ds, version=3) as v3:
        assert (db.version, len(db), sorted(db)[:2]) == (4, 50, ["k7000", "k7001"])
        assert len(v3) == 600 and v3["k5"][0] == 1005 and v3["k599"][0] == 599
    old = spark.read.format("embfile").option("version", 2).load(str(ds))
    assert old.count() == 600
    assert stray_files(ds) == set()


def test_lookup_attaches_vectors_without_reading_the_dataset(spark, tmp_path):
    keys, matrix = expected(1000)
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=100 * 8 * 4)
    ids = spark.createDataFrame([(k, i) for i, k in enumerate(["k3", "missing", "k999", "k3"])], "id string, n int")
    out = embfile.spark.lookup(ids.repartition(2), str(tmp_path / "ds"), key_col="id", out_col="v")
    assert out.schema.simpleString() == "struct<id:string,n:int,v:array<float>>"
    got = {r.n: r.v for r in out.collect()}
    assert got[1] is None
    np.testing.assert_array_equal(np.array([got[0], got[2], got[3]]), matrix[[3, 999, 3]])


def _failing_first(kind):
    """A mapInArrow step that fails the first attempt of partition 1 after passing on some batches: by an
    exception, or by killing its Python worker."""

    def step(batches):
        from pyspark import TaskContext

        context = TaskContext.get()
        for i, batch in enumerate(batches):
            yield batch
            if context.partitionId() == 1 and context.attemptNumber() == 0 and i == 2:
                if kind == "raise":
                    raise RuntimeError("injected: first attempt fails")
                os._exit(1)

    return step


@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_a_task_failing_on_its_first_attempt_is_retried_and_every_key_is_written_once(spark, tmp_path, kind):
    ds = tmp_path / "ds"
    df = frame(spark, 4000, partitions=4).repartition(4)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
    try:
        failing = df.mapInArrow(_failing_first(kind), df.schema)
        save(failing, ds, shard_bytes=150 * 8 * 4)  # partition 1 writes shards before it fails
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    keys, matrix = expected(4000)
    with embfile.open(ds) as db:
        assert len(db) == 4000 and sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
    assert stray_files(ds) == set()  # the failed attempt's shards are gone


def test_a_failed_job_commits_nothing(spark, tmp_path):
    ds = tmp_path / "ds"
    twice = frame(spark, 100).union(frame(spark, 1, lo=50))  # k50 in two partitions
    with pytest.raises(Exception, match="'k50' is in two shards"):
        save(twice, ds)
    assert not ds.exists()  # the job made the folder; it failed, so the folder is gone
    bad = spark.createDataFrame([("a", [1.0, 2.0]), ("b", [1.0])], "id string, emb array<float>")
    with pytest.raises(Exception, match="key 'b': vector of 1 elements, not 2"):
        save(bad.coalesce(1), ds)
    with pytest.raises(Exception, match="partition 1 has vectors of dim 1, partition 0 of dim 2"):
        save(bad.repartition(2, "id").sortWithinPartitions("id"), ds)
    assert not ds.exists()
