"""Ragged (per-residue) records: each key a ``(length, dim)`` matrix, against a numpy oracle.

The oracle is the dict the records were written from; every read path (views, padded and packed batches,
lengths, pooling, epochs by record, by row and under a token budget) is compared with it.  Length 0 is
refused at write (a record has at least one row: pooling and attention masks need one).
"""

import collections
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embfile
from embfile import _format as F
from embfile.epochs import Batches, EpochOptions


def records_of(rng, n, dim=8, longest=50, dtype="float32"):
    lengths = rng.integers(1, longest + 1, n)
    return {f"P{i:05d}": (rng.standard_normal((int(n), dim)) * 10).astype(dtype) for i, n in enumerate(lengths)}


def padded(records, keys):
    """The oracle of get_batch(keys, pad=True)."""
    longest = max(len(records[k]) for k in keys)
    dim = next(iter(records.values())).shape[1]
    dtype = next(iter(records.values())).dtype
    out = np.zeros((len(keys), longest, dim), dtype)
    mask = np.zeros((len(keys), longest), bool)
    for i, k in enumerate(keys):
        out[i, : len(records[k])] = records[k]
        mask[i, : len(records[k])] = True
    return out, mask


def check_dataset(db, records):
    """Every read path of ``db`` against ``records`` (in row order)."""
    keys = list(records)
    assert db.ragged and len(db) == len(keys) and list(db) == keys
    lengths = np.array([len(records[k]) for k in keys])
    np.testing.assert_array_equal(db.lengths(), lengths)
    np.testing.assert_array_equal(db.lengths(keys[::-1]), lengths[::-1])
    for row, k in enumerate(keys):
        view = db[k]
        assert view.shape == records[k].shape and not view.flags.writeable
        np.testing.assert_array_equal(view, records[k])
        np.testing.assert_array_equal(db.record(row), records[k])
    some = keys[::-3] or keys
    x, mask = db.get_batch(some)
    want, want_mask = padded(records, some)
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(mask, want_mask)
    rows, offsets = db.get_batch(some, pad=False)
    np.testing.assert_array_equal(rows, np.concatenate([records[k] for k in some]))
    np.testing.assert_array_equal(np.diff(offsets), [len(records[k]) for k in some])
    x, mask = db.take(np.arange(len(keys))[::-1])
    np.testing.assert_array_equal(x, padded(records, keys[::-1])[0])
    every, offsets = db.to_numpy()
    np.testing.assert_array_equal(every, np.concatenate([records[k] for k in keys]))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)]))


@settings(max_examples=25)
@given(
    lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
    dim=st.integers(1, 9),
    dtype=st.sampled_from(["float16", "float32", "float64", "int8", "uint16"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_against_the_oracle(tmp_path_factory, lengths, dim, dtype, seed):
    rng = np.random.default_rng(seed)
    records = {f"k{i}": (rng.standard_normal((n, dim)) * 20).astype(dtype) for i, n in enumerate(lengths)}
    path = tmp_path_factory.mktemp("r") / "r.emb"
    embfile.write(path, records, ragged=True, block_bytes=4096)
    with embfile.open(path) as db:
        assert db.header.version == "1.1" and db.header.ragged and db.header.rows == sum(lengths)
        check_dataset(db, records)
        db.verify()


def test_a_view_is_the_mapping_not_a_copy(tmp_path):
    records = records_of(np.random.default_rng(0), 20)
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        view = db["P00007"]
        assert isinstance(view.base, mmap.mmap) and not view.flags.owndata
        assert db.matrix.shape == (sum(len(m) for m in records.values()), 8)
    np.testing.assert_array_equal(view, records["P00007"])  # outlives close


def test_a_padded_gather_into_reused_memory_zeroes_its_padding(tmp_path):
    """What a DataLoader worker does with its shared buffers: the batch gathered into memory holding an earlier
    batch's values, every padding row zeroed; memory of the wrong shape, type or layout refused."""
    rng = np.random.default_rng(9)
    records = {f"p{i}": rng.random((int(n), 5)).astype(np.float16) for i, n in enumerate([3, 1, 7, 2])}
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        rows = db._row_numbers(np.array([2, 0, 3]))
        want, want_mask = db.get_batch(["p2", "p0", "p3"])
        out = np.full((3, 7, 5), 9, np.float16)  # an earlier batch's values
        padded, mask = db._gather_ragged(rows, True, out)
        assert padded is out and np.array_equal(out, want) and np.array_equal(mask, want_mask)
        for wrong in (
            np.empty((3, 6, 5), np.float16),
            np.empty((3, 7, 5), np.float32),
            np.empty((5, 7, 3), np.float16).T,
        ):
            with pytest.raises(
                ValueError, match=r"output must be a writable C-contiguous float16 array of shape \(3, 7, 5\)"
            ):
                db._gather_ragged(rows, True, wrong)


def test_writer_add_and_add_batch_write_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    records = records_of(np.random.default_rng(1), 200, dim=4, longest=300)
    keys = list(records)
    with embfile.Writer(tmp_path / "a.emb", 4, "float16", ragged=True) as w:
        for k in keys:
            w.add(k, records[k])
    with embfile.Writer(tmp_path / "b.emb", 4, "float16", ragged=True) as w:
        for lo in range(0, 200, 37):
            part = keys[lo : lo + 37]
            w.add_batch(part, np.concatenate([records[k] for k in part]), [len(records[k]) for k in part])
    assert (tmp_path / "a.emb").read_bytes() == (tmp_path / "b.emb").read_bytes()
    with embfile.open(tmp_path / "a.emb") as db:
        check_dataset(db, {k: v.astype("float16") for k, v in records.items()})


def test_fixed_width_files_are_still_written_as_1_0(tmp_path):
    embfile.write(tmp_path / "f.emb", {"a": np.zeros(3)})
    with embfile.open(tmp_path / "f.emb") as db:
        assert db.header.version == "1.0" and not db.ragged
        np.testing.assert_array_equal(db.lengths(), [1])
        assert db.metadata["embfile"]["format_version"] == "1.0" and "ragged" not in db.metadata["embfile"]


@pytest.mark.parametrize("how", ["mean", "max", "first", "last"])
def test_pool_against_numpy(tmp_path, how):
    records = records_of(np.random.default_rng(2), 50, dtype="float16")
    embfile.write(tmp_path / "r.emb", records, ragged=True, metadata={"model": "prott5"})
    reduce = {
        "mean": lambda m: m.astype(np.float32).mean(0),
        "max": lambda m: m.max(0),
        "first": lambda m: m[0],
        "last": lambda m: m[-1],
    }[how]
    want = np.stack([reduce(m) for m in records.values()]).astype("float16")
    with embfile.open(tmp_path / "r.emb") as db:
        np.testing.assert_allclose(db.pool(how).astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3)
        db.pool(how, out=tmp_path / "pooled.emb")
    with embfile.open(tmp_path / "pooled.emb") as pooled:
        assert not pooled.ragged and list(pooled) == list(records) and pooled.dtype == np.float16
        assert pooled.metadata["pooling"] == how and pooled.metadata["model"] == "prott5"
        np.testing.assert_allclose(pooled.matrix.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_a_ragged_file_or_folder_converts_whole_or_pooled(tmp_path):
    """``convert`` of an .emb file or dataset folder, to .emb, Parquet and HDF5: the records as they are, or
    pooled with ``pool=`` (a folder converted to another format failed: only a file was read)."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("h5py")
    records = records_of(np.random.default_rng(3), 40)
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    embfile.write_shards(tmp_path / "ds", records, shard_bytes=8 * 4 * 200, ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        means = db.pool("mean")
    for src in ("r.emb", "ds"):
        for out in ("whole.parquet", "whole.h5", "means.emb", "means.parquet"):
            dst = tmp_path / f"{src}-{out}"
            embfile.convert(tmp_path / src, dst, pool="mean" if out.startswith("means") else None)
            if not out.endswith(".emb"):
                dst = embfile.convert(dst, f"{dst}.emb")  # read back
            with embfile.open(dst) as db:
                if out.startswith("whole"):
                    check_dataset(db, records)
                else:
                    assert not db.ragged and list(db) == list(records)
                    np.testing.assert_array_equal(db.to_numpy(), means)


def test_the_core_pools_every_type_as_numpy_does_on_both_paths():
    """The core's mean and maximum against float64 numpy: every type it reads, dims off the vector width,
    records of one row and long ones, the threads' cuts anywhere, NaN kept by the maximum; EMBFILE_PORTABLE=1
    runs the plain loops other CPUs run.  Bad offsets are refused before the core reads a byte."""
    script = (
        "import numpy as np, ml_dtypes, embfile._core as c\n"
        "rng = np.random.default_rng(4)\n"
        "for dim in (1, 7, 8, 17, 1024):\n"
        "    lengths = rng.integers(1, 40, 61)\n"
        "    lengths[::9] = 1\n"
        "    offsets = np.concatenate([[0], np.cumsum(lengths)])\n"
        "    x = rng.standard_normal((offsets[-1], dim)).astype(np.float32) * 3\n"
        "    x[5, 0] = np.nan\n"
        "    whole = np.nan_to_num(x * 40)\n"
        "    narrow = (x.astype(np.float16), x.astype(ml_dtypes.bfloat16), whole.astype(np.int8))\n"
        "    for block in (x, *narrow, (whole + 128).clip(0, 255).astype(np.uint8)):\n"
        "        wide = block.astype(np.float64)\n"
        "        for threads in (1, 2, 5, 64):\n"
        "            for how in ('mean', 'max'):\n"
        "                want = np.stack([getattr(np, how)(wide[a:b], axis=0) for a, b in zip(offsets, offsets[1:])])\n"
        "                got = c.pool(block, offsets, how, threads)\n"
        "                assert got.dtype == np.float32\n"
        "                assert np.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True), (dim, block.dtype)\n"
        "x = np.ones((4, 3), np.float16)\n"
        "for bad in ([0, 2, 2, 4], [0, 5], [-1, 2], [[0, 4]]):\n"
        "    try:\n"
        "        c.pool(x, bad, 'mean')\n"
        "    except ValueError as e:\n"
        "        assert 'offsets rising strictly' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "assert c.pool(x, [0], 'max').shape == (0, 3)\n"
        "print('ok')\n"
    )
    for env in ({}, {"EMBFILE_PORTABLE": "1"}):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, **env})
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_arrow_export_is_a_list_of_fixed_size_lists_without_a_copy(tmp_path):
    pa = pytest.importorskip("pyarrow")
    records = records_of(np.random.default_rng(3), 30)
    embfile.write(tmp_path / "r.emb", records, ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        table = db.to_arrow()
        assert table.schema.field("vector").type == pa.large_list(
            pa.field("item", pa.list_(pa.field("item", pa.float32(), nullable=False), 8), nullable=False)
        )
        column = table.column("vector").chunk(0)
        for k, value in zip(table.column("key").to_pylist(), column):
            np.testing.assert_array_equal(value.values.flatten().to_numpy().reshape(-1, 8), records[k])
        # it copies nothing: the list's values are the mapped rows
        values = column.values.values.to_numpy()
        assert np.shares_memory(values, db.matrix)


# -- bad input: one clear error naming the key, nothing written ---------------------------------------


@pytest.mark.parametrize(
    "records,message",
    [
        ({"a": np.zeros((3, 4)), "b": np.zeros((2, 5))}, r"key 'b': record has shape \(2, 5\), expected \(length, 4\)"),
        ({"a": np.zeros((3, 4)), "b": np.zeros((0, 4))}, r"key 'b': record has no rows"),
        ({"a": np.zeros((3, 4)), "b": np.zeros(4)}, r"key 'b'.*a vector: this dataset is ragged"),
        ({"a": np.zeros((3, 4)), "b": np.full((2, 4), 1e6)}, r"key 'b': value 1000000.0 does not fit in float16"),
    ],
)
def test_bad_records_name_the_key_and_write_nothing(tmp_path, records, message):
    with pytest.raises(embfile.WriterError, match=message):
        embfile.write(tmp_path / "r.emb", records, ragged=True, dtype="float16")
    assert list(tmp_path.iterdir()) == []


def test_a_model_s_padded_batch_is_written_as_its_records_lengths(tmp_path):
    """``add_batch(keys, padded, lengths)``: a model's ``(B, longest, D)`` output as it leaves the model (a
    tensor needing grad), each key's first ``lengths[i]`` rows; a batch cut over shards too.  It was
    "matrix has shape (3, 7, 4), expected (9, 4)"."""
    torch = pytest.importorskip("torch")
    padded = torch.randn(3, 7, 4, requires_grad=True)
    lengths = torch.tensor([3, 5, 1])  # attention_mask.sum(1), say
    want = {k: padded[i, :n].detach().numpy() for i, (k, n) in enumerate(zip("abc", [3, 5, 1]))}
    with embfile.Writer(tmp_path / "r.emb", 4, ragged=True) as w:
        w.add_batch(list("abc"), padded, lengths)
        with pytest.raises(embfile.WriterError, match=r"key 'y': length 8, more than the padded batch's 7 rows"):
            w.add_batch(["x", "y", "z"], padded, [1, 8, 1])
        with pytest.raises(embfile.WriterError, match=r"a padded batch of shape \(3, 7, 4\) for 3 keys takes 3"):
            w.add_batch(["x", "y", "z"], padded, [1, 2])
    with embfile.DatasetWriter(tmp_path / "ds", dim=4, ragged=True, shard_bytes=4 * 4 * 4) as w:
        w.add_batch(list("abc"), padded, lengths)
    for path in ("r.emb", "ds"):
        with embfile.open(tmp_path / path) as db:
            assert list(db) == list("abc") and all(np.array_equal(db[k], v) for k, v in want.items())
    assert len(embfile.open(tmp_path / "ds").files) > 1


def test_ragged_data_given_to_a_fixed_width_writer_and_the_reverse(tmp_path):
    with pytest.raises(embfile.WriterError, match=r"key 'a': vector has shape \(3, 4\).*ragged=True"):
        embfile.write(tmp_path / "f.emb", {"a": np.zeros((3, 4))})
    with embfile.Writer(tmp_path / "f.emb", 4) as w:
        with pytest.raises(embfile.WriterError, match="lengths= given to a fixed-width writer"):
            w.add_batch(["a"], np.zeros((3, 4)), [3])
        w.add("b", np.zeros(4))
    with embfile.Writer(tmp_path / "r.emb", 4, ragged=True) as w:
        with pytest.raises(embfile.WriterError, match="needs lengths="):
            w.add_batch(["a"], np.zeros((1, 4)))
        with pytest.raises(embfile.WriterError, match=r"key 'y': length 0"):
            w.add_batch(["x", "y"], np.zeros((3, 4)), [3, 0])
        with pytest.raises(embfile.WriterError, match="lengths add up to 5 rows, the matrix has 3"):
            w.add_batch(["x", "y"], np.zeros((3, 4)), [3, 2])
        with pytest.raises(embfile.WriterError, match=r"key 'z': length 1099511627776"):
            w.add_batch(["z"], np.zeros((3, 4)), [2**40])
        w.add("c", np.ones((2, 4)))  # the failed batches left nothing behind
    with embfile.open(tmp_path / "r.emb") as db:
        assert list(db) == ["c"] and db.lengths().tolist() == [2]
    with embfile.open(tmp_path / "f.emb") as fixed, pytest.raises(embfile.WriterError, match="is not ragged"):
        embfile.write(tmp_path / "x.emb", fixed, ragged=True)


def test_what_reads_one_vector_per_key_refuses_ragged_records(tmp_path):
    embfile.write(tmp_path / "r.emb", {"a": np.ones((2, 4))}, ragged=True)
    with embfile.open(tmp_path / "r.emb") as db:
        with pytest.raises(TypeError, match=r"per-residue \(ragged\) records; search\(\).*pool"):
            db.search(np.ones(4))
        with pytest.raises(TypeError, match="ragged"):
            db.to_dask_array()
    embfile.write(tmp_path / "f.emb", {"a": np.ones(4)})
    with embfile.open(tmp_path / "f.emb") as db, pytest.raises(ValueError, match="token_budget= batches ragged"):
        db.iter_batches(token_budget=10)


# -- damage ---------------------------------------------------------------------------------------------


def test_damaged_ranges_are_found(tmp_path):
    records = records_of(np.random.default_rng(4), 40)
    path = tmp_path / "r.emb"
    embfile.write(path, records, ragged=True)
    with embfile.open(path) as db:
        h = db.header
    data = bytearray(path.read_bytes())
    at = h.ranges_offset + 8 * 5  # record 4 ends where record 6 ends: record 5 owns no rows
    data[at : at + 8] = data[at + 8 : at + 16]
    path.write_bytes(bytes(data))
    with embfile.open(path) as db:
        with pytest.raises(embfile.CorruptFileError, match="ranges"):
            db["P00005"]
        with pytest.raises(embfile.ChecksumError, match="ranges section does not match its checksum") as e:
            db.verify()
        assert "record 5 does not own at least one row" in str(e.value)
        np.testing.assert_array_equal(db["P00009"], records["P00009"])  # the rest still reads


def test_ranges_that_do_not_span_the_rows_are_refused_at_open(tmp_path):
    path = tmp_path / "r.emb"
    embfile.write(path, {"a": np.ones((2, 4)), "b": np.ones((3, 4))}, ragged=True)
    with embfile.open(path) as db:
        h = db.header
    data = bytearray(path.read_bytes())
    data[h.ranges_offset + 16 : h.ranges_offset + 24] = (4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(embfile.CorruptFileError, match="ranges section does not span the 5 rows"):
        embfile.open(path)


def test_a_flag_this_reader_does_not_know_is_refused_as_a_newer_file(tmp_path):
    path = tmp_path / "r.emb"
    embfile.write(path, {"a": np.ones((2, 4))}, ragged=True)
    data = bytearray(path.read_bytes())
    h = F.Header.unpack(data)
    data[: F.HEADER_SIZE] = h._replace(flags=h.flags | 4, minor=2).pack()
    path.write_bytes(bytes(data))
    with pytest.raises(embfile.UnsupportedVersionError, match=r"does not know \(flags 0x4\); a newer embfile"):
        embfile.open(path)


# -- datasets of shards and versions --------------------------------------------------------------------


def test_a_versioned_dataset_of_ragged_shards_grows_and_shrinks(tmp_path):
    rng = np.random.default_rng(5)
    records = records_of(rng, 120)
    folder = tmp_path / "ds"
    embfile.write_shards(folder, records, shard_bytes=8 * 4 * 400, ragged=True)
    with embfile.open(folder) as ds:
        assert len(ds.files) > 3 and ds.manifest.ragged
        check_dataset(ds, records)
        ds.verify()
    more = {f"Q{i}": m for i, m in enumerate(records_of(rng, 30).values())}
    embfile.append(folder, more)  # a mapping of matrices: taken as the dataset's ragged records
    gone = list(records)[10:50]
    embfile.remove(folder, gone)
    want = {k: v for k, v in {**records, **more}.items() if k not in gone}
    with embfile.open(folder) as ds:
        check_dataset(ds, want)
        ds.verify()
    embfile.compact(folder)
    embfile.subset(folder, tmp_path / "sub.emb", list(want)[::4])
    with embfile.open(folder) as ds, embfile.open(tmp_path / "sub.emb") as sub:
        check_dataset(ds, want)
        check_dataset(sub, {k: want[k] for k in list(want)[::4]})
    with pytest.raises(embfile.WriterError, match="holds ragged records; ragged=False"):
        embfile.write_shards(folder, {"x": np.ones(8, np.float32)}, mode="append")


def test_a_dataset_writer_resumes_ragged_records(tmp_path):
    records = records_of(np.random.default_rng(6), 40, longest=20)
    keys = list(records)
    with embfile.DatasetWriter(tmp_path / "ds", 8, ragged=True, shard_bytes=8 * 4 * 60) as w:
        for k in keys[:25]:
            w.add(k, records[k])
    with embfile.DatasetWriter(tmp_path / "ds", 8, ragged=True, resume=True) as w:
        done = w.done_keys()
        for k in keys:
            if k not in done:
                w.add(k, records[k])
    with embfile.open(tmp_path / "ds") as ds:
        check_dataset(ds, records)


def test_shards_of_both_layouts_do_not_mix(tmp_path):
    embfile.write(tmp_path / "a.emb", {"a": np.ones((2, 4), np.float32)}, ragged=True)
    embfile.write(tmp_path / "b.emb", {"b": np.ones(4, np.float32)})
    with pytest.raises(embfile.ShardError, match="holds ragged records, .* one row per record"):
        embfile.open([tmp_path / "a.emb", tmp_path / "b.emb"])


# -- epochs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proteins(tmp_path_factory):
    """3,000 records of 20 to 2,000 rows, log-normal around 250 (as UniProt's protein lengths spread)."""
    rng = np.random.default_rng(7)
    lengths = np.clip(rng.lognormal(5.5, 0.6, 3000), 20, 2000).astype(int)
    path = tmp_path_factory.mktemp("proteins") / "p.emb"
    with embfile.Writer(path, 2, "float16", ragged=True) as w:
        for i, n in enumerate(lengths):
            w.add(f"p{i}", np.full((n, 2), i % 1000, np.float16))
    return path, lengths


@pytest.mark.parametrize("world_size", [1, 3])
def test_epochs_by_record_give_every_record_once(proteins, world_size):
    path, lengths = proteins
    with embfile.open(path) as db:
        seen = collections.Counter()
        for rank in range(world_size):
            for keys, x, mask in db.iter_batches(64, seed=3, epoch=1, rank=rank, world_size=world_size):
                seen.update(keys)
                assert x.shape[:2] == mask.shape and x.shape[0] == len(keys) <= 64
                np.testing.assert_array_equal(mask.sum(1), lengths[[int(k[1:]) for k in keys]])
                assert (x[~mask] == 0).all()
        assert seen == collections.Counter(db.keys())


@pytest.mark.parametrize("world_size", [1, 2])
def test_token_budget_batches_stay_under_budget_with_little_padding(proteins, world_size):
    path, lengths = proteins
    budget = 8192
    with embfile.open(path) as db:
        seen, padding, tokens, counts = collections.Counter(), 0, 0, []
        for rank in range(world_size):
            batches = db.iter_batches(seed=4, token_budget=budget, rank=rank, world_size=world_size)
            counts.append(len(batches))
            for keys, _, mask in batches:
                seen.update(keys)
                assert mask.size <= budget or len(keys) == 1
                padding, tokens = padding + (~mask).sum(), tokens + mask.size
        assert seen == collections.Counter(db.keys())
        assert padding / tokens < 0.05, padding / tokens
        # the same epoch as random batches of the same mean size pads far more
        mean_batch = len(db) * world_size // sum(counts)
        random_padding = 0
        for _, _, mask in db.iter_batches(mean_batch, seed=4):
            random_padding += (~mask).sum()
        assert random_padding / db.lengths().sum() > 5 * padding / tokens


def test_token_budget_epochs_resume_and_split_over_workers(proteins):
    path, _ = proteins
    with embfile.open(path) as db:
        whole = [tuple(keys) for keys, *_ in db.iter_batches(seed=5, token_budget=4000)]
        assert len(set(whole)) == len(whole)
        b = db.iter_batches(seed=5, token_budget=4000)
        first = [tuple(next(b)[0]) for _ in range(7)]
        state = b.state_dict()
        rest = db.iter_batches(seed=5, token_budget=4000)
        rest.load_state_dict(state)
        assert first + [tuple(keys) for keys, *_ in rest] == whole
        workers = [
            [tuple(k) for k, *_ in Batches(db, EpochOptions(token_budget=4000, seed=5), worker=w, num_workers=3)]
            for w in range(3)
        ]
        assert sorted(sum(workers, [])) == sorted(whole)
        with pytest.raises(ValueError, match="token_budget"):
            rest = db.iter_batches(seed=5, token_budget=3000)
            rest.load_state_dict(state)


def test_batch_size_caps_the_records_of_budget_batches(proteins):
    """Under a token budget, a batch_size given is a most of records per batch (as fairseq's --batch-size caps
    --max-tokens batches); it was ignored without a word.  Every record still comes once, and a state saved with
    one cap does not resume another."""
    path, lengths = proteins
    with embfile.open(path) as db:
        free = [len(keys) for keys, *_ in db.iter_batches(seed=5, token_budget=8192)]
        assert max(free) > 8
        seen = collections.Counter()
        for keys, _, mask in db.iter_batches(8, seed=5, token_budget=8192):
            assert len(keys) <= 8 and (mask.size <= 8192 or len(keys) == 1)
            seen.update(keys)
        assert seen == collections.Counter(db.keys())
        b = db.iter_batches(8, seed=5, token_budget=8192)
        next(b)
        with pytest.raises(ValueError, match="state was saved with batch_size=8, this iterator has batch_size=None"):
            db.iter_batches(seed=5, token_budget=8192).load_state_dict(b.state_dict())
        assert len(next(iter(db.iter_batches(shuffle=False)))[0]) == 100  # without a budget, 100 by default


def test_drop_last_gives_every_rank_as_many_budget_batches(proteins):
    path, _ = proteins
    with embfile.open(path) as db:
        counts = [
            len(list(db.iter_batches(seed=6, token_budget=6000, rank=r, world_size=3, drop_last=True)))
            for r in range(3)
        ]
        assert len(set(counts)) == 1 and counts[0] > 0


def test_an_epoch_over_rows_gives_every_row_once(proteins):
    path, lengths = proteins
    with embfile.open(path) as db:
        count = collections.Counter()
        for keys, x in db.iter_batches(1000, unit="row", seed=8):
            assert x.shape == (len(keys), 2)
            assert all(int(v) == int(k[1:]) % 1000 for k, v in zip(keys, x[:, 0]))  # each row's owner
            count.update(keys)
        assert count == {f"p{i}": int(n) for i, n in enumerate(lengths)}
