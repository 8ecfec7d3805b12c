"""The machine's own limits, measured in the same run as a benchmark, so results print as ratios;
this process's memory; and the result files every benchmark writes (:func:`recorded`).

memcpy bandwidth, first touch of new memory (the kernel zeroes each page, and in a VM the host
may fault it in: a full read into a new array pays it), write + fsync bandwidth, cold sequential
read bandwidth and cold random 4 KiB pread latency.  "Cold" means evicted from the page cache with
posix_fadvise(DONTNEED).
"""

import contextlib
import datetime
import io
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

from embfile._staging import fsync_path  # noqa: F401 - the benchmarks' durable writes use it

MB = 1 << 20


def evict(path, offset=0, length=0):
    """Drop a file's pages from the page cache (pages mapped by this process stay: unmap first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def memcpy_gbps(nbytes=256 * MB, repeats=5):
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return nbytes / best / 1e9


def first_touch_gbps(nbytes=256 * MB, repeats=5):
    def touch():
        np.empty(nbytes, np.uint8)[::4096] = 1  # one write per page of a new allocation

    return nbytes / min(_timed(touch) for _ in range(repeats)) / 1e9


def write_fsync_gbps(path, nbytes):
    chunk = np.random.default_rng(0).bytes(8 * MB)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - t0) / 1e9


def cold_read_gbps(path):
    evict(path)
    buf = bytearray(8 * MB)
    total = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - t0) / 1e9


def cold_pread_us(path, count=400, size=4096, seed=0):
    """Median and p99 latency of single random preads on an evicted file, read-ahead off."""
    evict(path)
    pages = os.path.getsize(path) // size
    offsets = np.random.default_rng(seed).choice(pages, count, replace=False) * size
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    times = []
    try:
        for off in offsets.tolist():
            t0 = time.perf_counter_ns()
            os.pread(fd, size, off)
            times.append(time.perf_counter_ns() - t0)
    finally:
        os.close(fd)
    return np.median(times) / 1e3, np.percentile(times, 99) / 1e3


def read_gbps(a, repeats=5):
    """Memory read bandwidth: one thread per core summing its share of ``a`` (numpy releases the GIL)."""
    parts = np.array_split(a.reshape(-1), os.cpu_count() or 1)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure(folder, nbytes=1024 * MB, repeats=3):
    """All the limits, using a scratch file of ``nbytes`` in ``folder`` (removed afterwards).

    The disk's figures are the best of ``repeats``, as the benchmarks' own: a single cold read right
    after the write can meet the host still flushing it (1.8 against 4.2 GB/s here).
    """
    path = os.path.join(folder, "machine-limits.bin")
    try:
        limits = {
            "memcpy_gbps": memcpy_gbps(),
            "first_touch_gbps": first_touch_gbps(),
            "write_fsync_gbps": max(write_fsync_gbps(path, nbytes) for _ in range(repeats)),
        }
        limits["cold_read_gbps"] = max(cold_read_gbps(path) for _ in range(repeats))
        limits["cold_pread_us"], limits["cold_pread_p99_us"] = cold_pread_us(path)
        return limits
    finally:
        os.unlink(path)


def rss_mb():
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def peak_mb():
    """This process's peak resident memory so far, MiB (VmHWM: ru_maxrss is updated lazily)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def describe(limits):
    return (
        f"memcpy {limits['memcpy_gbps']:.1f} GB/s | first touch {limits['first_touch_gbps']:.1f} GB/s | "
        f"write+fsync {limits['write_fsync_gbps']:.2f} GB/s | "
        f"cold sequential read {limits['cold_read_gbps']:.2f} GB/s | cold random 4 KiB pread "
        f"{limits['cold_pread_us']:.0f} us median ({limits['cold_pread_p99_us']:.0f} us p99)"
    )


RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def host():
    """This machine in one line: CPU, cores, memory, kernel, Python, numpy, and the embfile tested."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    import embfile

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB, Linux {platform.release()}; Python "
        f"{platform.python_version()}, numpy {np.__version__}; embfile {embfile.__version__}"
        + (f" ({commit})" if commit else "")
    )


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


@contextlib.contextmanager
def recorded(name, title, out=None):
    """Print as usual, and write what was printed to ``benchmarks/results/NAME.md`` (or ``out``; ``"-"``
    writes nothing), under a header: what it is, when and where it ran, the command, how long it took.

    The result files are the only place figures are kept: the documentation includes them as they are.
    """
    kept, started, t0 = io.StringIO(), datetime.datetime.now(datetime.UTC), time.perf_counter()
    real = sys.stdout
    sys.stdout = _Tee(real, kept)
    try:
        yield
    finally:
        sys.stdout = real
    if out == "-":
        return
    path = pathlib.Path(out) if out else RESULTS / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    minutes = (time.perf_counter() - t0) / 60
    head = (
        f"# {title}\n\n"
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC ({minutes:.1f} min).\n\n"
        f"**Host:** {host()}\n\n"
    )
    path.write_text(head + kept.getvalue())
    print(f"wrote {path}", file=sys.stderr)


def update_block(path, marker, text):
    """Replace the text between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``path`` (a generated block)."""
    path = pathlib.Path(path)
    old = path.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n).*?(<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(old):
        print(f"{path} has no <!-- {marker} --> block; not updated", file=sys.stderr)
        return
    path.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip() + "\n" + m.group(2), old))


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    import tempfile

    print(describe(measure(tempfile.gettempdir())))
