"""Per-residue embeddings: embfile's ragged records against the layouts our users keep them in, on the same data in
the same run, beside the machine's limits measured in that run.

The data: proteins of log-normal lengths (median about 245 residues, 30 to 2,000, as UniProt's spread) of
1024 float16 values a residue, as ProtT5 gives them, written three ways:

- ProtTrans HDF5: one ``(L, 1024)`` float16 dataset per protein, as ``prott5_embedder.py`` writes it;
- Parquet: an id column and a ``list<fixed_size_list<float16>[1024]>`` column, 64 MiB row groups (pyarrow's
  other defaults);
- embfile: a ragged .emb file, converted from the HDF5 file (the conversion is timed).

Figures: one protein looked up warm and cold (the file evicted, opened, one random key read into memory); a padded
batch of 32 random proteins against a plain copy of its useful bytes; the padding of ``token_budget`` batches
against random batches of as many proteins; a cold epoch over every residue against the cold sequential read
of the file (interleaved rounds, median and range); warm DataLoader epochs of embfile's map-style dataset (with
its collate) and its token-budget iterable dataset against an h5py dataset per protein with ``pad_sequence``,
at 0 and 2 workers; pooling every protein (mean) and an exact search of the pooled vectors, warm, against reading
the residues' memory once and the ways users pool today; conversion throughput.

    python benchmarks/bench_ragged.py                   # 2,000 proteins, about 1 GB a layout: a few minutes
    python benchmarks/bench_ragged.py --proteins 10000

Targets: a padded batch of 32 within 1.2x of copying its useful bytes; token-budget padding under 5%.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

import embfile

MB = 1 << 20
DIM = 1024


def lengths_of(n, seed=0):
    return np.clip(np.random.default_rng(seed).lognormal(5.5, 0.6, n), 30, 2000).astype(np.int64)


def make_inputs(folder, lengths):
    """The ProtTrans HDF5 file and the Parquet file of the same records; {name: path}."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    keys = [f"sp|Q{i:06d}|PROT_HUMAN" for i in range(len(lengths))]
    paths = {"h5": os.path.join(folder, "prott5.h5"), "parquet": os.path.join(folder, "residues.parquet")}
    row_type = pa.list_(pa.float16(), DIM)
    schema = pa.schema([("id", pa.string()), ("embedding", pa.large_list(row_type))])
    per_group = max(1, (64 * MB) // (int(lengths.mean()) * DIM * 2))
    with h5py.File(paths["h5"], "w") as f, pq.ParquetWriter(paths["parquet"], schema) as w:
        for lo in range(0, len(keys), per_group):
            part = keys[lo : lo + per_group]
            mats = [
                rng.standard_normal((int(n), DIM), dtype=np.float32).astype(np.float16)
                for n in lengths[lo : lo + per_group]
            ]
            for k, m in zip(part, mats):
                f.create_dataset(k, data=m)
            rows = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(mats).ravel()), DIM)
            offsets = pa.array(np.concatenate([[0], np.cumsum([len(m) for m in mats])]))
            w.write_table(
                pa.table({"id": part, "embedding": pa.LargeListArray.from_arrays(offsets, rows)}, schema=schema)
            )
    for p in paths.values():
        machine.fsync_path(p)
    return keys, paths


def median_us(fn, args_list):
    times = []
    for args in args_list:
        t = time.perf_counter_ns()
        fn(*args)
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1e3


def lookups(paths, emb, keys, rounds):
    """Median time to get one protein's (L, D) array into memory: warm (files open and cached) and cold (the file
    evicted; open, find, read), the readers taking turns on each key."""
    import h5py
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    probe = [(keys[i],) for i in rng.integers(0, len(keys), 200)]
    cold_probe = [(keys[i],) for i in rng.integers(0, len(keys), rounds)]

    def parquet_get(path, key):
        t = pq.read_table(path, filters=[("id", "==", key)], columns=["embedding"])
        return np.asarray(t.column(0).chunk(0).values.flatten().to_numpy()).reshape(-1, DIM)

    with embfile.open(emb) as db, h5py.File(paths["h5"], "r") as f:
        for k, _ in zip(keys, range(64)):  # warm up
            np.array(db[k]), f[k][()]
        warm = {
            "embfile db[key] (a view)": median_us(lambda k: db[k], probe),
            "embfile np.array(db[key])": median_us(lambda k: np.array(db[k]), probe),
            "h5py f[key][()]": median_us(lambda k: f[k][()], probe),
            "pyarrow read_table(filters=id == key)": median_us(lambda k: parquet_get(paths["parquet"], k), probe[:20]),
        }

    def emb_get(key):
        with embfile.open(emb) as db:
            np.array(db[key])

    def h5_get(key):
        with h5py.File(paths["h5"], "r") as f:
            f[key][()]

    readers = {
        "embfile open + np.array(db[key])": (emb, emb_get),
        "h5py File + f[key][()]": (paths["h5"], h5_get),
        "pyarrow read_table(filters=id == key)": (paths["parquet"], lambda k: parquet_get(paths["parquet"], k)),
    }
    times: dict[str, list[int]] = {name: [] for name in readers}
    for (key,) in cold_probe:  # interleaved: each reader in turn, on the same key
        for name, (path, get) in readers.items():
            machine.evict(path)
            t = time.perf_counter_ns()
            get(key)
            times[name].append(time.perf_counter_ns() - t)
    cold_us = {name: statistics.median(t) / 1e3 for name, t in times.items()}
    return warm, cold_us


def padded_batches(emb, keys, similar, rounds=50):
    """Batches of 32 proteins (warm: the file read once first), random or of similar lengths, padded and packed,
    against copying their useful bytes out of the same mapping into a new array."""
    rng = np.random.default_rng(3)
    with embfile.open(emb) as db:
        db.to_numpy()  # into the page cache
        matrix = db.matrix
        if similar:  # 32 neighbours in length order, as a token-budget batch gathers them
            order = np.argsort(db.lengths(), kind="stable")
            firsts = rng.integers(0, len(keys) - 32, rounds)
            batches = [[keys[i] for i in order[f : f + 32]] for f in firsts]
        else:
            batches = [[keys[i] for i in rng.choice(len(keys), 32, replace=False)] for _ in range(rounds)]
        for b in batches[:5]:
            db.get_batch(b)
        rows = [int(db.lengths(b).sum()) for b in batches]
        starts = [int(rng.integers(0, len(matrix) - r)) for r in rows]
        sizes = [32 * int(db.lengths(b).max()) for b in batches]

        def copy_into_batch_sized(s, r, size):  # the same bytes, into new memory as large as the padded batch
            out = np.empty((size, DIM), np.float16)
            out[:r] = matrix[s : s + r]

        padded = median_us(lambda b: db.get_batch(b), [(b,) for b in batches])
        packed = median_us(lambda b: db.get_batch(b, pad=False), [(b,) for b in batches])
        plain = median_us(lambda s, r: matrix[s : s + r].copy(), list(zip(starts, rows)))
        plain_sized = median_us(copy_into_batch_sized, list(zip(starts, rows, sizes)))
        longest = statistics.median(int(db.lengths(b).max()) for b in batches)
    return {
        "padded": padded,
        "packed": packed,
        "plain": plain,
        "plain_sized": plain_sized,
        "useful_mb": statistics.median(rows) * DIM * 2 / 1e6,
        "padded_mb": longest * 32 * DIM * 2 / 1e6,
    }


def padding(emb, budget):
    """The padding share of an epoch of ``token_budget`` batches, and of random batches as large on average."""
    with embfile.open(emb) as db:
        pad = total = batches = 0
        for _, mask in db.iter_batches(token_budget=budget, seed=4, keys=False):
            pad, total, batches = pad + (~mask).sum(), total + mask.size, batches + 1
        size = max(1, round(len(db) / batches))
        rpad = rtotal = 0
        for _, mask in db.iter_batches(size, seed=4, keys=False):
            rpad, rtotal = rpad + (~mask).sum(), rtotal + mask.size
    return {"budget": pad / total, "random": rpad / rtotal, "batches": batches, "size": size}


def cold_epochs(emb, rounds):
    """Interleaved rounds of a cold epoch over every residue (``unit="row"``) and a cold sequential read of the
    file, the order of the two alternating from round to round."""
    rows_s, read_s = [], []
    size = os.path.getsize(emb)

    def epoch():
        machine.evict(emb)
        t = time.perf_counter()
        with embfile.open(emb) as db:
            for _ in db.iter_batches(4096, unit="row", seed=5, keys=False):
                pass
        rows_s.append(time.perf_counter() - t)

    def read():
        read_s.append(size / machine.cold_read_gbps(emb) / 1e9)

    for i in range(rounds):
        for step in (epoch, read) if i % 2 == 0 else (read, epoch):
            step()
    return rows_s, read_s, size


def pooling_and_search(emb, h5, rounds):
    """Warm, interleaved rounds: the mean of every protein and a one-query search of those means (k=10,
    cosine), by embfile and the ways users have; seconds per round of each, best of two."""
    import h5py

    query = np.random.default_rng(3).standard_normal(DIM).astype(np.float32)
    pooled_path = emb + ".pooled.emb"
    with embfile.open(emb) as db:
        db.pool("mean", out=pooled_path)
    with embfile.open(emb) as db, embfile.open(pooled_path) as pooled, h5py.File(h5) as f:
        offsets = np.concatenate([[0], np.cumsum(db.lengths())])
        words = db.matrix.reshape(-1).view(np.uint64)
        tools = {
            # the bound: each residue's bytes read once, summed as integers (numpy sums float16 one value at a time)
            "reading the residues from memory once (bound)": lambda: machine.read_gbps(words, repeats=1),
            'embfile db.pool("mean")': lambda: db.pool("mean"),
            "numpy add.reduceat over the residues (float32 sums)": lambda: np.add.reduceat(
                db.matrix, offsets[:-1], dtype=np.float32
            ),
            "h5py f[k][()].mean(0) for each protein": lambda: [f[k][()].mean(0, dtype=np.float32) for k in f],
            'embfile db.search(q, pool="mean"): pooled as it scans': lambda: db.search(query, pool="mean"),
            "embfile search of the pooled file (written once)": lambda: pooled.search(query),
        }
        times = {name: [] for name in tools}
        for _ in range(rounds):
            for name, fn in tools.items():
                best = float("inf")
                for _ in range(2):
                    t = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t)
                times[name].append(best)
    os.remove(pooled_path)
    return times


class _H5Proteins:
    """What users write for a DataLoader over a ProtTrans HDF5 file: item i is protein i's ``(L, D)`` tensor,
    the file opened in each process on first use (h5py files opened before a fork misbehave in workers)."""

    def __init__(self, path, keys):
        self.path, self.keys, self.file = path, keys, None

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        import h5py
        import torch

        if self.file is None:
            self.file = h5py.File(self.path, "r")
        return torch.from_numpy(self.file[self.keys[i]][()])


def _pad(items):
    """``pad_sequence`` and a mask: the usual collate for per-residue tensors."""
    import torch

    lengths = torch.tensor([len(t) for t in items])
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), mask


def loaders(emb, h5, keys, budget, rounds):
    """{(loader, num_workers): [residues/s]} of warm DataLoader epochs (persistent workers, the first epoch not
    counted), the loaders in interleaved rounds."""
    import torch
    from torch.utils.data import DataLoader

    import embfile.torch as et

    def make(name, workers):
        persistent = {"num_workers": workers, "persistent_workers": workers > 0}
        if name == "embfile map-style, shuffle, collate":
            return DataLoader(et.Dataset(emb), 32, shuffle=True, collate_fn=et.collate, **persistent)
        if name == f"embfile IterableDataset, token_budget={budget:,}":
            return DataLoader(et.IterableDataset(emb, token_budget=budget, seed=0), batch_size=None, **persistent)
        return DataLoader(_H5Proteins(h5, keys), 32, shuffle=True, collate_fn=_pad, **persistent)

    names = (
        "embfile map-style, shuffle, collate",
        f"embfile IterableDataset, token_budget={budget:,}",
        "h5py per protein, shuffle, pad_sequence",
    )
    loaders = {(n, w): make(n, w) for n in names for w in (0, 2)}
    rates = {k: [] for k in loaders}
    torch.manual_seed(0)
    for r in range(rounds + 1):
        for k, loader in loaders.items():
            t, residues = time.perf_counter(), 0
            for _, mask in loader:
                residues += int(mask.sum())
            if r:  # the first epoch starts the workers and fills the caches
                rates[k].append(residues / (time.perf_counter() - t))
    return rates


def conversions(folder, paths, emb):
    out = {}
    for name, src in (("ProtTrans HDF5 -> emb", paths["h5"]), ("Parquet -> emb", paths["parquet"])):
        dst = os.path.join(folder, "converted.emb")
        machine.evict(src)
        t = time.perf_counter()
        embfile.convert(src, dst)
        out[name] = time.perf_counter() - t
        if name.startswith("ProtTrans"):
            os.replace(dst, emb)  # the file the rest reads
        else:
            os.unlink(dst)
    import h5py
    import pyarrow.parquet as pq

    machine.evict(paths["parquet"])  # what reading the inputs alone costs, writing nothing
    t = time.perf_counter()
    pq.read_table(paths["parquet"])
    out["pyarrow read_table alone (reference)"] = time.perf_counter() - t
    machine.evict(paths["h5"])
    t = time.perf_counter()
    with h5py.File(paths["h5"], "r") as f:
        {k: f[k][()] for k in f}
    out["h5py {k: f[k][()] for k in f} alone (reference)"] = time.perf_counter() - t
    dst = os.path.join(folder, "out.parquet")
    machine.evict(emb)
    t = time.perf_counter()
    embfile.convert(emb, dst)
    out["emb -> Parquet"] = time.perf_counter() - t
    os.unlink(dst)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proteins", type=int, default=2000, help="proteins in the data (default 2,000: about 1 GB)")
    ap.add_argument("--budget", type=int, default=16384, help="token_budget: padded residues a batch")
    ap.add_argument("--rounds", type=int, default=7, help="cold rounds (lookups, interleaved epochs)")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/ragged.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("ragged", "Per-residue (ragged) records", args.out):
        measure(args)


def measure(args):
    folder = tempfile.mkdtemp(prefix="bench-ragged-", dir=args.dir)
    try:
        limits = machine.measure(folder)
        print("machine:", machine.describe(limits))
        lengths = lengths_of(args.proteins)
        t = time.perf_counter()
        keys, paths = make_inputs(folder, lengths)
        nbytes = int(lengths.sum()) * DIM * 2
        print(
            f"data: {len(keys):,} proteins, {lengths.sum():,} residues (median {int(np.median(lengths))}, "
            f"{lengths.min()} to {lengths.max()}) x {DIM} float16 = {nbytes / 1e6:,.0f} MB; inputs written in "
            f"{time.perf_counter() - t:.0f} s\n"
        )
        emb = os.path.join(folder, "residues.emb")
        times = conversions(folder, paths, emb)
        print("| conversion (cold input, durable output) | s | MB/s of residues | / cold read |\n|---|---|---|---|")
        for name, s in times.items():
            print(f"| {name} | {s:.2f} | {nbytes / s / 1e6:,.0f} | {nbytes / s / 1e9 / limits['cold_read_gbps']:.0%} |")

        warm, cold = lookups(paths, emb, keys, args.rounds)
        print("\n| one protein, warm | us (median of 200) |\n|---|---|")
        for name, us in warm.items():
            print(f"| {name} | {us:,.1f} |")
        print(f"\n| one protein, cold (file evicted; median of {args.rounds}) | us | / embfile |\n|---|---|---|")
        base = cold["embfile open + np.array(db[key])"]
        for name, us in cold.items():
            print(f"| {name} | {us:,.0f} | {us / base:.1f}x |")

        for similar in (False, True):
            b = padded_batches(emb, keys, similar)
            what = "of similar lengths (neighbours in length order)" if similar else "random"
            print(
                f"\n| batch of 32 proteins, {what}; warm, median of 50 | us | / plain copy | / plain copy into "
                f"a new array of the batch's size |\n|---|---|---|---|\n"
                f"| plain copy of its useful bytes ({b['useful_mb']:.1f} MB) | {b['plain']:,.0f} | 1.00x | |\n"
                f"| the same copy into a new array of the padded batch's size ({b['padded_mb']:.1f} MB) | "
                f"{b['plain_sized']:,.0f} | {b['plain_sized'] / b['plain']:.2f}x | 1.00x |\n"
                f"| db.get_batch(keys, pad=False): packed rows + offsets | {b['packed']:,.0f} | "
                f"{b['packed'] / b['plain']:.2f}x | |\n"
                f"| db.get_batch(keys): padded to the longest, zeros after each record, + mask | "
                f"{b['padded']:,.0f} | {b['padded'] / b['plain']:.2f}x | {b['padded'] / b['plain_sized']:.2f}x |"
            )

        p = padding(emb, args.budget)
        print(
            f"\n| padding share of one epoch | padded residues / batch residues |\n|---|---|\n"
            f"| token_budget={args.budget:,} ({p['batches']} batches) | {p['budget']:.1%} |\n"
            f"| random batches of {p['size']} proteins | {p['random']:.1%} |"
        )

        rows_s, read_s, size = cold_epochs(emb, args.rounds)
        ratio = [r / e for r, e in zip(read_s, rows_s)]
        print(
            f"\n| cold pass over every residue ({args.rounds} interleaved rounds) | s, median (range) | GB/s |\n"
            f"|---|---|---|\n"
            f"| cold sequential read of the file | {statistics.median(read_s):.2f} ({min(read_s):.2f}-"
            f"{max(read_s):.2f}) | {size / statistics.median(read_s) / 1e9:.2f} |\n"
            f'| iter_batches(4096, unit="row") | {statistics.median(rows_s):.2f} ({min(rows_s):.2f}-'
            f"{max(rows_s):.2f}) | {size / statistics.median(rows_s) / 1e9:.2f} |\n\n"
            f"epoch / sequential read, per round: median {statistics.median(ratio):.0%} "
            f"(range {min(ratio):.0%}-{max(ratio):.0%}); the epoch's median against the machine's cold sequential "
            f"read measured at the start: {size / statistics.median(rows_s) / 1e9 / limits['cold_read_gbps']:.0%}"
        )

        rates = loaders(emb, paths["h5"], keys, args.budget, min(args.rounds, 3))
        print(
            f"\n| feeding PyTorch, warm (DataLoader epochs; {min(args.rounds, 3)} interleaved rounds) | num_workers | "
            f"residues/s, median (range) | / h5py at the same num_workers |\n|---|---|---|---|"
        )
        for (name, workers), r in rates.items():
            theirs = statistics.median(rates[("h5py per protein, shuffle, pad_sequence", workers)])
            print(
                f"| {name} | {workers} | {statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f}) | "
                f"{statistics.median(r) / theirs:.2f}x |"
            )

        rounds = min(args.rounds, 3)
        times = pooling_and_search(emb, paths["h5"], rounds)
        bound = times["reading the residues from memory once (bound)"]
        print(
            f"\n| pooling every protein and searching the pooled vectors; warm ({rounds} interleaved rounds, each "
            f"the best of 2) | ms, median (range) | GB/s of residues | / bound |\n|---|---|---|---|"
        )
        for name, t in times.items():
            share = statistics.median(b / x for b, x in zip(bound, t))
            per_residue = "pooled file" not in name  # that one reads a vector per protein, not the residues
            print(
                f"| {name} | {statistics.median(t) * 1e3:,.1f} ({min(t) * 1e3:,.1f}-{max(t) * 1e3:,.1f}) | "
                + (f"{nbytes / statistics.median(t) / 1e9:.2f} | {share:.0%} |" if per_residue else " | |")
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
