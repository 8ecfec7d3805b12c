"""The shape of the package: no import cycles, the layers in one direction, one header codec.

Imports are read from the source, function-level ones included, so a cycle cannot hide inside a function.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "embfile"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyx")]}


def imports_of(path, known):
    """The embfile modules ``path`` imports, anywhere in it (of Cython source, its top-level imports)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".pyx":
        text = "\n".join(
            line.replace(" cimport ", " import ")
            for line in text.splitlines()
            if line.startswith(("import embfile", "from embfile"))
        )
    tree = ast.parse(text, str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "embfile"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "embfile":
            for alias in node.names:  # "from embfile import errors" imports a module; "import open" the package
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found - {module_name(path)}


def import_graph():
    known = modules()
    return {name: imports_of(path, known) & set(known) for name, path in known.items()}


def find_cycle(graph):
    """One cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "embfile.dataset" in graph and "embfile.file" in graph["embfile.dataset"]  # the reader sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "low",
    [
        "embfile.errors",
        "embfile._version",
        "embfile._core",
        "embfile._format",
        "embfile.file",
        "embfile.dataset",
        "embfile.writer",
    ],
)
def test_lower_layers_never_import_the_package_or_its_edges(low):
    """Adapters (torch, cli) and the package's front (``embfile/__init__``) sit above everything else."""
    reach, todo = set(), [low]
    graph = import_graph()
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not reach & {"embfile", "embfile.torch", "embfile.cli", "embfile.formats"}, sorted(reach)


def test_one_header_codec():
    """Only embfile/_format.py knows the header's byte layout."""
    for name, path in modules().items():
        if name != "embfile._format":
            text = path.read_text(encoding="utf-8")
            assert "struct.Struct" not in text and "struct.pack" not in text and "unpack_from" not in text, name
