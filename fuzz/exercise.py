"""Every read path of embfile over one file, and the verdict on how it behaved.

A hostile file may make any step fail, but only in the ways embfile promises:
an :class:`embfile.EmbFileError` whose message says what is wrong, or a
``KeyError`` from a lookup.  Any other exception is a bug; a crash, a hang or
a runaway allocation is caught one level up, by :mod:`sandbox`.
"""

import contextlib
import importlib.util
import io

import numpy as np

import embfile
from embfile import cli

PROBES = ["", "absent", "seq0000000000", "\x00", "\uffff" * 3, "a" * 300]


def steps(path, probes=()):
    """``(name, callable)`` for every read path, each independent of the others' success."""
    db = embfile.open(path)
    yield "open", lambda: db
    probes = list(probes) + PROBES

    def own_keys():
        return list(db.keys_between(0, min(len(db), 64)))

    def lookups():
        for k in probes + own_keys():
            if k in db:
                np.asarray(db[k]).sum()
            db.get(k)
            with contextlib.suppress(KeyError):
                db.row(k)

    def batches():
        n = len(db)
        for keys in (probes[:3], own_keys()):
            with contextlib.suppress(KeyError):
                db.get_batch(keys)
        if n:
            db.take(np.array([0, n - 1, n // 2, 0], np.int64))
            db.record(n - 1)

    def epoch():
        seen = 0
        for keys, m, *_mask in db.iter_batches(7, seed=1, block_size=5, buffer_blocks=3):  # ragged: a mask
            seen += len(keys)
            m.sum()
        assert seen == len(db), f"an epoch gave {seen} of {len(db)} records"

    def command_line():
        for argv in (["info", path], ["verify", path], ["get", path, *probes[:2]]):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                status = cli.main(argv)
            assert status in (0, 1) and "Traceback" not in err.getvalue(), (argv, status, err.getvalue())

    yield "describe", lambda: (len(db), db.dim, db.dtype, repr(db), db.metadata)
    yield "lookups", lookups
    yield "iterate", lambda: sum(1 for _ in zip(range(2000), db.items()))
    yield "batches", batches
    yield "matrix", lambda: np.asarray(db.matrix).sum()
    yield "epoch", epoch
    if importlib.util.find_spec("pyarrow"):  # Arrow reads by the file's offsets without checking them itself
        yield "arrow", lambda: db.to_arrow().slice(0, 2000).to_pylist()
    yield "verify", db.verify
    yield "cli", command_line
    yield "close", db.close


def run(path, probes=()):
    """Exercise ``path``; return ``{"steps": {name: outcome}, "bugs": [...]}`` (JSON-able).

    An outcome is ``"ok"`` or ``"<ExceptionType>: message"``.  ``bugs`` lists the
    steps that failed in a way embfile does not allow.
    """
    outcomes, bugs = {}, []
    it = steps(path, probes)
    while True:
        try:
            name, step = next(it)
        except StopIteration:
            break
        except Exception as e:  # open itself failed
            name, step = "open", None
            _judge(name, e, outcomes, bugs)
            break
        try:
            step()
            outcomes[name] = "ok"
        except Exception as e:
            _judge(name, e, outcomes, bugs)
    return {"steps": outcomes, "bugs": bugs}


def _judge(name, e, outcomes, bugs):
    outcomes[name] = f"{type(e).__name__}: {e}"
    allowed = isinstance(e, embfile.EmbFileError) or (isinstance(e, KeyError) and name in ("lookups", "batches"))
    if not allowed or not str(e).strip():
        bugs.append(f"{name}: {type(e).__name__}: {e}")
