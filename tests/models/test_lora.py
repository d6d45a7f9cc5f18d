from __future__ import annotations

import json

import pytest

from conftest import tiny_model_section
from minigpt4.models import MiniGPT4


def test_lora_adds_trainable_q_v_adapters_and_keeps_the_base_frozen():
    model = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
    assert set(trainable) - set(lora) == {"llama_proj.weight", "llama_proj.bias"}
    model.train()
    # The LLM follows .train(): the adapters' dropout acts (peft applies it in training mode only).
    dropouts = [m for n, m in model.llama_model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(m.training for m in dropouts) and model.llama_model.training
    assert not model.visual_encoder.training and not model.Qformer.training  # the frozen encoders stay in eval mode
    model.eval()
    assert not any(m.training for m in dropouts)
    plain = MiniGPT4.from_config(tiny_model_section()).train()
    assert not plain.llama_model.training  # without adapters the LLM is frozen whole, in eval mode


def test_lora_dropout_acts_in_training():
    import torch

    torch.manual_seed(0)
    model = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8, lora_dropout=0.5))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    embeds = torch.randn(1, 7, model.llama_model.config.hidden_size)
    model.train()
    with torch.no_grad():
        first, second = (model.llama_model(inputs_embeds=embeds).logits for _ in range(2))
    assert not torch.equal(first, second)  # a fresh dropout mask each forward
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.llama_model(inputs_embeds=embeds).logits, model.llama_model(inputs_embeds=embeds).logits)


def test_export_ships_the_adapters_and_merges_them_for_vllm(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from minigpt4.apps.export import export_llm, export_weights

    torch.manual_seed(0)
    model = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters an effect to find
            torch.nn.init.normal_(param, std=0.5)
    embeds = torch.randn(1, 7, model.llama_model.config.hidden_size)
    with torch.no_grad():
        expected = model.llama_model(inputs_embeds=embeds).logits

    shipped = torch.load(export_weights(model, tmp_path / "weights.pth"), weights_only=True)["model"]
    lora = {n for n, p in model.named_parameters() if "lora_" in n}
    assert lora and lora <= set(shipped)
    assert not [n for n in shipped if n.startswith("llama_model.") and ".lora_" not in n]  # the frozen LLM stays out

    folder = export_llm(model, tmp_path / "llm")
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs_embeds=embeds).logits, expected, rtol=1e-4, atol=1e-4)
        # the model keeps its adapters: the merge ran on a copy
        torch.testing.assert_close(model.llama_model(inputs_embeds=embeds).logits, expected)
    assert (folder / "tokenizer_config.json").is_file()
    # The marker the vllm engine checks: this model's adapters, and no others.
    from minigpt4.models.llm import LORA_MARKER, lora_fingerprint

    recorded = json.loads((folder / LORA_MARKER).read_text())["lora_fingerprint"]
    assert recorded == lora_fingerprint(model.llama_model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n).add_(1e-3)
    assert lora_fingerprint(model.llama_model) != recorded
    assert lora_fingerprint(MiniGPT4.from_config(tiny_model_section()).llama_model) is None
    # Untrained adapters (B zero, A random) change nothing: no fingerprint, any plain copy is right.
    assert lora_fingerprint(MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8)).llama_model) is None
    with pytest.raises(FileExistsError, match="not empty"):
        export_llm(model, folder)


@pytest.mark.parametrize("flags, message", [
    (["--llm-out", "{folder}"], "error: --llm-out: '{folder}' is not empty; give a new folder"),
    (["--out", "{file}/x.pth"], "error: --out: '{file}' is a file, so '{file}/x.pth' cannot be written"),
])
def test_export_checks_where_it_writes_before_the_model_loads(flags, message, tmp_path, monkeypatch, capsys, write_yaml):
    from minigpt4.apps import export
    from minigpt4.common.cli import run_main
    from minigpt4.common.registry import registry

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "a_file").write_text("")
    places = {"folder": tmp_path / "full", "file": tmp_path / "a_file"}
    monkeypatch.setattr(registry, "get_model_class", lambda name: pytest.fail("the model was built first"))
    cfg = write_yaml({"model": tiny_model_section()})
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: export.main(["--cfg-path", str(cfg), *[f.format(**places) for f in flags]]))
    assert exit_.value.code == 2 and capsys.readouterr().err.strip() == message.format(**places)


def test_a_half_precision_export_loads_into_the_full_precision_model(tmp_path):
    """--dtype float16 (how the nano weights ship): half the file, and a model built from it in
    fp32 holds exactly the fp16 values and answers as the original does, within fp16 rounding."""
    import torch

    from minigpt4.apps.export import export_weights, main

    torch.manual_seed(0)
    model = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8)).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    half = export_weights(model, tmp_path / "half.pth", torch.float16)
    full = export_weights(model, tmp_path / "full.pth")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    state = torch.load(half, weights_only=True)["model"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float16}

    loaded = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8, ckpt=str(half))).eval()
    own = loaded.state_dict()
    for name, tensor in state.items():
        assert own[name].dtype == torch.float32 and torch.equal(own[name], tensor.float()), name
    embeds = torch.randn(1, 7, model.llama_model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.llama_model(inputs_embeds=embeds).logits, model.llama_model(inputs_embeds=embeds).logits, rtol=1e-2, atol=1e-2)

    with pytest.raises(SystemExit) as exited:  # the LLM folder keeps the LLM's own precision
        main(["--cfg-path", "unused.yaml", "--llm-out", str(tmp_path / "llm"), "--dtype", "float16"])
    assert exited.value.code == 2
