"""A small end-to-end run: the pickled dict our users have -> db.emb -> lookups, batches, verify, info.

python examples/demo.py [folder]
"""

import os
import pickle
import sys
import tempfile
import time

import numpy as np

import embfile
from embfile import cli


def main(folder):
    # What users have today: a pickled {seqid: vector} from ESM-2 (1280-d), here 2,000 of them.
    rng = np.random.default_rng(0)
    data = {f"sp|P{i:05d}|PROT_HUMAN": rng.random(1280, dtype=np.float32) for i in range(2000)}
    pkl = os.path.join(folder, "embeddings.pkl")
    with open(pkl, "wb") as f:
        pickle.dump(data, f)

    # Convert: streaming, atomic.  Loading a pickle runs code, so embfile asks you to say you trust it.
    # (The same from a shell: embfile convert embeddings.pkl db.emb --trust-pickle)
    db_path = os.path.join(folder, "db.emb")
    t0 = time.perf_counter()
    embfile.convert(
        pkl, db_path, trust_pickle=True, metadata={"model": "esm2_t33_650M_UR50D", "layer": 33, "pooling": "mean"}
    )
    print(f"converted {pkl} -> {db_path}: {os.path.getsize(db_path) / 1e6:.1f} MB in {time.perf_counter() - t0:.3f} s")

    t0 = time.perf_counter()
    db = embfile.open(db_path)
    print(f"opened in {(time.perf_counter() - t0) * 1e3:.2f} ms: {db}")
    key = "sp|P01234|PROT_HUMAN"
    v = db[key]
    print(f"db[{key!r}] -> shape {v.shape}, {v.dtype}, first values {np.round(v[:3], 4)}")
    assert np.array_equal(v, data[key])
    batch = db.get_batch(["sp|P00007|PROT_HUMAN", key, "sp|P01999|PROT_HUMAN"])
    print(f"get_batch of 3 keys -> {batch.shape}")
    print(f"'sp|P99999|NOPE' in db -> {'sp|P99999|NOPE' in db}")
    print(f"metadata: model={db.metadata['model']}, count={db.metadata['embfile']['count']}")
    db.verify()
    print("verify: every checksum holds")
    db.close()
    print(f"\n$ embfile info {db_path}")
    cli.main(["info", db_path])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
