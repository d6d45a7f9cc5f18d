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
