"""Exact nearest-neighbour search: embfile against numpy, faiss and usearch on the same data, warm, beside the
machine's memory read bandwidth and sgemm rate measured in the same run.

Data: ``--rows`` x ``--dim`` random vectors (default 500,000 x 1280, ProtT5/ESM-sized), stored as float32,
float16, bfloat16 and (scaled, rounded) int8 .emb files; queries are stored vectors plus noise.  For 1, 16 and
256 queries (k = 10, inner product; the narrow types up to 16), the tools run in turn, ``--rounds`` times over
(interleaved, each after a fresh measurement of the bound; the tool and the bound each the best of two runs),
and the median of each figure is kept:

- embfile ``db.search`` over the mapped file (nothing loaded);
- numpy: ``matrix @ q.T`` and ``argpartition`` over the matrix already in memory (loading it not counted);
- faiss ``IndexFlatIP`` (its own float32 copy, built beforehand, not counted);
- usearch ``search(..., exact=True)`` over the matrix in memory.

Bounds: one query cannot beat reading the records once at the machine's read bandwidth (both cores); many
queries cannot beat ``2 * rows * dim * queries`` flops at the sgemm rate.

Then the same vectors quantized to one bit a dimension (``np.packbits(x > 0)``, as binary quantization stores
them: ``dim / 8`` bytes a record), searched by Hamming distance: embfile ``metric="hamming"`` over the mapped
file against numpy (``bitwise_count`` of the XOR, in memory), faiss ``IndexBinaryFlat`` and usearch exact
search (``MetricKind.Hamming``), beside reading the packed records once.

Then a Matryoshka prefix: the first ``dim / 5`` values of each float32 record compared alone (``dims=``), embfile
over the mapped file in place against numpy over the in-memory matrix's prefix (a view) and faiss
``IndexFlatIP`` over a cut copy (built beforehand, not counted), beside reading those values once.

    python benchmarks/bench_search.py                   # a few minutes, 2.6 GB + 1.3 GB of files
    python benchmarks/bench_search.py --rows 100000 --out -

Targets (issue #29): one query at >= 80% of the read bandwidth and faster than faiss; 256 queries within 1.2x
of the sgemm bound; float16 at least 1.5x faster than float32 for one query.
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

K = 10


def sgemm_gflops(n=3072, repeats=3):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def products(matrix, q, rows=13_107):
    """``q @ block.T`` over ``matrix`` in blocks of ``rows`` (64 MiB of float32 at 1280-d), as the search does."""
    out = np.empty((len(q), rows), np.float32)
    for lo in range(0, len(matrix), rows):
        block = matrix[lo : lo + rows]
        np.matmul(q, block.T, out=out[:, : len(block)])


def seconds(fn, repeats=2):
    """The best of ``repeats`` runs, as the bounds are measured: like against like."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_search(matrix, q):
    s = matrix @ q.T
    top = np.argpartition(-s, K, axis=0)[:K]
    return np.take_along_axis(s, top, axis=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/search.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("search", "Exact nearest-neighbour search: embfile against numpy, faiss, usearch", args.out):
        run(args)


def run(args):
    import faiss
    from usearch.index import search as usearch_search

    folder = tempfile.mkdtemp(prefix="bench-search-", dir=args.dir)
    try:
        rng = np.random.default_rng(0)
        matrix = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
        keys = [f"UniRef50_{i:010d}" for i in range(args.rows)]
        paths = {}
        for dtype in ("float32", "float16", "bfloat16"):
            paths[dtype] = os.path.join(folder, f"{dtype}.emb")
            embfile.write(paths[dtype], (keys, matrix), dtype=dtype)
        paths["int8"] = os.path.join(folder, "int8.emb")  # quantised as users do: scaled, rounded, clipped
        embfile.write(paths["int8"], (keys, np.clip(np.rint(matrix * 32), -127, 127).astype(np.int8)))
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        print(
            f"machine: read bandwidth {machine.read_gbps(matrix):.1f} GB/s ({os.cpu_count()} threads), sgemm "
            f"{sgemm_gflops():.0f} GFLOP/s (numpy {np.__version__}, {threads} threads), memcpy "
            f"{machine.memcpy_gbps():.1f} GB/s; the bound is measured again just before each tool in every round\n"
        )
        print(
            f"data: {args.rows:,} x {args.dim} ({matrix.nbytes / 1e9:.2f} GB as float32, "
            f"{matrix.nbytes / 2e9:.2f} GB as float16), warm; k = {K}, inner product; {args.rounds} interleaved "
            f"rounds, median (range)\n"
        )
        index = faiss.IndexFlatIP(args.dim)
        index.add(matrix)
        dbs = {dtype: embfile.open(path) for dtype, path in paths.items()}
        mapped = dbs["float32"].matrix  # a view of the mapping
        for db in dbs.values():
            db.search(matrix[0], k=K, metric="ip")  # warm: every page mapped
        print("| queries | tool | time | records/s | vs bound | embfile float32 is |")
        print("|---:|---|---:|---:|---:|---:|")
        for nq in (1, 16, 256):
            q = matrix[rng.integers(0, args.rows, nq)] + 0.01 * rng.standard_normal((nq, args.dim), dtype=np.float32)
            tools = {
                "embfile float32": lambda q=q: dbs["float32"].search(q, k=K, metric="ip"),
                "embfile float16": lambda q=q: dbs["float16"].search(q, k=K, metric="ip"),
                # narrower types, through the kernel (many queries would go through BLAS on a widened copy)
                **(
                    {f"embfile {t}": lambda q=q, t=t: dbs[t].search(q, k=K, metric="ip") for t in ("bfloat16", "int8")}
                    if nq <= 16
                    else {}
                ),
                "numpy (in memory)": lambda q=q: numpy_search(matrix, q),
                "faiss IndexFlatIP": lambda q=q: index.search(q, K),
                "usearch exact": lambda q=q: usearch_search(matrix, q, K, metric="ip", exact=True),
            }
            if nq == 1:  # what reading the float32 file's mapping costs (4 KiB pages), computing nothing
                tools["read of the mapped file (numpy sum)"] = lambda: machine.read_gbps(mapped, repeats=1)
            else:  # what the BLAS path costs before its top-k: the same products, block by block
                tools["products alone (no top-k)"] = lambda q=q: products(matrix, q)

            # one query cannot beat reading every record once; many, the products at the sgemm rate
            def measure_bound(nq=nq):
                if nq == 1:
                    return matrix.nbytes / machine.read_gbps(matrix, repeats=2) / 1e9
                return 2 * args.rows * args.dim * nq / sgemm_gflops(repeats=2) / 1e9

            times = {name: [] for name in tools}
            bounds = {name: [] for name in tools}
            for _ in range(args.rounds):  # A, B, C, ... again: the machine's drift falls on every tool alike
                for name, fn in tools.items():
                    bounds[name].append(measure_bound())  # just before the tool: a pair seconds apart
                    times[name].append(seconds(fn))
            mine = np.array(times["embfile float32"])
            for name, taken in times.items():
                t = np.array(taken)
                stored = {"embfile float16": 0.5, "embfile bfloat16": 0.5, "embfile int8": 0.25}.get(name, 1.0)
                share = stored if nq == 1 else 1.0  # one query: reading the stored bytes once
                vs, ratio = np.array(bounds[name]) * share / t, t / mine  # per round, then the median
                print(
                    f"| {nq} | {name} | {np.median(t) * 1e3:,.1f} ms ({t.min() * 1e3:,.1f}-{t.max() * 1e3:,.1f}) | "
                    f"{args.rows * nq / np.median(t):,.0f} | {np.median(vs):.0%} ({vs.min():.0%}-{vs.max():.0%}) | "
                    f"{np.median(ratio):.2f}x ({ratio.min():.2f}-{ratio.max():.2f}) |"
                )
        print(
            "\n'vs bound': the bound's time over the tool's, the bound measured just before the tool (100% = at the "
            "bound; for a narrower type and one query, reading its smaller records once). 'embfile float32 is': the "
            "tool's time over embfile float32's in the same round (above 1: embfile faster). Median of the rounds "
            "(range)."
        )
        hamming_race(args, matrix, keys, folder, rng)
        prefix_race(args, matrix, dbs["float32"], rng)
        for db in dbs.values():
            db.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def hamming_race(args, matrix, keys, folder, rng):
    """The packed bits of ``matrix`` searched by Hamming distance, each tool against reading them once."""
    import faiss
    from usearch.index import MetricKind
    from usearch.index import search as usearch_search

    bits = np.packbits(matrix > 0, axis=1)
    words = bits.reshape(-1)[: bits.size // 8 * 8].view(np.uint64)  # read as 8-byte words: no widening
    path = os.path.join(folder, "bits.emb")
    embfile.write(path, (keys, bits))
    index = faiss.IndexBinaryFlat(bits.shape[1] * 8)
    index.add(bits)
    print(
        f"\n## Packed bits, by Hamming distance\n\n{args.rows:,} x {bits.shape[1]} bytes ({bits.nbytes / 1e6:.0f} MB: "
        f"the vectors above, one bit a dimension), warm; k = {K}; 'vs bound': reading the packed records once\n"
    )
    print("| queries | tool | time | records/s | vs bound | embfile is |")
    print("|---:|---|---:|---:|---:|---:|")
    with embfile.open(path) as db:
        db.search(bits[0], k=K, metric="hamming")  # warm
        for nq in (1, 16, 256):
            q = bits[rng.integers(0, args.rows, nq)]
            tools = {
                "embfile hamming": lambda q=q: db.search(q, k=K, metric="hamming"),
                "numpy bitwise_count (in memory)": lambda q=q: [
                    np.argpartition(np.bitwise_count(bits ^ one).sum(axis=1), K)[:K] for one in q
                ],
                "faiss IndexBinaryFlat": lambda q=q: index.search(q, K),
                "usearch exact": lambda q=q: usearch_search(bits, q, K, MetricKind.Hamming, exact=True),
            }
            race(args, nq, tools, lambda: bits.nbytes / machine.read_gbps(words, repeats=2) / 1e9)
    print(
        "\n'vs bound': reading the packed records once (8-byte words, both cores), the bound measured just before "
        "the tool, over the tool's time. 'embfile is': the tool's time over embfile's in the same round."
    )


def prefix_race(args, matrix, db, rng):
    """The first fifth of each record compared alone (a Matryoshka prefix), each tool against reading it once."""
    import faiss

    dims = args.dim // 5
    prefix = matrix[:, :dims]  # a view: what reading the prefix in place costs
    index = faiss.IndexFlatIP(dims)
    index.add(np.ascontiguousarray(prefix))
    print(
        f"\n## A Matryoshka prefix: the first {dims} of {args.dim} values\n\n{args.rows:,} records, float32, warm; "
        f"k = {K}, inner product; 'vs bound': reading the first {dims} values of every record once\n"
    )
    print("| queries | tool | time | records/s | vs bound | embfile is |")
    print("|---:|---|---:|---:|---:|---:|")
    for nq in (1, 16):
        q = matrix[rng.integers(0, args.rows, nq)]
        tools = {
            f"embfile dims={dims}": lambda q=q: db.search(q, k=K, metric="ip", dims=dims),
            f"embfile, all {args.dim} values": lambda q=q: db.search(q, k=K, metric="ip"),
            "numpy on the prefix (a view, in memory)": lambda q=q: numpy_search(prefix, q[:, :dims]),
            "faiss IndexFlatIP on a cut copy": lambda q=q: index.search(np.ascontiguousarray(q[:, :dims]), K),
        }
        race(args, nq, tools, lambda: prefix.size * 4 / machine.read_gbps(matrix, repeats=2) / 1e9)
    print(
        "\n'vs bound': reading the prefix of every record once (its share of the matrix read at the machine's read "
        "bandwidth), measured just before the tool, over the tool's time. 'embfile is': the tool's time over "
        f"embfile dims={dims}'s in the same round."
    )


def race(args, nq, tools, bound):
    """Each tool ``args.rounds`` times, interleaved, the bound measured just before it; a table row each: the
    median time, records/s, share of the bound and time over the first tool's, with their ranges."""
    times = {name: [] for name in tools}
    bounds = {name: [] for name in tools}
    for _ in range(args.rounds):  # A, B, C, ... again: the machine's drift falls on every tool alike
        for name, fn in tools.items():
            bounds[name].append(bound())
            times[name].append(seconds(fn))
    mine = np.array(next(iter(times.values())))
    for name, taken in times.items():
        t = np.array(taken)
        vs, ratio = np.array(bounds[name]) / t, t / mine
        print(
            f"| {nq} | {name} | {np.median(t) * 1e3:,.1f} ms ({t.min() * 1e3:,.1f}-{t.max() * 1e3:,.1f}) | "
            f"{args.rows * nq / np.median(t):,.0f} | {np.median(vs):.0%} ({vs.min():.0%}-{vs.max():.0%}) | "
            f"{np.median(ratio):.2f}x ({ratio.min():.2f}-{ratio.max():.2f}) |"
        )


if __name__ == "__main__":
    main()
