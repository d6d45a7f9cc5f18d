"""Stage 0 of the nano MiniGPT-4: a small ViT + Q-Former that learns the scenes alone, without an LLM.

MiniGPT-4 starts from a vision side that already understands images (EVA-CLIP, BLIP-2) and
trains only the projection into the frozen LLM. No small pretrained EVA/Q-Former exists offline,
so the nano recipe first teaches its own: the Q-Former's query outputs, side by side, go through
linear heads that say which (colour, shape) pairs the scene holds and, slot by slot from left to
right, which pair or nothing is there. That is what the answers need: which shapes, how many, in
which order. Reading all the queries (not their mean) asks every query token to carry
information, as the LLM will read them one by one. Measured: the gradient through a frozen LLM
is a far slower teacher for a vision encoder learning from nothing (DESIGN.md part C).

The parts keep MiniGPT-4's names (``visual_encoder``, ``ln_vision``, ``Qformer``,
``query_tokens``), so a stage-0 checkpoint loads into the full model through ``model.ckpt``; the
``head`` stays behind as an unexpected key.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from minigpt4.common.registry import registry
from minigpt4.datasets.datasets.synthetic_shapes import PAIRS
from minigpt4.models.base_model import BaseModel
from minigpt4.models.mini_gpt4 import VisionQueries


@registry.register_model("scene_classifier")
class SceneClassifier(VisionQueries, BaseModel):
    """The vision side's query outputs, side by side -> two linear heads.

    ``pairs``: which of the 18 (colour, shape) pairs the scene holds (multi-label, BCE; quick to
    learn). ``slots``: per slot from left to right, which pair or empty (cross-entropy; says how
    many shapes and in which order, duplicates included). The loss is their sum.
    """

    def __init__(
        self,
        visual_encoder: nn.Module,
        ln_vision: nn.Module,
        Qformer: nn.Module,
        query_tokens: nn.Parameter,
        num_slots: int = 3,
        num_pairs: int = len(PAIRS),
    ):
        super().__init__(visual_encoder, ln_vision, Qformer, query_tokens)
        self.num_slots, self.num_pairs = num_slots, num_pairs
        self.head = nn.Linear(self.queries_width, num_pairs + num_slots * (num_pairs + 1))
        self.requires_grad_(True)  # stage 0 trains the whole vision side

    PRETRAINED_MODEL_CONFIG_DICT = {"nano": "configs/models/minigpt4_nano.yaml"}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], num_slots: int = 3) -> "SceneClassifier":
        """The vision side of the ``model`` section (MiniGPT-4's builder), and the two heads."""
        return cls(*cls.trainable_parts(cfg, "scene classifier"), num_slots)

    def logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, pairs) multi-label logits and (B, slots, pairs + 1) slot logits."""
        out = self.head(self.queries(image).flatten(1))
        return out[:, : self.num_pairs], out[:, self.num_pairs :].view(-1, self.num_slots, self.num_pairs + 1)

    def forward(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        pairs, slots = self.logits(samples["image"])
        pair_loss = F.binary_cross_entropy_with_logits(pairs, samples["labels"].to(pairs.dtype))
        slot_loss = F.cross_entropy(slots.flatten(0, 1), samples["slots"].flatten())
        return {"loss": pair_loss + slot_loss}


@torch.no_grad()
def exact_scene_accuracy(model: SceneClassifier, images: torch.Tensor, slots: torch.Tensor) -> float:
    """Share of scenes whose every slot is right: the same shapes, in order, nothing extra."""
    model.eval()
    return (model.logits(images)[1].argmax(-1) == slots).all(dim=1).float().mean().item()
