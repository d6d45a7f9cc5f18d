"""Serving MiniGPT-4 to many users: requests/s, output tokens/s and p50/p99 latency per number of
concurrent clients, for each way of running the LLM, in one run.

    python benchmarks/bench_serve.py                 # nano model on the CPU: 1, 8, 32, 128 clients
    python benchmarks/bench_serve.py --tiny          # a smoke run (what the test runs)
    MINIGPT4_VLLM_PYTHON=.venv-vllm/bin/python python benchmarks/bench_serve.py   # adds the vllm engine

Modes, each a real ``python -m minigpt4.apps.serve`` process on the loopback (one thread:
``OMP_NUM_THREADS=1``), asked through the ``openai`` client:
- ``one-at-a-time``: ``--max-batch 1``, requests answered one after the other: what serving the
  demo's ``Chat.answer`` to many users amounts to (the baseline).
- ``hf``: the default engine, concurrent requests batched into one ``generate`` (``--max-batch``).
- ``vllm``: ``--engine vllm``, the LLM on a vLLM server (CPU build), started here when
  ``--vllm-python`` (default ``$MINIGPT4_VLLM_PYTHON``) names its python, or at ``--vllm-url``.

Each client asks about its own synthetic scene ("Describe this image.", greedy, ``--max-tokens``),
one request after the other. Latency is the client's, from sending to the whole answer.
Goals (the issue's, at 32 clients): ``hf`` throughput >= 8x ``one-at-a-time``'s, and its p99
latency <= 3x the single-request latency (``one-at-a-time`` with 1 client, p50).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import REPO, environment, fmt, ratio, save_results  # (common puts the checkout on sys.path)
from minigpt4.apps.serve.processes import launch, stop

MODEL = "minigpt4-nano"
QUESTION = "Describe this image."


def start_vllm(python: str, tmp: Path) -> tuple[str, subprocess.Popen]:
    # The nano model's LLM as vLLM must run it: SmolLM2 with the model's LoRA merged.
    llm = tmp / "llm"
    subprocess.run([sys.executable, "-m", "minigpt4.apps.export", "--cfg-path", "eval_configs/minigpt4_nano_eval.yaml", "--llm-out", str(llm)],
                   cwd=REPO, check=True)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(llm),
           "--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
    return launch(cmd, tmp / "vllm.log", timeout=900, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def scene_urls(n: int, seed: int = 4321) -> list[str]:
    from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset

    dataset = SyntheticShapesDataset(lambda image: image, seed=seed)
    urls = []
    for i in range(n):
        buffer = io.BytesIO()
        dataset.scene(i)[1].save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_clients(base_url: str, clients: int, per_client: int, max_tokens: int, urls: list[str]) -> dict[str, Any]:
    """``clients`` concurrent clients, ``per_client`` requests each, one after the other."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    def one_client(c: int) -> None:
        for k in range(per_client):
            url = urls[(c * per_client + k) % len(urls)]
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]
            started = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies.append(time.perf_counter() - started)
            tokens.append(reply.usage.completion_tokens)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - started
    if not latencies:
        return {"clients": clients, "requests": 0, "errors": len(errors), "first_error": errors[:1]}
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors), "first_error": errors[:1], "wall_s": wall,
        "requests_per_s": len(latencies) / wall, "output_tokens_per_s": sum(tokens) / wall,
        "latency_p50_s": statistics.median(latencies), "latency_p99_s": percentile(latencies, 0.99),
        "mean_output_tokens": sum(tokens) / len(tokens),
    }


def run_mode(args, mode: str, server_args: list[str], urls: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"bench-serve-{mode}-") as tmp:
        log = Path(tmp) / "serve.log"
        cmd = [sys.executable, "-m", "minigpt4.apps.serve", "--max-queue", str(4 * max(args.clients)), *server_args]
        url, process = launch(cmd, log, timeout=600, cwd=REPO)
        try:
            run_clients(f"{url}/v1", 1, 2, args.max_tokens, urls)  # warm-up: first-call costs are not served load
            points = {}
            for clients in args.clients:
                per_client = max(args.min_per_client, args.requests // clients)
                points[str(clients)] = point = run_clients(f"{url}/v1", clients, per_client, args.max_tokens, urls)
                print(f"{mode:>14} {clients:>4} clients: {fmt(point.get('requests_per_s'), '.2f')} req/s, "
                      f"p50 {fmt(point.get('latency_p50_s'), '.2f')} s, p99 {fmt(point.get('latency_p99_s'), '.2f')} s, {point['errors']} errors", flush=True)
            return {"server_args": server_args, "points": points}
        finally:
            stop(process)


def goals_of(runs: dict[str, Any], at: int = 32) -> dict[str, Any]:
    base, hf = runs.get("one-at-a-time", {}).get("points", {}), runs.get("hf", {}).get("points", {})
    single = base.get("1", {}).get("latency_p50_s")
    speedup = ratio(hf.get(str(at), {}).get("requests_per_s"), base.get(str(at), {}).get("requests_per_s"))
    p99_ratio = ratio(hf.get(str(at), {}).get("latency_p99_s"), single)
    return {
        f"throughput_x_at_{at}": {"value": speedup, "target": 8.0, "met": speedup is not None and speedup >= 8.0},
        f"p99_over_single_at_{at}": {"value": p99_ratio, "target": 3.0, "met": p99_ratio is not None and p99_ratio <= 3.0},
    }


def table(runs: dict[str, Any]) -> str:
    base = runs.get("one-at-a-time", {}).get("points", {})
    lines = [f"{'mode':<14} {'clients':>7} {'req/s':>7} {'x base':>7} {'out tok/s':>9} {'p50 s':>7} {'p99 s':>7} {'errors':>6}"]
    for mode, run in runs.items():
        for clients, p in run["points"].items():
            speedup = ratio(p.get("requests_per_s"), base.get(clients, {}).get("requests_per_s"))
            lines.append(f"{mode:<14} {clients:>7} {fmt(p.get('requests_per_s'), '.2f'):>7} {fmt(speedup, '.2f'):>7} "
                         f"{fmt(p.get('output_tokens_per_s'), '.1f'):>9} {fmt(p.get('latency_p50_s'), '.2f'):>7} "
                         f"{fmt(p.get('latency_p99_s'), '.2f'):>7} {p['errors']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 1 and 4 clients, few requests, short answers")
    parser.add_argument("--clients", type=int, nargs="+", help="concurrent clients (default 1 8 32 128)")
    parser.add_argument("--requests", type=int, help="requests per point, shared by the clients (default 64)")
    parser.add_argument("--min-per-client", type=int, default=2, help="each client sends at least this many")
    parser.add_argument("--max-tokens", type=int, help="max_tokens per request (default 40)")
    parser.add_argument("--max-batch", type=int, default=32, help="the hf engine's batch")
    parser.add_argument("--modes", nargs="+", default=["one-at-a-time", "hf", "vllm"], choices=["one-at-a-time", "hf", "vllm"])
    parser.add_argument("--vllm-python", default=os.environ.get("MINIGPT4_VLLM_PYTHON"), help="python of a venv with vllm-cpu")
    parser.add_argument("--vllm-url", help="a running vLLM server (--enable-prompt-embeds) instead of starting one")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    args.clients = args.clients or ([1, 4] if args.tiny else [1, 8, 32, 128])
    args.requests = args.requests or (4 if args.tiny else 64)
    args.max_tokens = args.max_tokens or (12 if args.tiny else 40)
    urls = scene_urls(64)
    servers = {"one-at-a-time": ["--max-batch", "1"], "hf": ["--max-batch", str(args.max_batch)]}
    runs: dict[str, Any] = {}
    vllm_process = None
    skipped: dict[str, str] = {}
    try:
        for mode in args.modes:
            if mode == "vllm":
                if not (args.vllm_url or args.vllm_python):
                    skipped["vllm"] = "no --vllm-python / MINIGPT4_VLLM_PYTHON / --vllm-url"
                    continue
                if not args.vllm_url:
                    args.vllm_url, vllm_process = start_vllm(args.vllm_python, Path(tempfile.mkdtemp(prefix="bench-vllm-")))
                servers["vllm"] = ["--engine", "vllm", "--engine-url", args.vllm_url]
            runs[mode] = run_mode(args, mode, servers[mode], urls)
    finally:
        if vllm_process is not None:
            stop(vllm_process)
    goals = goals_of(runs)
    settings = {k: v for k, v in vars(args).items() if k not in ("vllm_python",)}
    record = {"environment": {**environment(torch.device("cpu")), "omp_threads": 1, "cpus": os.cpu_count()},
              "settings": settings, "skipped": skipped, "runs": runs, "goals": goals}
    path = save_results("serve_tiny" if args.tiny else "serve_cpu", record, args.out)
    print(f"\nresults: {path}")
    print(table(runs))
    print("goals: " + "; ".join(f"{name} {fmt(g['value'], '.2f')} (target {g['target']}): {'met' if g['met'] else 'missed'}" for name, g in goals.items()))


if __name__ == "__main__":
    main()
