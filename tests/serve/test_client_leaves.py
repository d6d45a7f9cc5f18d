"""A client that leaves before its whole answer frees its row: streamed or not, the engine stops
writing the answer within a step, the request's place in the queue is given back, and the server
goes on answering.

The app (``create_app``) under uvicorn on the loopback in this process, on the tiny reference
model (the Llama-2 variant, greedy: its answers run to ``max_tokens``), with every LLM step slowed to
10 ms so that an answer is still being written when its client goes: what the engine does is then counted in its
forward calls and read in its log.
"""
from __future__ import annotations

import logging
import re
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from PIL import Image

from conftest import free_port, tiny_model_section
from minigpt4.apps.serve.app import ServeSettings, create_app
from minigpt4.chat import load_chat
from serve_helpers import ask_about

pytestmark = pytest.mark.slow
MODEL = "minigpt4-tiny"
STEP_S = 0.01
LONG = 400  # tokens asked for: at 10 ms a step, four seconds of writing


class SlowServer:
    def __init__(self, chat):
        self.chat, self.forwards = chat, 0
        forward = chat.model.llama_model.forward

        def slow_forward(*args, **kwargs):
            self.forwards += 1
            time.sleep(STEP_S)
            return forward(*args, **kwargs)

        chat.model.llama_model.forward = slow_forward
        self.app = create_app(chat, ServeSettings(model_name=MODEL, max_tokens=LONG))
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    @property
    def in_progress(self) -> int:
        return httpx.get(f"{self.url}/health").json()["in_progress"]

    def wait_until_idle(self, timeout: float = 20.0) -> int:
        """Wait until the LLM takes no step for a while; the number of steps taken so far."""
        deadline = time.monotonic() + timeout
        seen = -1
        while seen != self.forwards:
            assert time.monotonic() < deadline, "the engine kept writing"
            seen = self.forwards
            time.sleep(20 * STEP_S)
        return seen

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(write_yaml):
    torch.manual_seed(0)
    chat = load_chat(write_yaml({"model": tiny_model_section("llama2")}, "tiny_serve.yaml"), reuse_kv_cache=False)
    server = SlowServer(chat)
    yield server
    server.close()


def body(**fields) -> dict:
    return {"model": MODEL, "messages": ask_about(Image.new("RGB", (32, 32), "red")), "temperature": 0, **fields}


def tokens_when_left(caplog) -> list[int]:
    return [int(n) for n in re.findall(r"reader left after (\d+) of its tokens", caplog.text)]


def test_a_client_that_gives_up_on_a_whole_answer_stops_it(server, caplog):
    caplog.set_level(logging.INFO, logger="minigpt4.conversation.engines")
    before = server.wait_until_idle()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=LONG), timeout=httpx.Timeout(10, read=1.0))
    steps = server.wait_until_idle() - before
    [left_after] = tokens_when_left(caplog)
    assert 0 < left_after < LONG and steps < left_after + 40, (left_after, steps)  # it stopped, not ran to 1000
    assert server.in_progress == 0


def test_a_client_that_leaves_a_stream_stops_it(server, caplog):
    caplog.set_level(logging.INFO, logger="minigpt4.conversation.engines")
    before = server.wait_until_idle()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body(max_tokens=LONG, stream=True), timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        contents = 0
        while contents < 3:  # a few pieces of the answer, then away
            contents += '"content": "' in next(lines) and 1
    steps = server.wait_until_idle() - before
    [left_after] = tokens_when_left(caplog)
    assert 0 < left_after < LONG and steps < left_after + 40, (left_after, steps)
    assert server.in_progress == 0


def test_the_server_goes_on_answering(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body(max_tokens=5), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5
    assert server.in_progress == 0
