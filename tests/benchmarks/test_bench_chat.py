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
        sys.executable, "benchmarks/bench_chat.py", "--tiny", "--quant", "none", "--decode-tokens", "8", "--repeats", "4",
        "--caption-images", "2", "--caption-tokens", "3", "--caption-repeats", "1", "--out", str(out),
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
    assert record["environment"]["torch"] and record["settings"]["tiny"]


def test_ttft_is_a_median_with_its_spread(run):
    record, lines = run
    assert record["settings"]["repeats"] == 4
    for name, m in record["runs"]["none"].items():
        for key in ("ttft_turn1_s", "ttft_turn2_s"):
            t = m[key]
            assert t["iters"] == 4, (name, key)
            assert 0 < t["min_s"] <= t["p25_s"] <= t["median_s"] <= t["p75_s"] <= t["max_s"], (name, key, t)
    ratio = record["ratios"]["none"]["default"]["ttft_turn2"]
    modes = record["runs"]["none"]
    assert ratio == pytest.approx(modes["default"]["ttft_turn2_s"]["median_s"] / modes["reference"]["ttft_turn2_s"]["median_s"])
    assert any(line.startswith("TTFT: the median of 4 turns") for line in lines)


def test_memory_includes_the_load(run):
    for m in run[0]["runs"]["none"].values():
        # the CPU has no allocator counters: every peak is unmeasured, none is made up
        assert m["load_peak_gb"] is None and m["upload_peak_gb"] is None and m["peak_gb"] is None
        assert "peak_including_load_gb" in m and m["peak_including_load_gb"] is None


def test_captioning_batched_against_the_reference_one_at_a_time(run):
    record, lines = run
    modes = record["runs"]["none"]
    reference, default = modes["reference"]["captioning"], modes["default"]["captioning"]
    assert reference["images"] == default["images"] == 2 and reference["new_tokens"] == default["new_tokens"] == 3
    assert set(reference["images_per_s"]) == {"one_at_a_time"} and reference["one_at_a_time_s"]["iters"] == 2
    assert set(default["images_per_s"]) == {"batched", "one_per_call"} and default["batched_s"]["iters"] == 1
    assert all(finite(r) and r > 0 for r in [*reference["images_per_s"].values(), *default["images_per_s"].values()])
    caption = record["captioning"]
    assert caption["reference_one_at_a_time_images_per_s"] == reference["images_per_s"]["one_at_a_time"]
    assert caption["default_batched_images_per_s"] == default["images_per_s"]["batched"]
    assert caption["default_one_per_call_images_per_s"] == default["images_per_s"]["one_per_call"]
    assert caption["captioning_batch_speedup"] == pytest.approx(
        caption["default_batched_images_per_s"] / caption["reference_one_at_a_time_images_per_s"]
    )
    assert "no_ratio" not in caption
    assert record["goals"]["captioning_batch_speedup"]["value"] == caption["captioning_batch_speedup"]
    assert any(line.startswith("captioning images/s: reference one at a time ") for line in lines)


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
    assert lines[header - 1].startswith("TTFT: the median of ")


def line(lines: list[str], prefix: str) -> str:
    """The one printed line that starts with ``prefix``."""
    found = [text for text in lines if text.startswith(prefix)]
    assert len(found) == 1, (prefix, lines[-12:])
    return found[0]


@pytest.fixture(scope="module")
def static_run(tmp_path_factory) -> tuple[dict, list[str]]:
    out = tmp_path_factory.mktemp("bench_chat_static")
    cmd = [
        sys.executable, "benchmarks/bench_chat.py", "--tiny", "--quant", "none", "--modes", "default", "--decode", "static",
        "--steps-per-sync", "4", "--decode-tokens", "10", "--repeats", "1", "--greedy-check-tokens", "24",
        "--caption-images", "3", "--caption-tokens", "5", "--caption-repeats", "1", "--profile-tokens", "8", "--profile-turn2", "--out", str(out),
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
    assert line(lines, "static decode (fp16, default, eager, sync every 4): ") and lines[-1].startswith("goals: ")
    assert "static_decode" not in run[0]["runs"]["none"]["default"]  # --decode generate (the default) leaves it out


def test_without_the_reference_there_is_no_captioning_ratio(static_run):
    record, lines = static_run
    assert "reference" not in record["runs"]["none"]
    assert record["runs"]["none"]["default"]["captioning"]["images_per_s"]["batched"] > 0
    caption = record["captioning"]
    assert caption["captioning_batch_speedup"] is None and caption["reference_one_at_a_time_images_per_s"] is None
    assert caption["no_ratio"] == "the reference mode did not run (--modes)"
    assert record["goals"]["captioning_batch_speedup"]["value"] is None and record["goals"]["captioning_batch_speedup"]["met"] is None
    assert lines[-2] == "captioning: no ratio: the reference mode did not run (--modes)"


def test_decode_static_checks_its_greedy_tokens_against_generate(static_run):
    record, lines = static_run
    check = record["runs"]["none"]["default"]["static_decode"]["greedy_vs_generate"]
    assert check["tokens"] == 24 and record["settings"]["greedy_check_tokens"] == 24
    assert 0 < check["compared"] <= 24 and check["generate_stopped_at_eos"] == (check["compared"] < 24)
    assert check["equal"] is True and check["first_difference"] is None
    assert line(lines, "static decode, greedy: ") == f"static decode, greedy: the same tokens as generate over {check['compared']}"


def test_decode_static_turn_2_prefills_only_the_question(static_run):
    record, lines = static_run
    static = record["runs"]["none"]["default"]["static_decode"]
    assert static["ttft_turn2_s"]["iters"] == 1 and finite(static["ttft_turn2_s"]["median_s"])
    # turn 1's context and its reply (all but the last token, never fed back) come from the cache
    question = static["turn2_context_positions"] - static["context_positions"] - static["decode_tokens"]
    assert static["turn2_prefilled_positions"] == question + 1 and question > 5
    assert f"{question + 1} of {static['turn2_context_positions']} positions prefilled" in line(lines, "static decode, turn 2: TTFT ")


def test_decode_static_captions_the_images_in_one_batch_against_answer_batch(static_run):
    # Three images, one question: one batch of three rows through Chat(engine=HFEngine(decode="static")),
    # each caption held to --caption-tokens (the run fails otherwise), timed as answer_batch is.
    record, lines = static_run
    default = record["runs"]["none"]["default"]
    captions = default["static_decode"]["captioning"]
    assert captions["images"] == 3 and captions["new_tokens"] == 5 and captions["batched_s"]["iters"] == 1
    assert finite(captions["images_per_s"]) and captions["images_per_s"] > 0
    assert captions["vs_answer_batch"] == pytest.approx(captions["images_per_s"] / default["captioning"]["images_per_s"]["batched"])
    goal = record["goals"]["static_captioning_vs_answer_batch"]
    assert goal["value"] == captions["vs_answer_batch"] and goal["target"] == 2.0 and goal["at_least"] is True
    assert line(lines, "static decode, captioning 3 images in one batch: ").endswith(f"{captions['vs_answer_batch']:.2f}x the default mode's answer_batch")


def test_decode_static_profiles_an_answer_by_the_loop_and_by_generate(static_run):
    record, lines = static_run
    assert record["settings"]["profile_tokens"] == 8
    for name in ("static", "generate"):
        profiled = record["runs"]["none"]["default"]["static_decode"]["profile"][name]
        assert profiled["units"] == 8 and finite(profiled["wall_ms_per_unit"]) and profiled["wall_ms_per_unit"] > 0
        # On the CPU: no kernels, no device share; the host's heaviest ops, matrix products among them.
        assert profiled["device_busy_ms_per_unit"] is None and profiled["top_kernels"] == [] and profiled["runtime_calls_per_unit"] is None
        ops = profiled["top_host_ops"]
        assert 0 < len(ops) <= 8 and all(op["self_ms"] > 0 and op["count"] > 0 for op in ops)
        assert any(op["name"] in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul") for op in ops), ops
        assert line(lines, f"profile, {name} (8 tokens): ").endswith("kernels - ms/token (- busy)")


def test_profile_turn2_profiles_one_more_turn_2_in_each_mode(static_run, run):
    record, lines = static_run
    profiled = record["runs"]["none"]["default"]["turn2_profile"]
    assert profiled["units"] == 1 and finite(profiled["wall_ms_per_unit"]) and profiled["top_host_ops"]
    assert line(lines, "profile, turn 2, none default (1 token): ")
    assert run[0]["runs"]["none"]["default"]["turn2_profile"] is None  # only when asked for


def test_a_run_killed_midway_keeps_what_it_measured(tmp_path):
    """A GPU session stops a benchmark at its time limit: the record is saved as each part ends
    (whole files only), so the parts already measured come back, marked unfinished."""
    import signal
    import time

    cmd = [
        sys.executable, "benchmarks/bench_chat.py", "--tiny", "--quant", "none", "--decode-tokens", "8", "--repeats", "2",
        "--decode", "static", "--greedy-check-tokens", "24", "--caption-images", "3", "--caption-tokens", "4",
        "--caption-repeats", "1", "--profile-tokens", "8", "--out", str(tmp_path),
    ]
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path, deadline = tmp_path / "chat_tiny.json", time.monotonic() + 240
    try:
        while not path.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.exists(), child.stderr.read()[-3000:] if child.poll() is not None else "no record within 240 s"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    record = json.loads(path.read_text())
    assert record["finished"] is False  # the static loop and the default mode were still to come
    reference = record["runs"]["none"]["reference"]
    assert reference["ttft_turn2_s"]["median_s"] > 0 and reference["decode_tokens_per_s"] > 0
    assert record["settings"]["decode"] == "static" and "default" not in record["ratios"].get("none", {})
    assert child.returncode == -signal.SIGKILL  # killed, not finished
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["chat_tiny.json"]


def test_a_finished_run_says_so(run):
    record, _ = run
    assert record["finished"] is True and "unfinished" not in record["runs"]["none"]["default"]
