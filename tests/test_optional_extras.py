"""Every command imports without the optional extras it does not need.

The quick start installs only ``.[demo]``; a module that imports, at load time, a package only an
extra brings (``braceexpand`` arrived with webdataset in ``[train]``) crashes it, and a test venv
with every extra installed cannot see that. Here each extra's own packages (what it pulls in
beyond the core dependencies, read from the installed metadata) are blocked in a fresh
interpreter, and every command's module is imported.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

# command -> (how to import it, the extras it needs)
COMMANDS = {
    "demo.py": ("import runpy; runpy.run_path('demo.py', run_name='demo')", {"demo"}),
    "train.py": ("import runpy; runpy.run_path('train.py', run_name='train')", set()),
    "dataset/make_stage2_data.py": ("import runpy; runpy.run_path('dataset/make_stage2_data.py', run_name='make_stage2_data')", set()),
    "minigpt4.chat": ("import minigpt4.chat", set()),
    "minigpt4.apps.eval_shapes": ("import minigpt4.apps.eval_shapes", set()),
    "minigpt4.apps.export": ("import minigpt4.apps.export", set()),
    "minigpt4.apps.serve": ("import minigpt4.apps.serve.__main__, minigpt4.apps.serve.app", {"serve"}),
}


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _closure(requirements: list[Requirement], extra: str = "") -> set[str]:
    """Names of every installed distribution these requirements pull in, transitively."""
    seen: set[str] = set()
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": extra})]
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for extra_name in req.extras:
            todo += [r for r in map(Requirement, dist.requires or []) if r.marker is not None and r.marker.evaluate({"extra": extra_name})]
        todo += [r for r in map(Requirement, dist.requires or []) if r.marker is None or r.marker.evaluate({"extra": ""})]
    return seen


def extra_modules() -> dict[str, set[str]]:
    """extra -> the top-level modules of the distributions only that extra brings."""
    ours = md.distribution("minigpt4")
    requirements = [Requirement(r) for r in ours.requires or []]
    core = _closure([r for r in requirements if r.marker is None])
    extras = [e for e in ours.metadata.get_all("Provides-Extra") or [] if e != "test"]
    modules_of: dict[str, set[str]] = {}
    for module, dists in md.packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_name(dist), set()).add(module)
    out = {}
    for extra in extras:
        own = _closure([r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": extra})], extra) - core
        out[extra] = {m for dist in own for m in modules_of.get(dist, ()) if not m.startswith("_")}
    return out


EXTRAS = extra_modules()


def test_the_extras_bring_the_packages_the_quick_start_lacks():
    # The test below only means something if the extras' own packages are known.
    assert {"webdataset", "braceexpand"} <= EXTRAS["train"]
    assert "gradio" in EXTRAS["demo"] and "torch" not in EXTRAS["demo"]


def test_every_command_imports_with_the_extras_it_does_not_need_blocked():
    # One interpreter per set of needed extras (starting one costs seconds): everything the
    # commands do not need is blocked at once, and each command is imported in turn.
    groups: dict[frozenset, list[str]] = {}
    for command, (_, needs) in COMMANDS.items():
        groups.setdefault(frozenset(needs), []).append(command)
    for needs, commands in groups.items():
        needed = set().union(*(EXTRAS[extra] for extra in needs))  # gradio needs httpx, which [serve] lists too
        blocked = sorted(m for extra, modules in EXTRAS.items() if extra not in needs for m in modules if m not in needed)
        lines = [f"import sys; sys.modules.update({{{', '.join(f'{m!r}: None' for m in blocked)}}})"]
        for command in commands:
            lines += ["try:", f"    {COMMANDS[command][0]}", "except Exception as err:",
                      f"    sys.exit(f'{command}: {{type(err).__name__}}: {{err}}')"]
        run = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert run.returncode == 0, f"without the extras other than {sorted(needs)}:\n{run.stderr[-3000:]}"
