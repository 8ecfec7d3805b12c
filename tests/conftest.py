"""Shared checkers and the hypothesis profiles (HYPOTHESIS_PROFILE=dev|ci|expensive)."""

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import embfile

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "expensive",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# The long run (README "Guarantees"): exhaustive damage, more kill points, longer stress.
LONG = os.environ.get("HYPOTHESIS_PROFILE") == "expensive"


def reference_lookup(keys, key):
    """The oracle: a binary search in numpy over the UTF-8 keys, as the format defines the order."""
    encoded = np.array([k.encode() for k in keys], dtype=object)
    order = sorted(range(len(keys)), key=lambda i: encoded[i])
    sorted_keys = [encoded[i] for i in order]
    import bisect

    pos = bisect.bisect_left(sorted_keys, key.encode())
    if pos < len(sorted_keys) and sorted_keys[pos] == key.encode():
        return order[pos]
    return None


def check_roundtrip(path, keys, matrix, dtype=None):
    """Write (keys, matrix), reopen, and compare every access path with the source."""
    embfile.write(path, (keys, matrix), dtype=dtype)
    want = np.asarray(matrix).astype(dtype or np.asarray(matrix).dtype)
    with embfile.open(path) as db:
        assert len(db) == len(keys)
        assert db.dim == want.shape[1]
        assert db.dtype == want.dtype
        assert list(db) == list(keys)
        assert db.matrix.shape == want.shape
        np.testing.assert_array_equal(db.matrix, want)
        for i, k in enumerate(keys):
            assert k in db
            assert db.row(k) == i
            np.testing.assert_array_equal(db[k], want[i])
        np.testing.assert_array_equal(db.get_batch(list(keys)[::-1]), want[::-1])
        np.testing.assert_array_equal(db.rows(keys), np.arange(len(keys)))
        db.verify()


@pytest.fixture
def study(tmp_path):
    """A small version of the "Pickle vs HDF5" workload: seq{i:010d} -> float64 vectors."""
    rng = np.random.default_rng(0)
    keys = [f"seq{i:010d}" for i in range(500)]
    matrix = rng.random((500, 32))
    path = tmp_path / "study.emb"
    embfile.write(path, (keys, matrix), metadata={"model": "esm2_t33_650M_UR50D", "layer": 33})
    return path, keys, matrix


# Keys as users have them: UniProt FASTA ids, spaces, non-ASCII, one very long.
AWKWARD_KEYS = [
    "sp|P69905|HBA_HUMAN",
    "sp|P68871|HBB_HUMAN",
    "tr|A0A024R161|A0A024R161_HUMAN",
    "UniRef50_Q8WZ42 Titin",
    "protéine α-7 β",
    "蛋白质-1",
    "x" * 3000,
    "a b  c",
    "seq.1_2",
]


def assert_store(path, expected, dtype=None):
    """The .emb at ``path`` holds exactly ``expected`` ({key: vector}), bit for bit (NaN included)."""
    with embfile.open(path) as db:
        assert sorted(db) == sorted(expected)
        got = db.get_batch(list(expected))
        want = np.stack([np.asarray(v) for v in expected.values()]) if expected else got
        if dtype is not None:
            want = want.astype(dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
        db.verify()


# fuzz/: the hostile-file harness (exercise, mutate, sandbox) that tests/test_hostile.py drives
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def spark():
    """One Spark in local mode for the whole run: 2 cores, a task tried twice before its job fails.

    The repository's root is on the workers' PYTHONPATH, as site-packages is for an installed embfile, so
    Spark finds ``pyspark_embfile`` by itself (an editable install hides top-level modules from that search).
    """
    pyspark = pytest.importorskip("pyspark.sql")
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    session = (
        pyspark.SparkSession.builder.master("local[2,2]")
        .appName("embfile-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def dask_client(tmp_path_factory):
    """One Dask LocalCluster for the whole run: 2 worker processes of one thread each, on 127.0.0.1 (the cache
    of remote files they read in a folder of the run's)."""
    distributed = pytest.importorskip("distributed")
    cache = str(tmp_path_factory.mktemp("worker-cache"))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            env={"EMBFILE_CACHE": cache},
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def s3():
    """moto's S3 API server on 127.0.0.1 (tests/servers.py) with a bucket ``embs``; each test its own prefix."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    sys.path.insert(0, os.path.dirname(__file__))
    from servers import S3Server

    server = S3Server()
    server.bucket("embs")
    yield server
    server.stop()


@pytest.fixture
def damaged_second_shard(tmp_path):
    """A dataset of 4 shards of 300, 300, 300 and 100 keys whose second shard has a key offset out of order:
    ``(path, that shard's file name, keys, matrix)``."""
    keys = [f"k{i}" for i in range(1000)]
    matrix = np.arange(6000, dtype=np.float32).reshape(1000, 6)
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=300 * 6 * 4)
    with embfile.open(tmp_path / "ds") as ds:
        shard, h = ds.files[1].path, ds.files[1].header
    with open(shard, "r+b") as f:
        f.seek(h.keys_offset + 8 * 101)
        f.write((3).to_bytes(8, "little"))
    return tmp_path / "ds", os.path.basename(shard), keys, matrix
