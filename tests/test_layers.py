"""The package's layers point one way: every import (also inside a function) goes to the same layer or below.

    errors, registry, parallel, ...     the base (and scores, aliases): no l2b imports but each other
    meta, reference, models, runfiles   the core (meta-weights, models, the run-folder table)
    config                              one declaration per option (reads the registries and meta's choices)
    methods | data                      siblings: neither imports the other
    train                               the one trainer
    apps                                sweep, report, labels, predict, estimator, bench
    cli, __main__, the package itself   the command line and the public surface
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "l2b"
LAYERS = {
    "errors": 0, "registry": 0, "parallel": 0, "version": 0, "scores": 0, "aliases": 0,
    "meta": 1, "fastnorm": 1, "normalization": 1, "reference": 1, "models": 1, "runfiles": 1,
    "config": 2,
    "methods": 3, "data": 3,
    "train": 4,
    "apps": 5,
    "cli": 6, "__main__": 6, "": 6,
}
SIBLINGS = {"methods", "data"}  # same layer, independent


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported l2b module, names taken from it, line) for every import statement, wherever it is."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "l2b"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "l2b":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
            found += [(m, [], node.lineno) for m in submodules]
    return found


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    assert {_component(m) for m in MODULES} <= set(LAYERS), "a new top-level module needs a place in LAYERS"


def test_imports_point_down_or_sideways_within_a_component():
    bad = []
    for m, p in MODULES.items():
        here = _component(m)
        for target, _, line in _imports(m, p):
            there = _component(target)
            if there == here or target == "l2b" and here == "":
                continue
            upward = LAYERS[there] > LAYERS[here]
            across = LAYERS[there] == LAYERS[here] and {here, there} <= SIBLINGS
            if upward or across or target == "l2b":  # `import l2b` from inside pulls in every layer
                bad.append(f"{p.relative_to(SRC.parent)}:{line} imports {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles_even_inside_functions():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # a package's __init__ importing its own modules is no cycle
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    bad = [f"{p.relative_to(SRC.parent)}:{line} takes {n} from {target}"
           for m, p in MODULES.items() for target, names, line in _imports(m, p)
           for n in names if n.startswith("_") and not n.startswith("__") and target != m]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("app", ["l2b.apps.report", "l2b.apps.plots", "l2b.apps.labels"])
def test_the_readers_of_run_folders_never_reach_the_trainer(app):
    # a report can be made wherever the run folders are: its imports (all the way down) avoid l2b.train
    graph, seen, todo = _graph(), set(), [app]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += [n for n in graph[m] if n != "l2b"]
    assert not [m for m in seen if _component(m) == "train"], sorted(seen)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    # the test above would pass vacuously if the parser missed imports: plant one and see it flagged
    fake = tmp_path / "l2b" / "meta.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from .train.loop import train\n    from ._x import _private\n")
    found = _imports("l2b.meta", fake)
    assert ("l2b.train.loop", ["train"], 2) in found
    assert any(names == ["_private"] for _, names, _ in found)


def test_no_module_is_over_about_400_lines():
    # a module that keeps growing is hiding a second module: split it by what its parts are about
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
