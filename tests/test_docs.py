"""The documentation covers the public API: every public name has its entry in docs/api.md.

(CI builds the site itself with warnings as errors; this test needs no Sphinx.)
"""

import pathlib

import pytest

import embfile
from embfile import epochs

API = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()


@pytest.mark.parametrize("name", sorted(set(embfile.__all__) - {"__version__"}))
def test_every_public_name_is_in_the_api_reference(name):
    assert f"embfile.{name}\n" in API, f"embfile.{name} is not documented in docs/api.md"


@pytest.mark.parametrize("name", ["Batches", "EpochPlan", "rank_share", "shuffle_quality"])
def test_the_epoch_machinery_is_in_the_api_reference(name):
    assert hasattr(epochs, name) and f"embfile.epochs.{name}\n" in API


def test_every_page_is_reachable():
    docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
    index = (docs / "index.md").read_text()
    for page in [
        "guide/reading",
        "guide/writing",
        "guide/versions",
        "guide/engines",
        "guide/converting",
        "guide/training",
        "api",
        "format",
        "guarantees",
        "performance",
        "develop",
        "changelog",
    ]:
        assert (docs / f"{page}.md").exists() and page in index, page
