"""Load: many processes with threads read one file at once, and it is replaced under them.

Eight spawned processes (three threads each: lookups, gathers and ``take`` in
two, shuffled epochs in one) check every vector they read against the content
they can recompute.  Once all of them read, the file is replaced twice by
``embfile.write`` (atomically): handles opened before keep serving the old file,
reopening gets the new one.  8 s of reading here, 120 s in the long run; the
steps wait on the workers' signals, not on guesses of how long a start takes.
"""

import multiprocessing
import os
import time

from conftest import LONG
from workers import content, stress_reader

import embfile

PROCESSES = 8
SECONDS = 120 if LONG else 8
N, DIM = 30_000, 64


def test_many_readers_and_an_atomic_replace(tmp_path):
    path, signals = str(tmp_path / "db.emb"), tmp_path / "signals"
    signals.mkdir()
    embfile.write(path, content(N, DIM, 1), metadata={"generation": 1})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        started = time.time()
        results = [pool.apply_async(stress_reader, (path, str(signals), seed)) for seed in range(PROCESSES)]
        # every worker reads generation 1 (one that ends early has failed: its report says why)
        while len(os.listdir(signals)) < PROCESSES and time.time() - started < 300:
            if any(r.ready() for r in results):
                break
            time.sleep(0.1)
        all_reading = len(os.listdir(signals)) == PROCESSES
        if all_reading:
            for generation in (2, 3):
                time.sleep(SECONDS / 3)
                embfile.write(path, content(N, DIM, generation), metadata={"generation": generation})
            replaced = time.time()
            time.sleep(SECONDS / 3)
        (signals / "stop").touch()
        reports = [r.get(timeout=300) for r in results]
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors
    assert all_reading, "the workers did not start reading"
    records = sum(r["records"] for r in reports)
    print(f"\n{PROCESSES} processes checked {records:,} records in {time.time() - started:.0f} s")
    for r in reports:
        assert r["reads"]["1"] > replaced, "a handle opened before the replaces stopped serving the old file"
        assert set(r["reads"]) >= {"1", "3"}, f"reopening did not find the new file: {r['reads']}"
