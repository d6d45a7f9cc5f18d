"""The original's execution knobs (eager attention, full-vocabulary logits) give the numbers of our
fast paths (SDPA, labels-only logits, packed rows), and precomputed ``image_features`` give the
image path's (minigpt4/models/mini_gpt4.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import REF, tiny_model_section
from minigpt4.common.config import Config, ConfigError
from minigpt4.models import MiniGPT4
from minigpt4.models.mini_gpt4 import pack_rows

STAGE2 = {"prompt_path": str(REF / "prompt_one.txt"), "prompt_template": "###Human: {} ###Assistant: ", "end_sym": "###", "max_txt_len": 160}
REFERENCE_KNOBS = {"attn_implementation": "eager", "logits_on_all_positions": True}


@pytest.fixture(scope="module")
def models(write_yaml):
    # the reference through Config: the new keys are part of the model schema
    cfg = Config(cfg_path=str(write_yaml({"model": tiny_model_section(**STAGE2, **REFERENCE_KNOBS)})))
    return {
        "reference": MiniGPT4.from_config(cfg.model_cfg),
        "default": MiniGPT4.from_config(tiny_model_section(**STAGE2)),
        "packed": MiniGPT4.from_config(tiny_model_section(**STAGE2, pack_sequences=True)),
    }


@pytest.fixture(scope="module")
def samples(ref_tensors, ref_json):
    # instructions and answers of different lengths: padding after each answer, and short
    # samples that fit in one row beside each other when packed
    long_answer = " ".join([ref_json["answers"][0]] * 6)
    return {
        "image": torch.cat([ref_tensors["images"]] * 2),
        "answer": [long_answer, ref_json["answers"][1], "a", "two shapes"],
        "instruction_input": ["<Img><ImageHere></Img> Describe this image in detail.", "<Img><ImageHere></Img> What?"] * 2,
    }


def loss_and_proj_grad(model: MiniGPT4, samples) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(samples)["loss"]
    loss.backward()
    grad = model.llama_proj.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    return loss.item(), grad


def test_knobs_reach_every_part(models):
    ref, default = models["reference"], models["default"]
    assert not any(block.attn.fused_attn for block in ref.visual_encoder.blocks)
    assert all(block.attn.fused_attn for block in default.visual_encoder.blocks)
    assert ref.Qformer.config._attn_implementation == ref.llama_model.config._attn_implementation == "eager"
    assert default.Qformer.config._attn_implementation == default.llama_model.config._attn_implementation == "sdpa"
    assert ref.logits_on_all_positions and not default.logits_on_all_positions
    assert models["packed"].pack_sequences and not default.pack_sequences


@pytest.mark.parametrize("fast", ["default", "packed"])
def test_reference_knobs_give_the_same_loss_and_gradient(models, samples, fast):
    ref_loss, ref_grad = loss_and_proj_grad(models["reference"], samples)
    loss, grad = loss_and_proj_grad(models[fast], samples)
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=0)


def test_pack_rows_first_fit_decreasing():
    lengths, width = [5, 2, 3, 1], 5
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    labels = torch.arange(20).view(4, 5).masked_fill(mask == 0, -100)
    embeds = labels.clamp(min=0).float()[..., None].expand(-1, -1, 2)
    packed, positions, packed_labels = pack_rows(embeds, mask, labels)
    # rows: [sample 0], [sample 2, sample 1], [sample 3 + padding]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert packed_labels.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 5, 6], [15, -100, -100, -100, -100]]
    assert packed[1, :, 0].tolist() == [10, 11, 12, 5, 6]


def test_pack_rows_widens_rows_when_that_saves_positions():
    # rows as wide as the longest sample hold one sample each (5 x 6 positions); twice as wide: 2 x 12
    lengths = [6, 4, 4, 4, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    packed, positions, labels = pack_rows(torch.zeros(5, 6, 2), mask, torch.zeros(5, 6, dtype=torch.long))
    assert packed.shape == (2, 12, 2)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert (labels == -100).sum() == 2  # the tail of the first row


def test_the_samples_do_share_rows(models, samples):
    with torch.no_grad():
        inputs_embeds, attention_mask, labels = models["packed"].prepare_inputs(samples)
    assert len(pack_rows(inputs_embeds, attention_mask, labels)[0]) < len(inputs_embeds)


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_image_features_stand_in_for_the_image(tiny_models, samples, variant):
    model = tiny_models[variant]
    with torch.no_grad():
        features = model.vision_features(samples["image"])
        from_image = model(samples)["loss"]
        from_features = model({**{k: v for k, v in samples.items() if k != "image"}, "image_features": features})["loss"]
    assert features.shape[-1] == model.llama_proj.in_features
    assert from_features.item() == from_image.item()


def test_bf16_vit_casts_linear_and_conv_only():
    vit = MiniGPT4.from_config(tiny_model_section(vit_precision="bf16")).visual_encoder
    assert vit.blocks[0].attn.qkv.weight.dtype == vit.patch_embed.proj.weight.dtype == torch.bfloat16
    assert vit.blocks[0].norm1.weight.dtype == vit.blocks[0].attn.q_bias.dtype == vit.pos_embed.dtype == torch.float32


@pytest.mark.parametrize("key, value", [("attn_implementation", "flash"), ("vit_precision", "fp8")])
def test_unknown_choice_names_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"model\.{key}: '{value}' is not one of"):
        MiniGPT4.from_config(tiny_model_section(**{key: value}))
