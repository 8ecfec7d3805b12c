"""The package as a user gets it: build the sdist, build the wheel from that sdist, install the wheel into a
clean virtual environment, and run a smoke test there against the installed package, not the source tree.

    python .ci/check_dist.py [--keep DIR]
"""

import argparse
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# What a wheel cannot be built without, and what the sdist must not carry (generated or built).
SDIST_NEEDS = [
    "embfile/_core.pyx",
    "embfile/_core.pxd",
    "embfile/_core.pyi",
    "embfile/py.typed",
    "src_c/embfile.h",
    "src_c/internal.h",
    "src_c/index.c",
    "src_c/pool.c",
    "src_c/records.c",
    "src_c/search.c",
    "src_c/shuffle.c",
    "setup.py",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "FORMAT.md",
    "CHANGELOG.md",
    "tests/test_golden.py",
]
SDIST_REFUSES = ["embfile/_core.c", ".so"]
WHEEL_NEEDS = [
    "embfile/__init__.py",
    "embfile/_core.pyi",
    "embfile/py.typed",
    "embfile/formats/hdf5.py",
    "embfile/spark/__init__.py",
    "embfile/spark/EmbfileReader.java",  # compiled against the Spark that runs it, at its first read
    "pyspark_embfile.py",  # at the top level of site-packages, where Spark's automatic registration looks
]
WHEEL_REFUSES = [".pyx", ".pxd", ".c", ".h"]

SMOKE = textwrap.dedent("""
    import os, pathlib, subprocess, sys, sysconfig
    import numpy as np
    import embfile

    here = pathlib.Path(embfile.__file__).resolve()
    assert pathlib.Path(sysconfig.get_paths()["purelib"]).resolve() in here.parents, here  # the installed copy
    keys = [f"sp|P{i:05d}|PROT_HUMAN" for i in range(1000)]
    matrix = np.random.default_rng(0).random((1000, 64), dtype=np.float32)
    embfile.write("db.emb", (keys, matrix), metadata={"model": "smoke"})
    with embfile.open("db.emb") as db:
        assert len(db) == 1000 and db.dim == 64 and db.metadata["model"] == "smoke"
        np.testing.assert_array_equal(db[keys[7]], matrix[7])
        np.testing.assert_array_equal(db.get_batch(keys[::-3]), matrix[::-3])
        assert sum(len(k) for k, _ in db.iter_batches(100, seed=1)) == 1000
        db.verify()
    np.save("m.npy", matrix)
    pathlib.Path("m.txt").write_text("".join(k + "\\n" for k in keys))
    embfile.convert("m.npy", "m.emb", dtype="float16")
    with embfile.open("m.emb") as db:
        assert db.dtype == np.float16 and list(db) == keys
    cli = os.path.join(os.path.dirname(sys.executable), "embfile")
    out = subprocess.run([cli, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"embfile {embfile.__version__}", out
    subprocess.run([cli, "verify", "db.emb", "m.emb"], check=True)
    print(f"smoke test passed: embfile {embfile.__version__} from {here.parent}")
""")


def run(*argv, cwd=None):
    print("+", " ".join(map(str, argv)), flush=True)
    subprocess.run([str(a) for a in argv], cwd=cwd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="embfile-dist-") as tmp:
        work = pathlib.Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        dist = work / "dist"
        run(sys.executable, "-m", "build", "--sdist", "--outdir", dist, ROOT)
        (sdist,) = dist.glob("embfile-*.tar.gz")
        with tarfile.open(sdist) as tar:
            names = ["/".join(n.split("/")[1:]) for n in tar.getnames()]
        missing = [n for n in SDIST_NEEDS if n not in names]
        extra = [n for n in names if any(n.endswith(bad) for bad in SDIST_REFUSES)]
        assert not missing and not extra, f"sdist lacks {missing}, carries {extra}"
        run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, sdist)  # the wheel from the sdist
        (wheel,) = dist.glob("embfile-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        missing = [n for n in WHEEL_NEEDS if n not in names]
        extra = [n for n in names if any(n.endswith(bad) for bad in WHEEL_REFUSES)]
        assert not missing and not extra and any("_core." in n and n.endswith(".so") for n in names), (
            f"wheel lacks {missing}, carries {extra}: {names}"
        )
        venv = work / "venv"
        run(sys.executable, "-m", "venv", venv)
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "--quiet", wheel)
        smoke = work / "smoke"
        smoke.mkdir()
        (smoke / "smoke.py").write_text(SMOKE)
        run(python, "smoke.py", cwd=smoke)
        print(f"checked {sdist.name} -> {wheel.name} in a clean venv")


if __name__ == "__main__":
    main()
