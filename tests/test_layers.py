"""The import graph of ``raygd`` and ``tuning``, built with ``ast`` from the sources: no import circle, and
``raygd`` imports nothing from ``tuning`` (docs/ARCHITECTURE.md, "Layers"). Every import counts: at module
level, inside a function, and under ``if TYPE_CHECKING`` (they tie the files together just the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raygd", "tuning")


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            out[".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a.b import c`` names a.b.c when that is a module, else a.b)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    edges[m].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, each as a path that closes on itself."""
    found = []
    for start in sorted(edges):
        # a shortest path from start back to start, by breadth-first search
        prev: dict[str, str] = {}
        frontier, seen = [start], {start}
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w == start:
                        prev.setdefault(start, v)
                    elif w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        if start in prev:
            path, v = [start], prev[start]
            while v != start:
                path.append(v)
                v = prev[v]
            cycle = [start, *reversed(path[1:]), start]
            if not any(set(cycle) == set(c) for c in found):
                found.append(cycle)
    return found


def test_no_import_cycle_among_raygd_and_tuning():
    loops = cycles(import_graph(modules()))
    assert not loops, "import cycles:\n" + "\n".join(" -> ".join(c) for c in loops)


def test_raygd_imports_nothing_from_tuning():
    edges = import_graph(modules())
    up = {m: sorted(t for t in ts if t.startswith("tuning")) for m, ts in edges.items() if m.startswith("raygd")}
    assert not {m: ts for m, ts in up.items() if ts}


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"raygd/a.py": "from raygd import b\n", "raygd/b.py": "def f():\n    from raygd.a import x\n"}, 1),
        (
            {
                "raygd/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import raygd.b\n",
                "raygd/b.py": "import raygd.a\n",
            },
            1,
        ),
        (
            {
                "raygd/a.py": "from . import b\n",
                "raygd/b.py": "from .c import y\n",
                "raygd/c.py": "from raygd.a import z\n",
            },
            1,
        ),
        ({"raygd/a.py": "from raygd import b\n", "raygd/b.py": "import os\n"}, 0),
    ],
    ids=["function-level", "type-checking", "relative-three", "none"],
)
def test_the_checker_finds_cycles_it_should(tmp_path, files, expected):
    (tmp_path / "raygd").mkdir()
    (tmp_path / "tuning").mkdir()
    (tmp_path / "raygd/__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert len(cycles(import_graph(modules(tmp_path)))) == expected
