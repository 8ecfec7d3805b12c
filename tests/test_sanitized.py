"""The hostile-file cases again, against embfile built with AddressSanitizer and UBSan.

A read one byte outside the mapping, or any undefined behaviour in the C core,
aborts the sanitized worker, which the sandbox reports as a crash with the
sanitizer's report.  (``make fuzz`` runs the coverage-guided fuzzer on such a build.)
"""

import pathlib
import shutil
import subprocess

import mutate
import pytest
import sanitized
from hypothesis import given, settings
from hypothesis import strategies as st
from sandbox import Sandbox

REGRESSIONS = pathlib.Path(__file__).parent.parent / "fuzz" / "regressions"

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("nm") is None,
    reason="needs gcc and nm (binutils) to build and inspect the sanitized core",
)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    env = sanitized.build(dest=str(tmp_path_factory.mktemp("sanitized")))
    core = next(pathlib.Path(env["PYTHONPATH"], "embfile").glob("_core*.so"))
    symbols = subprocess.run(["nm", "-D", core], capture_output=True, text=True, check=True).stdout
    assert "__asan_report_load" in symbols and "__ubsan_handle" in symbols, "the core is not instrumented"
    with Sandbox(env=env, timeout=120) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return mutate.write_seeds(tmp_path_factory.mktemp("seeds"))


def test_the_worker_runs_the_sanitized_build(box):
    box.run(REGRESSIONS / "empty-file-huge-dim.emb")
    assert pathlib.Path(box.core).is_relative_to(box.env["PYTHONPATH"]), box.core


def test_seeds_and_regressions_under_sanitizers(box, seeds):
    for path, keys in seeds.values():
        answer = box.run(path, keys[:8])
        assert answer["bugs"] == [] and set(answer["steps"].values()) == {"ok"}, answer
    for path in sorted(REGRESSIONS.glob("*.emb")):
        assert box.run(path)["bugs"] == [], path


@settings(max_examples=2 * settings().max_examples)
@given(data=st.data())
def test_mutated_files_under_sanitizers(box, seeds, tmp_path_factory, data):
    name = data.draw(st.sampled_from(sorted(seeds)))
    path, keys = seeds[name]
    with open(path, "rb") as f:
        original = f.read()
    ops, reseal = data.draw(mutate.mutations(original))
    case = tmp_path_factory.mktemp("case") / "case.emb"
    case.write_bytes(mutate.apply(original, ops, reseal))
    answer = box.run(case, keys[:8])
    assert answer["bugs"] == [], (ops, reseal, answer["bugs"])
