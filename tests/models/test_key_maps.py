"""Key maps on the real key lists of the released checkpoints (../shared/checkpoint_keys)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minigpt4.models.eva_vit import build_eva_vit, eva_vit_key_map
from minigpt4.models.qformer import build_qformer, qformer_key, qformer_key_map

KEYS = Path(__file__).resolve().parents[1] / "data" / "checkpoint_keys"


def fake_state(name: str) -> dict[str, torch.Tensor]:
    shapes = json.loads((KEYS / name).read_text())
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_every_eva_vit_g_key_maps_onto_timm_eva():
    state = fake_state("eva_vit_g.json")
    with torch.device("meta"):
        vit = build_eva_vit()
    own = vit.state_dict()
    mapped = eva_vit_key_map(state, vit)
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_eva_vit_map_drops_the_40th_block_and_heads():
    state = fake_state("eva_vit_g.json")
    state["blocks.39.norm1.weight"] = torch.empty(1408, device="meta")
    state["head.weight"] = torch.empty(1000, 1408, device="meta")
    with torch.device("meta"):
        vit = build_eva_vit()
    mapped = eva_vit_key_map(state, vit)
    assert "blocks.39.norm1.weight" not in mapped and "head.weight" not in mapped


def test_eva_pos_embed_is_resampled_for_another_image_size():
    vit224 = build_eva_vit({"embed_dim": 48, "depth": 1, "num_heads": 4}, img_size=224)
    vit364 = build_eva_vit({"embed_dim": 48, "depth": 1, "num_heads": 4}, img_size=364)
    mapped = eva_vit_key_map(vit224.state_dict(), vit364)
    assert mapped["pos_embed"].shape == vit364.pos_embed.shape == (1, 1 + 26 * 26, 48)
    torch.testing.assert_close(mapped["pos_embed"][:, 0], vit224.pos_embed[:, 0])  # CLS untouched
    assert vit364.load_state_dict(mapped, strict=False).missing_keys == []


def test_every_query_side_qformer_key_maps_and_text_side_is_dropped():
    state = fake_state("blip2_qformer.json")
    with torch.device("meta"):
        qformer = build_qformer(1408)
    own = qformer.state_dict()
    mapped = qformer_key_map(state)
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    dropped = [k for k in state if k.startswith("Qformer.") and qformer_key(k[len("Qformer."):]) is None]
    assert dropped and all(
        any(part in k for part in ("word_embeddings", "position_embeddings", "position_ids", ".intermediate.", ".output.", "Qformer.cls."))
        for k in dropped
    )


@pytest.mark.parametrize(
    "lavis,hf",
    [
        ("bert.embeddings.LayerNorm.weight", "layernorm.weight"),
        ("bert.encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.attention.query.weight"),
        ("bert.encoder.layer.0.attention.output.dense.bias", "encoder.layer.0.attention.output.dense.bias"),
        ("bert.encoder.layer.2.crossattention.self.key.weight", "encoder.layer.2.crossattention.attention.key.weight"),
        ("bert.encoder.layer.3.intermediate_query.dense.weight", "encoder.layer.3.intermediate_query.dense.weight"),
        ("bert.encoder.layer.3.output_query.LayerNorm.bias", "encoder.layer.3.output_query.LayerNorm.bias"),
        ("bert.encoder.layer.3.intermediate.dense.weight", None),
        ("bert.encoder.layer.3.output.dense.weight", None),
        ("bert.embeddings.word_embeddings.weight", None),
        ("cls.predictions.bias", None),
    ],
)
def test_qformer_key(lavis, hf):
    assert qformer_key(lavis) == hf


def test_released_file_without_text_side_keys_also_maps():
    state = {k: v for k, v in fake_state("blip2_qformer.json").items() if "word_embeddings" not in k and ".cls." not in k}
    with torch.device("meta"):
        qformer = build_qformer(1408)
    assert set(qformer_key_map(state)) == set(qformer.state_dict())
