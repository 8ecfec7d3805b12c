"""embfile.changes: the keys added, replaced and removed between two versions, against a dict of every version."""

import json

import numpy as np
import pytest

import embfile
from embfile import cli


def _history(folder, seed, ragged):
    """Random appends (new keys; replacements, some by identical records), removals and compactions of a dataset
    in small shards; every version's ``{key: record bytes}``."""
    rng = np.random.default_rng(seed)

    def record(key):
        shape = (int(rng.integers(1, 5)), 3) if ragged else (3,)
        return rng.standard_normal(shape).astype(np.float32)

    state = {f"k{i}": record(f"k{i}") for i in range(120)}
    embfile.write_shards(folder, state, shard_bytes=256, ragged=ragged)
    versions = {1: dict(state)}
    fresh = 120
    for _ in range(6):
        op = rng.choice(["new", "replace", "remove", "compact"], p=[0.3, 0.3, 0.3, 0.1])
        if op == "new":
            batch = {f"k{fresh + i}": record(None) for i in range(int(rng.integers(1, 40)))}
            fresh += len(batch)
            embfile.append(folder, batch, shard_bytes=256)
        elif op == "replace":
            picked = rng.choice(sorted(state), size=12, replace=False).tolist()
            batch = {k: state[k].copy() if i % 3 == 0 else record(k) for i, k in enumerate(picked)}
            nan = batch[picked[1]].reshape(-1)
            nan[0] = np.float32("nan")  # NaN against NaN: bytes decide
            embfile.append(folder, batch, on_duplicate="replace", shard_bytes=256)
        elif op == "remove":
            batch = {}
            embfile.remove(folder, rng.choice(sorted(state), size=5, replace=False).tolist())
        else:
            batch = {}
            embfile.compact(folder, shard_bytes=1024)
        with embfile.open(folder) as db:
            state = {k: np.array(db[k]) for k in db}
            versions[db.version] = dict(state)
    return versions


def _expected(before, after, order):
    same = {k for k in before.keys() & after.keys() if before[k].tobytes() == after[k].tobytes()}
    same &= {k for k in same if before[k].shape == after[k].shape}
    return (
        [k for k in order if k not in before],
        [k for k in order if k in before and k not in same],
    )


@pytest.mark.parametrize("ragged", [False, True], ids=["vectors", "per-residue"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changes_between_any_two_versions_match_the_versions_themselves(tmp_path, seed, ragged):
    folder = tmp_path / "ds"
    versions = _history(folder, seed, ragged)
    assert len(versions) == 7
    for a in versions:
        for b in versions:
            c = embfile.changes(folder, since=a, version=b)
            with embfile.open(folder, version=b) as new, embfile.open(folder, version=a) as old:
                added, replaced = _expected(versions[a], versions[b], list(new))
                removed = [k for k in old if k not in versions[b]]
            assert (c.since, c.version) == (a, b)
            assert (c.added, c.replaced, c.removed) == (added, replaced, removed), (a, b)


def test_changes_of_the_latest_version_by_default(tmp_path):
    folder = tmp_path / "ds"
    embfile.write_shards(folder, {"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)})
    embfile.append(folder, {"c": np.ones(2, np.float32)})
    assert embfile.changes(folder, 1) == embfile.Changes(1, 2, ["c"], [], [])
    assert embfile.changes(folder, 2) == embfile.Changes(2, 2, [], [], [])


def test_what_changes_does_not_compare_is_one_clear_error(tmp_path):
    embfile.write(tmp_path / "one.emb", {"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="changes are between versions of a dataset folder, and this is not one"):
        embfile.changes(tmp_path / "one.emb", 1)
    embfile.write_shards(tmp_path / "ds", {"a": np.zeros(2, np.float32)})
    with pytest.raises(embfile.VersionNotFoundError, match="no version 4"):
        embfile.changes(tmp_path / "ds", 4)
    with pytest.raises(TypeError, match="since must be a version's number or a tag's name, not float"):
        embfile.changes(tmp_path / "ds", 1.0)
    with pytest.raises(ValueError, match="'1' cannot name a tag"):
        embfile.changes(tmp_path / "ds", "1")


def test_the_changes_command(tmp_path, capsys):
    folder = tmp_path / "ds"
    embfile.write_shards(folder, {f"k{i}": np.full(2, i, np.float32) for i in range(5)})
    embfile.append(folder, {"k1": np.zeros(2, np.float32), "new\tkey": np.ones(2, np.float32)}, on_duplicate="replace")
    embfile.remove(folder, ["k3"])
    assert cli.main(["changes", str(folder), "--since", "1"]) == 0
    out, err = capsys.readouterr()
    assert out == "added\tnew\tkey\nreplaced\tk1\nremoved\tk3\n"
    assert err.strip() == f"{folder}: version 1 -> 3: 1 added, 1 replaced, 1 removed"
    assert cli.main(["changes", str(folder), "--since", "3", "--version", "2", "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == {"since": 3, "version": 2, "added": ["k3"], "replaced": [], "removed": []}
    assert cli.main(["changes", str(folder), "--since", "9"]) == 1
    assert capsys.readouterr().err.strip() == f"embfile: error: {folder}: no version 9; its versions are 1 to 3"
