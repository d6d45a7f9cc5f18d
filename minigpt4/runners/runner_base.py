"""The training loop of both MiniGPT-4 stages, as the original runner with exact resume added.

An epoch is ``run.iters_per_epoch`` iterations over endless data (the LAION/CC/SBU streams have no
natural end). Each iteration: draw a batch (datasets mixed by ``sample_ratio``), set the lr for
``(epoch, iteration)``, forward under autocast, backward through the GradScaler, and every
``accum_grad_iters`` iterations clip (optional) and step AdamW.

Checkpoints hold only the trainable parameters, the optimizer, the scaler, the config, the
position, and, to make a resumed run equal an uninterrupted one, every rank's RNG states and data
position. They are written atomically (temp file + rename), after every epoch
(``checkpoint_<epoch>.pth``) and every ``run.save_every_iters`` iterations
(``checkpoint_<epoch>_iter<n>.pth``, only the newest is kept).

SIGTERM (what Slurm and Kubernetes send on preemption, and torchrun passes on) stops a run
cleanly (``dist_utils.STOP_SIGNALS``): every rank finishes its optimizer step,
a checkpoint is written and :class:`TrainingStopped` is raised, so nothing since the last
checkpoint is lost and ``--resume auto`` continues exactly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minigpt4.common import dist_utils
from minigpt4.common.config import Config, ConfigError
from minigpt4.common.feature_cache import FeatureCache
from minigpt4.common.logger import MetricLogger
from minigpt4.common.optims import build_optimizer
from minigpt4.common.registry import RegistryError, registry
from minigpt4.common.utils import CheckpointError, load_state_dict_file, write_atomic
from minigpt4.datasets.data_utils import BatchStream, MultiIterLoader, ResumableLoader, move_to_device
from minigpt4.models.base_model import check_cpu_precision

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "minigpt4-training-checkpoint"
_CKPT_NAME = re.compile(r"^checkpoint_(\d+)(?:_iter(\d+))?\.pth$")
AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cpu_bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times as long a (size x size) matmul takes in bf16 as in fp32 on this CPU (best of
    ``repeats`` each). CPUs with AMX or AVX512-BF16 do bf16 faster than fp32; without them oneDNN
    emulates it, and bf16 autocast made a training step about 3x slower than fp32 (nano stage 2 on
    2 AVX2 cores: 20 s against 6.8 s an iteration)."""
    a = torch.randn(size, size)

    def best(x: torch.Tensor) -> float:
        x @ x  # first call: kernel selection
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16()) / max(best(a), 1e-9)


class TrainingStopped(Exception):
    """A stop signal ended the run after its checkpoint was written."""

    def __init__(self, signum: int, epoch: int, iters_done: int, output_dir: Path):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after iteration {iters_done} of epoch {epoch}; the checkpoint is in "
            f"{output_dir}: run the same command with --resume auto to continue"
        )


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """``(epoch, iterations done in it)`` from a checkpoint's name; an epoch-end file sorts last."""
    match = _CKPT_NAME.match(path.name)
    if not match:
        return None
    epoch, iters = int(match.group(1)), match.group(2)
    return (epoch, int(iters)) if iters is not None else (epoch, 1 << 62)


# Settings that name this process or this run's start, not what is trained.
_RUN_IDENTITY = {"run.resume_ckpt_path", "run.job_id", "run.rank", "run.gpu", "run.distributed", "run.world_size", "run.dist_url", "run.dist_backend"}


def changed_settings(before: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting of ``now`` that differs from ``before`` (nested keys as paths)."""
    changes = []
    for key in sorted(set(before) | set(now)):
        path = f"{prefix}{key}"
        old, new = before.get(key), now.get(key)
        if path in _RUN_IDENTITY or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, f"{path}.")
        else:
            changes.append(f"{path}: {old!r} -> {new!r}")
    return changes


def find_latest_checkpoint(folder: Path) -> Path | None:
    """The most advanced complete checkpoint in ``folder`` (temp files of a killed save are ignored)."""
    found = [(pos, p) for p in Path(folder).glob("checkpoint_*.pth") if (pos := checkpoint_position(p))]
    return max(found)[1] if found else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's array as a list: the checkpoint must load with weights_only=True
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@registry.register_runner("runner_base")
class RunnerBase:
    def __init__(self, cfg: Config, task, model: nn.Module, datasets: Mapping[str, Mapping[str, Any]], job_id: str, dist: dist_utils.DistInfo | None = None):
        self.config = cfg
        self.run_cfg = cfg.run_cfg
        self.task = task
        self.datasets = datasets
        self.job_id = job_id
        self.dist = dist or dist_utils.DistInfo(dist_utils.get_rank(), dist_utils.get_world_size(), 0, torch.device(self.run_cfg.device))
        self.device = self.dist.device
        # relative to the working directory (LAVIS put it under the installed package)
        self.output_dir = Path(self.run_cfg.output_dir) / job_id

        run = self.run_cfg
        self.max_epoch = int(run.max_epoch)
        # run.* values were checked when the config loaded (minigpt4.common.config.run_config)
        self.accum_grad_iters = int(run.accum_grad_iters)
        self.save_every_iters = int(run.save_every_iters or 0)
        self.amp_dtype = AMP_DTYPES[run.amp_dtype]
        self.use_amp = bool(run.amp)
        if self.use_amp and self.device.type == "cpu" and self.amp_dtype == torch.float16:
            logger.warning("run.amp: fp16 autocast needs a GPU; training in fp32 on the CPU (amp_dtype: bfloat16 works on CPUs)")
            self.use_amp = False
        if self.use_amp and self.device.type == "cpu":
            # decided once for every rank, so that all of them compute alike
            slowdown = cpu_bf16_slowdown()
            if dist_utils.all_reduce_max(int(slowdown > 1.0), self.device):
                logger.warning(
                    "run.amp: this CPU has no bf16 matrix units (a bf16 matmul takes %.1fx as long as fp32 here); "
                    "training in fp32, which is faster on it (set run.amp: False to say so in the config)",
                    slowdown,
                )
                self.use_amp = False
        # bf16 has fp32's exponent range: no loss scaling needed
        self.use_scaler = self.use_amp and self.amp_dtype == torch.float16

        self.feature_cache_dir = Path(run.feature_cache) if run.feature_cache else None
        self.feature_cache: FeatureCache | None = None
        self.train_loader = self._build_train_loader()
        self.iters_per_epoch = self._iters_per_epoch()
        # placed (and DDP-wrapped) before the optimizer sees the parameters: fused AdamW needs them on the GPU
        self._model = model
        self.model = self._place(model)
        self.optimizer = build_optimizer(self.unwrap_model(), run.init_lr, run.weight_decay, run.beta2)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_scaler)
        self.lr_scheduler = self._build_lr_scheduler()
        self.start_epoch, self.start_iter = 0, 0
        self._rng_to_restore: Mapping[str, Any] | None = None
        self.history: list[dict[str, float]] = []  # per-iteration loss/lr of this process
        self._trackers: dict[str, Any] = {}
        self._stop_signal = 0  # set by a stop signal while training

    # ---- parts ----------------------------------------------------------------------------------
    def unwrap_model(self) -> nn.Module:
        return self._model

    def _place(self, model: nn.Module) -> nn.Module:
        """The model on its device, compiled and given its feature cache as configured, and
        wrapped in DDP under torchrun (``unwrap_model`` keeps the bare one)."""
        if self.device.type == "cpu" and not self.use_amp:  # under run.amp the CPU autocasts too
            check_cpu_precision(model)
        if not getattr(model, "low_resource", False):  # an 8-bit LLM is already placed
            model.to(self.device)
        if self.run_cfg.compile:
            self._require(model, "compile_blocks", "run.compile")
            model.compile_blocks()
        if self.feature_cache_dir is not None:
            self.feature_cache = self._build_feature_cache(model)
        if not self.dist.distributed:
            return model
        # frozen weights are loaded from the same files on every rank: skip DDP's broadcast of
        # them (tens of GB for the LLM) and sync only what is trained
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _build_train_loader(self) -> MultiIterLoader:
        loaders, ratios = [], []
        num_workers = int(self.run_cfg.num_workers)
        for name, splits in self.datasets.items():
            dataset_cfg = self.config.datasets_cfg[name]
            batch_size = dataset_cfg.get("batch_size")
            if not batch_size:
                raise ConfigError(f"datasets.{name}.batch_size: missing (the per-GPU batch size)")
            if "train" not in splits:
                raise ConfigError(f"datasets.{name}: its builder made no 'train' split")
            if self.feature_cache_dir is not None and getattr(getattr(splits["train"], "vis_processor", None), "random_augmentation", False):
                name_of = type(splits["train"].vis_processor).__name__
                raise ConfigError(
                    f"run.feature_cache: datasets.{name}.vis_processor.train ({name_of}) augments at random, so no two "
                    "epochs see the same pixels and caching would keep one crop per image; use blip2_image_eval or drop run.feature_cache"
                )
            stream = BatchStream(splits["train"], int(batch_size), int(self.run_cfg.seed), self.dist.rank, self.dist.world_size, num_workers,
                                 image_keys=self.feature_cache_dir is not None)
            loaders.append(ResumableLoader(stream, num_workers, pin_memory=self.device.type == "cuda"))
            ratios.append(float(dataset_cfg.get("sample_ratio", 1)))
        return MultiIterLoader(loaders, ratios, seed=int(self.run_cfg.seed), rank=self.dist.rank, names=list(self.datasets))

    @staticmethod
    def _require(model: nn.Module, method: str, key: str) -> None:
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"{key}: {type(model).__name__} has no {method}()")

    def _build_feature_cache(self, model: nn.Module) -> FeatureCache:
        self._require(model, "vision_fingerprint", "run.feature_cache")
        if not model.frozen_vision():
            raise ConfigError("run.feature_cache: the ViT or Q-Former trains (model.freeze_vit / freeze_qformer: False), so its features change every step")
        fingerprint = model.vision_fingerprint(amp=self.use_amp, amp_dtype=self.amp_dtype)
        cache = FeatureCache(self.feature_cache_dir, fingerprint)
        logger.info("run.feature_cache: %s (vision fingerprint %s)", cache.root, fingerprint[:12])
        return cache

    def _with_cached_features(self, samples: dict[str, Any]) -> dict[str, Any]:
        """The batch with its frozen vision features (read from the cache, computed and stored
        where missing) as ``image_features``: the model reads them like precomputed features and
        never knows a cache exists."""
        with torch.no_grad():
            features = self.feature_cache.features(samples["image_key"], samples["image"], self.unwrap_model().vision_features)
        return {**samples, "image_features": features}

    def _iters_per_epoch(self) -> int:
        if self.run_cfg.iters_per_epoch:
            return int(self.run_cfg.iters_per_epoch)
        streams = [loader.stream for loader in self.train_loader.loaders]
        if len(streams) == 1 and not streams[0].is_stream:
            return max(1, len(streams[0].dataset) // (streams[0].batch_size * self.dist.world_size))
        raise ConfigError("run.iters_per_epoch: required when training on webdataset shards or on several datasets")

    def _build_lr_scheduler(self):
        run = self.run_cfg
        try:
            cls = registry.get_lr_scheduler_class(run.lr_sched)
        except RegistryError as err:
            raise ConfigError(f"run.lr_sched: {err}") from None
        return cls(
            optimizer=self.optimizer,
            max_epoch=self.max_epoch,
            iters_per_epoch=self.iters_per_epoch,
            min_lr=float(run.min_lr),
            init_lr=float(run.init_lr),
            decay_rate=run.lr_decay_rate if run.lr_decay_rate is not None else 1,
            warmup_start_lr=float(run.warmup_lr),
            warmup_steps=int(run.warmup_steps),
        )

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        resume = self.run_cfg.resume_ckpt_path
        if resume:
            self.resume_from(Path(resume))
            if self.start_epoch >= self.max_epoch:
                logger.warning("'%s' is the end of the run (epoch %d of %d): there is nothing left to train; "
                               "raise run.max_epoch to train on from it", resume, self.start_epoch, self.max_epoch)
        if dist_utils.is_main_process():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._setup_trackers()
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
        logger.info("training %d epochs x %d iterations from epoch %d iteration %d; output in %s",
                    self.max_epoch, self.iters_per_epoch, self.start_epoch, self.start_iter, self.output_dir)
        start = time.time()
        epoch_stats = []
        try:
            with self._stop_signals():
                for epoch in range(self.start_epoch, self.max_epoch):
                    stats = self.train_epoch(epoch, self.start_iter if epoch == self.start_epoch else 0)
                    self.save_checkpoint(epoch, self.iters_per_epoch)
                    self.log_stats({"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}})
                    epoch_stats.append(stats)
                    dist_utils.barrier()
                    if epoch + 1 < self.max_epoch and (signum := self._stop_requested()):
                        raise TrainingStopped(signum, epoch, self.iters_per_epoch, self.output_dir)
        finally:
            self.train_loader.close()
            self._close_trackers()
        logger.info("training time %.1f s", time.time() - start)
        return epoch_stats

    def train_epoch(self, epoch: int, start_iter: int = 0) -> dict[str, float]:
        model = self.model
        model.train()
        metrics = MetricLogger()
        main = dist_utils.is_main_process()
        bar = tqdm(range(start_iter, self.iters_per_epoch), initial=start_iter, total=self.iters_per_epoch,
                   desc=f"epoch {epoch}", disable=not main, dynamic_ncols=True)
        for i in bar:
            samples = move_to_device(next(self.train_loader), self.device)
            lr = self.lr_scheduler.step(epoch, i)
            last_micro_step = (i + 1) % self.accum_grad_iters == 0
            sync = contextlib.nullcontext() if last_micro_step or not self.dist.distributed else model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    if self.feature_cache is not None:
                        samples = self._with_cached_features(samples)
                    loss = self.task.train_step(model, samples)
                self.scaler.scale(loss / self.accum_grad_iters).backward()
            if last_micro_step:
                if self.run_cfg.max_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    params = [p for g in self.optimizer.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, float(self.run_cfg.max_grad_norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)

            loss_value = loss.item()
            metrics.update(loss=loss_value, lr=lr)
            self.history.append({"epoch": epoch, "iter": i, "loss": loss_value, "lr": lr})
            done = i + 1
            global_step = epoch * self.iters_per_epoch + done
            if main:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if global_step % max(int(self.run_cfg.log_freq), 1) == 0:
                    self.log_stats({"epoch": epoch, "iter": i, "global_step": global_step, "loss": loss_value, "lr": lr})
            # Inside the epoch (its end has its own checkpoint); a stop only after an optimizer step.
            mid_epoch = done < self.iters_per_epoch
            stop = self._stop_requested() if last_micro_step and mid_epoch else 0
            if stop or (mid_epoch and self.save_every_iters and global_step % self.save_every_iters == 0):
                self.save_checkpoint(epoch, done)
            if stop:
                bar.close()
                raise TrainingStopped(stop, epoch, done, self.output_dir)
        bar.close()
        stats = metrics.global_avg()
        stats["loss"] = dist_utils.all_reduce_mean(stats.get("loss", float("nan")), self.device)
        stats["broken_samples"] = self.train_loader.broken
        cache = self.feature_cache
        if cache is not None:
            logger.info("run.feature_cache: %d images read from the cache, %d computed so far", cache.hits, cache.misses)
            stats["feature_cache_hits"], stats["feature_cache_misses"] = cache.hits, cache.misses
        return stats

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training, ``dist_utils.STOP_SIGNALS`` only mark the run to stop at the next optimizer step."""
        self._stop_signal = 0

        def request(signum: int, frame: Any) -> None:
            if not self._stop_signal:
                logger.warning("%s: stopping after this step, with a checkpoint", signal.Signals(signum).name)
            self._stop_signal = signum

        previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals only there
            previous = {signum: signal.signal(signum, request) for signum in dist_utils.STOP_SIGNALS}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self) -> int:
        """The stop signal any rank has received (0: none); every rank sees the same answer."""
        return dist_utils.all_reduce_max(self._stop_signal, self.device)

    # ---- logging --------------------------------------------------------------------------------
    def _setup_trackers(self) -> None:
        if self.run_cfg.tensorboard_log:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._trackers["tensorboard"] = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                logger.warning("run.tensorboard_log: tensorboard is not installed (pip install tensorboard); not logging to it")
        if self.run_cfg.wandb_log:
            try:
                import wandb

                self._trackers["wandb"] = wandb.init(
                    project="minigpt4", name=self.run_cfg.job_name or self.job_id, id=self.job_id, resume="allow", config=self.config.to_dict()
                )
            except ImportError:
                logger.warning("run.wandb_log: wandb is not installed (pip install wandb); not logging to it")

    def _close_trackers(self) -> None:
        if "tensorboard" in self._trackers:
            self._trackers["tensorboard"].close()
        if "wandb" in self._trackers:
            self._trackers["wandb"].finish()
        self._trackers.clear()

    @dist_utils.main_process
    def log_stats(self, stats: Mapping[str, Any]) -> None:
        """One JSON line in ``<output_dir>/<job_id>/log.txt`` (and TensorBoard/W&B when enabled)."""
        with open(self.output_dir / "log.txt", "a") as f:
            f.write(json.dumps(dict(stats)) + "\n")
        step = stats.get("global_step", (stats["epoch"] + 1) * self.iters_per_epoch)
        scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and k not in ("epoch", "iter", "global_step")}
        if "tensorboard" in self._trackers:
            for k, v in scalars.items():
                self._trackers["tensorboard"].add_scalar(f"train/{k}", v, step)
        if "wandb" in self._trackers:
            self._trackers["wandb"].log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, iters_done: int) -> Path | None:
        """Write the checkpoint for "``iters_done`` iterations of ``epoch`` are finished".

        Every rank must call it (it gathers each rank's data position and RNG states); rank 0 writes.
        """
        data_state = dist_utils.all_gather_object(self.train_loader.state_dict())
        rng_state = dist_utils.all_gather_object(_rng_state())
        model = self.unwrap_model()
        # Gradients accumulated since the last optimizer step: an epoch whose length is not a
        # multiple of run.accum_grad_iters carries them into the next (as the original does), and
        # a checkpoint may fall there. Each rank's own (DDP sums them at the step), on the CPU.
        pending = dist_utils.all_gather_object(
            {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        )
        if not dist_utils.is_main_process():
            return None
        end_of_epoch = iters_done >= self.iters_per_epoch
        path = self.output_dir / (f"checkpoint_{epoch}.pth" if end_of_epoch else f"checkpoint_{epoch}_iter{iters_done}.pth")
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "epoch": epoch,
            "iters": iters_done,
            "iters_per_epoch": self.iters_per_epoch,
            "world_size": self.dist.world_size,
            "data_state": data_state,
            "rng_state": rng_state,
            "pending_grads": pending,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: torch.save(state, tmp))  # --resume auto after a kill sees the old or the new file, never half
        logger.info("saved %s", path)
        for old in self.output_dir.glob("checkpoint_*_iter*.pth"):
            if old != path:
                old.unlink(missing_ok=True)
        return path

    def resume_from(self, path: Path, key: str = "run.resume_ckpt_path") -> None:
        """Restore model, optimizer, scaler, position, and (our own checkpoints) RNG and data state."""
        ckpt = load_state_dict_file(path, key)
        needed = {"model", "optimizer", "epoch"}
        if not isinstance(ckpt, dict) or not needed <= set(ckpt):
            found = ", ".join(sorted(map(str, ckpt))[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(
                f"{key}: '{path}' is not a training checkpoint (needs {', '.join(sorted(needed))}; it has {found}). "
                "To start from its weights instead, set model.ckpt to it."
            )
        model = self.unwrap_model()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n in trainable if n not in ckpt["model"]]
        if missing:
            raise CheckpointError(f"{key}: '{path}' lacks trainable parameters of this model: {', '.join(missing[:5])}")
        try:
            model.load_state_dict(ckpt["model"], strict=False)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{key}: '{path}' does not fit this model/optimizer ({err})") from None
        if self.use_scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])

        epoch = int(ckpt["epoch"])
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            # a checkpoint of the original code: as it did, continue with the next epoch
            logger.warning("%s: '%s' has no data/RNG state; continuing at epoch %d (not bit-exact)", key, path, epoch + 1)
            self.start_epoch, self.start_iter = epoch + 1, 0
            return
        if int(ckpt["iters_per_epoch"]) != self.iters_per_epoch:
            raise CheckpointError(f"run.iters_per_epoch: the checkpoint '{path}' used {ckpt['iters_per_epoch']}, this run {self.iters_per_epoch}")
        if int(ckpt["world_size"]) != self.dist.world_size:
            raise CheckpointError(
                f"{key}: '{path}' was written by {ckpt['world_size']} processes, this run has {self.dist.world_size}; "
                "an exact resume needs the same number (or set model.ckpt to start from its weights)"
            )
        changed = changed_settings(ckpt.get("config") or {}, self.config.to_dict())
        if changed:
            logger.warning("%s: '%s' was written with other settings; this run goes on with its own: %s", key, path, "; ".join(changed))
        iters = int(ckpt["iters"])
        self.start_epoch, self.start_iter = (epoch + 1, 0) if iters >= self.iters_per_epoch else (epoch, iters)
        self.train_loader.load_state_dict(ckpt["data_state"][self.dist.rank])
        self._rng_to_restore = ckpt["rng_state"][self.dist.rank]
        pending = ckpt.get("pending_grads")
        if pending is None and self.start_iter == 0 and self.iters_per_epoch % self.accum_grad_iters:
            logger.warning("%s: '%s' predates saving the gradients an epoch of %d iterations leaves pending (run.accum_grad_iters %d): "
                           "the first optimizer step after it differs from an uninterrupted run's", key, path, self.iters_per_epoch,
                           self.accum_grad_iters)
        params = dict(model.named_parameters())
        for name, grad in (pending[self.dist.rank] if pending else {}).items():
            params[name].grad = grad.to(device=params[name].device, dtype=params[name].dtype)
        logger.info("resumed from %s at epoch %d iteration %d", path, self.start_epoch, self.start_iter)
