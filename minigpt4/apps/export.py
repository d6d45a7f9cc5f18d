"""Write everything of a configured MiniGPT-4 but its LLM into one ``{"model": ...}`` checkpoint.

    python -m minigpt4.apps.export --cfg-path train_configs/minigpt4_nano_stage2.yaml \
        --out minigpt4/weights/minigpt4_nano.pth

Used to ship the nano model: its stage-0 vision weights and its trained ``llama_proj`` come from
different runs (``model.ckpt`` lists both); the export is the single file the eval config loads.
The frozen LLM is left out: it is loaded from ``model.llama_model``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from minigpt4.common.utils import write_atomic

logger = logging.getLogger(__name__)


def export_weights(model: torch.nn.Module, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    state = {
        name: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).clone()
        for name, tensor in model.state_dict().items()
        if not name.startswith("llama_model.") and not name.endswith(".k_bias")
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: torch.save({"model": state}, tmp))
    logger.info("wrote %d tensors (%.1f MB) to %s", len(state), out.stat().st_size / 1e6, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    from minigpt4.common.config import Config
    from minigpt4.common.registry import registry

    cfg = Config(cfg_path=args.cfg_path, options=args.options)
    model = registry.get_model_class(cfg.model_cfg.arch).from_config(cfg.model_cfg)
    return export_weights(model, args.out)


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
