"""Remote datasets against real servers on 127.0.0.1: moto's S3 server and an HTTP server with Range support and
fault injection.  Request counts are the servers' own."""

import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from glob import glob

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import embfile
from embfile.remote import cache as remote_cache
from embfile.remote import store

sys.path.insert(0, os.path.dirname(__file__))
from servers import RangeServer, S3Server

pytest.importorskip("s3fs")
pytest.importorskip("aiohttp")
# gcsfs would otherwise ask a gRPC control API, which the emulator does not serve, what kind each bucket is
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

N, DIM = 3000, 1024  # float32: each record its own 4096-byte page


def data(n=N, dim=DIM, seed=0):
    rng = np.random.default_rng(seed)
    return [f"prot|{i:06d}|HUMAN" for i in range(n)], rng.standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def served(tmp_path):
    """A single file and a grown dataset folder, served over HTTP; yields (server, keys, matrix, root)."""
    root = tmp_path / "srv"
    root.mkdir()
    keys, x = data()
    embfile.write(root / "one.emb", (keys, x), metadata={"model": "esm2"})
    folder = root / "ds"
    embfile.write_shards(folder, (keys[:1000], x[:1000]), shard_bytes=1 << 20)
    embfile.append(folder, (keys[1000:2000], x[1000:2000]))
    embfile.append(folder, (keys[2000:], x[2000:]))
    server = RangeServer(str(root))
    yield server, keys, x, root
    server.stop()


def open_http(server, name, cache, **kw):
    return embfile.open(f"{server.url}/{name}", cache_dir=cache, **kw)


def test_http_file_reads_like_the_local_file(served, tmp_path):
    server, keys, x, root = served
    with open_http(server, "one.emb", tmp_path / "c") as db, embfile.open(root / "one.emb") as local:
        assert isinstance(db, embfile.Dataset) and (len(db), db.dim, db.dtype) == (N, DIM, np.float32)
        assert db.metadata["model"] == "esm2"
        np.testing.assert_array_equal(db[keys[7]], x[7])
        assert keys[8] in db and "absent" not in db and db.get("absent") is None
        with pytest.raises(KeyError):
            db["absent"]
        assert db.row(keys[9]) == 9
        order = np.random.default_rng(1).permutation(N)[:300]
        np.testing.assert_array_equal(db.get_batch([keys[i] for i in order]), x[order])
        np.testing.assert_array_equal(db.find_rows([keys[5], "nope"]), [5, -1])
        np.testing.assert_array_equal(db.take([3, 2999, 3]), x[[3, 2999, 3]])
        np.testing.assert_array_equal(db.record(-1), x[-1])
        before = len(server.gets())
        assert list(db) == keys  # bulk: downloads the file once, then reads it locally
        np.testing.assert_array_equal(db.to_numpy(), local.to_numpy())
        assert sum(len(k) for k, _ in db.iter_batches(128, seed=3)) == N
        downloads = len(server.gets()) - before
        assert downloads == 1 and db.key(5) == keys[5]
        assert len(server.gets()) - before == downloads
        db.verify()


def test_lookup_request_budget(served, tmp_path):
    """Cold key: at most 3 requests; a key whose index pages are cached: 1 (its record); a key read: 0."""
    server, keys, x, _ = served
    cache = tmp_path / "c"
    with open_http(server, "one.emb", cache) as db:
        for i in (1234, 17, 2999):
            n = len(server.gets())
            np.testing.assert_array_equal(db[keys[i]], x[i])
            assert len(server.gets()) - n <= 3
            n = len(server.gets())
            np.testing.assert_array_equal(db[keys[i + 1 if i < 2999 else i - 1]], x[i + 1 if i < 2999 else i - 1])
            assert len(server.gets()) - n == 1  # its neighbour: same bucket, another record page
            n = len(server.gets())
            db[keys[i]], keys[i] in db, db.get_batch([keys[i]] * 5)
            assert len(server.gets()) == n
        n = len(server.gets())  # finding a key's row needs its index pages, not its record
        assert keys[2500] in db and db.row(keys[2500]) == 2500 and "nope" not in db
        assert list(db.rows(keys[2500:2501])) == list(db.find_rows([keys[2500]])) == [2500]
        assert len(server.gets()) - n <= 3
        n = len(server.gets())
        np.testing.assert_array_equal(db[keys[2500]], x[2500])
        assert len(server.gets()) - n == 1
    # a new handle, other process or later: the index pages come from the cache on disk
    with open_http(server, "one.emb", cache) as db:
        n = len(server.gets())
        np.testing.assert_array_equal(db[keys[1235]], x[1235])
        assert len(server.gets()) - n == 0  # its record was fetched above
        np.testing.assert_array_equal(db[keys[16]], x[16])
        assert len(server.gets()) - n == 1


def test_batch_merges_ranges(served, tmp_path):
    server, keys, x, _ = served
    with open_http(server, "one.emb", tmp_path / "c") as db:
        n = len(server.gets())
        np.testing.assert_array_equal(db.get_batch(keys[500:628]), x[500:628])
        assert len(server.gets()) - n <= 8  # 128 keys: a few index ranges, one records range


def test_s3_file_and_folder(served, s3, tmp_path):
    server, keys, x, root = served
    fs = s3.filesystem()
    fs.put(str(root / "one.emb"), "embs/one.emb")
    fs.put(str(root / "ds"), "embs/ds", recursive=True)
    opts = s3.storage_options()
    with embfile.open("s3://embs/one.emb", cache_dir=tmp_path / "c", storage_options=opts) as db:
        n = len(s3.gets())
        np.testing.assert_array_equal(db[keys[42]], x[42])
        assert len(s3.gets()) - n <= 3
        np.testing.assert_array_equal(db.get_batch(keys[::7]), x[::7])
    with embfile.open("s3://embs/ds", cache_dir=tmp_path / "c", storage_options=opts) as db:
        assert db.version == 3 and db.segments == 2 and len(db) == N
        np.testing.assert_array_equal(db.get_batch(keys[::-11]), x[::-11])
        assert "nope" not in db
        np.testing.assert_array_equal(db.to_numpy(), x)
    with embfile.open("s3://embs/ds", version=1, cache_dir=tmp_path / "c", storage_options=opts) as db:
        assert len(db) == 1000 and keys[1500] not in db


def test_gcs_file_and_folder(tmp_path, monkeypatch):
    """gs:// through gcsfs, against gcp-storage-emulator on 127.0.0.1: reads, then writes of a dataset.

    The emulator drops the last byte of an object uploaded in one request when that byte is ``\\r`` (its
    multipart parser strips it; embfile then refuses the file as truncated): with a fixed creation time every
    file written here has the same bytes from run to run, none ending so."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    server = server_module.create_server("127.0.0.1", 0, in_memory=True, default_bucket="embs")
    server.start()
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{server._api._httpd.server_address[1]}", "token": "anon"}
        keys, x = data(n=1000, dim=256)
        embfile.write("gs://embs/one.emb", (keys, x), storage_options=opts)
        with embfile.open("gs://embs/one.emb", cache_dir=tmp_path / "c", storage_options=opts) as db:
            n = db.requests
            np.testing.assert_array_equal(db[keys[777]], x[777])
            assert db.requests - n <= 3
            np.testing.assert_array_equal(db.get_batch(keys[::-3]), x[::-3])
            np.testing.assert_array_equal(db.to_numpy(), x)
        url = "gs://embs/ds"
        embfile.write_shards(url, (keys[:500], x[:500]), cache_dir=tmp_path / "c", storage_options=opts)
        assert embfile.append(url, (keys[500:], x[500:]), cache_dir=tmp_path / "c", storage_options=opts) == 2
        with embfile.open(url, cache_dir=tmp_path / "c2", storage_options=opts) as db:
            assert db.version == 2
            np.testing.assert_array_equal(db.get_batch(keys), x)
        from embfile import jobs  # Spark's and Dask's writes, and a vacuum, on the same store

        more, y = data(n=200, dim=256, seed=1)
        more = [f"more{k}" for k in more]
        job = jobs.start_job(url, mode="append", storage_options=opts, cache_dir=tmp_path / "c")
        parts = [jobs.write_part(job, p, [(more[p * 100 : p * 100 + 100], y[p * 100 : p * 100 + 100])]) for p in (0, 1)]
        assert jobs.commit_job(job, parts).version == 3
        store.Remote(url, opts).child("shards/killed-000001.emb").upload_bytes(b"half an upload")
        assert embfile.vacuum(url, keep=1, grace=0, storage_options=opts) == [1, 2]
        with embfile.open(url, cache_dir=tmp_path / "c3", storage_options=opts) as db:
            listed = {f"shards/{n}" for n in store.Remote(url, opts).child("shards").names()}
            assert listed == {s.path for s in db.manifest.shards}  # the killed upload's gone: gcsfs's dates read
            assert (db.version, len(db)) == (3, 1200)
            np.testing.assert_array_equal(db.get_batch(more), y)
            np.testing.assert_array_equal(db.get_batch(keys), x)
    finally:
        server.stop()


def test_to_arrow_of_a_dataset_just_opened(served, tmp_path):
    """A bulk read downloads first and reads the whole copies (it read the partial copies it had just closed)."""
    server, keys, x, _ = served
    with open_http(server, "ds", tmp_path / "c") as db:
        table = db.to_arrow()
    assert table.column("key").to_pylist() == keys
    np.testing.assert_array_equal(np.stack(table.column("vector").to_numpy(zero_copy_only=False)), x)


def test_http_folder_lookups_and_epochs(served, tmp_path):
    server, keys, x, _ = served
    with open_http(server, "ds", tmp_path / "c") as db:
        assert db.version == 3 and len(db.files) > 3
        for i in (3, 1500, 2999):
            n = len(server.gets())
            np.testing.assert_array_equal(db[keys[i]], x[i])
            assert len(server.gets()) - n <= 3  # the segments are probed in the same rounds
        seen = [k for ks, _ in db.iter_batches(100, seed=0) for k in ks]
        assert sorted(seen) == sorted(keys)


def test_changes_and_keys_by_row_at_a_url_read_keys_sections_not_records(served, tmp_path):
    server, keys, x, root = served
    folder_bytes = sum(p.stat().st_size for p in (root / "ds").rglob("*") if p.is_file())
    n = len(server.gets())
    c = embfile.changes(f"{server.url}/ds", since=1, cache_dir=tmp_path / "c1")
    assert (c.since, c.version, c.added, c.replaced, c.removed) == (1, 3, keys[1000:], [], [])
    assert server.sent(n) < folder_bytes / 20  # keys sections and index pages, no record
    assert embfile.changes(f"{server.url}/ds", since=3, version=2, cache_dir=tmp_path / "c1").removed == keys[2000:]
    with open_http(server, "one.emb", tmp_path / "c2") as db:
        n = len(server.gets())
        assert db.key(7) == keys[7] and db.key(-1) == keys[-1] and db.keys_between(2990, 3005) == keys[2990:]
        assert db.keys_at(np.array([4, 2], np.uint64)) == [keys[4], keys[2]]
        assert server.sent(n) < (root / "one.emb").stat().st_size / 20
    raw = bytearray((root / "one.emb").read_bytes())
    h = embfile.open(root / "one.emb").header
    raw[h.keys_offset + h.keys_size - 3] ^= 1  # a byte of the last key
    (root / "bad.emb").write_bytes(bytes(raw))
    with open_http(server, "bad.emb", tmp_path / "c3") as db:
        with pytest.raises(embfile.ChecksumError, match="bad.emb: the keys section does not match its checksum"):
            db.key(0)


def test_fetched_records_are_checked_and_then_read_without_requests(served, tmp_path):
    """What an engine's task does: its records' checksum blocks by range reads, each checked, then reads."""
    server, keys, x, root = served
    with open_http(server, "one.emb", tmp_path / "c") as db:
        n = len(server.gets())
        db.fetch_records(1000, 1300)  # 4 KiB records: rows 1000-1299 are in checksum blocks 3 to 5
        assert 1 << 20 < server.sent(n) < (root / "one.emb").stat().st_size / 2
        n = len(server.gets())
        np.testing.assert_array_equal(db.take(np.arange(1000, 1300)), x[1000:1300])
        assert db.keys_at(np.arange(1000, 1300, dtype=np.uint64)) == keys[1000:1300]
        assert len(server.gets()) == n
    _flip_row(root, "flipped.emb", 1200)  # block 4
    with open_http(server, "flipped.emb", tmp_path / "c") as db:
        db.fetch_records(0, 500)
        with pytest.raises(embfile.ChecksumError, match="flipped.emb: records block 4 does not match its checksum"):
            db.fetch_records(1000, 1300)


def _flip_row(root, name, row):
    """``root/name``: one.emb with a bit of record ``row`` flipped (4 KiB records: checksum block row // 256)."""
    raw = bytearray((root / "one.emb").read_bytes())
    raw[embfile.open(root / "one.emb").header.records_offset + row * 4096] ^= 1
    (root / name).write_bytes(bytes(raw))


def test_an_epoch_at_a_url_streams_its_windows_checked(served, tmp_path):
    """An epoch fetches each window's checksum blocks when it comes to it (the next window meanwhile), checks
    them and reads the partial copy: the first batch waits for a window, not the file, a rank fetches the
    windows of its share, and a resumed epoch the windows after its position."""
    server, keys, x, root = served
    size, where = (root / "one.emb").stat().st_size, {k: i for i, k in enumerate(keys)}

    def right(batches):
        for ks, v in batches:
            np.testing.assert_array_equal(v, x[[where[k] for k in ks]])
            yield from ks

    with open_http(server, "one.emb", tmp_path / "c") as db:
        n = len(server.gets())
        epoch = db.iter_batches(100, seed=0, buffer_blocks=2)  # windows of 2 MiB, the file 12 MB
        first = next(epoch)
        assert server.sent(n) < size / 2
        assert sorted(right([first, *epoch])) == sorted(keys)
        assert all(byte_range for _, _, byte_range in server.gets()[n:]) and not db._whole  # nothing downloaded
        assert server.sent(n) < 1.02 * size  # each page once
        n = len(server.gets())
        assert sum(len(b) for b in db.iter_batches(100, seed=0, epoch=1, keys=False)) == N
        assert len(server.gets()) == n  # all here now
    with open_http(server, "one.emb", tmp_path / "c2") as db:
        n = len(server.gets())
        share = list(right(db.iter_batches(100, seed=0, buffer_blocks=2, rank=1, world_size=3)))
        assert len(share) == N // 3 and server.sent(n) < 0.6 * size
    with open_http(server, "one.emb", tmp_path / "c3") as db:
        epoch = db.iter_batches(100, seed=0, buffer_blocks=2)
        seen = list(right(next(epoch) for _ in range(20)))
        state = epoch.state_dict()
    with open_http(server, "one.emb", tmp_path / "c4") as db:
        n = len(server.gets())
        epoch = db.iter_batches(100, seed=0, buffer_blocks=2)
        epoch.load_state_dict(state)
        assert sorted(seen + list(right(epoch))) == sorted(keys)
        assert server.sent(n) < 0.5 * size  # the windows from two thirds on
    _flip_row(root, "flipped.emb", 1200)
    with open_http(server, "flipped.emb", tmp_path / "c5") as db:
        with pytest.raises(embfile.ChecksumError, match="flipped.emb: records block 4 does not match its checksum"):
            list(right(db.iter_batches(100, seed=0, buffer_blocks=2)))  # right until the window holding it


def test_a_streamed_epoch_after_a_killed_one_and_with_a_damaged_cache(served, tmp_path):
    """A process killed while it streams an epoch leaves pages the next one uses or fetches again (and its lock
    to the kernel); a block of the cache's copy damaged on disk is fetched again, not yielded."""
    server, keys, x, root = served
    url, cache = f"{server.url}/one.emb", str(tmp_path / "c")
    server.delay = 0.05
    code = f"import embfile; [b for b in embfile.open({url!r}, cache_dir={cache!r}).iter_batches(50, buffer_blocks=1)]"
    child = subprocess.Popen([sys.executable, "-c", code])
    pages = os.path.join(cache, "pages", remote_cache.boot_id())
    deadline = time.time() + 60
    while time.time() < deadline and sum(np.fromfile(p, np.uint8).sum() for p in glob(f"{pages}/*.have")) < 1000:
        time.sleep(0.02)  # until a quarter of the file's pages are here
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    server.delay = 0.0
    with open_http(server, "one.emb", cache) as db:
        got = {k: v.copy() for ks, vs in db.iter_batches(100, seed=1) for k, v in zip(ks, vs)}
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), x)
    (copy,) = glob(f"{pages}/*.emb")
    with open(copy, "r+b") as f:  # a byte of row 2000's record (block 7), as a disk might damage it
        f.seek(embfile.open(root / "one.emb").header.records_offset + 2000 * 4096 + 7)
        f.write(b"\xff")
    with open_http(server, "one.emb", cache) as db:
        n = len(server.gets())
        got = {k: v.copy() for ks, vs in db.iter_batches(100, seed=2) for k, v in zip(ks, vs)}
        assert server.sent(n) == 1 << 20  # that block again
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), x)


def test_second_epoch_with_the_server_stopped(served, tmp_path):
    server, keys, x, _ = served
    db = open_http(server, "ds", tmp_path / "c")
    first = [k for ks, _ in db.iter_batches(256, seed=0, epoch=0) for k in ks]
    server.stop()
    second = {k: v.copy() for ks, vs in db.iter_batches(256, seed=0, epoch=1) for k, v in zip(ks, vs)}
    assert sorted(first) == sorted(second) == sorted(keys)
    np.testing.assert_array_equal(second[keys[77]], x[77])
    np.testing.assert_array_equal(db[keys[78]], x[78])
    db.close()


def _replace(path, seed):
    keys, x = data(seed=seed)
    tmp = str(path) + ".new"
    embfile.write(tmp, (keys, x))
    os.replace(tmp, path)
    return x


@pytest.mark.parametrize("where", ["http", "s3"])
def test_a_replaced_object_is_never_mixed_with_the_old(served, s3, tmp_path, where):
    server, keys, x, root = served
    if where == "http":
        url, opts, put = f"{server.url}/one.emb", None, lambda: None
    else:
        fs = s3.filesystem()
        fs.put(str(root / "one.emb"), "embs/r.emb")
        url, opts = "s3://embs/r.emb", s3.storage_options()

        def put():
            fs.put(str(root / "one.emb"), "embs/r.emb")

    cache = tmp_path / "c"
    db = embfile.open(url, cache_dir=cache, storage_options=opts)
    np.testing.assert_array_equal(db[keys[10]], x[10])
    new = _replace(root / "one.emb", seed=1)
    put()
    np.testing.assert_array_equal(db[keys[10]], x[10])  # already here: the old version, whole
    with pytest.raises(embfile.RemoteError, match="changed on the server"):
        db[keys[2000]]  # needs pages of the old version, which the server no longer has
    db.close()
    with embfile.open(url, cache_dir=cache, storage_options=opts) as db:  # a new handle sees the new object
        np.testing.assert_array_equal(db[keys[10]], new[10])
        np.testing.assert_array_equal(db[keys[2000]], new[2000])


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(store, "BACKOFF", 0.01)


@pytest.mark.parametrize("kind", ["500", "reset", "truncate"])
def test_transient_faults_are_retried(served, tmp_path, quick_retries, kind):
    server, keys, x, _ = served
    with open_http(server, "one.emb", tmp_path / "c") as db:
        server.faults = store_faults(kind, 2)
        np.testing.assert_array_equal(db[keys[100]], x[100])
        server.faults = store_faults(kind, 2)
        np.testing.assert_array_equal(db.to_numpy(), x)


def store_faults(kind, count, slow=0.0):
    from servers import Faults

    return Faults(kind, count, slow)


def test_persistent_faults_raise_one_clear_error(served, tmp_path, quick_retries):
    server, keys, _, _ = served
    with open_http(server, "one.emb", tmp_path / "c") as db:
        server.faults = store_faults("500", -1)
        with pytest.raises(embfile.RemoteError) as e:
            db[keys[100]]
        assert isinstance(e.value, OSError) and isinstance(e.value, embfile.EmbFileError)
        assert "one.emb" in str(e.value) and "\n" not in str(e.value)


def test_a_server_that_ignores_ranges_serves_whole_copies(served, tmp_path):
    """``python -m http.server`` answers a Range request with the whole file (it was refused: "the server
    ignored the Range request"): each file is kept whole in the cache from that one answer."""
    import functools
    import http.server
    import threading

    ranged, keys, x, root = served
    with open_http(ranged, "one.emb", tmp_path / "r") as db:  # one that served ranges and stops: an error
        ranged.faults = store_faults("ignore-range", -1)
        with pytest.raises(embfile.RemoteError, match="ignored the Range request .* cannot serve lookups by range"):
            db[keys[100]]
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.command)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for name in ("one.emb", "ds"):
            with embfile.open(f"{url}/{name}", cache_dir=tmp_path / "c") as db:
                np.testing.assert_array_equal(db[keys[7]], x[7])
                np.testing.assert_array_equal(db.get_batch(keys[::-5]), x[::-5])
                assert sum(len(k) for k, _ in db.iter_batches(128, seed=3)) == N
        requests.clear()
        with embfile.open(f"{url}/one.emb", cache_dir=tmp_path / "c") as db:  # the cached copy: no GET
            np.testing.assert_array_equal(db[keys[-1]], x[-1])
        assert requests == ["HEAD"]
        damaged = bytearray((root / "one.emb").read_bytes())
        damaged[4096 + 100] ^= 1  # a bit of a record
        (root / "bad.emb").write_bytes(damaged)
        with pytest.raises(embfile.RemoteError, match="bad.emb: the downloaded copy does not match its checksums"):
            embfile.open(f"{url}/bad.emb", cache_dir=tmp_path / "c")
        assert not [p for p in (tmp_path / "c").rglob("bad*") if p.parent.name in ("files", "tmp")]
    finally:
        server.shutdown()


def test_slow_responses_time_out(served, tmp_path, quick_retries, monkeypatch):
    aiohttp = pytest.importorskip("aiohttp")
    monkeypatch.setattr(store, "RETRIES", 1)
    server, keys, x, _ = served
    opts = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=0.5)}}
    with open_http(server, "one.emb", tmp_path / "c", storage_options=opts) as db:
        server.faults = store_faults("slow", 1, slow=2.0)  # once: the retry gets through
        np.testing.assert_array_equal(db[keys[5]], x[5])
        server.faults = store_faults("slow", -1, slow=2.0)
        with pytest.raises(embfile.RemoteError, match="failed 2 times"):
            db[keys[2500]]


def test_missing_objects(served, tmp_path):
    server, *_ = served
    with pytest.raises(FileNotFoundError):
        open_http(server, "nothing.emb", tmp_path / "c")
    (served[3] / "junk.emb").write_bytes(b"x" * 10000)
    with pytest.raises(embfile.NotAnEmbFileError):
        open_http(server, "junk.emb", tmp_path / "c")


def _download(url, cache, out):
    with embfile.open(url, cache_dir=cache) as db:
        np.save(out, db.to_numpy())


def test_eight_processes_download_one_shard_once(served, tmp_path):
    server, keys, x, _ = served
    url, cache = f"{server.url}/one.emb", str(tmp_path / "c")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_download, args=(url, cache, str(tmp_path / f"{i}.npy"))) for i in range(8)]
    before = len(server.gets())
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for i in range(8):
        np.testing.assert_array_equal(np.load(tmp_path / f"{i}.npy"), x)
    size = os.path.getsize(served[3] / "one.emb")
    whole = [g for g in server.gets()[before:] if g[2] == f"bytes=0-{size - 1}"]
    assert len(whole) == 1, f"{len(whole)} downloads of the file"
    assert os.listdir(os.path.join(cache, "tmp")) == []


def backdate(*patterns):
    """Make the files matching ``patterns`` a minute old: a dead process's leftovers, past the age at which the
    cache takes an unlocked one for abandoned (setting that age to 0 instead also takes a live download in the
    moment between creating its file and locking it)."""
    for path in [p for pattern in patterns for p in glob(pattern)]:
        os.utime(path, (time.time() - 60, time.time() - 60))


def test_a_killed_download_leaves_nothing_half_written(served, tmp_path):
    server, keys, x, _ = served
    url, cache = f"{server.url}/one.emb", str(tmp_path / "c")
    server.delay = 0.3
    child = subprocess.Popen(
        [sys.executable, "-c", f"import embfile; embfile.prefetch({url!r}, cache_dir={cache!r})"],
    )
    tmp = os.path.join(cache, "tmp")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.isdir(tmp) and os.listdir(tmp)):
        time.sleep(0.05)
    assert os.listdir(tmp), "the download never started"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    server.delay = 0.0
    assert os.listdir(os.path.join(cache, "files")) == []  # nothing at the final name
    backdate(os.path.join(cache, "tmp", "*"))
    with embfile.open(url, cache_dir=cache) as db:
        np.testing.assert_array_equal(db.to_numpy(), x)
    assert os.listdir(os.path.join(cache, "tmp")) == []  # the dead download was removed
    assert len(os.listdir(os.path.join(cache, "files"))) == 1


def _lookups(db, keys):
    return db.get_batch(keys)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_make_their_own_clients(served, tmp_path, method):
    server, keys, x, _ = served
    db = open_http(server, "ds", tmp_path / "c")
    db[keys[0]]  # the parent's client exists before the fork
    with multiprocessing.get_context(method).Pool(2) as pool:
        got = pool.starmap(_lookups, [(db, keys[i : i + 50]) for i in (0, 1000, 2500)])
    for got_i, i in zip(got, (0, 1000, 2500)):
        np.testing.assert_array_equal(got_i, x[i : i + 50])
    assert pickle.loads(pickle.dumps(db)).version == db.version
    db.close()


def test_a_forked_child_leaves_its_parent_s_connections_working(served, tmp_path):
    """A forked child (a DataLoader worker) makes its own client, and the parent's copy there is collected.
    Closing it used to unregister the parent's sockets from the epoll set both processes share: the parent's
    next request on that connection then hung for aiohttp's 5 minutes."""
    server, keys, x, _ = served
    code = f"""
import gc, os, embfile, fsspec
db = embfile.open({server.url + "/one.emb"!r}, cache_dir={str(tmp_path / "c")!r})
db[{keys[0]!r}]  # a connection of the parent's, kept alive for its next request
if os.fork() == 0:
    for f in db._remote_files:
        f.remote._fs = None
    db.remote._fs = None
    fsspec.filesystem("http")  # in a new process, fsspec forgets the instances it had
    gc.collect()
    os._exit(0)
os.wait()
print(db[{keys[7]!r}].tolist() == {x[7].tolist()!r})
print(embfile.open({server.url + "/ds"!r}, cache_dir=os.getcwd()).version)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.split() == ["True", "3"], out.stderr


def test_cache_limit_evicts_least_recently_used(served, tmp_path):
    server, keys, x, root = served
    shutil.copy(root / "one.emb", root / "two.emb")
    size = os.path.getsize(root / "one.emb")
    cache = tmp_path / "c"
    a = open_http(server, "one.emb", cache, cache_limit=int(size * 1.5))
    a.download()
    with open_http(server, "two.emb", cache, cache_limit=int(size * 1.5)) as b:
        b.download()
        assert len(os.listdir(cache / "files")) == 2  # one is in use: not evicted
    np.testing.assert_array_equal(a.to_numpy(), x)
    a.close()
    shutil.copy(root / "one.emb", root / "three.emb")
    with open_http(server, "three.emb", cache, cache_limit=int(size * 1.5)) as c:
        c.download()  # the eviction after it removes one and two, no longer used
    names = os.listdir(cache / "files")
    assert len(names) == 1 and names[0].startswith("three-")


def test_a_streamed_epoch_keeps_the_cache_limit(served, tmp_path):
    server, keys, x, root = served
    shutil.copy(root / "one.emb", root / "two.emb")
    size, cache = os.path.getsize(root / "one.emb"), tmp_path / "c"
    with open_http(server, "two.emb", cache, cache_limit=int(size * 1.5)) as db:
        assert sum(len(ks) for ks, _ in db.iter_batches(100, buffer_blocks=4)) == N
    with open_http(server, "one.emb", cache, cache_limit=int(size * 1.5)) as db:
        assert sum(len(ks) for ks, _ in db.iter_batches(100, buffer_blocks=4)) == N
        copies = [n for n in os.listdir(cache / "pages" / remote_cache.boot_id()) if n.endswith(".emb")]
        assert len(copies) == 1 and copies[0].startswith("one-")  # two's pages went to make room


def _on_disk(cache):
    """Bytes the cache's copies take on disk (of a partial copy, the pages it holds)."""
    return sum(os.stat(p).st_blocks * 512 for p in glob(f"{cache}/**/*.emb", recursive=True))


def _small_blocks(root):
    """``root/small.emb``: one.emb's records in 64 KiB checksum blocks, so that a test's windows are small."""
    keys, x = data()
    embfile.write(root / "small.emb", (keys, x), block_bytes=1 << 16)
    return (root / "small.emb").stat().st_size


WINDOWS = dict(block_size=16, buffer_blocks=4)  # of small.emb: windows of 256 KiB, each block one checksum block


def test_an_epoch_larger_than_the_cache_limit_streams_through_it(served, tmp_path):
    """Under a cache_limit smaller than the dataset, a streamed epoch gives back the space of each window it has
    read: the disk holds the limit and a few windows, every record comes right, once, and the next epoch
    fetches again what was given back.  A dataset larger than the cache's disk streams through it."""
    server, keys, x, root = served
    size, where = _small_blocks(root), {k: i for i, k in enumerate(keys)}
    cache, limit = tmp_path / "c", size // 4
    with open_http(server, "small.emb", cache, cache_limit=limit) as db:
        for epoch in range(2):
            n, peak, seen = len(server.gets()), 0, []
            for ks, vs in db.iter_batches(100, seed=0, epoch=epoch, **WINDOWS):
                np.testing.assert_array_equal(vs, x[[where[k] for k in ks]])
                seen += ks
                peak = max(peak, _on_disk(cache))
            assert sorted(seen) == sorted(keys)
            assert peak < limit + (1 << 20), (peak, limit)  # the limit, the window read and the next (256 KiB each)
            assert server.sent(n) > (0.9 if epoch == 0 else 0.5) * size  # again, what was given back
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with open_http(server, "small.emb", small, cache_limit=2 << 20) as db:  # 12 MB through a 4 MiB disk
            assert sum(len(b) for b in db.iter_batches(100, seed=0, keys=False, **WINDOWS)) == N
            assert _on_disk(small) < 3 << 20
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_workers_and_lookups_share_a_cache_an_epoch_streams_through(served, tmp_path):
    """A DataLoader's two workers stream one epoch under a small cache_limit: a window is given back once both
    have read it, so each is fetched about once.  Lookups in another process, and that process killed while
    it gives windows back, never see a freed page: every vector is right."""
    torch = pytest.importorskip("torch")
    import embfile.torch as et

    server, keys, x, root = served
    size, where = _small_blocks(root), {k: i for i, k in enumerate(keys)}
    cache, limit = tmp_path / "c", size // 4
    db = open_http(server, "small.emb", cache, cache_limit=limit)
    epoch = et.IterableDataset(db, batch_size=100, seed=0, keys=True, **WINDOWS)
    n, peak, seen = len(server.gets()), 0, []
    for ks, vs in torch.utils.data.DataLoader(epoch, batch_size=None, num_workers=2):
        np.testing.assert_array_equal(vs.numpy(), x[[where[k] for k in ks]])
        seen += ks
        peak = max(peak, _on_disk(cache))
    assert sorted(seen) == sorted(keys)
    assert peak < limit + (2 << 20), (peak, limit)
    assert server.sent(n) < 1.2 * size  # each window fetched once (it was 0.99-1.01 here)
    db.close()

    url = f"{server.url}/small.emb"
    code = (
        f"import embfile; db = embfile.open({url!r}, cache_dir={str(cache)!r}, cache_limit={limit})\n"
        f"for e in range(1000): [b for b in db.iter_batches(100, seed=e, keys=False, block_size=16, buffer_blocks=4)]"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    rng = np.random.default_rng(0)
    try:
        with open_http(server, "small.emb", cache) as db:
            deadline = time.time() + 4
            while time.time() < deadline:
                rows = rng.choice(N, 64, replace=False)
                np.testing.assert_array_equal(db.get_batch([keys[i] for i in rows]), x[rows])
                np.testing.assert_array_equal(db[keys[rows[0]]], x[rows[0]])
            assert child.poll() is None  # still streaming
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with open_http(server, "small.emb", cache, cache_limit=limit) as db:
        got = {k: v.copy() for ks, vs in db.iter_batches(100, seed=3, **WINDOWS) for k, v in zip(ks, vs)}
        np.testing.assert_array_equal(db.get_batch(keys[::7]), x[::7])
    np.testing.assert_array_equal(np.stack([got[k] for k in keys]), x)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_map_style_epoch_at_a_url_streams_its_windows(served, tmp_path, workers):
    """The map-style Dataset with embfile's BatchSampler streams an epoch at a URL as the IterableDataset does:
    each window fetched once (by one worker, the other waiting on its lock, though batches run over into the
    next window), checked, held by each worker until its batches are two windows on, then given back under a
    cache limit by the last to let go; no file is downloaded whole.
    Per-residue records too, padded by ``collate``; with another sampler they come from a whole copy."""
    torch = pytest.importorskip("torch")
    import embfile.torch as et

    server, keys, x, root = served
    size = _small_blocks(root)
    cache, limit = tmp_path / f"c{workers}", size // 4
    db = open_http(server, "small.emb", cache, cache_limit=limit)
    ds = et.Dataset(db)
    sampler = et.BatchSampler(ds, 100, seed=0, **WINDOWS)  # batches of 400 KiB, windows of 256 KiB
    n, peak, got = len(server.gets()), 0, []
    for batch in torch.utils.data.DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers):
        got.append(batch.numpy())
        peak = max(peak, _on_disk(cache))
    order = np.concatenate(list(sampler))
    assert sorted(order) == list(range(N))
    np.testing.assert_array_equal(np.concatenate(got), x[order])
    assert not db._whole and os.listdir(cache / "files") == []
    assert peak < limit + (3 << 20), (peak, limit)  # and the windows of the batches in flight (up to 2.3 MiB)
    # 1.5x before batches took their windows' locks; under a busy machine a worker that falls behind may find
    # a window the other gave back under this tight limit (a quarter of the file) and fetch it again
    assert 0.9 * size < server.sent(n) < 1.25 * size
    db.close()

    rng = np.random.default_rng(3)
    records = {
        f"P{i:04d}": rng.standard_normal((int(n), 64)).astype(np.float16)
        for i, n in enumerate(rng.integers(1, 60, 400))
    }
    embfile.write(root / "res.emb", records, ragged=True, block_bytes=1 << 16)
    want = list(records.values())
    for sampler_of in (lambda ds: et.BatchSampler(ds, 32, seed=1, block_size=16, buffer_blocks=2), None):
        with open_http(server, "res.emb", tmp_path / f"r{workers}{sampler_of is None}") as db:
            ds = et.Dataset(db)
            if sampler_of is None:  # rows from anywhere (before: zeros, read from pages never fetched)
                loader = torch.utils.data.DataLoader(ds, batch_size=32, collate_fn=et.collate, num_workers=workers)
                order = np.arange(len(ds))
            else:
                sampler = sampler_of(ds)
                loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers)
                order = np.concatenate(list(sampler))
            items = iter(order.tolist())
            for padded, mask in loader:
                for row, real in zip(padded.numpy(), mask.numpy()):
                    np.testing.assert_array_equal(row[real], want[next(items)])
            assert next(items, None) is None
            assert db._whole == (sampler_of is None and workers == 0)


def test_window_holds_are_let_go_two_windows_on_once_no_batch_reads_them(served, tmp_path):
    """A process holds the blocks of the windows its map-style batches read: a batch of a later window lets go
    of those two windows back, and of another epoch's, but not while another thread's batch reads them."""
    server, keys, x, root = served
    _small_blocks(root)  # 64 KiB checksum blocks: 16 records each
    with open_http(server, "small.emb", tmp_path / "c", cache_limit=1 << 20) as db:
        holds = db._window_holds()
        window = {w: np.arange(64 * w, 64 * w + 64) for w in range(6)}  # windows of 4 blocks
        reading = holds.reading(window[0], ("e:0",))
        reading.__enter__()  # a batch of window 0, still being read
        with db._reading(window[1], ("e:1",)) as rows_at:
            out = np.empty((64, DIM), np.float32)
            rows_at.gather_random(window[1].astype(np.uint64), out, 0)
            np.testing.assert_array_equal(out, x[window[1]])
        for w in (2, 3):
            with holds.reading(window[w], (f"e:{w}",)):
                pass
        assert sorted(holds._holds) == ["e:0", "e:2", "e:3"]  # e:1 is two windows back from e:3; e:0 in use
        reading.__exit__(None, None, None)
        with holds.reading(window[4], ("e:4",)):
            pass
        assert sorted(holds._holds) == ["e:3", "e:4"]
        assert (holds._count > 0).sum() == 8 and not holds._in_use.any()
        with holds.reading(window[5], ("f:0",)):  # the next epoch
            pass
        assert sorted(holds._holds) == ["f:0"]
        assert _on_disk(tmp_path / "c") < (1 << 20) + 5 * (64 << 10) + (256 << 10)  # given back: over the limit


def test_records_across_page_boundaries_are_read_whole_when_a_neighbour_brought_their_first_page(tmp_path):
    """Records of 3,000 bytes: record 1 starts in the page record 0 was read from and ends in the next one.
    What a lookup or a gather finds already fetched is its record's every page, not the first one alone."""
    root = tmp_path / "srv"
    root.mkdir()
    keys, x = [f"r{i}" for i in range(40)], np.random.default_rng(8).random((40, 750), np.float32)
    embfile.write(root / "pages.emb", (keys, x))
    server = RangeServer(str(root))
    try:
        by_key, in_a_batch = lambda db, i: db[keys[i]], lambda db, i: db.get_batch([keys[i - 1], keys[i]])[1]
        for n, read in enumerate((by_key, in_a_batch)):
            with open_http(server, "pages.emb", tmp_path / f"cache{n}") as db:
                for i in range(0, 40, 4):  # records 0, 4, 8...: their pages only
                    np.testing.assert_array_equal(db[keys[i]], x[i])
                for i in range(1, 40, 4):  # records 1, 5, 9...: their first page is here, the next one not
                    np.testing.assert_array_equal(read(db, i), x[i])
    finally:
        server.stop()


def test_prefetch_and_cli(served, tmp_path):
    server, keys, x, _ = served
    cache = str(tmp_path / "c")
    out = subprocess.run(
        [sys.executable, "-m", "embfile", "cache", "fetch", f"{server.url}/ds", "--cache-dir", cache],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    files = os.listdir(os.path.join(cache, "files"))
    with open_http(server, "ds", cache) as db:
        assert len(files) == len(db.files) + db.segments
        n = len(server.gets())
        np.testing.assert_array_equal(db.to_numpy(), x)
        np.testing.assert_array_equal(db.get_batch(keys[::13]), x[::13])
        assert len(server.gets()) == n  # read from the cache alone
    local = str(tmp_path / "local.emb")
    embfile.write(local, (keys[:3], x[:3]))
    with pytest.raises(ValueError, match="local.emb is a local path: the cache holds datasets at a URL"):
        embfile.prefetch(local, cache_dir=cache)  # it copied the file into the cache


def test_torch_datasets_over_a_url(served, tmp_path):
    torch = pytest.importorskip("torch")
    import embfile.torch as et

    server, keys, x, root = served
    db = open_http(server, "ds", tmp_path / "c")
    epoch = et.IterableDataset(db, batch_size=100, seed=0)
    loader = torch.utils.data.DataLoader(epoch, batch_size=None, num_workers=2)
    n = len(server.gets())
    rows = sum(len(b[1]) if isinstance(b, (tuple, list)) else len(b) for b in loader)
    assert rows == N  # the workers stream the same windows: each fetched by one of them, the other waiting
    assert server.sent(n) < 1.1 * sum(p.stat().st_size for p in (root / "ds").rglob("*.emb"))
    by_key = et.Dataset(db, keys=keys[::-1])
    loader = torch.utils.data.DataLoader(by_key, batch_size=64, num_workers=2)
    got = torch.cat(list(loader)).numpy()
    np.testing.assert_array_equal(got, x[::-1])  # lookups by range reads, in the workers
    db.close()


def test_a_full_cache_disk_is_a_clear_error(served, tmp_path):
    server, keys, x, root = served
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with open_http(server, "one.emb", small) as db:
            np.testing.assert_array_equal(db[keys[3]], x[3])  # pages fit
            with pytest.raises(embfile.CacheError, match="disk is full") as e:
                db.to_numpy()  # the 12 MB file does not
            assert isinstance(e.value, OSError)
            assert os.listdir(small / "files") == [] and os.listdir(small / "tmp") == []
            np.testing.assert_array_equal(db[keys[4]], x[4])  # lookups go on
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_damaged_remote_files_give_errors_never_wrong_rows(tmp_path):
    """Bytes of the index or the header flipped on the server: every lookup returns the right vector, says the
    key is absent, or raises an EmbFileError (a damaged bucket may hide a key; it never yields another's).
    Records are data: as for a local file, ``verify`` (or a bulk read, which checks each download) finds them."""
    root = tmp_path / "srv"
    root.mkdir()
    keys, x = data(n=2000, dim=8)
    embfile.write(root / "good.emb", (keys, x))
    raw = (root / "good.emb").read_bytes()
    h = embfile.open(root / "good.emb").header
    server = RangeServer(str(root))
    rng = np.random.default_rng(0)
    try:
        for trial in range(40):
            damaged = bytearray(raw)
            lo, hi = (h.index_offset, h.index_offset + h.index_size) if trial % 4 else (0, 256)
            for at in rng.integers(lo, hi, size=int(rng.integers(1, 20))).tolist():
                damaged[at] ^= 1 << int(rng.integers(8))
            (root / f"bad{trial}.emb").write_bytes(bytes(damaged))
            try:
                db = open_http(server, f"bad{trial}.emb", tmp_path / "c")
            except embfile.EmbFileError:
                continue
            with db:
                for i in rng.choice(len(keys), 10, replace=False).tolist():
                    try:
                        v = db.get(keys[i])
                    except embfile.EmbFileError:
                        continue
                    assert v is None or np.array_equal(v, x[i]), (trial, i)
    finally:
        server.stop()


def test_damaged_remote_files_stream_right_rows_or_an_error(tmp_path):
    """Bytes flipped anywhere in a file on the server: a streamed epoch, of the iterable kind and of the
    map-style dataset with embfile's sampler, yields right rows, then perhaps an EmbFileError, never a wrong row
    (each window's blocks are checked before they are read)."""
    from embfile.torch import BatchSampler, Dataset

    root = tmp_path / "srv"
    root.mkdir()
    keys, x = data(n=3000, dim=256)  # 1 KiB records: three checksum blocks
    embfile.write(root / "good.emb", (keys, x))
    raw, where = (root / "good.emb").read_bytes(), {k: i for i, k in enumerate(keys)}
    server = RangeServer(str(root))
    rng = np.random.default_rng(1)
    try:
        for trial in range(30):
            damaged = bytearray(raw)
            for at in rng.integers(0, len(raw), size=int(rng.integers(1, 4))).tolist():
                damaged[at] ^= 1 << int(rng.integers(8))
            (root / f"bad{trial}.emb").write_bytes(bytes(damaged))
            try:
                with open_http(server, f"bad{trial}.emb", tmp_path / "c") as db:
                    for ks, v in db.iter_batches(500, seed=trial, buffer_blocks=1, block_size=256):
                        np.testing.assert_array_equal(v, x[[where[k] for k in ks]], err_msg=f"trial {trial}")
            except embfile.EmbFileError:
                pass
            try:
                with open_http(server, f"bad{trial}.emb", tmp_path / f"m{trial}") as db:
                    by_row = Dataset(db)
                    for rows in BatchSampler(by_row, 500, seed=trial, buffer_blocks=1, block_size=256):
                        np.testing.assert_array_equal(by_row[rows].numpy(), x[rows], err_msg=f"trial {trial}")
            except embfile.EmbFileError:
                pass
    finally:
        server.stop()


def test_a_remote_file_shorter_than_its_header_says(served, tmp_path):
    server, keys, x, root = served
    (root / "short.emb").write_bytes((root / "one.emb").read_bytes()[:-5000])
    with pytest.raises(embfile.TruncatedFileError):
        open_http(server, "short.emb", tmp_path / "c")


def test_a_folder_file_replaced_under_an_open_handle(served, tmp_path):
    server, keys, x, root = served
    db = open_http(server, "ds", tmp_path / "c")
    np.testing.assert_array_equal(db[keys[10]], x[10])
    shard = root / "ds" / db.manifest.shards[-1].path
    damaged = bytearray(shard.read_bytes())
    damaged[-100] ^= 1
    shard.write_bytes(bytes(damaged))
    with pytest.raises(embfile.RemoteError, match="changed on the server"):
        db.get_batch(keys[-5:])
    db.close()
    with pytest.raises(embfile.EmbFileError):  # a new handle reads the new bytes, and they are checked
        with open_http(server, "ds", tmp_path / "c") as db:
            db.to_numpy()


# -- writing to a URL ------------------------------------------------------------------------------------------


def test_write_and_convert_to_s3(s3, tmp_path):
    keys, x = data(n=500, dim=16)
    opts = s3.storage_options()
    embfile.write("s3://embs/w/one.emb", (keys, x), metadata={"m": 1}, storage_options=opts)
    with embfile.open("s3://embs/w/one.emb", cache_dir=tmp_path / "c", storage_options=opts) as db:
        np.testing.assert_array_equal(db.get_batch(keys), x)
        assert db.metadata["m"] == 1
    embfile.write(tmp_path / "local.emb", "s3://embs/w/one.emb", storage_options=opts)  # a URL as the data
    with embfile.open(tmp_path / "local.emb") as db:
        np.testing.assert_array_equal(db.to_numpy(), x)
    embfile.convert(tmp_path / "local.emb", "s3://embs/w/two.parquet", storage_options=opts)
    assert s3.filesystem().size("embs/w/two.parquet") > 500 * 16 * 4
    with pytest.raises(embfile.RemoteError, match="read-only"):
        embfile.write("https://127.0.0.1:1/x.emb", (keys, x))


def test_merge_and_subset_at_s3_urls(s3, tmp_path):
    """Sources and destinations at URLs, with storage_options, as write and convert take them (merge said to
    pass storage_options and took none; a destination at a URL was written to a local folder named 's3:')."""
    keys, x = data(n=400, dim=8)
    opts, cache = s3.storage_options(), tmp_path / "c"
    embfile.write_shards("s3://embs/m/a", (keys[:300], x[:300]), storage_options=opts, cache_dir=cache)
    embfile.write(tmp_path / "b.emb", (keys[300:], x[300:]))
    embfile.merge(["s3://embs/m/a", tmp_path / "b.emb"], "s3://embs/m/all.emb", storage_options=opts)
    embfile.merge(["s3://embs/m/a", tmp_path / "b.emb"], "s3://embs/m/all", storage_options=opts, cache_dir=cache)
    embfile.subset("s3://embs/m/all", "s3://embs/m/some.emb", keys[::7], storage_options=opts)
    embfile.subset(tmp_path / "b.emb", "s3://embs/m/local-some", keys[300::7], storage_options=opts)
    for url, rows in [("all.emb", slice(None)), ("all", slice(None)), ("some.emb", slice(0, None, 7))]:
        with embfile.open(f"s3://embs/m/{url}", cache_dir=cache, storage_options=opts) as db:
            assert db.keys_at(np.arange(len(db))) == keys[rows]
            np.testing.assert_array_equal(db.to_numpy(), x[rows])
    with embfile.open("s3://embs/m/local-some", cache_dir=cache, storage_options=opts) as db:
        np.testing.assert_array_equal(db.get_batch(keys[300::7]), x[300::7])
    with pytest.raises(
        embfile.DuplicateKeyError, match=r"HUMAN' is in s3://embs/m/a \(row 0\) and s3://embs/m/all.emb \(row 0\)"
    ):
        embfile.merge(["s3://embs/m/a", "s3://embs/m/all.emb"], "s3://embs/m/twice.emb", storage_options=opts)
    with pytest.raises(embfile.WriterError, match="s3://embs/m/all exists and is a dataset"):
        embfile.subset(tmp_path / "b.emb", "s3://embs/m/all", keys[300:], storage_options=opts)
    assert not s3.filesystem().exists("embs/m/twice.emb")


def test_convert_reads_files_and_datasets_at_urls(s3, tmp_path):
    """A file or folder at a URL converts as a local one does (it was "convert reads local files"): an .emb file
    or dataset read there, anything else downloaded beside the output and removed after; to a URL too."""
    from conftest import assert_store

    h5py = pytest.importorskip("h5py")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    keys, x = data(n=300, dim=8)
    opts, fs = s3.storage_options(), s3.filesystem()
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for k, v in zip(keys, x):
            f[k.replace("/", "_")] = v
    (tmp_path / "pq").mkdir()
    for i in range(2):
        part = slice(150 * i, 150 * (i + 1))
        pq.write_table(pa.table({"id": keys[part], "emb": list(x[part])}), tmp_path / "pq" / f"{i}.parquet")
    fs.put(str(tmp_path / "x.h5"), "embs/in/x.h5")
    fs.put(str(tmp_path / "pq"), "embs/in/pq", recursive=True)
    embfile.write_shards("s3://embs/in/ds", (keys, x), storage_options=opts, cache_dir=tmp_path / "c")
    out = tmp_path / "out"
    out.mkdir()
    want = {k.replace("/", "_"): v for k, v in zip(keys, x)}
    embfile.convert("s3://embs/in/x.h5", out / "h5.emb", storage_options=opts)
    assert_store(out / "h5.emb", want)
    embfile.convert("s3://embs/in/pq", out / "pq.emb", storage_options=opts, dtype="float16")
    assert_store(out / "pq.emb", {k: v.astype(np.float16) for k, v in zip(keys, x)})
    embfile.convert("s3://embs/in/ds", out / "ds.parquet", storage_options=opts)
    assert pq.read_table(out / "ds.parquet").num_rows == 300
    assert sorted(os.listdir(out)) == ["ds.parquet", "h5.emb", "pq.emb"]  # the downloads are gone
    embfile.convert("s3://embs/in/x.h5", "s3://embs/out/x.emb", storage_options=opts)
    with embfile.open("s3://embs/out/x.emb", storage_options=opts, cache_dir=tmp_path / "c") as db:
        np.testing.assert_array_equal(db.get_batch(list(want)), x)
    with pytest.raises(FileNotFoundError, match="s3://embs/in/nope.h5"):
        embfile.convert("s3://embs/in/nope.h5", out / "x.emb", storage_options=opts)
    with pytest.raises(
        embfile.NotAnEmbFileError, match=r"but HDF5: `embfile convert s3://embs/in/x.h5 s3://embs/in/x.emb`"
    ):
        embfile.open("s3://embs/in/x.h5", storage_options=opts, cache_dir=tmp_path / "c")
    assert not os.path.exists(out / "x.emb")


def test_a_conversion_from_a_url_killed_while_downloading_leaves_nothing_the_next_keeps(s3, tmp_path):
    """The download is staged beside the output as the conversion's own files are: hidden, locked while it
    runs; what a SIGKILL leaves, the next conversion to that path removes."""
    h5py = pytest.importorskip("h5py")
    keys, x = data(n=200, dim=8)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for i, v in enumerate(x):
            f[f"p{i}"] = v
    s3.filesystem().put(str(tmp_path / "x.h5"), "embs/k/x.h5")
    out, opts = tmp_path / "out", s3.storage_options()
    out.mkdir()
    code = (
        "import embfile, json, sys; "
        "embfile.convert('s3://embs/k/x.h5', sys.argv[1], storage_options=json.loads(sys.argv[2]))"
    )
    s3.delay = 0.5  # each request: the download is under way for seconds
    try:
        child = subprocess.Popen([sys.executable, "-c", code, str(out / "x.emb"), json.dumps(opts)])
        deadline = time.monotonic() + 60
        while not os.listdir(out) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        s3.delay = 0
    left = os.listdir(out)
    assert len(left) == 1 and left[0].startswith(".x.emb.")  # nothing at the user's path; a hidden leftover
    embfile.convert("s3://embs/k/x.h5", out / "x.emb", storage_options=opts)
    assert os.listdir(out) == ["x.emb"]
    with embfile.open(out / "x.emb") as db:
        np.testing.assert_array_equal(db.get_batch([f"p{i}" for i in range(200)]), x)


def test_mistakes_at_an_s3_url_are_one_line_naming_it(s3, tmp_path, monkeypatch):
    """What a user gets wrong at a URL says so in one line naming the URL: a key not there (not the local folder
    standing in for the dataset), a bucket not there, no credentials (at once: no retry finds them), a URL
    given to merge as its destination.  The CLI converts to a URL."""
    from embfile import cli

    keys, x = data(n=200, dim=8)
    opts, url = s3.storage_options(), "s3://embs/mistakes"
    embfile.write_shards(url, (keys, x), storage_options=opts, cache_dir=tmp_path / "c")
    with pytest.raises(embfile.KeyNotFoundError, match=rf"^key 'nope' is not in {url} \(version 1\)"):
        embfile.remove(url, ["nope"], storage_options=opts, cache_dir=tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"bucket does not exist: 's3://nobucket/ds/"):
        embfile.write_shards("s3://nobucket/ds", (keys, x), storage_options=opts, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="on_error='skip' to a URL needs report="):
        embfile.convert(tmp_path / "x.h5", "s3://embs/x.emb", on_error="skip", storage_options=opts)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata asked for: 127.0.0.1 only
    with pytest.raises(embfile.RemoteError, match=rf"{url}/_embfile/LATEST: no credentials for the store"):
        embfile.open(url, storage_options={"endpoint_url": opts["endpoint_url"]})

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])  # as a user of the CLI sets them
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    embfile.merge([url], tmp_path / "merged.emb")
    with embfile.open(tmp_path / "merged.emb") as db:
        np.testing.assert_array_equal(db.get_batch(keys), x)
    assert cli.main(["convert", str(tmp_path / "merged.emb"), "s3://embs/converted.emb"]) == 0
    with embfile.open("s3://embs/converted.emb", cache_dir=tmp_path / "c2") as db:
        np.testing.assert_array_equal(db.get_batch(keys), x)
    (tmp_path / "some.txt").write_text("".join(f"{k}\n" for k in keys[:5]))
    assert cli.main(["subset", url, "s3://embs/some.emb", "--keys", str(tmp_path / "some.txt")]) == 0
    with embfile.open("s3://embs/some.emb", cache_dir=tmp_path / "c2") as db:
        np.testing.assert_array_equal(db.get_batch(keys[:5]), x[:5])


def test_a_dataset_grown_at_an_s3_url(s3, tmp_path):
    keys, x = data(n=3000, dim=16)
    opts, cache, url = s3.storage_options(), tmp_path / "c", "s3://embs/grown"
    embfile.write_shards(url, (keys[:1000], x[:1000]), shard_bytes=20_000, cache_dir=cache, storage_options=opts)
    with pytest.raises(embfile.WriterError, match=f"{url} exists and is a dataset"):  # mode="error"
        embfile.write_shards(url, (keys, x), cache_dir=cache, storage_options=opts)
    assert embfile.append(url, (keys[1000:2000], x[1000:2000]), cache_dir=cache, storage_options=opts) == 2
    embfile.write(tmp_path / "more.emb", (keys[2000:], x[2000:]))
    assert embfile.append(url, str(tmp_path / "more.emb"), cache_dir=cache, storage_options=opts) == 3
    with pytest.raises(embfile.DuplicateKeyError):
        embfile.append(url, (keys[:1], x[:1]), cache_dir=cache, storage_options=opts)
    assert embfile.remove(url, keys[:10], cache_dir=cache, storage_options=opts) == 4
    with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        assert db.version == 4 and len(db) == 2990 and keys[5] not in db
        np.testing.assert_array_equal(db.get_batch(keys[10:]), x[10:])
    with embfile.open(url, version=2, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        assert len(db) == 2000
    assert s3.filesystem().cat_file("embs/grown/_embfile/LATEST").strip() == b"4"


def test_an_operation_at_a_url_downloads_only_what_it_reads(s3, tmp_path):
    """An append reads the key index, not the shards; a removal the shard it rewrites."""
    keys, x = data(n=3000, dim=256)
    opts, url = s3.storage_options(), "s3://embs/lazy"
    embfile.write_shards(
        url, (keys[:2000], x[:2000]), shard_bytes=500 << 10, cache_dir=tmp_path / "w", storage_options=opts
    )

    def shards_read(since):
        return {path for _, path, _ in s3.gets()[since:] if path.startswith("/embs/lazy/shards/")}

    since = len(s3.gets())
    assert embfile.append(url, (keys[2000:], x[2000:]), cache_dir=tmp_path / "a", storage_options=opts) == 2
    assert shards_read(since) == set()
    since = len(s3.gets())
    assert embfile.remove(url, keys[:10], cache_dir=tmp_path / "r", storage_options=opts) == 3
    read = shards_read(since)
    with embfile.open(url, version=2, cache_dir=tmp_path / "v", storage_options=opts) as db:
        assert len(db.files) > 2 and read == {f"/embs/lazy/{db.manifest.shards[0].path}"}
    with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        assert (db.version, len(db)) == (3, 2990) and keys[5] not in db
        np.testing.assert_array_equal(db.get_batch(keys[10:]), x[10:])
    embfile.write("s3://embs/lazy-one.emb", (keys[:10], x[:10]), storage_options=opts)
    with pytest.raises(embfile.ShardError, match="lazy-one.emb is a single .emb file, not a dataset folder"):
        embfile.append("s3://embs/lazy-one.emb", (keys[10:20], x[10:20]), storage_options=opts, cache_dir=tmp_path)


def test_vacuum_at_a_url(s3, tmp_path):
    """Old versions and the objects only they name go, and a killed upload's; a young unnamed object (a writer's
    in flight) stays until it is older than the grace period."""
    keys, x = data(n=300, dim=8)
    opts, url, fs = s3.storage_options(), "s3://embs/vac", s3.filesystem()
    embfile.write_shards(url, (keys[:100], x[:100]), storage_options=opts, cache_dir=tmp_path)
    embfile.append(url, (keys[100:200], x[100:200]), storage_options=opts, cache_dir=tmp_path)
    embfile.remove(url, keys[:50], storage_options=opts, cache_dir=tmp_path)  # version 3 rewrites the first shard
    fs.pipe_file("embs/vac/shards/killed-000001.emb", b"half an upload")
    assert embfile.vacuum(url, keep=1, storage_options=opts) == []  # within the default grace of a day
    assert embfile.vacuum(url, keep=2, grace=0, storage_options=opts) == [1]
    with pytest.raises(embfile.VersionNotFoundError):
        embfile.open(url, version=1, cache_dir=tmp_path / "c", storage_options=opts)
    assert not fs.exists("embs/vac/shards/killed-000001.emb")
    with embfile.open(url, version=2, cache_dir=tmp_path / "c", storage_options=opts) as db:
        np.testing.assert_array_equal(db.get_batch(keys[:200]), x[:200])  # its files are all there
    fs.pipe_file("embs/vac/shards/inflight-000001.emb", b"a writer's, just uploaded")
    assert embfile.vacuum(url, keep=1, grace=60, storage_options=opts) == []  # version 3 is younger than that
    assert fs.exists("embs/vac/shards/inflight-000001.emb")
    assert embfile.vacuum(url, keep=1, grace=0, storage_options=opts) == [2]
    with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        shards = {f"shards/{n}" for n in store.Remote(url, opts).child("shards").names()}
        assert shards == {s.path for s in db.manifest.shards}  # the in-flight object too, once older than grace
        assert (db.version, len(db)) == (3, 150)
        np.testing.assert_array_equal(db.get_batch(keys[50:200]), x[50:200])
    with pytest.raises(embfile.ShardError, match="nothing-here: not a versioned dataset: no version in it"):
        embfile.vacuum("s3://embs/nothing-here", storage_options=opts)
    embfile.write_shards(tmp_path / "local", (keys[:10], x[:10]))
    for where, options in ((url, opts), (tmp_path / "local", None)):
        with pytest.raises(ValueError, match="keep must be at least 1, not 0"):
            embfile.vacuum(where, keep=0, storage_options=options)


def test_tags_at_a_url(s3, served, tmp_path):
    keys, x = data(n=300, dim=8)
    opts, url, where = s3.storage_options(), "s3://embs/tagged", {"cache_dir": tmp_path / "c"}
    embfile.write_shards(url, (keys[:100], x[:100]), storage_options=opts, **where)
    assert embfile.tag(url, "first", storage_options=opts) == 1
    embfile.append(url, (keys[100:200], x[100:200]), storage_options=opts, **where)
    embfile.remove(url, keys[:50], storage_options=opts, **where)  # version 3 rewrites the first shard
    with pytest.raises(ValueError, match="tag 'first' names version 1; replace=True moves it"):
        embfile.tag(url, "first", version=2, storage_options=opts)
    assert embfile.tag(url, "second", version="first", storage_options=opts) == 1
    assert embfile.tag(url, "second", version=2, replace=True, storage_options=opts) == 2
    assert embfile.tags(url, storage_options=opts) == {"first": 1, "second": 2}
    embfile.untag(url, "second", storage_options=opts)
    hint = json.loads(s3.filesystem().cat_file("embs/tagged/_embfile/tags.json"))
    assert hint == {"tags": {"first": 1}}  # for readers that cannot list: written by every change of a tag
    with pytest.raises(embfile.VersionNotFoundError, match="no tag 'second'"):
        embfile.open(url, version="second", storage_options=opts, **where)
    assert embfile.vacuum(url, keep=1, grace=0, storage_options=opts) == [2]
    with embfile.open(url, version="first", cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        assert db.version == 1
        np.testing.assert_array_equal(db.get_batch(keys[:100]), x[:100])  # its files were all kept
    assert embfile.changes(url, since="first", storage_options=opts, **where).removed == keys[:50]
    assert [(m.version, m.operation["name"]) for m in embfile.history(url, storage_options=opts)] == [
        (1, "write"),
        (3, "remove"),
    ]
    server, *_, root = served  # read-only HTTP: a tag opens as well
    embfile.tag(root / "ds", "v2", version=2)
    with open_http(server, "ds", tmp_path / "h", version="v2") as db:
        assert (db.version, len(db)) == (2, 2000)


def test_history_over_http_which_lists_no_folders(served, tmp_path, capsys):
    """A plain HTTP server lists no folders: the history asks for every version number up to the latest (a
    vacuum's gap skipped), the tags are those the tags.json hint names and are there (without a hint, one line saying
    they cannot be listed; `embfile versions` still shows the versions), and a URL with nothing there says so."""
    from embfile import cli

    server, *_, root = served
    embfile.tag(root / "ds", "first", version=1)
    embfile.tag(root / "ds", "gone", version=1)
    embfile.tag(root / "ds", "latest")
    assert embfile.vacuum(root / "ds", keep=1, grace=0) == [2]
    os.remove(root / "ds" / "_embfile" / "tags" / "gone.json")  # behind the hint's back: not listed
    url = f"{server.url}/ds"
    assert [(m.version, m.operation["name"]) for m in embfile.history(url)] == [(1, "write"), (3, "append")]
    assert embfile.tags(url) == {"first": 1, "latest": 3}
    assert cli.main(["versions", url]) == 0
    out, err = capsys.readouterr()
    assert [(line.split()[0], line.split()[-1]) for line in out.splitlines()[1:]] == [("1", "first"), ("3", "latest")]
    assert err == ""
    os.remove(root / "ds" / "_embfile" / "tags.json")  # tagged by an embfile that wrote no hint
    with pytest.raises(embfile.RemoteError, match=r"/ds: the server lists no folders and the dataset has no list"):
        embfile.tags(url)
    assert cli.main(["versions", url]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["1", "3"]
    assert err.startswith("embfile: tags not shown: ") and len(err.splitlines()) == 1
    with pytest.raises(FileNotFoundError, match="no .emb file or dataset folder there: '.*/nothing'"):
        open_http(server, "nothing", tmp_path / "c")


def test_two_writers_at_one_url_one_wins(s3, tmp_path):
    from embfile.remote import upload

    keys, x = data(n=200, dim=4)
    opts, url = s3.storage_options(), "s3://embs/race"
    embfile.write_shards(url, (keys[:100], x[:100]), storage_options=opts, cache_dir=tmp_path / "c")
    first, second = upload.staged_folder(url, tmp_path / "c1", opts), upload.staged_folder(url, tmp_path / "c2", opts)
    embfile.append(first.__enter__(), (keys[100:150], x[100:150]))
    embfile.append(second.__enter__(), (keys[150:], x[150:]))  # on the same version 1
    first.__exit__(None, None, None)  # publishes version 2
    with pytest.raises(embfile.CommitConflictError, match="version 2"):
        second.__exit__(None, None, None)
    with embfile.open(url, cache_dir=tmp_path / "c3", storage_options=opts) as db:
        assert db.version == 2 and len(db) == 150 and keys[120] in db and keys[170] not in db


def _append_slowly(url, opts, cache, keys, x):
    embfile.append(url, (keys, x), cache_dir=cache, storage_options=opts, shard_bytes=4096)


def test_a_killed_upload_leaves_the_previous_version(tmp_path):
    keys, x = data(n=2000, dim=64)
    server = S3Server(delay=0.2, separate=True)
    try:
        server.bucket("embs")
        opts, url = server.storage_options(), "s3://embs/killed"
        embfile.write_shards(url, (keys[:1000], x[:1000]), cache_dir=tmp_path / "c", storage_options=opts)
        child = multiprocessing.get_context("spawn").Process(
            target=_append_slowly, args=(url, opts, str(tmp_path / "c"), keys[1000:], x[1000:])
        )
        child.start()
        fs = server.filesystem()
        deadline = time.time() + 60
        while time.time() < deadline and len(fs.find("embs/killed/shards", refresh=True)) <= 1:
            time.sleep(0.1)  # the child has begun uploading its many small shards
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert len(fs.find("embs/killed/shards", refresh=True)) > 1
        with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
            assert db.version == 1 and len(db) == 1000
            np.testing.assert_array_equal(db.get_batch(keys[:1000]), x[:1000])
        assert embfile.append(url, (keys[1000:], x[1000:]), cache_dir=tmp_path / "c", storage_options=opts) == 2
        with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
            np.testing.assert_array_equal(db.get_batch(keys), x)
    finally:
        server.stop()


def _write_for_long(url, opts, cache, keys, x):
    with embfile.DatasetWriter(
        url, dim=x.shape[1], shard_bytes=200 * x[0].nbytes, cache_dir=cache, storage_options=opts
    ) as w:
        for k, v in zip(keys, x):
            w.add(k, v)


def test_a_dataset_writer_at_an_s3_url_outlives_its_machine(tmp_path):
    """A job writing at a URL publishes each shard as it fills: killed, it loses the shard in progress alone,
    and a writer elsewhere resumes from what the URL holds; the local disk holds the shard in progress."""
    keys, x = data(n=2000, dim=64)
    server = S3Server(delay=0.2, separate=True)
    try:
        server.bucket("embs")
        opts, url, cache = server.storage_options(), "s3://embs/job", str(tmp_path / "c")
        child = multiprocessing.get_context("spawn").Process(target=_write_for_long, args=(url, opts, cache, keys, x))
        child.start()
        fs, deadline = server.filesystem(), time.time() + 120
        while time.time() < deadline and len(fs.find("embs/job/_embfile/versions", refresh=True)) < 3:
            time.sleep(0.1)  # version 1 (empty) and two shards published
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with embfile.open(url, cache_dir=tmp_path / "r", storage_options=opts) as db:
            done = len(db)
            assert done >= 400 and done % 200 == 0  # whole shards, in order
            np.testing.assert_array_equal(db.get_batch(keys[:done]), x[:done])
        assert len(os.listdir(os.path.join(cache, "staging"))) == 2  # the dead writer's stand-in and its lock
        backdate(os.path.join(cache, "staging", "*.lock"))
        server.delay = 0.0
        with embfile.DatasetWriter(
            url, dim=64, resume=True, shard_bytes=200 * 256, cache_dir=cache, storage_options=opts
        ) as w:
            assert len(os.listdir(os.path.join(cache, "staging"))) == 2  # this one's alone
            done_keys = w.done_keys()
            assert len(done_keys) == done and keys[done - 1] in done_keys and keys[done] not in done_keys
            with pytest.raises(embfile.DuplicateKeyError, match="already in the dataset"):
                w.add(keys[0], x[0])
            for i in range(done, 2000):
                w.add(keys[i], x[i])
                if i == done + 1000:  # here: the shard in progress, the one being published, the key index
                    assert len(os.listdir(os.path.join(w._tx.folder, "shards"))) <= 2
                    w._published_before()  # then the shard in progress and the latest version's key index
                    assert len(os.listdir(os.path.join(w._tx.folder, "shards"))) <= 1
                    named = [os.path.join(w._tx.folder, e.path) for e in embfile.history(w._tx.folder)[-1].segments]
                    assert sorted(glob(os.path.join(os.path.dirname(named[0]), "*"))) == sorted(named)
        assert os.listdir(os.path.join(cache, "staging")) == []
        with embfile.open(url, cache_dir=tmp_path / "r2", storage_options=opts) as db:
            np.testing.assert_array_equal(db.get_batch(keys), x)
            assert len(db) == 2000

        xo = data(n=300, dim=64, seed=5)[1]
        other = [f"other{i}" for i in range(300)]
        w = embfile.DatasetWriter(
            url, dim=64, resume=True, shard_bytes=200 * 256, cache_dir=cache, storage_options=opts
        )
        w.add(other[0], xo[0])
        embfile.append(url, (other[250:], xo[250:]), cache_dir=tmp_path / "c2", storage_options=opts)
        before = set(fs.find("embs/job/shards", refresh=True))
        with pytest.raises(embfile.CommitConflictError, match="s3://embs/job: another writer committed version"):
            for i in range(1, 249):  # a shard fills at 200: its publish fails meanwhile, or when closing
                w.add(other[i], xo[i])
            w.close()
        assert set(fs.find("embs/job/shards", refresh=True)) == before  # nothing of its shard is left
        with pytest.raises(embfile.ClosedFileError):
            w.add(other[249], xo[249])
        with pytest.raises(embfile.RemoteError, match="read-only"):
            embfile.DatasetWriter("https://127.0.0.1:9/job", dim=64)
    finally:
        server.stop()


def test_a_dataset_writer_publishing_in_the_background_raises_a_failed_upload_and_loses_nothing(s3, tmp_path):
    """A shard is published while the next fills; a publish the store refuses is raised by a later add (at the
    latest when the next shard is full), with the shard in progress kept, and the next commit publishes both."""
    keys, x = data(n=700, dim=4)
    opts, url = s3.storage_options(), "s3://embs/background"
    w = embfile.DatasetWriter(url, dim=4, shard_bytes=200 * 16, cache_dir=tmp_path / "c", storage_options=opts)
    try:
        w.add_batch(keys[:200], x[:200])
        s3.refusing = True  # the first shard's publish starts with the next add, and is refused
        added = 200
        with pytest.raises(embfile.RemoteError, match="403"):
            for added in range(200, 600):
                w.add(keys[added], x[added])
        assert 200 < added <= 400  # raised before the next shard was committed: key `added` was not taken
    finally:
        s3.refusing = False
    w.add_batch(keys[added:], x[added:])
    w.close()
    with embfile.open(url, cache_dir=tmp_path / "r", storage_options=opts) as db:
        assert db.version == 5 and len(db) == 700  # the empty version 1, then a version per shard
        np.testing.assert_array_equal(db.get_batch(keys), x)


def test_ragged_records_by_range_reads(tmp_path):
    """Per-residue records over HTTP: a cold key costs its index pages, its ranges entry and its rows."""
    rng = np.random.default_rng(12)
    records = {
        f"P{i:05d}": rng.standard_normal((int(n), 256)).astype(np.float16)
        for i, n in enumerate(rng.integers(1, 300, 2000))
    }
    root = tmp_path / "srv"
    root.mkdir()
    embfile.write(root / "res.emb", records, ragged=True)
    embfile.write_shards(root / "ds", records, shard_bytes=4 << 20, ragged=True)
    server = RangeServer(str(root))
    try:
        keys = list(records)
        with open_http(server, "res.emb", tmp_path / "c") as db:
            assert db.ragged
            for k in (keys[1500], keys[3], keys[-1]):
                n = len(server.gets())
                np.testing.assert_array_equal(db[k], records[k])
                assert len(server.gets()) - n <= 4
            some = keys[100:140]
            x, mask = db.get_batch(some)
            for i, k in enumerate(some):
                np.testing.assert_array_equal(x[i, : len(records[k])], records[k])
            np.testing.assert_array_equal(mask.sum(1), [len(records[k]) for k in some])
            np.testing.assert_array_equal(db.lengths(keys[:5]), [len(records[k]) for k in keys[:5]])
            rows, offsets = db.take([7, 3], pad=False)
            np.testing.assert_array_equal(rows, np.concatenate([records[keys[7]], records[keys[3]]]))
            db.verify()
        with open_http(server, "ds", tmp_path / "c2") as ds:
            assert ds.ragged and len(ds) == len(keys)
            np.testing.assert_array_equal(ds[keys[1234]], records[keys[1234]])
            assert sum(len(k) for k, *_ in ds.iter_batches(token_budget=8192, seed=1)) == len(keys)
        with open_http(server, "ds", tmp_path / "c3") as ds:  # residues streamed: each window's records fetched
            epoch = ds.iter_batches(4096, seed=2, unit="row", buffer_blocks=2, rank=1, world_size=2)
            ks, rows = next(epoch)  # a residue's record is fetched with the window holding the residue
            assert all((records[k] == row).all(1).any() for k, row in zip(ks, rows))
            assert len(rows) + sum(len(rows) for _, rows in epoch) == epoch.share and not ds._whole
    finally:
        server.stop()


def listed(fs, folder="embs/job"):
    """The names of the shard objects in a dataset folder on the S3 server, as a manifest names them."""
    return {f"shards/{p.rsplit('/', 1)[-1]}" for p in fs.ls(f"{folder}/shards", refresh=True)}


def test_a_job_of_many_tasks_commits_at_an_s3_url_reading_keys_only(s3, tmp_path, monkeypatch):
    """The protocol Spark and Dask write with, at a URL: tasks upload their shards, the driver commits reading
    their keys sections alone, a retried or failed attempt leaves no object behind, and an append reads the
    key index and only the shard a replaced record is in."""
    from embfile import jobs
    from embfile.remote import upload
    from embfile.remote.dataset import read_manifest

    keys, x = data(n=4000, dim=256)
    opts, url, cache = s3.storage_options(), "s3://embs/job", tmp_path / "c"
    fs = s3.filesystem()

    def start(**kw):
        return jobs.start_job(
            url, None, "float32", shard_bytes=256 * 4 * 300, storage_options=opts, cache_dir=cache, **kw
        )

    def broken():
        yield keys[2000:2700], x[2000:2700]  # two shards uploaded, then the task fails
        raise RuntimeError("the task died")

    def shard_gets(since):
        return [(path, rng) for method, path, rng in s3.gets()[since:] if "/job/shards/" in path]

    job = start()
    first = jobs.write_part(job, 0, [(keys[:1000], x[:1000])])
    speculative = jobs.write_part(job, 0, [(keys[:1000], x[:1000])])  # the same partition, run twice
    with pytest.raises(RuntimeError, match="died"):
        jobs.write_part(job, 1, broken())
    second = jobs.write_part(job, 1, [(keys[1000:3000], x[1000:3000])])
    since = len(s3.gets())
    manifest = jobs.commit_job(job, [first, speculative, second, None])
    assert (manifest.version, manifest.count) == (1, 3000)
    read = sum(int(b) - int(a) + 1 for _, rng in shard_gets(since) for a, b in [rng[len("bytes=") :].split("-")])
    shard_bytes = sum(fs.size(f"embs/job/{s.path}") for s in manifest.shards)
    assert all(rng for _, rng in shard_gets(since)) and read < shard_bytes / 10  # keys, never the vectors
    assert listed(fs) == {s.path for s in manifest.shards}
    with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        np.testing.assert_array_equal(db.get_batch(keys[:3000]), x[:3000])

    with pytest.raises(embfile.WriterError, match=f"{url} exists and is a dataset"):
        start()
    with pytest.raises(embfile.RemoteError, match="http.s. URLs are read-only"):
        jobs.start_job("https://127.0.0.1:1/ds", 4)
    with pytest.raises(embfile.WriterError, match="not one .emb file"):
        jobs.start_job("s3://embs/job/one.emb", 4, storage_options=opts)
    fs.pipe_file("embs/notes/readme.txt", b"not a dataset")
    with pytest.raises(embfile.WriterError, match="s3://embs/notes exists and is not a dataset"):
        jobs.start_job("s3://embs/notes", 4, mode="append", storage_options=opts)
    duplicate = start(mode="append")
    with pytest.raises(embfile.DuplicateKeyError, match=repr(keys[5])):
        jobs.commit_job(duplicate, [jobs.write_part(duplicate, 0, [(keys[5:6], x[5:6])])])
    job, racing, new = start(mode="append", on_duplicate="replace"), start(mode="append"), x[:10] + 1
    result = jobs.write_part(job, 0, [([*keys[:10], *keys[3000:3500]], np.concatenate([new, x[3000:3500]]))])
    jobs.commit_job(racing, [jobs.write_part(racing, 0, [(keys[3500:3900], x[3500:3900])])])  # version 2
    since = len(s3.gets())
    manifest = jobs.commit_job(job, [result])  # started on version 1, added to version 2
    assert (manifest.version, manifest.count, manifest.operation["replaced"]) == (3, 3900, 10)
    whole = {path for path, rng in shard_gets(since) if not path.rsplit("/", 1)[-1].startswith(job.token)}
    assert len(whole) == 1  # the one shard the replaced records were in, downloaded to be rewritten

    # another writer publishes the version this commit makes, between its reading the latest and publishing:
    # what it uploaded is removed, and it commits again on the newer one
    job, stale = start(mode="append"), read_manifest(store.Remote(url, opts), 2)
    reads = iter([stale])
    monkeypatch.setattr(upload, "read_manifest", lambda remote: next(reads, None) or read_manifest(remote))
    manifest = jobs.commit_job(job, [jobs.write_part(job, 0, [(keys[3900:], x[3900:])])])
    assert (manifest.version, manifest.count) == (4, 4000)
    versions = [read_manifest(store.Remote(url, opts), v) for v in (1, 2, 3, 4)]
    assert listed(fs) == {s.path for m in versions for s in m.shards}  # nothing of the failed jobs is left
    index = {f"_embfile/index/{p.rsplit('/', 1)[-1]}" for p in fs.ls("embs/job/_embfile/index", refresh=True)}
    assert index == {s.path for m in versions for s in m.segments}
    with embfile.open(url, cache_dir=tmp_path / "fresh", storage_options=opts) as db:
        assert (db.version, len(db)) == (4, 4000)
        np.testing.assert_array_equal(db.get_batch(keys[:10]), new)
        np.testing.assert_array_equal(db.get_batch(keys[10:]), x[10:])


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=30))
def test_spans_and_runs_are_the_union_of_their_ranges(ranges):
    """The range arithmetic of lookups at a URL (what pages to check and fetch) against sets of integers."""
    from embfile.remote.dataset import _runs, _spans

    lo = np.array([a for a, _ in ranges], np.int64)
    hi = lo + np.array([n for _, n in ranges], np.int64)
    union = set().union(*(range(a, b) for a, b in zip(lo.tolist(), hi.tolist())))
    starts, ends = _spans(lo, hi)
    assert set().union(*(range(a, b) for a, b in zip(starts.tolist(), ends.tolist()))) == union
    assert (starts[1:] > ends[:-1]).all() and (ends > starts).all()  # disjoint, apart, none empty
    runs = _runs(np.array(sorted(union), np.int64))
    assert set().union(*(range(a, b) for a, b in runs)) == union
    assert all(b < c for (_, b), (c, _) in zip(runs, runs[1:]))
