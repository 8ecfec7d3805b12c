"""embfile.torch with a real DataLoader: workers under fork and spawn, exactly once, determinism, resume."""

import os
import time

import numpy as np
import pytest

import embfile

torch = pytest.importorskip("torch")  # the test extra installs it; a core install need not
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")
from torch.utils.data import DataLoader  # noqa: E402

from embfile.torch import Dataset, IterableDataset  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    n = 1200
    matrix = np.random.default_rng(3).random((n, 8)).astype(np.float32)
    keys = [f"P{i:05d}" for i in range(n)]
    folder = tmp_path_factory.mktemp("torch")
    embfile.write(folder / "db.emb", (keys, matrix))
    embfile.write_shards(folder / "ds", (keys, matrix), shard_bytes=400 * 32)
    return folder, keys, matrix


def epoch(ds, workers, context=None):
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context if workers else None)
    return [(list(k), x) for k, x in loader]


@pytest.mark.parametrize("source", ["db.emb", "ds"])
def test_same_batches_for_any_number_of_workers_fork_and_spawn(store, source):
    folder, keys, matrix = store
    ds = IterableDataset(folder / source, 100, seed=11, epoch=2, keys=True)
    alone = epoch(ds, 0)
    assert len(alone) == len(ds) == 12
    assert sorted(k for ks, _ in alone for k in ks) == keys
    for ks, x in alone:
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), matrix[[int(k[1:]) for k in ks]])
    for workers, context in ((2, "fork"), (3, "spawn")):
        got = epoch(ds, workers, context)
        assert [k for k, _ in got] == [k for k, _ in alone]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, alone))


def test_epochs_differ_and_repeat(store):
    folder, _, _ = store
    ds = IterableDataset(folder / "db.emb", 100, seed=1, keys=True)
    first = [k for k, _ in epoch(ds, 0)]
    ds.set_epoch(1)
    second = [k for k, _ in epoch(ds, 2, "fork")]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    ds.set_epoch(0)
    assert [k for k, _ in epoch(ds, 0)] == first


def test_ddp_ranks_get_equal_disjoint_shares(store):
    folder, keys, _ = store
    shares = [
        epoch(
            IterableDataset(folder / "db.emb", 64, seed=5, rank=r, world_size=3, drop_last=True, keys=True), 2, "fork"
        )
        for r in range(3)
    ]
    assert [len(s) for s in shares] == [6, 6, 6]  # 400 each: 6 whole batches of 64
    flat = [k for s in shares for ks, _ in s for k in ks]
    assert len(flat) == len(set(flat)) == 3 * 6 * 64
    loose = [
        epoch(IterableDataset(folder / "db.emb", 64, seed=5, rank=r, world_size=3, keys=True), 0) for r in range(3)
    ]
    assert sorted(k for s in loose for ks, _ in s for k in ks) == keys


def test_resume_mid_epoch_with_workers(store):
    folder, _, _ = store
    ds = IterableDataset(folder / "db.emb", 50, seed=9, epoch=4, keys=True)
    whole = [k for k, _ in epoch(ds, 0)]
    seen = []
    for i, (k, _) in enumerate(DataLoader(ds, batch_size=None, num_workers=2)):
        seen.append(list(k))
        if i == 6:
            break  # the job dies here
    state = ds.state_dict(batches_seen=len(seen))
    fresh = IterableDataset(folder / "db.emb", 50, seed=9, keys=True)
    fresh.load_state_dict(state)
    assert len(fresh) == len(whole) - 7
    rest = [k for k, _ in epoch(fresh, 2, "spawn")]
    assert seen + rest == whole
    with pytest.raises(ValueError, match="state was saved with seed=9"):
        IterableDataset(folder / "db.emb", 50, seed=10, keys=True).load_state_dict(state)


def test_map_style_dataset_by_row_and_by_key(store):
    folder, keys, matrix = store
    ds = Dataset(folder / "db.emb")
    assert len(ds) == 1200
    np.testing.assert_array_equal(ds[7].numpy(), matrix[7])
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    total = torch.zeros(8, dtype=torch.float64)
    for x in loader:
        assert x.shape[1] == 8
        total += x.double().sum(0)
    np.testing.assert_allclose(total.numpy(), matrix.astype(np.float64).sum(0), rtol=1e-6)
    by_key = Dataset(folder / "ds", keys=keys[::-1])
    np.testing.assert_array_equal(by_key[0].numpy(), matrix[-1])
    for items in (ds, by_key):  # from the end, as Python counts (was "rows must be from 0 to 1199")
        np.testing.assert_array_equal(items[-1].numpy(), items[len(items) - 1].numpy())
        np.testing.assert_array_equal(items[[0, -2]].numpy(), items[[0, len(items) - 2]].numpy())
        for wrong in (1200, -1201):
            with pytest.raises(IndexError, match=f"index {wrong} is out of range for 1200 items"):
                items[wrong]
    batch = next(iter(DataLoader(by_key, batch_size=5, num_workers=2, multiprocessing_context="spawn")))
    np.testing.assert_array_equal(batch.numpy(), matrix[::-1][:5])
    with pytest.raises(KeyError, match="missing"):
        Dataset(folder / "db.emb", keys=["P00001", "missing"])
    with pytest.raises(TypeError, match="not a single key"):
        Dataset(folder / "db.emb", keys="P00001")
    from embfile.torch import BatchSampler, Loader

    typos = {  # each was Python's "EpochOptions.__init__() got an unexpected keyword argument"
        lambda: IterableDataset(folder / "db.emb", 8, shufle=False): "IterableDataset.. has no option 'shufle': did",
        lambda: BatchSampler(ds, 8, seeds=1): r"BatchSampler\(\) has no option 'seeds': did you mean 'seed'",
        lambda: Loader(folder / "db.emb", 8, num_workers=2): r"Loader\(\) starts no worker processes",
    }
    for make, message in typos.items():
        with pytest.raises(TypeError, match=message):
            make()
    miswired = {  # batches of batches: a silent (8, 100, dim) tensor, and "take() needs a 1-d sequence"
        "IterableDataset yields whole batches: give the DataLoader batch_size=None": (
            IterableDataset(folder / "db.emb", 100),
            {"batch_size": 8},
        ),
        "a batch of batches: .* batch_size=None with sampler=BatchSampler": (
            ds,
            {"batch_size": 8, "sampler": BatchSampler(ds, 100)},
        ),
    }
    for message, (dataset, options) in miswired.items():
        for workers in (0, 2):
            with pytest.raises(Exception, match=message):
                next(iter(DataLoader(dataset, num_workers=workers, **options)))


def test_transform_gets_tensors(store):
    folder, _, matrix = store
    ds = IterableDataset(folder / "db.emb", 300, shuffle=False, transform=lambda x: x.sum(1))
    got = torch.cat(list(DataLoader(ds, batch_size=None)))
    np.testing.assert_allclose(got.numpy(), matrix.sum(1), rtol=1e-5)


@pytest.fixture(scope="module")
def residues(tmp_path_factory):
    """Per-residue records: 300 keys of 5 to 400 rows."""
    rng = np.random.default_rng(4)
    records = {f"P{i:04d}": rng.random((int(n), 4)).astype(np.float32) for i, n in enumerate(rng.integers(5, 400, 300))}
    path = tmp_path_factory.mktemp("residues") / "r.emb"
    embfile.write(path, records, ragged=True)
    return path, records


def test_map_style_per_residue_items_collate_with_a_mask(residues):
    from embfile.torch import collate

    path, records = residues
    keys = list(records)[::-1]
    loader = DataLoader(Dataset(path, keys=keys), batch_size=16, num_workers=2, collate_fn=collate)
    seen = 0
    for x, mask in loader:
        batch = keys[seen : seen + len(x)]
        for i, k in enumerate(batch):
            assert mask[i].sum() == len(records[k]) and not mask[i, len(records[k]) :].any()
            np.testing.assert_array_equal(x[i, : len(records[k])].numpy(), records[k])
            assert (x[i, len(records[k]) :] == 0).all()
        seen += len(x)
    assert seen == len(keys)
    assert Dataset(path)[3].shape == records[keys[-4]].shape
    batches = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(keys), 16, False)
    loader = DataLoader(Dataset(path, keys=keys), batch_size=None, sampler=batches, num_workers=2)
    with embfile.open(path) as db:
        for (x, mask), rows in zip(loader, batches, strict=True):  # each item a whole batch, padded natively
            want, want_mask = db.get_batch([keys[i] for i in rows])
            assert torch.equal(x, torch.from_numpy(want)) and torch.equal(mask, torch.from_numpy(want_mask))
    for workers in (0, 2):  # torch's default collate: its "stack expects each tensor to be equal size" said nothing
        with pytest.raises(Exception, match=r"pass collate_fn=embfile.torch.collate to the DataLoader"):
            next(iter(DataLoader(Dataset(path, keys=keys), batch_size=16, num_workers=workers)))


def test_map_style_items_carry_their_targets(store, residues):
    from embfile.torch import BatchSampler, collate

    folder, keys, matrix = store
    row_of = {k: i for i, k in enumerate(keys)}
    labels = {k: i % 7 for i, k in enumerate(keys)}
    split = keys[::3][::-1]
    by_key = Dataset(folder / "ds", keys=split, targets=labels)
    x, y = by_key[5]
    assert torch.equal(x, torch.from_numpy(matrix[row_of[split[5]]])) and y.item() == labels[split[5]]
    loaders = [
        DataLoader(by_key, batch_size=32, shuffle=True, collate_fn=collate),
        DataLoader(by_key, batch_size=32, shuffle=True),  # torch's default collate stacks the pairs
        DataLoader(by_key, batch_size=None, sampler=BatchSampler(by_key, 32, seed=1), num_workers=2),
    ]
    for loader in loaders:
        seen = []
        for x, y in loader:
            rows = [int(np.flatnonzero((matrix == v).all(1))[0]) for v in x.numpy()]
            assert y.tolist() == [labels[keys[r]] for r in rows]
            seen += rows
        assert sorted(seen) == sorted(row_of[k] for k in split)
    soft = np.random.default_rng(1).random((len(keys), 3)).astype(np.float32)  # by row: arrays, not numbers
    x, y = Dataset(folder / "db.emb", targets=torch.from_numpy(soft))[[4, 9]]
    assert torch.equal(x, torch.from_numpy(matrix[[4, 9]])) and torch.equal(y, torch.from_numpy(soft[[4, 9]]))
    path, records = residues
    names = list(records)
    lengths = Dataset(path, targets={k: len(m) for k, m in records.items()})
    for workers in (0, 2):
        x, mask, y = next(iter(DataLoader(lengths, batch_size=8, collate_fn=collate, num_workers=workers)))
        assert mask.sum(1).tolist() == y.tolist() == [len(records[k]) for k in names[:8]]
    pd = pytest.importorskip("pandas")
    table = pd.DataFrame({"id": keys, "label": [labels[k] for k in keys]}).sample(frac=1, random_state=0)
    for column in (table.set_index("id")["label"], table.set_index("id")):  # labels read with index_col="id"
        _, y = Dataset(folder / "ds", keys=split, targets=column)[[5, 6]]  # by key, whatever the table's order
        assert y.flatten().tolist() == [labels[split[5]], labels[split[6]]]
    _, y = Dataset(folder / "db.emb", targets=table["label"].sort_index())[[5, 6]]  # numbered: in row order
    assert y.tolist() == [labels[keys[5]], labels[keys[6]]]
    mistakes = {
        "targets has no target for 2 of the 1200 keys, 'P00000' first": dict.fromkeys(keys[2:], 1),
        "targets has no target for 1 of the 1200 keys, 'P00001' first": table.set_index("id")["label"].drop(keys[1]),
        "targets' index holds 'P00003' more than once": table.set_index("id")["label"].rename({keys[4]: keys[3]}),
        "targets' index holds floating values: index the targets by key": table["label"].set_axis(
            np.arange(len(keys)) + 0.5
        ),
        "3 targets for 1200 items": [1, 2, 3],
        "targets differ in shape": [np.zeros(i % 3) for i in range(len(keys))],
        "targets must be numbers": [str(i) for i in range(len(keys))],
    }
    for message, targets in mistakes.items():
        with pytest.raises((KeyError, ValueError, TypeError), match=message):
            Dataset(folder / "db.emb", targets=targets)


def test_epochs_carry_their_targets_through_every_loader(store, residues):
    from embfile.torch import Loader, collate

    folder, keys, matrix = store
    labels = {k: i % 7 for i, k in enumerate(keys)}
    with embfile.open(folder / "ds") as db:
        seen = []
        for names, _x, y in db.iter_batches(100, seed=4, targets=labels):
            assert y.tolist() == [labels[k] for k in names]
            seen += names
        assert sorted(seen) == keys
    loaders = [
        DataLoader(IterableDataset(folder / "db.emb", 64, seed=2, keys=True, targets=labels), None, num_workers=2),
        Loader(folder / "db.emb", 64, seed=2, keys=True, targets=labels),
    ]
    for loader in loaders:
        assert sum(len(y) for names, x, y in loader if y.tolist() == [labels[k] for k in names]) == len(keys)
    path, records = residues
    lengths = np.array([len(m) for m in records.values()])  # in row order
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    row_numbers = {k: start + np.arange(n) for k, start, n in zip(records, starts, lengths)}  # a label per residue
    every_row = np.concatenate(list(records.values()))
    with embfile.open(path) as db:
        for names, _padded, mask, y in db.iter_batches(token_budget=3000, seed=1, targets=lengths):
            assert mask.sum(1).tolist() == y.tolist() == [len(records[k]) for k in names]
        with pytest.raises(ValueError, match="here are one per record; unit='row' batches rows: give one per residue"):
            db.iter_batches(64, unit="row", targets=lengths)
        for names, padded, mask, y in db.iter_batches(token_budget=3000, seed=1, targets=row_numbers):
            assert y.shape == mask.shape and not y[~mask].any()
            assert all(np.array_equal(padded[i][mask[i]], every_row[y[i][mask[i]]]) for i in range(len(names)))
        for _names, rows, offsets, y in db.iter_batches(16, pad=False, targets=row_numbers):
            assert len(y) == offsets[-1] and np.array_equal(rows, every_row[y])
        seen = []
        for _names, rows, y in db.iter_batches(64, unit="row", seed=2, targets=row_numbers):
            assert np.array_equal(rows, every_row[y])
            seen += y.tolist()
        assert sorted(seen) == list(range(len(every_row)))
    by_key = Dataset(path, keys=list(records)[::-1], targets=row_numbers)
    for collate_fn in (collate, lambda items: collate(items)):  # the batch whole, or items padded by collate
        for x, mask, y in DataLoader(by_key, batch_size=8, collate_fn=collate_fn, num_workers=2):
            assert y.shape == mask.shape and torch.equal(x[mask], torch.from_numpy(every_row[y[mask].numpy()]))


def test_token_budget_epochs_through_loader_workers_give_every_record_once(residues):
    path, records = residues
    ds = IterableDataset(path, token_budget=4000, keys=True, seed=2)
    one = [(tuple(k), x.shape) for k, x, mask in DataLoader(ds, batch_size=None)]
    two = [(tuple(k), x.shape) for k, x, mask in DataLoader(ds, batch_size=None, num_workers=2)]
    assert one == two  # the same batches in the same order for any number of workers
    assert sorted(k for keys, _ in one for k in keys) == sorted(records)
    assert all(shape[0] * shape[1] <= 4000 or shape[0] == 1 for _, shape in one)
    state = ds.state_dict(5)
    resumed = IterableDataset(path, token_budget=4000, keys=True, seed=2)
    resumed.load_state_dict(state)
    assert [(tuple(k), x.shape) for k, x, _ in DataLoader(resumed, batch_size=None)] == one[5:]


def shm_files():
    return {n for n in os.listdir("/dev/shm") if n.startswith("embfile-")} if os.path.isdir("/dev/shm") else set()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_hand_batches_over_in_reused_buffers(store, context):
    """Batches come back whole through a few buffers per worker, reused once the main process drops them;
    views kept of earlier batches stay right; nothing is left in /dev/shm."""
    from embfile import _handover

    folder, keys, matrix = store
    before = shm_files()
    ds = IterableDataset(folder / "db.emb", 20, seed=3, keys=True)
    want = epoch(ds, 0)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=context, persistent_workers=True)
    kept = []
    for (ks, x), (want_keys, want_x) in zip(loader, want, strict=True):
        assert list(ks) == want_keys and torch.equal(x, want_x)
        kept.append(x[:, :2])  # a view outlives its batch: its buffer must not be reused under it
    assert all(torch.equal(v, w[:, :2]) for v, (_, w) in zip(kept, want))
    paths = [p for p in _handover._OPEN if not p.endswith("-flags")]
    assert len(paths) >= 60  # every batch held (by its view): none reused
    kept.clear()
    for _ in loader:  # nothing held: a handful of buffers serve all 60 batches
        pass
    assert len([p for p in _handover._OPEN if not p.endswith("-flags")]) - len(paths) <= 2 * 8
    del loader
    assert shm_files() == before


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "uint32"])
def test_workers_hand_over_every_stored_dtype(tmp_path, dtype):
    """Batches of types numpy lacks (bfloat16) or torch lacks elsewhere come through the buffers as stored."""
    matrix = (np.random.default_rng(0).random((300, 6)) * 100).astype(np.float32)
    if dtype.startswith(("int", "uint")):
        matrix = matrix.astype(dtype)
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(300)], matrix), dtype=dtype)
    ds = IterableDataset(tmp_path / "db.emb", 32, seed=2)
    alone = epoch_tensors(ds, 0)
    assert alone[0].dtype == getattr(torch, dtype)
    got = epoch_tensors(ds, 2, "fork")
    assert len(got) == len(alone) and all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, alone))


def epoch_tensors(ds, workers, context=None):
    return list(DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context=context))


def test_workers_past_the_buffer_limit_hand_over_the_usual_way(store, monkeypatch):
    from embfile import _handover

    monkeypatch.setattr(_handover, "MAX_BUFFERS", 3)  # the fork-started workers inherit it
    folder, _, matrix = store
    ds = IterableDataset(folder / "db.emb", 50, shuffle=False)
    held = list(DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork"))
    np.testing.assert_array_equal(torch.cat(held).numpy(), matrix)


def test_map_style_batches_through_collate_in_workers(store):
    from embfile.torch import collate

    folder, keys, matrix = store
    ds = Dataset(folder / "db.emb")
    assert torch.equal(collate([ds[i] for i in range(3)]), torch.from_numpy(matrix[:3]))  # rows of no one batch
    g = torch.Generator()
    sampler = torch.utils.data.RandomSampler(ds, generator=g)
    g.manual_seed(1)
    want = [matrix[b] for b in torch.utils.data.BatchSampler(sampler, 64, False)]
    for workers, context in ((0, None), (2, "fork"), (2, "spawn")):
        g.manual_seed(1)
        loader = DataLoader(
            ds, 64, sampler=sampler, collate_fn=collate, num_workers=workers, multiprocessing_context=context
        )
        got = list(loader)
        assert len(got) == len(want) and all(np.array_equal(x.numpy(), w) for x, w in zip(got, want))
        g.manual_seed(1)  # a batch sampler as the sampler: each item is a whole batch
        batches = torch.utils.data.BatchSampler(sampler, 64, False)
        loader = DataLoader(ds, None, sampler=batches, num_workers=workers, multiprocessing_context=context)
        got = list(loader)
        assert len(got) == len(want) and all(np.array_equal(x.numpy(), w) for x, w in zip(got, want))


def test_collate_passes_on_what_is_a_batch_already(store, residues):
    """Without a batch_size, a DataLoader hands each item, a whole batch, to its collate_fn: given
    ``collate_fn=collate`` too, batches of a batch sampler or of the iterable dataset, per protein or per residue,
    padded or packed, with keys or without, come as they would without it, in workers too."""
    from embfile.torch import BatchSampler, collate

    folder, _, _ = store
    path, _ = residues
    sources = ((folder / "db.emb", {}), (path, {}), (path, {"pad": False}), (folder / "ds", {"keys": True}))
    for source, options in sources:
        by_row = Dataset(source)
        made = [
            (by_row, {"sampler": BatchSampler(by_row, 50, seed=3)}),
            (IterableDataset(source, 50, seed=3, **options), {}),
        ]
        for ds, sampler in made:
            for workers in (0, 2):
                want = list(DataLoader(ds, batch_size=None, num_workers=workers, **sampler))
                got = list(DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=collate, **sampler))
                assert len(got) == len(want) > 1
                for a, b in zip(got, want):
                    assert isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor) and len(a) == len(b)
                    for x, y in zip(a, b) if isinstance(a, (tuple, list)) else [(a, b)]:
                        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_a_batch_for_embfile_collate_is_not_split_into_rows(store, residues, monkeypatch):
    """:func:`collate` takes a gathered batch back whole, so no tensor per row is made for it (per-residue
    records come padded from the core); any other collate (the default, ``torch.stack``, a user's own) gets
    the rows."""
    from embfile import torch as adapter

    folder, keys, matrix = store
    made = []  # for each batch gathered whole: how many items it came with
    original = adapter._Batch.__init__

    def init(self, batch, items=()):
        items = list(items)
        made.append(len(items))
        original(self, batch, items)

    monkeypatch.setattr(adapter._Batch, "__init__", init)
    ds = Dataset(folder / "db.emb")
    for collate_fn, items in ((adapter.collate, 0), (None, 64), (torch.stack, 64), (lambda b: adapter.collate(b), 64)):
        made.clear()
        batch = next(iter(DataLoader(ds, 64, collate_fn=collate_fn)))
        assert torch.equal(batch, torch.from_numpy(matrix[:64])) and made == [items]
    path, records = residues
    for collate_fn, whole in ((adapter.collate, [0]), (lambda b: adapter.collate(b), [])):
        made.clear()
        padded, mask = next(iter(DataLoader(Dataset(path), 16, collate_fn=collate_fn)))
        assert made == whole and mask.dtype == torch.bool and padded.dtype == torch.float32
        longest = max(len(v) for v in list(records.values())[:16])
        assert padded.shape == (16, longest, 4) and mask.shape == (16, longest)
        for i, v in enumerate(list(records.values())[:16]):
            assert torch.equal(padded[i, : len(v)], torch.from_numpy(v)) and not padded[i, len(v) :].any()
            assert mask[i, : len(v)].all() and not mask[i, len(v) :].any()


def sampled(ds, sampler, workers=0, context=None):
    loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers, multiprocessing_context=context)
    return [x.numpy() for x in loader]


def test_batch_sampler_reads_the_iterable_epoch_through_workers(store):
    """The map-style path through embfile's BatchSampler: the epoch of iter_batches with the same options,
    every row once, the same batches with and without workers (fork, spawn), epochs that differ."""
    from embfile.torch import BatchSampler

    folder, _, matrix = store
    ds = Dataset(folder / "ds", keys=None)
    sampler = BatchSampler(ds, 100, seed=11, epoch=2, block_size=40)
    want = [x.numpy() for x in IterableDataset(folder / "ds", 100, seed=11, epoch=2, block_size=40)]
    assert len(sampler) == 12 and all(b.dtype == np.int64 for b in sampler)
    with embfile.open(folder / "ds") as db:  # the embfile dataset itself (was "has no attribute 'store'")
        for given in (db, folder / "ds"):
            assert all(
                np.array_equal(a, b) for a, b in zip(BatchSampler(given, 100, seed=11, epoch=2, block_size=40), sampler)
            )
    for workers, context in ((0, None), (2, "fork"), (3, "spawn")):
        got = sampled(ds, sampler, workers, context)
        assert len(got) == 12 and all(np.array_equal(a, b) for a, b in zip(got, want))
    rows = np.concatenate(list(sampler))
    assert sorted(rows.tolist()) == list(range(1200))
    sampler.set_epoch(3)
    assert not np.array_equal(np.concatenate(list(sampler)), rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(sampled(ds, sampler, 2, "fork")), 0), np.sort(matrix, 0))
    with pytest.raises(TypeError, match=r"BatchSampler\(\) has no option 'keys': options are block_size"):
        BatchSampler(ds, 100, keys=True)


def test_batch_sampler_ranks_and_resume(store):
    from embfile.torch import BatchSampler

    folder, keys, _ = store
    ds = Dataset(folder / "db.emb")
    shares = [list(BatchSampler(ds, 64, seed=5, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert [len(s) for s in shares] == [6, 6, 6]
    flat = np.concatenate([b for s in shares for b in s])
    assert len(flat) == len(set(flat.tolist())) == 3 * 6 * 64
    loose = [BatchSampler(ds, 64, seed=5, rank=r, world_size=3) for r in range(3)]
    assert sorted(np.concatenate([b for s in loose for b in s]).tolist()) == list(range(len(keys)))

    sampler = BatchSampler(ds, 50, seed=9, epoch=4)
    whole = sampled(ds, sampler)
    seen = []
    for i, x in enumerate(DataLoader(ds, batch_size=None, sampler=sampler, num_workers=2)):
        seen.append(x.numpy())
        if i == 6:
            break  # the job dies here
    state = sampler.state_dict(batches_seen=len(seen))
    fresh = BatchSampler(ds, 50, seed=9)
    fresh.load_state_dict(state)
    assert len(fresh) == len(whole) - 7
    rest = sampled(ds, fresh, 2, "spawn")
    assert all(np.array_equal(a, b) for a, b in zip(seen + rest, whole)) and len(seen + rest) == len(whole)
    with pytest.raises(ValueError, match="state was saved with seed=9"):
        BatchSampler(ds, 50, seed=10).load_state_dict(state)


def test_loader_without_workers(store):
    """embfile.torch.Loader: the dataset's batches, transformed on threads and still in order, resumable."""
    import random
    import time

    from embfile.torch import Loader

    folder, _, matrix = store

    def slow_sum(batch):
        keys, x = batch
        time.sleep(random.random() / 500)  # finish out of order
        return keys, x.sum(1)

    want = [(k, x.sum(1)) for k, x in epoch(IterableDataset(folder / "db.emb", 50, seed=9, epoch=4, keys=True), 0)]
    loader = Loader(folder / "db.emb", 50, seed=9, epoch=4, keys=True, transform=slow_sum, threads=3, device="cpu")
    got = list(loader)
    assert len(loader) == len(want) == len(got) == 24
    assert [list(k) for k, _ in got] == [k for k, _ in want] and all(
        torch.equal(a, b) for (_, a), (_, b) in zip(got, want)
    )
    seen = []
    for i, (k, _) in enumerate(loader):
        seen.append(list(k))
        if i == 8:
            break
    state = loader.state_dict()
    fresh = Loader(folder / "db.emb", 50, seed=9, keys=True, transform=slow_sum)
    fresh.load_state_dict(state)
    assert seen + [list(k) for k, _ in fresh] == [k for k, _ in want]
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="pin_memory=True needs a CUDA device"):
            Loader(folder / "db.emb", 50, pin_memory=True)


KILLED = """
import os, signal, sys, torch
from torch.utils.data import DataLoader
from embfile.torch import IterableDataset

def die_in_worker_1(batch):
    info = torch.utils.data.get_worker_info()
    if info.id == 1 and len(os.listdir("/proc/self/fd")) and os.environ.get("KILL") == "worker":
        os.kill(os.getpid(), signal.SIGKILL)
    return batch

if __name__ == "__main__":
    ds = IterableDataset(sys.argv[1], 20, seed=1, transform=die_in_worker_1)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    try:
        for epoch in range(1000):
            for i, x in enumerate(loader):
                if i == 5:
                    print("running", flush=True)
    except RuntimeError as e:
        print("worker killed:", e, flush=True)
"""


@pytest.mark.parametrize("kill", ["main", "worker"])
def test_sigkill_leaves_no_shared_buffers(store, tmp_path, kill):
    """SIGKILL the training process (its workers end and remove their buffers) or a worker (the main process
    removes what the killed one left): nothing stays in /dev/shm."""
    import signal
    import subprocess
    import sys
    import time

    folder, _, _ = store
    before = shm_files()
    script = tmp_path / "train.py"
    script.write_text(KILLED)
    env = {**os.environ, "KILL": kill}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder / "db.emb")], stdout=subprocess.PIPE, text=True, env=env
    )
    if kill == "main":
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    if kill == "worker":
        assert "worker killed" in out and proc.returncode == 0
    for _ in range(100):  # workers notice their parent is gone within a few seconds
        if shm_files() == before:
            break
        time.sleep(0.1)
    assert shm_files() == before


def test_a_batch_of_the_sampler_reads_its_blocks_whole_where_uncached(tmp_path):
    """A batch of BatchSampler's comes from a few blocks of the file, and the batches after it want the rest
    of them: on an evicted file, its gather reads those blocks whole, not only its rows' pages."""
    from embfile import _core

    m = np.ones((4096, 1024), np.float32)  # 4 KiB records: a default block is 256 of them, 1 MiB
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(4096)], m))
    ds = Dataset(tmp_path / "db.emb")
    batch = next(iter(embfile.torch.BatchSampler(ds, 64, seed=0, buffer_blocks=4)))
    layout = ds.store._layout()
    blocks = [layout.page_ranges(b * 256, b * 256 + 256)[0] for b in np.unique(batch // 256)]
    assert len(blocks) == 4
    evict(ds, blocks)
    np.testing.assert_array_equal(ds[batch].numpy(), m[batch])
    deadline = time.monotonic() + 20  # hinted reads finish in the background
    while min(_core.resident_fraction(a, n) for a, n in blocks) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert min(_core.resident_fraction(a, n) for a, n in blocks) == 1.0


def test_the_sampler_has_each_window_read_ahead_once(tmp_path):
    """The first batch of BatchSampler's in each window carries the item ranges of the window after it (the very
    first, of its own too), each window once and in order, over a rank's share and from a resume point, through
    pickling to a worker; every batch names its windows, by names the same in every process.  The dataset reads
    them on a thread: on an evicted file, the next window comes into the page cache before any batch asks for it."""
    import pickle

    from embfile.torch import BatchSampler

    m = np.ones((4096, 1024), np.float32)  # 4 KiB records: a default block is 256, 1 MiB; windows of 4 blocks
    embfile.write(tmp_path / "db.emb", ([f"k{i}" for i in range(4096)], m))
    ds = Dataset(tmp_path / "db.emb")

    def asked(sampler):
        return [[r for _, ranges in b.ahead for r in ranges] for b in sampler if b.ahead]

    sampler = BatchSampler(ds, 100, seed=0, buffer_blocks=4)
    window = sampler._plan()[0].window_ranges
    assert asked(sampler) == [window(0) + window(1), window(2), window(3)]
    assert asked(BatchSampler(ds, 100, seed=0, buffer_blocks=4, rank=1, world_size=2)) == [window(2) + window(3)]
    sampler.load_state_dict(sampler.state_dict(batches_seen=15))  # resumes at position 1500, in window 1
    assert asked(sampler) == [window(1) + window(2), window(3)]
    first = pickle.loads(pickle.dumps(next(iter(BatchSampler(ds, 100, seed=0, buffer_blocks=4)))))
    assert type(first).__name__ == "_BlockRows" and [list(r) for _, r in first.ahead] == [window(0), window(1)]
    batches = list(BatchSampler(ds, 100, seed=0, buffer_blocks=4))
    named = [(b.windows, [name for name, _ in b.ahead]) for b in batches if b.ahead]
    plan = sampler._plan()[0]
    w = [[plan.window_of(p) for p in range(i, min(i + 100, 4096))] for i in range(0, 4096, 100)]
    assert [len(set(b.windows)) for b in batches] == [len(set(ws)) for ws in w]  # a batch names each of its windows
    assert named[0][1] == [named[0][0][0], batches[12].windows[-1]]  # windows 0 and 1 (1024 items each)
    again = list(BatchSampler(ds, 100, seed=0, buffer_blocks=4))
    assert [b.windows for b in again] == [b.windows for b in batches]  # another process names them alike
    assert {n for b in list(BatchSampler(ds, 100, seed=1, buffer_blocks=4)) for n in b.windows}.isdisjoint(
        {n for b in batches for n in b.windows}
    )  # another epoch's windows are others

    assert_read_ahead(ds, first, window(1), m[first])


def test_a_dataset_of_keys_in_any_order_reads_the_file_in_runs(tmp_path):
    """Over a Dataset of keys (here every second key, shuffled), the sampler's blocks are runs of those keys in
    the file's order: every item once an epoch, a batch from the stretches of one or two windows' blocks, the next
    window's rows read ahead.  Keys sparser than every second row give no stretches worth reading whole."""
    from embfile.torch import BatchSampler

    keys = [f"k{i}" for i in range(4096)]
    m = np.arange(4096, dtype=np.float32)[:, None] * np.ones(1024, np.float32)
    embfile.write(tmp_path / "db.emb", (keys, m))
    chosen = [keys[i] for i in np.random.default_rng(0).permutation(4096)[::2]]
    ds = Dataset(tmp_path / "db.emb", keys=chosen)  # 2048 items, blocks of 256 over 512 rows, windows of 2
    sampler = BatchSampler(ds, 100, seed=0, buffer_blocks=2)
    batches = list(sampler)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(2048))
    in_file_order = np.argsort(np.argsort(ds._key_rows))  # each item's place among the items in file order
    assert all(len(np.unique(in_file_order[b] // 256)) <= 4 for b in batches)  # the blocks of two windows at most
    window = sampler._plan()[0].window_ranges
    assert [list(r) for _, r in batches[0].ahead] == [window(0), window(1)]
    rows = np.sort(ds._key_rows)
    ahead = [(int(rows[lo]), int(rows[hi - 1]) + 1) for lo, hi in window(1)]
    assert_read_ahead(ds, batches[0], ahead, m[ds._rows(batches[0])])
    assert not Dataset(tmp_path / "db.emb", keys=keys[::3])._runs_of_file


def assert_read_ahead(ds, batch, rows, want):
    """On the dataset's file evicted, ``ds[batch]`` gives ``want`` and brings ``rows`` (ranges) into the page
    cache within seconds: read ahead in the background."""
    from embfile import _core

    layout = ds.store._layout()
    pages = [p for lo, hi in rows for p in layout.page_ranges(lo, hi)]
    evict(ds, pages)
    np.testing.assert_array_equal(ds[batch].numpy(), want)
    deadline = time.monotonic() + 20
    while min(_core.resident_fraction(a, n) for a, n in pages) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert min(_core.resident_fraction(a, n) for a, n in pages) == 1.0


def evict(ds, pages):
    """Drop the dataset's file from the page cache (skip the test where the file system keeps ``pages``, mapped
    ``(address, length)`` ranges of it, in memory anyway)."""
    from embfile import _core

    os.sync()
    fd = os.open(ds.store.path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if max(_core.resident_fraction(a, n) for a, n in pages) > 0.5:
        pytest.skip("the file system keeps the file's pages in memory")
