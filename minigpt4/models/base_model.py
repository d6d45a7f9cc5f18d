"""What every registered model shares: default config lookup, device, autocast, checkpoints."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import CheckpointError, LIBRARY_ROOT, load_state_dict_file, resolve_file, unwrap_state_dict

logger = logging.getLogger(__name__)


SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def checkpoint_entries(ckpt: str | Sequence[str] | None) -> list[tuple[str, str]]:
    """``model.ckpt`` as (config key, path) pairs: one file, a list of them, or none (empty or unset,
    as the original's ``if ckpt_path:``)."""
    paths = [ckpt] if isinstance(ckpt, str) else list(ckpt or [])
    paths = [str(p) for p in paths if p]
    return [("model.ckpt" if len(paths) == 1 else f"model.ckpt[{i}]", p) for i, p in enumerate(paths)]


class BaseModel(nn.Module):
    PRETRAINED_MODEL_CONFIG_DICT: dict[str, str] = {}

    @classmethod
    def default_config_path(cls, model_type: str) -> Path:
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            known = ", ".join(sorted(cls.PRETRAINED_MODEL_CONFIG_DICT))
            raise KeyError(f"unknown model_type '{model_type}' for {cls.__name__}; known: {known}")
        return LIBRARY_ROOT / cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def maybe_autocast(self, dtype: torch.dtype = torch.float16):
        """The context of the model's compute: as the original, mixed precision on an accelerator
        and plain fp32 on the CPU; on CUDA also SDPA without its cuDNN backend.

        cuDNN's attention builds an execution plan for every new sequence length, and both
        training (a new padded length every batch) and decoding (one more position every step)
        keep meeting new lengths: measured on an H100, that made SDPA slower than eager attention.
        Flash and memory-efficient attention serve every length with kernels built once.
        """
        if self.device.type == "cpu":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=dtype))
        if self.device.type == "cuda":
            stack.enter_context(sdpa_kernel(SDPA_BACKENDS))
        return stack

    def load_checkpoints(
        self,
        ckpt: str | Sequence[str],
        key_map: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """``model.ckpt``: one checkpoint, or a list loaded in order (a later file's tensors win)."""
        for key, path in checkpoint_entries(ckpt):
            self.load_checkpoint(path, key, key_map=key_map)

    def load_checkpoint(
        self,
        path_or_url: str,
        key: str = "model.ckpt",
        key_map: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Load a ``{"model": ...}`` checkpoint with strict=False semantics, reporting the keys.

        A file that matches none of this model's parameters, or matches them with the wrong
        shapes, is an error rather than a silent no-op.
        """
        path = resolve_file(path_or_url, key)
        state = unwrap_state_dict(load_state_dict_file(path, key))
        if key_map is not None:
            state = key_map(state)
        own = self.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        matched = [k for k in state if k in own]
        if not matched:
            sample = ", ".join(list(state)[:5]) or "no tensors"
            raise CheckpointError(f"{key}: '{path}' holds none of this model's parameters (it has: {sample})")
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in matched if state[k].shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"{key}: '{path}' has parameters of the wrong shape: {'; '.join(wrong[:5])}")
        # LoRA adapters of an LLM this model has without them: dropping them would run the model
        # without what it was trained with (a model with no LLM, e.g. the vision distiller, takes no LLM part).
        has_llm = any(k.startswith("llama_model.") for k in own)
        adapters = [k for k in unexpected if ".lora_" in k and k.startswith("llama_model.")] if has_llm else []
        if adapters:
            raise CheckpointError(
                f"{key}: '{path}' holds LoRA adapters this model lacks ({len(adapters)} tensors, e.g. {adapters[0]}); "
                "set model.lora_r, lora_alpha and lora_target_modules as the checkpoint was trained"
            )
        self.load_state_dict({k: state[k] for k in matched}, strict=False)
        # What checkpoints gave this model, for callers that need a part trained (a chat's llama_proj).
        self.checkpoint_keys = getattr(self, "checkpoint_keys", set()) | set(matched)
        missing_trainable = [n for n, p in self.named_parameters() if p.requires_grad and n not in state]
        logger.info("%s: loaded %d tensors from %s", key, len(matched), path)
        if unexpected:
            logger.warning("%s: %d unexpected keys ignored: %s", key, len(unexpected), ", ".join(unexpected[:10]))
        if missing_trainable:
            logger.warning("%s: trainable parameters not in the checkpoint: %s", key, ", ".join(missing_trainable[:10]))


def check_cpu_precision(model: nn.Module, llm: bool = True) -> None:
    """Without autocast (a chat on the CPU, as the original; training without run.amp) an fp16 or
    bf16 ViT, or (to train) LLM, meets fp32 inputs and fails deep in torch. Said here, by the key
    that sets it; callers skip it where the CPU autocasts."""
    vit = getattr(model, "visual_encoder", None)
    if vit is not None and (dtype := vit.patch_embed.proj.weight.dtype) != torch.float32:
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        raise ConfigError(f"model.vit_precision: {name} needs autocast, which the CPU runs without here; set vit_precision: fp32 to run on the CPU")
    language = getattr(model, "llama_model", None) if llm else None
    if language is not None and not getattr(model, "low_resource", False):
        dtype = next(language.parameters()).dtype
        if dtype in (torch.float16, torch.bfloat16):
            raise ConfigError(f"model.torch_dtype: {str(dtype).removeprefix('torch.')} needs autocast to train, which the CPU "
                              "runs without here (run.amp off); set model.torch_dtype: float32 to train on the CPU")
