"""The server under pressure: a bounded queue (429), remote images off by default, and SIGTERM
finishing the request in flight before the process exits 0. One server (``--max-queue 1``) for the
module; the SIGTERM test, last, stops it."""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset
from serve_helpers import MAX_TOKENS, MODEL, ask_about, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve-small"), "--max-queue", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scene():
    return SyntheticShapesDataset(lambda image: image, seed=3).scene(2)[1]


def post(server, messages, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, **fields}
    return httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=120)


def test_http_images_are_refused_without_the_flag(server):
    response = post(server, ask_about("https://example.com/cat.png"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "remote_images_disabled" and "--allow-remote-images" in error["message"]
    assert error["param"] == "messages[0].content[0].image_url"


def test_a_full_queue_answers_429_and_the_server_goes_on(server, scene):
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(server, ask_about(scene)), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}, statuses
    error = next(r for r in responses if r.status_code == 429).json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full" and "--max-queue 1" in error["message"]
    answered = [r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200]
    assert len(set(answered)) == 1  # the same question about the same scene, greedy
    assert post(server, ask_about(scene)).json()["choices"][0]["message"]["content"] == answered[0]


def test_sigterm_finishes_the_request_in_flight_then_exits_0(server, scene):
    outcome: dict = {}
    request = threading.Thread(target=lambda: outcome.update(response=post(server, ask_about(scene), max_tokens=MAX_TOKENS)))
    request.start()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health").json()["in_progress"] == 0:
        assert time.monotonic() < deadline and request.is_alive(), "the request never started"
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    request.join(120)
    response = outcome["response"]
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert server.process.wait(60) == 0, server.tail()
    assert "Finished server process" in server.tail()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
