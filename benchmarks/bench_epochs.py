"""Shuffled training epochs: embfile's block shuffle against the loaders our users have, beside the machine's
limits measured in the same run.

Workload as the data-loader comparisons in our field: batches of 100 records, time per 1,000 iterations, on a
file several times larger than embfile's read window (64 blocks of about 1 MiB).  Each loader runs cold (the
file evicted from the page cache) and warm (the file cached), in the same process one after another:

- embfile ``iter_batches`` (block shuffle, default settings), and with ``buffer_blocks=1`` (blocks only);
- embfile without shuffle (a plain sequential pass);
- a per-record random epoch: a numpy memmap indexed by a random permutation, 100 rows at a time;
- h5py, a contiguous bulk dataset as ``create_dataset`` writes it, sorted fancy indexing per random batch;
- pyarrow, a Parquet file of 64 MiB row groups read in shuffled row-group order, shuffled inside each.

Then the shuffle quality of each order (``embfile.epochs.shuffle_quality``), and lookups and an epoch over the
same data split into 100 shards.

    python benchmarks/bench_epochs.py                  # 2 GiB of ESM-2-sized float64 vectors: a few minutes
    python benchmarks/bench_epochs.py --mb 4096 --dim 1024 --dtype float32

Then, in interleaved rounds, the cold sequential read and a cold epoch by each read path (``read="direct"``,
the default for a cold file, and through the mapping).

Targets: cold shuffled epoch >= 85% of cold sequential read (interleaved) and >= 10x the per-record random epoch;
warm >= 50% of memcpy; shuffle quality within a few percent of a full permutation.
"""

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

import embfile
from embfile.epochs import BLOCK_BYTES, EpochPlan, shuffle_quality

MB = 1 << 20
BATCH = 100


def make_files(folder, n, dim, dtype):
    """The same records as .emb, contiguous bulk HDF5 and Parquet (64 MiB row groups)."""
    import h5py

    rng = np.random.default_rng(0)
    keys = [f"seq{i:010d}" for i in range(n)]
    paths = {
        "emb": os.path.join(folder, "db.emb"),
        "h5": os.path.join(folder, "bulk.h5"),
        "parquet": os.path.join(folder, "db.parquet"),
    }
    step = max(1, 16 * MB // (dim * np.dtype(dtype).itemsize))
    with embfile.Writer(paths["emb"], dim, dtype) as w, h5py.File(paths["h5"], "w") as f:
        f.create_dataset("ids", data=keys, dtype=h5py.string_dtype())
        m = f.create_dataset("embeddings", shape=(n, dim), dtype=dtype)  # contiguous, as users write it
        for lo in range(0, n, step):
            block = rng.random((min(step, n - lo), dim)).astype(dtype)
            w.add_batch(keys[lo : lo + step], block)
            m[lo : lo + step] = block
    embfile.to_parquet(paths["emb"], paths["parquet"])
    for p in paths.values():
        machine.fsync_path(p)
    return paths


# ---- loaders: each yields batches and appends the file rows it delivers to `order` -----------------------


def embfile_epoch(paths, order, **options):
    db = embfile.open(paths["emb"])
    it = db.iter_batches(BATCH, keys=False, **options)
    order.append(
        EpochPlan(
            len(db), block_size=it.plan.block_size, buffer_blocks=it.plan.buffer_blocks, shuffle=it.plan.shuffle
        ).order()
    )
    yield from it


def memmap_random(paths, order):
    db = embfile.open(paths["emb"])
    mm = np.memmap(paths["emb"], db.dtype, "r", db.header.records_offset, (len(db), db.dim))
    perm = np.random.default_rng(0).permutation(len(db))
    order.append(perm)
    for lo in range(0, len(perm), BATCH):
        yield mm[perm[lo : lo + BATCH]]


def h5py_sorted(paths, order):
    import h5py

    f = h5py.File(paths["h5"], "r")
    m = f["embeddings"]
    perm = np.random.default_rng(0).permutation(m.shape[0])
    out = []
    for lo in range(0, len(perm), BATCH):
        idx = np.sort(perm[lo : lo + BATCH])
        out.append(idx)
        yield m[idx]
    order.append(np.concatenate(out) if out else perm)


def parquet_row_groups(paths, order):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(paths["parquet"])
    rng = np.random.default_rng(0)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    seen = []
    for g in rng.permutation(pf.num_row_groups):
        column = pf.read_row_group(int(g), columns=["vector"]).column(0).combine_chunks()
        matrix = column.values.to_numpy().reshape(len(column), -1)
        perm = rng.permutation(len(matrix))
        seen.append(starts[g] + perm)
        for lo in range(0, len(perm), BATCH):
            yield matrix[perm[lo : lo + BATCH]]
    order.append(np.concatenate(seen))


LOADERS = {
    "embfile block shuffle (defaults)": lambda p, o: embfile_epoch(p, o),
    'embfile block shuffle through the mapping (read="mapped")': lambda p, o: embfile_epoch(p, o, read="mapped"),
    "embfile blocks only (buffer_blocks=1)": lambda p, o: embfile_epoch(p, o, buffer_blocks=1),
    "sequential (embfile, shuffle=False)": lambda p, o: embfile_epoch(p, o, shuffle=False),
    "per-record random (numpy memmap)": memmap_random,
    "h5py bulk, sorted fancy index per batch": h5py_sorted,
    "Parquet, shuffled row groups (pyarrow)": parquet_row_groups,
}


def timed(loader, paths, iterations, cold):
    """Seconds for ``iterations`` batches (or the whole epoch), records delivered, peak RSS growth (MB)."""
    if cold:
        for p in paths.values():
            machine.evict(p)
    order, base, peak = [], machine.rss_mb(), 0.0
    gen = loader(paths, order)
    t0 = time.perf_counter()
    records = 0
    for i, batch in enumerate(gen):
        records += len(batch)
        if i % 50 == 0:
            peak = max(peak, machine.rss_mb() - base)
        if i + 1 == iterations:
            break
    seconds = time.perf_counter() - t0
    gen.close()
    return seconds, records, peak


def repeats(name, temperature):
    """Runs of a loader (the median counts): three, but once for the slow cold ones of the others."""
    return 3 if temperature == "warm" or name.startswith(("embfile", "sequential")) else 1


def lookups(store, keys, count=10_000):
    probe = [keys[i] for i in np.random.default_rng(1).integers(0, len(keys), count)]
    for k in probe[:100]:
        store[k]
    t = []
    for k in probe:
        t0 = time.perf_counter_ns()
        store[k]
        t.append(time.perf_counter_ns() - t0)
    return float(np.median(t)) / 1e3


def alternating(paths, rounds):
    """Cold sequential read, cold epoch with ``read="direct"``, cold epoch through the mapping, in turn,
    ``rounds`` times (the disk's speed drifts: only figures taken side by side compare): GB/s, median and
    range, and each epoch's median share of the sequential read's."""
    with embfile.open(paths["emb"]) as db:
        record_bytes = db.dim * db.dtype.itemsize
    runs = {"sequential read": [], "direct": [], "mapped": []}
    for _ in range(rounds):
        runs["sequential read"].append(machine.cold_read_gbps(paths["emb"]))
        for read in ("direct", "mapped"):
            loader = functools.partial(embfile_epoch, read=read)
            seconds, records, _ = timed(loader, paths, 10**9, True)
            runs[read].append(records * record_bytes / seconds / 1e9)
    seq = float(np.median(runs["sequential read"]))
    print(f"interleaved, cold, {rounds} rounds (sequential read, direct epoch, mapped epoch in turn):")
    print("| read | GB/s, median (range) | / sequential read |\n|---|---|---|")
    for name, v in runs.items():
        print(f"| {name} | {np.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) | {np.median(v) / seq:.0%} |")
    print()
    return {name: float(np.median(v)) / seq for name, v in runs.items() if name != "sequential read"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=2048, help="size of the vectors, MiB (default 2048)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--dtype", default="float64")
    ap.add_argument("--iterations", type=int, default=1000, help="batches timed per loader")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the cold read-path comparison")
    ap.add_argument(
        "--random-iterations",
        type=int,
        default=100,
        help="batches timed for the cold per-record loaders (slow by design)",
    )
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--out", help="the result file (default benchmarks/results/epochs.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("epochs", "Shuffled epochs: embfile against the loaders users have", args.out):
        results = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def measure(args):
    """Every loader cold and warm, the orders' quality, and the sharded copy; the figures, as a dict."""
    folder = tempfile.mkdtemp(prefix="bench-epochs-", dir=args.dir)
    try:
        limits = machine.measure(folder)
        print("machine:", machine.describe(limits))
        record_bytes = args.dim * np.dtype(args.dtype).itemsize
        n = args.mb * MB // record_bytes
        t0 = time.perf_counter()
        paths = make_files(folder, n, args.dim, args.dtype)
        block = max(1, BLOCK_BYTES // record_bytes)
        print(
            f"data: {n:,} x {args.dim} {args.dtype} ({n * record_bytes / 1e6:,.0f} MB; embfile blocks of {block} "
            f"records, windows of 64 blocks = {64 * block * record_bytes / 1e6:.0f} MB), written in "
            f"{time.perf_counter() - t0:.0f} s\n"
        )

        results = {"limits": limits, "n": n, "dim": args.dim, "dtype": args.dtype, "loaders": {}}
        for temperature in ("cold", "warm"):
            if temperature == "warm":
                for p in paths.values():
                    with open(p, "rb") as f:
                        while f.read(64 * MB):
                            pass
            rows, sequential = {}, []
            for name, loader in LOADERS.items():
                slow = temperature == "cold" and ("random" in name or "h5py" in name)
                its = args.random_iterations if slow else args.iterations
                if temperature == "cold":  # the floor, on this very file, just before each loader
                    sequential += [machine.cold_read_gbps(paths["emb"]) for _ in range(repeats(name, temperature))]
                runs = [timed(loader, paths, its, temperature == "cold") for _ in range(repeats(name, temperature))]
                seconds, records, rss = sorted(runs)[len(runs) // 2]  # the median run
                rows[name] = {
                    "records_per_s": records / seconds,
                    "seconds_per_1000": seconds / its * 1000,
                    "iterations": its,
                    "rss_mb": rss,
                }
            if temperature == "cold":
                limits["cold_read_data_gbps"] = float(np.median(sequential))
                print(
                    f"cold sequential read of db.emb itself (8 MiB reads), measured before each cold run: "
                    f"median {limits['cold_read_data_gbps']:.2f} GB/s of {len(sequential)}, from "
                    f"{min(sequential):.2f} to {max(sequential):.2f}; the cold ratios use the median\n"
                )
            floor = limits["cold_read_data_gbps"] if temperature == "cold" else limits["memcpy_gbps"]
            print(
                f"| {temperature}: loader (batch {BATCH}) | s per 1,000 it. | records/s | MB/s | "
                f"{'/ cold seq. read' if temperature == 'cold' else '/ memcpy'} | x per-record random | "
                f"RSS growth MB |\n|---|---|---|---|---|---|---|"
            )
            random_rate = rows["per-record random (numpy memmap)"]["records_per_s"]
            for name, r in rows.items():
                gbps = r["records_per_s"] * record_bytes / 1e9
                r.update(gbps=gbps, vs_floor=gbps / floor, vs_random=r["records_per_s"] / random_rate)
                print(
                    f"| {name} | {r['seconds_per_1000']:.2f} | {r['records_per_s']:,.0f} | {gbps * 1e3:,.0f} | "
                    f"{r['vs_floor']:.0%} | {r['vs_random']:.1f}x | {r['rss_mb']:.0f} |"
                )
            results["loaders"][temperature] = rows
            print()

        quality = {}
        print(
            "| order | gap entropy (bits) | / full permutation | displacement | rank correlation | "
            f"neighbour rate (< {block} rows) |\n|---|---|---|---|---|---|"
        )
        orders = {"full random permutation": np.random.default_rng(7).permutation(n), "no shuffle": np.arange(n)}
        for name, loader in LOADERS.items():
            if "sequential" in name or "h5py" in name:
                continue
            order = []
            for _ in loader(paths, order):
                pass
            orders[name] = order[0]
        for name, order in orders.items():
            q = shuffle_quality(order, block)
            quality[name] = q
            full = quality["full random permutation"]["gap_entropy"]
            print(
                f"| {name} | {q['gap_entropy']:.2f} | {q['gap_entropy'] / full:.1%} | {q['displacement']:.3f} | "
                f"{q['rank_correlation']:+.3f} | {q['neighbour_rate']:.4f} |"
            )
        results["quality"] = quality

        shards = os.path.join(folder, "shards")
        with embfile.open(paths["emb"]) as db:
            keys = db.keys_between(0, len(db))
            embfile.write_shards(shards, db, shard_bytes=-(-len(db) // 100) * record_bytes)
            t0 = time.perf_counter()
            sharded = embfile.open(shards)
            open_ms = (time.perf_counter() - t0) * 1e3
            d = dict.fromkeys(keys, 0)
            one, many, in_dict = lookups(db, keys), lookups(sharded, keys), lookups(d, keys)
            seconds, records, _ = timed(
                lambda p, o: sharded.iter_batches(BATCH, keys=False), {}, args.iterations, False
            )
            sharded.close()
        results["shards"] = {
            "count": 100,
            "open_ms": open_ms,
            "lookup_us": many,
            "single_lookup_us": one,
            "dict_lookup_us": in_dict,
            "epoch_gbps": records * record_bytes / seconds / 1e9,
        }
        print(
            f"100 shards: open {open_ms:.1f} ms; warm db[key] median {many:.2f} us vs {one:.2f} us for one file "
            f"({many / one:.1f}x; a dict: {in_dict:.2f} us); warm shuffled epoch "
            f"{results['shards']['epoch_gbps']:.2f} GB/s ({results['shards']['epoch_gbps'] / limits['memcpy_gbps']:.0%}"
            " of memcpy)"
        )

        results["interleaved"] = interleaved = alternating(paths, args.rounds)
        cold, warm = results["loaders"]["cold"], results["loaders"]["warm"]
        ours = "embfile block shuffle (defaults)"
        checks = [
            ("cold shuffled epoch >= 85% of cold sequential read (interleaved medians)", interleaved["direct"] >= 0.85),
            ("cold shuffled epoch >= 10x per-record random", cold[ours]["vs_random"] >= 10),
            ("warm shuffled epoch >= 50% of memcpy", warm[ours]["vs_floor"] >= 0.5),
            (
                "gap entropy within 3% of a full permutation",
                quality[ours]["gap_entropy"] >= 0.97 * quality["full random permutation"]["gap_entropy"],
            ),
        ]
        print()
        for label, ok in checks:
            print(f"{'PASS' if ok else 'MISS'}  {label}")
        results["targets"] = dict(checks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
