"""The real architectures, built from their YAML on the meta device (no weights needed)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LlamaConfig

from minigpt4.common.config import Config
from minigpt4.models import MiniGPT4

LLMS = {
    "vicuna7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "vicuna13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}


@pytest.fixture(scope="module")
def llm_folders(sp_llama_dir, tmp_path_factory):
    folders = {}
    for name, shape in LLMS.items():
        out = tmp_path_factory.mktemp(name)
        LlamaConfig(vocab_size=32000, **shape).save_pretrained(out)
        shutil.copy(sp_llama_dir / "tokenizer.model", out)
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        folders[name] = out
    return folders


@pytest.mark.parametrize(
    "model_type,llm,trainable",
    [
        ("pretrain_vicuna0", "vicuna7b", 3_149_824),
        ("pretrain_vicuna0", "vicuna13b", 3_937_280),
        ("pretrain_llama2", "vicuna7b", 23_072_768),
    ],
)
def test_trainable_parameters_of_the_real_architectures(write_yaml, llm_folders, model_type, llm, trainable):
    cfg = Config(cfg_path=str(write_yaml({"model": {"arch": "mini_gpt4", "model_type": model_type, "llama_model": str(llm_folders[llm])}})))
    with torch.device("meta"):
        model = MiniGPT4.from_config(cfg.model_cfg, load_weights=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    vit = model.visual_encoder
    assert len(vit.blocks) == 39 and vit.num_features == 1408
    assert vit.blocks[0].mlp.fc1.out_features == 6144
    assert vit.pos_embed.shape == (1, 257, 1408)
    if model.has_qformer:
        assert model.query_tokens.shape == (1, 32, 768)
        assert model.Qformer.config.num_hidden_layers == 12
        cross = [i for i, layer in enumerate(model.Qformer.encoder.layer) if layer.has_cross_attention]
        assert cross == [0, 2, 4, 6, 8, 10]
        assert model.Qformer.encoder.layer[0].crossattention.attention.key.in_features == 1408
    else:
        assert model.Qformer is None
        assert model.llama_proj.in_features == 5632


def test_vit_precision_fp16_casts_linear_and_conv_only(llm_folders):
    with torch.device("meta"):
        model = MiniGPT4.from_config({"llama_model": str(llm_folders["vicuna7b"]), "vit_config": {"depth": 1}}, load_weights=False)
    vit = model.visual_encoder
    assert vit.patch_embed.proj.weight.dtype == torch.float16
    assert vit.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert vit.blocks[0].mlp.fc1.bias.dtype == torch.float16
    assert vit.blocks[0].norm1.weight.dtype == torch.float32
    assert vit.blocks[0].attn.q_bias.dtype == torch.float32
    assert vit.pos_embed.dtype == torch.float32
    assert model.ln_vision.weight.dtype == torch.float32
