"""Crashes lose nothing: writers and converters SIGKILLed at seeded moments, and full disks.

After every kill the destination holds the previous file, byte for byte (or
nothing if there was none), or the complete new one; nothing partial there
opens; and the next write to the same path succeeds and clears what the killed
writer left.  The seed of the kill points is printed (``-s`` shows it) and can be
set with EMBFILE_KILL_SEED.
"""

import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import LONG
from workers import content, ragged_content

import embfile
from embfile import folder as layout

HERE = pathlib.Path(__file__).parent
N, DIM = 40_000, 128  # 20 MB of records: a run spends most of its time writing, not starting
POINTS = 60 if LONG else 12


@pytest.fixture(scope="module")
def seed():
    seed = int(os.environ.get("EMBFILE_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"\nkill points drawn with EMBFILE_KILL_SEED={seed}")
    return seed


def kill_points(argv, seed, points, reset):
    """Time a whole run of ``argv`` (the better of two: the first may pay for cold caches), then run it
    ``points`` times, each SIGKILLed at a seeded moment (half of them in the last quarter, where the file
    is finished and renamed); yield the moment and whether the kill came before the end.  ``reset()`` puts
    the destination back as it was before every run."""
    whole = min(_timed_run(argv, reset) for _ in range(2))
    rng = random.Random(seed)
    for i in range(points):
        reset()
        at = rng.uniform(0, whole) if i % 2 else rng.uniform(0.75 * whole, 1.1 * whole)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
            killed = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed = True
        yield at, killed


def _timed_run(argv, reset):
    reset()
    t = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - t


def check_destination(dst, before, is_new, what, beside=()):
    """``dst`` is as it was before, or the complete new file; leftovers beside it do not open."""
    if os.path.exists(dst) and (before is None or _read(dst) != before):
        assert is_new(dst), f"{what}: {dst} is neither the old file nor a complete new one"
    elif before is None:
        assert not os.path.exists(dst), f"{what}: {dst} appeared"
    for entry in os.listdir(os.path.dirname(dst)):
        path = os.path.join(os.path.dirname(dst), entry)
        if entry.startswith("."):  # a killed writer's staging folder: nothing in it is a finished file
            assert entry.endswith(".tmp"), entry
            for root, _, files in os.walk(path):
                for f in files:
                    if f.endswith(".emb"):
                        _assert_does_not_open_or_is_whole(os.path.join(root, f))
        else:
            assert path == dst or path in beside, f"{what}: stray {path}"


def _read(path):
    if os.path.isdir(path):
        return {f: _read(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    return pathlib.Path(path).read_bytes()


def _assert_does_not_open_or_is_whole(path):
    try:
        db = embfile.open(path)
    except embfile.EmbFileError:
        return
    db.verify()  # a file that opens is a whole one (its header is written last)


def is_generation(generation, n=N, dim=DIM):
    def check(dst):
        with embfile.open(dst) as db:
            db.verify()
            keys, matrix = content(n, dim, generation)
            assert db.metadata["generation"] == generation and len(db) == n
            np.testing.assert_array_equal(db.get_batch(keys[::997]), matrix[::997])
        return True

    return check


def is_ragged_generation(generation, n=N, dim=DIM):
    def check(dst):
        with embfile.open(dst) as db:
            db.verify()
            keys, rows, lengths = ragged_content(n, dim, generation)
            assert db.ragged and db.metadata["generation"] == generation and len(db) == n
            ends = np.concatenate([[0], np.cumsum(lengths)])
            for i in range(0, n, 997):
                np.testing.assert_array_equal(db[keys[i]], rows[ends[i] : ends[i + 1]])
        return True

    return check


@pytest.mark.parametrize("mode,name", [("ragged", "db.emb"), ("ragged-shards", "dataset")])
def test_killed_ragged_writer(tmp_path, seed, mode, name):
    """Per-residue records keep the guarantee: after a kill, nothing or the whole file (or dataset)."""
    dst = str(tmp_path / name)
    argv = [sys.executable, HERE / "workers.py", mode, dst, str(N // 4), str(DIM), "3"]

    def reset():
        shutil.rmtree(dst, ignore_errors=True) if mode.endswith("shards") else pathlib.Path(dst).unlink(missing_ok=True)

    for at, _ in kill_points(argv, seed + 7, POINTS // 2, reset):
        check_destination(dst, None, is_ragged_generation(3, N // 4), f"seed {seed}: {mode} killed at {at:.3f} s")


def rewrite_clears_leftovers(dst, mode="write"):
    """The next write to the same path succeeds and leaves nothing of the killed ones."""
    subprocess.run([sys.executable, HERE / "workers.py", mode, dst, "2000", str(DIM), "99"], check=True)
    assert is_generation(99, 2000)(dst)
    assert [e for e in os.listdir(os.path.dirname(dst)) if e.startswith(".")] == []


def test_killed_writer(tmp_path, seed):
    dst = str(tmp_path / "out" / "db.emb")
    os.mkdir(tmp_path / "out")
    argv = [sys.executable, HERE / "workers.py", "write", dst, str(N), str(DIM)]
    same_bytes = {**os.environ, "SOURCE_DATE_EPOCH": "0"}  # generation 1 is the same file each time

    def reset():  # generation 1 is the file to keep
        subprocess.run(argv + ["1"], check=True, env=same_bytes)

    reset()
    before = _read(dst)
    kills = 0
    for i, (at, killed) in enumerate(kill_points(argv + ["2"], seed, POINTS, reset)):
        check_destination(dst, before, is_generation(2), f"seed {seed}: killed at {at:.3f} s")
        kills += killed
        if i % 4 == 3:
            rewrite_clears_leftovers(dst)
    assert kills >= POINTS // 3, f"only {kills} of {POINTS} runs were killed before they ended"


@pytest.mark.parametrize("mode,name", [("write", "db.emb"), ("shards", "dataset")])
def test_killed_writer_with_no_earlier_file(tmp_path, seed, mode, name):
    """Nothing there before: after a kill there is nothing, or the whole file (or folder of shards)."""
    dst = str(tmp_path / name)
    argv = [sys.executable, HERE / "workers.py", mode, dst, str(N), str(DIM), "2"]

    def reset():
        shutil.rmtree(dst, ignore_errors=True) if mode == "shards" else pathlib.Path(dst).unlink(missing_ok=True)

    for at, _ in kill_points(argv, seed + len(mode), POINTS // 2, reset):
        check_destination(dst, None, is_generation(2), f"seed {seed}: {mode} killed at {at:.3f} s")
    reset()
    rewrite_clears_leftovers(dst, mode)


def test_killed_overwrite_leaves_whole_versions(tmp_path, seed):
    """A dataset's next version, killed: the latest version is the old one or the new one, whole, and every
    earlier version still opens; the next writer clears the killed one's staging folder."""
    dst = tmp_path / "ds"
    argv = [sys.executable, HERE / "workers.py", "overwrite", dst, str(N), str(DIM)]
    subprocess.run(argv + ["1"], check=True)
    for at, _ in kill_points(argv + ["2"], seed + 5, POINTS // 2, lambda: None):
        latest = layout.latest_version(dst)
        for version in range(1, latest + 1):
            with embfile.open(dst, version=version) as db:
                generation = db.metadata["generation"]
                assert generation == (1 if version == 1 else 2), f"seed {seed}: killed at {at:.3f} s"
                db.verify()
        assert is_generation(1 if latest == 1 else 2)(dst)
    subprocess.run(argv + ["3"], check=True)
    assert is_generation(3)(dst) and os.listdir(dst / layout.STAGING) == []


def _holds(dst, generations):
    """The latest version of ``dst`` holds exactly ``generations`` ({generation: the rows of it kept}), and
    every version there opens and checks out."""
    for version in layout.versions(dst):
        with embfile.open(dst, version=version) as db:
            db.verify()
    keys, matrices = [], []
    for generation, rows in generations.items():
        k, m = content(N, DIM, generation)
        keys += [k[r] for r in range(N)[rows]]
        matrices.append(m[rows])
    with embfile.open(dst) as db:
        assert sorted(db) == sorted(keys)
        np.testing.assert_array_equal(db.get_batch(keys[::97]), np.concatenate(matrices)[::97])


def _no_leftovers(dst):
    named = set().union(*(m.files() for m in layout.history(dst)))
    present = {f"{sub}/{n}" for sub in (layout.SHARDS, layout.INDEX) for n in os.listdir(dst / sub)}
    assert present == named and os.listdir(dst / layout.STAGING) == []


@pytest.mark.parametrize(
    "operation,before,after",
    [
        ("append", {1: slice(None)}, {1: slice(None), 2: slice(None)}),
        ("remove", {1: slice(None)}, {1: slice(1, None, 2)}),
        ("compact", {1: slice(None)}, {1: slice(None)}),
    ],
)
def test_killed_operation_leaves_the_latest_version_whole(tmp_path, seed, operation, before, after):
    """An append, remove or compact SIGKILLed at a seeded moment: the latest version is the one before or the
    one after, whole, every version opens, and the next operation removes what the killed one left."""
    pristine, dst = tmp_path / "pristine", tmp_path / "ds"
    keys, matrix = content(N, DIM, 1)
    embfile.write_shards(pristine, (keys, matrix), shard_bytes=N * DIM // 4, metadata={"generation": 1})
    for i in range(1, 4):  # small appended shards and segments, for compact to join
        embfile.append(pristine, ([f"extra{i}"], matrix[:1]))
        embfile.remove(pristine, [f"extra{i}"])
    argv = [
        sys.executable,
        HERE / "workers.py",
        operation,
        dst,
        str(N),
        str(DIM),
        "2" if operation == "append" else "1",
    ]

    def reset():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(pristine, dst)

    kills = 0
    for i, (at, killed) in enumerate(kill_points(argv, seed + len(operation), POINTS // 2, reset)):
        where = f"seed {seed}: {operation} killed at {at:.3f} s"
        kills += killed
        done = layout.latest_version(dst) > layout.latest_version(pristine)
        try:
            _holds(dst, after if done else before)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None
        if i % 3 == 2:  # the next operation clears what the killed one left
            embfile.append(dst, (["next"], matrix[:1]))
            _no_leftovers(dst)
    assert kills >= POINTS // 6, f"seed {seed}: only {kills} runs of {operation} were killed before they ended"


def test_killed_dataset_writer_resumes_with_every_key_once(tmp_path, seed):
    """A DatasetWriter job SIGKILLed again and again, each time resumed: it ends with every key exactly once."""
    dst = tmp_path / "job"
    argv = [sys.executable, HERE / "workers.py", "job", dst, str(N), str(DIM), "2"]
    whole = min(_timed_run(argv, lambda: shutil.rmtree(dst, ignore_errors=True)) for _ in range(2))
    shutil.rmtree(dst)
    rng = random.Random(seed)
    kills = 0
    for _ in range(POINTS // 2):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.2, 0.8) * whole)
        except subprocess.TimeoutExpired:
            proc.kill()
            kills += 1
        proc.wait()
        if os.path.exists(dst):
            with embfile.open(dst) as db:  # what was committed is whole
                db.verify()
    subprocess.run(argv, check=True)
    _holds(dst, {2: slice(None)})
    _no_leftovers(dst)
    assert kills >= 1, f"seed {seed}: no run was killed"


@pytest.mark.parametrize("src_name,dst_name", [("src.h5", "db.emb"), ("src.emb", "db.parquet")])
def test_killed_converter(tmp_path, seed, src_name, dst_name):
    """The real CLI, ``embfile convert``, killed: HDF5 to .emb and .emb to Parquet."""
    pytest.importorskip("h5py")
    pytest.importorskip("pyarrow")
    keys, matrix = content(N, DIM, 2)
    src, dst = tmp_path / src_name, tmp_path / dst_name
    embfile.write(tmp_path / "src.emb", (keys, matrix), metadata={"generation": 2})
    if src_name.endswith(".h5"):
        embfile.convert(tmp_path / "src.emb", src)
        os.unlink(tmp_path / "src.emb")
    old = tmp_path / "old.emb"
    embfile.write(old, (["x"], np.ones((1, DIM), np.float32)))
    embfile.convert(old, dst)
    os.unlink(old)
    before = dst.read_bytes()

    def is_new(path):
        """A finished conversion: the same records, read back through embfile."""
        check = tmp_path / "check.emb"
        embfile.convert(path, check, progress=False)
        try:
            with embfile.open(check) as db:
                db.verify()
                np.testing.assert_array_equal(db.get_batch(keys[::997]), matrix[::997])
        finally:
            os.unlink(check)
        return True

    argv = [sys.executable, "-m", "embfile", "convert", "-q", src, dst]
    for at, _ in kill_points(argv, seed + len(dst_name), POINTS, lambda: dst.write_bytes(before)):
        check_destination(str(dst), before, is_new, f"seed {seed}: convert killed at {at:.3f} s", beside={str(src)})
    dst.write_bytes(before)
    subprocess.run(argv, check=True)
    assert is_new(dst)
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 6 MiB (a tmpfs: needs the mount permission root has, as in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", mnt], check=True)


def test_disk_full_mid_write(small_disk):
    dst = small_disk / "db.emb"
    keys, matrix = content(2000, DIM, 1)  # 1 MB: fits
    embfile.write(dst, (keys, matrix))
    before = dst.read_bytes()
    big_keys, big = content(20_000, DIM, 2)  # 10 MB: does not
    with pytest.raises(embfile.DiskFullError, match="no space left on device after writing") as info:
        embfile.write(dst, (big_keys, big))
    assert info.value.errno == 28 and isinstance(info.value, OSError)
    assert dst.read_bytes() == before and os.listdir(small_disk) == ["db.emb"]
    embfile.write(dst, (keys[:10], matrix[:10]))  # the space came back: the next write succeeds
    assert len(embfile.open(dst)) == 10


@pytest.mark.parametrize("name", ["db.h5", "db.parquet"])
def test_disk_full_conversion_is_refused_up_front(small_disk, tmp_path, name):
    pytest.importorskip("h5py")
    pytest.importorskip("pyarrow")
    src = tmp_path / "src.emb"
    embfile.write(src, content(20_000, DIM, 2))
    (small_disk / name).write_bytes(b"keep me")
    with pytest.raises(embfile.DiskFullError, match="bytes needed"):
        embfile.convert(src, small_disk / name)
    assert os.listdir(small_disk) == [name] and (small_disk / name).read_bytes() == b"keep me"


@pytest.mark.parametrize("limit_mb, n", [(2, 20_000), (20, 100_000)])
def test_file_size_limit(tmp_path, limit_mb, n):
    """RLIMIT_FSIZE (EFBIG), which any user can set: the same clean failure, in a real process, met
    at the writer's last write (2 MiB) or among its record writes (20 MiB)."""
    dst = tmp_path / "db.emb"
    embfile.write(dst, content(100, DIM, 1))
    before = dst.read_bytes()
    script = (
        "import resource, signal, sys, embfile; from workers import content\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_mb} << 20, {limit_mb} << 20))\n"
        "try:\n"
        f"    embfile.write({str(dst)!r}, content({n}, {DIM}, 2))\n"
        "except embfile.DiskFullError as e:\n"
        "    print(e.errno, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("27 ") and "file too large" in out.stdout, out
    assert dst.read_bytes() == before and os.listdir(tmp_path) == ["db.emb"]
