"""A writer for tests/test_crashes.py to kill: ``python kill_target.py MODE DST N DIM GENERATION``.

MODE ``write`` streams records through ``embfile.Writer``; ``shards`` through
``embfile.ShardWriter``.  The content is a function of (N, DIM, GENERATION), so
the test can check a finished file without being told what was written.
"""
import sys

import numpy as np

import embfile


def content(n, dim, generation):
    keys = [f"g{generation}-seq{i:08d}" for i in range(n)]
    return keys, np.random.default_rng(generation).random((n, dim), dtype=np.float32)


def main(mode, dst, n, dim, generation):
    keys, matrix = content(n, dim, generation)
    meta = {"generation": generation}
    if mode == "write":
        w = embfile.Writer(dst, dim, "float32", meta)
    else:
        w = embfile.ShardWriter(dst, dim, "float32", meta, shard_bytes=n * dim)  # four shards
    with w:
        for lo in range(0, n, 2000):
            w.add_batch(keys[lo:lo + 2000], matrix[lo:lo + 2000])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
