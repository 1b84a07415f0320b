"""The package's shape: no import cycles between its files (imports inside functions
included), and each stage imports only the stages below it, so a newcomer can read the
package top down: job/ drives cluster/ and execute/, which take ingest/'s shards planned by
plan/ to an engine/, reading and writing through io/."""

from __future__ import annotations

import ast
from pathlib import Path

import batchrun

PACKAGE = Path(batchrun.__file__).parent

# Lowest first. A module may import its own layer and the layers below it. Names are module
# paths under batchrun/ (a folder stands for everything in it).
LAYERS = [
    {"errors", "version", "clock", "machine", "structured", "io.storage", "io.files",
     "io.remote_folder",
     "io.schema", "plan"},
    {"config", "model", "job_file"},
    {"engine", "io.datasets", "io.input", "io.output"},
    {"ingest"},
    {"execute"},
    {"cluster"},
    {"report"},
    {"job"},
    {"api", "cli", "cli_options", "airflow", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every batchrun module `path` imports, wherever the import statement stands."""
    name = module_name(path)
    package = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "batchrun":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                as_module = ".".join([*target, alias.name])
                found.add(as_module if as_module in MODULES else ".".join(target))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("batchrun.") for a in node.names
                         if a.name.startswith("batchrun."))
    return {resolve(m) for m in found} - {name, ""}


def resolve(module: str) -> str:
    """A package import names its __init__."""
    if module in MODULES:
        return module
    return f"{module}.__init__" if module else "__init__"


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}
GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"batchrun/{module.replace('.', '/')}.py is in no layer of "
                         "tests/test_layout.py: add it where it belongs")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_file_imports_itself_through_others() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lazy_imports_count() -> None:
    # The replicas ran shards through an import inside a function; such imports are edges too.
    assert "execute.shard" in GRAPH["cluster.replicas"]


def test_each_stage_imports_only_the_stages_below_it() -> None:
    upward = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
                    if layer_of(d) > layer_of(m))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_file_is_longer_than_a_reader_can_hold() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 460}
    assert not long, f"split these: {long}"
