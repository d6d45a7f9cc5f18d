from __future__ import annotations

from conftest import tiny_model_section
from minigpt4.models import MiniGPT4


def test_lora_adds_trainable_q_v_adapters_and_keeps_the_base_frozen():
    model = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert set(trainable) - set(lora) == {"llama_proj.weight", "llama_proj.bias"}
    model.train()
    assert not model.llama_model.training  # the base LLM stays in eval mode
