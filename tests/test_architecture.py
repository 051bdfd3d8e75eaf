"""The package's shape, checked from its source with ``ast`` (nothing is imported):

- (a) no import cycles among ssmtrim's modules, counting imports inside functions (the lazy ones) too;
- every package is listed in pyproject's ``packages`` (a wheel leaves out what is not listed);
- (c) imports go the one way docs/ARCHITECTURE.md states: ops and the models proper import nothing above them, and
  nothing below the command line imports it, the API, training or the exporter;
- (b) only the family modules (``ssmtrim/models/vim*.py``, ``plainmamba*.py``, ``vmamba*.py``, ``mambavision*.py``,
  ``mambar*.py``, ``ssmtrim/models/<family>/``) compare against a family name (``family == "vim"``,
  ``in ("vim", ...)``): elsewhere a family's behaviour is asked of the family, not switched on its name.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ssmtrim"
FAMILIES = ("vim", "plainmamba", "vmamba", "mambavision", "mambar")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _internal(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` starts with (``ssmtrim.a.b.attr`` -> ``ssmtrim.a.b``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the ssmtrim modules it imports anywhere in its source (module level, functions, TYPE_CHECKING)."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = _resolve_relative(mod, is_package, node.level, node.module)
                # from pkg import name: the submodule pkg.name when there is one, else pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            for target in targets:
                if target == "ssmtrim" or target.startswith("ssmtrim."):
                    found = _internal(target, known)
                    if found is not None and found != mod:
                        graph[mod].add(found)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (an import cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every import edge inside a cycle, the shortest cycle through it (each cycle once, from its first module
    in sorted order): a readable, bounded list of what to cut."""
    result: dict[tuple[str, ...], list[str]] = {}
    for component in strongly_connected(graph):
        members = set(component)
        for a in component:
            for b in sorted(graph[a] & members):
                # shortest path b -> a inside the component, closing the edge a -> b
                parent: dict[str, str | None] = {b: None}
                queue = deque([b])
                while queue and a not in parent:
                    v = queue.popleft()
                    for w in sorted(graph[v] & members):
                        if w not in parent:
                            parent[w] = v
                            queue.append(w)
                path, v = [], a
                while v is not None:  # a, ..., b walked back from a
                    path.append(v)
                    v = parent[v]
                cycle = [a, *reversed(path[1:])]  # a -> b -> ... -> (back to a)
                start = cycle.index(min(cycle))
                rotated = cycle[start:] + cycle[:start]
                result.setdefault(tuple(rotated), rotated)
    return sorted(result.values(), key=lambda c: (len(c), c))


def is_family_module(path: Path) -> bool:
    rel = path.relative_to(ROOT).parts
    if len(rel) >= 2 and rel[0] == "models":
        return any(rel[1].startswith(f) for f in FAMILIES)  # models/vim*.py, models/plainmamba*.py, models/<family>/
    return False


def _family_constants(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and node.value in FAMILIES:
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [c for elt in node.elts for c in _family_constants(elt)]
    return []


def family_comparisons() -> list[str]:
    """``file:line: source`` of each comparison with a family name outside the family modules (``==``, ``!=``,
    ``in (...)``, and ``case "vim":`` in a match statement)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if is_family_module(path):
            continue
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Compare):
                names = [c for operand in (node.left, *node.comparators) for c in _family_constants(operand)]
            elif isinstance(node, ast.MatchValue):
                names = _family_constants(node.value)
            else:
                continue
            if names:
                segment = " ".join((ast.get_source_segment(source, node) or "").split())
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {segment}")
    return found


def test_the_checks_see_the_package():
    """The graph and the scan are not vacuous: known edges, a lazy import and a planted comparison are found."""
    graph = import_graph()
    assert "ssmtrim.ops.backend" in graph["ssmtrim.ops.selective_scan"]
    assert "ssmtrim.training.loop" in graph["ssmtrim.training.recipes"]
    assert "ssmtrim.checkpoint" in graph["ssmtrim.training.recipes"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}}) == [["a", "b"], ["a", "b", "c"]]
    tree = ast.parse('if cfg.family in ("vim", "x"): pass\nif "plainmamba" != f: pass\nif f == "vimx": pass')
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert [c for n in compares for o in (n.left, *n.comparators) for c in _family_constants(o)] == \
        ["vim", "plainmamba"]
    assert is_family_module(ROOT / "models" / "vim.py") and is_family_module(ROOT / "models" / "vim" / "x.py")
    assert not is_family_module(ROOT / "models" / "registry.py")


def test_no_import_cycles():
    found = cycles(import_graph())
    print("\n".join(" -> ".join([*c, c[0]]) for c in found) or "no import cycles")
    assert not found, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in found)


def test_family_names_are_compared_only_in_family_modules():
    found = family_comparisons()
    print("\n".join(found) or "no family comparisons outside the family modules")
    assert not found, "family names compared outside the family modules:\n" + "\n".join(found)


def test_every_package_is_installed():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    assert packages <= listed, f"add to pyproject's [tool.setuptools] packages: {sorted(packages - listed)}"


# The direction of imports that docs/ARCHITECTURE.md states ("Layers"): what each group may import from ssmtrim.
# A group is a package (ops, models, pruning, training, cli) or one module; models.loading and models.resize are the
# loading layer, above the models proper.
FOUNDATIONS = {"ssmtrim.errors", "ssmtrim.notices"}
MAY_IMPORT = {
    "ops": {"ops"} | FOUNDATIONS,
    "models": {"models", "ops"} | FOUNDATIONS,
}
ONLY_IMPORTED_BY = {  # the groups at the top: nothing below them imports them
    "cli": {"cli", "ssmtrim.__main__"},
    "ssmtrim.api": {"cli"},
    "training": {"training", "cli", "ssmtrim.api"},
    "ssmtrim.export": {"ssmtrim.report", "ssmtrim.api", "cli"},
}


def group(module: str) -> str:
    parts = module.split(".")
    if module in ("ssmtrim.models.loading", "ssmtrim.models.resize"):
        return "loading"
    return parts[1] if len(parts) > 1 and parts[1] in ("ops", "models", "pruning", "training", "cli") else module


def upward_imports() -> list[str]:
    found = []
    for module, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            src, dst = group(module), group(target)
            if src in MAY_IMPORT and dst not in MAY_IMPORT[src]:
                found.append(f"{module} -> {target} ({src} may import only {sorted(MAY_IMPORT[src])})")
            if dst in ONLY_IMPORTED_BY and src not in ONLY_IMPORTED_BY[dst]:
                found.append(f"{module} -> {target} (only {sorted(ONLY_IMPORTED_BY[dst])} import {dst})")
    return found


def test_imports_go_one_way():
    found = upward_imports()
    print("\n".join(found) or "no import against the layers' direction")
    assert not found, "imports against the direction docs/ARCHITECTURE.md states:\n" + "\n".join(found)


def test_the_direction_check_sees_planted_upward_imports(monkeypatch):
    planted = {**import_graph()}
    planted["ssmtrim.ops.backend"] = planted["ssmtrim.ops.backend"] | {"ssmtrim.pruning.engine"}
    planted["ssmtrim.pruning.engine"] = planted["ssmtrim.pruning.engine"] | {"ssmtrim.cli.app"}
    monkeypatch.setitem(globals(), "import_graph", lambda: planted)  # what upward_imports reads
    found = upward_imports()
    assert any("ssmtrim.ops.backend -> ssmtrim.pruning.engine" in f for f in found)
    assert any("ssmtrim.pruning.engine -> ssmtrim.cli.app" in f for f in found)


def test_the_benchmarks_table_names_scripts_that_exist():
    """docs/ARCHITECTURE.md's table of benchmarks and checks names files in benchmarks/ (a renamed or removed script
    would leave the map pointing nowhere)."""
    import re

    doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
    table = doc.split("## Benchmarks and checks", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w.]+\.(?:py|sh))`", table))
    assert "onnx_profile.py" in named
    missing = sorted(name for name in named if not (ROOT.parent / "benchmarks" / name).is_file())
    assert not missing, missing
