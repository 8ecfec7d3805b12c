"""Run :mod:`exercise` in a worker process, so a crash, a hang or a runaway
allocation in one case is reported as a bug instead of ending the run.

The worker reads one JSON request per line (``{"path": ..., "probes": [...]}``)
and answers with one JSON line.  It runs under a data-segment limit: a file
that makes embfile allocate far beyond its size gets a ``MemoryError``, which
:mod:`exercise` counts as a bug.  A worker that dies is restarted for the next
case.  ``python fuzz/sandbox.py FILE...`` runs files by hand.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class Sandbox:
    """A worker process for :func:`exercise.run`; ``env`` adds to its environment (LD_PRELOAD, ...)."""

    def __init__(self, timeout=30.0, memory_bytes=256 << 20, env=None, python=sys.executable):
        self.timeout, self.memory_bytes = timeout, memory_bytes
        self.env = {**os.environ, **(env or {}), "PYTHONFAULTHANDLER": "1"}
        self.python = python
        self.cases = self.starts = 0
        self._proc = None

    def _start(self):
        self._proc = subprocess.Popen(
            [self.python, os.path.join(HERE, "sandbox.py"), "--serve", str(self.memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            text=True,
            bufsize=1,
        )
        ready = self._answer(120.0)  # imports numpy and embfile
        if "core" not in ready:
            raise RuntimeError(f"sandbox worker did not start: {ready}")
        self.core = ready["core"]  # the native module the worker runs

    def _answer(self, timeout):
        """The worker's next JSON line, or a ``{"bugs": [...]}`` saying how it died or hung."""
        proc = self._proc
        readable, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if readable else ""
        if line:
            return json.loads(line)
        if not readable:
            proc.kill()
            what = f"hung: no answer in {timeout:.0f} s"
        else:
            what = "worker exited"
        status = proc.wait()
        if status < 0:
            what = f"crashed: {signal.Signals(-status).name}"
        stderr = proc.stderr.read()[-6000:]
        self._proc = None
        return {"steps": {}, "bugs": [f"{what}\n{stderr}"]}

    def run(self, path, probes=()):
        """Exercise one file; see :func:`exercise.run` for the answer."""
        if self._proc is None:
            self._start()
            self.starts += 1
        self.cases += 1
        self._proc.stdin.write(json.dumps({"path": os.fspath(path), "probes": list(probes)}) + "\n")
        self._proc.stdin.flush()
        return self._answer(self.timeout)

    def close(self):
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _limit_data(extra):
    """Cap the data segment at what is in use now plus ``extra`` bytes (not under ASan,
    whose shadow memory counts as data)."""
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return
    import resource

    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (used + extra, used + extra))


def serve(memory_bytes):
    import exercise  # imports embfile before the limit is set

    _limit_data(memory_bytes)
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    out.write(json.dumps({"core": exercise.embfile._core.__file__}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["probes"] == ["crash"] and os.environ.get("EMBFILE_SANDBOX_TEST_CRASH"):
            import ctypes

            ctypes.string_at(0)  # the harness's own test: a segfault in the middle of a case
        answer = exercise.run(request["path"], request["probes"])
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
    else:
        with Sandbox() as box:
            for name in sys.argv[1:]:
                t = time.perf_counter()
                answer = box.run(name)
                print(f"{name}: {time.perf_counter() - t:.2f} s", json.dumps(answer, indent=1))
