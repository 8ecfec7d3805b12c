"""Sphinx configuration: the user guide and pages in Markdown (MyST), the API reference from the docstrings.

Build: ``python -m sphinx -W -n docs docs/_build/html`` (warnings, broken references included, are errors).
"""

import embfile

project = "embfile"
author = "the embfile developers"
copyright = "2026, the embfile developers"
release = version = embfile.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]  # links into the repository (tests/, benchmarks/) from included files

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
napoleon_google_docstring = False
napoleon_use_rtype = False

# Every reference must resolve, except to other projects' objects: this site links to no other inventory.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(np|numpy|os|collections|typing|torch|pyarrow|pyspark|dask|argparse|types|mmap|io)(\..*)?"),
    (
        "py:.*",
        r"(Any|Self|Callable|Iterator|Iterable|Sequence|Mapping|ModuleType|int|str|float|bool|bytes|None|object)",
    ),
    ("py:.*", r".*(ndarray|dtype|NDArray|ValuesView|ItemsView|KeysView|PathLike|BaseException|OSError|ValueError)"),
    ("py:.*", r"(optional|callable|array_like|numpy.dtype|sequence)"),
]

html_theme = "furo"
html_title = f"embfile {release}"
