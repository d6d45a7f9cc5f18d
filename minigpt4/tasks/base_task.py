"""A task says which model and datasets a run needs and what one training step computes."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from torch import nn

from minigpt4.common.config import Config, ConfigError
from minigpt4.common.registry import RegistryError, registry

logger = logging.getLogger(__name__)


class BaseTask:
    @classmethod
    def setup_task(cls, cfg: Config | None = None, **kwargs) -> "BaseTask":
        return cls()

    def build_model(self, cfg: Config) -> nn.Module:
        model_cfg = cfg.model_cfg
        model_cls = registry.get_model_class(model_cfg.arch)
        return model_cls.from_config(model_cfg)

    def build_datasets(self, cfg: Config) -> dict[str, dict[str, Any]]:
        """``{dataset name: {"train": dataset}}`` from the ``datasets`` section."""
        datasets_cfg = cfg.datasets_cfg
        if not datasets_cfg:
            raise ConfigError("datasets: no dataset configured; add e.g. datasets.cc_sbu_align")
        datasets = {}
        for name, dataset_cfg in datasets_cfg.items():
            try:
                builder_cls = registry.get_builder_class(name)
            except RegistryError as err:
                raise ConfigError(f"datasets.{name}: {err}") from None
            datasets[name] = builder_cls(dataset_cfg).build_datasets()
        return datasets

    def train_step(self, model: nn.Module, samples: Mapping[str, Any]) -> torch.Tensor:
        return model(samples)["loss"]


def setup_task(cfg: Config) -> BaseTask:
    """The task named by ``run.task``."""
    try:
        task_cls = registry.get_task_class(cfg.run_cfg.task)
    except RegistryError as err:
        raise ConfigError(f"run.task: {err}") from None
    return task_cls.setup_task(cfg=cfg)
