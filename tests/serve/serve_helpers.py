"""What the server tests share: the real server as a subprocess, images as data: URLs, the load test."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from conftest import REPO
from minigpt4.apps.serve.processes import launch, stop
from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset, describe, parse_objects

MODEL = "minigpt4-nano"
API_KEY = "sk-test-key"
QUESTION = "Describe this image."
MAX_TOKENS = 40  # the nano model's longest description is ~20 tokens


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def ask_about(image: Image.Image | str, question: str = QUESTION) -> list[dict[str, Any]]:
    """One user message: the image, then the question (the order the demo uses)."""
    url = image if isinstance(image, str) else data_url(image)
    return [{"role": "user", "content": [image_part(url), {"type": "text", "text": question}]}]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> int:
        return stop(self.process)


def start_server(tmp: Path, *args: str, timeout: float = 240.0) -> Server:
    """``python -m minigpt4.apps.serve`` on a free loopback port (one thread), once its /health answers."""
    log = tmp / "serve.log"
    url, process = launch([sys.executable, "-m", "minigpt4.apps.serve", *args], log, timeout, cwd=REPO)
    return Server(url, process, log)


# ---- the load test ------------------------------------------------------------------------------
def distinct_scenes(seed: int, count: int) -> list[tuple[list, Image.Image]]:
    """``count`` scenes of 2-3 shapes, no two with the same shapes: an exact answer is about its own scene."""
    dataset = SyntheticShapesDataset(lambda image: image, seed=seed)
    scenes, seen, index = [], set(), 0
    while len(scenes) < count:
        shapes, image = dataset.scene(index)
        index += 1
        key = frozenset(parse_objects(describe(shapes)).items())
        if len(shapes) >= 2 and key not in seen:
            seen.add(key)
            scenes.append((shapes, image))
    return scenes


@dataclass
class LoadReport:
    scenes: list = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    exact: int = 0
    misses: list[tuple[int, str]] = field(default_factory=list)  # (scene, answer) of the answers that are not exact
    answers: int = 0
    wall_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lat = sorted(self.latencies)
        p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
        return (f"{self.answers} answers in {self.wall_s:.1f} s = {self.answers / self.wall_s:.2f} req/s; latency p50 "
                f"{statistics.median(lat):.2f} s, p99 {p99:.2f} s; {self.exact} name their scene exactly")


def load_test(base_url: str, api_key: str | None, clients: int = 32, per_client: int = 4, seed: int = 1234) -> LoadReport:
    """``clients`` concurrent clients, each asking about its own scenes ``per_client`` times in turn."""
    from openai import OpenAI

    scenes = distinct_scenes(seed, clients * per_client)
    truths = [parse_objects(describe(shapes)) for shapes, _ in scenes]
    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=300)
    report = LoadReport(scenes=scenes)

    def run(c: int) -> None:
        for k in range(per_client):
            i = c * per_client + k
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=MODEL, messages=ask_about(scenes[i][1]), max_tokens=MAX_TOKENS, temperature=0)
            except Exception as err:  # counted, and the test says which
                report.failures.append(f"client {c} request {k}: {type(err).__name__}: {err}")
                continue
            report.latencies.append(time.perf_counter() - start)
            answer = reply.choices[0].message.content
            report.answers += 1
            if parse_objects(answer) == truths[i]:
                report.exact += 1
            else:
                report.misses.append((i, answer))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    report.wall_s = time.perf_counter() - start
    return report
