"""benchmarks/bench_chat.py runs end to end at tiny shapes on the CPU and writes its record."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("bench_chat")
    cmd = [
        sys.executable, "benchmarks/bench_chat.py", "--tiny", "--quant", "none", "--decode-tokens", "8", "--repeats", "1",
        "--caption-images", "2", "--caption-tokens", "3", "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "chat_tiny.json").read_text()), done.stdout.splitlines()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def test_both_modes_have_finite_numbers(run):
    record, _ = run
    modes = record["runs"]["none"]
    assert set(modes) == {"reference", "default"}
    for name, m in modes.items():
        for key in ("ttft_turn1_s", "ttft_turn2_s"):
            assert finite(m[key]["median_s"]) and m[key]["median_s"] > 0, (name, key)
        assert finite(m["decode_tokens_per_s"]) and m["decode_tokens_per_s"] > 0, name
        assert m["decode_tokens"] == 8 and m["decode_bytes_per_token"] > 0
    assert modes["reference"]["attn_implementation"] == "eager" and modes["default"]["attn_implementation"] == "sdpa"
    ratios = record["ratios"]["none"]["default"]
    assert all(finite(ratios[k]) for k in ("ttft_turn1", "ttft_turn2", "decode_tokens_per_s"))
    caption = modes["default"]["captioning"]
    assert caption["images"] == 2 and finite(caption["speedup"]) and all(finite(r) for r in caption["images_per_s"].values())
    assert record["environment"]["torch"] and record["settings"]["tiny"]


def test_default_prefills_only_the_new_question_in_turn_2(run):
    modes = run[0]["runs"]["none"]
    reference, default = modes["reference"], modes["default"]
    assert reference["turn2_prefilled_positions"] == reference["turn2_context_positions"]
    assert default["turn2_context_positions"] == reference["turn2_context_positions"]
    # turn 1's context and reply came from the cache: what is left is the question and the roles
    new = default["turn2_context_positions"] - default["turn1_context_positions"] - default["turn1_tokens"]
    assert default["turn2_prefilled_positions"] <= new + 2


def test_the_table_comes_last(run):
    _, lines = run
    assert lines[-1].startswith("goals: ")
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["quant", "mode", "TTFT1"])
    assert [line.split()[1] for line in lines[header + 1 : header + 3]] == ["reference", "default"]


@pytest.fixture(scope="module")
def static_run(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("bench_chat_static")
    cmd = [
        sys.executable, "benchmarks/bench_chat.py", "--tiny", "--quant", "none", "--modes", "default", "--decode", "static",
        "--steps-per-sync", "4", "--decode-tokens", "10", "--repeats", "1", "--caption-images", "0", "--out", str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "chat_tiny.json").read_text()), done.stdout.splitlines()


def test_decode_static_times_the_static_loop_next_to_generate(static_run, run):
    record, lines = static_run
    assert record["settings"]["decode"] == "static" and record["settings"]["steps_per_sync"] == 4
    default = record["runs"]["none"]["default"]
    static = default["static_decode"]
    assert static["decode_tokens"] == 10 and static["steps_per_sync"] == 4 and static["compiled"] is False  # eager on the CPU
    assert finite(static["decode_tokens_per_s"]) and static["decode_tokens_per_s"] > 0
    assert finite(static["ttft_s"]["median_s"]) and static["ttft_s"]["median_s"] > 0
    assert static["vs_generate"] == pytest.approx(static["decode_tokens_per_s"] / default["decode_tokens_per_s"])
    assert lines[-2].startswith("static decode (fp16, default, eager, sync every 4): ") and lines[-1].startswith("goals: ")
    assert "static_decode" not in run[0]["runs"]["none"]["default"]  # --decode generate (the default) leaves it out
