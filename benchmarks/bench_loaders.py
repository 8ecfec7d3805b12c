"""Feeding PyTorch: a real DataLoader over the same file for each of embfile's paths and the loaders users
have, at 0, 2 and 4 worker processes, warm and cold, against embfile's in-process ``iter_batches`` and the
machine's limits measured in the same run.

Loaders (batches of 256 records, one shuffled epoch each):

- embfile ``IterableDataset`` (block shuffle) through ``DataLoader(batch_size=None, num_workers=k)``;
- embfile ``Loader`` (no workers: the gather on this thread, read-ahead on another);
- embfile map-style ``Dataset`` with ``shuffle=True`` and ``collate_fn=embfile.torch.collate``, and with a
  batch sampler as the sampler (``batch_size=None``: each item is a batch): PyTorch's ``BatchSampler`` over a
  ``RandomSampler``, and embfile's ``BatchSampler`` (the block-shuffled epoch, index arrays), also over a
  dataset of keys (a training split: 80% of the keys, in random order, as a split file lists them);
- a numpy memmap map-style dataset (``__getitem__`` per row, the default collate), ``shuffle=True``;
- Hugging Face datasets (Arrow, memory-mapped, ``with_format("torch")``), ``shuffle=True``;
- LitData (``optimize`` then ``StreamingDataset(shuffle=True)`` + ``StreamingDataLoader``), where it installs.

embfile's main worker paths run again with ``prefetch_factor=8`` (PyTorch asks each worker for 2 batches ahead).
  Mosaic Streaming is not run: its releases pin numpy < 2.2.

The machine's limits: memcpy, a cold sequential read of the file, the DataLoader alone (an
``IterableDataset`` whose workers hand over a count and no data: what the loader's machinery allows on this
machine, whatever the dataset), and the DataLoader whose workers copy each batch once, a stretch of rows with
no shuffle, handed over in reused shared memory or PyTorch's way: the ceiling of any loader with workers here,
since each must at least bring its batch into memory the main process reads.

Warm: the files cached, workers persistent, one untimed epoch first; the figure is records per second of the
epochs that follow for at least ``--seconds``, against in-process epochs run for as long just before.  Cold:
the files evicted before the epoch, workers started for it; the rate counts from the first batch on, and the
first batch's time (the workers' start, the first reads) is printed apart.
Every configuration runs ``--rounds`` times, interleaved with the others (A, B, ..., A, B, ...): the median
and the range are printed.

    python benchmarks/bench_loaders.py                   # 100,000 x 1280 float32 (500 MiB): a few minutes
    python benchmarks/bench_loaders.py --records 400000 --rounds 5

Targets: every embfile path >= 70% of in-process ``iter_batches`` warm, for every ``num_workers``; cold >= 85%
of the cold sequential read of the file.
"""

import argparse
import contextlib
import functools
import gc
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

import embfile
from embfile._handover import worker_buffers
from embfile.torch import BatchSampler as Sampler
from embfile.torch import Dataset, IterableDataset, Loader, collate

BATCH = 256
WORKERS = (0, 2, 4)
DATALOADER_ALONE = "machine: DataLoader alone (no data)"
COPIED = "machine: DataLoader, each batch copied once (reused shared memory)"
COPIED_TORCH = "machine: DataLoader, each batch copied once (PyTorch's hand-over)"
PREFETCH = 8
DEEPER = ("embfile IterableDataset", "embfile map-style, shuffle", "embfile map-style, embfile BatchSampler")
warnings.filterwarnings("ignore", message="This DataLoader will create")


class MemmapRows(torch.utils.data.Dataset):
    """What users write around a .npy file: one row per ``__getitem__``."""

    def __init__(self, path):
        self.path, self.m = path, None

    def __len__(self):
        return np.load(self.path, mmap_mode="r").shape[0]

    def __getitem__(self, i):
        if self.m is None:
            self.m = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self.m[i]))


class Nothing(torch.utils.data.IterableDataset):
    """The DataLoader's own cost: each worker hands over a batch count and no data (the machine's limit for a
    loader with workers, whatever the dataset)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for start in range(worker * BATCH, self.n, workers * BATCH):
            yield min(BATCH, self.n - start)


def make_files(folder, n, dim):
    rng = np.random.default_rng(0)
    keys = [f"seq{i:09d}" for i in range(n)]
    paths = {"emb": os.path.join(folder, "db.emb"), "npy": os.path.join(folder, "db.npy")}
    npy = np.lib.format.open_memmap(paths["npy"], "w+", np.float32, (n, dim))
    step = 16 * machine.MB // (dim * 4)
    with embfile.Writer(paths["emb"], dim, "float32") as w:
        for lo in range(0, n, step):
            block = rng.standard_normal((min(step, n - lo), dim), np.float32)
            w.add_batch(keys[lo : lo + len(block)], block)
            npy[lo : lo + len(block)] = block
    npy.flush()
    del npy
    import datasets
    import pyarrow as pa

    table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(np.load(paths["npy"]).reshape(-1)), dim)})
    paths["hf"] = os.path.join(folder, "hf")
    datasets.Dataset(table).save_to_disk(paths["hf"])
    try:
        import litdata

        paths["litdata"] = os.path.join(folder, "litdata")
        item = functools.partial(_litdata_items, npy=paths["npy"])
        method = multiprocessing.get_start_method()
        with contextlib.redirect_stdout(io.StringIO()):  # its progress messages are not results
            litdata.optimize(item, list(range(0, n, 1024)), paths["litdata"], chunk_bytes="64MB", num_workers=2)
        multiprocessing.set_start_method(method, force=True)  # optimize() sets its own, for everyone after
    except ImportError:
        pass
    return paths


def _litdata_items(lo, npy):
    m = np.load(npy, mmap_mode="r")
    for i in range(lo, min(lo + 1024, len(m))):
        yield {"vector": np.array(m[i])}


def loaders(paths):
    """name -> (make(num_workers, cold) -> an iterable of batches, the files it reads, worker counts)."""
    import datasets

    def dl(ds, k, cold, **kw):
        return DataLoader(ds, num_workers=k, persistent_workers=k > 0 and not cold, **kw)

    made = {
        DATALOADER_ALONE: (
            lambda k, cold: dl(Nothing(n_records(paths)), k, cold, batch_size=None),
            None,  # no data: warm only
            WORKERS,
        ),
        COPIED: (lambda k, cold: dl(Copied(paths["npy"], True), k, cold, batch_size=None), None, WORKERS[1:]),
        COPIED_TORCH: (lambda k, cold: dl(Copied(paths["npy"], False), k, cold, batch_size=None), None, WORKERS[1:]),
        "embfile IterableDataset": (
            lambda k, cold, **kw: dl(IterableDataset(paths["emb"], BATCH, seed=1), k, cold, batch_size=None, **kw),
            [paths["emb"]],
            WORKERS,
        ),
        "embfile Loader (no workers)": (lambda k, cold: Loader(paths["emb"], BATCH, seed=1), [paths["emb"]], (0,)),
        "embfile map-style, shuffle": (
            lambda k, cold, **kw: dl(
                Dataset(paths["emb"]), k, cold, batch_size=BATCH, shuffle=True, collate_fn=collate, **kw
            ),
            [paths["emb"]],
            WORKERS,
        ),
        "embfile map-style, torch BatchSampler": (
            lambda k, cold: dl(
                Dataset(paths["emb"]),
                k,
                cold,
                batch_size=None,
                sampler=BatchSampler(RandomSampler(range(n_records(paths))), BATCH, False),
            ),
            [paths["emb"]],
            WORKERS,
        ),
        "embfile map-style, embfile BatchSampler": (
            lambda k, cold, **kw: dl(
                by_row := Dataset(paths["emb"]), k, cold, batch_size=None, sampler=Sampler(by_row, BATCH, seed=1), **kw
            ),
            [paths["emb"]],
            WORKERS,
        ),
        "embfile map-style of keys (80%, random order), embfile BatchSampler": (
            lambda k, cold: dl(
                by_key := Dataset(paths["emb"], keys=split_keys(paths)),
                k,
                cold,
                batch_size=None,
                sampler=Sampler(by_key, BATCH, seed=1),
            ),
            [paths["emb"]],
            WORKERS,
        ),
        "numpy memmap map-style, shuffle": (
            lambda k, cold: dl(MemmapRows(paths["npy"]), k, cold, batch_size=BATCH, shuffle=True),
            [paths["npy"]],
            WORKERS,
        ),
        "HF datasets (Arrow), shuffle": (
            lambda k, cold: dl(
                datasets.load_from_disk(paths["hf"]).with_format("torch"), k, cold, batch_size=BATCH, shuffle=True
            ),
            [os.path.join(paths["hf"], f) for f in os.listdir(paths["hf"]) if f.endswith(".arrow")],
            WORKERS,
        ),
    }
    if "litdata" in paths:
        import litdata

        def lit(k, cold):
            ds = litdata.StreamingDataset(paths["litdata"], shuffle=True)
            return litdata.StreamingDataLoader(ds, batch_size=BATCH, num_workers=k)

        files = [os.path.join(paths["litdata"], f) for f in os.listdir(paths["litdata"]) if f.endswith(".bin")]
        made["LitData StreamingDataset"] = (lit, files, WORKERS)
    return deeper(made)


def deeper(made):
    """``made`` with, after each of embfile's main DataLoader paths, the same path with each worker asked for
    PREFETCH batches ahead instead of PyTorch's default 2 (what the docs advise with workers on few cores)."""
    out = {}
    for name, (make, files, ks) in made.items():
        out[name] = make, files, ks
        if name in DEEPER:
            out[f"{name}, prefetch_factor={PREFETCH}"] = (
                functools.partial(make, prefetch_factor=PREFETCH),
                files,
                [k for k in ks if k],
            )
    return out


def split_keys(paths):
    """A training split: 80% of the keys, drawn at random and kept in that order (as a split file lists them)."""
    with embfile.open(paths["emb"]) as db:
        keys = list(db)
    return [keys[i] for i in np.random.default_rng(0).choice(len(keys), len(keys) * 4 // 5, replace=False)]


def n_records(paths):
    return np.load(paths["npy"], mmap_mode="r").shape[0]


def records(batch):
    if isinstance(batch, int):
        return batch
    if isinstance(batch, dict):
        batch = batch["vector"]
    return len(batch)


def epoch_rate(loader, files, cold, seconds=0.0):
    """Records per second of one epoch of ``loader`` (cold: its files evicted first), and how long its first
    batch took.  Cold, the rate counts from the first batch on: the workers' start and the first reads are in
    the first batch's time, reported apart (an epoch of a real training run is minutes long, the start is not).
    Warm, epochs follow one another until ``seconds`` have passed: the rate of a tenth of a second would be the
    machine's drift as much as the loader's."""
    if cold:
        gc.collect()
        for f in files:
            machine.evict(f)
    t0 = time.perf_counter()
    batches = iter(loader)
    n = records(next(batches))
    t1 = time.perf_counter()
    rest = sum(records(b) for b in batches)
    while not cold and time.perf_counter() - t0 < seconds:
        rest += sum(records(b) for b in loader)
    t2 = time.perf_counter()
    return (rest / (t2 - t1) if cold else (n + rest) / (t2 - t0)), t1 - t0


class Copied(torch.utils.data.IterableDataset):
    """The least a loader with workers can do with data: each batch a stretch of rows of the cached .npy file
    (no shuffle, no gather), copied once into memory the main process reads: in a worker, one of embfile's
    reused shared buffers (``shared``: the cheapest hand-over known here) or a new tensor that PyTorch moves to
    a new shared segment, as any dataset's batch goes."""

    def __init__(self, npy, shared):
        self.npy, self.shared, self.rows = npy, shared, None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.rows is None:  # mapped once in each (persistent) worker, as a dataset keeps its file open
            self.rows = np.load(self.npy, mmap_mode="r")
        rows = self.rows
        buffers = worker_buffers() if self.shared else None
        for start in range(worker * BATCH, len(rows), workers * BATCH):
            batch = rows[start : start + BATCH]
            out = buffers.array(batch.shape, batch.dtype) if buffers is not None else None
            out = np.empty(batch.shape, batch.dtype) if out is None else out
            np.copyto(out, batch)
            yield buffers.hand_over(torch.from_numpy(out)) if buffers is not None else torch.from_numpy(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each configuration (median, range)")
    ap.add_argument("--seconds", type=float, default=1.0, help="warm: epochs repeated for at least this long")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/loaders.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("loaders", "Feeding PyTorch: DataLoader paths against the loaders users have", args.out):
        run(args)


def run(args):
    folder = tempfile.mkdtemp(prefix="bench-loaders-", dir=args.dir)
    try:
        paths = make_files(folder, args.records, args.dim)
        record_bytes = args.dim * 4
        memcpy = machine.memcpy_gbps()
        print(
            f"{args.records:,} records of {args.dim} float32 ({args.records * record_bytes / machine.MB:.0f} MiB), "
            f"batches of {BATCH}; torch {torch.__version__}, {os.cpu_count()} cores"
        )
        print(f"machine: memcpy {memcpy:.1f} GB/s = {memcpy * 1e9 / record_bytes:,.0f} records/s\n")
        made = loaders(paths)
        results, limits, firsts = {}, {}, {}  # (name, k, temp) -> records/s of each round, the reference beside
        # each, the first batch's seconds
        cpu = {}  # (name, k) -> warm CPU seconds per batch of the main process and of the workers, each round
        configs = [(name, k) for name, (_, _, ks) in made.items() for k in ks]
        for _ in range(args.rounds):
            for temp in ("warm", "cold"):
                cold = temp == "cold"
                reference = ("embfile in-process iter_batches", 0, temp)
                if cold:
                    limits.setdefault(reference, []).append(cold_read(paths["emb"], record_bytes))
                if cold:
                    with embfile.open(paths["emb"]) as db:
                        rate, first = epoch_rate(db.iter_batches(BATCH, keys=False, seed=1), [paths["emb"]], True)
                    results.setdefault(reference, []).append(rate)
                    firsts.setdefault(reference, []).append(first)
                for name, k in configs:
                    make, files, _ = made[name]
                    if files is None and cold:
                        continue
                    loader = make(k, cold)
                    if not cold:
                        epoch_rate(loader, files, False)  # start the workers, warm the files
                    # against the in-process epoch (warm) or a cold read of the file (cold) just before: the
                    # machine's speed drifts by 2-3x from minute to minute
                    limit = (
                        cold_read(paths["emb"], record_bytes) if cold else in_process_rate(paths["emb"], args.seconds)
                    )
                    if not cold:
                        results.setdefault(reference, []).append(limit)
                    if cold:
                        rate, first = epoch_rate(loader, files, cold)
                    else:
                        rate, first, spent = warm_rate(loader, files, args.seconds)
                        cpu.setdefault((name, k), []).append(spent)
                    results.setdefault((name, k, temp), []).append(rate)
                    firsts.setdefault((name, k, temp), []).append(first)
                    limits.setdefault((name, k, temp), []).append(limit)
                    del loader  # its workers end, and every mapping of the files with them: eviction works
                    gc.collect()
                    print(".", end="", flush=True, file=sys.stderr)
        print(file=sys.stderr)
        for temp in ("warm", "cold"):
            against = (
                "an in-process iter_batches epoch just before"
                if temp == "warm"
                else "a cold sequential read of db.emb (8 MiB reads) just before"
            )
            rate = "records/s" if temp == "warm" else "records/s from the first batch on"
            print(f"## {temp}: {rate}, median (range) of {args.rounds}; x = median share of {against}\n")
            print("| loader | " + " | ".join(f"num_workers={k}" for k in WORKERS) + " |")
            print("|---|" + "---|" * len(WORKERS))
            for name in ["embfile in-process iter_batches", *made]:
                if not any((name, k, temp) in results for k in WORKERS):
                    continue
                cells = []
                for k in WORKERS:
                    runs = results.get((name, k, temp))
                    if runs is None:
                        cells.append("")
                        continue
                    cell = f"{np.median(runs):,.0f} ({fmt_range(runs)})"
                    if (name, k, temp) in limits:
                        share = np.array(runs) / np.array(limits[(name, k, temp)])
                        cell += f" x{np.median(share):.2f} ({share.min():.2f}-{share.max():.2f})"
                    cells.append(cell)
                print(f"| {name} | " + " | ".join(cells) + " |")
            if temp == "cold":
                reads = [v for (_, _, t), runs in limits.items() if t == "cold" for v in runs]
                print(f"\ncold sequential reads of db.emb: {np.median(reads):,.0f} records/s ({fmt_range(reads)})")
                print("\ncold, the first batch (the workers' start and first reads): ms, median of the rounds\n")
                print("| loader | " + " | ".join(f"num_workers={k}" for k in WORKERS) + " |")
                print("|---|" + "---|" * len(WORKERS))
                for name in ["embfile in-process iter_batches", *made]:
                    ms = [firsts.get((name, k, temp)) for k in WORKERS]
                    if not any(ms):
                        continue
                    print(
                        f"| {name} | "
                        + " | ".join("" if m is None else f"{np.median(m) * 1e3:,.0f}" for m in ms)
                        + " |"
                    )
            print()
        print(
            "warm, CPU per batch of records: us of the main process + us of the worker processes (median of the "
            f"rounds; {os.cpu_count()} cores: a loader whose sum passes {os.cpu_count()} times its wall time per "
            "batch waits on the cores)\n"
        )
        print("| loader | " + " | ".join(f"num_workers={k}" for k in WORKERS) + " |")
        print("|---|" + "---|" * len(WORKERS))
        for name in made:
            cells = []
            for k in WORKERS:
                spent = cpu.get((name, k))
                main_us, workers_us = (np.median([s[i] for s in spent]) * 1e6 for i in (0, 1)) if spent else (0, 0)
                cells.append(f"{main_us:,.0f} + {workers_us:,.0f}" if spent else "")
            if any(cells):
                print(f"| {name} | " + " | ".join(cells) + " |")
        print()
        print("targets: every embfile path >= 0.70 of in-process iter_batches warm; cold >= 0.85 of the cold read")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def warm_rate(loader, files, seconds):
    """``epoch_rate`` of warm epochs, and the CPU seconds per batch they cost this process (its threads too)
    and the loader's worker processes (started by the epoch before)."""
    pids = [os.getpid(), *(w.pid for w in getattr(getattr(loader, "_iterator", None), "_workers", None) or [])]
    before = [cpu_seconds(pid) for pid in pids]
    t = time.perf_counter()
    rate, first = epoch_rate(loader, files, False, seconds)
    batches = rate * (time.perf_counter() - t) / BATCH
    spent = [cpu_seconds(pid) - b for pid, b in zip(pids, before)]
    return rate, first, (spent[0] / batches, sum(spent[1:]) / batches)


def cpu_seconds(pid):
    """User and system CPU seconds of process ``pid`` so far (Linux's /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process_rate(path, seconds):
    """Records per second of warm epochs of ``iter_batches`` (the reference of the warm figures)."""
    with embfile.open(path) as db:
        return epoch_rate(Epochs(db), [path], False, seconds)[0]


class Epochs:
    """``db``'s epoch of ``iter_batches``, once each time it is iterated (as a DataLoader is)."""

    def __init__(self, db):
        self.db = db

    def __iter__(self):
        return self.db.iter_batches(BATCH, keys=False, seed=1)


def cold_read(path, record_bytes):
    """Records per second of one cold sequential read of ``path`` (8 MiB reads, one at a time)."""
    return machine.cold_read_gbps(path) * 1e9 / record_bytes


def fmt_range(runs):
    return f"{min(runs):,.0f}-{max(runs):,.0f}"


if __name__ == "__main__":
    main()
