"""The versioned dataset folder: commits, time travel, open handles, conflicts, and what is refused."""

import json
import multiprocessing
import os
import pathlib
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import embfile
from embfile import cli
from embfile import folder as layout


def generation(g, n=600, dim=4):
    keys = [f"g{g}-{i:05d}" for i in range(n)]
    return keys, np.full((n, dim), g, np.float32) + np.arange(n, dtype=np.float32)[:, None]


@pytest.fixture
def ds(tmp_path):
    path = tmp_path / "ds"
    embfile.write_shards(path, generation(1), shard_bytes=200 * 16, metadata={"gen": 1})
    return path


def test_overwrite_commits_a_new_version_and_earlier_ones_stay(ds):
    embfile.write_shards(ds, generation(2, n=900), shard_bytes=200 * 16, mode="overwrite")
    with embfile.open(ds) as latest, embfile.open(ds, version=1) as first:
        assert (latest.version, len(latest), latest.manifest.parent) == (2, 900, 1)
        assert (first.version, len(first)) == (1, 600)
        keys, matrix = generation(2, n=900)
        np.testing.assert_array_equal(latest.get_batch(keys[::50]), matrix[::50])
        assert "g1-00000" in first and "g1-00000" not in latest
        first.verify()
        latest.verify()
    assert [m.version for m in layout.history(ds)] == [1, 2]
    with pytest.raises(embfile.VersionNotFoundError, match="no version 3; its versions are 1 to 2"):
        embfile.open(ds, version=3)


def test_an_open_handle_keeps_its_version_while_later_ones_are_committed(ds):
    keys, matrix = generation(1)
    with embfile.open(ds) as db:
        embfile.write_shards(ds, generation(3), shard_bytes=200 * 16, mode="overwrite")
        assert db.version == 1 and list(db) == keys
        np.testing.assert_array_equal(db.to_numpy(), matrix)
        assert sum(len(k) for k, _ in db.iter_batches(64)) == 600


def _version_in_worker(db):
    return db.version, len(db), db.key(0)


def test_a_handle_pickles_to_the_same_version(ds):
    embfile.write_shards(ds, generation(2, n=900), shard_bytes=200 * 16, mode="overwrite")
    with embfile.open(ds, version=1) as db:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            assert pool.apply(_version_in_worker, (db,)) == (1, 600, "g1-00000")
        assert pickle.loads(pickle.dumps(db)).version == 1


def test_latest_is_a_hint_and_the_versions_are_the_truth(ds):
    embfile.write_shards(ds, generation(2), shard_bytes=200 * 16, mode="overwrite")
    (ds / layout.LATEST).write_text("1\n")  # a writer died between the link and the pointer
    assert layout.latest_version(ds) == 2 and embfile.open(ds).version == 2
    (ds / layout.LATEST).unlink()
    assert embfile.open(ds).version == 2


def test_of_two_commits_of_one_version_exactly_one_wins(ds):
    manifest = layout.read_manifest(ds)
    again = layout.Manifest(**{**manifest.__dict__, "version": 2, "parent": 1})
    layout.commit(ds, again)
    with pytest.raises(embfile.CommitConflictError, match="version 2 was committed by another writer"):
        layout.commit(ds, again)
    assert layout.latest_version(ds) == 2
    assert [n for n in os.listdir(ds / layout.VERSIONS) if n.startswith(".")] == []


def test_files_no_manifest_names_are_invisible(ds):
    embfile.write(ds / "shards" / "stray.emb", (["stray"], np.ones((1, 4), np.float32)))
    (ds / "part-00000.emb").write_bytes((ds / "shards" / "stray.emb").read_bytes())
    with embfile.open(ds) as db:
        assert len(db) == 600 and "stray" not in db


def test_a_replaced_shard_is_refused(ds):
    shard = ds / layout.read_manifest(ds).shards[1].path
    keys, matrix = generation(9, n=200)
    embfile.write(shard, (keys, matrix))  # same count, other keys
    with pytest.raises(embfile.ShardError, match="is not the file the manifest names"):
        embfile.open(ds)


@pytest.mark.parametrize(
    "change,error",
    [
        (lambda m: m.update(format_version="2.0"), embfile.UnsupportedVersionError),
        (lambda m: m["shards"][0].update(path="../elsewhere.emb"), embfile.CorruptFileError),
        (lambda m: m["shards"][0].update(path="/etc/passwd"), embfile.CorruptFileError),
        (lambda m: m.update(count=601), embfile.CorruptFileError),
        (lambda m: m.pop("segments"), embfile.CorruptFileError),
        (lambda m: m.update(segments=[*m["segments"], *m["segments"]]), embfile.CorruptFileError),
        (lambda m: m.update(version=7), embfile.CorruptFileError),
        (lambda m: m.update(format="other"), embfile.CorruptFileError),
    ],
)
def test_a_bad_manifest_is_one_clear_error(ds, change, error):
    path = layout.version_path(ds, 1)
    body = json.loads(open(path).read())
    change(body)
    os.chmod(path, 0o644)
    with open(path, "w") as f:
        json.dump(body, f)
    with pytest.raises(error) as info:
        embfile.open(ds)
    assert str(info.value).count("\n") == 0 and len(str(info.value)) < 300


def test_a_version_argument_needs_a_dataset_folder(tmp_path, ds):
    embfile.write(tmp_path / "one.emb", generation(1, n=3))
    with pytest.raises(ValueError, match="dataset folder"):
        embfile.open(tmp_path / "one.emb", version=1)
    assert embfile.open(tmp_path / "one.emb").version is None


def test_what_is_not_a_versioned_dataset_is_named_as_what_it_is(tmp_path, capsys):
    """Every call about versions, given a file, an empty folder, a folder in 0.1's layout or nothing, says which
    (a single file gave "Not a directory: 'one.emb/_embfile/versions'")."""
    embfile.write(tmp_path / "one.emb", generation(1, n=3))
    (tmp_path / "empty").mkdir()
    (tmp_path / "old").mkdir()
    embfile.write(tmp_path / "old" / "part-00000.emb", generation(1, n=3))
    calls = [
        embfile.history,
        embfile.tags,
        lambda f: embfile.tag(f, "v1"),
        lambda f: embfile.remove(f, ["g1-00000"]),
        lambda f: embfile.vacuum(f, keep=1),
    ]
    for name, what in [
        ("one.emb", "a file, not a folder"),
        ("nothing", "nothing there"),
        ("empty", "no version in it"),
        ("old", "a folder in 0.1's layout"),
    ]:
        for call in calls:
            with pytest.raises(embfile.ShardError, match=f"{name}: not a versioned dataset: {what}"):
                call(tmp_path / name)
        assert cli.main(["versions", str(tmp_path / name)]) == 1
        assert f"{name}: not a versioned dataset: {what}" in capsys.readouterr().err
        # checked before the data: a per-residue record was refused as 'expected 1-d', a file 'not empty'
        with pytest.raises(embfile.WriterError, match=f"{name}: no dataset to append to: {what}"):
            embfile.append(tmp_path / name, {"r": np.ones((3, 4), np.float32)})
    assert sorted(os.listdir(tmp_path / "empty")) == [] and not (tmp_path / "nothing").exists()


def test_writing_onto_a_dataset_needs_overwrite(ds):
    with pytest.raises(embfile.WriterError, match="mode='overwrite'"):
        embfile.write_shards(ds, generation(2))
    with pytest.raises(ValueError, match="mode must be"):
        embfile.ShardWriter(ds, 4, mode="update")
    with pytest.raises(embfile.ShardError, match="versioned dataset"):
        embfile.write_index(ds)


def test_a_failed_overwrite_commits_nothing_and_leaves_no_staging(ds):
    with pytest.raises(embfile.ShardError, match="two shards"):
        with embfile.ShardWriter(ds, 4, shard_bytes=200 * 16, mode="overwrite") as w:
            w.add_batch(*generation(2, n=300))
            w.add("g2-00001", np.zeros(4))
    assert layout.latest_version(ds) == 1
    assert os.listdir(ds / layout.STAGING) == []


@settings(max_examples=150)
@given(data=st.data())
def test_a_damaged_manifest_opens_or_is_an_embfile_error(tmp_path_factory, data):
    """Byte-level damage to a manifest (flips, cuts, insertions) and JSON-level damage (fields of the wrong type
    or value): opening works or raises an EmbFileError, never another exception."""
    path = tmp_path_factory.mktemp("m") / "ds"
    embfile.write_shards(path, generation(1, n=50), shard_bytes=20 * 16)
    manifest = pathlib.Path(layout.version_path(path, 1))
    raw = bytearray(manifest.read_bytes())
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(raw) - 1))
            kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if kind == "flip":
                raw[at] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == "cut":
                del raw[at:]
                break
            else:
                raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        body = json.loads(raw)
        field = data.draw(
            st.sampled_from(
                [
                    "version",
                    "parent",
                    "dim",
                    "dtype",
                    "count",
                    "shards",
                    "segments",
                    "metadata",
                    "operation",
                    "format_version",
                ]
            )
        )
        body[field] = data.draw(
            st.one_of(
                st.none(),
                st.integers(-3, 10**20),
                st.text(max_size=8),
                st.lists(st.integers(), max_size=2),
                st.just([{"path": "\x00"}]),
            )
        )
        raw = bytearray(json.dumps(body).encode())
    manifest.write_bytes(bytes(raw))
    try:
        with embfile.open(path) as db:
            db.verify()
    except embfile.EmbFileError as e:
        assert str(e)
