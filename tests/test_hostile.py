"""Hostile files: damaged or crafted .emb files never crash, hang or misbehave; damage is always found.

Every mutated file is exercised in a sandbox worker process (fuzz/sandbox.py),
so a crash or a hang is reported as a failing case instead of ending the run.
"""

import pathlib
import shutil

import mutate
import numpy as np
import pytest
from conftest import LONG
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sandbox import Sandbox

import embfile
from embfile import _format as F

REGRESSIONS = pathlib.Path(__file__).parent.parent / "fuzz" / "regressions"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    return {name: (pathlib.Path(p), keys) for name, (p, keys) in mutate.write_seeds(folder).items()}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as box:
        yield box


def check(sandbox, path, probes, keep_as=None):
    answer = sandbox.run(path, probes[:8])
    if answer["bugs"] and keep_as is not None:
        shutil.copy(path, keep_as)
    assert not answer["bugs"], f"{path}: {answer['bugs']} (kept as {keep_as})"
    return answer


def test_seeds_pass_every_read_path(sandbox, seeds):
    for path, keys in seeds.values():
        answer = check(sandbox, path, keys)
        assert set(answer["steps"].values()) == {"ok"}, answer


@settings(max_examples=5 * settings().max_examples)
@given(data=st.data())
def test_mutated_files_only_raise_embfile_errors(sandbox, seeds, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    path, keys = seeds[name]
    original = path.read_bytes()
    ops, reseal = data.draw(mutate.mutations(original))
    damaged = mutate.apply(original, ops, reseal)
    case = tmp_path_factory.mktemp("case") / "case.emb"
    case.write_bytes(damaged)
    answer = check(sandbox, case, keys, keep_as=tmp_path_factory.getbasetemp() / f"bug-{name}.emb")
    first = next(((s, o) for s, o in answer["steps"].items() if o != "ok"), ("none", "ok"))
    event(f"first failing step: {first[0]}: {first[1].split(':')[0]}")  # --hypothesis-show-statistics
    if damaged != original and not reseal:  # damage nobody covered up is always found
        assert any(o != "ok" for o in answer["steps"].values()), (ops, answer)


def test_regression_files(sandbox):
    """Every file a fuzz run once found misbehaving (fuzz/regressions/) now gets a clean error."""
    files = sorted(REGRESSIONS.glob("*.emb"))
    assert files, "fuzz/regressions/ holds no files"
    for path in files:
        answer = check(sandbox, path, [])
        assert any(o != "ok" for o in answer["steps"].values()), (path, answer)


def test_sandbox_reports_a_crash_and_carries_on(tmp_path):
    """The harness itself: a worker killed mid-case is a reported bug, and the next case runs."""
    p = tmp_path / "x.emb"
    embfile.write(p, (["a"], np.ones((1, 2), np.float32)))
    with Sandbox(env={"EMBFILE_SANDBOX_TEST_CRASH": "1"}) as box:
        answer = box.run(p, ["crash"])
        assert answer["bugs"] and answer["bugs"][0].startswith("crashed: SIGSEGV"), answer
        assert box.run(p, ["a"])["bugs"] == []
        assert box.starts == 2


def _flip_verdict(path, data, bit):
    """The error verify (or open) gives with ``bit`` of ``data`` flipped, or None."""
    damaged = bytearray(data)
    damaged[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(damaged)
    try:
        with embfile.open(path) as db:
            db.verify()
    except embfile.EmbFileError as e:
        return e
    return None


def _region(h, at):
    """The part of the file that holds byte ``at``, as verify names it."""
    if at < len(F.MAGIC):
        return "not an .emb file"
    if at < F.HEADER_SIZE:
        return "header"
    for s in F.SECTIONS:
        if h.offset(s) <= at < h.offset(s) + h.size(s):
            return s
    return "padding"


def test_verify_finds_every_single_bit_flip(tmp_path, seeds):
    """Over a whole small file, every byte with one bit flipped (the bit rotating with the byte),
    and every bit of the header; every bit of the file in the long run.  Each is reported, and
    the report names the section that holds it (a records block by number)."""
    src, _ = seeds["awkward"]
    data = src.read_bytes()
    h = mutate.header(data)
    bits = (
        range(8 * len(data))
        if LONG
        else sorted({8 * at + at % 8 for at in range(len(data))} | set(range(8 * F.HEADER_SIZE)))
    )
    path = tmp_path / "flip.emb"
    for bit in bits:
        at = bit // 8
        e = _flip_verdict(path, data, bit)
        assert e is not None, f"bit {bit} (byte {at}) flipped unnoticed"
        region, text = _region(h, at), str(e)
        if region == "records":
            assert "records block 0 " in text and f"rows 0-{h.count - 1}" in text, text
        elif region == "sums":
            assert "checksum" in text, text
        elif region == "padding":
            assert "padding bytes" in text, text
        elif region == "header":
            assert "header" in text or "version" in text, (at, text)
        else:
            assert region in text, (at, region, text)


def test_every_truncation_says_where_the_file_ends(tmp_path, seeds):
    """Cut at every length of the header and around every section boundary (every length in
    the long run): the error says how long the file is and in which section (block) it ends."""
    src, _ = seeds["blocks"]
    data = src.read_bytes()
    h = mutate.header(data)
    edges = [h.offset(s) + d for s in F.SECTIONS for d in (0, h.size(s))]
    lengths = (
        range(len(data))
        if LONG
        else sorted({n for n in range(len(data)) if n <= F.PAGE or n % 61 == 0 or min(abs(n - e) for e in edges) < 16})
    )
    path = tmp_path / "cut.emb"
    for length in lengths:
        path.write_bytes(data[:length])
        with pytest.raises(embfile.TruncatedFileError) as info:
            embfile.open(path)
        text = str(info.value)
        assert "truncated" in text, text
        if length >= F.HEADER_SIZE:
            assert f"{length} bytes" in text and f"header says {len(data)}" in text
            region = _region(h, length)
            if region == "records":
                block = (length - h.records_offset) // h.block_bytes
                assert f"inside the records section (block {block})" in text, text
            elif region != "padding":
                assert f"inside the {region} section" in text, text
