"""Load: many processes with threads read one file at once, and it is replaced under them.

Eight spawned processes (three threads each: lookups, gathers and ``take`` in
two, shuffled epochs in one) check every vector they read against the content
they can recompute.  Meanwhile the file is replaced twice by ``embfile.write``
(atomically): handles opened before keep serving the old file, reopening gets
the new one.  Bounded in time: 8 s of reading here, 120 s in the long run.
"""
import multiprocessing
import time

import embfile
from conftest import LONG
from workers import content, stress_reader

PROCESSES = 8
SECONDS = 120 if LONG else 8
N, DIM = 30_000, 64


def test_many_readers_and_an_atomic_replace(tmp_path):
    path = str(tmp_path / "db.emb")
    embfile.write(path, content(N, DIM, 1), metadata={"generation": 1})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(PROCESSES) as pool:
        started = time.time()
        results = [pool.apply_async(stress_reader, (path, SECONDS, seed)) for seed in range(PROCESSES)]
        time.sleep(SECONDS / 3 + 2)  # the workers take a moment to start
        replaced = time.time()
        embfile.write(path, content(N, DIM, 2), metadata={"generation": 2})
        time.sleep(SECONDS / 3)
        embfile.write(path, content(N, DIM, 3), metadata={"generation": 3})
        reports = [r.get(timeout=SECONDS + 120) for r in results]
    errors = [e for r in reports for e in r["errors"]]
    assert not errors, errors
    records = sum(r["records"] for r in reports)
    print(f"\n{PROCESSES} processes checked {records:,} records in {time.time() - started:.0f} s")
    for r in reports:
        assert r["records"] > 0
        assert r["reads"]["1"] > replaced, "a handle opened before the replace stopped serving the old file"
        assert set(r["reads"]) >= {"1", "3"}, f"reopening did not find the new file: {r['reads']}"
