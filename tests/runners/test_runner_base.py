"""minigpt4/runners/runner_base.py, driven in-process through train.py's ``main``."""
from __future__ import annotations

import json

import pytest
import torch

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import CheckpointError
from minigpt4.models import MiniGPT4
from minigpt4.runners import runner_base
from minigpt4.runners.runner_base import CHECKPOINT_FORMAT, checkpoint_position, find_latest_checkpoint
from train_fixtures import REF, stage2_config, write_align_folder


def run(train, write_yaml, cfg, *extra):
    return train.main(["--cfg-path", str(write_yaml(cfg)), *extra])


def test_stage2_trains_only_llama_proj(train, write_yaml, align_dir, tmp_path):
    cfg = stage2_config(align_dir, tmp_path, batch_size=3, max_epoch=2, iters_per_epoch=6)
    start = MiniGPT4.from_config(cfg["model"]).state_dict()
    runner = run(train, write_yaml, cfg)

    losses = [h["loss"] for h in runner.history]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.01

    trained = runner.unwrap_model().state_dict()
    assert trained.keys() == start.keys()
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed == {"llama_proj.weight", "llama_proj.bias"}  # frozen weights bit-identical

    out = tmp_path / "job"
    ckpt = torch.load(out / "checkpoint_1.pth", weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and (ckpt["epoch"], ckpt["iters"]) == (1, 6)
    assert set(ckpt["model"]) == {"llama_proj.weight", "llama_proj.bias"}  # trainable params only
    assert torch.equal(ckpt["model"]["llama_proj.weight"], trained["llama_proj.weight"])
    assert ckpt["config"]["model"]["end_sym"] == "###" and ckpt["config"]["run"]["init_lr"] == 1e-2
    assert set(ckpt) >= {"optimizer", "scaler", "data_state", "rng_state"}
    assert ckpt["pending_grads"] == [{}]  # saved at an optimizer step: no gradient pending
    assert sorted(p.name for p in out.glob("checkpoint_*")) == ["checkpoint_0.pth", "checkpoint_1.pth"]

    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    epochs = [line for line in lines if "train_loss" in line]
    assert [e["epoch"] for e in epochs] == [0, 1] and epochs[0]["train_broken_samples"] == 0
    assert len([line for line in lines if "global_step" in line]) == 12  # log_freq 1


def test_gradient_accumulation_and_clipping_equal_the_doubled_batch(train, write_yaml, tmp_path):
    # equal answers, so each micro-batch's mean loss covers the same number of tokens
    align = write_align_folder(tmp_path / "align", n=8, captions=["a box on a white background"])
    # one prompt, so the per-batch random prompt choice cannot differ between the two runs
    constant_lr = dict(init_lr=5e-3, min_lr=5e-3, warmup_lr=5e-3, max_grad_norm=0.05, max_epoch=1, prompt_path=str(REF / "prompt_one.txt"))
    accum = run(train, write_yaml, stage2_config(align, tmp_path / "a", batch_size=2, iters_per_epoch=4, accum_grad_iters=2, **constant_lr))
    double = run(train, write_yaml, stage2_config(align, tmp_path / "b", batch_size=4, iters_per_epoch=2, **constant_lr))
    for name in ("llama_proj.weight", "llama_proj.bias"):
        a, b = accum.unwrap_model().state_dict()[name], double.unwrap_model().state_dict()[name]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_exact_when_an_epoch_ends_between_micro_steps(train, write_yaml, tmp_path, capsys):
    """3 iterations an epoch, an optimizer step every 2: epoch 0 ends with one micro-step's
    gradient pending, which the original carries into epoch 1; its checkpoint carries it too."""
    import shutil

    align = write_align_folder(tmp_path / "align", n=8)
    settings = dict(batch_size=2, iters_per_epoch=3, accum_grad_iters=2, max_epoch=2)
    full = run(train, write_yaml, stage2_config(align, tmp_path / "full", **settings))
    first = tmp_path / "full" / "job" / "checkpoint_0.pth"
    pending = torch.load(first, weights_only=True)["pending_grads"]
    assert len(pending) == 1 and set(pending[0]) == {"llama_proj.weight", "llama_proj.bias"}
    (tmp_path / "part" / "job").mkdir(parents=True)
    shutil.copy(first, tmp_path / "part" / "job" / "checkpoint_0.pth")
    resumed = run(train, write_yaml, stage2_config(align, tmp_path / "part", **settings), "--resume", "auto")
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history if h["epoch"] == 1]
    for name in ("llama_proj.weight", "llama_proj.bias"):
        assert torch.equal(resumed.unwrap_model().state_dict()[name], full.unwrap_model().state_dict()[name]), name
    # A checkpoint written before the pending gradients were kept: the resume says it is not exact.
    old = torch.load(first, weights_only=True)
    del old["pending_grads"]
    (tmp_path / "old" / "job").mkdir(parents=True)
    torch.save(old, tmp_path / "old" / "job" / "checkpoint_0.pth")
    capsys.readouterr()
    run(train, write_yaml, stage2_config(align, tmp_path / "old", **settings), "--resume", "auto")
    assert "predates saving the gradients an epoch of 3 iterations leaves pending" in capsys.readouterr().err


def test_a_half_precision_llm_is_refused_before_training_on_the_cpu(train, write_yaml, align_dir, tmp_path):
    cfg = stage2_config(align_dir, tmp_path)
    cfg["model"]["torch_dtype"] = "float16"
    with pytest.raises(ConfigError, match=r"model\.torch_dtype: float16 needs autocast to train"):
        run(train, write_yaml, cfg)
    assert not list(tmp_path.glob("job/checkpoint_*"))


def test_save_every_iters_must_fall_on_an_optimizer_step(train, write_yaml, align_dir, tmp_path):
    cfg = stage2_config(align_dir, tmp_path, accum_grad_iters=2, save_every_iters=3)
    with pytest.raises(ConfigError, match=r"run\.save_every_iters: 3 must be a multiple of run\.accum_grad_iters"):
        run(train, write_yaml, cfg)


def test_bad_checkpoints_give_clear_errors(train, write_yaml, align_dir, tmp_path):
    cfg = stage2_config(align_dir, tmp_path / "first", max_epoch=1, iters_per_epoch=2)
    run(train, write_yaml, cfg)
    good = tmp_path / "first" / "job" / "checkpoint_0.pth"

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"run\.resume_ckpt_path: cannot read '.*truncated\.pth'"):
        run(train, write_yaml, stage2_config(align_dir, tmp_path / "t"), "--resume", str(truncated))

    foreign = str(REF / "minigpt4_tiny.pth")  # released weights, no optimizer or position
    with pytest.raises(CheckpointError, match="is not a training checkpoint .* set model.ckpt"):
        run(train, write_yaml, stage2_config(align_dir, tmp_path / "f"), "--resume", foreign)

    # a checkpoint of the original code (no data/RNG state) continues with the next epoch
    original = {k: v for k, v in torch.load(good, weights_only=True).items() if k in ("model", "optimizer", "config", "scaler", "epoch")}
    torch.save(original, tmp_path / "original.pth")
    runner = run(train, write_yaml, stage2_config(align_dir, tmp_path / "o", max_epoch=2, iters_per_epoch=2), "--resume", str(tmp_path / "original.pth"))
    assert [h["epoch"] for h in runner.history] == [1, 1]


def test_a_new_run_does_not_write_over_an_earlier_runs_checkpoints(train, write_yaml, align_dir, tmp_path, capsys):
    cfg = stage2_config(align_dir, tmp_path, max_epoch=1, iters_per_epoch=2)
    run(train, write_yaml, cfg)
    first = (tmp_path / "job" / "checkpoint_0.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"run\.job_id: '.*job' holds an earlier run's checkpoints \(checkpoint_0\.pth\); continue that run with --resume auto, or give this one another --job-id"):
        run(train, write_yaml, cfg)
    assert (tmp_path / "job" / "checkpoint_0.pth").read_bytes() == first  # untouched
    # Continuing a run that has ended says so, rather than training nothing without a word.
    runner = run(train, write_yaml, cfg, "--resume", "auto")
    err = capsys.readouterr().err
    assert runner.history == [] and "is the end of the run (epoch 1 of 1): there is nothing left to train" in err
    assert "other settings" not in err  # the same config: nothing to say
    # Resuming with other settings goes on with them, and says which they are.
    run(train, write_yaml, {**cfg, "run": {**cfg["run"], "init_lr": 1e-3, "max_epoch": 2}}, "--resume", "auto")
    changed = next(line for line in capsys.readouterr().err.splitlines() if "was written with other settings" in line)
    assert changed.endswith("this run goes on with its own: run.init_lr: 0.01 -> 0.001; run.max_epoch: 1 -> 2"), changed
    # A checkpoint named on the command line is looked for before anything is built.
    from minigpt4.common.cli import ArgumentError

    with pytest.raises(ArgumentError, match=r"--resume: no such file '.*nope\.pth'"):
        run(train, write_yaml, cfg, "--resume", str(tmp_path / "nope.pth"))



def test_runs_started_in_the_same_second_get_folders_of_their_own(train, tmp_path, monkeypatch):
    monkeypatch.setattr(train.time, "strftime", lambda fmt: "20261208010203")
    assert train.new_job_id(tmp_path) == "20261208010203"
    (tmp_path / "20261208010203").mkdir()
    assert train.new_job_id(tmp_path) == "20261208010203_1"
    (tmp_path / "20261208010203_1").mkdir()
    assert train.new_job_id(tmp_path) == "20261208010203_2"


def test_latest_checkpoint_is_found_by_position(tmp_path):
    for name in ["checkpoint_0.pth", "checkpoint_1_iter4.pth", "checkpoint_1_iter12.pth", "checkpoint_2_iter2.pth.tmp", "notes.pth"]:
        (tmp_path / name).write_bytes(b"")
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_1_iter12.pth"
    (tmp_path / "checkpoint_1.pth").write_bytes(b"")
    assert find_latest_checkpoint(tmp_path).name == "checkpoint_1.pth"
    assert checkpoint_position(tmp_path / "checkpoint_3_iter7.pth") == (3, 7)
    assert find_latest_checkpoint(tmp_path / "none") is None


def test_bfloat16_autocast_runs_without_a_scaler(train, write_yaml, align_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_base, "cpu_bf16_slowdown", lambda: 0.5)  # a CPU with bf16 units (AMX)
    runner = run(train, write_yaml, stage2_config(align_dir, tmp_path, max_epoch=1, iters_per_epoch=2, amp=True, amp_dtype="bfloat16"))
    assert runner.use_amp and not runner.use_scaler and not runner.scaler.is_enabled()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in runner.history)


def test_bfloat16_autocast_on_a_cpu_without_bf16_units_trains_in_fp32(train, write_yaml, align_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner_base, "cpu_bf16_slowdown", lambda: 30.0)  # oneDNN emulating bf16 on AVX2
    runner = run(train, write_yaml, stage2_config(align_dir, tmp_path, max_epoch=1, iters_per_epoch=2, amp=True, amp_dtype="bfloat16"))
    assert not runner.use_amp and len(runner.history) == 2
    err = capsys.readouterr().err  # train.py's logging writes there
    assert "WARNING" in err and "no bf16 matrix units" in err and "30.0x" in err and "run.amp: False" in err


def test_cpu_bf16_slowdown_is_a_measured_ratio():
    ratio = runner_base.cpu_bf16_slowdown(size=64, repeats=2)
    assert 0 < ratio < float("inf")
