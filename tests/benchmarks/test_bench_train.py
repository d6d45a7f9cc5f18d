"""benchmarks/bench_train.py runs end to end at tiny shapes on the CPU and writes its record."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_train")
    cmd = [sys.executable, "benchmarks/bench_train.py", "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)]
    # one thread: on a busy machine two spinning OpenMP threads make the tiny run several times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.split()[:3] == ["stage", "mode", "samples/s"]]
    assert header and lines[header[0] - 1].startswith("results:") and "(goal 2.0x)" in lines[-1]  # the table comes last
    return json.loads((out / "train_tiny.json").read_text())


def test_every_stage_has_both_modes_and_finite_ratios(record):
    assert set(record["stages"]) == {"stage1", "stage2"}
    for name, stage in record["stages"].items():
        assert {"reference", "default"} <= set(stage["modes"]), name
        for mode in stage["modes"].values():
            assert math.isfinite(mode["samples_per_s"]) and mode["samples_per_s"] > 0
            assert mode["tflops_per_step"] > 0
        assert stage["ratios"] and all(math.isfinite(r) and r > 0 for r in stage["ratios"].values())
    # the feature cache as a user gets it: stage 1 sees every image once, stage 2 each 3.5 times
    views = [record["stages"][f"stage{k}"]["modes"]["default+cache+packed"]["views_per_image"] for k in (1, 2)]
    assert views[0] == 1.0 and abs(views[1] - 5 * 200 * 12 / 3439) < 1e-9


def test_modes_see_the_same_batches(record):
    # fp32 on the CPU: same seed, same batches, same prompt draws -> the same first loss
    for stage in record["stages"].values():
        losses = [mode["losses"][0] for mode in stage["modes"].values()]
        assert max(losses) - min(losses) < 1e-4
        assert len({mode["llm_tokens_per_step"] for mode in stage["modes"].values()}) == 1


def test_shapes_follow_the_original_train_configs(record):
    stage1, stage2 = record["stages"]["stage1"]["shapes"], record["stages"]["stage2"]["shapes"]
    assert (stage1["batch_size"], stage1["max_txt_len"], stage1["prompt_path"]) == (64, 32, None)
    assert (stage2["batch_size"], stage2["max_txt_len"], stage2["end_sym"]) == (12, 160, "###")
    assert stage2["prompt_template"] == "###Human: {} ###Assistant: "
    assert record["environment"]["torch"]


def test_a_finished_run_says_so(record):
    assert record["finished"] is True
