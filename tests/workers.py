"""The processes the reliability tests start: a writer to kill, a reader to stress.

``python workers.py MODE DST N DIM GENERATION`` writes (tests/test_crashes.py
kills it): MODE ``write`` streams records through ``embfile.Writer``,
``shards`` through ``embfile.ShardWriter`` into a new folder, ``overwrite`` as the
next version of a dataset; ``append`` adds the generation to a dataset, ``remove``
removes every other key of the generation from it, ``compact`` compacts it, and
``job`` writes the generation with a resumed ``embfile.DatasetWriter``, skipping
the keys it holds; ``ragged`` and ``ragged-shards`` write per-residue records (1 to 8
rows of DIM each) through a ragged ``Writer`` and ``ShardWriter``.  :func:`stress_reader` runs in the
processes of tests/test_stress.py.  Content is a function of (N, DIM,
GENERATION), so a reader can check every byte without being sent the data.
"""

import os
import sys
import threading
import time

import numpy as np

import embfile


def content(n, dim, generation):
    keys = [f"g{generation}-seq{i:08d}" for i in range(n)]
    return keys, np.random.default_rng(generation).random((n, dim), dtype=np.float32)


def ragged_content(n, dim, generation):
    """Keys, their rows one record after another, and each record's row count."""
    keys, _ = content(n, dim, generation)
    lengths = 1 + np.arange(n) % 8
    return keys, np.random.default_rng(generation).random((int(lengths.sum()), dim), dtype=np.float32), lengths


def main(mode, dst, n, dim, generation):
    if mode.startswith("ragged"):
        keys, rows, lengths = ragged_content(n, dim, generation)
        meta, step = {"generation": generation}, 2000
        if mode == "ragged":
            w = embfile.Writer(dst, dim, "float32", meta, ragged=True)
        else:
            w = embfile.ShardWriter(dst, dim, "float32", meta, shard_bytes=len(rows) * dim, ragged=True)
        ends = np.concatenate([[0], np.cumsum(lengths)])
        with w:
            for lo in range(0, n, step):
                hi = min(lo + step, n)
                w.add_batch(keys[lo:hi], rows[ends[lo] : ends[hi]], lengths[lo:hi])
        return None
    keys, matrix = content(n, dim, generation)
    meta = {"generation": generation}
    if mode == "append":
        return embfile.append(dst, (keys, matrix), shard_bytes=n * dim)
    if mode == "remove":
        return embfile.remove(dst, keys[::2])
    if mode == "compact":
        return embfile.compact(dst)
    if mode == "job":
        with embfile.DatasetWriter(dst, dim, "float32", meta, shard_bytes=n * dim // 2, resume=True) as w:
            done = w.done_keys()
            for key, vector in zip(keys, matrix):
                if key not in done:
                    w.add(key, vector)
        return None
    if mode == "write":
        w = embfile.Writer(dst, dim, "float32", meta)
    else:  # "shards" (a new folder) or "overwrite" (the next version of a dataset)
        mode = "overwrite" if mode == "overwrite" else "error"
        w = embfile.ShardWriter(dst, dim, "float32", meta, shard_bytes=n * dim, mode=mode)  # four shards
    with w:
        for lo in range(0, n, 2000):
            w.add_batch(keys[lo : lo + 2000], matrix[lo : lo + 2000])


def stress_reader(path, signals, seed, deadline=600):
    """Read ``path`` from three threads (two doing lookups, gathers and ``take``, one
    shuffled epochs), checking every vector against the content of the generation the
    open handle shows, until the file ``signals/stop`` appears.  ``signals/ready-SEED``
    appears once every thread has checked a read.  The lookup threads reopen the path
    now and then, and once more at the stop (and so see a replacement); the epoch thread
    keeps its first handle throughout (and so must go on seeing the old file).  Returns
    what was checked."""
    give_up = time.monotonic() + deadline  # the test has died: do not outlive it
    stopped = lambda: os.path.exists(os.path.join(signals, "stop")) or time.monotonic() > give_up
    truth_cache, report, lock = {}, {"records": 0, "reads": {}, "errors": []}, threading.Lock()
    started = []

    def truth(db):
        meta = db.metadata
        key = (meta["generation"], len(db), db.dim)
        if key not in truth_cache:
            truth_cache[key] = content(len(db), db.dim, meta["generation"])
        return meta["generation"], *truth_cache[key]

    def checked(generation, records, first):
        with lock:
            report["records"] += records
            report["reads"][str(generation)] = time.time()  # the last read of each generation
            if first:
                started.append(1)
                if len(started) == 3:
                    open(os.path.join(signals, f"ready-{seed}"), "w").close()

    def lookups(rng):
        db = embfile.open(path)
        for step in range(1 << 62):
            last = stopped()
            if last or step % 50 == 49:
                db = embfile.open(path)
            generation, keys, m = truth(db)
            rows = rng.integers(len(keys), size=64)
            for r in rows[:8]:
                assert np.array_equal(db[keys[r]], m[r]), (generation, keys[r])
            assert np.array_equal(db.get_batch([keys[r] for r in rows]), m[rows]), generation
            assert np.array_equal(db.take(rows), m[rows]), generation
            checked(generation, 136, step == 0)
            if last:
                return

    def epochs(rng):
        db = embfile.open(path)
        generation, keys, m = truth(db)
        row_of = {k: i for i, k in enumerate(keys)}
        first = True
        for epoch in range(1 << 62):
            seen = np.zeros(len(keys), np.int64)
            for batch_keys, batch in db.iter_batches(256, seed=seed, epoch=epoch):
                rows = [row_of[k] for k in batch_keys]
                assert np.array_equal(batch, m[rows]), (generation, epoch)
                seen[rows] += 1
                checked(generation, len(rows), first)
                first = False
                if stopped():
                    return
            assert (seen == 1).all(), f"epoch {epoch} did not give every record once"

    def guard(run, rng):
        try:
            run(rng)
        except Exception as e:  # reported to the test, which fails on it
            report["errors"].append(f"{run.__name__}: {type(e).__name__}: {e}")

    threads = [
        threading.Thread(target=guard, args=(run, np.random.default_rng([seed, i])))
        for i, run in enumerate([lookups, lookups, epochs])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
