"""The BLIP-2 Q-Former on ``transformers.Blip2QFormerModel`` and the LAVIS key map into it.

MiniGPT-4 only runs the query side of the Q-Former: learned ``query_tokens`` cross-attend to the
ViT features. The text-side weights LAVIS ships (word/position embeddings, the text FFN
``intermediate``/``output``, the ``cls`` head) are dropped on purpose.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel


# bert-base-uncased as LAVIS configures it for BLIP-2, written out so nothing is fetched.
BERT_BASE_QFORMER = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    cross_attention_frequency=2,
)

_TEXT_SIDE = re.compile(
    r"^(cls\.|embeddings\.(word_embeddings|position_embeddings|position_ids)|"
    r"encoder\.layer\.\d+\.(intermediate|output)\.)"
)
_RENAMES = (
    (re.compile(r"^embeddings\.LayerNorm\."), "layernorm."),
    (re.compile(r"\.attention\.self\."), ".attention.attention."),
    (re.compile(r"\.crossattention\.self\."), ".crossattention.attention."),
)


def build_qformer(
    encoder_width: int, qformer_config: Mapping[str, Any] | None = None, attn_implementation: str = "sdpa"
) -> Blip2QFormerModel:
    config = Blip2QFormerConfig(
        **{**BERT_BASE_QFORMER, **dict(qformer_config or {})},
        encoder_hidden_size=encoder_width,
        attn_implementation=attn_implementation,
    )
    return Blip2QFormerModel(config)


def qformer_key(lavis_key: str) -> str | None:
    """One LAVIS ``Qformer.*`` name (prefix already removed) -> the HF name, or None if text-side."""
    key = lavis_key[len("bert.") :] if lavis_key.startswith("bert.") else lavis_key
    if _TEXT_SIDE.match(key):
        return None
    for pattern, new in _RENAMES:
        key = pattern.sub(new, key)
    return key


def qformer_key_map(state_dict: Mapping[str, torch.Tensor], prefix: str = "Qformer.") -> dict[str, torch.Tensor]:
    """Every ``{prefix}*`` entry of a LAVIS checkpoint under its HF name; text-side keys dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            new = qformer_key(key[len(prefix) :])
            if new is not None:
                out[new] = value
    return out
