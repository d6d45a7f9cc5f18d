"""What the benchmark scripts share: random-weight models at real shapes, timers, the JSON record.

Nothing is downloaded. ``write_llm_folder`` writes a LLaMA config (7B, or tiny for a CPU smoke run)
and a sentencepiece tokenizer trained on the spot; ``build_model`` builds MiniGPT-4 from a model
section with ``load_weights=False`` directly on the target device, so a 7B model with random
weights is ready in seconds. Timings synchronize the device; peak memory is the allocator's.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/bench_x.py` from a checkout
RESULTS = Path(__file__).resolve().parent / "results"

# LLaMA-7B (Vicuna V0 7B / Llama-2-7B-chat share it).
LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
LLAMA_TINY = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024
)
from minigpt4.common.tiny import TINY_QFORMER, TINY_VIT  # noqa: E402  (shared with the tests)
WORDS = (
    "the a an of in on to with and is are red green blue yellow small large picture image photo man woman dog cat "
    "street tree sky building car people sitting standing holding looking white black wooden table window water"
).split()


def write_llm_folder(out: str | os.PathLike, tiny: bool = False, tokenizer_vocab: int = 512) -> Path:
    """An HF LLaMA folder with ``config.json`` and a sentencepiece tokenizer, no weights.

    The tokenizer is small (ids < ``tokenizer_vocab``); the model keeps the real 32000-row
    embedding and LM head, which is what costs time and memory.
    """
    from transformers import LlamaConfig

    from minigpt4.common.toy_tokenizer import train_llama_sentencepiece

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.model").is_file():
        lines = [" ".join(WORDS[(i * k + i) % len(WORDS)] for k in range(1, 16)) for i in range(2000)]
        lines += ["###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: A picture."] * 50
        lines += ["[INST] <Img><ImageHere></Img> What is in the picture? [/INST] A picture of a dog."] * 50
        train_llama_sentencepiece(out, lines, tokenizer_vocab)
    shape = dict(LLAMA_TINY if tiny else LLAMA_7B)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False})
    )
    return out


def model_section(llm_folder: str | os.PathLike, tiny: bool = False, **overrides: Any) -> dict[str, Any]:
    """The ``model`` section of MiniGPT-4 (Vicuna variant) at real or tiny shapes, no weight files."""
    section: dict[str, Any] = {
        "arch": "mini_gpt4",
        "model_type": "pretrain_vicuna0",
        "image_size": 224,
        "vit_ckpt": None,
        "q_former_model": None,
        "num_query_token": 32,
        "llama_model": str(llm_folder),
        "vit_precision": "fp16",
        "torch_dtype": "float16",
        "max_txt_len": 32,
        "end_sym": "###",
    }
    if tiny:
        section.update(
            vit_config=dict(TINY_VIT), qformer_config=dict(TINY_QFORMER), image_size=32, num_query_token=4,
            vit_precision="fp32", torch_dtype="float32",
        )
    section.update(overrides)
    return section


def build_model(section: dict[str, Any], device: str | torch.device):
    """MiniGPT-4 with random weights, every tensor created on ``device`` (no CPU detour for 7B)."""
    from minigpt4.models import MiniGPT4

    with torch.device(device):
        model = MiniGPT4.from_config(section, load_weights=False)
    return model.to(device)


def random_text(generator: torch.Generator, n_words: int) -> str:
    idx = torch.randint(len(WORDS), (n_words,), generator=generator).tolist()
    return " ".join(WORDS[i] for i in idx)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(times: list[float]) -> dict[str, float]:
    """Median, quartiles and extremes of repeated timings (seconds): min <= p25 <= median <= p75 <= max."""
    # "inclusive" interpolates between the observed values, so the quartiles never leave [min, max].
    p25, _, p75 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return {
        "median_s": statistics.median(times), "min_s": min(times), "p25_s": p25, "p75_s": p75, "max_s": max(times),
        "iters": len(times),
    }


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """:func:`spread` of the seconds of ``fn()`` after ``warmup`` untimed calls, device synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return spread(times)


# CUDA runtime calls a profile counts: a graph replay, a kernel launched on its own, a copy, a wait.
RUNTIME_CALLS = ("cudaGraphLaunch", "cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def profile(run: Callable[[], Any], device: torch.device, units: Callable[[Any], int], top: int = 8) -> dict[str, Any]:
    """Where one call of ``run`` spends its time, by ``torch.profiler`` (warm it up first).

    Per unit (``units(run())``, e.g. the tokens it wrote): the wall time, and on a GPU the time its
    kernels ran (``device_busy_ms_per_unit``) and their share of the wall time: near 1 the device
    is the bound (then ``top_kernels`` says which), well below 1 the host is (then ``top_host_ops``
    and ``runtime_calls``: graph replays, single kernel launches, copies, waits). The profiler slows
    the host side, so these say where the time goes, not how fast it is (the timed runs say that).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        start = time.perf_counter()
        count = units(run())
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e3)
    busy_ms = sum(sum(times) for times in kernels.values()) if cuda else None
    host = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]
    calls = {e.key: e.count for e in host if e.key in RUNTIME_CALLS}
    host.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    heaviest = sorted(kernels.items(), key=lambda item: sum(item[1]), reverse=True)[:top]
    return {
        "units": count,
        "wall_ms_per_unit": wall_ms / count,
        "device_busy_ms_per_unit": None if busy_ms is None else busy_ms / count,
        "device_busy_share": None if busy_ms is None else busy_ms / wall_ms,
        "runtime_calls_per_unit": {name: calls.get(name, 0) / count for name in RUNTIME_CALLS} if cuda else None,
        "top_kernels": [{"name": name[:160], "ms": sum(times), "count": len(times)} for name, times in heaviest],
        "top_host_ops": [{"name": e.key[:160], "self_ms": e.self_cpu_time_total / 1e3, "count": e.count} for e in host[:top]],
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def max_known(*values: float | None) -> float | None:
    """The largest of the values that were measured; None when none was (peak memory on the CPU)."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def free_memory() -> None:
    """Collect what the last mode left unreferenced and return the cached blocks, so the next mode starts clean."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("transformers", "timm", "bitsandbytes", "peft", "accelerate"):
        env[name] = _version(name)
    return env


def matmul_peak_tflops(device: torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The achieved rate of one large bf16 matrix product: the denominator of our MFU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_calls(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / t["median_s"] / 1e12


def save_results(name: str, payload: dict[str, Any], out: str | os.PathLike | None = None) -> Path:
    """Write ``payload`` as ``<out or benchmarks/results>/<name>.json`` and return the path.

    The file is replaced whole (written beside it, then renamed): a benchmark that saves as it goes
    and is killed mid-write leaves the last complete record, never half of one."""
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    draft = path.with_name(f".{path.name}.partial")
    draft.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    draft.replace(path)
    return path


def save_partial(name: str, payload: Callable[[], dict[str, Any]], out: str | os.PathLike | None = None) -> None:
    """:func:`save_results` of a record still growing (a part of a run just ended); a save that
    fails is logged, not raised: it must not fail the part it saves."""
    try:
        save_results(name, payload(), out)
    except Exception:
        logging.getLogger(__name__).exception("saving the record so far failed")


def fmt(value: float | None, spec: str) -> str:
    """``value`` formatted for a results table; "-" when it was not measured."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def ratio(new: float | None, base: float | None) -> float | None:
    if not new or not base:
        return None
    return new / base
