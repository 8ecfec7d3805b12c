"""Conversion throughput and peak memory, beside the machine's limits measured in the same run.

Inputs are written the way users' tools write them: a bulk HDF5 file (vlen ids + a contiguous matrix, as
``h5py.create_dataset(data=...)`` does), Parquet with ``fixed_size_list`` and ``list`` vectors (pyarrow and
pandas / Hugging Face layouts, pyarrow's default writer settings), and a ProtTrans-style HDF5 file with one
float16 dataset per protein.  Every conversion runs in a fresh process with its input evicted from the page
cache ("cold") and ends with the output fsynced; each figure is the best of three such runs, as the machine's
disk limits are.  Peak memory is the largest of those runs' VmHWM minus what the process held before converting.

    python benchmarks/bench_convert.py                      # 1 GiB inputs, 20,000 per-key datasets: minutes
    python benchmarks/bench_convert.py --mb 4096 --per-key 100000

Targets: bulk HDF5 and Parquet conversions at >= 50% of the slower of cold sequential read and
write+fsync bandwidth; per-key HDF5 at >= 2x the naive ``{k: f[k][()] for k in f}`` loop (which does not even
write anything); peak memory flat in the input size (the chunk plus the keys).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine

MB = 1 << 20


def make_inputs(folder, n, dim, per_key):
    """Write the inputs with h5py, pyarrow and the ProtTrans loop; return {name: path}."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    keys = [f"UniRef50_{i:09d}" for i in range(n)]
    paths = {
        name: os.path.join(folder, file)
        for name, file in (
            ("h5 bulk", "bulk.h5"),
            ("parquet fixed_size_list", "fixed.parquet"),
            ("parquet list", "list.parquet"),
            ("h5 per-key", "prott5.h5"),
        )
    }
    step = 16384  # rows per write, and per Parquet row group (64 MiB at 1024 float32)
    with h5py.File(paths["h5 bulk"], "w") as f:
        f.create_dataset("ids", data=keys, dtype=h5py.string_dtype())
        m = f.create_dataset("embeddings", shape=(n, dim), dtype="f4")
        for lo in range(0, n, step):
            m[lo : lo + step] = rng.standard_normal((min(step, n - lo), dim), dtype=np.float32)
    for name, list_type in (
        ("parquet fixed_size_list", pa.list_(pa.float32(), dim)),
        ("parquet list", pa.list_(pa.float32())),
    ):
        schema = pa.schema([("id", pa.string()), ("embedding", list_type)])
        with h5py.File(paths["h5 bulk"], "r") as f, pq.ParquetWriter(paths[name], schema) as w:
            for lo in range(0, n, step):  # otherwise pyarrow's defaults (snappy)
                block = f["embeddings"][lo : lo + step]
                values = pa.array(block.ravel())
                vectors = (
                    pa.FixedSizeListArray.from_arrays(values, dim)
                    if name.endswith("fixed_size_list")
                    else pa.ListArray.from_arrays(np.arange(0, (len(block) + 1) * dim, dim, dtype=np.int32), values)
                )
                w.write_table(pa.table({"id": keys[lo : lo + step], "embedding": vectors}, schema=schema))
    with h5py.File(paths["h5 per-key"], "w") as hf:  # prott5_embedder.py, per-protein, half precision
        for i in range(per_key):
            hf.create_dataset(f"sp_Q{i:07d}_PROT_HUMAN", data=rng.standard_normal(1024).astype(np.float16))
    for p in paths.values():
        machine.fsync_path(p)
    return paths


# ---- one measured job per fresh process ----------------------------------------------------------------------


def worker(job):
    import h5py
    import pyarrow.parquet  # noqa: F401

    import embfile

    for p in job["evict"]:
        machine.evict(p)
    base = machine.peak_mb()
    t0 = time.perf_counter()
    if job["kind"] == "convert":
        embfile.convert(job["src"], job["dst"])
    elif job["kind"] == "copy":  # what any conversion must at least do: read the bytes, write them durably
        with open(job["src"], "rb") as a, open(job["dst"], "wb") as b:
            shutil.copyfileobj(a, b, 8 * MB)
            b.flush()
            os.fsync(b.fileno())
    elif job["kind"] == "naive per-key":
        with h5py.File(job["src"], "r") as f:
            data = {k: f[k][()] for k in f}
        assert len(data)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": machine.peak_mb() - base}))


def run(job, repeats=3):
    """The fastest of ``repeats`` runs of ``job``, each in a fresh process, with the largest peak memory."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"seconds": min(r["seconds"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the vectors in each bulk input, MiB")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--per-key", type=int, default=20000, help="datasets in the per-key HDF5 input")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--out", help="the result file (default benchmarks/results/convert.md; - for none)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    with machine.recorded("convert", "Conversions: throughput and memory", args.out):
        results = measure(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def measure(args):
    """Every conversion, the memory bound and the per-key HDF5 input; the figures, as a dict."""
    folder = tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir)
    try:
        limits = machine.measure(folder)
        print("machine:", machine.describe(limits))
        n = args.mb * MB // (4 * args.dim)
        vector_bytes = n * args.dim * 4
        t0 = time.perf_counter()
        paths = make_inputs(folder, n, args.dim, args.per_key)
        print(
            f"inputs: {n:,} x {args.dim} float32 ({vector_bytes / 1e6:,.0f} MB of vectors) in bulk layouts, "
            f"{args.per_key:,} ProtTrans per-key datasets; written in {time.perf_counter() - t0:.0f} s\n"
        )
        emb = os.path.join(folder, "db.emb")
        jobs = [
            ("h5 bulk -> emb", "convert", paths["h5 bulk"], emb),
            ("parquet fixed_size_list -> emb", "convert", paths["parquet fixed_size_list"], emb),
            ("parquet list -> emb", "convert", paths["parquet list"], emb),
            ("emb -> parquet", "convert", emb, os.path.join(folder, "out.parquet")),
            ("emb -> h5 bulk", "convert", emb, os.path.join(folder, "out.h5")),
            ("copy h5 bulk (cp + fsync)", "copy", paths["h5 bulk"], os.path.join(folder, "copy.bin")),
        ]
        floor = min(limits["cold_read_gbps"], limits["write_fsync_gbps"])
        rows, results = [], {"limits": limits, "n": n, "dim": args.dim}
        print(
            "| conversion (cold input, durable output) | s | MB/s of vectors | / min(read, write) | / copy | "
            "peak MB |\n|---|---|---|---|---|---|"
        )
        copy = run({"kind": "copy", "src": paths["h5 bulk"], "dst": jobs[-1][3], "evict": [paths["h5 bulk"]]})
        for name, kind, src, dst in jobs:
            r = copy if kind == "copy" else run({"kind": kind, "src": src, "dst": dst, "evict": [src]})
            gbps = vector_bytes / r["seconds"] / 1e9
            results[name] = {**r, "gbps": gbps, "vs_floor": gbps / floor}
            rows.append(name)
            print(
                f"| {name} | {r['seconds']:.2f} | {gbps * 1e3:,.0f} | {gbps / floor:.0%} | "
                f"{copy['seconds'] / r['seconds']:.0%} | {r['peak_mb']:.0f} |"
            )
            if kind == "convert" and dst != emb:
                os.unlink(dst)

        half = os.path.join(folder, "half")  # the same conversion at a quarter of the size: memory must not grow
        os.makedirs(half)
        small = make_inputs(half, n // 4, args.dim, 10)
        r = run(
            {
                "kind": "convert",
                "src": small["h5 bulk"],
                "dst": os.path.join(half, "db.emb"),
                "evict": [small["h5 bulk"]],
            }
        )
        r2 = run(
            {
                "kind": "convert",
                "src": small["parquet list"],
                "dst": os.path.join(half, "db.emb"),
                "evict": [small["parquet list"]],
            }
        )
        results["quarter"] = {"h5 bulk -> emb": r, "parquet list -> emb": r2}
        print(
            f"\npeak MB at 1/4 of the input: h5 bulk -> emb {r['peak_mb']:.0f}, parquet list -> emb "
            f"{r2['peak_mb']:.0f} (full size: {results['h5 bulk -> emb']['peak_mb']:.0f}, "
            f"{results['parquet list -> emb']['peak_mb']:.0f}); keys alone take about "
            f"{n * (8 + 19) / 1e6:.0f} MB at full size"
        )

        pk = paths["h5 per-key"]
        print(
            f"\n| per-key HDF5 ({args.per_key:,} x 1024 float16) | cold s | warm s | us per key (warm) |\n"
            "|---|---|---|---|"
        )
        for name, kind in (
            ("naive {k: f[k][()] for k in f} (read only)", "naive per-key"),
            ("embfile convert (read + durable write)", "convert"),
        ):
            cold = run({"kind": kind, "src": pk, "dst": os.path.join(folder, "pk.emb"), "evict": [pk]})
            warm = run({"kind": kind, "src": pk, "dst": os.path.join(folder, "pk.emb"), "evict": []})
            results[name] = {"cold": cold, "warm": warm}
            print(
                f"| {name} | {cold['seconds']:.2f} | {warm['seconds']:.2f} | "
                f"{warm['seconds'] / args.per_key * 1e6:.0f} |"
            )
        naive, ours = (
            results["naive {k: f[k][()] for k in f} (read only)"],
            results["embfile convert (read + durable write)"],
        )
        speedups = (
            naive["cold"]["seconds"] / ours["cold"]["seconds"],
            naive["warm"]["seconds"] / ours["warm"]["seconds"],
        )

        print("\ntargets")
        for name in (
            "h5 bulk -> emb",
            "parquet fixed_size_list -> emb",
            "parquet list -> emb",
            "emb -> parquet",
            "emb -> h5 bulk",
        ):
            v = results[name]["vs_floor"]
            print(f"  {'PASS' if v >= 0.5 else 'MISS'}  {name} at {v:.0%} of min(cold read, write+fsync) (>= 50%)")
        ok = min(speedups) >= 2
        print(
            f"  {'PASS' if ok else 'MISS'}  per-key HDF5 {speedups[0]:.1f}x cold / {speedups[1]:.1f}x warm "
            "faster than the naive loop (>= 2x)"
        )
        grow = max(
            results["h5 bulk -> emb"]["peak_mb"] - r["peak_mb"],
            results["parquet list -> emb"]["peak_mb"] - r2["peak_mb"],
        )
        print(
            f"  {'PASS' if grow < 64 else 'MISS'}  peak memory grows {grow:.0f} MB from 1/4 to the full input "
            f"of {vector_bytes / 1e6:,.0f} MB (keys: about {n * 27 * 0.75 / 1e6:.0f} MB of that is expected)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
