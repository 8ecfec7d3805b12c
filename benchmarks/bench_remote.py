"""Remote datasets: lookups by range reads and epochs from the cache, against an S3 server with latency.

An S3 API server (moto's server mode) runs on 127.0.0.1 in this process, every request delayed by
``--latency`` (default 20 ms, a same-region object store).  The same data is uploaded as one .emb file and as a
dataset folder of shards.  Each figure is measured against the same data on local disk, and against the peer:
``fsspec``'s ``simplecache::`` (a whole download on first open, then local reads), which is what Petastorm,
Mosaic Streaming and LitData amount to for a lookup.

1. **Lookups** (``--lookups`` random keys, each round on a fresh cache): requests and bytes per cold key, per
   key whose index pages are cached (a neighbour's was read), per key read before; the time of each; a cold
   ``get_batch`` of 256 keys.  The peer's first lookup is its download.
2. **Epochs** over the folder: time to the first batch, epoch 1 and epoch 2 (from the cache), and MiB
   received, streamed (each window's checksum blocks fetched as the epoch comes to it) and, as before, the whole
   folder downloaded first, over s3:// and over an HTTP server with the same latency; one rank of four streaming
   its share; against the local folder (page cache cold) and the peer (simplecache of every shard, then a
   local epoch).
3. **Growing** a copy of the folder at its URL, each round on a fresh cache: an append of 1% new keys, a
   removal of 10 keys, and a job's commit (Spark's and Dask's protocol, two tasks of 1% each): seconds, and
   what each kept in the cache (what it received), against the dataset's size (what a download, edit and
   upload of the whole costs, the only way to grow an HDF5 file in an object store).
4. **An engine's read task** (Spark's or Dask's) of a slice of one shard, and of the whole shard, each round on
   a fresh cache: seconds and MiB received opening its file alone and reading the checksum blocks holding its
   rows by range requests (what a task does), against opening the dataset and downloading its shard (what a
   task did before).
5. **A long job writing at the URL**: the folder's records, each batch of 1024 computed in ``--compute-ms``
   (a sleep, as a GPU leaves the CPU free), written by a ``DatasetWriter`` at an ``s3://`` URL (each shard
   published while the next fills, and as before, before it), against a ``DatasetWriter`` on local disk
   followed by an upload of the folder: seconds and the local disk's peak.
6. **An epoch larger than the cache's limit**: two epochs over the folder at the HTTP server with ``cache_limit``
   a quarter of the folder, with the default windows and with smaller ones, against no limit: seconds, MiB
   received and the cache's disk at its peak (sampled every 10 ms).  And what the range locks that keep a
   window from being freed under a reader cost a lookup: ``get_batch`` of 256 keys already in the cache, with and
   without them.
7. **Feeding PyTorch at the URL**: one epoch through a real ``DataLoader`` over the folder at the HTTP server, the
   map-style ``Dataset`` with embfile's ``BatchSampler`` (in process, with 2 workers, and with 2 workers under a
   ``cache_limit`` of a quarter of the folder), against the same after a whole download (what it did before), and
   the ``IterableDataset``: seconds to the first batch and to the end, MiB the server sent, the cache's peak.

    python benchmarks/bench_remote.py                       # a few minutes
    python benchmarks/bench_remote.py --keys 20000 --latency 0.05 --out -

Targets (issue #26): a cold lookup at most 3 requests, a key with cached index pages 1, a key read before 0;
epoch 2 from the cache at local speed.
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import machine
from servers import RangeServer, S3Server

import embfile

# moto's server reads a whole object to answer a range of it, so each request costs it time in proportion to the
# object: small shards keep the server's cost below the added latency (the lookups run against the folder).
SHARD_BYTES = 8 << 20


def spread(values, fmt="{:.1f}"):
    v = np.asarray(values, dtype=float)
    return f"{fmt.format(np.median(v))} ({fmt.format(v.min())}-{fmt.format(v.max())})"


def table(columns, rounds, formats=("{:.2f}", "{:.2f}", "{:.0f}", "{:.0f}")):
    """A table of each kind's figures (``rounds``: one ``{kind: figures}`` per round): median (range) of each."""
    print("| | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for kind in rounds[0]:
        print(
            f"| {kind} | " + " | ".join(spread([r[kind][i] for r in rounds], f) for i, f in enumerate(formats)) + " |"
        )


def build(folder, n, dim):
    keys = [f"UniRef50_A{i:09d}" for i in range(n)]
    x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    embfile.write(os.path.join(folder, "one.emb"), (keys, x))
    embfile.write_shards(os.path.join(folder, "ds"), (keys, x), shard_bytes=SHARD_BYTES)
    return keys


def server_rate(s3, count=256):
    """Requests per second the S3 server answers with no added latency, 32 at once: its own limit (moto's
    server spends milliseconds of CPU on each request, one at a time under its GIL)."""
    from embfile.remote.store import Remote

    remote = Remote("s3://embs/ds/" + s3.filesystem().find("embs/ds/shards")[0].split("/", 2)[2], s3.storage_options())
    remote.read_range(0, 4096, None)
    t0 = time.perf_counter()
    remote.read_ranges([(4096 * i, 4096 * (i + 1)) for i in range(count)], None)
    return count / (time.perf_counter() - t0)


def lookups(s3, keys, count, scratch, rng):
    """One round on a fresh cache: per-key requests, bytes and ms of cold, index-cached and repeated keys."""
    cache = tempfile.mkdtemp(dir=scratch)
    out = {}
    with embfile.open("s3://embs/ds", cache_dir=cache, storage_options=s3.storage_options()) as db:
        out["open"] = db.requests
        picks = rng.choice(len(keys) - 1, count, replace=False)
        for kind, chosen in (("cold", picks), ("index cached", picks + 1), ("read before", picks)):
            reqs, nbytes, ms = [], [], []
            for i in chosen.tolist():
                r, b, t0 = db.requests, db.bytes_read, time.perf_counter()
                db[keys[i]]
                ms.append((time.perf_counter() - t0) * 1e3)
                reqs.append(db.requests - r)
                nbytes.append(db.bytes_read - b)
            out[kind] = (reqs, nbytes, ms)
        batch = [keys[i] for i in rng.choice(len(keys), 256, replace=False).tolist()]
        r, t0 = db.requests, time.perf_counter()
        db.get_batch(batch)
        out["batch"] = (db.requests - r, (time.perf_counter() - t0) * 1e3)
    shutil.rmtree(cache)
    return out


def peer_first_lookup(s3, keys, scratch):
    """fsspec simplecache: the whole file downloaded on first open, then a local lookup."""
    import fsspec

    cache = tempfile.mkdtemp(dir=scratch)
    t0 = time.perf_counter()
    local = fsspec.open_local(
        "simplecache::s3://embs/one.emb", s3=s3.storage_options(), simplecache={"cache_storage": cache}
    )
    with embfile.open(local) as db:
        db[keys[12345 % len(keys)]]
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache)
    return seconds


def epochs(s3, http, local_folder, scratch, batch):
    """Time to first batch, epoch 1 and epoch 2 of embfile over the URL; the local folder; the peer."""
    import fsspec

    res, received = {}, {}
    s3_url, opts, http_url = "s3://embs/ds", s3.storage_options(), f"{http.url}/ds"
    for kind, url, options in (
        ("embfile", s3_url, {}),
        ("rank", s3_url, {"rank": 1, "world_size": 4}),
        ("download", s3_url, {}),
        ("http", http_url, {}),
        ("http download", http_url, {}),
    ):
        cache = tempfile.mkdtemp(dir=scratch)
        t0 = time.perf_counter()
        with embfile.open(url, cache_dir=cache, storage_options=opts if url == s3_url else None) as db:
            if "download" in kind:
                db.download()  # what an epoch did before it streamed
            res[kind] = timed_epoch(db, batch, 0, t0, **options)
            received[kind] = db.bytes_read / 2**20
            if kind == "embfile":
                res["embfile epoch 2"] = timed_epoch(db, batch, 1)[1]
        shutil.rmtree(cache)
    res["received"] = received

    with embfile.open(local_folder) as db:
        for f in db.files:
            machine.evict(f.path)
    t0 = time.perf_counter()
    with embfile.open(local_folder) as db:
        res["local"] = timed_epoch(db, batch, 0, t0)
        res["local epoch 2"] = timed_epoch(db, batch, 1)[1]

    cache = tempfile.mkdtemp(dir=scratch)
    mirror = os.path.join(scratch, "peer-mirror")
    t0 = time.perf_counter()
    fs = fsspec.filesystem(
        "simplecache", target_protocol="s3", target_options=s3.storage_options(), cache_storage=cache
    )
    for path in fs.find("embs/ds"):  # the peer copies every object, then reads the local copy
        dst = os.path.join(mirror, os.path.relpath(path, "embs/ds"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(_cached(fs, path), dst)
    with embfile.open(mirror) as db:
        res["peer"] = timed_epoch(db, batch, 0, t0)
    shutil.rmtree(cache)
    shutil.rmtree(mirror)
    return res


def growing(s3, local_folder, keys, dim, scratch, round_):
    """Seconds and MiB received of an append, a removal and a job's commit on a copy of the folder."""
    from embfile import jobs

    url, opts = f"s3://embs/grow{round_}", s3.storage_options()
    s3.filesystem().put(local_folder, url[len("s3://") :], recursive=True)
    rng = np.random.default_rng(round_)
    new = max(1, len(keys) // 100)
    out = {}

    def extra(tag):
        return [f"{tag}{round_}_{i:09d}" for i in range(new)], rng.standard_normal((new, dim)).astype(np.float16)

    for kind, operation in (
        ("append 1% new keys", lambda cache: embfile.append(url, extra("A"), cache_dir=cache, storage_options=opts)),
        (
            "remove 10 keys",
            lambda cache: embfile.remove(url, keys[:: len(keys) // 10][:10], cache_dir=cache, storage_options=opts),
        ),
        ("a job's commit of 2 x 1%", lambda cache: _commit(jobs, url, opts, cache, [extra("J"), extra("K")])),
    ):
        cache = tempfile.mkdtemp(dir=scratch)
        t0 = time.perf_counter()
        operation(cache)
        out[kind] = (time.perf_counter() - t0, _kept(cache) / 2**20)
        shutil.rmtree(cache)
    return out


def read_task(s3, scratch, share):
    """Seconds and MiB received by an engine's read task of the first ``1 / share`` of the folder's first shard,
    on a fresh cache: as embfile's tasks read (the one file opened alone, the checksum blocks of its rows by
    range reads), and as they did before (the dataset opened, its shard downloaded)."""
    from embfile.shards import open_part

    url, opts = "s3://embs/ds", s3.storage_options()
    with embfile.open(url, cache_dir=tempfile.mkdtemp(dir=scratch), storage_options=opts) as db:  # the driver's
        part = db.read_parts(db._starts[1] // share)[0]
    out, before = {}, os.environ.get("EMBFILE_CACHE")
    for kind in ("its file alone, by range reads", "the dataset opened, its shard downloaded"):
        cache = tempfile.mkdtemp(dir=scratch)
        os.environ["EMBFILE_CACHE"] = cache  # where a task's open puts what it fetches
        t0 = time.perf_counter()
        if kind.startswith("its file"):
            with open_part(part, opts) as ds:
                table = ds._arrow_rows(part.lo, part.hi)
        else:
            with embfile.open(url, storage_options=opts) as db:
                whole = db._remote_files[0].download()
                table = db._arrow([whole]).slice(part.lo, part.hi - part.lo)
                whole.close()
        assert table.num_rows == part.hi - part.lo
        out[kind] = (time.perf_counter() - t0, _kept(cache) / 2**20)
        shutil.rmtree(cache)
    if before is None:
        del os.environ["EMBFILE_CACHE"]
    else:
        os.environ["EMBFILE_CACHE"] = before
    return out


def long_job(s3, local_folder, scratch, round_, compute, batch=1024):
    """Seconds and the local disk's peak of a job computing the folder's records (``compute`` seconds a batch,
    the GIL released, as a GPU's) and writing them at a URL with a DatasetWriter (each shard published as it
    fills, while the next fills, or as before, before the next), and of the way without it: the job writes
    locally, then uploads."""
    opts, out = s3.storage_options(), {}
    with embfile.open(local_folder) as src:
        dim, dtype, n = src.dim, src.dtype.name, len(src)

        def job(writer, peak):
            with writer as w:
                for lo in range(0, n, batch):
                    time.sleep(compute)
                    w.add_batch(src.keys_between(lo, min(lo + batch, n)), src.take(np.arange(lo, min(lo + batch, n))))
                    peak[0] = max(peak[0], _kept(w._tx.folder))

        for kind in (
            "DatasetWriter at the URL",
            "DatasetWriter at the URL, each shard published before the next fills (before)",
            "DatasetWriter locally, then upload",
        ):
            peak, cache = [0], tempfile.mkdtemp(dir=scratch)
            url = f"s3://embs/job{round_}-{len(out)}"
            t0 = time.perf_counter()
            if "URL" in kind:
                w = embfile.DatasetWriter(
                    url, dim, dtype, shard_bytes=SHARD_BYTES, cache_dir=cache, storage_options=opts
                )
                w._in_background = "before" not in kind
                job(w, peak)
            else:
                local = os.path.join(scratch, f"job{round_}")
                job(embfile.DatasetWriter(local, dim, dtype, shard_bytes=SHARD_BYTES), peak)
                s3.filesystem().put(local, url[len("s3://") :], recursive=True)
                shutil.rmtree(local)
            out[kind] = (time.perf_counter() - t0, peak[0] / 2**20)
            shutil.rmtree(cache)
    return out


def limited_epochs(http, scratch, batch, dataset_bytes):
    """Seconds, MiB received and the cache's peak on disk of two streamed epochs, without a limit and under a
    quarter of the dataset."""
    url, out = f"{http.url}/ds", {}
    for kind, limit, windows in (
        ("no limit", None, {}),
        ("limit 1/4, default windows", dataset_bytes // 4, {}),
        ("limit 1/4, windows of 8 blocks", dataset_bytes // 4, {"buffer_blocks": 8}),
    ):
        cache = tempfile.mkdtemp(dir=scratch)
        with embfile.open(url, cache_dir=cache, cache_limit=limit) as db, _PeakOnDisk(cache) as peak:
            seconds = [timed_epoch(db, batch, epoch, **windows)[1] for epoch in (0, 1)]
            out[kind] = (*seconds, db.bytes_read / 2**20, peak.bytes / 2**20)
        shutil.rmtree(cache)
    return out


def lock_cost(http, scratch, keys, rounds=200):
    """Microseconds of ``get_batch`` of 256 keys whose pages are all in the cache, with the range locks that keep
    them from being freed during the call, without them (the module's switch, as on a system without them), and
    from the local folder."""
    from embfile.remote import cache as cache_module

    rng = np.random.default_rng(2)
    picks = [[keys[i] for i in rng.choice(len(keys), 256, replace=False).tolist()] for _ in range(rounds)]
    out = {"with": [], "without": [], "local": []}
    with (
        embfile.open(f"{http.url}/ds", cache_dir=tempfile.mkdtemp(dir=scratch)) as db,
        embfile.open(os.path.join(scratch, "ds")) as local,
    ):
        for batch in picks:
            db.get_batch(batch)  # every page fetched
        for _ in range(3):
            for kind, handle in (("with", db), ("without", db), ("local", local)):
                cache_module.RANGE_LOCKS = kind == "with"
                t0 = time.perf_counter()
                for batch in picks:
                    handle.get_batch(batch)
                out[kind].append((time.perf_counter() - t0) / rounds * 1e6)
        cache_module.RANGE_LOCKS = hasattr(cache_module.fcntl, "F_OFD_SETLK")
    return out


def torch_epochs(http, scratch, batch, dataset_bytes):
    """Seconds to the first batch and to the end, MiB the server sent and the cache's peak on disk, of one epoch
    through a real DataLoader over the folder at the URL, each on a fresh cache."""
    import torch

    import embfile.torch as et

    url, out = f"{http.url}/ds", {}
    for kind, workers, limit, windows in (
        ("map-style, BatchSampler", 0, None, {}),
        ("map-style, BatchSampler, 2 workers", 2, None, {}),
        (
            "map-style, BatchSampler, 2 workers, limit 1/4, windows of 8 blocks",
            2,
            dataset_bytes // 4,
            {"buffer_blocks": 8},
        ),
        ("map-style, whole download first (before)", 0, None, {}),
        ("IterableDataset", 0, None, {}),
        ("IterableDataset, 2 workers", 2, None, {}),
    ):
        cache = tempfile.mkdtemp(dir=scratch)
        since, first = len(http.gets()), None
        with embfile.open(url, cache_dir=cache, cache_limit=limit) as db, _PeakOnDisk(cache) as peak:
            t0 = time.perf_counter()
            if kind.startswith("IterableDataset"):
                data, sampler = et.IterableDataset(db, batch, seed=0, keys=False, **windows), None
            else:
                if "before" in kind:
                    db.download()
                data = et.Dataset(db)
                sampler = et.BatchSampler(data, batch, seed=0, **windows)
            for _ in torch.utils.data.DataLoader(data, batch_size=None, sampler=sampler, num_workers=workers):
                first = first or time.perf_counter() - t0
            seconds = time.perf_counter() - t0
        out[kind] = (first, seconds, http.sent(since) / 2**20, peak.bytes / 2**20)
        shutil.rmtree(cache)
    return out


class _PeakOnDisk:
    """The most bytes on disk under a folder while in the ``with`` block, sampled every 10 ms."""

    def __init__(self, folder):
        import threading

        self.folder, self.bytes, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(0.01):
            self.bytes = max(self.bytes, _kept(self.folder))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, _kept(self.folder))


def _commit(jobs, url, opts, cache, parts):
    """Tasks write and upload their parts (not timed apart: in an engine they run on the workers), the driver
    commits."""
    job = jobs.start_job(url, mode="append", storage_options=opts, cache_dir=cache)
    jobs.commit_job(job, [jobs.write_part(job, i, [part]) for i, part in enumerate(parts)])


def _kept(folder):
    """Bytes on disk under ``folder`` (a partial copy counts only the pages it holds; a download renamed or a
    file removed while it is counted, nothing)."""
    total = 0
    for d, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(d, f)).st_blocks * 512
    return total


def timed_epoch(db, batch, epoch, t0=None, **options):
    """Seconds from ``t0`` (default: now) to the first batch of one epoch, and to its end."""
    t0 = time.perf_counter() if t0 is None else t0
    first = None
    for _ in db.iter_batches(batch, seed=0, epoch=epoch, **options):
        first = first or time.perf_counter() - t0
    return first, time.perf_counter() - t0


def _cached(fs, path):
    with fs.open(path, "rb") as f:
        return f.name  # simplecache's local copy


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1024, help="float16 elements per vector (ProtT5: 1024)")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds added to every request")
    ap.add_argument("--lookups", type=int, default=40, help="keys looked up per kind and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compute-ms", type=float, default=30.0, help="ms a long job computes each batch of 1024 records")
    ap.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    ap.add_argument("--out", help="the result file (default benchmarks/results/remote.md; - for none)")
    args = ap.parse_args()
    with machine.recorded("remote", "Remote datasets: range-read lookups and cached epochs", args.out):
        run(args)


def run(args):
    scratch = tempfile.mkdtemp(prefix="bench-remote-", dir=args.dir)
    s3 = S3Server(args.latency, separate=True)  # its own process: the server does not share this one's GIL
    try:
        limits = machine.measure(scratch, nbytes=256 << 20)
        print("machine:", machine.describe(limits))
        keys = build(scratch, args.keys, args.dim)
        s3.bucket("embs")
        fs = s3.filesystem()
        fs.put(os.path.join(scratch, "one.emb"), "embs/one.emb")
        fs.put(os.path.join(scratch, "ds"), "embs/ds", recursive=True)
        size = os.path.getsize(os.path.join(scratch, "one.emb"))
        print(
            f"\n{args.keys:,} keys x {args.dim} float16 ({size / 2**20:.0f} MiB as one .emb; the folder in "
            f"{SHARD_BYTES >> 20} MiB shards), an S3 server on 127.0.0.1 with {args.latency * 1e3:.0f} ms added to "
            "every request\n"
        )
        print(
            f"S3 server's own limit: {server_rate(s3):.0f} requests/s with {args.latency * 1e3:.0f} ms each, 32 at "
            "once (a request-bound figure below is the server's, not the client's)\n"
        )
        rng = np.random.default_rng(1)
        rounds = [lookups(s3, keys, args.lookups, scratch, rng) for _ in range(args.rounds)]
        peers = [peer_first_lookup(s3, keys, scratch) for _ in range(args.rounds)]
        print(f"## Lookups ({args.rounds} rounds on a fresh cache, {args.lookups} keys per kind; median (range))\n")
        print(
            f"Opening the folder ({len(embfile.open(os.path.join(scratch, 'ds')).files)} shards, one key-index "
            f"segment): {rounds[0]['open']} requests (the manifest, then each file's header, 32 at once).\n"
        )
        print("| key | requests | KiB received | ms |")
        print("|---|---:|---:|---:|")
        for kind in ("cold", "index cached", "read before"):
            reqs = np.concatenate([r[kind][0] for r in rounds])
            kib = np.concatenate([r[kind][1] for r in rounds]) / 1024
            ms = [np.median(r[kind][2]) for r in rounds]
            print(
                f"| {kind} | {np.median(reqs):.0f} (max {reqs.max()}) | {np.median(kib):.0f} | {spread(ms, '{:.2f}')} |"
            )
        print(
            "\n(A key whose index pages are cached needs only its record, and often not even that: its "
            f"{args.dim * 2 // 1024} KiB record may share a 4 KiB page with its neighbour's, read just before.)\n"
        )
        print("| | requests | ms |\n|---|---:|---:|")
        b_reqs = [r["batch"][0] for r in rounds]
        b_ms = [r["batch"][1] for r in rounds]
        print(f"| get_batch of 256 cold keys | {spread(b_reqs, '{:.0f}')} | {spread(b_ms)} |")
        print(
            "\n(256 keys spread over the dataset: each record a range of its own, bound by the server's request rate"
            " above.)"
        )
        cold_ms = np.median([np.median(r["cold"][2]) for r in rounds])
        peer_s = peers
        print(
            "\nThe peer (fsspec simplecache, whole download then a local lookup): first lookup "
            f"{spread(peer_s, '{:.2f}')} s "
            f"({size / 2**20:.0f} MiB downloaded): embfile's cold lookup is "
            f"{np.median(peer_s) * 1e3 / cold_ms:.0f}x sooner.\n"
        )
        print(f"## Epochs over the folder ({args.rounds} rounds, batches of {args.batch}; seconds, median (range))\n")
        http = RangeServer(scratch, args.latency)
        res = [epochs(s3, http, os.path.join(scratch, "ds"), scratch, args.batch) for _ in range(args.rounds)]
        http.stop()
        local_epoch = np.median([r["local"][1] for r in res])
        print("| | first batch, s | epoch, s | epoch / local disk (cold) | MiB received |")
        print("|---|---:|---:|---:|---:|")
        for label, key in (
            ("embfile over s3://, epoch 1 (streamed)", "embfile"),
            ("embfile over s3://, rank 1 of 4 (its share, streamed)", "rank"),
            ("embfile over s3://, download first (before)", "download"),
            ("embfile over http://, epoch 1 (streamed)", "http"),
            ("embfile over http://, download first (before)", "http download"),
            ("peer: simplecache, then local", "peer"),
            ("local disk, page cache cold", "local"),
        ):
            first = [r[key][0] for r in res]
            total = [r[key][1] for r in res]
            ratio = np.median(total) / local_epoch
            mib = spread([r["received"][key] for r in res], "{:.0f}") if key in res[0]["received"] else ""
            print(f"| {label} | {spread(first, '{:.2f}')} | {spread(total, '{:.2f}')} | {ratio:.2f}x | {mib} |")
        print(
            "\nA streamed epoch fetches each window's 1 MiB checksum blocks (64 MiB windows, the next one while this "
            "one is read); a rank its share's windows. moto reads a whole object to answer a range of it, so the "
            f"1 MiB ranges of a streamed epoch cost it {SHARD_BYTES >> 20}x the bytes a download's whole-shard "
            "requests do: over s3:// here epoch 1 is bound by that server. The HTTP server (same latency) reads "
            "only the range asked for."
        )
        e2, l2 = [r["embfile epoch 2"] for r in res], [r["local epoch 2"] for r in res]
        print(
            f"\nEpoch 2: embfile over s3:// from the cache {spread(e2, '{:.3f}')} s, the local folder "
            f"{spread(l2, '{:.3f}')} s (both in the page cache): {np.median(e2) / np.median(l2):.2f}x."
        )
        dataset = _kept(os.path.join(scratch, "ds")) / 2**20
        print(
            f"\n## Growing at the URL ({args.rounds} rounds, each on a copy of the folder and a fresh cache; "
            "median (range))\n"
        )
        grown = [growing(s3, os.path.join(scratch, "ds"), keys, args.dim, scratch, r) for r in range(args.rounds)]
        print("| operation | s | MiB received | / the dataset |\n|---|---:|---:|---:|")
        for kind in grown[0]:
            seconds, mib = [g[kind][0] for g in grown], [g[kind][1] for g in grown]
            print(f"| {kind} | {spread(seconds, '{:.2f}')} | {spread(mib)} | {np.median(mib) / dataset:.1%} |")
        print(
            f"\nThe dataset is {dataset:.0f} MiB: what a download, edit and upload of the whole receives. An append "
            "receives the key index; a removal also each shard holding a removed key (10 keys spread over the "
            "dataset: 10 shards); the job's commit the key index and its shards' keys sections (its tasks write and "
            "upload their shards in this process here, on an engine's workers)."
        )
        print(f"\n## An engine's read task at the URL ({args.rounds} rounds on a fresh cache; median (range))\n")
        print(
            "| its rows | its file alone, range reads: s | MiB received | before: dataset opened, shard downloaded: s "
            "| MiB received |"
        )
        print("|---|---:|---:|---:|---:|")
        for share, label in ((8, "an eighth of a shard"), (1, "a whole shard")):
            tasks = [read_task(s3, scratch, share) for _ in range(args.rounds)]
            cells = []
            for kind in tasks[0]:
                seconds, mib = [t[kind][0] for t in tasks], [t[kind][1] for t in tasks]
                cells += [spread(seconds, "{:.2f}"), spread(mib)]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(
            "\nA task now opens the one file its rows are in (its header and index top) and receives the 1 MiB "
            "checksum blocks holding its rows and the file's keys section, each checked. Before, it opened the whole "
            "dataset (every file's header and index top: a cost growing with the files, in every task) and "
            "downloaded its whole shard (into the worker's cache, where a later task on the same worker found it; "
            "on a cluster, a shard's slices run on many workers)."
        )
        print(
            f"\n## A long job writing at the URL ({args.rounds} rounds, the folder's records in batches of 1024, "
            f"each computed in {args.compute_ms:.0f} ms, {SHARD_BYTES >> 20} MiB shards; median (range))\n"
        )
        jobs_ = [
            long_job(s3, os.path.join(scratch, "ds"), scratch, r, args.compute_ms / 1e3) for r in range(args.rounds)
        ]
        computing = args.compute_ms / 1e3 * -(-args.keys // 1024)
        print("| | s | / computing alone | local disk at its peak, MiB | what a crash loses |")
        print("|---|---:|---:|---:|---|")
        for kind, loses in zip(
            jobs_[0], ("two shards at most", "the shard in progress", "everything not uploaded: all of it")
        ):
            seconds, mib = [j[kind][0] for j in jobs_], [j[kind][1] for j in jobs_]
            print(
                f"| {kind} | {spread(seconds, '{:.2f}')} | {np.median(seconds) / computing:.2f}x | "
                f"{spread(mib, '{:.0f}')} | {loses} |"
            )
        print(
            f"\nComputing the records alone takes {computing:.2f} s. A DatasetWriter at a URL publishes each shard as "
            "a version as it fills (the shard, then the manifest, then LATEST), on a thread while the next shard "
            "fills, and removes its local file: the local disk holds the key index, the shard in progress and the "
            "one being published, and a machine that vanishes loses those two; the job resumes elsewhere with "
            "resume=True. Before, the job stopped computing while each shard was published."
        )
        print(
            f"\n## An epoch larger than the cache's limit (the folder over http://, {args.rounds} rounds, a fresh "
            "cache each; median (range))\n"
        )
        http = RangeServer(scratch, args.latency)
        limited = [limited_epochs(http, scratch, args.batch, int(dataset * 2**20)) for _ in range(args.rounds)]
        table(["epoch 1, s", "epoch 2, s", "MiB received (2 epochs)", "cache on disk at its peak, MiB"], limited)
        print(
            f"\nThe folder is {dataset:.0f} MiB; the limit {dataset / 4:.0f} MiB. Under it, each window read is given "
            "back (a hole punched in the partial copy) once no reader holds it, so the disk holds the limit's worth "
            "plus the window being read and the one being fetched, and epoch 2 fetches again what was given back. "
            "The default window is 64 blocks of 1 MiB; `buffer_blocks=8` makes it 8 MiB."
        )
        locks = lock_cost(http, scratch, keys)
        on, off = np.median(locks["with"]), np.median(locks["without"])
        print(
            "\nWhat the range locks cost a lookup: get_batch of 256 keys in the cache "
            f"{spread(locks['with'], '{:.0f}')} us with them, {spread(locks['without'], '{:.0f}')} us without "
            f"({on / off:.2f}x), {spread(locks['local'], '{:.0f}')} us from the local folder (3 interleaved rounds "
            "of 200 calls)."
        )
        print(
            f"\n## Feeding PyTorch at the URL (the folder over http://, one epoch through a DataLoader, batches of "
            f"{args.batch}, {args.rounds} rounds, a fresh cache each; median (range))\n"
        )
        try:
            fed = [torch_epochs(http, scratch, args.batch, int(dataset * 2**20)) for _ in range(args.rounds)]
        except ImportError:
            print("torch is not installed: skipped")
            fed = []
        if fed:
            table(["first batch, s", "epoch, s", "MiB sent by the server", "cache on disk at its peak, MiB"], fed)
            print(
                "\nThe map-style Dataset with embfile's BatchSampler streams as the IterableDataset does: the next "
                "window is fetched on a thread, a batch fetches what is not there yet, each under its windows' locks "
                "(so two workers fetch each window once), every block checked; each process holds its windows until "
                "its batches are two windows on, then lets go (under a limit, the last to let go gives it back). "
                "Before, its first batch downloaded the folder whole."
            )
        http.stop()
    finally:
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
