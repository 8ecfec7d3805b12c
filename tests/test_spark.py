"""Spark reads and writes embfile datasets, on a real Spark in local mode (tests/conftest.py): round trips,
versions, lookups, and tasks that fail and are retried with every key still committed exactly once."""

import functools
import json
import os
import pathlib
import subprocess
import sys
import warnings

import ml_dtypes  # numpy's bfloat16 and its finfo
import mutate
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from servers import RangeServer

import embfile
from embfile import folder as layout

pytest.importorskip("pyspark")
import pyarrow as pa

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
        assert (db.version, len(db), db.dtype, db.manifest.operation["name"]) == (1, 3000, np.float32, "append")
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
        ("float", "bfloat16", ml_dtypes.bfloat16, "float"),
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


def test_spark_ml_vectors_dense_and_sparse_are_written(spark, tmp_path):
    from pyspark.ml.linalg import Vectors

    keys, matrix = expected(300, dtype=np.float64)
    matrix[::7] = 0
    matrix[::7, 3] = 2.5  # every seventh as a sparse vector, as Spark ML's transformers may give them
    vectors = [Vectors.sparse(8, [3], [2.5]) if i % 7 == 0 else Vectors.dense(v.tolist()) for i, v in enumerate(matrix)]
    df = spark.createDataFrame(list(zip(keys, vectors)), ["id", "emb"]).repartition(3)
    save(df, tmp_path / "ds", dtype="float32")  # was "column 'emb' is vector, not an array of numbers"
    with embfile.open(tmp_path / "ds") as db:
        assert db.dtype == np.float32 and len(db) == 300
        np.testing.assert_array_equal(db.get_batch(keys), matrix.astype(np.float32))
    wrong = spark.createDataFrame(
        [("a", Vectors.dense([1.0, 2.0])), ("b", Vectors.sparse(3, [0], [1.0]))], ["id", "emb"]
    )
    with pytest.raises(Exception, match="key 'b': vector of 3 elements, not 2"):
        save(wrong.coalesce(1), tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


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
    embfile.write(tmp_path / "bf16.emb", (keys, matrix), dtype="bfloat16")  # widened to float, exactly
    got = {r.n: r.v for r in embfile.spark.lookup(ids, str(tmp_path / "bf16.emb"), key_col="id", out_col="v").collect()}
    want = matrix[[3, 999]].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert got[1] is None and np.array_equal(np.array([got[0], got[2]]), want)
    embfile.write(tmp_path / "ints.emb", ([str(i) for i in range(1000)], matrix))  # integer ids, as written
    numbers = spark.createDataFrame([(3,), (5000,), (999,)], "id bigint")
    got = [r.v for r in embfile.spark.lookup(numbers, str(tmp_path / "ints.emb"), key_col="id", out_col="v").collect()]
    assert got[1] is None and np.array_equal(np.array([got[0], got[2]]), matrix[[3, 999]])
    with pytest.raises(ValueError, match=r"no column 'key' \(key_col\); columns: \['id'\]"):
        embfile.spark.lookup(numbers, str(tmp_path / "ints.emb"))


def test_per_residue_records_are_written_read_and_looked_up(spark, tmp_path):
    """A column of arrays of vectors is written as per-residue (ragged) records, shards cut by rows between
    records; both readers and lookup give ``array<array<T>>`` (null for a key not there)."""
    rng = np.random.default_rng(5)
    records = {f"p{i}": rng.random((int(rng.integers(1, 30)), 4)).astype(np.float32) for i in range(300)}
    df = spark.createDataFrame([(k, v.tolist()) for k, v in records.items()], "id string, emb array<array<float>>")
    save(df.repartition(3), tmp_path / "ds", shard_bytes=200 * 4 * 4)
    with embfile.open(tmp_path / "ds") as db:
        assert db.ragged and len(db) == 300 and len(db.files) > 6
        assert all(np.array_equal(db[k], v) for k, v in records.items())
    path = str(tmp_path / "ds")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the JVM reader, no fallback to Python
        jvm = embfile.spark.read(spark, path, rows_per_partition=500)
    readers = [jvm, spark.read.format("embfile").option("rows_per_partition", 500).load(path)]
    assert readers[0].rdd.getNumPartitions() == readers[1].rdd.getNumPartitions() >= 8
    for read in readers:
        assert read.schema.simpleString() == "struct<key:string,vector:array<array<float>>>"
        got = {r.key: np.array(r.vector, np.float32) for r in read.collect()}
        assert got.keys() == records.keys() and all(np.array_equal(got[k], v) for k, v in records.items())
    asked = [*records, "absent"] * 3  # in one batch of more rows than a run: Arrow lists count in 32 bits
    ids = spark.createDataFrame([(k, i) for i, k in enumerate(asked)], "id string, n int").coalesce(1)
    out = {r.n: r.vector for r in embfile.spark.lookup(ids, path, key_col="id").collect()}
    assert len(out) == len(asked) and sum(len(records[k]) for k in asked if k in records) > embfile.spark.ROWS_PER_BATCH
    for i, k in enumerate(asked):
        assert out[i] is None if k == "absent" else np.array_equal(np.array(out[i], np.float32), records[k])
    with pytest.raises(Exception, match="holds ragged records; ragged=False does not fit it"):
        save(frame(spark, 10, dim=4), tmp_path / "ds")
    wrong = spark.createDataFrame(
        [("a", [[1.0, 2.0]]), ("b", [[1.0, 2.0], [3.0]])], "id string, emb array<array<float>>"
    )
    with pytest.raises(Exception, match="key 'b': vector of 1 elements, not 2"):
        save(wrong, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert stray_files(tmp_path / "ds") == set()


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
    with pytest.raises(Exception, match=r"'k50' is in two partitions: \d+ \(row \d+\) and \d+ \(row \d+\)"):
        save(twice, ds)
    assert not ds.exists()  # the job made the folder; it failed, so the folder is gone
    bad = spark.createDataFrame([("a", [1.0, 2.0]), ("b", [1.0])], "id string, emb array<float>")
    with pytest.raises(Exception, match="key 'b': vector of 1 elements, not 2"):
        save(bad.coalesce(1), ds)
    with pytest.raises(Exception, match="partition 1 has vectors of dim 1, partition 0 of dim 2"):
        save(bad.repartition(2, "id").sortWithinPartitions("id"), ds)
    with pytest.raises(Exception, match=r"keys are double, not strings or integers"):
        save(frame(spark, 10).selectExpr("cast(1.5 as double) as id", "emb"), ds)
    assert not ds.exists()
    # integer ids are stored as their decimal text, as the Parquet reader takes them (were an unpacking error)
    save(frame(spark, 10).selectExpr("cast(substr(id, 2) as bigint) as id", "emb"), ds)
    with embfile.open(ds) as db:
        np.testing.assert_array_equal(db.get_batch([str(i) for i in range(10)]), expected(10)[1])


def both_reads(spark, path, **options):
    """The rows of ``embfile.spark.read`` (the JVM reader) and of ``format("embfile")`` (Python workers)."""
    jvm = embfile.spark.read(spark, str(path), **options)
    python = spark.read.format("embfile")
    for k, v in options.items():
        python = python.option(k, v)
    python = python.load(str(path))
    assert jvm.schema == python.schema
    assert "EmbfileReader" in jvm._jdf.queryExecution().toString()  # the JVM reader, not the fallback
    return jvm.collect(), python.collect(), jvm.rdd.getNumPartitions()


@pytest.mark.parametrize("dtype", sorted(embfile.spark.SPARK_TYPES))
def test_the_jvm_reader_reads_every_type_as_the_python_source_does(spark, tmp_path, dtype):
    rng = np.random.default_rng(len(dtype))
    if dtype.startswith(("float", "bfloat")):
        matrix = rng.standard_normal((500, 9)).astype(dtype)
        info = ml_dtypes.finfo(dtype)
        matrix[0, :6] = [np.inf, -np.inf, 0.0, -0.0, info.tiny, info.smallest_subnormal]
        matrix[1, 0] = np.nan
    else:
        info = np.iinfo(dtype)
        matrix = rng.integers(info.min, info.max, (500, 9), endpoint=True, dtype=dtype)
        matrix[0, :2] = info.min, info.max
    keys = [f"clé-{i}" for i in range(500)]
    embfile.write(tmp_path / "one.emb", (keys, matrix))
    jvm, python, partitions = both_reads(spark, tmp_path / "one.emb", rows_per_partition=120)
    assert partitions == 5 and [r.key for r in jvm] == [r.key for r in python] == keys
    got = np.array([r.vector for r in jvm])
    np.testing.assert_array_equal(got, np.array([r.vector for r in python]))  # NaN equal to NaN
    np.testing.assert_array_equal(got, matrix.astype(got.dtype))
    records = {k: np.resize(matrix, (n, 9)) for k, n in zip(keys, rng.integers(1, 40, 100))}  # per residue
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    jvm, python, partitions = both_reads(spark, tmp_path / "r.emb", rows_per_partition=300)
    assert partitions >= 6 and [r.key for r in jvm] == [r.key for r in python] == list(records)
    for j, p in zip(jvm, python):
        got = np.array(j.vector)
        np.testing.assert_array_equal(got, np.array(p.vector))
        np.testing.assert_array_equal(got, records[j.key].astype(got.dtype))


def test_the_jvm_reader_reads_versions_of_sharded_datasets(spark, tmp_path):
    keys, matrix = expected(1000)
    ds = tmp_path / "ds"
    embfile.write_shards(ds, (keys[:600], matrix[:600]), shard_bytes=170 * 8 * 4)
    save(frame(spark, 400, lo=600), ds)  # version 2 appends shards written by Spark
    jvm, python, partitions = both_reads(spark, ds, rows_per_partition=100)
    assert partitions >= 10 and sorted(jvm) == sorted(python)
    got = {r.key: r.vector for r in jvm}
    assert len(jvm) == 1000 and np.array_equal(np.array([got[k] for k in keys]), matrix)
    assert len(embfile.spark.read(spark, str(ds), version=1).collect()) == 600
    embfile.write_shards(tmp_path / "empty", ([], np.empty((0, 8), np.float32)))
    assert embfile.spark.read(spark, str(tmp_path / "empty")).collect() == []


def test_an_incremental_read_gives_the_records_changed_since_a_version(spark, tmp_path):
    keys, matrix = expected(1000)
    ds = tmp_path / "ds"
    embfile.write_shards(ds, (keys[:600], matrix[:600]), shard_bytes=170 * 8 * 4)  # version 1
    save(frame(spark, 400, lo=600), ds)  # 2: 400 new
    save(frame(spark, 20, lo=590).selectExpr("id", "transform(emb, x -> x + 1000) as emb"), ds, on_duplicate="replace")
    embfile.remove(ds, ["k3"])  # 4: no record added
    jvm, python, partitions = both_reads(spark, ds, since=1, rows_per_partition=100)
    assert sorted(jvm) == sorted(python) and partitions >= 4
    assert sorted(r.key for r in jvm) == sorted(keys[590:])  # k590-k609 replaced in 3, k600-k999 new in 2
    got = {r.key: r.vector for r in jvm}
    assert (got["k595"][0], got["k600"][0], got["k700"][0]) == (1595, 1600, 700)
    embfile.tag(ds, "weekly", version=2)  # versions by a tag's name too
    assert (
        sorted(r.key for r in embfile.spark.read(spark, str(ds), version=3, since="weekly").collect()) == keys[590:610]
    )
    tagged = spark.read.format("embfile").option("version", 3).option("since", "weekly").load(str(ds))
    assert sorted(r.key for r in tagged.collect()) == keys[590:610]
    assert embfile.spark.read(spark, str(ds), since=3).collect() == []
    with pytest.raises(Exception, match="no version 9"):
        spark.read.format("embfile").option("since", 9).load(str(ds)).collect()


def test_the_jvm_reader_refuses_a_file_changed_since_planning_or_damaged(spark, tmp_path):
    keys, matrix = expected(300)
    path = tmp_path / "one.emb"
    embfile.write(path, (keys, matrix))
    planned = embfile.spark.read(spark, str(path))
    embfile.write(tmp_path / "other.emb", (keys[:299], matrix[:299]))
    os.replace(tmp_path / "other.emb", path)
    with pytest.raises(Exception, match="one.emb: changed since the read was planned"):
        planned.collect()
    damaged = tmp_path / "damaged.emb"
    embfile.write(damaged, (keys, matrix))
    with embfile.open(damaged) as db:
        offsets_at = db.files[0].header.keys_offset
    with open(damaged, "r+b") as f:  # key 100 ends before it starts: opening does not read so far
        f.seek(offsets_at + 8 * 101)
        f.write((3).to_bytes(8, "little"))
    with pytest.raises(Exception, match="damaged.emb: the offsets of key 100 are out of order"):
        embfile.spark.read(spark, str(damaged)).collect()
    ragged = tmp_path / "ragged.emb"
    embfile.write(ragged, {k: np.ones((3, 8), np.float32) for k in keys}, ragged=True)
    with embfile.open(ragged) as db:
        ranges_at = db.files[0].header.ranges_offset
    with open(ragged, "r+b") as f:  # record 200 ends before it starts
        f.seek(ranges_at + 8 * 201)
        f.write((5).to_bytes(8, "little"))
    with pytest.raises(Exception, match="ragged.emb: the rows of record 200 are out of order"):
        embfile.spark.read(spark, str(ragged)).collect()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return {name: pathlib.Path(p) for name, (p, _) in mutate.write_seeds(tmp_path_factory.mktemp("seeds")).items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_jvm_reader_on_hostile_files_reads_or_names_the_damage(spark, seeds, tmp_path_factory, data):
    """Damaged files (fuzz/mutate.py) either fail planning with embfile's error, fail the read with the
    reader's own message naming the file, or read: never another JVM exception."""
    original = seeds[data.draw(st.sampled_from(sorted(seeds)))].read_bytes()
    ops, reseal = data.draw(mutate.mutations(original))
    case = tmp_path_factory.mktemp("case") / "case.emb"
    case.write_bytes(mutate.apply(original, ops, reseal))
    try:
        df = embfile.spark.read(spark, str(case))
    except embfile.EmbFileError:
        return
    try:
        df.collect()
    except Exception as e:
        assert f"embfile: {case}: " in str(e), (ops, reseal, str(e)[:2000])
        event(str(e).split(f"{case}: ")[1][:40])


def test_a_url_is_read_through_the_python_data_source(spark, tmp_path):
    """The JVM reader reads files every executor sees; a URL's tasks fetch their part themselves."""
    keys, matrix = expected(700)
    (tmp_path / "srv").mkdir()
    embfile.write_shards(tmp_path / "srv" / "ds", (keys, matrix), shard_bytes=200 * 8 * 4)
    server = RangeServer(str(tmp_path / "srv"))
    try:
        df = embfile.spark.read(spark, f"{server.url}/ds", rows_per_partition=150)
        assert "EmbfileReader" not in df._jdf.queryExecution().toString()
        got = {r.key: r.vector for r in df.collect()}
    finally:
        server.stop()
    np.testing.assert_array_equal(np.array([got[k] for k in keys]), matrix)


@pytest.mark.parametrize("missing", ["jdk", "spark jars", "writable cache", "jar the driver sees"])
def test_where_the_reader_cannot_be_built_read_warns_and_reads_through_python(spark, tmp_path, monkeypatch, missing):
    from embfile.spark import _jvm

    keys, matrix = expected(200)
    embfile.write(tmp_path / "one.emb", (keys, matrix))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no jar compiled yet
    why = {
        "jdk": "no JDK .javac. to compile the JVM reader",
        "spark jars": "the JVM reader does not compile against Spark .*error: package org.apache.spark",
        "writable cache": "cannot build the JVM reader in .*cache/embfile/spark",
        "jar the driver sees": "the session's driver could not add the JVM reader's jar .*gone.jar",
    }[missing]
    if missing == "jdk":
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.delenv("JAVA_HOME", raising=False)
    elif missing == "spark jars":
        (tmp_path / "spark" / "jars").mkdir(parents=True)
        monkeypatch.setenv("SPARK_HOME", str(tmp_path / "spark"))
    elif missing == "writable cache":
        (tmp_path / "cache").write_text("a file where the cache folder would be")
    else:  # as a Spark Connect server on another machine is given a path on the client's
        monkeypatch.setattr(_jvm, "jar", functools.cache(lambda version: str(tmp_path / "gone.jar")))
    _jvm.jar.cache_clear()
    embfile.spark._warn_once.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"embfile.spark.read: {why}.*; reading through the Python data source"):
            df = embfile.spark.read(spark, str(tmp_path / "one.emb"))
    finally:
        _jvm.jar.cache_clear()
    assert "EmbfileReader" not in df._jdf.queryExecution().toString()
    got = {r.key: r.vector for r in df.collect()}
    np.testing.assert_array_equal(np.array([got[k] for k in keys]), matrix)


def test_a_python_read_task_builds_arrow_from_its_own_file_alone(damaged_second_shard):
    """A task of the Python data source makes Arrow of the file holding its rows, not of the whole dataset (a
    task per file checking every file's keys cost the number of files squared): a damaged shard fails the task
    reading it, naming it, and no other."""
    from embfile.spark import EmbfileDataSource

    path, damaged, keys, matrix = damaged_second_shard
    reader = EmbfileDataSource({"path": str(path)}).reader(None)
    first, second = reader.partitions()[:2]
    batch = pa.Table.from_batches(list(reader.read(first)))
    assert batch.column("key").to_pylist() == keys[:300]
    np.testing.assert_array_equal(np.array(batch.column("vector").to_pylist()), matrix[:300])
    with pytest.raises(embfile.CorruptFileError, match=f"{damaged}: keys or ranges section damaged"):
        list(reader.read(second))


CONNECT_SESSION = """
import sys, warnings
import numpy as np
import embfile, embfile.spark
from pyspark.sql import SparkSession

path = sys.argv[1]
spark = SparkSession.builder.remote("local[2]").config("spark.connect.grpc.binding.address", "127.0.0.1")
spark = spark.config("spark.ui.enabled", "false").getOrCreate()
assert type(spark).__module__.startswith("pyspark.sql.connect"), type(spark)
embfile.spark.register(spark)
df = spark.range(0, 1000, numPartitions=4).selectExpr(
    "concat('k', cast(id as string)) as id", "array(cast(id as float), cast(id / 2 as float)) as emb"
)
df.write.format("embfile").mode("append").option("key", "id").option("vector", "emb").save(path)
with embfile.open(path) as db:
    assert len(db) == 1000 and db["k7"].tolist() == [7, 3.5], db["k7"]
with warnings.catch_warnings():
    warnings.simplefilter("error")  # the JVM reader: read() warns where it falls back to Python
    jvm = embfile.spark.read(spark, path)
for frame in (jvm, spark.read.format("embfile").load(path)):
    rows = {r.key: r.vector for r in frame.collect()}
    assert len(rows) == 1000 and rows["k999"] == [999.0, 499.5], rows["k999"]
keys = spark.createDataFrame([("k3",), ("nope",)], ["key"])
got = {r.key: r.vector for r in embfile.spark.lookup(keys, path).collect()}
assert got == {"k3": [3.0, 1.5], "nope": None}, got
spark.stop()
print("ok")
"""


def test_a_spark_connect_session_writes_reads_and_looks_up(tmp_path):
    """Through Spark Connect (a local Connect server, the client in a process of its own as a user's is): the
    data source writes and reads, the JVM reader's jar is added by the client, lookup joins."""
    pytest.importorskip("pyspark.sql.connect.session")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONPATH": root}  # as the session fixture's workers
    run = [sys.executable, "-c", CONNECT_SESSION, str(tmp_path / "ds")]
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert not stray_files(tmp_path / "ds")


def test_a_dataset_at_an_s3_url_written_read_and_looked_up(spark, s3, tmp_path, monkeypatch):
    """Tasks upload their shards (a killed attempt's leave no object), the driver commits reading their keys;
    both the Python source and ``lookup`` read it back; per-residue records too."""
    from embfile.remote.dataset import read_manifest

    monkeypatch.setenv("EMBFILE_CACHE", str(tmp_path / "driver-cache"))
    opts, url, fs = s3.storage_options(), "s3://embs/spark", s3.filesystem()
    storage = json.dumps(opts)
    df = frame(spark, 4000, partitions=4).repartition(4)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "100")
    try:
        failing = df.mapInArrow(_failing_first("exit"), df.schema)
        save(failing, url, shard_bytes=150 * 8 * 4, storage_options=storage)  # partition 1 uploads, then dies
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    save(frame(spark, 1000, lo=4000), url, storage_options=storage)
    with pytest.raises(Exception, match="already in the dataset"):
        save(frame(spark, 10), url, storage_options=storage)
    keys, matrix = expected(5000)
    with embfile.open(url, storage_options=opts) as db:
        assert (db.version, len(db)) == (2, 5000) and sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys), matrix)
        manifests = [read_manifest(db.remote, v) for v in (1, 2)]
    shards = {f"shards/{p.rsplit('/', 1)[-1]}" for p in fs.ls("embs/spark/shards", refresh=True)}
    assert shards == {s.path for m in manifests for s in m.shards}  # nothing of the failed attempts is left

    got = {r.key: r.vector for r in embfile.spark.read(spark, url, storage_options=opts).collect()}
    np.testing.assert_array_equal(np.array([got[k] for k in keys]), matrix)
    wanted = spark.createDataFrame([(k,) for k in ["k7", "nope", "k4999"]], "key string")
    found = {r.key: r.vector for r in embfile.spark.lookup(wanted, url, storage_options=opts).collect()}
    assert found["nope"] is None and np.allclose(found["k4999"], matrix[4999])

    records = {f"r{i}": np.full((i % 7 + 1, 3), i, np.float32) for i in range(300)}
    rows = [(k, v.tolist()) for k, v in records.items()]
    ragged = spark.createDataFrame(rows, "key string, vector array<array<float>>").repartition(3)
    ragged.write.format("embfile").mode("append").option("storage_options", storage).save("s3://embs/spark-ragged")
    back = embfile.spark.read(spark, "s3://embs/spark-ragged", storage_options=opts, rows_per_partition=200)
    assert back.rdd.getNumPartitions() >= 3
    assert {r.key: np.array(r.vector) for r in back.collect()}.keys() == records.keys()
    assert all(np.array_equal(np.array(r.vector), records[r.key]) for r in back.collect())
    with pytest.raises(Exception, match="storage_options is not JSON"):
        spark.read.format("embfile").option("storage_options", "{endpoint").load(url).collect()
