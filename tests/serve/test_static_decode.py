"""``serve --decode static``: the server's lone requests written by the static decode loop.

A real server process on the nano model, the official ``openai`` client, loopback only: its greedy
answers and token counts are ``Chat``'s (``generate``), streamed or not; concurrent requests still
get them; a request's stop strings cut the answer and its seed repeats a sample.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO
from minigpt4.chat import DEFAULT_CFG, load_chat
from minigpt4.common.config import ConfigError
from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset
from serve_helpers import MAX_TOKENS, MODEL, QUESTION, ask_about, start_server

openai = pytest.importorskip("openai")


def test_decode_static_is_the_hf_engines():
    done = subprocess.run(
        [sys.executable, "-m", "minigpt4.apps.serve", "--engine", "vllm", "--engine-url", "http://127.0.0.1:9", "--decode", "static"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --decode static: the hf engine's; the vllm engine decodes on its server"
    with pytest.raises(ConfigError, match="decode: 'graph' is not one of generate, static"):
        load_chat(DEFAULT_CFG, decode="graph")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve-static"), "--decode", "static")
    yield server
    assert server.stop() == 0, server.tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(server):
    return load_chat(DEFAULT_CFG)  # generate, in this process (after the server converted SmolLM2)


def chat_reply(chat, image, **settings):
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(QUESTION, conv)
    return chat.reply(conv, img_list, max_new_tokens=MAX_TOKENS, **settings)


@pytest.fixture(scope="module")
def images():
    dataset = SyntheticShapesDataset(lambda image: image, seed=7)
    return [dataset.scene(i)[1] for i in range(4)]


@pytest.mark.slow
@pytest.mark.e2e  # a server of its own (a minute): with the end-to-end runs, not the suite
def test_answers_are_chats_streamed_or_not(client, chat, images):
    for image in images[:2]:
        expected = chat_reply(chat, image)
        response = client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS)
        assert response.choices[0].message.content == expected.text
        assert response.choices[0].finish_reason == expected.result.finish_reason == "stop"
        assert response.usage.completion_tokens == expected.result.completion_tokens
        stream = client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text


@pytest.mark.slow
@pytest.mark.e2e  # a server of its own (a minute): with the end-to-end runs, not the suite
def test_concurrent_requests_stop_strings_and_seeds(client, chat, images):
    def ask(image, **settings):
        return client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS, **settings).choices[0]

    alone = [ask(image).message.content for image in images]
    with ThreadPoolExecutor(4) as pool:  # batched by generate or alone by the loop: the same greedy answers
        assert [c.message.content for c in pool.map(ask, images)] == alone
    words = alone[0].split()
    assert len(words) >= 2, alone[0]
    cut, expected = ask(images[0], stop=[words[1]]), chat_reply(chat, images[0], stop=(words[1],))
    assert cut.message.content == expected.text and len(expected.text) < len(alone[0])
    assert cut.finish_reason == expected.result.finish_reason == "stop"
    sampled = [ask(images[1], temperature=1.0, top_p=0.9, seed=11).message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
