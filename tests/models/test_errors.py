"""Bad inputs give one clear error naming the key, file or URL."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import REF, tiny_model_section
from minigpt4.common.config import ConfigError
from minigpt4.common.registry import registry
from minigpt4.common.utils import CheckpointError, DownloadError
from minigpt4.models import MiniGPT4


def test_missing_llm_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.llama_model: no such folder '.*nope'"):
        MiniGPT4.from_config(tiny_model_section(llama_model=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match=r"model\.llama_model: no such folder 'please set this value"):
        MiniGPT4.from_config(tiny_model_section(llama_model="please set this value to the path of vicuna model"))
    with pytest.raises(ConfigError, match=r"model\.llama_model: not set"):
        MiniGPT4.from_config(tiny_model_section(llama_model=None))


def test_hub_id_offline_says_which_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model\.llama_model: 'lmsys/no-such-model' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        MiniGPT4.from_config(tiny_model_section(llama_model="lmsys/no-such-model"))


def test_truncated_checkpoint(tmp_path):
    good = (REF / "minigpt4_tiny.pth").read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.ckpt: cannot read '.*truncated\.pth' as a checkpoint"):
        MiniGPT4.from_config(tiny_model_section(ckpt=str(bad)))


def test_foreign_checkpoint_that_matches_nothing(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: .*holds none of this model's parameters \(it has: conv1\.weight\)"):
        MiniGPT4.from_config(tiny_model_section(ckpt=str(foreign)))


def test_checkpoint_of_the_other_variant_has_wrong_shapes():
    with pytest.raises(CheckpointError, match=r"wrong shape: llama_proj\.weight \(64, 192\) vs \(64, 32\)"):
        MiniGPT4.from_config(tiny_model_section("vicuna0", ckpt=str(REF / "minigpt4_tiny_llama2.pth")))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.vit_ckpt: no such file"):
        MiniGPT4.from_config(tiny_model_section(vit_ckpt=str(tmp_path / "eva.pth")))


@pytest.fixture
def tmp_cache(tmp_path):
    old = registry.get_path("cache_root")
    registry.register_path("cache_root", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    registry.register_path("cache_root", old)


def test_offline_url_names_the_url_and_the_local_alternative(tmp_path, tmp_cache):
    url = "http://127.0.0.1:9/eva_vit_g.pth"  # nothing listens on the discard port
    with pytest.raises(DownloadError) as err:
        MiniGPT4.from_config(tiny_model_section(vit_ckpt=url))
    message = str(err.value)
    assert "model.vit_ckpt" in message and url in message and str(tmp_path / "cache") in message
    assert not list((tmp_path / "cache").rglob("*.pth"))  # no partial file left behind


def test_cached_file_is_used_without_a_download(tmp_path, tmp_cache):
    cached = tmp_path / "cache" / "checkpoints" / "eva_vit_tiny.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes((REF / "eva_vit_tiny.pth").read_bytes())
    model = MiniGPT4.from_config(tiny_model_section(vit_ckpt="http://127.0.0.1:9/eva_vit_tiny.pth"))
    ref = torch.load(REF / "eva_vit_tiny.pth", weights_only=True)
    assert torch.equal(model.visual_encoder.pos_embed, ref["pos_embed"])


def test_fp16_vit_on_cpu_is_a_clear_error():
    model = MiniGPT4.from_config(tiny_model_section(vit_precision="fp16"))
    with pytest.raises(ConfigError, match="vit_precision: fp16 needs autocast, which the CPU runs without here"):
        model.encode_img(torch.zeros(1, 3, 224, 224))


def test_half_precision_on_the_cpu_is_named_before_it_fails_in_torch():
    from minigpt4.models.base_model import check_cpu_precision

    bf16 = MiniGPT4.from_config(tiny_model_section(vit_precision="bf16"))
    with pytest.raises(ConfigError, match=r"model\.vit_precision: bf16 needs autocast, which the CPU runs without here; set vit_precision: fp32"):
        bf16.encode_img(torch.zeros(1, 3, 224, 224))
    fp16_llm = MiniGPT4.from_config(tiny_model_section(torch_dtype="float16"))
    check_cpu_precision(fp16_llm, llm=False)  # a chat casts its inputs to the LLM's dtype: it runs
    with pytest.raises(ConfigError, match=r"model\.torch_dtype: float16 needs autocast to train, which the CPU runs without here .* set model\.torch_dtype: float32"):
        check_cpu_precision(fp16_llm)  # what the runner checks before training on the CPU


def test_quantized_llm_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ConfigError, match="8-bit and 4-bit LLMs need a CUDA GPU"):
        MiniGPT4.from_config(tiny_model_section(low_resource=True))


def test_cheap_mistakes_are_said_before_the_large_parts_load(monkeypatch, tmp_path):
    """A typo in model.ckpt, or an 8-bit LLM on a machine that cannot run one, is said before the
    vision weights download and the LLM loads (minutes at 7B), not after."""
    import importlib.util

    from minigpt4.models import mini_gpt4

    monkeypatch.setattr(mini_gpt4, "build_vision_parts", lambda *a, **k: pytest.fail("the vision side was built first"))
    with pytest.raises(CheckpointError, match=r"model\.ckpt: no such file '.*typo\.pth'"):
        MiniGPT4.from_config(tiny_model_section(ckpt=str(tmp_path / "typo.pth")))
    with pytest.raises(CheckpointError, match=r"model\.ckpt\[1\]: no such file"):
        MiniGPT4.from_config(tiny_model_section(ckpt=[str(REF / "minigpt4_tiny.pth"), str(tmp_path / "typo.pth")]))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"model\.low_resource: 8-bit and 4-bit LLMs need a CUDA GPU"):
            MiniGPT4.from_config(tiny_model_section(low_resource=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no bitsandbytes
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model\.load_in_4bit: 8-bit and 4-bit LLMs need bitsandbytes: pip install -e \"\.\[gpu\]\""):
        MiniGPT4.from_config(tiny_model_section(load_in_4bit=True))


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.prompt_path: no such file"):
        MiniGPT4.from_config(tiny_model_section(prompt_path=str(tmp_path / "p.txt")))
    empty = tmp_path / "p.txt"
    empty.write_text("no slot here\n")
    with pytest.raises(ConfigError, match=r"model\.prompt_path: .* has no line containing <ImageHere>"):
        MiniGPT4.from_config(tiny_model_section(prompt_path=str(empty)))


def test_gguf_conversion_on_a_full_disk_says_how_much_room_it_needs(tmp_path, tmp_cache, monkeypatch):
    import shutil

    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"\0" * (1 << 20))  # the room is checked before the file is parsed
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(OSError, match=r"converting Tiny\.Q4_1\.gguf to fp32 needs up to 0\.01 GiB but .* has 0\.00 GiB free; .*MINIGPT4_CACHE"):
        MiniGPT4.from_config(tiny_model_section(llama_model=str(gguf)))
    assert not any((tmp_cache / "llm").iterdir())  # nothing half-written left behind


def test_gguf_without_the_gguf_package_says_what_to_install(tmp_path, tmp_cache, monkeypatch):
    import importlib.util

    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"\0" * 1024)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"model\.llama_model: reading 'Tiny\.Q4_1\.gguf' needs the gguf package; run: pip install 'gguf>=0.10'"):
        MiniGPT4.from_config(tiny_model_section(llama_model=str(gguf)))


def test_a_wrong_llm_folder_is_reported_before_any_download(tmp_path, tmp_cache):
    section = tiny_model_section(vit_ckpt="http://127.0.0.1:9/eva_vit_g.pth", llama_model=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"model\.llama_model: no such folder"):
        MiniGPT4.from_config(section)


def test_an_unreadable_vit_file_names_its_key(tmp_path):
    broken = tmp_path / "eva_vit_g.pth"
    broken.write_bytes((REF / "eva_vit_tiny.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.vit_ckpt: cannot read '.*eva_vit_g\.pth' as a checkpoint"):
        MiniGPT4.from_config(tiny_model_section(vit_ckpt=str(broken)))


@pytest.mark.parametrize("section, message", [
    (dict(vit_config={"embed_dim": 64}, q_former_model=None),
     r"model\.vit_ckpt: '.*eva_vit_tiny\.pth' does not fit this model: 30 parameters of another shape, e\.g\. cls_token \[1, 1, 48\] in the file, \[1, 1, 64\] here"),
    (dict(vit_config={"patch_size": 16}),
     r"model\.vit_ckpt: '.*' does not fit this model: 1 parameter of another shape, e\.g\. patch_embed\.proj\.weight \[48, 3, 14, 14\] in the file, \[48, 3, 16, 16\] here"),
    (dict(vit_config={"embed_dim": 64}, vit_ckpt=None),
     r"model\.q_former_model: '.*blip2_tiny\.pth' does not fit this model: 2 parameters of another shape"),
    (dict(num_query_token=32), r"model\.q_former_model: '.*' holds \[1, 4, 32\] query tokens, this model \[1, 32, 32\] \(model\.num_query_token\)"),
])
def test_released_vision_weights_of_another_shape_name_the_key_and_both_shapes(section, message):
    from minigpt4.common.tiny import TINY_VIT

    if "vit_config" in section:
        section = {**section, "vit_config": {**TINY_VIT, **section["vit_config"]}}
    with pytest.raises(ConfigError, match=message):
        MiniGPT4.from_config(tiny_model_section(**section))


def test_a_chat_needs_a_trained_projection(write_yaml, tmp_path):
    """llama_proj is what MiniGPT-4 trains: a chat with a random one would answer nonsense, silently."""
    from minigpt4.chat import load_chat

    with pytest.raises(ConfigError, match=r"model\.ckpt: model\.ckpt is not set, so nothing gives the projection llama_proj"):
        load_chat(write_yaml({"model": tiny_model_section(ckpt=None)}, "no_ckpt.yaml"))
    vision_only = tmp_path / "vision_only.pth"  # a checkpoint of the vision side alone (a distilled student's)
    state = torch.load(REF / "minigpt4_tiny.pth", weights_only=True)["model"]
    model = MiniGPT4.from_config(tiny_model_section(ckpt=None))
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k.startswith("Qformer.")}}, vision_only)
    assert "llama_proj.weight" in state
    with pytest.raises(ConfigError, match=r"model\.ckpt: none of '.*vision_only\.pth' gives the projection llama_proj"):
        load_chat(write_yaml({"model": tiny_model_section(ckpt=str(vision_only))}, "vision_only.yaml"))


def test_a_checkpoint_with_lora_adapters_needs_them_in_the_model(tmp_path):
    trained = MiniGPT4.from_config(tiny_model_section(lora_r=4, lora_alpha=8))
    path = tmp_path / "with_lora.pth"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if "lora_" in k or k.startswith("llama_proj")}}, path)
    with pytest.raises(CheckpointError, match=r"model\.ckpt: '.*with_lora\.pth' holds LoRA adapters this model lacks .*set model\.lora_r"):
        MiniGPT4.from_config(tiny_model_section(ckpt=str(path)))
    loaded = MiniGPT4.from_config(tiny_model_section(ckpt=str(path), lora_r=4, lora_alpha=8))
    assert any("lora_" in k for k in loaded.checkpoint_keys)


@pytest.mark.parametrize("template, found", [("[INST] [/INST] ", "no field"), ("[INST] {} {} [/INST] ", "{}, {}"), ("{prompt}", "{prompt}")])
def test_a_prompt_template_without_one_place_for_the_prompt_is_refused(template, found):
    # str.format ignores what it has no field for: "[INST] [/INST] ".format(prompt) drops the prompt and its image.
    with pytest.raises(ConfigError, match=rf"model\.prompt_template: .* must hold one {{}} where the prompt goes, not {re.escape(found)}"):
        MiniGPT4.from_config(tiny_model_section(prompt_template=template, prompt_path=str(REF / "prompt_one.txt")))
    MiniGPT4.from_config(tiny_model_section(prompt_template="[INST] {} [/INST] {{literal}} ", prompt_path=str(REF / "prompt_one.txt")))


def test_a_chat_config_that_cannot_run_here_is_said_before_the_model_loads(write_yaml, monkeypatch):
    from minigpt4.chat import load_chat
    from minigpt4.models import mini_gpt4

    monkeypatch.setattr(mini_gpt4, "build_vision_parts", lambda *a, **k: pytest.fail("the model was built first"))
    processor = {"vis_processor": {"eval": {"name": "blip2_image_eval", "image_size": 112}}}
    with pytest.raises(ConfigError, match=r"the image processor's image_size 112 is not model\.image_size 224"):
        load_chat(write_yaml({"model": tiny_model_section(), "preprocess": processor}, "sizes.yaml"))
    if not torch.cuda.is_available():
        processor["vis_processor"]["eval"]["image_size"] = 224
        with pytest.raises(ConfigError, match=r"model\.vit_precision: fp16 needs autocast, which a chat on the CPU runs without; .*--options model\.vit_precision=fp32"):
            load_chat(write_yaml({"model": tiny_model_section(vit_precision="fp16"), "preprocess": processor}, "fp16.yaml"))


def test_an_empty_ckpt_loads_nothing_as_the_original():
    # The original's `if ckpt_path:`: an empty value (`--options model.ckpt=`) means no checkpoint.
    model = MiniGPT4.from_config(tiny_model_section(ckpt=""))
    assert not getattr(model, "checkpoint_keys", set())
