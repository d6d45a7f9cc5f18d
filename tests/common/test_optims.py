"""minigpt4/common/optims.py: the lr schedules and AdamW groups of the original runner."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from minigpt4.common.optims import (
    LinearWarmupCosineLRScheduler,
    LinearWarmupStepLRScheduler,
    build_optimizer,
    optimizer_param_groups,
)
from minigpt4.common.registry import registry

# the run sections of the original stage-1 and stage-2 configs
STAGES = {
    "stage1": dict(max_epoch=4, iters_per_epoch=5000, min_lr=8e-5, init_lr=1e-4, warmup_steps=5000, warmup_start_lr=1e-6),
    "stage2": dict(max_epoch=5, iters_per_epoch=200, min_lr=1e-5, init_lr=3e-5, warmup_steps=200, warmup_start_lr=1e-6),
}


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=0.0)


def formula(epoch, i, max_epoch, iters_per_epoch, min_lr, init_lr, warmup_steps, warmup_start_lr):
    """DESIGN B5, written out independently of the implementation."""
    t = epoch * iters_per_epoch + i
    if t < warmup_steps:
        return min(init_lr, warmup_start_lr + (init_lr - warmup_start_lr) * i / max(warmup_steps, 1))
    return min_lr + (init_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t / (max_epoch * iters_per_epoch)))


def test_schedulers_are_registered():
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_lr") is LinearWarmupCosineLRScheduler
    assert registry.get_lr_scheduler_class("linear_warmup_step_lr") is LinearWarmupStepLRScheduler


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_cosine_schedule_matches_the_original(ref_json, stage):
    opt = _optimizer()
    sched = LinearWarmupCosineLRScheduler(opt, **STAGES[stage])
    points = ref_json["lr"][stage]
    assert len(points) >= 40
    for epoch, step, lr in points:
        sched.step(epoch, step)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-18), (epoch, step)


@pytest.mark.parametrize(
    "settings",
    [
        STAGES["stage1"],
        STAGES["stage2"],
        # warmup longer than an epoch: the ramp restarts with the in-epoch step (the original's quirk)
        dict(max_epoch=3, iters_per_epoch=7, min_lr=1e-5, init_lr=1e-3, warmup_steps=10, warmup_start_lr=1e-6),
        dict(max_epoch=2, iters_per_epoch=5, min_lr=0.0, init_lr=1e-3, warmup_steps=0, warmup_start_lr=-1),
    ],
)
def test_cosine_schedule_follows_the_formula_everywhere(settings):
    opt = _optimizer()
    sched = LinearWarmupCosineLRScheduler(opt, **settings)
    start = settings["warmup_start_lr"] if settings["warmup_start_lr"] >= 0 else settings["init_lr"]
    n = settings["iters_per_epoch"]
    for epoch in range(settings["max_epoch"]):
        for i in sorted({0, 1, n // 3, n // 2, n - 2, n - 1} | set(range(0, n, max(n // 37, 1)))):
            got = sched.step(epoch, i)
            want = formula(epoch, i, **{**settings, "warmup_start_lr": start})
            assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
            assert opt.param_groups[0]["lr"] == got


def test_warmup_restarts_with_the_in_epoch_step():
    sched = LinearWarmupCosineLRScheduler(_optimizer(), max_epoch=3, iters_per_epoch=7, min_lr=0.0, init_lr=1.0, warmup_steps=10, warmup_start_lr=0.0)
    assert sched.step(0, 6) == pytest.approx(0.6)
    assert sched.step(1, 0) == pytest.approx(0.0)  # t = 7 < 10: warmup with i = 0


def test_step_schedule():
    opt = _optimizer()
    sched = LinearWarmupStepLRScheduler(opt, max_epoch=4, min_lr=1e-4, init_lr=1e-2, decay_rate=0.1, warmup_start_lr=1e-3, warmup_steps=10)
    assert sched.step(0, 0) == pytest.approx(1e-3)
    assert sched.step(0, 5) == pytest.approx(1e-3 + (1e-2 - 1e-3) * 0.5)
    assert sched.step(0, 50) == pytest.approx(1e-2)
    assert sched.step(1, 3) == pytest.approx(1e-3)
    assert sched.step(3, 0) == pytest.approx(1e-4)  # floored at min_lr
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_optimizer_groups_match_the_original(tiny_models, ref_json):
    groups = optimizer_param_groups(tiny_models["vicuna0"], weight_decay=0.05)
    assert groups[0]["names"] == ref_json["optimizer_groups"]["weight_decay"]
    assert groups[1]["names"] == ref_json["optimizer_groups"]["no_weight_decay"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.ln_final = nn.Linear(4, 4)  # 2-D but named "ln": no decay, as the original's substring test
        self.bn = nn.BatchNorm1d(4)
        self.scale = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_decay_rules_and_frozen_params():
    groups = optimizer_param_groups(_Toy(), weight_decay=0.1)
    assert groups[0]["names"] == ["proj.weight"]
    assert sorted(groups[1]["names"]) == sorted(["proj.bias", "ln_final.weight", "ln_final.bias", "bn.weight", "bn.bias", "scale"])


def test_build_optimizer():
    opt = build_optimizer(_Toy(), init_lr=3e-5, weight_decay=0.05, beta2=0.98)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["lr"] == 3e-5 for g in opt.param_groups)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(frozen, 1e-4, 0.05)
