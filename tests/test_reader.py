"""EmbFile as a read-only Mapping: lookups, batches, views, metadata, lifetime."""

import collections.abc
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import check_roundtrip
from workers import content

import embfile
from embfile import _core, _pages, dataset


def test_mapping_protocol(study):
    path, keys, matrix = study
    db = embfile.open(path)
    assert isinstance(db, collections.abc.Mapping)
    assert len(db) == len(keys) and list(db) == keys
    assert list(db.keys()) == keys
    np.testing.assert_array_equal(np.stack(list(db.values())), matrix)
    k, v = next(iter(db.items()))
    assert k == keys[0]
    np.testing.assert_array_equal(v, matrix[0])
    assert db.get("absent") is None
    assert db.get("absent", 7) == 7
    np.testing.assert_array_equal(db.get(keys[3]), matrix[3])
    assert keys[3] in db and "absent" not in db and keys[3] in db.keys()


def test_lookup_is_a_read_only_view(study):
    path, keys, _ = study
    db = embfile.open(path)
    v = db[keys[10]]
    assert v.shape == (db.dim,) and v.dtype == np.float64
    assert not v.flags.writeable
    with pytest.raises(ValueError):
        v[0] = 1.0
    assert not db.matrix.flags.writeable


def test_missing_key_names_it(study):
    db = embfile.open(study[0])
    with pytest.raises(KeyError, match="seq-missing") as info:
        db["seq-missing"]
    assert isinstance(info.value, embfile.KeyNotFoundError)
    with pytest.raises(embfile.KeyNotFoundError, match="nope"):
        db.get_batch([study[1][0], "nope"])
    with pytest.raises(KeyError, match="nope"):
        db.rows(["nope"])


def test_get_batch_orders_and_types(study):
    path, keys, matrix = study
    db = embfile.open(path)
    pick = [keys[i] for i in (5, 0, 499, 5)]
    want = matrix[[5, 0, 499, 5]]
    np.testing.assert_array_equal(db.get_batch(pick), want)
    np.testing.assert_array_equal(db.get_batch(tuple(pick)), want)
    np.testing.assert_array_equal(db.get_batch(np.array(pick)), want)
    np.testing.assert_array_equal(db.get_batch(np.array(pick, dtype=object)), want)
    out = db.get_batch(pick)
    assert out.flags.writeable and out.flags.owndata is not None
    out[:] = 0  # a fresh array: writing to it does not touch the file
    np.testing.assert_array_equal(db[keys[5]], matrix[5])
    assert db.get_batch([]).shape == (0, db.dim)
    np.testing.assert_array_equal(db.rows(pick), [5, 0, 499, 5])
    pa = pytest.importorskip("pyarrow")  # a column of ids read with pyarrow: its items are Arrow scalars
    for column in (pa.array(pick), pa.chunked_array([pick[:1], pick[1:]], pa.large_string())):
        np.testing.assert_array_equal(db.get_batch(column), want)  # "keys are str, not StringScalar"
        np.testing.assert_array_equal(db.rows(column), [5, 0, 499, 5])
        assert db.search_keys(column, k=1, exclude_self=False)[1].ravel().tolist() == pick
        if isinstance(column, pa.Array):
            embfile.subset(path, path.parent / "subset.emb", pa.array(pick[:3]))
            assert list(embfile.open(path.parent / "subset.emb")) == sorted(pick[:3], key=keys.index)
    with pytest.raises(TypeError, match="embfile keys are str, not NoneType"):
        db.get_batch(pa.array([keys[0], None]))


def test_to_numpy_is_an_in_memory_copy(study, tmp_path):
    path, keys, matrix = study
    with embfile.open(path) as db:
        whole = db.to_numpy()
    np.testing.assert_array_equal(whole, matrix)
    assert whole.dtype == matrix.dtype and whole.flags.writeable and whole.flags.c_contiguous
    whole[:] = 0  # its own memory, not the file's
    assert whole.ctypes.data % 4096 == 0  # lined up with the page cache: the kernel copies at full speed
    embfile.write(tmp_path / "empty.emb", ([], np.zeros((0, 3), np.float16)))
    assert embfile.open(tmp_path / "empty.emb").to_numpy().shape == (0, 3)


def test_iteration_reading_keys_ahead_gives_every_key_once(tmp_path):
    # more keys than two read-ahead stretches, the last one cut short by the end of the file
    keys = [f"k{i:07d}" for i in range(2 * dataset.KEYS_AHEAD + 5000)]
    embfile.write(tmp_path / "x.emb", (keys, np.zeros((len(keys), 1), np.uint8)))
    with embfile.open(tmp_path / "x.emb") as db:
        assert list(db) == keys


def test_to_numpy_reads_the_opened_file_even_after_it_was_replaced(tmp_path):
    path, matrix = tmp_path / "x.emb", np.arange(12.0).reshape(4, 3)
    embfile.write(path, (list("abcd"), matrix))
    with embfile.open(path) as db:
        embfile.write(path, (list("abcd"), -matrix))  # atomic rename: the path names a new file
        np.testing.assert_array_equal(db.to_numpy(), matrix)
        os.remove(path)
        np.testing.assert_array_equal(db.to_numpy(), matrix)


def test_to_numpy_of_a_file_truncated_after_open_raises(tmp_path):
    path = tmp_path / "x.emb"
    embfile.write(path, ([f"k{i}" for i in range(100)], np.ones((100, 1024), np.float32)))
    with embfile.open(path) as db:
        os.truncate(path, db.header.records_offset + 4096 * 50)
        with pytest.raises(embfile.TruncatedFileError, match="truncated after it was opened"):
            db.to_numpy()


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_pages.MADV_POPULATE_WRITE is None, reason="MADV_POPULATE_WRITE is Linux's")
def test_fault_in_ahead_makes_every_page_of_the_array_resident():
    out = _pages.aligned_empty(8 * _pages.POPULATE_STEP, np.uint8)  # np.empty: nothing resident yet
    before = _resident_bytes()
    with _pages.faulted_in_ahead(out):
        pass  # the caller writes nothing: all the faulting is the helper's
    assert _resident_bytes() - before >= 0.9 * out.nbytes


def test_to_numpy_of_a_large_file_faulted_in_ahead(tmp_path, monkeypatch):
    monkeypatch.setattr(_pages.Layout, "first_part_cached", lambda self: True)  # as after the truncation
    path, rows = tmp_path / "x.emb", 3 * _pages.POPULATE_STEP // 4096
    matrix = np.random.default_rng(0).random((rows, 1024), dtype=np.float32)
    embfile.write(path, ([f"k{i}" for i in range(rows)], matrix))
    with embfile.open(path) as db:
        np.testing.assert_array_equal(db.to_numpy(), matrix)
        os.truncate(path, db.header.records_offset + matrix.nbytes // 2)
        with pytest.raises(embfile.TruncatedFileError):
            db.to_numpy()
    assert not [t for t in threading.enumerate() if t.name == "embfile-fault-in"]  # stopped and joined


def test_to_numpy_faults_in_ahead_only_from_a_cached_file(tmp_path, monkeypatch):
    """From disk the read-ahead sets the pace, and the helper's page allocations would slow it."""
    path, rows = tmp_path / "x.emb", 3 * _pages.POPULATE_STEP // 4096
    matrix = np.random.default_rng(1).random((rows, 1024), dtype=np.float32)
    embfile.write(path, ([f"k{i}" for i in range(rows)], matrix))
    helped, real = [], dataset.faulted_in_ahead
    monkeypatch.setattr(dataset, "faulted_in_ahead", lambda out: helped.append(out.nbytes) or real(out))
    with embfile.open(path) as db:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        records = int(db._layout().bases[0]), matrix.nbytes
        if _core.resident_fraction(*records) > 0.1:
            pytest.skip("this file system keeps the file in memory (tmpfs?)")
        np.testing.assert_array_equal(db.to_numpy(), matrix)  # cold: no helper
        assert helped == [] and _core.resident_fraction(*records) == 1.0  # and now it is cached
        np.testing.assert_array_equal(db.to_numpy(), matrix)
    assert helped == [matrix.nbytes]


def test_wrong_key_types(study):
    db = embfile.open(study[0])
    for bad in (1, b"seq0000000001", None, 1.5):
        with pytest.raises(TypeError, match="keys are str"):
            db[bad]
    with pytest.raises(TypeError, match="single key"):
        db.get_batch("seq0000000001")
    with pytest.raises(TypeError):
        db.get_batch([1, 2])


def test_keys_between(study):
    path, keys, _ = study
    db = embfile.open(path)
    assert db.keys_between(0, 3) == keys[:3]
    assert db.keys_between(498, 10**9) == keys[498:]
    assert db.keys_between(600, 700) == []
    assert db.key(17) == keys[17] and db.key(-1) == keys[-1]  # negative counts from the end, as record() does
    with pytest.raises(IndexError, match="row -501 out of range for 500 records"):
        db.key(-501)
    with pytest.raises(IndexError):
        db.key(500)
    # keys_at takes rows as take() does (any ints; it said "Buffer dtype mismatch" to all but uint64)
    for rows in ([3, 1, 499], np.array([3, 1, 499]), np.array([3, 1, 499], np.int32), np.array([3, 1, 499], np.uint64)):
        assert db.keys_at(rows) == [keys[3], keys[1], keys[499]]
    assert db.keys_at([]) == []
    with pytest.raises(IndexError, match="rows must be from 0 to 499"):
        db.keys_at([500])
    with pytest.raises(TypeError, match=r"keys_at\(\) needs a 1-d sequence of row numbers"):
        db.keys_at([0.5])


def test_metadata(study):
    meta = embfile.open(study[0]).metadata
    assert meta["model"] == "esm2_t33_650M_UR50D" and meta["layer"] == 33
    rec = meta["embfile"]
    assert rec["format_version"] == "1.0" and rec["dtype"] == "float64"
    assert rec["dim"] == 32 and rec["count"] == 500
    assert rec["embfile_version"] == embfile.__version__ and rec["created"]


def test_close_and_context_manager(study):
    path, keys, matrix = study
    with embfile.open(path) as db:
        v = db[keys[1]]
        m = db.matrix
    for op in (
        lambda: db[keys[1]],
        lambda: len(db),
        lambda: keys[1] in db,
        lambda: db.matrix,
        lambda: db.get_batch(keys[:2]),
        lambda: list(db),
        lambda: db.verify(),
        lambda: db.metadata,
    ):
        with pytest.raises(embfile.ClosedFileError):
            op()
    # arrays handed out before close keep their mapping alive
    np.testing.assert_array_equal(v, matrix[1])
    np.testing.assert_array_equal(m, matrix)
    db.close()  # closing twice is fine
    assert "closed" in repr(db)


def test_views_outlive_the_file_object(study):
    path, keys, matrix = study
    db = embfile.open(path)
    views = [db[k] for k in keys[:5]]
    del db
    import gc

    gc.collect()
    np.testing.assert_array_equal(np.stack(views), matrix[:5])


def test_pickle_reopens_by_path(study):
    path, keys, matrix = study
    db = embfile.open(path)
    clone = pickle.loads(pickle.dumps(db))
    assert clone.path == db.path and len(clone) == len(db)
    np.testing.assert_array_equal(clone[keys[7]], matrix[7])


def _child_lookups(db, keys):
    return [float(db[k].sum()) for k in keys]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes(study, method):
    path, keys, matrix = study
    db = embfile.open(path)
    db[keys[0]]  # touch it in the parent first
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        chunks = [keys[i::4] for i in range(4)]
        got = pool.starmap(_child_lookups, [(db, c) for c in chunks])
    for chunk, sums in zip(chunks, got):
        assert sums == [float(matrix[keys.index(k)].sum()) for k in chunk]


def test_fork_child_uses_parent_object(study):
    path, keys, matrix = study
    db = embfile.open(path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: use the inherited object and the mapping
        ok = np.array_equal(db.get_batch(keys), matrix) and np.array_equal(db[keys[-1]], matrix[-1])
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)


def test_awkward_keys(tmp_path):
    keys = [
        "sp|P69905|HBA_HUMAN",
        "with space",
        "a/b.c",
        "ünïcödé-蛋白质",
        "x" * 1024,
        "",
        "a",
        "ab",
        "a\x00",
        "\U0001f9ec",
        "tr|Q9|X Y Z",
        "abc\x00def",
    ]
    matrix = np.arange(len(keys) * 3, dtype=np.float32).reshape(-1, 3)
    check_roundtrip(tmp_path / "k.emb", keys, matrix)


def test_long_keys_and_shared_prefixes(tmp_path):
    # keys equal in their first 1000 bytes: the index must settle on whole keys
    keys = ["P" * 1000 + f"{i:05d}" for i in range(300)] + ["P" * 1000, "P" * 999]
    matrix = np.random.default_rng(1).random((len(keys), 2))
    check_roundtrip(tmp_path / "p.emb", keys, matrix)
    db = embfile.open(tmp_path / "p.emb")
    assert "P" * 1001 not in db and "P" * 998 not in db and "Q" not in db


def test_key_size_limit(tmp_path):
    big = "k" * embfile._format.MAX_KEY_BYTES
    check_roundtrip(tmp_path / "big.emb", [big, "small"], np.ones((2, 1)))


@pytest.mark.parametrize(
    "dtype", ["float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
)
def test_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(2)
    matrix = (rng.random((40, 7)) * 100).astype(dtype)
    check_roundtrip(tmp_path / f"{dtype}.emb", [f"id{i}" for i in range(40)], matrix)


def test_empty_and_dim_one(tmp_path):
    with embfile.Writer(tmp_path / "empty.emb", dim=4):
        pass
    db = embfile.open(tmp_path / "empty.emb")
    assert len(db) == 0 and list(db) == [] and db.matrix.shape == (0, 4)
    assert "x" not in db and db.get_batch([]).shape == (0, 4)
    db.verify()
    check_roundtrip(tmp_path / "one.emb", ["only"], np.array([[3.0]]))


def test_many_keys_match_a_dict(tmp_path):
    rng = np.random.default_rng(3)
    n = 20_000
    keys = [f"{rng.integers(1 << 40):x}-{i}" for i in range(n)]
    matrix = rng.random((n, 2)).astype(np.float32)
    embfile.write(tmp_path / "m.emb", (keys, matrix))
    db = embfile.open(tmp_path / "m.emb")
    probe = rng.choice(n, 2000)
    np.testing.assert_array_equal(db.get_batch([keys[i] for i in probe]), matrix[probe])
    assert all(db.row(keys[i]) == i for i in probe[:200])
    assert sum(f"{k}!" in db for k in keys[:500]) == 0
    db.verify()


REPLACER = """
import os, sys, time
folder, stop = sys.argv[1], time.monotonic() + float(sys.argv[2])
i = 1  # the path starts as g1 (rename() between two links of one file would do nothing)
while time.monotonic() < stop and not os.path.exists(os.path.join(folder, "stop")):
    tmp = os.path.join(folder, "next.emb")
    os.link(os.path.join(folder, f"g{i % 2 + 1}.emb"), tmp)  # a new name for one of two files
    os.replace(tmp, os.path.join(folder, "db.emb"))           # renamed onto the path, as writers do
    i += 1
"""


def test_open_racing_a_rename_gets_one_file_or_the_other(tmp_path):
    """A process renames one of two files onto the path as fast as it can; every open
    meanwhile gets one of them, whole (never an error, never a mix of the two)."""
    for g in (1, 2):
        embfile.write(tmp_path / f"g{g}.emb", content(50, 4, g), metadata={"generation": g})
    os.link(tmp_path / "g1.emb", tmp_path / "db.emb")
    replacer = subprocess.Popen([sys.executable, "-c", REPLACER, str(tmp_path), "60"])
    try:
        seen = set()
        for _ in range(3000):
            with embfile.open(tmp_path / "db.emb") as db:
                g = db.metadata["generation"]
                keys, m = content(50, 4, g)
                assert np.array_equal(db.get_batch(keys), m) and np.array_equal(db.matrix, m)
                seen.add(g)
    finally:
        (tmp_path / "stop").touch()
        replacer.wait(timeout=60)
    assert seen == {1, 2}


def _evicted(path):
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _all_resident(address, length, seconds=20.0):
    """Whether every page of the range is in the page cache within ``seconds`` (hinted reads are async)."""
    deadline = time.monotonic() + seconds
    while _core.resident_fraction(address, length) < 1.0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_long_hint_reads_every_page(tmp_path):
    """WILLNEED reads at most the device's read-ahead size per call and silently drops the rest: the hints of
    the epochs' read-ahead and of random gathers are asked in steps, so a range of any length is read whole."""
    import mmap

    m = np.ones((6000, 1000), np.float32)  # 24 MB: more than any default read-ahead size
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(6000)], m))
    with embfile.open(tmp_path / "db.emb") as db:
        layout = db._layout()
        ((address, length),) = layout.page_ranges(0, 6000)
        _evicted(tmp_path / "db.emb")
        if _core.resident_fraction(address, length) < 0.5:  # evicted (a file system may not drop its pages)
            layout.advise(0, 6000, mmap.MADV_WILLNEED)
            assert _all_resident(address, length)
        _evicted(tmp_path / "db.emb")
        if _core.resident_fraction(address, length) < 0.5:
            every = np.arange(6000, dtype=np.uint64)  # one run of touching pieces
            assert _core.prefetch(layout.bases, layout.starts, layout.record_bytes, every, sample=0) > 1
            assert _all_resident(address, length)


def test_a_worker_s_random_gathers_count_for_every_worker(tmp_path):
    """Past an eighth of an epoch's records, a cold random gather reads the 64 KiB pieces around each record
    (the epoch will want its neighbours).  A DataLoader worker gathers one of ``num_workers`` shares of the
    epoch, so its own count is multiplied by theirs: with two workers, past a sixteenth of its own."""
    m = np.ones((3000, 1000), np.float32)
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(3000)], m))
    piece = 65536
    assert _core.prefetch_chunk(188, 3000) < piece <= _core.prefetch_chunk(2 * 188, 3000)  # past a sixteenth
    with embfile.open(tmp_path / "db.emb") as db:
        layout = db._layout()
        _evicted(tmp_path / "db.emb")
        base = int(layout.bases[0])
        if _core.resident_fraction(base, 3000 * 4000 // 4096 * 4096) >= 0.5:
            pytest.skip("this file system keeps the file's pages")
        layout.random_rows[0] = 188
        rows = np.array([300, 1500, 2600], np.uint64)
        out = np.empty((3, 1000), np.float32)
        layout.gather_random(rows, out, processes=2)
        np.testing.assert_array_equal(out, 1.0)
        for r in rows.tolist():
            assert _all_resident(base + r * 4000 // piece * piece, piece)  # the record's whole piece


def test_random_gathers_ask_for_uncached_pages_at_once(tmp_path):
    """A gather of rows from anywhere asks the kernel for all their pages together when a sample of them is not
    in the page cache (and not when it is), and gives the same records either way."""
    from embfile import _core
    from embfile._pages import Layout  # noqa: F401 - the layout is what take() gathers through

    rng = np.random.default_rng(0)
    m = rng.standard_normal((3000, 1000)).astype(np.float32)
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(3000)], m))
    os.sync()
    fd = os.open(tmp_path / "db.emb", os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    with embfile.open(tmp_path / "db.emb") as db:
        layout = db._layout()
        rows = np.sort(rng.choice(3000, 200, replace=False)).astype(np.uint64)
        if _core.resident_fraction(int(layout.bases[0]), 3000 * 4000 // 4096 * 4096) < 0.5:  # evicted
            assert 0 < _core.prefetch(layout.bases, layout.starts, layout.record_bytes, rows) <= 200
        db.take(rows)
        assert _core.prefetch(layout.bases, layout.starts, layout.record_bytes, rows) == 0  # cached now
        adjacent = np.arange(100, 130, dtype=np.uint64)  # pages that touch: one range (of less than a step)
        assert _core.prefetch(layout.bases, layout.starts, layout.record_bytes, adjacent, sample=0) == 1
        np.testing.assert_array_equal(db.take(rows[::-1].astype(np.int64)), m[rows[::-1].astype(np.int64)])
        keys = [f"k{i}" for i in rows[::-1]]
        np.testing.assert_array_equal(db.get_batch(keys), m[rows[::-1].astype(np.int64)])
