"""Training steps of both MiniGPT-4 stages at the real shapes: the original's execution vs ours.

    python benchmarks/bench_train.py                      # both stages, default modes, on cuda
    python benchmarks/bench_train.py --tiny --device cpu --steps 1 --warmup 0   # smoke test

Shapes: EVA-ViT-g (39 blocks, width 1408) on 224 px images, the BLIP-2 Q-Former (32 queries) and
LLaMA-7B, all with random weights created on the device; nothing is downloaded. The batch size,
text length and prompts come from the original train configs: stage 1
(``train_configs/minigpt4_stage1_pretrain.yaml``) is 64 images with captions of up to 32 tokens
and no instruction; stage 2 (``minigpt4_stage2_finetune.yaml``) is 12 images, one of
``prompts/alignment.txt`` in the ``###Human: {} ###Assistant: `` template, answers of up to 160
tokens. Batches are random images and random words, generated once; every mode starts from the
same seed, so every mode sees the same batches and draws the same prompts.

Modes:
- ``reference``: executes like the original: fp16 ViT weights and fp16 LLM, eager attention
  (ViT, Q-Former, LLM), fp16 autocast with a GradScaler, (B, T, 32000) logits and the LLM's own
  loss (``labels=``), non-fused AdamW, no compile.
- ``default``: ours: bf16 ViT weights and bf16 LLM, SDPA attention, bf16 autocast without a
  scaler, the LM head only where a label is, fused AdamW.
- ``default+<flags>``, flags joined by ``+``:
  ``features``: the step starts from the Q-Former outputs (``MiniGPT4.vision_features``), computed
  before the timed steps: the ViT and Q-Former are frozen, so an image's features can be computed
  once and reused (in training: ``run.feature_cache``). The one-off rate of that extraction is
  reported too. It pays when images are seen again, and gives up stage 1's random crops (stage
  2's eval processor has none).
  ``cache``: as a user gets ``run.feature_cache``: every step reads the features of the images
  seen before from the real on-disk ``FeatureCache`` and computes (ViT + Q-Former) and writes
  those of new images, inside the timed step. The share of new images per step is one over the
  stage's views per image: stage 1 sees each of its ~5M pairs about once (20,000 steps x 256),
  so every image is new and the cache only costs; stage 2 sees each of its 3,439 images
  5 x 200 x 12 / 3,439 = 3.5 times. The cache entries of "seen" images are written before the
  timed steps. Image decoding and the data loader stay out, as in every mode.
  ``packed``: ``model.pack_sequences``: samples share LLM rows (``mini_gpt4.pack_rows``) instead
  of each being padded to the longest; fewer positions to compute, the same loss.
  ``compile``: every ViT block and LLM decoder layer ``torch.compile``d (``MiniGPT4.compile_blocks``;
  in training: ``run.compile``), compiled in the warmup steps (only when named in ``--modes``).

``features`` is an upper bound that leaves the extraction and the cache reads out of the timed
step; ``cache`` is what a training run gets. By default both stages run reference, default,
default+packed and default+cache+packed; the headline of stage 1 is ``default+packed+compile``
(stage 1's random crops rule out a feature cache), of stage 2 ``default+cache+packed+compile``.

One step is one iteration of ``RunnerBase.train_epoch`` (accum_grad_iters 1, no clipping): forward
under autocast, ``scaler.scale(loss).backward()``, ``scaler.step``, ``scaler.update``,
``zero_grad``, ``loss.item()``. Data loading is left out (the batches already lie on the device).

MFU divides the model FLOPs of a step by the median step time and by the measured peak of one
large bf16 matrix product (``common.matmul_peak_tflops``), nanoGPT's estimate adapted to frozen
parts, which run forward only or forward and input gradients (no weight gradients):

    FLOPs/step = 4 * N_llm  * T_llm                  decoder layers: forward 2N, input gradients 2N
               + 4 * N_head * T_label                LM head, only where a label is
               + 2 * N_vit  * B * 257                ViT forward (not in default+features)
               + 2 * N_qf * B * 32 + 2 * N_kv * B * 257   Q-Former forward: queries, cross-attention K/V

N_* count matmul weights (Linear and Conv; embeddings are lookups; norms and biases are left
out); N_kv are the Q-Former's cross-attention key/value projections, which read the 257 ViT
tokens; T_llm are the LLM's non-pad tokens in the batch, T_label its answer tokens. Attention
scores (4 * layers * seq * width per token: about 1% of the LLM, 3% of the ViT here) and
llama_proj (3M weights) are left out. The count is the same for every mode: MFU credits useful
work only, not the reference's logits at non-label positions nor any mode's padding (the record's
``llm_positions_per_step`` shows the positions actually computed). H100s run fp16 and bf16
matrix products at the same rate, so one peak serves both.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the LLM folder is written here; never reach the hub

import torch
from omegaconf import OmegaConf
from torch import nn

import common
from minigpt4.common.config import ModelConfig
from minigpt4.common.optims import build_optimizer
from minigpt4.models.eva_vit import EVA_VIT_G
from minigpt4.models.mini_gpt4 import pack_rows
from minigpt4.models.qformer import BERT_BASE_QFORMER

logger = logging.getLogger("bench_train")

STAGE_CONFIGS = {1: "minigpt4_stage1_pretrain.yaml", 2: "minigpt4_stage2_finetune.yaml"}
STAGE_MODEL_KEYS = ("max_txt_len", "end_sym", "prompt_path", "prompt_template")
QFORMER_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "cross_attention_frequency")
GOALS = {1: 1.5, 2: 2.0}  # samples/s of the best mode over the reference (issue 6)


@dataclass(frozen=True)
class Mode:
    name: str
    model: dict[str, Any]  # overrides of the model section
    amp_dtype: torch.dtype
    fused_adamw: bool
    features: bool = False
    cache: bool = False
    compile: bool = False


REFERENCE = Mode(
    "reference",
    dict(vit_precision="fp16", torch_dtype="float16", autocast_dtype="float16", attn_implementation="eager", logits_on_all_positions=True),
    torch.float16,
    fused_adamw=False,
)
DEFAULT = Mode(
    "default",
    dict(vit_precision="bf16", torch_dtype="bfloat16", autocast_dtype="bfloat16", attn_implementation="sdpa", logits_on_all_positions=False, pack_sequences=False),
    torch.bfloat16,
    fused_adamw=True,
)
FLAGS = ("features", "cache", "packed", "compile")
STAGE_MODES = {
    1: ["reference", "default", "default+packed", "default+cache+packed"],
    2: ["reference", "default", "default+packed", "default+cache+packed"],
}
CC_SBU_ALIGN_IMAGES = 3439  # stage 2's dataset (DESIGN.md B4); stage 1's streams are seen about once


def mode_named(name: str) -> Mode:
    """``reference``, ``default``, or ``default+`` flags (``default+features+packed``)."""
    base, *flags = name.split("+")
    if base == "reference" and not flags:
        return REFERENCE
    if base != "default" or not set(flags) <= set(FLAGS) or len(set(flags)) < len(flags) or {"features", "cache"} <= set(flags):
        raise argparse.ArgumentTypeError(f"'{name}': expected reference, default, or default+ any of {', '.join(FLAGS)} (features or cache)")
    model = {**DEFAULT.model, "pack_sequences": "packed" in flags}
    return replace(DEFAULT, name=name, model=model, features="features" in flags, cache="cache" in flags, compile="compile" in flags)


@dataclass
class Stage:
    """What the original train config of one stage fixes: batch, text and prompt keys, optimizer."""

    batch_size: int
    image_size: int
    model: dict[str, Any]
    init_lr: float
    weight_decay: float
    beta2: float
    views_per_image: float  # how often training sees each image (what a feature cache saves)


def load_stage(number: int) -> Stage:
    cfg = OmegaConf.load(common.REPO / "train_configs" / STAGE_CONFIGS[number])
    dataset = next(iter(cfg.datasets.values()))  # stage 1 mixes laion and cc_sbu, both at batch 64
    defaults = ModelConfig()
    return Stage(
        batch_size=int(dataset.batch_size),
        image_size=int(dataset.vis_processor.train.image_size),
        model={key: cfg.model.get(key, getattr(defaults, key)) for key in STAGE_MODEL_KEYS},
        init_lr=float(cfg.run.init_lr),
        weight_decay=float(cfg.run.weight_decay),
        beta2=float(cfg.run.get("beta2", 0.999)),
        views_per_image=1.0 if number == 1 else cfg.run.max_epoch * cfg.run.iters_per_epoch * dataset.batch_size / CC_SBU_ALIGN_IMAGES,
    )


def make_batches(stage: Stage, image_size: int, n: int, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """``n`` batches of random images (on ``device``) and answers of 1 to ``max_txt_len`` words.

    Every word is at least one token, so the longest answers are cut at ``max_txt_len`` tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    max_words = int(stage.model["max_txt_len"])
    batches = []
    for _ in range(n):
        lengths = torch.randint(1, max_words + 1, (stage.batch_size,), generator=gen).tolist()
        batches.append({
            "image": torch.randn(stage.batch_size, 3, image_size, image_size, generator=gen).to(device),
            "answer": [common.random_text(gen, k) for k in lengths],
        })
    return batches


# ---- FLOPs ------------------------------------------------------------------------------------
def matmul_weights(module: nn.Module, name_has: str = "") -> int:
    return sum(
        m.weight.numel() for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and name_has in name
    )


def weight_counts(model) -> dict[str, int]:
    """The N_* of the module docstring."""
    head = model.llama_model.get_output_embeddings().weight.numel()
    kv = matmul_weights(model.Qformer, "crossattention.attention.key") + matmul_weights(model.Qformer, "crossattention.attention.value")
    return {
        "llm": matmul_weights(model.llama_model) - head,
        "head": head,
        "vit": matmul_weights(model.visual_encoder),
        "qformer": matmul_weights(model.Qformer) - kv,
        "qformer_kv": kv,
    }


def step_flops(n: dict[str, int], llm_tokens: float, label_tokens: float, images: int, vit_tokens: int, queries: int, vision: bool) -> float:
    flops = 4 * n["llm"] * llm_tokens + 4 * n["head"] * label_tokens
    if vision:
        flops += 2 * n["vit"] * images * vit_tokens + 2 * n["qformer"] * images * queries + 2 * n["qformer_kv"] * images * vit_tokens
    return flops


@torch.no_grad()
def token_counts(model, batches: list[dict[str, Any]], seed: int) -> dict[str, list[int]]:
    """Per batch: the LLM's non-pad tokens, the positions it computes (padding included), the
    label tokens. The timed run's prompt draws are replayed; zero features stand in for the
    images, which change no count (and the ViT stays out of it)."""
    random.seed(seed)
    counts: dict[str, list[int]] = {"llm_tokens": [], "llm_positions": [], "label_tokens": []}
    for samples in batches:
        features = torch.zeros(len(samples["answer"]), model.query_tokens.shape[1], model.llama_proj.in_features, device=model.device)
        inputs_embeds, attention_mask, labels = model.prepare_inputs({"image_features": features, "answer": samples["answer"]})
        if model.pack_sequences:
            inputs_embeds = pack_rows(inputs_embeds, attention_mask, labels)[0]
        counts["llm_tokens"].append(int(attention_mask.sum()))
        counts["llm_positions"].append(inputs_embeds.shape[0] * inputs_embeds.shape[1])
        counts["label_tokens"].append(int((labels != -100).sum()))
    return counts


# ---- one mode -----------------------------------------------------------------------------------
def run_mode(mode: Mode, stage: Stage, section: dict[str, Any], batches: list[dict[str, Any]], args, peak_tflops: float | None) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    overrides = dict(mode.model)
    if not cuda:  # the CPU smoke run: fp32 weights, no autocast (as the runner on a CPU)
        overrides.update(vit_precision="fp32", torch_dtype="float32")
    common.reset_peak_memory(device)
    torch.manual_seed(args.seed)
    model = common.build_model({**section, **overrides}, device)
    model.train()
    if mode.compile:
        torch._dynamo.reset()  # drop the guards of an earlier mode's compiled graphs
        model.compile_blocks()  # what run.compile does in training
    # the runner's builder: fused wherever the parameters are on CUDA, unless the mode forbids it
    optimizer = build_optimizer(model, stage.init_lr, stage.weight_decay, stage.beta2, fused=None if mode.fused_adamw else False)
    use_amp = cuda
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and mode.amp_dtype == torch.float16)

    result: dict[str, Any] = {"model": overrides, "amp_dtype": str(mode.amp_dtype) if use_amp else None,
                              "grad_scaler": scaler.is_enabled(), "fused_adamw": bool(optimizer.defaults.get("fused")),
                              "compile": mode.compile}
    if mode.features:
        with torch.no_grad():
            extract = common.time_calls(lambda: model.vision_features(batches[0]["image"]), device, warmup=1, iters=3)
            result["feature_extraction_samples_per_s"] = stage.batch_size / extract["median_s"]
            batches = [{"image_features": model.vision_features(b["image"]), "answer": b["answer"]} for b in batches]

    losses: list[float] = []
    cache = None
    if mode.cache:
        cache, batches = feature_cache(model, stage, batches, use_amp, mode.amp_dtype)
        result["views_per_image"] = stage.views_per_image
    order = iter(batches)

    def step() -> None:
        # RunnerBase.train_epoch's iteration with accum_grad_iters 1 and no clipping
        samples = next(order)
        with torch.autocast(device.type, dtype=mode.amp_dtype, enabled=use_amp):
            if cache is not None:  # RunnerBase._with_cached_features
                with torch.no_grad():
                    features = cache.features(samples["image_key"], samples["image"], model.vision_features)
                samples = {"image_features": features, "answer": samples["answer"]}
            loss = model(samples)["loss"]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    random.seed(args.seed)  # the stage-2 prompt draws (random.choice per batch), equal in every mode
    timing = common.time_calls(step, device, args.warmup, args.steps)
    peak_memory = common.peak_memory_gb(device)
    timed = slice(args.warmup, args.warmup + args.steps)
    per_step = {f"{k}_per_step": sum(v[timed]) / args.steps for k, v in token_counts(model, batches, args.seed).items()}
    n = weight_counts(model)
    vit = model.visual_encoder
    flops = step_flops(
        n,
        llm_tokens=per_step["llm_tokens_per_step"],
        label_tokens=per_step["label_tokens_per_step"],
        images=stage.batch_size,
        vit_tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
        queries=model.query_tokens.shape[1],
        vision=not mode.features,  # with the cache, the extraction of new images is in the step (counted in full: an upper bound on MFU)
    )
    achieved = flops / timing["median_s"] / 1e12
    result.update(
        samples_per_s=stage.batch_size / timing["median_s"],
        step_s=timing,
        peak_memory_gb=peak_memory,
        **per_step,
        tflops_per_step=flops / 1e12,
        achieved_tflops=achieved,
        mfu=achieved / peak_tflops if peak_tflops else None,
        losses=losses,
        weights=n,
    )
    return result


def feature_cache(model, stage: Stage, batches: list[dict[str, Any]], use_amp: bool, amp_dtype: torch.dtype):
    """The runner's ``FeatureCache`` in a temporary folder, and copies of ``batches`` with image
    keys (the other modes' batches stay as they are): per batch, 1 / views of the images are new
    (computed and written in the step), the others seen before (their entries written here, untimed)."""
    from minigpt4.common.feature_cache import FeatureCache

    root = Path(tempfile.mkdtemp(prefix="bench-train-features-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    cache = FeatureCache(root, model.vision_fingerprint(amp=use_amp, amp_dtype=amp_dtype))
    new_per_batch = max(1, round(stage.batch_size / stage.views_per_image))
    keyed = []
    for b, samples in enumerate(batches):
        keys = [f"{'new' if i < new_per_batch else 'seen'}-{b}-{i}" for i in range(stage.batch_size)]
        keyed.append({**samples, "image_key": keys})
        seen = list(range(new_per_batch, stage.batch_size))
        if seen:
            with torch.no_grad(), torch.autocast(model.device.type, dtype=amp_dtype, enabled=use_amp):
                cache.features([keys[i] for i in seen], samples["image"][seen], model.vision_features)
    return cache, keyed


# ---- stages and the record ----------------------------------------------------------------------
def run_stage(number: int, args, llm_folder: Path, peak_tflops: float | None,
              progress: Callable[[dict[str, Any]], None] = lambda stage: None) -> dict[str, Any]:
    """The stage's record; ``progress`` receives it after each mode (a run cut short keeps those)."""
    stage = load_stage(number)
    keys = dict(stage.model)
    if keys["prompt_path"]:
        keys["prompt_path"] = str(common.REPO / keys["prompt_path"])  # relative to the repository, not the cwd
    section = common.model_section(llm_folder, tiny=args.tiny, **keys)
    if not args.tiny:
        section["image_size"] = stage.image_size
    device = torch.device(args.device)
    batches = make_batches(stage, section["image_size"], args.warmup + args.steps, args.seed, device)
    modes: dict[str, Any] = {}
    for mode in args.modes or [mode_named(name) for name in STAGE_MODES[number]]:
        name = mode.name
        logger.info("stage %d, %s: building the model and running %d+%d steps", number, name, args.warmup, args.steps)
        try:
            modes[name] = run_mode(mode, stage, section, batches, args, peak_tflops)
            logger.info("stage %d, %s: %.2f samples/s, peak %s GB", number, name, modes[name]["samples_per_s"], modes[name]["peak_memory_gb"])
        except (RuntimeError, ValueError) as err:  # e.g. out of memory: keep the other modes' numbers
            logger.exception("stage %d, %s failed", number, name)
            modes[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
        common.free_memory()
        progress(stage_record(number, stage, section, modes, args))
    return stage_record(number, stage, section, modes, args)


def stage_record(number: int, stage, section: dict[str, Any], modes: dict[str, Any], args) -> dict[str, Any]:
    base = modes.get("reference", {}).get("samples_per_s")
    shapes = {
        "batch_size": stage.batch_size,
        "image_size": section["image_size"],
        "vit": {**EVA_VIT_G, **(section.get("vit_config") or {}), "img_size": section["image_size"]},
        "qformer": {k: v for k, v in {**BERT_BASE_QFORMER, **(section.get("qformer_config") or {})}.items() if k in QFORMER_SHAPE},
        "num_query_token": section["num_query_token"],
        "llm": common.LLAMA_TINY if args.tiny else common.LLAMA_7B,
        **stage.model,
    }
    return {
        "shapes": shapes,
        "optimizer": {"init_lr": stage.init_lr, "weight_decay": stage.weight_decay, "beta2": stage.beta2},
        "modes": dict(modes),
        "ratios": {name: common.ratio(m.get("samples_per_s"), base) for name, m in modes.items() if name != "reference"},
        "goal": GOALS[number],
    }


def table(stages: dict[str, dict[str, Any]]) -> str:
    w = max(len(name) for stage in stages.values() for name in stage["modes"])
    lines = [f"{'stage':<6} {'mode':<{w}} {'samples/s':>10} {'x ref':>6} {'step ms':>8} {'peak GB':>8} {'MFU':>6}"]
    for stage_name, stage in stages.items():
        for name, m in stage["modes"].items():
            if "error" in m:
                lines.append(f"{stage_name[-1]:<6} {name:<{w}} failed: {m['error'][:80]}")
                continue
            ratio = 1.0 if name == "reference" else stage["ratios"].get(name)
            lines.append(
                f"{stage_name[-1]:<6} {name:<{w}} {m['samples_per_s']:>10.2f} {common.fmt(ratio, '.2f'):>6} "
                f"{m['step_s']['median_s'] * 1e3:>8.1f} {common.fmt(m['peak_memory_gb'], '.1f'):>8} {common.fmt(m['mfu'], '.1%'):>6}"
            )
        best = max((r for r in stage["ratios"].values() if r), default=None)
        lines.append(f"{'':<6} best {common.fmt(best, '.2f')}x the reference (goal {stage['goal']}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--modes", nargs="+", type=mode_named, metavar="MODE",
                        help="reference, default, default+features+packed+compile... (default: "
                        + "; ".join(f"stage {k}: {' '.join(v)}" for k, v in STAGE_MODES.items()) + ")")
    parser.add_argument("--tiny", action="store_true", help="tiny ViT/Q-Former/LLaMA (a smoke test; runs on the CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help=f"results folder (default {common.RESULTS})")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    if device.type != "cuda" and not args.tiny:
        parser.error("the real shapes (a 7B LLM) need a CUDA device; use --tiny on the CPU")

    peak = common.matmul_peak_tflops(device)
    numbers = [1, 2] if args.stage == "all" else [int(args.stage)]
    name = "train_tiny" if args.tiny else "train"
    stages: dict[str, dict[str, Any]] = {}

    def record(finished: bool) -> dict[str, Any]:
        return {
            "benchmark": "train",
            # False while modes are still to run: a run cut short (a time limit) keeps what it measured.
            "finished": finished,
            "environment": common.environment(device),
            "matmul_peak_tflops": peak,
            "settings": {"steps": args.steps, "warmup": args.warmup, "seed": args.seed, "tiny": args.tiny},
            "stages": stages,
        }

    with tempfile.TemporaryDirectory(prefix="bench-train-llm-") as tmp:
        llm_folder = common.write_llm_folder(tmp, tiny=args.tiny)
        for k in numbers:
            def progress(partial: dict[str, Any], key: str = f"stage{k}") -> None:
                stages[key] = partial
                common.save_partial(name, lambda: record(finished=False), args.out)

            stages[f"stage{k}"] = run_stage(k, args, llm_folder, peak, progress)
    path = common.save_results(name, record(finished=True), args.out)
    print(f"results: {path}")
    print(table(stages))
    return int(any("error" in m for stage in stages.values() for m in stage["modes"].values()))


if __name__ == "__main__":
    sys.exit(main())
