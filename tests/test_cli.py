"""The embfile command, run as a real subprocess (`embfile` and `python -m embfile`)."""

import fcntl
import io
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embfile


def cli(*args, check=True):
    """Run ``python -m embfile ARGS``; return the CompletedProcess (stdout bytes, stderr text)."""
    p = subprocess.run([sys.executable, "-m", "embfile", *map(str, args)], capture_output=True, timeout=120)
    p.stderr = p.stderr.decode()
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}: {p.stderr}")
    return p


def assert_user_error(p, *needles):
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embfile: error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_console_script_installed():
    exe = shutil.which("embfile")
    assert exe, "the embfile command is not on PATH"
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"embfile {embfile.__version__}"


@pytest.mark.parametrize(
    "command",
    [
        "convert",
        "info",
        "get",
        "keys",
        "verify",
        "shard",
        "index",
        "append",
        "remove",
        "compact",
        "vacuum",
        "versions",
        "merge",
        "subset",
        "search",
    ],
)
def test_help_has_examples(command):
    p = cli(command, "--help")
    assert b"example" in p.stdout and f"embfile {command}".encode() in p.stdout


def test_convert_info_get_keys(tmp_path):
    rng = np.random.default_rng(11)
    data = {
        "sp|P69905|HBA_HUMAN": rng.random(16).astype(np.float32),
        "protéine 1": rng.random(16).astype(np.float32),
        "multi\nline": rng.random(16).astype(np.float32),
    }
    with h5py.File(tmp_path / "prott5.h5", "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    p = cli(
        "convert",
        tmp_path / "prott5.h5",
        tmp_path / "db.emb",
        "--dtype",
        "float16",
        "--metadata",
        '{"model": "prot_t5"}',
    )
    assert p.stdout == b"" and "wrote" in p.stderr and "\r" not in p.stderr  # no bar when not a terminal
    assert cli("convert", "-q", tmp_path / "db.emb", tmp_path / "db.parquet").stderr == ""

    info = json.loads(cli("info", tmp_path / "db.emb", "--json").stdout)
    assert (info["count"], info["dim"], info["dtype"]) == (3, 16, "float16")
    assert info["key_bytes"] == [10, 19] and info["metadata"]["model"] == "prot_t5"
    assert "embfile" not in info["metadata"]  # the writer's record, apart
    assert info["written_by"] == f"embfile {embfile.__version__}" and info["created"].startswith("20")
    assert info["size"] == os.path.getsize(tmp_path / "db.emb")
    assert b"float16" in cli("info", tmp_path / "db.emb").stdout

    want = {k: v.astype(np.float16) for k, v in data.items()}
    text = cli("get", tmp_path / "db.emb", "protéine 1").stdout.decode()
    key, values = text.rstrip("\n").split("\t")
    assert key == "protéine 1"
    np.testing.assert_array_equal(np.array(values.split(), np.float16), want["protéine 1"])
    printed = cli("get", tmp_path / "db.emb", "sp|P69905|HBA_HUMAN", "protéine 1", "--format", "json").stdout
    got = json.loads(printed)
    np.testing.assert_array_equal(np.array(got["sp|P69905|HBA_HUMAN"], np.float16), want["sp|P69905|HBA_HUMAN"])
    shortest = [str(x) for x in want["protéine 1"]]  # each value as its float16 prints, not as a float64 does
    assert printed.decode().split('"protéine 1": [')[1].split("]")[0].split(", ") == shortest
    arr = np.load(io.BytesIO(cli("get", tmp_path / "db.emb", "multi\nline", "protéine 1", "--format", "npy").stdout))
    np.testing.assert_array_equal(arr, np.stack([want["multi\nline"], want["protéine 1"]]))
    (tmp_path / "ids.txt").write_text("protéine 1\nsp|P69905|HBA_HUMAN\n")
    listed = cli("get", tmp_path / "db.emb", "--keys", tmp_path / "ids.txt", "--format", "npy").stdout
    np.testing.assert_array_equal(
        np.load(io.BytesIO(listed)), np.stack([want["protéine 1"], want["sp|P69905|HBA_HUMAN"]])
    )
    (tmp_path / "query.fasta").write_text(">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha\nMVL\n")
    got = cli("get", tmp_path / "db.emb", "protéine 1", "--keys", tmp_path / "query.fasta", "--format", "json")
    assert list(json.loads(got.stdout)) == ["protéine 1", "sp|P69905|HBA_HUMAN"]  # FASTA: each header's first word
    refused = cli("get", tmp_path / "db.emb", check=False).stderr.strip()
    assert refused.endswith("no keys: give them as arguments, or --keys FILE")

    keys = cli("keys", tmp_path / "db.emb", "-0").stdout.decode().split("\0")[:-1]
    assert sorted(keys) == sorted(data)


def test_get_per_residue_records(tmp_path):
    records = {"P1": np.arange(6, dtype=np.float32).reshape(3, 2) / 10, "P2": np.ones((1, 2), np.float32)}
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    lines = cli("get", tmp_path / "r.emb", "P1", "P2").stdout.decode().splitlines()
    assert lines == ["P1\t0\t0.0 0.1", "P1\t1\t0.2 0.3", "P1\t2\t0.4 0.5", "P2\t0\t1.0 1.0"]  # key, row, values
    assert json.loads(cli("get", tmp_path / "r.emb", "P1", "--format", "json").stdout) == {
        "P1": [[0.0, 0.1], [0.2, 0.3], [0.4, 0.5]]  # as float32 prints them
    }
    one = np.load(io.BytesIO(cli("get", tmp_path / "r.emb", "P1", "--format", "npy").stdout))  # was refused
    np.testing.assert_array_equal(one, records["P1"])
    refused = cli("get", tmp_path / "r.emb", "P1", "P2", "--format", "npy", check=False)
    assert_user_error(refused, "--format npy writes one key's; json or text all")


def test_verify_exit_status(tmp_path, study):
    path, keys, matrix = study
    other = tmp_path / "copy.emb"
    shutil.copy(path, other)
    assert cli("verify", path, other).stdout.decode().count(": OK") == 2
    with open(other, "r+b") as f:  # flip one bit in the records
        f.seek(4096 + 1000)
        b = f.read(1)
        f.seek(4096 + 1000)
        f.write(bytes([b[0] ^ 0x10]))
    p = cli("verify", path, other, check=False)
    assert p.returncode == 1
    out = p.stdout.decode()
    assert f"{path}: OK" in out and f"{other}: DAMAGED" in out and "records block 0" in out
    (tmp_path / "text.emb").write_text("not an emb")
    p = cli("verify", tmp_path / "text.emb", check=False)
    assert p.returncode == 1 and "UNREADABLE" in p.stdout.decode()


def test_user_errors_are_one_line(tmp_path, study):
    path, keys, matrix = study
    assert_user_error(cli("convert", tmp_path / "missing.h5", tmp_path / "o.emb", check=False), "No such file")
    assert_user_error(cli("get", path, "nope", check=False), "'nope' is not in")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b", "a"], "v": [[1.0], [2.0], [3.0]]}), tmp_path / "dup.parquet")
    assert_user_error(cli("convert", tmp_path / "dup.parquet", tmp_path / "o.emb", check=False), "duplicate key 'a'")
    assert_user_error(
        cli("convert", tmp_path / "dup.parquet", tmp_path / "o.emb", "--key-column", "x", check=False), "no column 'x'"
    )
    with h5py.File(tmp_path / "res.h5", "w") as f:
        f.create_dataset("P1", data=np.zeros((7, 4), np.float16))
        f.create_dataset("P2", data=np.zeros((7, 5), np.float16))
    assert_user_error(
        cli("convert", tmp_path / "res.h5", tmp_path / "o.emb", check=False), "'P2' has shape (7, 5), expected (L, 4)"
    )
    (tmp_path / "d.pkl").write_bytes(b"\x80\x04N.")
    assert_user_error(cli("convert", tmp_path / "d.pkl", tmp_path / "o.emb", check=False), "--trust-pickle")
    assert_user_error(cli("convert", path, tmp_path / "o.emb", "--layer", "3", check=False), "'layer'")
    assert_user_error(cli("info", tmp_path / "res.h5", check=False), "not an .emb file")
    assert not os.path.exists(tmp_path / "o.emb")
    p = cli("convert", path, check=False)  # usage error: argparse's own message, status 2
    assert p.returncode == 2 and "Traceback" not in p.stderr


def test_progress_bar_on_a_terminal(tmp_path, study):
    path, keys, matrix = study
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    p = subprocess.Popen(
        [sys.executable, "-m", "embfile", "convert", str(path), str(tmp_path / "o.parquet")],
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    p.wait(timeout=120)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert p.returncode == 0
    assert b"records" in out and b"wrote" in out


def test_shard_a_file_then_use_the_folder(tmp_path, study):
    path, keys, matrix = study
    p = cli("shard", path, tmp_path / "ds", "--shard-size", "40KiB")
    assert "500 records in 4 shards" in p.stderr
    info = json.loads(cli("info", tmp_path / "ds", "--json").stdout)
    assert (info["count"], info["dim"], info["shards"]) == (500, 32, 4)
    assert info["metadata"] == {"model": "esm2_t33_650M_UR50D", "layer": 33}
    got = json.loads(cli("get", tmp_path / "ds", keys[499], keys[0], "--format", "json").stdout)
    assert got == {keys[499]: matrix[499].tolist(), keys[0]: matrix[0].tolist()}
    assert cli("keys", tmp_path / "ds").stdout.decode().split() == keys
    assert cli("verify", tmp_path / "ds").stdout.decode().strip().endswith("OK")
    embfile.write(tmp_path / "ds" / "shards" / "stray.emb", (["extra"], np.zeros((1, 32))))
    info = json.loads(cli("info", tmp_path / "ds", "--json").stdout)
    assert (info["count"], info["version"]) == (500, 1)  # a file no manifest names is invisible
    assert_user_error(cli("index", tmp_path / "ds", check=False), "versioned dataset")
    assert_user_error(cli("shard", path, tmp_path / "ds", check=False), "--overwrite", "mode='overwrite'")
    assert "version 2" in cli("shard", path, tmp_path / "ds", "--overwrite").stderr
    versions = json.loads(cli("versions", tmp_path / "ds", "--json").stdout)
    assert [(v["version"], v["operation"], v["records"]) for v in versions] == [
        (1, "write", 500),
        (2, "overwrite", 500),
    ]
    assert_user_error(
        cli("shard", path, tmp_path / "x", "--shard-size", "100", check=False),
        "shard_bytes 100 is less than one record (256 bytes)",
    )
    p = cli("shard", path, tmp_path / "x", "--shard-size", "lots", check=False)
    assert p.returncode == 2 and "not a size: 'lots'" in p.stderr
    assert not (tmp_path / "x").exists()


def test_grow_a_dataset_from_the_shell(tmp_path, study):
    path, keys, matrix = study
    ds = tmp_path / "ds"
    cli("shard", path, ds, "--shard-size", "40KiB")
    with h5py.File(tmp_path / "new.h5", "w") as f:  # one dataset per protein, as ProtTrans writes
        for i in range(3):
            f[f"new{i}"] = np.full(32, i, np.float32)
    assert "version 2 appends" in cli("append", ds, tmp_path / "new.h5").stderr
    assert_user_error(
        cli("append", ds, tmp_path / "new.h5", check=False), "'new0' is already in the dataset", "--replace"
    )
    cli("append", ds, tmp_path / "new.h5", "--replace")
    (tmp_path / "gone.txt").write_text(f"{keys[0]}\n{keys[1]}\n")
    cli("remove", ds, "--keys", tmp_path / "gone.txt")
    assert_user_error(
        cli("remove", ds, keys[0], check=False), f"key {keys[0]!r} is not in", "--missing"
    )  # as arguments
    assert_user_error(cli("remove", ds, "--keys", keys[1], check=False), "no such file (keys themselves go after")
    cli("compact", ds)
    for version, holds in (("1", False), ("3", True), (None, True)):  # reads of any version, by number or tag
        args = ["--version", version] if version else []
        got = json.loads(cli("info", ds, "--json", *args).stdout)
        assert (got["version"], got["count"]) == (int(version or 5), {"1": 500, "3": 503}.get(version, 501))
        assert (b"new1\n" in cli("keys", ds, *args).stdout) == holds
        found = cli("get", ds, "new1", *args, check=False)
        assert found.returncode == 0 if holds else "'new1' is not in" in found.stderr
    cli("tag", ds, "before-removal", "--version", "3")
    assert cli("get", ds, keys[0], "--version", "before-removal").stdout.startswith(keys[0].encode())
    hits = cli("search", ds, "--key", keys[0], "-k", "1", "--version", "before-removal", "--format", "tsv").stdout
    assert hits.splitlines()[1].startswith(keys[0].encode())  # the key removed later, found in its version
    cli("convert", ds, tmp_path / "v3.parquet", "--version", "before-removal")  # a version exported
    with embfile.open(embfile.convert(tmp_path / "v3.parquet", tmp_path / "v3.emb")) as db:
        assert len(db) == 503 and keys[0] in db
    cli("tag", ds, "before-removal", "--delete")
    assert_user_error(cli("info", path, "--version", "2", check=False), "applies to a dataset folder")
    versions = json.loads(cli("versions", ds, "--json").stdout)
    assert [(v["operation"], v["changed"], v["records"]) for v in versions] == [
        ("write", 500, 500),
        ("append", 3, 503),
        ("append", 3, 503),
        ("remove", 2, 501),
        ("compact", 501, 501),
    ]
    assert versions[2]["replaced"] == 3 and versions[-1]["shards"] == versions[-1]["segments"] == 1
    assert "removed 0 versions" in cli("vacuum", ds, "--keep", "1").stderr  # within the grace period
    assert "removed 4 versions" in cli("vacuum", ds, "--keep", "1", "--grace", "0").stderr
    cli("subset", ds, tmp_path / "some.emb", "new2", keys[7])  # was a file only: "unrecognized arguments"
    merge = cli("merge", tmp_path / "some.emb", path, tmp_path / "merged", check=False)
    assert_user_error(merge, f"{keys[7]!r}")  # in both sources
    assert not (tmp_path / "merged").exists()
    with embfile.open(tmp_path / "some.emb") as db:
        assert list(db) == [keys[7], "new2"] and db["new2"].tolist() == [2.0] * 32
    assert_user_error(cli("append", tmp_path / "nothing", path, check=False), "no dataset to append to")
    np.save(tmp_path / "more.npy", np.full((2, 32), 7, np.float32))  # appends read as convert reads
    (tmp_path / "more.json").write_text('["m1", "m2"]')
    assert "appends" in cli("append", ds, tmp_path / "more.npy", "--keys", tmp_path / "more.json").stderr
    pq.write_table(pa.table({"acc": ["sp|P1|X"], "name": ["x"], "emb": [[1.0] * 32]}), tmp_path / "t.parquet")
    cli("append", ds, tmp_path / "t.parquet", "--key-column", "acc", "--key-regex", r"\|([^|]+)\|")
    with embfile.open(ds) as db:
        assert db["m2"].tolist() == [7.0] * 32 and db["P1"].tolist() == [1.0] * 32
    cli("merge", tmp_path / "more.npy", tmp_path / "started", "--keys", tmp_path / "more.json")  # a dataset begun
    assert list(embfile.open(tmp_path / "started")) == ["m1", "m2"]


def test_a_sweep_of_bad_inputs_gives_one_line_each(tmp_path):
    """Mistakes as users make them, through the real command: exit 1, one line naming the user's path, no
    traceback, nothing left at the destination."""
    import gzip
    import pickle

    torch = pytest.importorskip("torch")
    np.savez(tmp_path / "pair.npz", ids=np.array(["a", "b"]), emb=np.ones((2, 4), np.float32))
    (tmp_path / "pair.npy").write_bytes((tmp_path / "pair.npz").read_bytes())  # an .npz named .npy
    torch.save({"a": torch.ones(4)}, tmp_path / "d.pt")
    (tmp_path / "d.pkl").write_bytes((tmp_path / "d.pt").read_bytes())  # a torch file named .pkl
    with gzip.open(tmp_path / "g.pkl", "wb") as f:
        pickle.dump({"a": [1.0, 2.0]}, f)
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04\x95junk")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    np.save(tmp_path / "dict.npy", {"a": np.ones(4)}, allow_pickle=True)
    (tmp_path / "folder").mkdir()
    cases = [
        (["pair.npy", "o.emb", "--from", "npy"], "an .npz archive, not an .npy matrix: --from npz"),
        (["d.pkl", "o.emb", "--from", "pickle", "--trust-pickle"], "--from torch reads it"),
        (["junk.pkl", "o.emb", "--trust-pickle"], "not a pickle this Python can load"),
        (["pair.npz", "nodir/o.emb"], "nodir does not exist"),
        (["pair.npz", "afile/o.emb"], "afile is not a folder"),
        (["bad.npz", "o.emb"], "a damaged zip file"),
        (["objects.npz", "o.emb"], "objects.npz"),
        (["list.pt", "o.emb"], "holds a list, not a dict of vectors or (ids, matrix)"),
        (["dict.npy", "o.emb"], "dict.npy: holds pickled Python objects (np.save of a dict, say): loading them runs"),
        (["folder", "o.emb", "--from", "zarr"], "not a readable Zarr group"),
        (["folder", "o.emb", "--from", "lance"], "not a Lance dataset (it has no _versions folder)"),
        (["pair.npz", "o.emb", "--ids", "nope"], "no array 'nope'"),
        (["pair.npz", "o.xyz"], "cannot tell the output format"),
    ]
    for args, needle in cases:
        p = cli(
            "convert",
            *[
                a if a.startswith("-") or a in ("npy", "pickle", "nope", "zarr", "lance") else tmp_path / a
                for a in args
            ],
            check=False,
        )
        assert_user_error(p, needle)
        assert ".tmp" not in p.stderr  # never a hidden staging path
        assert not os.path.exists(tmp_path / "o.emb")
    p = cli("convert", tmp_path / "g.pkl", tmp_path / "g.emb", "--trust-pickle")  # a gzipped pickle just works
    assert p.returncode == 0


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """What `timeout` and SLURM send: the conversion stops, nothing is left at the destination or beside it."""
    import signal
    import time

    with embfile.Writer(tmp_path / "big.emb", 256, "float32") as w:
        rng = np.random.default_rng(0)
        for lo in range(0, 400_000, 50_000):
            w.add_batch([f"k{i}" for i in range(lo, lo + 50_000)], rng.random((50_000, 256), np.float32))
    out = tmp_path / "out"
    out.mkdir()
    argv = ["convert", tmp_path / "big.emb", out / "big.h5", "--compression", "gzip", "-q"]  # slow: seconds
    proc = subprocess.Popen([sys.executable, "-m", "embfile", *argv], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the conversion finished before the signal")
    assert proc.returncode == 143, err
    assert err.strip() == "embfile: error: terminated (SIGTERM); no output file was left behind"
    assert os.listdir(out) == []


def test_metadata_as_key_value_pairs_and_the_history_of_sources(tmp_path):
    embfile.write(tmp_path / "a.emb", {"k": np.ones(4, np.float32)})
    cli("convert", tmp_path / "a.emb", tmp_path / "b.parquet", "-q")
    cli(
        "convert",
        tmp_path / "b.parquet",
        tmp_path / "c.emb",
        "--metadata",
        "model=prot_t5",
        "--metadata",
        "layer=24",
        "--metadata",
        '{"pooling": "mean"}',
        "-q",
    )
    with embfile.open(tmp_path / "c.emb") as db:
        meta = db.metadata
    assert (meta["model"], meta["layer"], meta["pooling"]) == ("prot_t5", 24, "mean")
    assert meta["source"]["format"] == "parquet"
    assert [s["format"] for s in meta["sources"]] == ["parquet"]  # a.emb came from a mapping: no source of its own
    cli("convert", tmp_path / "c.emb", tmp_path / "d.emb", "-q")
    with embfile.open(tmp_path / "d.emb") as db:
        assert [s["format"] for s in db.metadata["sources"]] == ["parquet", "emb"]
    assert_user_error(cli("info", tmp_path / "nope.emb", check=False), "nope.emb")
    p = cli("convert", tmp_path / "c.emb", tmp_path / "e.emb", "--dtype", "float8", check=False)
    assert p.returncode == 2 and "float16" in p.stderr  # usage error: the valid dtypes listed


def test_convert_keeps_a_matryoshka_prefix(tmp_path):
    """``--dims N`` (``convert(dims=N)``) keeps the first N values of each vector: of one vector a key, of
    per-residue rows (kept, or pooled), of a table in memory, and on the way to another format (not copied
    whole from the mapping); N past the vectors' length is one line."""
    rng = np.random.default_rng(7)
    keys = [f"t{i}" for i in range(40)]
    x = rng.standard_normal((40, 32)).astype(np.float32)
    embfile.write(tmp_path / "a.emb", (keys, x))
    cli("convert", tmp_path / "a.emb", tmp_path / "cut.emb", "--dims", "8", "-q")
    with embfile.open(tmp_path / "cut.emb") as db:
        assert db.dim == 8 and list(db.keys()) == keys
        np.testing.assert_array_equal(db.matrix, x[:, :8])
        assert db.metadata["source"]["dims"] == 8
    cli("convert", tmp_path / "a.emb", tmp_path / "cut.parquet", "--dims", "8", "-q")
    vectors = pq.read_table(tmp_path / "cut.parquet").column("vector").to_pylist()
    np.testing.assert_array_equal(np.array(vectors, np.float32), x[:, :8])
    table = pa.table({"id": keys, "vector": list(x)})
    embfile.convert(table, tmp_path / "table.emb", dims=5)
    np.testing.assert_array_equal(embfile.open(tmp_path / "table.emb").matrix, x[:, :5])

    records = {k: rng.standard_normal((int(n), 32)).astype(np.float32) for k, n in zip(keys, rng.integers(1, 6, 40))}
    embfile.write(tmp_path / "res.emb", records, ragged=True)
    embfile.convert(tmp_path / "res.emb", tmp_path / "res_cut.emb", dims=4)
    with embfile.open(tmp_path / "res_cut.emb") as db:
        assert db.ragged and db.dim == 4
        for k, rows in records.items():
            np.testing.assert_array_equal(db[k], rows[:, :4])
    embfile.convert(tmp_path / "res.emb", tmp_path / "pooled_cut.emb", dims=4, pool="mean")
    with embfile.open(tmp_path / "pooled_cut.emb") as db:
        np.testing.assert_allclose(db.matrix, np.stack([r.mean(axis=0)[:4] for r in records.values()]), atol=1e-6)

    assert_user_error(cli("convert", tmp_path / "a.emb", tmp_path / "x.emb", "--dims", "33", check=False), "1 to 32")
    assert not (tmp_path / "x.emb").exists()


def test_convert_normalizes_each_vector_after_the_cut(tmp_path):
    """``--normalize`` (``convert(normalize=True)``) scales each vector to unit length after ``--dims`` cut it,
    as Matryoshka models ask of a prefix: of one vector a key (float16 kept, computed wide), of per-residue rows,
    of a table in memory, to another format; a zero vector stays zero; integer vectors are one line."""
    rng = np.random.default_rng(8)
    keys = [f"n{i}" for i in range(30)]
    x = (rng.standard_normal((30, 16)) * rng.uniform(0.1, 50, (30, 1))).astype(np.float32)
    x[3] = 0
    embfile.write(tmp_path / "a.emb", (keys, x))

    def unit(v):
        n = np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True)
        return v / np.where(n == 0, 1, n)

    cli("convert", tmp_path / "a.emb", tmp_path / "unit.emb", "--dims", "6", "--normalize", "-q")
    with embfile.open(tmp_path / "unit.emb") as db:
        assert db.dim == 6 and db.metadata["source"]["normalized"] is True
        np.testing.assert_allclose(db.matrix, unit(x[:, :6]), rtol=1e-6, atol=1e-7)
        assert not db.matrix[3].any()
    embfile.convert(tmp_path / "a.emb", tmp_path / "unit.parquet", normalize=True)
    vectors = np.array(pq.read_table(tmp_path / "unit.parquet").column("vector").to_pylist(), np.float32)
    np.testing.assert_allclose(vectors, unit(x), rtol=1e-6, atol=1e-7)
    embfile.convert(pa.table({"id": keys, "vector": list(x)}), tmp_path / "table.emb", normalize=True)
    np.testing.assert_allclose(embfile.open(tmp_path / "table.emb").matrix, unit(x), rtol=1e-6, atol=1e-7)

    embfile.write(tmp_path / "half.emb", (keys, x.astype(np.float16)))
    embfile.convert(tmp_path / "half.emb", tmp_path / "half_unit.emb", normalize=True)
    with embfile.open(tmp_path / "half_unit.emb") as db:
        assert db.dtype == np.float16
        np.testing.assert_allclose(db.matrix, unit(x.astype(np.float16).astype(np.float32)), atol=1e-3)

    records = {k: rng.standard_normal((int(n), 16)).astype(np.float32) for k, n in zip(keys, rng.integers(1, 5, 30))}
    embfile.write(tmp_path / "res.emb", records, ragged=True)
    embfile.convert(tmp_path / "res.emb", tmp_path / "res_unit.emb", dims=4, normalize=True)
    with embfile.open(tmp_path / "res_unit.emb") as db:
        for k, rows in records.items():
            np.testing.assert_allclose(db[k], unit(rows[:, :4]), rtol=1e-6, atol=1e-7)

    embfile.write(tmp_path / "int.emb", (keys, (x * 2).astype(np.int8)))
    assert_user_error(cli("convert", tmp_path / "int.emb", tmp_path / "y.emb", "--normalize", check=False), "int8")
    assert not (tmp_path / "y.emb").exists()


def test_convert_writes_binary_quantized_records_for_hamming_search(tmp_path):
    """``--binary`` (``convert(binary=True)``) writes each vector's signs packed 8 to a byte, as
    ``np.packbits(x > 0)`` and sentence-transformers' "ubinary" do (a width not a multiple of 8 padded with zero
    bits), of one vector a key and per-residue rows, after a ``--dims`` cut; the file searches by Hamming
    distance; a dtype with it, or unsigned input, is one line."""
    rng = np.random.default_rng(9)
    keys = [f"b{i}" for i in range(50)]
    x = rng.standard_normal((50, 20)).astype(np.float32)
    embfile.write(tmp_path / "a.emb", (keys, x))
    cli("convert", tmp_path / "a.emb", tmp_path / "bits.emb", "--binary", "-q")
    bits = np.packbits(x > 0, axis=1)
    with embfile.open(tmp_path / "bits.emb") as db:
        assert db.dtype == np.uint8 and db.dim == 3 and list(db.keys()) == keys
        np.testing.assert_array_equal(db.matrix, bits)
        assert db.metadata["source"]["binary_dims"] == 20
        distances, found = db.search(bits[7], k=5, metric="hamming")
        brute = np.unpackbits(bits ^ bits[7], axis=1).sum(axis=1)
        np.testing.assert_array_equal(distances, np.sort(brute)[:5])
        assert found[0] == "b7"
    embfile.convert(tmp_path / "a.emb", tmp_path / "bits8.emb", dims=8, binary=True)
    np.testing.assert_array_equal(embfile.open(tmp_path / "bits8.emb").matrix, np.packbits(x[:, :8] > 0, axis=1))

    records = {k: rng.standard_normal((int(n), 16)).astype(np.float16) for k, n in zip(keys, rng.integers(1, 5, 50))}
    embfile.write(tmp_path / "res.emb", records, ragged=True)
    embfile.convert(tmp_path / "res.emb", tmp_path / "res_bits.emb", binary=True)
    with embfile.open(tmp_path / "res_bits.emb") as db:
        assert db.ragged and db.dim == 2
        for k, rows in records.items():
            np.testing.assert_array_equal(db[k], np.packbits(rows > 0, axis=1))

    out = cli("convert", tmp_path / "a.emb", tmp_path / "y.emb", "--binary", "--dtype", "int8", check=False)
    assert_user_error(out, "leave dtype unset")
    embfile.write(tmp_path / "u8.emb", (keys, bits))
    assert_user_error(cli("convert", tmp_path / "u8.emb", tmp_path / "y.emb", "--binary", check=False), "uint8")
    assert not (tmp_path / "y.emb").exists()
