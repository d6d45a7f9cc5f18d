"""Process-group setup from the variables ``torchrun`` exports, and the few collectives we use.

Without ``RANK``/``WORLD_SIZE`` in the environment everything degrades to a single process, so
the same code runs under ``python train.py`` and ``torchrun --nproc-per-node N train.py``.
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

# What asks a training run to stop cleanly: SIGTERM, which Slurm and Kubernetes send on preemption
# (and torchrun passes on to its processes). Not SIGUSR1: it ends a torchrun agent at once. The
# runner stops at its next optimizer step with a checkpoint; loader workers ignore the signal and
# are shut down by their process.
STOP_SIGNALS = (signal.SIGTERM,)

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def main_process(func: Callable) -> Callable:
    """Run ``func`` on rank 0 only (returns None elsewhere)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if is_main_process():
            return func(*args, **kwargs)
        return None

    return wrapper


def init_distributed_mode(device: str = "cuda", dist_url: str = "env://", backend: str | None = None) -> DistInfo:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs) and pick the device.

    ``device`` is ``run.device`` (``cuda`` or ``cpu``); under torchrun each process takes the GPU
    of its ``LOCAL_RANK``.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        from minigpt4.common.config import ConfigError  # (config imports this module)

        raise ConfigError(f"run.device: '{device}' but no CUDA GPU is visible; add --options run.device=cpu to train on the CPU")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device(device if device != "cuda" else "cuda:0"))

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    logger.info("distributed init (rank %d of %d, %s, %s)", rank, world_size, backend, dist_url)
    dist.init_process_group(
        backend=backend,
        init_method=dist_url,
        world_size=world_size,
        rank=rank,
        # loading a 13B LLM on every rank can keep the first collective waiting for a long time
        timeout=datetime.timedelta(minutes=60),
        device_id=dev if dev.type == "cuda" else None,
    )
    dist.barrier()
    return DistInfo(rank, world_size, local_rank, dev)


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in a single process."""
    if not is_dist_avail_and_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce(value: float, device: torch.device, dtype: torch.dtype, op: str) -> float:
    """``value`` reduced over the ranks (``op``: "sum" or "max"); itself without torch.distributed."""
    if not is_dist_avail_and_initialized():
        return value
    t = torch.tensor([value], dtype=dtype, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.item()


def all_reduce_mean(value: float, device: torch.device) -> float:
    return _all_reduce(value, device, torch.float64, "sum") / get_world_size()


def all_reduce_max(value: int, device: torch.device) -> int:
    return int(_all_reduce(value, device, torch.int64, "max"))


def destroy_process_group() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
