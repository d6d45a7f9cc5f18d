"""Stage 0 of the nano MiniGPT-4: pretrain a small ViT + Q-Former on the scenes, without an LLM.

MiniGPT-4 starts from a vision side that already understands images (EVA-CLIP, BLIP-2) and
trains only the projection into the frozen LLM. No small pretrained EVA/Q-Former exists offline,
so the nano recipe first teaches its own: the mean of the Q-Former's query outputs goes through a
linear head to a multi-label target (which (colour, shape) pairs the scene holds), with
binary cross-entropy. Measured: the gradient through a frozen LLM is a far slower teacher for a
vision encoder learning from nothing (DESIGN.md part C).

The parts keep MiniGPT-4's names (``visual_encoder``, ``ln_vision``, ``Qformer``,
``query_tokens``), so a stage-0 checkpoint loads into the full model through ``model.ckpt``; the
``head`` stays behind as an unexpected key.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from minigpt4.common.config import Config, ConfigError
from minigpt4.common.registry import registry
from minigpt4.datasets.datasets.synthetic_shapes import PAIRS
from minigpt4.models.mini_gpt4 import build_vision_parts, query_output
from minigpt4.tasks.base_task import BaseTask


class SceneClassifier(nn.Module):
    """ViT -> ln_vision -> Q-Former -> mean over queries -> Linear(num_labels)."""

    def __init__(self, visual_encoder: nn.Module, ln_vision: nn.Module, Qformer: nn.Module, query_tokens: nn.Parameter, num_labels: int):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.ln_vision = ln_vision
        self.Qformer = Qformer
        self.query_tokens = query_tokens
        self.head = nn.Linear(Qformer.config.hidden_size, num_labels)
        self.requires_grad_(True)  # stage 0 trains the whole vision side

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        image_embeds = self.ln_vision(self.visual_encoder.forward_features(image))
        return self.head(query_output(self.Qformer, self.query_tokens, image_embeds).mean(dim=1))

    def forward(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.logits(samples["image"])
        return {"loss": F.binary_cross_entropy_with_logits(logits, samples["labels"].to(logits.dtype))}


@registry.register_task("vision_pretrain")
class VisionPretrainTask(BaseTask):
    """Trains :class:`SceneClassifier` on ``samples["labels"]`` (the 18 (colour, shape) pairs)."""

    def build_model(self, cfg: Config) -> SceneClassifier:
        model_cfg = cfg.model_cfg
        if not model_cfg.get("has_qformer", True):
            raise ConfigError("model.has_qformer: the vision_pretrain task trains a Q-Former; set has_qformer: True")
        if model_cfg.get("vit_precision") == "fp16":
            raise ConfigError("model.vit_precision: the vision_pretrain task trains the ViT; set vit_precision: fp32")
        visual_encoder, ln_vision, Qformer, query_tokens = build_vision_parts(model_cfg)
        return SceneClassifier(visual_encoder, ln_vision, Qformer, query_tokens, num_labels=len(PAIRS))


@torch.no_grad()
def exact_scene_accuracy(model: SceneClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of scenes whose every (colour, shape) pair is predicted, with nothing extra."""
    model.eval()
    predicted = model.logits(images) > 0
    return (predicted == labels.bool()).all(dim=1).float().mean().item()
