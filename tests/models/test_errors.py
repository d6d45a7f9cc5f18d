"""Bad inputs give one clear error naming the key, file or URL."""
from __future__ import annotations

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
    with pytest.raises(RuntimeError, match="vit_precision: fp16 runs only on a GPU"):
        model.encode_img(torch.zeros(1, 3, 224, 224))


def test_quantized_llm_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ConfigError, match="8-bit and 4-bit LLMs need a CUDA GPU"):
        MiniGPT4.from_config(tiny_model_section(low_resource=True))


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
