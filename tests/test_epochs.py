"""iter_batches: exactly once per epoch, ranks, workers, determinism, resume, the order itself, quality."""

import json
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import embfile
from embfile.epochs import Batches, EpochOptions, EpochPlan, rank_share, shuffle_quality


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """1,000 records whose first element is their row, so a batch tells where it came from."""
    n, dim = 1000, 6
    matrix = np.random.default_rng(1).random((n, dim)).astype(np.float32)
    matrix[:, 0] = np.arange(n)
    keys = [f"seq{i:05d}" for i in range(n)]
    path = tmp_path_factory.mktemp("epochs") / "db.emb"
    embfile.write(path, (keys, matrix))
    return path, keys, matrix


def rows_of(batches):
    return [int(r) for _, m in batches for r in m[:, 0]]


def test_every_record_once_with_its_key_and_vector(store):
    path, keys, matrix = store
    with embfile.open(path) as db:
        batches = list(db.iter_batches(64, seed=3, block_size=10, buffer_blocks=4))
    assert [len(k) for k, _ in batches] == [64] * 15 + [40]
    assert sorted(rows_of(batches)) == list(range(1000))
    for k, m in batches:
        assert m.flags.writeable and m.flags.c_contiguous and m.dtype == np.float32
        np.testing.assert_array_equal(m, matrix[[keys.index(x) for x in k]])


def test_order_depends_only_on_seed_and_epoch(store):
    path, _, _ = store
    with embfile.open(path) as db:

        def order(**kw):
            return rows_of(db.iter_batches(100, **kw))

        assert order(seed=1, epoch=2) == order(seed=1, epoch=2)
        assert order(seed=1, epoch=2) != order(seed=1, epoch=3) != order(seed=2, epoch=3)
        assert order(shuffle=False) == list(range(1000))
        assert order(shuffle=False, seed=5, epoch=9) == list(range(1000))


M64 = (1 << 64) - 1


def reference_order(n, block_size, buffer_blocks, seed, epoch):
    """The epoch order as the module docstring defines it, in plain Python (the oracle)."""

    def splitmix(state):
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return state, z ^ (z >> 31)

    def stream_seed(stream):
        _, a = splitmix(seed)
        _, b = splitmix(a ^ epoch)
        _, c = splitmix(b ^ stream)
        return c

    def shuffle(items, s):
        for i in range(len(items), 1, -1):
            while True:  # Lemire's unbiased bounded draw
                s, x = splitmix(s)
                m = x * i
                if (m & M64) >= (-i % (1 << 64)) % i:
                    break
            j = m >> 64
            items[i - 1], items[j] = items[j], items[i - 1]

    blocks = list(range(-(-n // block_size)))
    shuffle(blocks, stream_seed(M64))
    order = []
    for w in range(0, len(blocks), buffer_blocks):
        rows = [r for b in blocks[w : w + buffer_blocks] for r in range(b * block_size, min(n, (b + 1) * block_size))]
        shuffle(rows, stream_seed(w // buffer_blocks))
        order += rows
    return order


def test_the_order_is_the_documented_one():
    # The order is part of embfile's contract: a run resumed with another embfile version or on
    # another machine sees the same epoch.  A pure-Python oracle of the definition, and one pinned case.
    for n, block, buffer, seed, epoch in [(20, 3, 2, 7, 1), (1000, 7, 5, 2**64 - 1, 3), (97, 1, 97, 0, 0)]:
        plan = EpochPlan(n, block_size=block, buffer_blocks=buffer, seed=seed, epoch=epoch)
        assert plan.order().tolist() == reference_order(n, block, buffer, seed, epoch)
    assert EpochPlan(20, block_size=3, buffer_blocks=2, seed=7, epoch=1).order().tolist() == [
        0,
        2,
        6,
        8,
        7,
        1,
        19,
        4,
        18,
        5,
        3,
        12,
        11,
        9,
        14,
        10,
        13,
        17,
        16,
        15,
    ]


@given(
    n=st.integers(0, 700),
    batch=st.integers(1, 90),
    block=st.integers(1, 50),
    buffer=st.integers(1, 9),
    world=st.integers(1, 5),
    seed=st.integers(0, 2**64 - 1),
)
def test_ranks_split_an_epoch_exactly(n, batch, block, buffer, world, seed):
    plan = EpochPlan(n, block_size=block, buffer_blocks=buffer, seed=seed)
    order = plan.order()
    assert sorted(order.tolist()) == list(range(n))
    # without drop_last the ranks' shares tile the epoch, sizes within one of each other
    shares = [rank_share(n, r, world, batch, False) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(h - lo for lo, h in shares) - min(h - lo for lo, h in shares) <= 1
    # with drop_last every rank has the same number of whole batches, disjoint, dropping little
    shares = [rank_share(n, r, world, batch, True) for r in range(world)]
    sizes = {h - lo for lo, h in shares}
    assert len(sizes) == 1 and sizes.pop() % batch == 0
    assert all(a[1] <= b[0] for a, b in zip(shares, shares[1:]))
    assert n - sum(h - lo for lo, h in shares) < world * batch + world
    # plan.rows over any split equals slicing the order
    cut = sorted({0, n, n // 3, n // 2})
    assert np.concatenate([plan.rows(a, b) for a, b in zip(cut, cut[1:])] or [order]).tolist() == order.tolist()


def test_ranks_read_disjoint_parts(store):
    path, _, _ = store
    with embfile.open(path) as db:
        parts = [rows_of(db.iter_batches(30, seed=4, rank=r, world_size=3)) for r in range(3)]
        assert sorted(sum(parts, [])) == list(range(1000))
        even = [list(db.iter_batches(30, seed=4, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert len({len(p) for p in even}) == 1
    assert all(len(k) == 30 for p in even for k, _ in p)
    flat = [r for p in even for r in rows_of(p)]
    assert len(flat) == len(set(flat)) == 990


def test_workers_each_take_every_kth_batch_of_one_sequence(store):
    path, _, _ = store
    with embfile.open(path) as db:
        whole = [k for k, _ in db.iter_batches(70, seed=8, epoch=1)]
        for workers in (2, 3, 7):
            options = EpochOptions(70, seed=8, epoch=1)
            its = [Batches(db, options, worker=w, num_workers=workers) for w in range(workers)]
            assert sum(len(it) for it in its) == len(whole)
            merged, live = [], list(its)
            while live:  # the DataLoader's round robin
                for it in list(live):
                    try:
                        merged.append(next(it)[0])
                    except StopIteration:
                        live.remove(it)
            assert merged == whole


def test_resume_continues_with_exactly_the_records_not_yet_seen(store):
    path, _, _ = store
    with embfile.open(path) as db:
        whole = rows_of(db.iter_batches(64, seed=2, epoch=5, rank=1, world_size=2))
        it = db.iter_batches(64, seed=2, epoch=5, rank=1, world_size=2)
        first = rows_of([next(it) for _ in range(3)])
        state = json.loads(json.dumps(it.state_dict()))
        again = db.iter_batches(64, seed=2, epoch=5, rank=1, world_size=2)
        again.load_state_dict(state)
        assert len(again) == len(whole) // 64 + 1 - 3
        assert first + rows_of(again) == whole
        for wrong in (dict(seed=3), dict(epoch=4), dict(world_size=3), dict(block_size=7)):
            other = db.iter_batches(64, **{**dict(seed=2, epoch=5, rank=1, world_size=2), **wrong})
            with pytest.raises(ValueError, match="state was saved with"):
                other.load_state_dict(state)


def test_transform_and_keyless_batches(store):
    path, _, matrix = store
    with embfile.open(path) as db:
        sums = list(db.iter_batches(250, shuffle=False, keys=False, transform=lambda m: m.sum(axis=1)))
    np.testing.assert_allclose(np.concatenate(sums), matrix.sum(axis=1), rtol=1e-6)


def test_bad_arguments_say_what_was_expected(store):
    path, _, _ = store
    with embfile.open(path) as db:
        with pytest.raises(TypeError, match="batch_size must be an int"):
            db.iter_batches("64")
        with pytest.raises(TypeError, match="seed must be an int"):
            db.iter_batches(seed=1.5)
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            db.iter_batches(0)
        with pytest.raises(ValueError, match="rank 2 is not below world_size 2"):
            db.iter_batches(rank=2, world_size=2)
        with pytest.raises(TypeError, match="transform must be callable"):
            db.iter_batches(transform="x")
        with pytest.raises(TypeError, match="take"):
            db.take(["a"])
        with pytest.raises(IndexError):
            db.take([1000])
    with pytest.raises(embfile.ClosedFileError):
        db.iter_batches()


def test_empty_and_tiny_files(tmp_path):
    embfile.write(tmp_path / "one.emb", (["a"], np.ones((1, 3))))
    with embfile.open(tmp_path / "one.emb") as db:
        assert [k for k, _ in db.iter_batches(10)] == [["a"]]
        assert list(db.iter_batches(10, drop_last=True)) == []
    with embfile.Writer(tmp_path / "none.emb", 3):
        pass
    with embfile.open(tmp_path / "none.emb") as db:
        assert list(db.iter_batches(10)) == [] and len(db.iter_batches()) == 0


def test_the_read_ahead_thread_ends_with_the_epoch(store):
    path, _, _ = store
    before = threading.active_count()
    with embfile.open(path) as db:
        for _ in db.iter_batches(100, block_size=10, buffer_blocks=2):
            pass
        it = db.iter_batches(100)
        next(it)
        it.close()
    assert threading.active_count() == before


def test_shuffle_quality_is_close_to_a_full_permutation():
    n, block = 200_000, 100
    full = shuffle_quality(np.random.default_rng(0).permutation(n), block)
    ours = shuffle_quality(EpochPlan(n, block_size=block).order(), block)
    blocks_only = shuffle_quality(EpochPlan(n, block_size=block, buffer_blocks=1).order(), block)
    in_order = shuffle_quality(np.arange(n), block)
    assert ours["gap_entropy"] > 0.98 * full["gap_entropy"]
    assert abs(ours["displacement"] - full["displacement"]) < 0.03
    assert abs(ours["rank_correlation"]) < 0.1
    assert ours["neighbour_rate"] < 0.03
    assert blocks_only["gap_entropy"] < 0.5 * full["gap_entropy"] and blocks_only["neighbour_rate"] > 0.9
    assert in_order["gap_entropy"] == 0 and in_order["rank_correlation"] == 1


@pytest.mark.parametrize("source", ["file", "shards"])
def test_direct_reads_give_the_mapped_paths_batches(store, tmp_path, source):
    """read="direct" (O_DIRECT into the epoch's own buffers) yields the very batches of the mapped path: for
    ranks, batches running across windows and files, and a resumed epoch."""
    path, keys, matrix = store
    if source == "shards":
        embfile.write_shards(tmp_path / "ds", (keys, matrix), shard_bytes=24 * 137)  # parts of 137 records
        path = tmp_path / "ds"
    with embfile.open(path) as db:
        for options in (
            dict(seed=3, block_size=10, buffer_blocks=4),
            dict(seed=5, rank=1, world_size=3, drop_last=True, block_size=7, buffer_blocks=3),
            dict(shuffle=False, block_size=50, buffer_blocks=2),
        ):
            mapped = list(db.iter_batches(64, read="mapped", **options))
            it = db.iter_batches(64, read="direct", **options)
            assert it._direct is not None  # the disk takes O_DIRECT: this is the direct path
            direct = list(it)
            assert [k for k, _ in direct] == [k for k, _ in mapped]
            assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(direct, mapped))
        whole = rows_of(db.iter_batches(64, seed=2, block_size=10, buffer_blocks=4, read="direct"))
        it = db.iter_batches(64, seed=2, block_size=10, buffer_blocks=4, read="direct")
        first = rows_of([next(it) for _ in range(5)])
        again = db.iter_batches(64, seed=2, block_size=10, buffer_blocks=4, read="mapped")
        again.load_state_dict(it.state_dict())  # a state resumes on either path
        assert first + rows_of(again) == whole and sorted(whole) == list(range(1000))


def test_direct_reads_hold_about_two_windows(tmp_path):
    n, dim = 40_000, 256  # 1 KiB records: windows of 4 MiB, ten of them
    m = np.random.default_rng(2).random((n, dim)).astype(np.float32)
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(n)], m))
    with embfile.open(tmp_path / "db.emb") as db:
        it = db.iter_batches(500, seed=1, block_size=1000, buffer_blocks=4, read="direct")
        held, seen = 0, 0
        for keys, _ in it:
            seen += len(keys)
            if it._direct is not None:
                buffers = [*it._direct.spare, *(w[0] for w in it._direct.windows.values())]
                held = max(held, sum(len(b) for b in buffers))
        window = 4 * 1000 * 1024
        assert seen == n and window < held <= 3 * (window * 9 // 8 + (1 << 20))


def test_direct_reads_fall_back_to_the_mapping_where_refused(store, monkeypatch):
    import errno
    import os

    from embfile import _direct

    def refuse(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused", path)
        return os.open(path, flags, *args)

    monkeypatch.setattr(_direct.os, "open", refuse)  # as tmpfs and some network file systems answer
    path, _, _ = store
    with embfile.open(path) as db:
        it = db.iter_batches(64, seed=3, read="direct")
        assert it._direct is None
        assert sorted(rows_of(it)) == list(range(1000))
    with pytest.raises(ValueError, match="read must be one of 'auto', 'mapped', 'direct'"):
        embfile.EpochOptions(read="fast")


@pytest.mark.parametrize("options", [dict(pad=True), dict(pad=False), dict(token_budget=60), dict(unit="row")])
def test_direct_reads_of_ragged_records_give_the_mapped_paths_batches(tmp_path, options):
    rng = np.random.default_rng(5)
    records = {f"P{i:04d}": rng.random((int(rng.integers(1, 30)), 8)).astype(np.float32) for i in range(400)}
    embfile.write_shards(tmp_path / "ds", records, ragged=True, shard_bytes=32 * 1500)
    with embfile.open(tmp_path / "ds") as db:
        common = dict(seed=4, block_size=16, buffer_blocks=3, batch_size=32, **options)
        mapped = list(db.iter_batches(read="mapped", **common))
        it = db.iter_batches(read="direct", **common)
        assert it._direct is not None
        direct = list(it)
        assert len(direct) == len(mapped)
        for a, b in zip(direct, mapped):
            assert list(a[0]) == list(b[0])
            for x, y in zip(a[1:], b[1:]):
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
