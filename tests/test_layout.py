"""The layout stays one-way: every import in the library points down the rooms, and no two files import each
other, directly or through a chain (docs/architecture.md).

    cli, benchmarks → reports → orchestration → search_space → blocks → kernels

Imports are read from the source (every `import` / `from … import` anywhere in a module, lazy ones inside
functions included, `if TYPE_CHECKING:` blocks excluded), so nothing is executed.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# room -> layer; a module may import rooms of its own layer or lower. cli dispatches `hqlt bench` to benchmarks.
LAYERS = {"kernels": 0, "blocks": 1, "search_space": 2, "orchestration": 3, "reports": 4, "benchmarks": 5,
          "cli": 6}


def module_files() -> dict[str, Path]:
    """hqlt.<dotted> -> file, for every .py file in the rooms (the folders install as hqlt.<room>)."""
    out = {}
    for room in LAYERS:
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if "results" in parts:  # scripts beside committed results, not library modules
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out["hqlt." + ".".join(parts)] = path
    return out


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The hqlt modules that `name` imports (resolved to files in `known`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_blocks(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule `pkg.sub` where one exists
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import hqlt.kernels.api.x` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def room_of(module: str) -> str:
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph():
    known = module_files()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_every_room_is_scanned(graph):
    rooms = {room_of(m) for m in graph}
    assert {"kernels", "blocks", "search_space", "orchestration", "reports"} <= rooms
    assert len(graph) > 50


def test_imports_point_down(graph):
    upward = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                    if LAYERS[room_of(t)] > LAYERS[room_of(m)])
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_backends_are_reached_only_through_dispatch(graph):
    """Kernel implementations never reach up into the backends (a backend composes them, not the reverse),
    and nothing outside the kernels picks a backend module directly: the selection policy is dispatch's."""
    allowed = {"hqlt.kernels", "hqlt.kernels.dispatch"}
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts
                 if t.startswith("hqlt.kernels.backends") and not m.startswith("hqlt.kernels.backends")
                 and m not in allowed)
    assert not bad, "backend modules imported past dispatch:\n" + "\n".join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_cycles_between_files(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" ⇄ ".join(c) for c in cycles)


# The checker itself: it must see the kinds of imports the layout once had.
def _scan(tmp_path, files: dict[str, str]) -> dict[str, set[str]]:
    known = {}
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        parts = list(Path(rel).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        known["hqlt." + ".".join(parts)] = p
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_checker_sees_lazy_relative_and_cyclic_imports(tmp_path):
    g = _scan(tmp_path, {
        "kernels/__init__.py": "",
        "kernels/bench.py": "def f():\n    from hqlt.orchestration import sweep\n",
        "kernels/dispatch.py": "from .backends import auto\n",
        "kernels/backends/__init__.py": "",
        "kernels/backends/auto.py": "from ..dispatch import x\n",
        "orchestration/__init__.py": "",
        "orchestration/sweep.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from hqlt.reports import r\n",
        "reports/__init__.py": "",
        "reports/r.py": "import hqlt.orchestration.sweep\n",
    })
    assert "hqlt.orchestration.sweep" in g["hqlt.kernels.bench"]  # lazy, upward
    assert g["hqlt.orchestration.sweep"] == set()  # TYPE_CHECKING only
    assert find_cycles(g) == [["hqlt.kernels.backends.auto", "hqlt.kernels.dispatch"]]
    up = [(m, t) for m, ts in g.items() for t in ts if LAYERS[room_of(t)] > LAYERS[room_of(m)]]
    assert up == [("hqlt.kernels.bench", "hqlt.orchestration.sweep")]
