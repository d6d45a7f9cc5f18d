"""The tiny model built from YAML reproduces the original release's numbers (tests/data)."""
from __future__ import annotations

import pytest
import torch

from conftest import REF, tiny_model_section
from minigpt4.common.config import Config
from minigpt4.common.registry import registry

VARIANTS = ("vicuna0", "llama2")
STAGE2 = {
    "vicuna0": {"prompt_template": "###Human: {} ###Assistant: ", "end_sym": "###"},
    "llama2": {"prompt_template": "[INST] {} [/INST] ", "end_sym": "</s>"},
}


def build(write_yaml, variant: str, **overrides):
    cfg = Config(cfg_path=str(write_yaml({"model": tiny_model_section(variant, **overrides)})))
    model = registry.get_model_class(cfg.model_cfg.arch).from_config(cfg.model_cfg)
    return model.eval()


@pytest.fixture(scope="module")
def stage1(write_yaml):
    return {v: build(write_yaml, v) for v in VARIANTS}


@pytest.fixture(scope="module")
def stage2(write_yaml):
    return {
        v: build(write_yaml, v, prompt_path=str(REF / "prompt_one.txt"), max_txt_len=160, **STAGE2[v])
        for v in VARIANTS
    }


def assert_llm_inputs(model, samples, ref_tensors, prefix):
    inputs_embeds, attention_mask, labels = model.prepare_inputs(samples)
    torch.testing.assert_close(inputs_embeds, ref_tensors[f"{prefix}_inputs_embeds"], atol=1e-5, rtol=0)
    assert torch.equal(attention_mask, ref_tensors[f"{prefix}_attention_mask"])
    assert torch.equal(labels, ref_tensors[f"{prefix}_labels"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_img(stage1, ref_tensors, variant):
    with torch.no_grad():
        embeds, atts = stage1[variant].encode_img(ref_tensors["images"])
    torch.testing.assert_close(embeds, ref_tensors[f"{variant}_encode_img"], atol=1e-5, rtol=0)
    assert torch.equal(atts, ref_tensors[f"{variant}_encode_atts"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage1_inputs_and_loss(stage1, ref_tensors, ref_json, variant):
    samples = {"image": ref_tensors["images"], "answer": ref_json["answers"]}
    with torch.no_grad():
        assert_llm_inputs(stage1[variant], samples, ref_tensors, f"{variant}_stage1")
        loss = stage1[variant](samples)["loss"]
    assert loss.item() == pytest.approx(ref_json[f"{variant}_stage1_loss"], abs=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage2_prompt_list_inputs_and_loss(stage2, ref_tensors, ref_json, variant):
    model = stage2[variant]
    assert model.prompt_list == ref_json[f"{variant}_prompt_list"]
    samples = {"image": ref_tensors["images"], "answer": ref_json["answers"]}
    with torch.no_grad():
        assert_llm_inputs(model, samples, ref_tensors, f"{variant}_stage2")
        loss = model(samples)["loss"]
    assert loss.item() == pytest.approx(ref_json[f"{variant}_stage2_loss"], abs=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_truncated_answers(stage2, ref_tensors, ref_json, variant):
    model = stage2[variant]
    samples = {"image": ref_tensors["images"], "answer": ref_json["trunc_answers"]}
    old = model.max_txt_len
    model.max_txt_len = 8
    try:
        with torch.no_grad():
            assert_llm_inputs(model, samples, ref_tensors, f"{variant}_trunc")
            loss = model(samples)["loss"]
    finally:
        model.max_txt_len = old
    assert loss.item() == pytest.approx(ref_json[f"{variant}_trunc_loss"], abs=1e-5)


def test_llama2_variant_keeps_a_fresh_ln_vision(stage1):
    ln = stage1["llama2"].ln_vision
    assert torch.equal(ln.weight, torch.ones_like(ln.weight))
    assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    # ...while the Q-Former variant reads it from the BLIP-2 file
    blip2 = torch.load(REF / "blip2_tiny.pth", weights_only=True)["model"]
    assert torch.equal(stage1["vicuna0"].ln_vision.weight, blip2["ln_vision.weight"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_keys_of_the_original_exist_here(stage1, ref_json, variant):
    """Every non-Q-Former parameter of the original has the same name and shape here."""
    own = {k: list(v.shape) for k, v in stage1[variant].state_dict().items()}
    for key, shape in ref_json[f"{variant}_state_keys"].items():
        if key.startswith("Qformer.") or key.endswith("inv_freq"):
            continue
        assert own.get(key) == shape, key
