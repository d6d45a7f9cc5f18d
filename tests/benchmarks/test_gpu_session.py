"""benchmarks/gpu_session.py: a GPU session's one command, tried on the CPU at tiny shapes.

Its steps are child processes under one time budget. What must hold on the device machine holds
here too: a step past its time is stopped with everything it started and the next step runs; no
step starts without time left; carried wheels go first on the children's path; what comes back
fits the device tool's limits (8 files, 2 folders down, plain names).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_session.py"


@pytest.fixture(scope="module")
def gpu_session():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def returned(out: Path) -> list[Path]:
    """What the device tool would bring back from ``out``, checked against its limits."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for path in files:
        parts = path.relative_to(out).parts
        assert len(parts) <= 3, path  # $OUT/a/b/file at most
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in parts), path
    return files


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_a_step_past_its_cap_is_stopped_with_its_children_and_the_next_step_runs(gpu_session, tmp_path):
    session = gpu_session.Session(tmp_path, budget_s=120)
    sleeper = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
               "print(child.pid, flush=True); time.sleep(120)")
    start = time.monotonic()
    stuck = session.run("stuck", [sys.executable, "-c", sleeper], cap=3)
    assert stuck["timed_out"] is True and time.monotonic() - start < 30
    grandchild = int(stuck["output_tail"].split()[0])
    deadline = time.monotonic() + 10
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(grandchild), "the step's own child outlived the step"
    after = session.run("after", [sys.executable, "-c", "print('still here')"], cap=30)
    assert after["rc"] == 0 and after["timed_out"] is False and after["output_tail"] == "still here\n"
    log = (tmp_path / "session.log").read_text()
    assert "== stuck: timed out after" in log and "[after] still here" in log


def test_no_step_starts_without_time_left(gpu_session, tmp_path):
    session = gpu_session.Session(tmp_path, budget_s=5)
    result = session.run("late", [sys.executable, "-c", "raise SystemExit('must not run')"], cap=100)
    assert "rc" not in result and result["skipped"].endswith("s of the budget left")


def test_a_wrong_step_name_is_refused_before_anything_runs(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "decode"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--only: no step named decode; the steps are gpu_tests, static_decode" in done.stderr
    assert not list(tmp_path.iterdir())


def test_without_an_out_folder_it_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "--out is required where $OUT is not set" in done.stderr


def probe_wheel(folder: Path) -> Path:
    """A wheel of one module, ``gpu_session_probe``, built by hand (a wheel is a zip)."""
    folder.mkdir()
    path = folder / "gpu_session_probe-1.0-py3-none-any.whl"
    info = "gpu_session_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("gpu_session_probe.py", "CARRIED = True\n")
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpu_session_probe\nVersion: 1.0\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


def test_carried_wheels_come_first_and_the_gpu_tests_run(tmp_path):
    out = tmp_path / "out"
    probe_wheel(tmp_path / "whl")
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--wheels", str(tmp_path / "whl"),
                           "--only", "gpu_tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "session.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["wheels", "environment", "gpu_tests"]
    assert all(s["rc"] == 0 for s in summary["steps"]) and summary["failed"] == summary["skipped"] == []
    assert (Path(summary["site"]) / "gpu_session_probe.py").is_file()
    import torch

    assert summary["environment"]["torch"] == torch.__version__ and summary["environment"]["gpu"] is None
    assert summary["environment"]["minigpt4_from"] == str(REPO / "minigpt4" / "__init__.py")
    suite = ET.parse(out / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 6 and int(suite.get("skipped")) == int(suite.get("tests"))  # no CUDA here
    assert {p.name for p in returned(out)} == {"session.json", "session.log", "gpu_tests.xml"}
    assert done.stdout.splitlines()[-1].startswith("session: ") and "failed: none; skipped: none" in done.stdout


@pytest.mark.slow
@pytest.mark.e2e
def test_the_whole_session_at_tiny_shapes(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    summary = json.loads((out / "session.json").read_text())
    names = ["environment", "gpu_tests", "static_decode", "train_stage1", "train_stage2"]
    assert [s["step"] for s in summary["steps"]] == names  # chat_quant: bitsandbytes has no CPU path
    assert all(s["rc"] == 0 and not s["timed_out"] for s in summary["steps"])
    files = {str(p.relative_to(out)) for p in returned(out)}
    assert files == {"session.json", "session.log", "gpu_tests.xml", "static_decode/chat_tiny.json",
                     "train_stage1/train_tiny.json", "train_stage2/train_tiny.json"}
    heads = summary["headlines"]
    assert heads["static_decode"]["static_decode"]["greedy_vs_generate"]["equal"] is True
    assert heads["static_decode"]["static_decode"]["profile"]["static"]["units"] == 8
    goals = heads["static_decode"]["goals"]
    assert goals["captioning_batch_speedup"]["value"] > 0 and goals["static_captioning_vs_answer_batch"]["value"] > 0
    assert all(heads[step]["finished"] is True for step in ("static_decode", "train_stage1", "train_stage2"))
    assert set(heads["train_stage1"]) == {"finished", "stage1"} and set(heads["train_stage1"]["stage1"]["ratios"]) == {"default+packed+compile"}
    assert set(heads["train_stage2"]["stage2"]["ratios"]) == {"default+cache+packed+compile"}
