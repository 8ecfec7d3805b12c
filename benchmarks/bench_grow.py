"""Datasets that grow: what an append costs as the dataset grows, and lookups on a dataset built by appends.

1. **Append cost.**  For each size N (default 10^5, 10^6, 10^7 keys), a dataset written as one version, then
   ``embfile.append`` of 10,000 vectors, ``--rounds`` times (each a new version; median and range).  Beside it
   the same change in 0.1's layout, the way users grew a folder before versions: the new records in a new
   shard, then ``embfile.write_index`` (one global index of every key, rebuilt).  The append should stay flat
   as N grows; the rebuild grows with N.
2. **Lookups after 100 appends.**  One dataset built by a write and 100 appends of equal size (the worst case
   for the key index: every append a segment of the same size), against one .emb of the same keys, in
   interleaved rounds: warm ``db[key]`` of present keys and of absent ones, ``get_batch`` of 1,000 keys, and
   cold ``db[key]`` (every file evicted from the page cache, then a fresh handle).
3. **Lookups with the key index in segments at their cap.**  A segment holds at most ``SEGMENT_KEYS`` (2^26)
   keys, so a dataset of a billion has 15 segments or more.  The same keys written with the cap set to a 16th
   of them (16 full segments), against one segment, in interleaved rounds: the cost of the cap, in miniature.
4. **What changed since a version.**  A dataset (``--changes-keys`` keys in 64 MiB shards) grown by an append
   of 1% new keys, a removal of 100 keys spread over it, and a compaction: ``embfile.changes`` between each
   version and the one before, against what a user does without it (both versions read whole, each key of
   one looked up in the other and its record compared), in interleaved rounds, warm.

    python benchmarks/bench_grow.py                          # a few minutes
    python benchmarks/bench_grow.py --sizes 100000,1000000 --lookup-keys 200000 --out -

Targets (issue #24): the append's cost flat in N; warm ``db[key]`` after 100 appends within 3x of one file,
and a miss that reads no shard.  ``changes`` has none: it should cost in proportion to what changed.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

import embfile
from embfile import folder as layout

APPEND = 10_000


def keys_of(lo, hi):
    return [f"UniRef50_{i:011d}" for i in range(lo, hi)]


def data(lo, hi, dim):
    return keys_of(lo, hi), np.random.default_rng(lo).standard_normal((hi - lo, dim), dtype=np.float32)


def append_cost(folder, n, dim, rounds):
    """Seconds of each of ``rounds`` appends of APPEND vectors to an n-key dataset, and of the same change
    in 0.1's layout (a new shard, then the global index rebuilt)."""
    ds, legacy = os.path.join(folder, f"ds{n}"), os.path.join(folder, f"legacy{n}")
    step = 1_000_000
    with embfile.ShardWriter(ds, dim, "float32", shard_bytes=256 << 20) as w:
        for lo in range(0, n, step):
            w.add_batch(*data(lo, min(n, lo + step), dim))
    os.mkdir(legacy)
    for i, shard in enumerate(layout.read_manifest(ds).shards):
        os.link(os.path.join(ds, shard.path), os.path.join(legacy, f"part-{i:05d}.emb"))
    embfile.write_index(legacy)
    appends, rebuilds = [], []
    for r in range(rounds):
        new = data(n + r * APPEND, n + (r + 1) * APPEND, dim)
        t0 = time.perf_counter()
        embfile.append(ds, new)
        appends.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        embfile.write(os.path.join(legacy, f"part-new{r:05d}.emb"), new)
        embfile.write_index(legacy)
        rebuilds.append(time.perf_counter() - t0)
    with embfile.open(ds) as db:
        assert len(db) == n + rounds * APPEND
    shutil.rmtree(ds)
    shutil.rmtree(legacy)
    return appends, rebuilds


def spread(xs, unit=1.0, fmt="{:.3f}"):
    xs = [x * unit for x in xs]
    return f"{fmt.format(np.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def per_call_ns(fn, args, batch=100):
    """Median ns per call of fn(arg), timed over batches of ``batch`` calls."""
    out = []
    for lo in range(0, len(args), batch):
        chunk = args[lo : lo + batch]
        t0 = time.perf_counter_ns()
        for a in chunk:
            fn(a)
        out.append((time.perf_counter_ns() - t0) / len(chunk))
    return float(np.median(out))


def files_of(path):
    if os.path.isfile(path):
        return [path]
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(".emb")]


def lookups(path, probes, absent, batch_keys):
    """Warm: open µs, hit, miss and get_batch ns.  Cold (every file evicted): open ms, then with that handle
    and the files evicted again (opening reads headers, and the kernel reads ahead of them), db[key] µs."""
    opens = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        embfile.open(path).close()
        opens.append((time.perf_counter_ns() - t0) / 1e3)
    with embfile.open(path) as db:
        for k in probes:  # warm: every page the probes touch is cached and mapped
            db[k].sum()
        db.find_rows(absent)
        hit = per_call_ns(db.__getitem__, probes)
        miss = per_call_ns(db.__contains__, absent)
        gather = per_call_ns(db.get_batch, [batch_keys] * 50, batch=1)
    files = files_of(path)
    for f in files:
        machine.evict(f)
    t0 = time.perf_counter_ns()
    with embfile.open(path) as db:
        cold_open = (time.perf_counter_ns() - t0) / 1e6
        for f in files:
            machine.evict(f)
        cold = []
        for k in probes[:200]:
            t0 = time.perf_counter_ns()
            db[k].sum()
            cold.append((time.perf_counter_ns() - t0) / 1e3)
    return {
        "open": float(np.median(opens)),
        "hit": hit,
        "miss": miss,
        "gather": gather,
        "cold_open": cold_open,
        "cold": float(np.median(cold)),
    }


def lookup_race(folder, n, dim, rounds, seed=0):
    """One dataset of a write and 100 appends against one .emb of the same keys, in interleaved rounds."""
    parts = np.linspace(0, n, 102).astype(int)
    ds, single = os.path.join(folder, "appended"), os.path.join(folder, "single.emb")
    embfile.write_shards(ds, data(parts[0], parts[1], dim))
    for lo, hi in zip(parts[1:-1], parts[2:]):
        embfile.append(ds, data(lo, hi, dim))
    with embfile.Writer(single, dim, "float32") as w:
        for lo, hi in zip(parts[:-1], parts[1:]):
            w.add_batch(*data(lo, hi, dim))
    with embfile.open(ds) as db:
        shape = (db.version, len(db.files), db.segments, [s.count for s in db.manifest.segments])
    rng = np.random.default_rng(seed)
    probes = keys_of(0, n)
    probes = [probes[i] for i in rng.integers(0, n, 20_000)]
    absent = [k + "-absent" for k in probes]  # each sorts right after a present key: a whole search
    results = {"one .emb": [], "100 appends": []}
    for _ in range(rounds):
        for name, path in (("one .emb", single), ("100 appends", ds)):
            results[name].append(lookups(path, probes, absent, probes[:1000]))
    return shape, results


def segments_race(folder, n, dim, rounds, seed=0):
    """One dataset of ``n`` keys with its key index in one segment against the same keys in 16 segments at the
    cap (``SEGMENT_KEYS`` set to a 16th of them while it is written), in interleaved rounds."""
    from embfile import segments

    paths = {"one segment": os.path.join(folder, "one"), "16 segments": os.path.join(folder, "sixteen")}
    for path, cap in zip(paths.values(), (segments.SEGMENT_KEYS, -(-n // 16))):
        saved, segments.SEGMENT_KEYS = segments.SEGMENT_KEYS, cap
        try:
            embfile.write_shards(path, data(0, n, dim))
        finally:
            segments.SEGMENT_KEYS = saved
    with embfile.open(paths["16 segments"]) as db:
        shape = [s.count for s in db.manifest.segments]
    rng = np.random.default_rng(seed)
    probes = keys_of(0, n)
    probes = [probes[i] for i in rng.integers(0, n, 20_000)]
    absent = [k + "-absent" for k in probes]
    results = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            results[name].append(lookups(path, probes, absent, probes[:1000]))
    return shape, results


def print_lookups(res, rounds):
    """The table of two datasets' :func:`lookups`, the second against the first."""
    first, second = res
    print(f"{rounds} interleaved rounds, median (range) of each round's median:\n")
    print(f"| | {first} | {second} | ratio |")
    print("|---|---:|---:|---:|")
    for op, label, scale in (
        ("open", "warm open + close, µs", 1.0),
        ("hit", "warm db[key], ns", 1.0),
        ("miss", "warm key in db (absent), ns", 1.0),
        ("gather", "warm get_batch(1,000 keys), µs", 1e-3),
        ("cold_open", "cold open, ms", 1.0),
        ("cold", "cold db[key], µs", 1.0),
    ):
        a = [r[op] * scale for r in res[first]]
        b = [r[op] * scale for r in res[second]]
        fmt = "{:.0f}" if op in ("hit", "miss", "open") else "{:.1f}"
        print(f"| {label} | {spread(a, fmt=fmt)} | {spread(b, fmt=fmt)} | {np.median(b) / np.median(a):.2f}x |")


def full_diff(path, since, version):
    """The changes from ``since`` to ``version`` as a user finds them without :func:`embfile.changes`: both
    versions read whole, each key of one looked up in the other, the records compared."""
    with embfile.open(path, version=version) as new, embfile.open(path, version=since) as old:
        keys, old_keys = np.array(list(new), dtype=object), list(old)
        before = old.find_rows(keys.tolist())
        found = before >= 0
        differ = np.zeros(len(keys), bool)
        differ[found] = (new.to_numpy()[found] != old.take(before[found])).any(axis=1)
        removed = [k for k, r in zip(old_keys, new.find_rows(old_keys)) if r < 0]
    return keys[~found].tolist(), keys[differ].tolist(), removed


def changes_race(folder, n, dim, rounds):
    """``embfile.changes`` and :func:`full_diff` between each version and the one before, in interleaved
    rounds; also checks that they agree."""
    ds = os.path.join(folder, "changing")
    embfile.write_shards(ds, data(0, n, dim), shard_bytes=64 << 20)
    embfile.append(ds, data(n, n + n // 100, dim))
    embfile.remove(ds, keys_of(0, n)[:: n // 100])
    embfile.compact(ds, shard_bytes=64 << 20)
    steps = {"append 1% new keys": 2, "remove 100 keys": 3, "compact": 4}
    times = {(name, tool): [] for name in steps for tool in ("changes", "full")}
    counts = {}
    for _ in range(rounds):
        for name, version in steps.items():
            t = time.perf_counter()
            c = embfile.changes(ds, version - 1, version)
            times[name, "changes"].append(time.perf_counter() - t)
            t = time.perf_counter()
            full = full_diff(ds, version - 1, version)
            times[name, "full"].append(time.perf_counter() - t)
            assert (c.added, sorted(c.replaced), c.removed) == (full[0], sorted(full[1]), full[2]), name
            counts[name] = (len(c.added), len(c.replaced), len(c.removed))
    with embfile.open(ds) as db:
        size = sum(os.path.getsize(f.path) for f in db.files)
    return size, counts, times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000,10000000", help="dataset sizes for the append cost")
    ap.add_argument("--dim", type=int, default=16, help="elements per vector (small: the keys are what grows)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lookup-keys", type=int, default=500_000, help="keys of the 100-append dataset")
    ap.add_argument("--lookup-dim", type=int, default=256, help="its elements per vector (1 KiB records)")
    ap.add_argument("--changes-keys", type=int, default=500_000, help="keys of the dataset whose changes are read")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/grow.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("grow", "Datasets that grow: appends and lookups", args.out):
        run(args)


def run(args):
    folder = tempfile.mkdtemp(prefix="bench-grow-", dir=args.dir)
    try:
        limits = machine.measure(folder, nbytes=256 << 20)
        print("machine:", machine.describe(limits), "\n")
        print(f"## Appending {APPEND:,} vectors of {args.dim} float32 ({args.rounds} rounds: median (range))\n")
        print("| keys in the dataset | embfile.append, s | 0.1: new shard + write_index, s | ratio |")
        print("|---:|---:|---:|---:|")
        first = None
        for n in map(int, args.sizes.split(",")):
            appends, rebuilds = append_cost(folder, n, args.dim, args.rounds)
            first = first or np.median(appends)
            print(
                f"| {n:,} | {spread(appends)} | {spread(rebuilds)} | "
                f"{np.median(rebuilds) / np.median(appends):.1f}x faster |"
            )
        print(
            f"\nThe append's median cost relative to the smallest dataset's: the last row's / the first's = "
            f"{np.median(appends) / first:.2f}\n"
        )
        shape, res = lookup_race(folder, args.lookup_keys, args.lookup_dim, args.rounds)
        version, shards, segments, sizes = shape
        print(
            f"## Lookups: {args.lookup_keys:,} keys of {args.lookup_dim} float32, one .emb against a write and "
            f"100 appends (version {version}: "
            f"{shards} shards, key index in {segments} segments of {', '.join(f'{s:,}' for s in sizes)} keys)\n"
        )
        print_lookups(res, args.rounds)
        sizes, res = segments_race(folder, args.lookup_keys, args.lookup_dim, args.rounds)
        print(
            f"\n## Lookups with the key index at its cap: {args.lookup_keys:,} keys of {args.lookup_dim} float32, "
            f"one segment against {len(sizes)} full ones of {sizes[0]:,} keys (as a dataset of {len(sizes)} x "
            f"2^26 keys lays its index out)\n"
        )
        print_lookups(res, args.rounds)
        size, counts, times = changes_race(folder, args.changes_keys, args.lookup_dim, args.rounds)
        print(
            f"\n## What changed since a version: {args.changes_keys:,} keys of {args.lookup_dim} float32 "
            f"({size / 2**20:,.0f} MiB in 64 MiB shards), warm\n"
        )
        print(f"{args.rounds} interleaved rounds, seconds, median (range):\n")
        print("| from the version before, by | added, replaced, removed | embfile.changes | full comparison | ratio |")
        print("|---|---:|---:|---:|---:|")
        for name, (added, replaced, removed) in counts.items():
            a, b = times[name, "changes"], times[name, "full"]
            print(
                f"| {name} | {added:,}, {replaced:,}, {removed:,} | {spread(a)} | {spread(b)} | "
                f"{np.median(b) / np.median(a):.1f}x faster |"
            )
        print(
            "\n'full comparison': both versions read whole, each key of one looked up in the other and its "
            "record compared (what a user does without embfile.changes); both give the same keys."
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
