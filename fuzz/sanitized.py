"""A copy of embfile built with AddressSanitizer and UBSan, and the environment that runs it.

``python fuzz/sanitized.py [--fuzz]`` builds it into build/sanitized/ (with gcc,
or with clang and libFuzzer's coverage for atheris) and prints that environment.
Python itself is not instrumented: the sanitizer runtime is preloaded.
``python fuzz/sanitized.py --coverage CORPUS`` instead builds with gcov's line
counts, runs every file of CORPUS through every read path and prints the line
coverage of the C core.
"""

import glob
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "build", "sanitized")


def build(fuzz=False, dest=DEST):
    """Build the sanitized copy into ``dest``; return the environment variables that run it."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), dest)
    for name in ("embfile", "src_c"):
        shutil.copytree(
            os.path.join(ROOT, name),
            os.path.join(dest, name),
            ignore=shutil.ignore_patterns("*.so", "_core.c", "__pycache__"),
        )
    cc = "clang" if fuzz else os.environ.get("CC", "gcc")
    env = {**os.environ, "CC": cc, "LDSHARED": f"{cc} -shared", "EMBFILE_SANITIZE": "fuzz" if fuzz else "1"}
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the sanitized build failed:\n{done.stderr[-4000:]}")
    return environment(fuzz, dest)


def environment(fuzz=False, dest=DEST):
    if fuzz:
        import atheris

        runtime = os.path.join(atheris.path(), "asan_with_fuzzer.so")
    else:
        runtime = subprocess.run(
            ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return {
        "PYTHONPATH": dest,
        "LD_PRELOAD": runtime,
        # Python's own allocations are not ours to check; leaks at exit neither.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:allocator_may_return_null=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    }


def coverage(corpus, dest=None):
    """Line coverage of src_c/*.c reached by running every file in ``corpus`` (fuzz inputs: a mode
    byte, then the file) through :func:`exercise.run`."""
    dest = dest or os.path.join(ROOT, "build", "coverage")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns("build", ".git", "*.so", "_core.c", "__pycache__"))
    env = {**os.environ, "EMBFILE_COVERAGE": "1"}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=dest, env=env, check=True, capture_output=True
    )
    replay = (
        "import os, sys, exercise, mutate\n"
        "for name in sorted(os.listdir(sys.argv[1])):\n"
        "    data = open(os.path.join(sys.argv[1], name), 'rb').read()\n"
        "    open('/dev/shm/embfile-cov.emb', 'wb').write(mutate.apply(data[1:], [], bool(data[:1]) and data[0] & 1))\n"
        "    exercise.run('/dev/shm/embfile-cov.emb')\n"
    )
    subprocess.run(
        [sys.executable, "-c", replay, os.path.abspath(corpus)],
        cwd=os.path.join(dest, "fuzz"),
        env={**os.environ, "PYTHONPATH": dest},
        check=True,
    )
    objects = glob.glob(os.path.join(dest, "build", "**", "src_c", "*.gcda"), recursive=True)
    out = subprocess.run(["gcov", "-f", "-n", *objects], cwd=dest, capture_output=True, text=True, check=True).stdout
    # "Function 'emb_lookup'" / "Lines executed:100.00% of 43" pairs, then the same per file
    lines = out.splitlines()
    return "\n".join(
        f"{name.split(' ', 1)[1]:<24} {count.split(':', 1)[1]}"
        for name, count in zip(lines, lines[1:])
        if name.startswith(("Function", "File")) and count.startswith("Lines executed")
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--coverage"]:
        print(coverage(sys.argv[2]))
    else:
        for name, value in build(fuzz="--fuzz" in sys.argv).items():
            print(f"export {name}={value}")
