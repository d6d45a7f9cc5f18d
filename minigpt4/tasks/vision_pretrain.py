"""Stage 0 of the nano MiniGPT-4: the ``vision_pretrain`` task trains the scene classifier
(:mod:`minigpt4.models.scene_classifier`) on the scenes' ``labels`` and ``slots``, without an LLM."""
from __future__ import annotations

from minigpt4.common.config import Config
from minigpt4.common.registry import registry
from minigpt4.models.scene_classifier import SceneClassifier
from minigpt4.tasks.base_task import BaseTask


@registry.register_task("vision_pretrain")
class VisionPretrainTask(BaseTask):
    """Trains :class:`SceneClassifier` on ``samples["labels"]`` (which of the 18 pairs) and
    ``samples["slots"]`` (per slot, left to right: one of the 18 pairs or empty). The model
    section's ``model_type`` gives the vision side's shape, whatever its ``arch``."""

    def build_model(self, cfg: Config) -> SceneClassifier:
        num_slots = int(cfg.datasets_cfg.get("synthetic_shapes", {}).get("build_info", {}).get("max_shapes", 3))
        return registry.get_model_class("scene_classifier").from_config(cfg.model_cfg, num_slots)
