"""The frozen LLM and its tokenizer: any local HF folder or hub id, in the configured precision.

The tokenizer reproduces the original's slow LLaMA tokenizer: ``legacy=True`` keeps the ``▁``
the original put after a special token, and the pad token is ``"$$"`` which is not in the LLaMA
vocabulary, so padding uses the unk id 0 exactly as the original did.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from minigpt4.common.config import ConfigError

logger = logging.getLogger(__name__)

KEY = "model.llama_model"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_source(path: str | None) -> str:
    if not path:
        raise ConfigError(f"{KEY}: not set; point it at a Vicuna/Llama-2 HF folder or hub id")
    local = Path(str(path)).expanduser()
    if local.is_dir():
        return str(local)
    if _HUB_ID.match(str(path)) and not str(path).startswith(("/", ".", "~")):
        return str(path)
    raise ConfigError(f"{KEY}: no such folder '{path}'; set it to your Vicuna/Llama-2 weights (an HF folder or hub id)")


def load_llm_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    source = _check_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, legacy=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}: cannot load a tokenizer from '{path}' ({err})") from err
    tokenizer.pad_token = "$$"
    tokenizer.padding_side = "right"
    return tokenizer


def load_llm(
    path: str | None,
    *,
    torch_dtype: str = "float16",
    low_resource: bool = False,
    device_8bit: int = 0,
    load_in_4bit: bool = False,
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | None = None,
    load_weights: bool = True,
) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    source = _check_source(path)
    if torch_dtype not in DTYPES:
        raise ConfigError(f"model.torch_dtype: '{torch_dtype}' is not one of {', '.join(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[torch_dtype]}
    quantized = low_resource or load_in_4bit
    if quantized:
        if not torch.cuda.is_available():
            raise ConfigError("model.low_resource/load_in_4bit: 8-bit and 4-bit LLMs need a CUDA GPU (bitsandbytes)")
        from transformers import BitsAndBytesConfig

        if load_in_4bit:
            qconfig = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=DTYPES[torch_dtype], bnb_4bit_quant_type="nf4"
            )
        else:
            qconfig = BitsAndBytesConfig(load_in_8bit=True)
        kwargs.update(quantization_config=qconfig, device_map={"": device_8bit})
    try:
        if load_weights:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=kwargs["dtype"])
    except (OSError, ValueError) as err:
        raise ConfigError(f"{KEY}: cannot load an LLM from '{path}' ({err})") from err

    if lora_r > 0:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=lora_target_modules or ["q_proj", "v_proj"],
            lora_dropout=lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model
