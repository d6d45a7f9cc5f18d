"""Optimizer groups and the per-iteration learning-rate schedules of the original runner.

The schedulers are stateless: ``step(cur_epoch, cur_step)`` computes the lr from the position
alone, which is what makes a mid-epoch resume land on exactly the lr an uninterrupted run had.
"""
from __future__ import annotations

import math
import torch
from torch import nn

from minigpt4.common.registry import registry


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The original's two AdamW groups over the trainable parameters.

    No weight decay for vectors/scalars and for any name containing ``bias``, ``ln`` or ``bn``
    (a substring test, as the original: it also matches e.g. ``...ln_vision...``). Each group
    carries the parameter ``names`` so the split can be inspected and tested.
    """
    decay, no_decay = {"names": [], "params": []}, {"names": [], "params": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = no_decay if param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else decay
        group["names"].append(name)
        group["params"].append(param)
    decay["weight_decay"] = float(weight_decay)
    no_decay["weight_decay"] = 0.0
    return [decay, no_decay]


def build_optimizer(
    model: nn.Module, init_lr: float, weight_decay: float, beta2: float = 0.999, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the two groups; ``fused=None`` fuses when every parameter is on CUDA."""
    groups = optimizer_param_groups(model, weight_decay)
    if not any(group["params"] for group in groups):
        raise ValueError("model: no parameter requires grad, there is nothing to train")
    if fused is None:
        # fused AdamW (one kernel for all tensors) needs every parameter on CUDA
        fused = all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"]) or None
    return torch.optim.AdamW(
        groups, lr=float(init_lr), weight_decay=float(weight_decay), betas=(0.9, float(beta2)), fused=fused
    )


def warmup_lr(step: int, max_step: int, init_lr: float, max_lr: float) -> float:
    return min(max_lr, init_lr + (max_lr - init_lr) * step / max(max_step, 1))


def cosine_lr(step: int, max_step: int, init_lr: float, min_lr: float) -> float:
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max_step)) + min_lr


def step_lr(epoch: int, init_lr: float, min_lr: float, decay_rate: float) -> float:
    return max(min_lr, init_lr * (decay_rate**epoch))


class _WarmupScheduler:
    """Shared by both schedules: the original's fields, and ``step`` = set the lr of the position."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_epoch: int, min_lr: float, init_lr: float, warmup_steps: int, warmup_start_lr: float):
        self.optimizer = optimizer
        self.max_epoch = max_epoch
        self.min_lr = min_lr
        self.init_lr = init_lr
        self.warmup_steps = warmup_steps
        self.warmup_start_lr = warmup_start_lr if warmup_start_lr >= 0 else init_lr

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        raise NotImplementedError

    def step(self, cur_epoch: int, cur_step: int) -> float:
        lr = self.lr_at(cur_epoch, cur_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


@registry.register_lr_scheduler("linear_warmup_cosine_lr")
class LinearWarmupCosineLRScheduler(_WarmupScheduler):
    """Linear warmup, then cosine from ``init_lr`` to ``min_lr`` over all iterations.

    Fidelity quirk kept on purpose: the warmup uses the in-epoch step ``cur_step``, not the
    global one, so a warmup longer than an epoch restarts its ramp at each epoch boundary.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        iters_per_epoch: int,
        min_lr: float,
        init_lr: float,
        warmup_steps: int = 0,
        warmup_start_lr: float = -1,
        **kwargs,
    ):
        super().__init__(optimizer, max_epoch, min_lr, init_lr, warmup_steps, warmup_start_lr)
        self.iters_per_epoch = iters_per_epoch

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        total_step = cur_epoch * self.iters_per_epoch + cur_step
        if total_step < self.warmup_steps:
            return warmup_lr(cur_step, self.warmup_steps, self.warmup_start_lr, self.init_lr)
        return cosine_lr(total_step, self.max_epoch * self.iters_per_epoch, self.init_lr, self.min_lr)


@registry.register_lr_scheduler("linear_warmup_step_lr")
class LinearWarmupStepLRScheduler(_WarmupScheduler):
    """Linear warmup during epoch 0, then ``init_lr * decay_rate**epoch`` floored at ``min_lr``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        min_lr: float,
        init_lr: float,
        decay_rate: float = 1,
        warmup_start_lr: float = -1,
        warmup_steps: int = 0,
        **kwargs,
    ):
        super().__init__(optimizer, max_epoch, min_lr, init_lr, warmup_steps, warmup_start_lr)
        self.decay_rate = decay_rate

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        if cur_epoch == 0:
            return warmup_lr(cur_step, self.warmup_steps, self.warmup_start_lr, self.init_lr)
        return step_lr(cur_epoch, self.init_lr, self.min_lr, self.decay_rate)
