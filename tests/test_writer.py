"""Writer: conversions and their errors, duplicates, atomic replacement, streaming memory."""

import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest
from conftest import check_roundtrip

import embfile
from embfile import _core, writer
from embfile import _format as F
from embfile._staging import Flusher


def test_add_and_add_batch_mix(tmp_path):
    rng = np.random.default_rng(0)
    m = rng.random((30, 5)).astype(np.float32)
    keys = [f"k{i}" for i in range(30)]
    with embfile.Writer(tmp_path / "a.emb", dim=5, metadata={"source": "test"}) as w:
        for k, v in zip(keys[:10], m[:10]):
            w.add(k, v)
        w.add_batch(keys[10:25], m[10:25])
        w.add(keys[25], list(m[25]))  # any array-like
        w.add_batch(np.array(keys[26:]), m[26:])
        assert len(w) == 30
    db = embfile.open(tmp_path / "a.emb")
    assert list(db) == keys
    np.testing.assert_array_equal(db.matrix, m)
    assert db.metadata["source"] == "test"


def test_write_mapping_and_pair(tmp_path):
    rng = np.random.default_rng(0)
    d = {f"seq{i:010d}": rng.random(8) for i in range(100)}
    embfile.write(tmp_path / "d.emb", d)
    db = embfile.open(tmp_path / "d.emb")
    assert db.dtype == np.float64 and list(db) == list(d)
    for k, v in d.items():
        np.testing.assert_array_equal(db[k], v)
    embfile.write(tmp_path / "p.emb", (list(d), np.stack(list(d.values()))), dtype="float16")
    assert embfile.open(tmp_path / "p.emb").dtype == np.float16


def test_dtype_conversion_on_write(tmp_path):
    m = np.linspace(-3, 3, 24).reshape(4, 6)
    check_roundtrip(tmp_path / "h.emb", list("abcd"), m, dtype="float16")
    ints = np.arange(24, dtype=np.int64).reshape(4, 6)
    check_roundtrip(tmp_path / "i.emb", list("abcd"), ints, dtype="int8")
    check_roundtrip(tmp_path / "f.emb", list("abcd"), ints, dtype="float32")


def test_nan_and_inf_in_source_are_kept(tmp_path):
    m = np.array([[np.nan, 1.0], [np.inf, -np.inf]])
    embfile.write(tmp_path / "n.emb", (["a", "b"], m), dtype="float16")
    db = embfile.open(tmp_path / "n.emb")
    assert np.isnan(db["a"][0]) and db["b"][0] == np.inf and db["b"][1] == -np.inf


@pytest.mark.parametrize("dtype,value", [("float16", 1e6), ("float32", 1e300), ("int8", 300), ("uint8", -1)])
def test_overflow_names_the_key(tmp_path, dtype, value):
    src = np.zeros((3, 4), dtype=np.float64 if dtype.startswith("float") else np.int64)
    src[2, 1] = value
    with pytest.raises(embfile.WriterError, match=r"'third'.*does not fit"):
        embfile.write(tmp_path / "o.emb", (["first", "second", "third"], src), dtype=dtype)
    with pytest.raises(embfile.WriterError, match="'third'"):
        with embfile.Writer(tmp_path / "o.emb", 4, dtype) as w:
            for k, v in zip(["first", "second", "third"], src):
                w.add(k, v)
    assert not os.path.exists(tmp_path / "o.emb")
    assert os.listdir(tmp_path) == []


def test_a_failed_call_adds_nothing(tmp_path):
    """A caller may catch a WriterError and go on: the file holds exactly the accepted rows."""
    rng = np.random.default_rng(5)
    good = rng.random((3000, 700))  # several conversion chunks, several checksum blocks
    bad = good.copy()
    bad[2500, 3] = 1e6  # overflows float16 late in the batch, after chunks were written
    keys = [f"k{i}" for i in range(3000)]
    path = tmp_path / "partial.emb"
    with embfile.Writer(path, 700, "float16", block_bytes=4096) as w:
        w.add_batch(keys[:1000], good[:1000])
        with pytest.raises(embfile.WriterError, match="'k2500'"):
            w.add_batch(keys[1000:], bad[1000:])
        with pytest.raises(embfile.WriterError, match="'solo'"):
            w.add("solo", bad[2500])
        with pytest.raises(TypeError):
            w.add_batch(["fine", 7], good[:2])
        w.add("solo", good[0])
        w.add_batch(keys[1000:2000], good[1000:2000])
    db = embfile.open(path)
    assert list(db) == keys[:1000] + ["solo"] + keys[1000:2000]
    np.testing.assert_array_equal(db.matrix, np.vstack([good[:1000], good[:1], good[1000:2000]]).astype("float16"))
    db.verify()


def _spy_on_writev(monkeypatch, most=None):
    """Record the file range of every ``os.writev``; with ``most``, let each call write at most
    that many bytes, as the kernel may."""
    calls, real = [], os.writev

    def writev(fd, buffers):
        if most is not None:
            views, budget = [], most
            for b in buffers:
                views.append(memoryview(b).cast("B")[:budget])
                budget -= len(views[-1])
            buffers = [v for v in views if len(v)]
        start = os.lseek(fd, 0, os.SEEK_CUR)
        done = real(fd, buffers)
        calls.append((start, start + done))
        return done

    monkeypatch.setattr(os, "writev", writev)
    return calls


def test_record_writes_end_on_2_mib_boundaries(tmp_path, monkeypatch):
    """So the page cache can hold the records in huge folios; a rolled-back batch keeps it so."""
    calls = _spy_on_writev(monkeypatch)
    m = np.random.default_rng(7).random((9000, 700))
    bad = m.copy()
    bad[6000, 0] = 1e6  # overflows float16 in the second conversion chunk, after the first is written
    keys = [f"k{i}" for i in range(9000)]
    path = tmp_path / "aligned.emb"
    with embfile.Writer(path, 700, "float16") as w:
        for k, v in zip(keys[:1500], m[:1500]):
            w.add(k, v)
        w.add_batch(keys[1500:2000], m[1500:2000])
        with pytest.raises(embfile.WriterError, match="'k6000'"):
            w.add_batch(keys[2000:], bad[2000:])
        rolled_back_past = calls[-1][1]
        w.add_batch(keys[2000:], m[2000:])
        record_writes = list(calls)
    assert len(record_writes) >= 5 and rolled_back_past > 4096 + 2000 * 1400
    assert all(end % (2 << 20) == 0 for start, end in record_writes), record_writes
    db = embfile.open(path)
    assert list(db) == keys
    np.testing.assert_array_equal(db.matrix, m.astype("float16"))
    db.verify()


def test_a_write_the_kernel_takes_in_part_is_finished(tmp_path, monkeypatch):
    calls = _spy_on_writev(monkeypatch, most=(1 << 20) + 3)
    m = np.random.default_rng(8).random((2000, 1280)).astype(np.float32)
    check_roundtrip(tmp_path / "short.emb", [f"s{i}" for i in range(2000)], m)
    assert len(calls) > 10
    embfile.open(tmp_path / "short.emb").verify()


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _unwritten_mb(fd):
    """MiB of the file's pages not yet on disk (dirty or being written): Linux 6.5's ``cachestat`` counts this
    file's alone; before it, the machine's whole count stands in (any other writer disturbs it)."""
    whole_file, stat = (ctypes.c_uint64 * 2)(0, 0), _CacheStat()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(451, fd, whole_file, ctypes.byref(stat), 0) == 0:  # cachestat, the same number on every arch
        return (stat.dirty + stat.writeback) * os.sysconf("SC_PAGESIZE") >> 20
    with open("/proc/meminfo") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Dirty:", "Writeback:"))) >> 10


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs Linux")
def test_start_writeback_sends_dirty_pages_to_disk(tmp_path):
    """What the writer does every 32 MiB: without it, fresh pages stay dirty for the kernel's 30 s."""
    path = tmp_path / "dirty.bin"
    os.sync()  # (where only the machine's count is known: other files' dirty pages out of it first)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(96 << 20))
        f.flush()
        if _unwritten_mb(f.fileno()) < 80:
            pytest.skip("this file system does not keep dirty pages (tmpfs?)")
        _core.start_writeback(f.fileno(), 0, 96 << 20)
        deadline = time.monotonic() + 10
        while _unwritten_mb(f.fileno()) >= 48 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _unwritten_mb(f.fileno()) < 48


def _flushers():
    return [t for t in threading.enumerate() if t.name == "embfile-flush"]


def test_a_large_write_is_flushed_as_it_grows(tmp_path, monkeypatch):
    """Past _FLUSH_BYTES a helper thread fdatasyncs the file as it grows, so the storage flushes while
    the writer fills; the helper is gone after a close or an abort."""
    monkeypatch.setattr(writer, "_WRITEBACK_BYTES", 2 << 20)
    monkeypatch.setattr(writer, "_FLUSH_BYTES", 4 << 20)
    m = np.random.default_rng(0).random((4096, 256)).astype(np.float32)  # 4 MiB a batch
    with embfile.Writer(tmp_path / "big.emb", 256) as w:
        w.add_batch([f"a{i}" for i in range(2048)], m[:2048, ::-1])
        assert _flushers() == [] and w._flusher is None  # 2 MiB in the file: not yet worth a flush
        for b in range(5):
            w.add_batch([f"{b}-{i}" for i in range(len(m))], m)
        assert len(_flushers()) == 1
        deadline = time.monotonic() + 10
        while w._flusher._flushed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w._flusher._flushed >= 4 << 20  # what an fdatasync that returned covered
    assert _flushers() == []
    with embfile.open(tmp_path / "big.emb") as db:
        np.testing.assert_array_equal(db.matrix[:2048], m[:2048, ::-1])
        np.testing.assert_array_equal(db.matrix[-4096:], m)
        db.verify()

    with pytest.raises(RuntimeError, match="stop"), embfile.Writer(tmp_path / "gone.emb", 256) as w:
        for b in range(4):
            w.add_batch([f"{b}-{i}" for i in range(len(m))], m)
        assert len(_flushers()) == 1
        raise RuntimeError("stop")
    assert _flushers() == [] and os.listdir(tmp_path) == ["big.emb"]


def test_a_flush_error_is_raised_by_every_later_call():
    """The kernel reports a write error to one fsync only: the helper's must reach the writer, every time."""
    r, w = os.pipe()  # a pipe cannot be synced: fdatasync fails with EINVAL
    try:
        flusher = Flusher(w, every=1)
        flusher.grown(1)
        flusher._thread.join(10)  # the helper stops at its first error
        assert not flusher._thread.is_alive()
        for call in (lambda: flusher.grown(2), flusher.close, flusher.close):
            with pytest.raises(OSError) as e:
                call()
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_layout_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="block_bytes"):
        embfile.Writer(tmp_path / "x.emb", 4, block_bytes=1000)
    with pytest.raises(ValueError, match="bucket_keys"):
        embfile.Writer(tmp_path / "x.emb", 4, bucket_keys=0)
    assert os.listdir(tmp_path) == []


def test_wrong_shape_or_kind_names_the_key(tmp_path):
    with embfile.Writer(tmp_path / "s.emb", 4) as w:
        w.add("ok", np.zeros(4))
        with pytest.raises(embfile.WriterError, match=r"'short'.*shape \(3,\)"):
            w.add("short", np.zeros(3))
        with pytest.raises(embfile.WriterError, match=r"'matrix'.*shape \(2, 4\)"):
            w.add("matrix", np.zeros((2, 4)))
        with pytest.raises(embfile.WriterError, match="'text'"):
            w.add("text", np.array(["a", "b", "c", "d"]))
        with pytest.raises(embfile.WriterError, match="'cplx'"):
            w.add("cplx", np.zeros(4, dtype=complex))
        with pytest.raises(TypeError, match="keys are str"):
            w.add(b"bytes", np.zeros(4))
        with pytest.raises(embfile.WriterError, match="shape"):
            w.add_batch(["a", "b"], np.zeros((3, 4)))
    assert list(embfile.open(tmp_path / "s.emb")) == ["ok"]
    with embfile.Writer(tmp_path / "q.emb", 4, "int8") as w:
        with pytest.raises(embfile.WriterError, match="'f'.*float64.*int8"):
            w.add("f", np.zeros(4))  # quantisation is the caller's decision


def test_bad_writer_arguments(tmp_path):
    with pytest.raises(ValueError, match="dim must be from 1"):
        embfile.Writer(tmp_path / "x.emb", 0)
    with pytest.raises(TypeError, match="dim must be an int, not str"):
        embfile.Writer(tmp_path / "x.emb", "4")
    with pytest.raises(TypeError, match="not supported"):
        embfile.Writer(tmp_path / "x.emb", 4, "complex64")
    with pytest.raises(embfile.WriterError, match="JSON"):
        embfile.Writer(tmp_path / "x.emb", 4, metadata={"x": object()})
    with pytest.raises(TypeError):
        embfile.write(tmp_path / "x.emb", [1, 2, 3])
    assert os.listdir(tmp_path) == []
    (tmp_path / "folder").mkdir()  # found before a record is written (it was the rename's error, naming a temp)
    with pytest.raises(IsADirectoryError, match=r"a folder is there; write_shards\(\) .*: '.*folder'$"):
        embfile.write(tmp_path / "folder", {"a": np.ones(4)})
    assert os.listdir(tmp_path) == ["folder"] and os.listdir(tmp_path / "folder") == []


def test_duplicate_key_is_an_error_naming_it(tmp_path):
    target = tmp_path / "dup.emb"
    embfile.write(target, {"old": np.zeros(2)})
    with pytest.raises(embfile.WriterError, match=r"duplicate key 'sp\|P1' \(rows 1 and 3\)"):
        embfile.write(target, (["a", "sp|P1", "b", "sp|P1"], np.zeros((4, 2))))
    assert list(embfile.open(target)) == ["old"]  # the earlier file is untouched
    assert sorted(os.listdir(tmp_path)) == ["dup.emb"]


def test_exception_inside_with_keeps_the_old_file(tmp_path):
    target = tmp_path / "t.emb"
    embfile.write(target, {"old": np.ones(3)})
    with pytest.raises(RuntimeError):
        with embfile.Writer(target, 3) as w:
            w.add("new", np.zeros(3))
            raise RuntimeError("boom")
    np.testing.assert_array_equal(embfile.open(target)["old"], np.ones(3))
    assert os.listdir(tmp_path) == ["t.emb"]


def test_replacing_a_file_that_readers_hold(tmp_path):
    target = tmp_path / "r.emb"
    embfile.write(target, {"k": np.ones(3)})
    old = embfile.open(target)
    view = old["k"]
    embfile.write(target, {"k": np.full(3, 2.0), "j": np.zeros(3)})
    np.testing.assert_array_equal(old["k"], np.ones(3))  # the reader keeps the old inode
    np.testing.assert_array_equal(view, np.ones(3))
    assert len(old) == 1 and len(embfile.open(target)) == 2


_SLOW_WRITER = textwrap.dedent("""
    import sys, numpy as np, embfile
    with embfile.Writer(sys.argv[1], 256) as w:
        for i in range(10**9):
            w.add(f"key{i}", np.full(256, i, dtype=np.float32))
            if i == 2000:
                print("writing", flush=True)
""")


def test_kill_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "k.emb"
    embfile.write(target, {"old": np.ones(256, dtype=np.float32)})
    before = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"writing\n"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == before
    embfile.open(target).verify()
    leftovers = [p for p in os.listdir(tmp_path) if p != "k.emb"]
    assert all(p.startswith(".k.emb.") and p.endswith(".tmp") for p in leftovers)  # hidden, never at the path
    embfile.write(target, {"next": np.zeros(256, dtype=np.float32)})  # the next write succeeds
    assert list(embfile.open(target)) == ["next"]


_BIG_WRITER = textwrap.dedent("""
    import resource, sys, numpy as np, embfile
    dim, n = 1024, int(sys.argv[2])
    rng = np.random.default_rng(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with embfile.Writer(sys.argv[1], dim, "float32") as w:
        block = rng.random((1000, dim), dtype=np.float32)
        for i in range(0, n, 1000):
            w.add_batch([f"seq{j:010d}" for j in range(i, i + 1000)], block)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
""")


def test_streaming_write_memory_is_bounded(tmp_path):
    # 400 MB of vectors through a writer must not grow the process by anything near that
    n = 100_000
    out = subprocess.run(
        [sys.executable, "-c", _BIG_WRITER, str(tmp_path / "big.emb"), str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    growth_mb = int(out)
    assert growth_mb < 64, f"writer grew by {growth_mb} MB for {n * 4096 >> 20} MB of vectors"
    db = embfile.open(tmp_path / "big.emb")
    assert len(db) == n
    db.verify()


def test_finishing_a_file_writes_its_keys_from_where_they_are(tmp_path):
    """The keys are the bulk of what a writer holds (all of them, to sort them at the end: gigabytes for a
    hundred million).  Finishing the file allocates the sort's order and the index, not a copy of the keys."""
    n = 200_000
    w = embfile.Writer(tmp_path / "keys.emb", 1, "uint8")
    w.add_batch([f"UniRef50_A0A{i:010d}" for i in range(n)], np.zeros((n, 1), np.uint8))
    tracemalloc.start()
    try:
        w.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    with open(tmp_path / "keys.emb", "rb") as f:
        index_size = F.Header.unpack(f.read(F.HEADER_SIZE)).index_size
    order = 8 * n  # the rows in key order, from which the index is built
    assert peak - order - index_size < 1 << 20, f"{peak} bytes to finish {n} keys of 22 bytes"


def test_keys_given_as_utf8_bytes_write_the_same_file(tmp_path, monkeypatch):
    """Writer.add_batch takes keys as an Arrow string array's bytes (EncodedKeys): the file is the one a list of
    str gives, byte for byte; slices of a sliced array, limits and errors name the right keys."""
    pa = pytest.importorskip("pyarrow")
    from embfile._keys import EncodedKeys

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    keys = ["", "ä", "P69905", "🧬" * 3, *(f"k{i}" for i in range(500))]
    matrix = np.arange(len(keys) * 3, dtype=np.float32).reshape(-1, 3)
    embfile.write(tmp_path / "str.emb", (keys, matrix))
    for kind in (pa.string(), pa.large_string()):
        array = pa.array(["junk", *keys], kind).slice(1)  # an array with an offset
        with embfile.Writer(tmp_path / "enc.emb", 3) as w:
            encoded = EncodedKeys.of_arrow(array)
            w.add_batch(encoded[:100], matrix[:100])
            w.add_batch(encoded[100:], matrix[100:])
        assert (tmp_path / "enc.emb").read_bytes() == (tmp_path / "str.emb").read_bytes()
    with embfile.open(tmp_path / "str.emb") as db:
        f = db.files[0]
        assert f.encoded_keys(2, 4).tolist() == ["P69905", "🧬" * 3] and f.encoded_keys()[-1] == "k499"
    with embfile.Writer(tmp_path / "bad.emb", 3, "float16") as w:
        with pytest.raises(embfile.WriterError, match="key 'ä': value 1000000.0 does not fit in float16"):
            w.add_batch(EncodedKeys.of_arrow(pa.array(["a", "ä"])), np.array([[0, 0, 0], [1e6, 0, 0]]))
        with pytest.raises(embfile.WriterError, match="is 70000 bytes; the limit is 65535"):
            w.add_batch(EncodedKeys.of_arrow(pa.array(["x" * 70000])), np.zeros((1, 3)))
        assert len(w) == 0


def test_a_writer_dropped_without_close_warns_and_leaves_nothing(tmp_path):
    import gc

    w = embfile.Writer(tmp_path / "x.emb", 4)
    w.add("a", np.ones(4))
    with pytest.warns(ResourceWarning, match="never closed"):
        del w
        gc.collect()
    assert os.listdir(tmp_path) == []


def test_metadata_of_a_file_round_trips_into_a_new_one(tmp_path):
    embfile.write(tmp_path / "a.emb", {"k": np.ones(3)}, metadata={"model": "esm2", "layer": 33})
    with embfile.open(tmp_path / "a.emb") as db:
        embfile.write(tmp_path / "b.emb", {"k": np.zeros(3)}, metadata=db.metadata)  # "embfile" is replaced
        old = db.metadata["embfile"]
    with embfile.open(tmp_path / "b.emb") as db:
        assert db.metadata["model"] == "esm2" and db.metadata["layer"] == 33
        assert db.metadata["embfile"]["created"] >= old["created"]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_folders_made_by_writers_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        embfile.write_shards(tmp_path / "ds", {"a": np.ones(4)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ds").st_mode) == 0o777 & ~mask
