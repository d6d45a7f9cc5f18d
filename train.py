"""Train MiniGPT-4 (stage 1 or 2) from a YAML config.

    python train.py --cfg-path train_configs/minigpt4_stage2_finetune.yaml
    torchrun --nproc-per-node 8 train.py --cfg-path train_configs/minigpt4_stage1_pretrain.yaml
    python train.py --cfg-path ... --options run.max_epoch=1 run.device=cpu --resume auto
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train MiniGPT-4 from a YAML config (model / datasets / run sections).")
    parser.add_argument("--cfg-path", required=True, help="path to the training config YAML")
    parser.add_argument(
        "--options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. run.init_lr=1e-5 datasets.cc_sbu_align.batch_size=6",
    )
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue a run: 'auto' takes the newest complete checkpoint under run.output_dir "
        "(of run.job_id when set), a path takes that checkpoint (same as run.resume_ckpt_path)",
    )
    parser.add_argument("--job-id", default=None, help="name of the output folder under run.output_dir (default: run.job_id or a timestamp)")
    return parser.parse_args(argv)


def setup_seeds(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_resume(args: argparse.Namespace, output_dir: Path, job_id: str | None) -> tuple[str | None, str | None]:
    """``(checkpoint to resume, job id)`` for ``--resume auto|PATH``."""
    from minigpt4.runners.runner_base import find_latest_checkpoint

    if args.resume is None:
        return None, job_id
    if args.resume != "auto":
        from minigpt4.common.cli import existing_file

        existing_file("--resume", args.resume)  # before the model and the data are built
        return args.resume, job_id or Path(args.resume).resolve().parent.name
    folders = [output_dir / job_id] if job_id else [p for p in output_dir.glob("*") if p.is_dir()]
    found = [(c.stat().st_mtime, c) for f in folders if (c := find_latest_checkpoint(f))]
    if not found:
        logger.info("--resume auto: no checkpoint under '%s'; starting from scratch", output_dir)
        return None, job_id
    ckpt = max(found)[1]
    return str(ckpt), ckpt.parent.name


def new_job_id(output_dir: Path) -> str:
    """The time to the second, with a count after it if a run started in that second already."""
    stamp = time.strftime("%Y%m%d%H%M%S")
    job_id, n = stamp, 1
    while (output_dir / job_id).exists():
        job_id, n = f"{stamp}_{n}", n + 1
    return job_id


def refuse_a_used_folder(folder: Path) -> None:
    """A new run must not write over an earlier run's checkpoints (nor mix its log with theirs)."""
    from minigpt4.common.config import ConfigError
    from minigpt4.runners.runner_base import find_latest_checkpoint

    previous = find_latest_checkpoint(folder)
    if previous is not None:
        raise ConfigError(
            f"run.job_id: '{folder}' holds an earlier run's checkpoints ({previous.name}); continue that run with "
            "--resume auto, or give this one another --job-id (or remove the folder)"
        )


def main(argv: list[str] | argparse.Namespace | None = None):
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    # heavy imports after argparse, so --help is instant and needs no GPU
    from minigpt4.common import dist_utils
    from minigpt4.common.config import Config
    from minigpt4.common.logger import setup_logger
    from minigpt4.common.registry import registry
    from minigpt4.runners.runner_base import TrainingStopped
    from minigpt4.tasks import setup_task

    cfg = Config(args)
    run_cfg = cfg.run_cfg
    dist = dist_utils.init_distributed_mode(run_cfg.device, run_cfg.dist_url, run_cfg.dist_backend)
    setup_logger(dist.rank)
    try:
        job_id = args.job_id or run_cfg.job_id
        resume, job_id = resolve_resume(args, Path(run_cfg.output_dir), job_id)
        if resume:
            run_cfg.resume_ckpt_path = resume
        if job_id is None:
            # every rank must agree on the folder: rank 0's clock decides
            job_id = dist_utils.all_gather_object(new_job_id(Path(run_cfg.output_dir)))[0]
        elif not resume:
            refuse_a_used_folder(Path(run_cfg.output_dir) / job_id)
        run_cfg.job_id = job_id
        run_cfg.world_size, run_cfg.rank, run_cfg.distributed = dist.world_size, dist.rank, dist.distributed

        setup_seeds(int(run_cfg.seed) + dist.rank)
        task = setup_task(cfg)
        datasets = task.build_datasets(cfg)
        model = task.build_model(cfg)
        runner = registry.get_runner_class(run_cfg.runner)(cfg=cfg, task=task, model=model, datasets=datasets, job_id=job_id, dist=dist)
        if dist.rank == 0:
            logger.info("config:\n%s", cfg.pretty_print())
        try:
            runner.train()
        except TrainingStopped as stop:
            logger.warning("%s", stop)
            raise SystemExit(128 + stop.signum) from None  # the shell's code for "ended by this signal"
        return runner
    finally:
        dist_utils.destroy_process_group()


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(lambda: main(parse_args()))
