"""The package's layering: every import (lazy ones included) points down or sideways within a layer,
and no module takes part in an import cycle.

    0  errors, progress(_log), types, util, yamlio, _core value types and helpers
    1  node                                               the node protocol and registry
    2  merge, eval, train, analysis, report, search       the libraries (merging, scoring, training, reports)
    3  sources, stages                                    the node kinds
    4  recipe                                             the engine
    5  cli, finrecipe (the package's lazy entry points)   presentation
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "finrecipe"

LAYERS = {
    "errors": 0, "progress": 0, "progress_log": 0, "types": 0, "util": 0, "yamlio": 0, "_core": 0,
    "node": 1,
    "merge": 2, "eval": 2, "train": 2, "analysis": 2, "report": 2, "search": 2,
    "sources": 3, "stages": 3,
    "recipe": 4,
    "cli": 5, "__init__": 5, "__main__": 5,
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out["finrecipe." + ".".join(parts) if parts != ["__init__"] else "finrecipe"] = p
    return out


def _imports(path: Path, modname: str, is_pkg: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("finrecipe"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = modname.split(".") if is_pkg else modname.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("finrecipe"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    g: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path, name, path.name == "__init__.py"):
            while imp and imp not in mods:
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a parent package is not an edge
                deps.add(imp)
        g[name] = deps
    return g


def _layer(mod: str) -> int:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    assert top in LAYERS, f"{mod}: add its top-level name to LAYERS in {__file__}"
    return LAYERS[top]


def test_imports_point_down() -> None:
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, deps in _graph().items() for b in deps if _layer(b) > _layer(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_recipe_modules_stay_small() -> None:
    big = {p.name: n for p in (PKG / "recipe").glob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not big, f"recipe/ modules over ~400 lines: {big}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # the import parser resolves relative and `from pkg import module` imports
    f = tmp_path / "m.py"
    f.write_text("from . import x\nfrom ..recipe import api\nimport finrecipe.cli\n")
    got = _imports(f, "finrecipe.eval.m", False)
    assert {"finrecipe.eval.x", "finrecipe.recipe.api", "finrecipe.cli"} <= got
