"""Write everything of a configured MiniGPT-4 but its frozen LLM into one ``{"model": ...}``
checkpoint; or, for a vLLM server, the LLM with the model's LoRA merged into it.

    python -m minigpt4.apps.export --cfg-path train_configs/minigpt4_nano_stage2_chat.yaml \
        --out minigpt4/weights/minigpt4_nano.pth --dtype float16
    python -m minigpt4.apps.export --cfg-path eval_configs/minigpt4_nano_eval.yaml --llm-out LLM_FOLDER

Used to ship the nano model: its stage-0 vision weights and its trained ``llama_proj`` and LoRA
come from different runs (``model.ckpt`` lists them); the export is the single file the eval
config loads. The frozen LLM's own weights are left out: they come from ``model.llama_model``.
``--dtype float16`` halves the file (the nano weights ship so, to stay under 10 MB); loading casts
it back to the model's own precision.
A vLLM server runs the LLM by itself, so a model with LoRA (``model.lora_r`` > 0) needs
``--llm-out``: a folder with the adapters merged into the weights, for ``vllm serve``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

from minigpt4.common.utils import write_atomic
from minigpt4.models.llm import LORA_MARKER, lora_fingerprint

logger = logging.getLogger(__name__)


def exported(name: str) -> bool:
    """Whether a state-dict key ships: everything but the frozen LLM's own weights (its LoRA ships)."""
    if name.endswith(".k_bias"):
        return False
    return not name.startswith("llama_model.") or ".lora_" in name


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_weights(model: torch.nn.Module, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Everything :func:`exported` of ``model``'s state as ``{"model": ...}`` in ``out``, its
    floating-point tensors in ``dtype``."""
    state = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).clone()
        for name, tensor in model.state_dict().items()
        if exported(name)
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save({"model": state}, tmp))
    logger.info("wrote %d tensors (%.1f MB) to %s", len(state), out.stat().st_size / 1e6, out)
    return out


def export_llm(model: torch.nn.Module, out: str | Path) -> Path:
    """``model``'s LLM with its LoRA merged, and its tokenizer, as an HF folder (``out``, new or empty).

    The model itself keeps its adapters: the merge runs on a copy.
    """
    import copy

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--llm-out: '{out}' is not empty; give a new folder")
    fingerprint = lora_fingerprint(model.llama_model)
    llm = copy.deepcopy(model.llama_model)
    if hasattr(llm, "merge_and_unload"):  # a peft model: fold each B @ A * scale into its weight
        llm = llm.merge_and_unload()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    llm.save_pretrained(tmp)
    model.llama_tokenizer.save_pretrained(tmp)
    if fingerprint is not None:  # what the vllm engine checks (VLLMEngine's lora_fingerprint)
        (tmp / LORA_MARKER).write_text(json.dumps({"lora_fingerprint": fingerprint}) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # a crash leaves the .partial folder, never a half-written LLM under the name
    logger.info("wrote the LLM%s to %s", " with its LoRA merged" if hasattr(model.llama_model, "merge_and_unload") else "", out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="the checkpoint file to write: everything but the frozen LLM")
    target.add_argument("--llm-out", help="a new folder: the LLM with the model's LoRA merged, for vLLM")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="with --out: the precision of the file's floating-point tensors")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.llm_out and args.dtype != "float32":
        parser.error("--dtype applies to --out; --llm-out saves the LLM in its own precision")
    logging.basicConfig(level=logging.INFO)
    # Where the result goes, checked before the model loads.
    from minigpt4.common.cli import ArgumentError, existing_file, writable_file

    existing_file("--cfg-path", args.cfg_path)
    if args.llm_out:
        llm_out = Path(args.llm_out)
        if llm_out.is_file() or (llm_out.is_dir() and any(llm_out.iterdir())):
            raise ArgumentError(f"--llm-out: '{llm_out}' is {'a file' if llm_out.is_file() else 'not empty'}; give a new folder")
        writable_file("--llm-out", llm_out / "config.json")
    else:
        writable_file("--out", args.out)

    from minigpt4.common.config import Config
    from minigpt4.common.registry import registry

    cfg = Config(cfg_path=args.cfg_path, options=args.options)
    model = registry.get_model_class(cfg.model_cfg.arch).from_config(cfg.model_cfg)
    if args.llm_out:
        return export_llm(model, args.llm_out)
    return export_weights(model, args.out, DTYPES[args.dtype])


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
