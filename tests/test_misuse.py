"""Misuse: a closed file gives ClosedFileError everywhere (arrays already handed out stay valid),
and arguments of the wrong type give TypeErrors saying what was expected."""

import gc

import numpy as np
import pytest

import embfile


@pytest.fixture(params=["file", "shards"])
def db_path(tmp_path, request):
    keys = [f"k{i}" for i in range(40)]
    matrix = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    if request.param == "file":
        embfile.write(tmp_path / "db.emb", (keys, matrix))
        return tmp_path / "db.emb", keys, matrix
    embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=10 * 6 * 4)
    return tmp_path / "ds", keys, matrix


CLOSED_CALLS = {
    "db[key]": lambda db: db["k1"],
    "in": lambda db: "k1" in db,
    "len": len,
    "iter": list,
    "get": lambda db: db.get("k1"),
    "keys": lambda db: list(db.keys()),
    "values": lambda db: list(db.values()),
    "items": lambda db: list(db.items()),
    "get_batch": lambda db: db.get_batch(["k1"]),
    "rows": lambda db: db.rows(["k1"]),
    "take": lambda db: db.take([0]),
    "record": lambda db: db.record(0),
    "to_numpy": lambda db: db.to_numpy(),
    "metadata": lambda db: db.metadata,
    "verify": lambda db: db.verify(),
    "iter_batches": lambda db: next(iter(db.iter_batches(4))),
    "keys_between": lambda db: db.keys_between(0, 2),
}


@pytest.mark.parametrize("call", CLOSED_CALLS)
def test_closed_file_raises_a_clear_error(db_path, call):
    path, _, _ = db_path
    db = embfile.open(path)
    db.close()
    with pytest.raises(embfile.ClosedFileError, match="closed"):
        CLOSED_CALLS[call](db)
    db.close()  # closing twice is harmless
    assert "closed" in repr(db)


def test_arrays_held_past_close_stay_valid(db_path):
    """Views into the mapping keep it alive: reading them after close (and after the reader is
    gone) gives the data, never a fault on unmapped memory."""
    path, keys, matrix = db_path
    db = embfile.open(path)
    one, row, batch = db["k7"], db.record(-1), db.get_batch(keys[::3])
    whole = db.matrix if hasattr(db, "_h") else None
    epoch = iter(db.iter_batches(8, keys=False))
    first = next(epoch)
    db.close()
    if whole is not None:
        with pytest.raises(embfile.ClosedFileError):
            _ = db.matrix
    del db
    gc.collect()
    np.testing.assert_array_equal(one, matrix[7])
    np.testing.assert_array_equal(row, matrix[-1])
    np.testing.assert_array_equal(batch, matrix[::3])
    if whole is not None:
        np.testing.assert_array_equal(whole, matrix)
    assert first.shape == (8, 6)
    with pytest.raises(embfile.ClosedFileError):
        next(epoch)  # an epoch in progress stops cleanly


def test_a_batch_loop_interrupted_by_close(db_path):
    path, _, _ = db_path
    with embfile.open(path) as db:
        batches = db.iter_batches(4)
        next(batches)
    with pytest.raises(embfile.ClosedFileError):
        for _ in batches:
            pass


WRONG_TYPES = [
    (lambda db: db[1], "keys are str, not int"),
    (lambda db: db[b"k1"], "keys are str, not bytes"),
    (lambda db: 3 in db, "keys are str, not int"),
    (lambda db: db.get_batch("k1"), r"get_batch\(\) takes a sequence of keys, not a single key \(db\[key\]"),
    (lambda db: db.rows("k1"), r"rows\(\) takes a sequence of keys, not a single key"),
    (lambda db: db.get_batch(5), "sequence of str keys, not int"),
    (lambda db: db.get_batch([1, 2]), "keys are str, not int"),
    (lambda db: db.rows(None), "sequence of str keys, not NoneType"),
    (lambda db: db.take("k1"), "row numbers"),
    (lambda db: db.take([0.5]), "row numbers"),
    (lambda db: db.record("k1"), "row number is an int, not str"),
    (lambda db: db.record(1.5), "row number is an int, not float"),
    (lambda db: db.iter_batches("10"), "batch_size must be an int, not str"),
    (lambda db: db.iter_batches(4, seed="x"), "seed must be an int, not str"),
    (lambda db: db.iter_batches(4, epoch=1.5), "epoch must be an int, not float"),
    (lambda db: db.iter_batches(4, seeds=1), r"iter_batches\(\) has no option 'seeds': did you mean 'seed'\?"),
    (lambda db: db.search_keys("k1"), r"search_keys\(\) takes an iterable of keys, not a single key"),
    (lambda db: db.search(db["k1"], exclude="k1"), "exclude takes an iterable of keys, not a single key"),
    (lambda db: db.search(db["k1"], exclude=5), "exclude takes an iterable of keys, not int"),
]


@pytest.mark.parametrize("call,message", WRONG_TYPES)
def test_wrong_argument_types(db_path, call, message):
    path, _, _ = db_path
    with embfile.open(path) as db:
        with pytest.raises(TypeError, match=message):
            result = call(db)
            next(iter(result))


def test_out_of_range_rows_are_index_errors(db_path):
    path, _, matrix = db_path
    with embfile.open(path) as db:
        np.testing.assert_array_equal(db.record(-40), matrix[0])
        for bad in (40, -41, 2**70):
            with pytest.raises(IndexError, match="out of range"):
                db.record(bad)
        with pytest.raises(IndexError, match="rows must be from 0 to 39"):
            db.take([0, 40])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda p: embfile.open(None), "not NoneType"),
        (lambda p: embfile.open(3.5), "not float"),
        (lambda p: embfile.write(p, 5), "a mapping or a \\(keys, matrix\\) pair, not int"),
        (lambda p: embfile.write(p, {1: [1.0]}), "keys are str, not int"),
        (lambda p: embfile.Writer(p, 2.0), "dim must be an int, not float"),
        (lambda p: embfile.Writer(p, 2, metadata=[1]), "metadata must be a dict, not list"),
        (lambda p: embfile.Writer(p, 2, dtype="complex64"), "not supported"),
        (lambda p: embfile.Writer(p, 2).add("k", None), "expected a vector of numbers, not NoneType"),
        (lambda p: embfile.Writer(p, 2).add("k", "ab"), "expected a vector of numbers, not str"),
        (lambda p: embfile.Writer(p, 2).add_batch(["k"], [["a", "b"]]), "matrix of numbers, not list"),
    ],
)
def test_wrong_types_for_writing(tmp_path, call, message):
    with pytest.raises(TypeError, match=message):
        call(tmp_path / "x.emb")
    gc.collect()
    assert list(tmp_path.iterdir()) == []  # nothing left behind by the failed writers
