"""The OpenAI-compatible server (``python -m minigpt4.apps.serve``), for real: one server process on
the nano model for the module, the official ``openai`` client, loopback only.

Greedy API answers equal ``Chat``'s in-process answers (one image, two images, a history), every
bad input gets its status and OpenAI's error shape while the server goes on serving, and 32
concurrent clients get answers about their own scenes.
"""
from __future__ import annotations

import json
import zlib

import httpx
import pytest
from PIL import Image

from minigpt4.chat import DEFAULT_CFG, load_chat
from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset
from serve_helpers import API_KEY, MAX_TOKENS, MODEL, QUESTION, ask_about, data_url, image_part, load_test, start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MAX_IMAGES = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("serve"), "--api-key", API_KEY, "--allow-remote-images", "--max-images", str(MAX_IMAGES))
    yield server
    assert server.stop() == 0, server.tail()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(server):
    # After the server: it converted SmolLM2 into the test cache already.
    return load_chat(DEFAULT_CFG)


@pytest.fixture(scope="module")
def images():
    dataset = SyntheticShapesDataset(lambda image: image, seed=99)
    return [dataset.scene(i)[1] for i in range(4)]


def chat_answer(chat, steps) -> object:
    """Play ``steps`` (("image", img) | ("ask", text) | ("answer", None)) on a fresh Chat conversation."""
    conv, img_list = chat.new_conversation(), []
    reply = None
    for kind, value in steps:
        if kind == "image":
            chat.upload_img(value, conv, img_list)
        elif kind == "ask":
            chat.ask(value, conv)
        else:
            reply = chat.reply(conv, img_list, max_new_tokens=MAX_TOKENS)
    return reply


def test_one_image_answers_as_chat_does(client, chat, images):
    for image in images[:3]:
        expected = chat_answer(chat, [("image", image), ("ask", QUESTION), ("answer", None)])
        response = client.chat.completions.create(model=MODEL, messages=ask_about(image), max_tokens=MAX_TOKENS)
        choice = response.choices[0]
        assert choice.message.content == expected.text and choice.message.role == "assistant"
        assert choice.finish_reason == expected.result.finish_reason == "stop"
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (expected.result.prompt_tokens, expected.result.completion_tokens)
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
        assert response.model == MODEL and response.id.startswith("chatcmpl-")


def test_streaming_gives_the_same_answer_in_chunks(client, server, images):
    whole = client.chat.completions.create(model=MODEL, messages=ask_about(images[0]), max_tokens=MAX_TOKENS).choices[0].message.content
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ask_about(images[0]), max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}
    ))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole and len([d for d in deltas if d]) > 2
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    # On the wire: server-sent events that end with [DONE].
    body = {"model": MODEL, "messages": ask_about(images[0]), "max_tokens": MAX_TOKENS, "stream": True}
    raw = httpx.post(f"{server.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_two_images_each_where_the_user_put_it(client, chat, images):
    a, b = images[1], images[2]
    expected = chat_answer(chat, [("image", a), ("image", b), ("ask", "Which shapes do you see?"), ("answer", None)])
    content = [image_part(data_url(a)), image_part(data_url(b)), {"type": "text", "text": "Which shapes do you see?"}]
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.result.prompt_tokens


def test_a_history_of_earlier_turns(client, chat, images):
    first = chat_answer(chat, [("image", images[3]), ("ask", QUESTION), ("answer", None)]).text
    expected = chat_answer(chat, [("image", images[3]), ("ask", QUESTION), ("answer", None), ("ask", "How many shapes are there?"), ("answer", None)])
    messages = ask_about(images[3]) + [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "How many shapes are there?"},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.result.prompt_tokens


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["engine"] == "hf"


# ---- bad requests ----------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> str:
    """A PNG that declares its size but holds no pixels: a 60-megapixel image in 60 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    import base64

    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


def bad_requests(server_port: int) -> dict[str, tuple[dict, int, str, str]]:
    """name -> (request fields over a good request, status, message fragment, code)."""
    small = Image.new("RGB", (32, 32), "red")
    return {
        "file url": (dict(messages=ask_about("file:///etc/passwd")), 400, "never read", "invalid_image_url"),
        "plain path": (dict(messages=ask_about("/etc/passwd")), 400, "never read", "invalid_image_url"),
        "loopback url": (dict(messages=ask_about(f"http://127.0.0.1:{server_port}/x.png")), 400, "127.0.0.1, which is not a public address", "image_url_not_public"),
        "localhost url": (dict(messages=ask_about(f"http://localhost:{server_port}/x.png")), 400, "not a public address", "image_url_not_public"),
        "private url": (dict(messages=ask_about("http://10.0.0.1/x.png")), 400, "not a public address", "image_url_not_public"),
        "60 MP image": (dict(messages=ask_about(png_header_only(7746, 7746))), 400, "60 megapixels; the limit is 50 megapixels", "invalid_image"),
        "not an image": (dict(messages=ask_about("data:image/png;base64,aGVsbG8=")), 400, "is not an image", "invalid_image"),
        "too many images": (dict(messages=[{"role": "user", "content": [image_part(data_url(small))] * (MAX_IMAGES + 1)}]), 400, f"at most {MAX_IMAGES} per request", "too_many_images"),
        "unknown model": (dict(model="gpt-4o"), 404, "The model 'gpt-4o' does not exist", "model_not_found"),
        "n=2": (dict(n=2), 400, "only 1 choice", "unsupported_value"),
        "max_tokens too large": (dict(max_tokens=100_000), 400, "max_tokens: at most 1024", "invalid_value"),
        "system message": (dict(messages=[{"role": "system", "content": "Be brief."}] + ask_about(small)), 400, "system messages are not supported", "unsupported_value"),
        "ends with the assistant": (dict(messages=ask_about(small) + [{"role": "assistant", "content": "a red square."}]), 400, "the last message must be the user's", "invalid_value"),
        "image placeholder in text": (dict(messages=[{"role": "user", "content": "What is in <ImageHere>?"}]), 400, "is reserved for where images go", "invalid_value"),
        "temperature out of range": (dict(temperature=5), 400, "temperature", "invalid_value"),
        "max_tokens not a number": (dict(max_tokens="abc"), 400, "max_tokens", "invalid_value"),
        "seed over 64 bits": (dict(seed=2**64, temperature=0), 400, "seed", "invalid_value"),
        "stop too long": (dict(stop=["x" * 300]), 400, "at most 256 characters", "invalid_value"),
        "logprobs": (dict(logprobs=True), 400, "logprobs: not supported", "unsupported_parameter"),
        "tools": (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), 400, "tools: not supported", "unsupported_parameter"),
        "context too long": (dict(messages=[{"role": "user", "content": "red " * 2100}]), 400, "over the model's max_length of 2000", "context_length_exceeded"),
        "url with a bad port": (dict(messages=ask_about("http://example.com:99999/x.png")), 400, "not a valid http(s) URL", "invalid_image_url"),
    }


@pytest.mark.parametrize("name", list(bad_requests(1)))
def test_bad_requests_get_their_status_and_openais_error_shape(client, server, name):
    fields, status, message, code = bad_requests(int(server.url.rsplit(":", 1)[1]))[name]
    request = {"model": MODEL, "messages": ask_about(Image.new("RGB", (32, 32), "blue")), "max_tokens": MAX_TOKENS, **fields}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request)
    error = caught.value
    assert error.status_code == status, error.body
    assert isinstance(error, openai.BadRequestError) == (status == 400)  # what a client catches for a request it must fix
    assert message in error.body["message"] and error.body["code"] == code
    assert error.body["type"] == "invalid_request_error" and "param" in error.body


def raw_post(server, body: bytes | str, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(f"{server.base_url}/chat/completions", content=body, headers=headers, timeout=120)


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("missing key", 401, "Missing API key"),
        ("wrong key", 401, "Incorrect API key"),
        ("malformed JSON", 400, "not valid JSON"),
        ("no messages", 400, "messages"),
        ("huge body", 413, "request body is over"),
        ("huge body, no key", 401, "Missing API key"),  # the key is checked before the body is kept
        ("JSON nested too deeply", 400, "nests too deeply"),
    ],
)
def test_raw_failures_have_openais_error_shape(server, case, status, message):
    good = json.dumps({"model": MODEL, "messages": ask_about(Image.new("RGB", (32, 32), "green"))})
    response = {
        "missing key": lambda: raw_post(server, good, key=None),
        "wrong key": lambda: raw_post(server, good, key="sk-wrong"),
        "malformed JSON": lambda: raw_post(server, '{"model": "minigpt4-nano", "messages": [}'),
        "no messages": lambda: raw_post(server, json.dumps({"model": MODEL})),
        "huge body": lambda: raw_post(server, json.dumps({"model": MODEL, "messages": ask_about(Image.new("RGB", (32, 32))), "pad": "x" * (21 * 2**20)})),
        "huge body, no key": lambda: raw_post(server, json.dumps({"model": MODEL, "pad": "x" * (21 * 2**20)}), key=None),
        "JSON nested too deeply": lambda: raw_post(server, "[" * 100_000 + "]" * 100_000),
    }[case]()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")


def test_openais_fields_at_their_neutral_values_are_accepted(client):
    """What clients send by default (no logprobs, no penalties, plain text) asks for nothing MiniGPT-4 lacks."""
    reply = client.chat.completions.create(
        model=MODEL, messages=ask_about(Image.new("RGB", (32, 32), "red")), max_tokens=MAX_TOKENS, logprobs=False,
        presence_penalty=0, frequency_penalty=0, response_format={"type": "text"}, seed=2**63 - 1, temperature=0,
    )
    assert reply.choices[0].message.content


def test_unknown_routes_and_the_api_key_on_models(server):
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["message"] == "Not Found"
    assert httpx.get(f"{server.base_url}/models").status_code == 401


def test_load_32_clients_get_answers_about_their_own_scenes(server, chat):
    report = load_test(server.base_url, API_KEY, clients=32, per_client=4)
    print("\nhf engine, 32 clients x 4 requests:", report.summary())
    assert not report.failures, report.failures[:5]
    assert report.answers == 128
    # The nano model names ~90% of scenes exactly; chance would be far below 1%.
    assert report.exact >= 0.8 * report.answers, report.summary()
    # No two scenes have the same shapes, so an exact answer is about its own scene. The others
    # must be the model's own mistake about that scene, not another client's answer: greedy, the
    # same answer Chat gives in-process.
    for i, answer in report.misses:
        image = report.scenes[i][1]
        assert answer == chat_answer(chat, [("image", image), ("ask", QUESTION), ("answer", None)]).text, i
    # ... and the server is still healthy after all the errors above.
    assert httpx.get(f"{server.url}/health").json()["in_progress"] == 0
