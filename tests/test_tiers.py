"""The package's tiers, as the folders say, import only downward (README "Layout").

base (`data/`: judgment tables, tags files, pools; and the compiled Rust core `_core`)
<- runtime (core types, curves, router, tagging, add-model, batch routing, journal)
<- builder (`builder/`: stores from judgments, tuning, judge, the default router)
<- serve (`serve/`) | research (`eval/`)
<- facade (`tagrouter_fast/__init__.py`, `cli.py`) | demo (`demo/`: fake backends and the demo
   router that ``tagrouter serve --demo`` runs; it may import serve, serve never imports it).

Serving and research never import each other, and nothing below the facade imports research.
Every import counts: module level, inside functions and under ``TYPE_CHECKING``; a lazy import
is still an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "python" / "tagrouter_fast"

RANK = {"data": 0, "runtime": 1, "builder": 2, "serve": 3, "research": 3, "facade": 4,
        "demo": 4}


def tier(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "tagrouter_fast", module
    if len(parts) == 1 or parts[1] == "cli":
        return "facade"
    if parts[1] == "_core":  # the compiled Rust core: the base every tier stands on
        return "data"
    return {"data": "data", "builder": "builder", "serve": "serve", "eval": "research",
            "demo": "demo"}.get(parts[1], "runtime")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """Every package module `path` imports (absolute or relative), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            for a in node.names:
                # `from tagrouter_fast import journal` imports the submodule, not the facade.
                sub = PKG.parent / name.replace(".", "/") / a.name
                suffixes = (".py", ".pyi")
                is_module = sub.is_dir() or any(sub.with_suffix(x).is_file() for x in suffixes)
                found.append((node.lineno, f"{name}.{a.name}" if is_module else name))
    return [(line, m) for line, m in found if m.split(".")[0] == "tagrouter_fast"]


def edges() -> list[tuple[str, int, str]]:
    return [(module_name(p), line, m) for p in sorted(PKG.rglob("*.py")) for line, m in imports(p)]


def upward(src: str, dst: str) -> bool:
    a, b = tier(src), tier(dst)
    if {a, b} == {"serve", "research"}:
        return True
    return RANK[b] > RANK[a]


def test_every_import_points_down() -> None:
    bad = [f"{src}:{line} imports {dst} ({tier(src)} -> {tier(dst)})"
           for src, line, dst in edges() if upward(src, dst)]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_walk_sees_the_tiers() -> None:
    # The checker itself: it must see edges of every kind, or the test above proves nothing.
    seen = {(tier(s), tier(d)) for s, _, d in edges()}
    assert ("builder", "data") in seen and ("research", "builder") in seen
    assert ("serve", "runtime") in seen and ("facade", "serve") in seen
    assert ("demo", "serve") in seen and ("facade", "demo") in seen
    assert upward("tagrouter_fast.serve.app", "tagrouter_fast.demo.fake_backend")
    assert upward("tagrouter_fast.router", "tagrouter_fast.builder.bundle")
    assert upward("tagrouter_fast.serve.app", "tagrouter_fast.eval.metrics")
    assert upward("tagrouter_fast.builder.bundle", "tagrouter_fast.eval.pools")
    assert not upward("tagrouter_fast.eval.cli", "tagrouter_fast.data.table")


def test_folders_are_the_tiers() -> None:
    # A new top-level folder must be given a tier here, not fall into "runtime" unseen.
    folders = {p.name for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert folders == {"data", "builder", "serve", "eval", "tagging", "demo"}, folders
