"""Logging setup per rank, and the running averages the runner reports."""
from __future__ import annotations

import logging
from collections import deque


def setup_logger(rank: int = 0, level: int = logging.INFO) -> None:
    """INFO on rank 0, WARNING on the others, so an 8-GPU run does not print everything 8 times."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


class SmoothedValue:
    """A windowed and a global average of a scalar series."""

    def __init__(self, window_size: int = 20):
        self.window: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return sum(self.window) / max(len(self.window), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else float("nan")


class MetricLogger:
    """Named :class:`SmoothedValue` s; ``str()`` gives ``loss: 1.2345 (1.3000)  lr: 0.000100``."""

    def __init__(self, window_size: int = 20):
        self.meters: dict[str, SmoothedValue] = {}
        self.window_size = window_size

    def update(self, **values: float) -> None:
        for name, value in values.items():
            self.meters.setdefault(name, SmoothedValue(self.window_size)).update(float(value))

    def global_avg(self) -> dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{n}: {m.value:.6g} ({m.global_avg:.6g})" for n, m in self.meters.items())
