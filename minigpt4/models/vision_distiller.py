"""Stage 0b of the nano MiniGPT-4: the vision side learns to see other drawings as it sees its own.

Stage 0 trained the ViT + Q-Former on one renderer (six colours in a few shades, hard edges), and
everything after it (``llama_proj``, the LoRA) learned to read its query outputs. A picture in
other shades or sizes moves those outputs, and the answers go wrong. Here a student copy of the
vision side learns, on scenes drawn in other shades of each colour name, at other sizes and
anti-aliased, to give the query outputs the frozen teacher (the same weights) gives on the
training renderer's drawing of the same layout. Mean squared error on the query outputs, the very
tensor ``llama_proj`` reads: where the student matches, the rest of the model needs no retraining.

With ``model.place_weight`` > 0 (stage 0c) a linear head over the student's query outputs also
learns, slot by slot from left to right, which third of the image holds the shape (what a "where"
answer says; stage 0 taught the order of the shapes, not their place), its cross-entropy weighted
against the MSE that keeps everything else where ``llama_proj`` expects it. With
``model.token_weight`` > 0 one linear head, shared by the first three query tokens, learns from
token *i* alone slot *i*'s (colour, shape) and place: each shape then sits in one token, in the
same format for every slot, which is what the LLM can look up by attention ("where is the red
circle?"); a head over all tokens side by side lets a slot spread over several. With
``model.kind_weight`` > 0 one more linear head, shared by the three query tokens after the slots',
learns from each the colour and place of one shape kind (circle, square, triangle; or that the kind
is absent, or there more than once): "what colour is the square?" then reads a token found by its
kind, not by matching shapes across the slots. The heads stay behind (unexpected keys) when the
checkpoint loads into MiniGPT-4.

The student keeps MiniGPT-4's names (``visual_encoder``, ``ln_vision``, ``Qformer``,
``query_tokens``), so its checkpoint loads into the full model through ``model.ckpt``, after the
weights it replaces. The teacher is not saved: it comes from ``model.ckpt`` again on resume.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from minigpt4.common.config import ConfigError, model_config
from minigpt4.common.registry import registry
from minigpt4.datasets.datasets.synthetic_shapes import KIND_COLOUR_CLASSES, KIND_PLACE_CLASSES, PAIRS, PLACES, SHAPES
from minigpt4.models.base_model import BaseModel
from minigpt4.models.mini_gpt4 import VisionQueries


@registry.register_model("vision_distiller")
class VisionDistiller(VisionQueries, BaseModel):
    """The student (trainable, MiniGPT-4's names) and a frozen teacher copy under ``teacher``.

    ``forward`` takes ``samples["image"]`` (what the student sees) and ``samples["teacher_image"]``
    (the training renderer's drawing of the same layout) and returns the MSE between their query
    outputs; with ``place_weight`` > 0, plus that weight times the place head's cross-entropy on
    ``samples["places"]`` (per slot: left, middle, right or empty); with ``token_weight`` > 0, plus
    that weight times the token head's cross-entropies on ``samples["slots"]`` and
    ``samples["places"]``; with ``kind_weight`` > 0, plus that weight times the kind head's
    cross-entropies on ``samples["kind_colours"]`` and ``samples["kind_places"]``.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"nano": "configs/models/minigpt4_nano.yaml"}

    def __init__(
        self,
        visual_encoder: nn.Module,
        ln_vision: nn.Module,
        Qformer: nn.Module,
        query_tokens: nn.Parameter,
        place_weight: float = 0.0,
        token_weight: float = 0.0,
        kind_weight: float = 0.0,
        num_slots: int = 3,
    ):
        super().__init__(visual_encoder, ln_vision, Qformer, query_tokens)
        self.place_weight, self.token_weight, self.kind_weight, self.num_slots = place_weight, token_weight, kind_weight, num_slots
        if place_weight > 0:
            self.place_head = nn.Linear(self.queries_width, num_slots * (len(PLACES) + 1))
        if token_weight > 0:
            if query_tokens.shape[1] < num_slots:
                raise ConfigError(
                    f"model.num_query_token: the token head reads slot i from query token i, so {num_slots} slots "
                    f"need >= {num_slots} tokens, got {query_tokens.shape[1]}"
                )
            self.token_head = nn.Linear(Qformer.config.hidden_size, len(PAIRS) + 1 + len(PLACES) + 1)
        if kind_weight > 0:
            if query_tokens.shape[1] < num_slots + len(SHAPES):
                raise ConfigError(
                    f"model.num_query_token: the kind head reads shape kind k from query token {num_slots} + k, so "
                    f"{num_slots} slots and {len(SHAPES)} kinds need >= {num_slots + len(SHAPES)} tokens, got {query_tokens.shape[1]}"
                )
            self.kind_head = nn.Linear(Qformer.config.hidden_size, KIND_COLOUR_CLASSES + KIND_PLACE_CLASSES)
        self.requires_grad_(True)
        self.train()  # dropout off from the start (see train)

    def freeze_teacher(self) -> None:
        """The teacher: a frozen copy of the student's current weights (call after loading them)."""
        teacher = VisionQueries(*(copy.deepcopy(part) for part in (self.visual_encoder, self.ln_vision, self.Qformer, self.query_tokens)))
        teacher.requires_grad_(False)
        # Not a registered child: it must not be saved, trained or moved by the optimizer's view.
        self.__dict__["teacher"] = teacher.eval()

    def train(self, mode: bool = True) -> "VisionDistiller":
        # Dropout stays off: the student learns to give the teacher's deterministic outputs.
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):  # .to() / .cuda() move the teacher too
        super()._apply(fn, recurse)
        if "teacher" in self.__dict__:
            self.__dict__["teacher"]._apply(fn, recurse)
        return self

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "VisionDistiller":
        cfg = model_config(cfg)
        if not cfg.ckpt:
            raise ConfigError("model.ckpt: the vision distiller needs the trained vision side to copy (e.g. weights/minigpt4_nano.pth)")
        for key, head in (("place_weight", "place head"), ("token_weight", "token head"), ("kind_weight", "kind head")):
            if cfg[key] < 0:
                raise ConfigError(f"model.{key}: a weight >= 0 (0: no {head}), got {cfg[key]}")
        model = cls(
            *cls.trainable_parts(cfg, "vision distiller"), place_weight=cfg.place_weight, token_weight=cfg.token_weight, kind_weight=cfg.kind_weight
        )
        model.load_checkpoints(cfg.ckpt)
        model.freeze_teacher()
        return model

    def forward(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if "teacher_image" not in samples:
            raise KeyError("samples['teacher_image']: the vision distiller's data is synthetic_shapes with build_info.restyle > 0")
        with torch.no_grad():
            target = self.teacher(samples["teacher_image"])
        queries = self.queries(samples["image"])
        loss = F.mse_loss(queries.float(), target.float())
        if self.place_weight > 0 or self.token_weight > 0:
            places = self._slot_targets(samples, "places")
        if self.place_weight > 0:
            logits = self.place_head(queries.flatten(1)).view(-1, len(PLACES) + 1)
            loss = loss + self.place_weight * F.cross_entropy(logits.float(), places.flatten())
        if self.token_weight > 0:
            slots = self._slot_targets(samples, "slots")
            pair_logits, place_logits = self.token_head(queries[:, : self.num_slots]).float().split([len(PAIRS) + 1, len(PLACES) + 1], dim=-1)
            token_loss = F.cross_entropy(pair_logits.flatten(0, 1), slots.flatten()) + F.cross_entropy(place_logits.flatten(0, 1), places.flatten())
            loss = loss + self.token_weight * token_loss
        if self.kind_weight > 0:
            kind_tokens = queries[:, self.num_slots : self.num_slots + len(SHAPES)]
            colour_logits, place_logits = self.kind_head(kind_tokens).float().split([KIND_COLOUR_CLASSES, KIND_PLACE_CLASSES], dim=-1)
            colours, kind_places = self._kind_targets(samples, "kind_colours"), self._kind_targets(samples, "kind_places")
            kind_loss = F.cross_entropy(colour_logits.flatten(0, 1), colours.flatten()) + F.cross_entropy(place_logits.flatten(0, 1), kind_places.flatten())
            loss = loss + self.kind_weight * kind_loss
        return {"loss": loss}

    def _slot_targets(self, samples: Mapping[str, Any], key: str) -> torch.Tensor:
        targets = samples[key]
        if targets.shape[1] != self.num_slots:
            raise ValueError(
                f"samples['{key}']: {targets.shape[1]} slots per scene, the heads have {self.num_slots} "
                "(synthetic_shapes build_info.max_shapes must be 3)"
            )
        return targets

    @staticmethod
    def _kind_targets(samples: Mapping[str, Any], key: str) -> torch.Tensor:
        if key not in samples:
            raise KeyError(f"samples['{key}']: the kind head's targets come from synthetic_shapes (scene_kinds)")
        return samples[key]
