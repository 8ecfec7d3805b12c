"""Cold random gathers: ``get_batch`` of random keys and an epoch in random key order on an evicted file,
against a numpy memmap with a dict of keys and the disk's random-read rate measured in the same run.

Each round evicts the files, then for each tool opens its file afresh and times (1) one ``get_batch`` of
``--lookups`` random keys and (2) the first ``--epoch-records`` records of an epoch in random key order, in
batches of 100.  The disk's limit: random reads of one record's size at random offsets of the evicted file, one
at a time and 32 in flight (threads with ``pread``).  Rounds interleave the tools; medians and ranges printed.

    python benchmarks/bench_gathers.py                      # 100,000 records of 1280 float64 (1 GB)
    python benchmarks/bench_gathers.py --records 1000000 --rounds 3 --out benchmarks/results/gathers-1m.md

Target: both at >= 60% of the 32-in-flight random-read rate, and at least as fast as the memmap.
"""

import argparse
import concurrent.futures
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

import embfile

BATCH = 100


def make_files(folder, n, dim, dtype):
    rng = np.random.default_rng(0)
    keys = [f"UniRef50_{i:09d}" for i in range(n)]
    paths = {"emb": os.path.join(folder, "db.emb"), "npy": os.path.join(folder, "db.npy")}
    npy = np.lib.format.open_memmap(paths["npy"], "w+", dtype, (n, dim))
    step = max(1, 16 * machine.MB // (dim * np.dtype(dtype).itemsize))
    with embfile.Writer(paths["emb"], dim, dtype) as w:
        for lo in range(0, n, step):
            block = rng.standard_normal((min(step, n - lo), dim)).astype(dtype)
            w.add_batch(keys[lo : lo + len(block)], block)
            npy[lo : lo + len(block)] = block
    npy.flush()
    del npy
    return keys, paths


def random_read_rate(path, size, in_flight, count=4000, seed=1):
    """Random ``size``-byte preads per second on the evicted file, ``in_flight`` at a time."""
    machine.evict(path)
    offsets = np.random.default_rng(seed).integers(0, os.path.getsize(path) - size, count) // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        t0 = time.perf_counter()
        if in_flight == 1:
            for off in offsets.tolist():
                os.pread(fd, size, off)
        else:
            with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
                list(pool.map(lambda off: os.pread(fd, size, off), offsets.tolist(), chunksize=16))
        return count / (time.perf_counter() - t0)
    finally:
        os.close(fd)


class MemmapDict:
    """What users build around a .npy file: the keys in a dict, rows by numpy fancy indexing."""

    def __init__(self, path, keys):
        self.m = np.load(path, mmap_mode="r")
        self.row = {k: i for i, k in enumerate(keys)}

    def get_batch(self, keys):
        return self.m[[self.row[k] for k in keys]]


def timed_round(tool, paths, keys, lookups, epoch_records, rng):
    """(records/s of one cold get_batch, of the first records of a cold random-order epoch): each on the files
    evicted and opened afresh (pages a store keeps mapped cannot be evicted)."""

    def cold_store():
        for p in paths.values():
            machine.evict(p)
        return embfile.open(paths["emb"]) if tool == "embfile" else MemmapDict(paths["npy"], keys)

    pick = [keys[i] for i in rng.integers(0, len(keys), lookups)]
    store = cold_store()
    t0 = time.perf_counter()
    store.get_batch(pick)
    gather = lookups / (time.perf_counter() - t0)
    del store
    order = [keys[i] for i in rng.permutation(len(keys))[:epoch_records]]
    store = cold_store()
    t0 = time.perf_counter()
    for lo in range(0, len(order), BATCH):
        store.get_batch(order[lo : lo + BATCH])
    epoch = len(order) / (time.perf_counter() - t0)
    return gather, epoch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--lookups", type=int, default=10_000, help="random keys of the cold get_batch")
    ap.add_argument("--epoch-records", type=int, default=20_000, help="records of the random-order epoch timed")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/gathers.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("gathers", "Cold random gathers: embfile against a numpy memmap and the disk", args.out):
        run(args)


def run(args):
    folder = tempfile.mkdtemp(prefix="bench-gathers-", dir=args.dir)
    try:
        keys, paths = make_files(folder, args.records, args.dim, args.dtype)
        record = args.dim * np.dtype(args.dtype).itemsize
        print(
            f"{args.records:,} records of {args.dim} {args.dtype} ({record / 1024:.1f} KiB each, "
            f"{args.records * record / machine.MB:,.0f} MiB); cold get_batch of {args.lookups:,} random keys; "
            f"{args.epoch_records:,} records of a random-order epoch in batches of {BATCH}; {args.rounds} rounds\n"
        )
        rng = np.random.default_rng(7)
        runs = {}
        for _ in range(args.rounds):
            for name, value in (
                ("disk, 1 read in flight", random_read_rate(paths["npy"], record, 1)),
                ("disk, 32 reads in flight", random_read_rate(paths["npy"], record, 32)),
            ):
                runs.setdefault(name, []).append(value)
            for tool in ("embfile", "numpy memmap + dict"):
                gather, epoch = timed_round(tool, paths, keys, args.lookups, args.epoch_records, rng)
                runs.setdefault(f"{tool}: get_batch", []).append(gather)
                runs.setdefault(f"{tool}: random-order epoch", []).append(epoch)
            print(".", end="", flush=True, file=sys.stderr)
        print(file=sys.stderr)
        limit = float(np.median(runs["disk, 32 reads in flight"]))
        print("| what | records/s, median (range) | share of 32 reads in flight |")
        print("|---|---|---|")
        for name, values in runs.items():
            print(
                f"| {name} | {np.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f}) | "
                f"{np.median(values) / limit:.2f} |"
            )
        print(
            "\ntargets: embfile's cold get_batch and random-order epoch >= 0.60 of 32 reads in flight, and >= "
            "the memmap"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
