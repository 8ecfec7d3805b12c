"""Spark and Dask: writing and reading embfile against Parquet through the same engine, on the same data.

The input is one Parquet dataset of ``--rows`` rows of ``key string, vector array<float>[--dim]`` (written first,
not timed).  For Spark in local mode with 1 and then 2 cores, and for a Dask LocalCluster of 1 and then 2
worker processes, each round (``--rounds``, interleaved: embfile, Parquet, embfile, ...) times:

- **write**: read the input and write it as embfile (``format("embfile")`` / ``to_embfile``) or as Parquet
  (``df.write.parquet`` / ``to_parquet``, both with the engine's default compression), to a new folder;
- **read**: read every key and vector back (Spark: a ``noop`` write of the whole DataFrame, embfile's read by
  ``embfile.spark.read``, its JVM reader, and again by ``format("embfile")``, the Python data source; Dask:
  the length of each partition's vector column, which decodes every value).

Prints rows/s, the bytes written, and the ratios embfile/Parquet (above 1: embfile faster).

With ``--ragged N``, each key holds per-residue records of 1 to 2N - 1 rows (N on average) of ``--dim``
values, ``vector array<array<float>>`` (Parquet ``list<list<float>>``), written as ragged records; figures
are records/s, into ``benchmarks/results/engines-ragged.md``.

    python benchmarks/bench_engines.py                     # 400,000 x 256 float32 (400 MB): a few minutes
    python benchmarks/bench_engines.py --rows 8000 --ragged 50  # 400,000 residues x 256 float32
    python benchmarks/bench_engines.py --rows 1000000 --out -

Targets (issue #25): writing embfile at least as fast as Parquet through the same engine; reading at least
1.5x faster.
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


def make_input(folder, rows, dim, ragged=0, files=8):
    """The shared input: Parquet files of ``key`` and ``vector`` (a list of float32; with ``ragged``, a list of
    1 to ``2 * ragged - 1`` of them), written by pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.path.join(folder, "input")
    os.mkdir(path)
    rng = np.random.default_rng(0)
    for f, lo in enumerate(range(0, rows, -(-rows // files))):
        hi = min(rows, lo + -(-rows // files))
        lengths = rng.integers(1, 2 * ragged, hi - lo) if ragged else np.ones(hi - lo, np.int64)
        n = int(lengths.sum())
        values = pa.array(rng.standard_normal(n * dim, dtype=np.float32))
        vectors = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), values)
        if ragged:
            records = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            vectors = pa.ListArray.from_arrays(pa.array(records), vectors)
        keys = pa.array([f"UniRef50_{i:010d}" for i in range(lo, hi)])
        pq.write_table(pa.table({"key": keys, "vector": vectors}), os.path.join(path, f"part-{f:03d}.parquet"))
    return path


def size_of(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def spark_runs(src, folder, cores, rounds):
    """{(tool, op): [seconds]} and bytes, with Spark in local mode on ``cores`` cores."""
    from pyspark.sql import SparkSession

    import embfile.spark
    from embfile.spark import _jvm

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master(f"local[{cores}]")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    embfile.spark.register(spark)
    _jvm.load(spark)  # compiles the JVM reader on a machine's first run: not part of a read's time
    df = spark.read.parquet(src)
    reads = {
        "embfile": {
            "read": lambda path: embfile.spark.read(spark, path),
            "read, Python source": lambda path: spark.read.format("embfile").load(path),
        },
        "parquet": {"read": spark.read.parquet},
    }
    times, sizes = {}, {}
    try:
        for r in range(rounds):
            for tool in ("embfile", "parquet"):
                out = os.path.join(folder, f"spark-{tool}-{r}")
                t0 = time.perf_counter()
                if tool == "embfile":
                    df.write.format("embfile").mode("append").save(out)
                else:
                    df.write.parquet(out)
                times.setdefault((tool, "write"), []).append(time.perf_counter() - t0)
                sizes[tool] = size_of(out)
                for op, read in reads[tool].items():
                    t0 = time.perf_counter()
                    read(out).write.format("noop").mode("overwrite").save()
                    times.setdefault((tool, op), []).append(time.perf_counter() - t0)
                shutil.rmtree(out)
    finally:
        spark.stop()
    return times, sizes


def dask_runs(src, folder, workers, rounds, ragged):
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import embfile.dask

    times, sizes = {}, {}
    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):
        df = dd.read_parquet(src, dtype_backend="pyarrow")
        for r in range(rounds):
            for tool in ("embfile", "parquet"):
                out = os.path.join(folder, f"dask-{tool}-{r}")
                t0 = time.perf_counter()
                if tool == "embfile":
                    embfile.dask.to_embfile(df, out, ragged=bool(ragged))
                else:
                    df.to_parquet(out)
                times.setdefault((tool, "write"), []).append(time.perf_counter() - t0)
                sizes[tool] = size_of(out)
                back = (
                    embfile.dask.read_embfile(out)
                    if tool == "embfile"
                    else dd.read_parquet(out, dtype_backend="pyarrow")
                )
                t0 = time.perf_counter()
                n = back["vector"].map_partitions(len, meta=("n", "i8")).sum().compute()
                times.setdefault((tool, "read"), []).append(time.perf_counter() - t0)
                assert int(n) > 0
                shutil.rmtree(out)
    return times, sizes


def report(engine, unit, runs, rows, ragged):
    print(f"\n## {engine}\n")
    what = "records" if ragged else "rows"
    print(f"| {unit} | op | embfile {what}/s | Parquet {what}/s | embfile / Parquet | bytes: embfile, Parquet |")
    print("|---:|---|---:|---:|---:|---|")
    for n, (times, sizes) in runs.items():
        for tool, op in times:
            if tool != "embfile":
                continue
            ours, theirs = times[("embfile", op)], times[("parquet", op.split(",")[0])]
            e, p = np.median(ours), np.median(theirs)
            spread = f"embfile {min(ours):.2f}-{max(ours):.2f} s, Parquet {min(theirs):.2f}-{max(theirs):.2f} s"
            size = f"{sizes['embfile'] / 1e6:,.0f} MB, {sizes['parquet'] / 1e6:,.0f} MB" if op == "write" else ""
            print(f"| {n} | {op} | {rows / e:,.0f} | {rows / p:,.0f} | **{p / e:.2f}x** ({spread}) | {size} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ragged", type=int, default=0, help="per-residue records of this many rows on average")
    ap.add_argument("--engines", default="spark,dask")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/engines.md; - for none)")
    args = ap.parse_args()
    name, title = "engines", "Spark and Dask: embfile against Parquet through the same engine"
    if args.ragged:
        name, title = "engines-ragged", "Spark and Dask, per-residue records: embfile against Parquet"
    with machine.recorded(name, title, args.out):
        folder = tempfile.mkdtemp(prefix="bench-engines-", dir=args.dir)
        try:
            limits = machine.measure(folder, nbytes=256 << 20)
            print("machine:", machine.describe(limits))
            src = make_input(folder, args.rows, args.dim, args.ragged)
            what = f"records of 1 to {2 * args.ragged - 1} rows (key + rows of" if args.ragged else "rows of key +"
            print(
                f"\ninput: {args.rows:,} {what} {args.dim} float32{')' if args.ragged else ''} "
                f"({size_of(src) / 1e6:,.0f} MB of Parquet); {args.rounds} interleaved rounds, median time (range); "
                f"embfile {embfile.__version__}"
            )
            engines = args.engines.split(",")
            if "spark" in engines:
                runs = {c: spark_runs(src, folder, c, args.rounds) for c in (1, 2)}
                report("Spark (local mode)", "cores", runs, args.rows, args.ragged)
            if "dask" in engines:
                runs = {w: dask_runs(src, folder, w, args.rounds, args.ragged) for w in (1, 2)}
                report("Dask (LocalCluster, one thread per worker process)", "workers", runs, args.rows, args.ragged)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
