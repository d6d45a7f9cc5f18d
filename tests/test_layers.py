"""Imports point down: every import in the package (at the top of a file or inside a function)
goes to its own layer's package or to a layer below (docs/architecture.md draws them)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minigpt4"

# bottom to top; packages on one floor stay out of each other
FLOORS = [
    ("common",),
    ("prompts", "processors"),
    ("datasets",),
    ("models",),
    ("conversation", "tasks"),
    ("runners",),
    ("apps",),
]
# the command modules at the package's top are applications too (python -m minigpt4.chat)
APPS = {"chat", "serve"}
FLOOR = {name: level for level, names in enumerate(FLOORS) for name in names}


def room(module: str) -> str | None:
    """``minigpt4.models.llm`` -> ``models``; the package's own ``__init__`` has no room."""
    parts = module.split(".")
    if parts[0] != "minigpt4" or len(parts) == 1:
        return None
    return "apps" if parts[1] in APPS else parts[1]


def imports_of(path: Path) -> list[tuple[str, int]]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module
                base = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")[: -node.level + 1 or None]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
    return [(name, line) for name, line in found if name.startswith("minigpt4")]


def upward_edges() -> list[str]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = room(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if source is None or source == "__init__":
            continue
        assert source in FLOOR, f"{path}: a module outside every layer; add its package to FLOORS and docs/architecture.md"
        for target_module, line in imports_of(path):
            target = room(target_module)
            if target is None or target == source:
                continue
            assert target in FLOOR, f"{path}:{line}: imports {target_module}, which is in no layer"
            if FLOOR[target] >= FLOOR[source]:
                edges.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}, floor {FLOOR[source]}) imports {target_module} (floor {FLOOR[target]})")
    return edges


def test_no_module_imports_from_its_own_floor_or_above():
    assert upward_edges() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # The walk must notice a dataset that imports a model, even inside a function.
    fake = tmp_path / "minigpt4"
    (fake / "datasets").mkdir(parents=True)
    (fake / "models").mkdir()
    (fake / "datasets" / "bad.py").write_text("def f():\n    from minigpt4.models.mini_gpt4 import embed_prompt\n")
    (fake / "models" / "ok.py").write_text("from ..datasets import bad\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert upward_edges() == ["minigpt4/datasets/bad.py:2 (datasets, floor 2) imports minigpt4.models.mini_gpt4 (floor 3)"]
