"""Exact nearest-neighbour search against a numpy oracle: every metric and dtype, k past n, empty files, NaN,
zero vectors, ties, exclusion, sharded datasets, search by stored key, packed bits by Hamming distance, and the
command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import embfile
from embfile import search as search_module


def oracle(matrix, queries, k, metric, skip=()):
    """Scores and rows by brute force in float64: best first, equal scores in row order, NaN last."""
    x = matrix.astype(np.float64)
    q = np.atleast_2d(queries).astype(np.float64)
    if metric == "ip":
        s = q @ x.T
    elif metric == "cosine":
        xn, qn = np.linalg.norm(x, axis=1), np.linalg.norm(q, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (q @ x.T) / qn[:, None] / xn[None, :]
        s[:, xn == 0] = 0
    else:
        s = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
    sign = 1 if metric == "l2" else -1
    out_s, out_r = [], []
    for row in s:
        key = np.where(np.isnan(row), np.inf, sign * row)
        order = [r for r in np.lexsort((np.arange(len(row)), key)) if r not in skip][:k]
        out_s.append(row[order])
        out_r.append(order)
    return np.array(out_s), np.array(out_r)


def check(db, matrix, keys, queries, k, metric, exclude=()):
    scores, got = db.search(queries, k=k, metric=metric, exclude=[keys[r] for r in exclude])
    want_scores, want_rows = oracle(matrix, queries, k, metric, skip=set(exclude))
    scores, got = np.atleast_2d(scores), np.atleast_2d(got)
    tol = 1e-2 if matrix.dtype == np.float16 else 1e-4
    np.testing.assert_allclose(scores, want_scores, rtol=tol, atol=tol)
    for qi in range(len(got)):  # keys: the oracle's, except where scores tie within rounding
        for j, key in enumerate(got[qi]):
            want = keys[want_rows[qi][j]]
            if key != want:
                assert (
                    abs(scores[qi][j] - want_scores[qi][j]) <= tol
                    and np.isclose(want_scores[qi], scores[qi][j], rtol=tol, atol=tol).sum() > 1
                ), (metric, qi, j, key, want)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int8", "uint8", "uint16"])
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_every_metric_and_dtype_against_numpy(tmp_path, dtype, metric, monkeypatch):
    for blocks in ("BLOCK_BYTES", "KERNEL_BLOCK_BYTES"):  # many blocks: the running top-k is merged often
        monkeypatch.setattr(search_module, blocks, 4096)
    rng = np.random.default_rng(len(dtype) + len(metric))
    n, dim = 700, 12
    if np.dtype(dtype).kind == "f":
        matrix = rng.standard_normal((n, dim)).astype(dtype)
    else:
        matrix = rng.integers(0, 50, (n, dim)).astype(dtype)
    keys = [f"p{i}" for i in range(n)]
    embfile.write(tmp_path / "db.emb", (keys, matrix))
    queries = rng.standard_normal((5, dim)).astype(np.float32)
    with embfile.open(tmp_path / "db.emb") as db:
        check(db, matrix, keys, queries, 10, metric)
        check(db, matrix, keys, queries[0], 3, metric)  # one query: (k,) results
        check(db, matrix, keys, queries, 10, metric, exclude=[5, 17, 699])
        scores, got = db.search(queries[0], k=3, metric=metric)
        assert scores.shape == (3,) and got.shape == (3,)


def test_k_past_n_empty_files_nan_zero_vectors_and_ties(tmp_path):
    matrix = np.array([[1, 0], [0, 0], [np.nan, 1], [1, 0], [2, 0]], np.float32)  # rows 0 and 3 tie
    keys = ["a", "zero", "nan", "a-again", "b"]
    embfile.write(tmp_path / "db.emb", (keys, matrix))
    with embfile.open(tmp_path / "db.emb") as db:
        scores, got = db.search([1, 0], k=10, metric="cosine")
        assert got.tolist() == ["a", "a-again", "b", "zero", "nan"]  # ties by row; zero scores 0; NaN last
        assert scores[:4].tolist() == [1, 1, 1, 0] and np.isnan(scores[4])
        scores, got = db.search([1, 0], k=2, metric="l2")
        assert got.tolist() == ["a", "a-again"] and scores.tolist() == [0, 0]
        _, got = db.search_keys(["a"], k=1, metric="l2")
        assert got.tolist() == [["a-again"]]  # itself left out by identity, its twin found
        _, got = db.search_keys(["a"], k=2, metric="l2", exclude_self=False)
        assert got.tolist() == [["a", "a-again"]]
        _, got = db.search([[1, 0], [2, 0]], k=1, metric="l2", query_keys=["a", "not-stored"])  # by identity too
        assert got.tolist() == [["a-again"], ["b"]]
        with pytest.raises(ValueError, match="1 query_keys for 2 queries: one key each"):
            db.search([[1, 0], [2, 0]], query_keys=["a"])
        with pytest.raises(ValueError, match="metric must be one of"):
            db.search([1, 0], metric="dot")
        for metric in ("cosine", "l2"):  # a NaN query scores every record alike: no answer, not the first rows
            with pytest.raises(ValueError, match=r"query 1 holds NaN or infinity \(2 of 3 queries do\)"):
                db.search([[1, 0], [np.nan, 0], [np.inf, 1]], metric=metric)
            with pytest.raises(ValueError, match=r"key 'nan' holds NaN or infinity"):
                db.search_keys(["a", "nan"], metric=metric)
        with pytest.raises(ValueError, match=r"query 0 holds values beyond float32, which the search computes in"):
            db.search(np.array([1e300, 0]))  # finite, but not as the float32 the search computes in
        with pytest.raises(ValueError, match=r"queries are vectors; search_keys\(\) searches by stored keys"):
            db.search("a")
        with pytest.raises(ValueError, match=r"queries must be numbers of shape \(2,\) or \(Q, 2\)"):
            db.search([1, 0, 0])
        for scores, got in (db.search(np.zeros((0, 2)), k=3), db.search_keys([], k=3)):  # no queries
            assert scores.shape == got.shape == (0, 3) and scores.dtype == np.float32
    embfile.write(tmp_path / "empty.emb", ([], np.zeros((0, 2), np.float32)))
    with embfile.open(tmp_path / "empty.emb") as db:
        scores, got = db.search([[1, 0], [0, 1]], k=5)
        assert scores.shape == (2, 0) and got.shape == (2, 0)


def test_sharded_and_versioned_datasets(tmp_path):
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((500, 8)).astype(np.float32)
    keys = [f"s{i}" for i in range(500)]
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=60 * 32)
    embfile.remove(tmp_path / "ds", keys[:100])
    with embfile.open(tmp_path / "ds") as db:
        assert len(db.files) > 5
        check(db, matrix[100:], keys[100:], rng.standard_normal((4, 8)), 7, "cosine")
        check(db, matrix[100:], keys[100:], rng.standard_normal((4, 8)), 7, "l2")


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip", "hamming"])
def test_search_among_some_keys(tmp_path, metric, monkeypatch):
    """``among=``: only those records scored (the annotated proteins of a lookup set), gathered a block at a
    time or, as many as here, kept out of a scan of all; with exclusion, by key and from the shell; a key not
    stored is an error naming it."""
    monkeypatch.setattr(search_module, "BLOCK_BYTES", 600)  # several gathered blocks
    monkeypatch.setattr(search_module, "KERNEL_BLOCK_BYTES", 600)  # several scanned ones
    rng = np.random.default_rng(4)
    n = 400
    matrix = np.packbits(rng.random((n, 64)) > 0.5, axis=1) if metric == "hamming" else rng.standard_normal((n, 12))
    matrix = matrix if metric == "hamming" else matrix.astype(np.float32)
    keys = [f"p{i}" for i in range(n)]
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=matrix[0].nbytes * 90)
    among = sorted(rng.choice(n, 150, replace=False).tolist(), key=lambda r: -r)  # any order
    queries = matrix[[3, 77]] if metric == "hamming" else rng.standard_normal((2, 12)).astype(np.float32)
    if metric == "hamming":
        want_scores, want_rows = hamming_oracle(matrix[sorted(among)], queries, 8, skip={len(among) - 1})
    else:
        want_scores, want_rows = oracle(matrix[sorted(among)], queries, 8, metric, skip={len(among) - 1})
    with embfile.open(tmp_path / "ds") as db:
        assert len(db.files) > 3
        for share in (1, 32):  # 150 of 400 gathered, or kept out of the scan
            monkeypatch.setattr(search_module, "GATHER_SHARE", share)
            among_keys, exclude = [keys[r] for r in among], [keys[among[0]]]  # (among[0]: the last of them in rows)
            scores, got = db.search(queries, k=8, metric=metric, among=among_keys, exclude=exclude)
            np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
            assert got.tolist() == [[keys[sorted(among)[r]] for r in rows] for rows in want_rows]
        if metric == "cosine":
            _, got = db.search_keys([keys[among[5]]], k=3, among=[keys[r] for r in among])
            assert keys[among[5]] not in got[0] and {int(k[1:]) for k in got[0]} <= set(among)
            scores, got = db.search(queries[0], k=5, among=[keys[0]])  # fewer than k
            assert got.tolist() == [keys[0]] and scores.shape == (1,)
            with pytest.raises(embfile.KeyNotFoundError, match="nope"):
                db.search(queries[0], among=["nope"])
            (tmp_path / "among.txt").write_text("".join(keys[r] + "\n" for r in among))
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "embfile",
                    "search",
                    tmp_path / "ds",
                    "--key",
                    keys[1],
                    "-k",
                    "2",
                    "--among",
                    tmp_path / "among.txt",
                    "--format",
                    "json",
                ],
                capture_output=True,
                text=True,
            )
            want = db.search_keys([keys[1]], k=2, among=[keys[r] for r in among])[1][0].tolist()
            assert [hit["key"] for hit in json.loads(out.stdout)[keys[1]]] == want, out.stderr


def hamming_oracle(bits, queries, k, skip=()):
    """Bits that differ, smallest first, equal distances in row order."""
    d = np.stack([np.bitwise_count(bits.view(np.uint8) ^ q).sum(axis=1) for q in np.atleast_2d(queries).view(np.uint8)])
    rows = [[r for r in np.lexsort((np.arange(len(row)), row)) if r not in skip][:k] for row in d]
    return np.take_along_axis(d, np.array(rows), axis=1), np.array(rows)


def test_hamming_search_of_packed_bits_against_numpy(tmp_path, monkeypatch):
    """Binary quantization's records (``np.packbits(x > 0)``: sentence-transformers' ``ubinary``, and its
    ``binary``, the same bits as int8) searched by the bits that differ, in one file and a sharded dataset."""
    for blocks in ("BLOCK_BYTES", "KERNEL_BLOCK_BYTES"):
        monkeypatch.setattr(search_module, blocks, 1000)
    rng = np.random.default_rng(9)
    floats = rng.standard_normal((700, 100))
    ubinary = np.packbits(floats > 0, axis=1)  # 13 bytes a record: a popcount of 8 bytes and a tail
    ubinary[[40, 41, 3]] = ubinary[5]  # ties, in row order
    binary = (ubinary.astype(np.int16) - 128).astype(np.int8)
    keys = [f"d{i}" for i in range(700)]
    embfile.write(tmp_path / "ubinary.emb", (keys, ubinary))
    embfile.write(tmp_path / "binary.emb", (keys, binary))
    embfile.write_shards(tmp_path / "ds", (keys, ubinary), shard_bytes=13 * 90)
    queries = ubinary[[5, 0, 699]] ^ rng.integers(0, 256, (3, 13), dtype=np.uint8) & 0x11  # near 5, 0 and 699
    for path, q in (("ubinary.emb", queries), ("binary.emb", (queries.astype(np.int16) - 128).astype(np.int8))):
        with embfile.open(tmp_path / path) as db:
            for k, skip in ((10, ()), (3, (3, 5)), (800, ())):
                scores, got = db.search(q, k=k, metric="hamming", exclude=[keys[r] for r in skip])
                want_scores, want_rows = hamming_oracle(ubinary, queries, k, skip)
                np.testing.assert_array_equal(scores, want_scores)
                assert got.tolist() == [[keys[r] for r in rows] for rows in want_rows]
            scores, got = db.search_keys(["d5"], k=3, metric="hamming")  # itself left out, its copies first
            assert got.tolist() == [["d3", "d40", "d41"]] and scores.tolist() == [[0, 0, 0]]
    with embfile.open(tmp_path / "ds") as db:
        assert len(db.files) > 5
        scores, got = db.search(queries, k=10, metric="hamming")
        np.testing.assert_array_equal(scores, hamming_oracle(ubinary, queries, 10)[0])
        with pytest.raises(ValueError, match=r"queries are packed bits \(np.packbits\) of uint8, as stored; not float"):
            db.search(queries.astype(np.float32), metric="hamming")
        with pytest.raises(ValueError, match="these hold values beyond uint8"):
            db.search(queries.astype(np.int64) + 200, metric="hamming")
    embfile.write(tmp_path / "floats.emb", (keys, floats.astype(np.float32)))
    with embfile.open(tmp_path / "floats.emb") as db, pytest.raises(ValueError, match="records of uint8 or int8"):
        db.search(floats[0], metric="hamming")
    hits = subprocess.run(
        [
            sys.executable,
            "-m",
            "embfile",
            "search",
            tmp_path / "ubinary.emb",
            "--key",
            "d5",
            "-k",
            "3",
            "--metric",
            "hamming",
        ],
        capture_output=True,
        text=True,
    )
    assert hits.stdout.split() == ["d5", "d3", "0", "d5", "d40", "0", "d5", "d41", "0"], hits.stderr


POOLED = {
    "mean": lambda r: r.astype(np.float64).mean(axis=0),
    "max": lambda r: r.max(axis=0),
    "first": lambda r: r[0],
    "last": lambda r: r[-1],
}


@pytest.mark.parametrize("how", list(POOLED))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ragged_records_are_searched_by_their_pooled_vectors(tmp_path, how, dtype, monkeypatch):
    for blocks in ("BLOCK_BYTES", "KERNEL_BLOCK_BYTES"):  # pooled a few records at a time
        monkeypatch.setattr(search_module, blocks, 4096)
    rng = np.random.default_rng(len(how))
    keys = [f"P{i:04d}" for i in range(300)]
    records = {k: rng.standard_normal((int(rng.integers(1, 40)), 12)).astype(dtype) for k in keys}
    embfile.write_shards(tmp_path / "ds", records, ragged=True, shard_bytes=100 * 12 * 4)  # sharded and versioned
    embfile.remove(tmp_path / "ds", keys[:10])
    keys = keys[10:]
    pooled = np.array([POOLED[how](records[k]) for k in keys]).astype(np.float32)
    queries = rng.standard_normal((20, 12)).astype(np.float32)
    with embfile.open(tmp_path / "ds") as db:
        assert db.ragged and len(db.files) > 3
        for metric in ("cosine", "ip", "l2"):
            for q in (queries[:3], queries[0], queries):  # the kernel, one query, BLAS
                scores, got = db.search(q, k=7, metric=metric, pool=how, exclude=[keys[4]])
                want_scores, want_rows = oracle(pooled, q, 7, metric, skip={4})
                np.testing.assert_allclose(np.atleast_2d(scores), want_scores, rtol=1e-4, atol=1e-4)
                assert (np.atleast_2d(got) == np.array(keys)[want_rows]).all()
        scores, got = db.search_keys(keys[:2], k=3, metric="l2", pool=how)  # queries: their own pooled vectors
        want_scores, want_rows = oracle(pooled, pooled[:2], 4, "l2")
        assert (got == np.array(keys)[want_rows[:, 1:]]).all()
        np.testing.assert_allclose(scores, want_scores[:, 1:], rtol=1e-4, atol=1e-4)
        with pytest.raises(TypeError, match=r"search\(\) compares one vector per record: pass pool='mean'"):
            db.search(queries[0])
        with pytest.raises(ValueError, match="pool must be one of"):
            db.search(queries[0], pool="median")
    embfile.write(tmp_path / "fixed.emb", (keys, pooled))
    with embfile.open(tmp_path / "fixed.emb") as db, pytest.raises(ValueError, match="one vector per key; pool="):
        db.search(queries[0], pool=how)


def test_search_from_the_command_line(tmp_path):
    matrix = np.eye(4, dtype=np.float32)
    embfile.write(tmp_path / "db.emb", (["w", "x", "y", "z"], matrix))
    np.save(tmp_path / "q.npy", matrix[[2]])
    run = [sys.executable, "-m", "embfile", "search", tmp_path / "db.emb"]
    out = subprocess.run([*run, "--key", "x", "-k", "2", "--format", "json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [hit["key"] for hit in got["x"]] == ["w", "y"]  # itself left out; the other three tie, by row
    out = subprocess.run(
        [*run, "--queries", tmp_path / "q.npy", "-k", "1", "--metric", "l2"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.split() == ["0", "y", "0"]
    (tmp_path / "q.txt").write_text("0 0 1 0\n")
    np.save(tmp_path / "o.npy", np.array([None] * 4), allow_pickle=True)
    for wrong, says in (
        (["--key", "nope"], "'nope'"),
        (["--queries", tmp_path / "q.txt"], "q.txt is neither a .npy array (save the queries with numpy.save) nor"),
        (["--queries", tmp_path / "o.npy"], "o.npy: Object arrays"),
        (["--key", "x", "--pool", "mean"], "--pool is for per-residue"),
    ):
        out = subprocess.run([*run, *wrong], capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and says in out.stderr, out.stderr
    residues = {"w": np.eye(4)[[0, 0, 1]], "x": np.eye(4)[[1, 1, 1]], "y": np.eye(4)[[0, 1, 1]]}
    embfile.write(tmp_path / "r.emb", residues, ragged=True)
    run[-1] = tmp_path / "r.emb"
    out = subprocess.run([*run, "--key", "x", "-k", "1", "--pool", "mean"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[:2] == ["x", "y"], out.stderr
    out = subprocess.run([*run, "--key", "x"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "pass --pool mean" in out.stderr
    # queries from any file convert reads, named by their keys (they were only an .npy's numbered rows)
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "new.h5", "w") as f:
        f["new_x"] = [0.1, 0.9, 0.1, 0]
        f["new_z"] = [0, 0, 0.1, 0.9]
    run[-1] = tmp_path / "db.emb"
    out = subprocess.run(
        [*run, "--queries", tmp_path / "new.h5", "-k", "1", "--format", "tsv"], capture_output=True, text=True
    )
    assert out.stdout.splitlines()[1:] == [
        "new_x\tx\t0.987878",
        "new_z\tz\t0.993884",
    ]  # 0.9 / sqrt(0.83), 0.9 / sqrt(0.82), out.stderr
    out = subprocess.run(
        [*run, "--queries", tmp_path / "r.emb", "-k", "1", "--pool", "max"], capture_output=True, text=True
    )
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [["w", "w"], ["x", "x"], ["y", "w"]], out.stderr
    out = subprocess.run(
        [*run, "--queries", tmp_path / "db.emb", "-k", "1", "--exclude-self"], capture_output=True, text=True
    )
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [["w", "x"], ["x", "w"], ["y", "w"], ["z", "w"]]
    out = subprocess.run([*run, "--queries", tmp_path / "r.emb"], capture_output=True, text=True)
    assert out.returncode == 1 and "r.emb holds per-residue (ragged) records: pass --pool mean" in out.stderr
    run[-1] = tmp_path / "r.emb"  # a per-residue file queried with one vector per key: --pool is for the file
    out = subprocess.run(
        [*run, "--queries", tmp_path / "new.h5", "-k", "1", "--pool", "mean"], capture_output=True, text=True
    )
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [["new_x", "x"], ["new_z", "w"]], out.stderr


def test_search_of_the_leading_dims_of_matryoshka_embeddings(tmp_path, monkeypatch):
    """``dims=``: the leading values of each record compared alone (a Matryoshka embedding's prefix), straight
    from the mapping at the records' stride: as numpy scores the cut matrix, for every metric and both paths
    (the kernel and BLAS), with exclusion, ``among``, a sharded dataset, per-residue records pooled, packed bits
    and the shell; the norms of a prefix are kept apart from the whole records' (a whole search after a cut
    one, and the other way, is still right)."""
    for blocks in ("BLOCK_BYTES", "KERNEL_BLOCK_BYTES"):
        monkeypatch.setattr(search_module, blocks, 2000)
    rng = np.random.default_rng(12)
    n, dim, cut = 300, 24, 8
    matrix = rng.standard_normal((n, dim)).astype(np.float32)
    keys = [f"m{i}" for i in range(n)]
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=matrix[0].nbytes * 70)
    embfile.write(tmp_path / "half.emb", (keys, matrix.astype(np.float16)))
    queries = rng.standard_normal((3, dim)).astype(np.float32)
    many = rng.standard_normal((search_module.KERNEL_QUERIES["float16"] + 2, dim)).astype(np.float32)
    with embfile.open(tmp_path / "ds") as db, embfile.open(tmp_path / "half.emb") as half:
        for metric in ("cosine", "ip", "l2"):
            for whole in (False, True):  # queries of the prefix, or the model's whole embeddings
                check(Cut(db, cut, whole), matrix[:, :cut], keys, queries[:, :cut], 7, metric, exclude=[4, 299])
            check(db, matrix, keys, queries, 7, metric)  # whole records after cut ones: their own norms
            check(Cut(half, cut, True), matrix[:, :cut].astype(np.float16), keys, many[:, :cut], 5, metric)  # BLAS
        check(half, matrix.astype(np.float16), keys, many, 5, "cosine")
        among = [keys[r] for r in range(0, n, 3)]
        scores, got = db.search(queries, k=4, dims=cut, among=among)
        want_scores, want_rows = oracle(matrix[::3, :cut], queries[:, :cut], 4, "cosine")
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
        assert got.tolist() == [[keys[3 * r] for r in rows] for rows in want_rows]
        _, got = db.search_keys(keys[:2], k=3, dims=cut)
        want = oracle(matrix[:, :cut], matrix[:2, :cut], 4, "cosine")[1]
        assert got.tolist() == [[keys[r] for r in rows if r != i][:3] for i, rows in enumerate(want)]
        with pytest.raises(ValueError, match="dims must be an int from 1 to 24"):
            db.search(queries, dims=25)
        with pytest.raises(ValueError, match=r"\(8,\) or \(Q, 8\), or the whole \(24,\)"):
            db.search(queries[:, :9], dims=cut)
        out = subprocess.run(
            [sys.executable, "-m", "embfile", "search", tmp_path / "ds", "--key", keys[0], "-k", "3", "--dims", "8"],
            capture_output=True,
            text=True,
        )
        assert [line.split()[1] for line in out.stdout.splitlines()] == got[0].tolist(), out.stderr

    past = matrix.copy()
    past[0, cut:] = np.nan  # NaN past the prefix counts for nothing, as a record or as a query
    embfile.write(tmp_path / "past.emb", (keys, past))
    with embfile.open(tmp_path / "past.emb") as db:
        check(Cut(db, cut), matrix[:, :cut], keys, queries[:, :cut], 5, "cosine")
        _, got = db.search_keys(["m0"], k=3, dims=cut)
        assert got[0].tolist() == [keys[r] for r in oracle(matrix[:, :cut], matrix[0, :cut], 4, "cosine")[1][0][1:]]
        with pytest.raises(ValueError, match="holds NaN"):
            db.search_keys(["m0"], k=3)

    bits = np.packbits(rng.random((n, 64)) > 0.5, axis=1)  # 8 bytes; the leading 3 compared
    embfile.write(tmp_path / "bits.emb", (keys, bits))
    with embfile.open(tmp_path / "bits.emb") as db:
        scores, got = db.search(bits[[5, 9]], k=6, metric="hamming", dims=3)
        want_scores, want_rows = hamming_oracle(bits[:, :3], bits[[5, 9], :3], 6)
        assert scores.tolist() == want_scores.tolist() and got.tolist() == [[keys[r] for r in w] for w in want_rows]

    records = {
        k: rng.standard_normal((int(length), dim)).astype(np.float32)
        for k, length in zip(keys[:50], rng.integers(1, 9, 50))
    }
    embfile.write(tmp_path / "res.emb", records, ragged=True)
    pooled = np.stack([r.mean(axis=0) for r in records.values()])
    with embfile.open(tmp_path / "res.emb") as db:
        scores, got = db.search(queries[0], k=5, pool="mean", dims=cut)
        want_scores, want_rows = oracle(pooled[:, :cut], queries[0, :cut], 5, "cosine")
        np.testing.assert_allclose(scores, want_scores[0], rtol=1e-4, atol=1e-4)
        assert got.tolist() == [keys[r] for r in want_rows[0]]


class Cut:
    """A dataset whose searches compare the leading ``dims`` values (what ``check`` calls); ``whole``: given
    queries of the whole length, values past the prefix that must not count."""

    def __init__(self, db, dims, whole=False):
        self.db, self.dims, self.whole = db, dims, whole

    def search(self, queries, **how):
        if self.whole:
            queries = np.concatenate([queries, np.full((len(queries), self.db.dim - self.dims), 7.0)], axis=1)
        return self.db.search(queries, dims=self.dims, **how)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_many_queries_take_the_blas_path_and_agree(tmp_path, dtype):
    rng = np.random.default_rng(9)
    matrix = rng.standard_normal((400, 20)).astype(dtype)
    keys = [f"m{i}" for i in range(400)]
    embfile.write(tmp_path / "db.emb", (keys, matrix))
    queries = rng.standard_normal((search_module.KERNEL_QUERIES[np.dtype(dtype).name] + 4, 20))
    with embfile.open(tmp_path / "db.emb") as db:
        for metric in ("cosine", "ip", "l2"):
            check(db, matrix, keys, queries, 6, metric)
            few, _ = db.search(queries[:2], k=6, metric=metric)  # the kernel, on the same data
            many, _ = db.search(queries, k=6, metric=metric)
            np.testing.assert_allclose(few, many[:2], rtol=1e-4, atol=1e-4)


def test_the_portable_kernel_agrees_with_the_vectorised_one(tmp_path):
    """EMBFILE_PORTABLE=1 makes the core use the plain loops other CPUs run, EMBFILE_AVX2=1 the AVX2 ones of CPUs
    without AVX-512 (dims not multiples of 8 or 16 included), for the dot products and the top-k (ties, NaN,
    blocks that are views of wider scores)."""
    script = (
        "import numpy as np, ml_dtypes, embfile._core as c\n"
        "rng = np.random.default_rng(2)\n"
        "for dim in (1, 7, 8, 17, 33, 48, 1280):\n"
        "    x = rng.standard_normal((33, dim)).astype(np.float32)\n"
        "    rest = np.random.default_rng(dim).standard_normal((33, 5)).astype(np.float32)  # (rng's draws as before)\n"
        "    wide = np.concatenate([x, rest], axis=1)\n"
        "    for queries in (1, 3, 4, 9):  # one at a time, and in fours\n"
        "        q = rng.standard_normal((queries, dim)).astype(np.float32)\n"
        "        narrow = (x.astype(np.float16), x.astype(ml_dtypes.bfloat16), (x * 40).astype(np.int8))\n"
        "        leading = [w[:, :dim] for w in (wide, wide.astype(np.float16), wide.astype(ml_dtypes.bfloat16))]\n"
        "        for block in leading:  # rows a longer record apart\n"
        "            want = q.astype(np.float64) @ block.T.astype(np.float64)\n"
        "            assert np.allclose(c.dot(block, q), want, rtol=1e-4, atol=1e-3), (dim, queries)\n"
        "        for block in (x, *narrow, (x * 40 + 128).clip(0, 255).astype(np.uint8)):\n"
        "            want = q.astype(np.float64) @ block.T.astype(np.float64)\n"
        "            assert np.allclose(c.dot(block, q, 3), want, rtol=1e-4, atol=1e-3), (dim, queries)\n"
        "halves = np.arange(65536, dtype=np.uint16).view(np.float16)  # every float16, subnormals and NaN too\n"
        "one = c.dot(halves.reshape(-1, 1), np.ones((1, 1), np.float32))[0]\n"
        "assert np.array_equal(one, halves.astype(np.float32), equal_nan=True)\n"
        "assert np.array_equal(c.widen(halves), halves.astype(np.float32), equal_nan=True)\n"
        "finite = halves[np.isfinite(halves)][:61440].reshape(-1, 8)\n"
        "assert np.array_equal(c.dot(finite, np.eye(8, dtype=np.float32)), finite.T.astype(np.float32))\n"
        "scores = rng.integers(0, 4, (5, 1000)).astype(np.float32)  # ties everywhere, and NaN\n"
        "scores[:, ::97] = np.nan\n"
        "for smaller in (False, True):\n"
        "    best = c.TopK(5, 7, smaller, 2)\n"
        "    for lo in range(0, 1000, 300):\n"
        "        best.add(scores[:, lo : lo + 300], np.arange(lo, min(lo + 300, 1000)))\n"
        "    key = np.where(np.isnan(scores), np.inf, scores if smaller else -scores)\n"
        "    want = np.lexsort((np.broadcast_to(np.arange(1000), key.shape), key), axis=1)[:, :7]\n"
        "    assert np.array_equal(best.result()[1], want), smaller\n"
        "for nbytes in (1, 7, 8, 13, 128):  # packed bits: popcounts of 8 bytes, and a tail\n"
        "    x = rng.integers(0, 256, (33, nbytes), dtype=np.uint8)\n"
        "    q = rng.integers(0, 256, (3, nbytes), dtype=np.uint8)\n"
        "    want = np.stack([np.bitwise_count(x ^ one).sum(axis=1) for one in q])\n"
        "    assert np.array_equal(c.hamming(x, q, 3), want) and np.array_equal(c.hamming(x.view(np.int8), q), want)\n"
        "    wide = np.concatenate([x, np.full((33, 70), 255, np.uint8)], axis=1)\n"
        "    assert np.array_equal(c.hamming(wide[:, :nbytes], q, 3), want)  # the leading bytes of longer rows\n"
        "print('ok')\n"
    )
    for env in ({}, {"EMBFILE_AVX2": "1"}, {"EMBFILE_PORTABLE": "1"}):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env})
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
