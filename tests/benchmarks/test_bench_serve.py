"""benchmarks/bench_serve.py runs end to end on the nano model (tiny settings) and writes its record."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # servers started and loaded for each mode


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("bench_serve")
    cmd = [sys.executable, "benchmarks/bench_serve.py", "--tiny", "--modes", "one-at-a-time", "hf", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    return json.loads((out / "serve_tiny.json").read_text()), done.stdout.splitlines()


def test_every_point_has_finite_numbers_and_no_errors(run):
    record, _ = run
    assert set(record["runs"]) == {"one-at-a-time", "hf"}
    for mode, result in record["runs"].items():
        assert set(result["points"]) == {"1", "4"}, mode
        for point in result["points"].values():
            assert point["errors"] == 0 and point["requests"] >= 2, point
            for key in ("requests_per_s", "output_tokens_per_s", "latency_p50_s", "latency_p99_s"):
                assert math.isfinite(point[key]) and point[key] > 0, (mode, key)
            assert point["latency_p99_s"] >= point["latency_p50_s"]
    assert record["runs"]["one-at-a-time"]["server_args"] == ["--max-batch", "1"]
    assert record["environment"]["torch"] and record["settings"]["tiny"]


def test_the_table_and_the_goals_come_last(run):
    record, lines = run
    assert lines[-1].startswith("goals: ") and "throughput_x_at_32" in lines[-1]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "clients"])
    assert [line.split()[0] for line in lines[header + 1 : header + 5]] == ["one-at-a-time"] * 2 + ["hf"] * 2
    assert set(record["goals"]) == {"throughput_x_at_32", "p99_over_single_at_32"}
