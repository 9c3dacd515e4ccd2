"""The package's shape (docs/architecture.md, "The package's layers"): no import cycle, no
import from a lower layer to a higher one, no config system (Hydra, OmegaConf) in the artifacts
and the layers below them, no function longer than 60 lines.

Imports inside functions count: deferring an import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hmqsearch"
MAX_FUNCTION_LINES = 60

# layer: (its modules, as prefixes of the dotted name under hmqsearch, "" the package itself;
#         the layers directly below it).  A module may import its own layer and every layer below.
LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "base": (("errors", "io", "inputs", "quiet", "settings", "kernels"), ()),
    "numerics": (("quant",), ("base",)),
    "costs": (("cost",), ("numerics",)),
    "constraints": (("constrained",), ("costs",)),
    "training": (("data", "models", "lit"), ("constraints",)),
    "artifacts": (("export", "report"), ("constraints",)),
    "methods": (("methods",), ("training", "artifacts")),
    "run": (("run", "api", "resume", "sweep", "lr_scaling", "config_schema", "config_check", "config_keys"), ("methods",)),
    "tools": (("", "cli", "report.__main__", "report.runs", "report.pareto"), ("run",)),
}
# Layers that know no config system: they take values, not Hydra nodes.
CONFIG_FREE = ("base", "numerics", "costs", "constraints", "artifacts")
CONFIG_PACKAGES = ("hydra", "omegaconf")
# The packed checkpoint names its architecture as a ``_target_`` node, which load_packed
# builds with Hydra's instantiate when the caller passes no model.
CONFIG_EXCEPTIONS = {("export.packed", "hydra.utils")}


def _name(path: Path) -> str:
    """``hmqsearch/a/b.py`` -> ``a.b``; a package's ``__init__.py`` -> the package; the root -> ""."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> set[str]:
    """Every hmqsearch module ``name`` imports (as names under hmqsearch) and every other top-level
    package (as ``pkg.module``, prefixed with ``!``)."""
    is_package = (PACKAGE / name.replace(".", "/") / "__init__.py").is_file()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if name else []
                anchor = anchor if is_package else anchor[:-1]
                base = ".".join(["hmqsearch", *anchor[: len(anchor) - node.level + 1], *([base] if base else [])])
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for module, attr in targets:
            if module != "hmqsearch" and not module.startswith("hmqsearch."):
                found.add("!" + module)
                continue
            inner = module.removeprefix("hmqsearch").removeprefix(".")
            found.add(inner)  # ``from pkg import name`` reads name off pkg/__init__.py, a submodule too
            submodule = f"{inner}.{attr}".lstrip(".") if attr else None
            if submodule in _modules():
                found.add(submodule)
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(name, tree) if not m.startswith("!") and m != name} for name, tree in _modules().items()}


def _layer(module: str) -> str | None:
    """The layer of the longest prefix that matches ``module``."""
    best: tuple[int, str] | None = None
    for layer, (prefixes, _) in LAYERS.items():
        for p in prefixes:
            if (module == p or (p and module.startswith(p + "."))) and (best is None or len(p) >= best[0]):
                best = (len(p), layer)
    return best[1] if best else None


@cache
def _reachable(layer: str) -> frozenset[str]:
    """``layer`` and every layer below it."""
    return frozenset({layer}).union(*(_reachable(b) for b in LAYERS[layer][1]))


def test_every_module_has_a_layer() -> None:
    missing = sorted(m or "hmqsearch" for m in _modules() if _layer(m) is None)
    assert not missing, f"modules in no layer (add them to LAYERS here and to docs/architecture.md): {missing}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds a cycle)."""
    reach = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        reach[start] = seen
    components = {frozenset(m for m in reach[n] if n in reach.get(m, ())) | {n} for n in graph}
    return sorted(sorted(c) for c in components if len(c) > 1)


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other (directly or round a cycle):\n" + "\n".join(map(str, cycles))


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = [
        f"{m or 'hmqsearch'} ({_layer(m)}) imports {d} ({_layer(d)})"
        for m, deps in sorted(_graph().items()) for d in sorted(deps)
        if _layer(m) and _layer(d) and _layer(d) not in _reachable(_layer(m))
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_lower_layers_know_no_config_system() -> None:
    found = [
        f"{m} imports {d[1:]}"
        for m, tree in sorted(_modules().items()) if _layer(m) in CONFIG_FREE
        for d in sorted(_imports(m, tree))
        if d.startswith("!") and d[1:].split(".")[0] in CONFIG_PACKAGES and (m, d[1:]) not in CONFIG_EXCEPTIONS
    ]
    assert not found, "config imports below the run layer:\n" + "\n".join(found)


def test_no_function_longer_than_60_lines() -> None:
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
