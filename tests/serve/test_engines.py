"""minigpt4/conversation/engines.py: the engine interface Chat and the server share.

The hf engine on the nano model, in-process: concurrent answers share generate calls and equal the
answers given one at a time; streams in a batch; seeds; stop strings and length. The vllm engine's
HTTP side against a stand-in server on the loopback (the real vLLM: test_vllm_engine.py). The
image batcher and the address checks of remote images.
"""
from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import base64
import pytest
import torch

from conftest import free_port
from minigpt4.apps.serve.images import is_public
from minigpt4.chat import DEFAULT_CFG, load_chat
from minigpt4.conversation.engines import (
    EngineMismatch,
    EngineRequestError,
    EngineUnavailable,
    GenerationRequest,
    ImageBatcher,
    Sampling,
    VLLMEngine,
    batch_key,
)
from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset

QUESTION = "Describe this image."


@pytest.fixture(scope="module")
def chat():
    torch.set_num_threads(1)
    return load_chat(DEFAULT_CFG, reuse_kv_cache=False)


@pytest.fixture(scope="module")
def scenes():
    dataset = SyntheticShapesDataset(lambda image: image, seed=11)
    return [dataset.scene(i)[1] for i in range(6)]


def conversation(chat, image, question=QUESTION):
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(question, conv)
    return conv, img_list


def count_generate_calls(chat, monkeypatch) -> list[int]:
    rows: list[int] = []
    generate = chat.model.llama_model.generate

    def counted(**kwargs):
        rows.append(kwargs["inputs_embeds"].shape[0])
        time.sleep(0.3)  # hold the batch a moment, so the other threads' requests queue behind it
        return generate(**kwargs)

    monkeypatch.setattr(chat.model.llama_model, "generate", counted)
    return rows


def test_concurrent_answers_share_batches_and_equal_one_at_a_time(chat, scenes, monkeypatch):
    alone = [chat.reply(*conversation(chat, image), max_new_tokens=40) for image in scenes]
    rows = count_generate_calls(chat, monkeypatch)
    with ThreadPoolExecutor(len(scenes)) as pool:
        together = list(pool.map(lambda image: chat.reply(*conversation(chat, image), max_new_tokens=40), scenes))
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.result.token_ids for r in together] == [r.result.token_ids for r in alone]
    assert sum(rows) == len(scenes) and max(rows) > 1 and len(rows) < len(scenes), rows


def test_streams_in_one_batch(chat, scenes, monkeypatch):
    alone = [chat.reply(*conversation(chat, image), max_new_tokens=40).text for image in scenes[:4]]
    rows = count_generate_calls(chat, monkeypatch)

    def stream(image):
        return [reply.text for reply in chat.stream_reply(*conversation(chat, image), max_new_tokens=40)]

    with ThreadPoolExecutor(4) as pool:
        streamed = list(pool.map(stream, scenes[:4]))
    assert [pieces[-1] for pieces in streamed] == alone
    assert all(len(pieces) > 2 and all(b.startswith(a) for a, b in zip(pieces, pieces[1:])) for pieces in streamed)
    assert max(rows) > 1, rows


def test_stop_strings_and_the_length_limit(chat, scenes):
    whole = chat.reply(*conversation(chat, scenes[1]), max_new_tokens=40)
    word = whole.text.split()[1]  # a colour
    cut = chat.reply(*conversation(chat, scenes[1]), max_new_tokens=40, stop=(word,))
    assert cut.text == whole.text.split(word)[0].strip() and cut.result.finish_reason == "stop"
    assert cut.result.completion_tokens < whole.result.completion_tokens
    short = chat.reply(*conversation(chat, scenes[1]), max_new_tokens=2)
    assert short.result.finish_reason == "length" and short.result.completion_tokens == 2


def test_a_seed_makes_sampling_repeatable(chat, scenes):
    def sample(seed):
        return chat.reply(*conversation(chat, scenes[2]), max_new_tokens=12, do_sample=True, temperature=1.5, top_p=1.0, seed=seed).text

    with ThreadPoolExecutor(3) as pool:
        first, second, third = pool.map(sample, [7, 7, 7])
    assert first == second == third


def test_a_greedy_request_ignores_its_seed_so_a_bad_one_cannot_fail_the_batch_it_shares(chat, scenes, monkeypatch):
    rows = count_generate_calls(chat, monkeypatch)
    seeds = [None, 2**70, None]  # torch.manual_seed refuses 2**70
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda i: chat.reply(*conversation(chat, scenes[i]), max_new_tokens=12, seed=seeds[i]).text, range(3)))
    assert max(rows) > 1  # they did share a batch
    assert replies == [chat.reply(*conversation(chat, scenes[i]), max_new_tokens=12).text for i in range(3)]


def test_which_requests_may_share_a_batch():
    emb = torch.zeros(1, 3, 4)

    def key(sampling, seed=None, **options):
        return batch_key(GenerationRequest(emb, sampling, seed=seed, options=options))

    greedy = Sampling(40)
    assert key(greedy) == key(Sampling(40, temperature=0.3), seed=5)  # greedy: temperature and seed do not matter
    assert key(greedy) == key(Sampling(10))  # each row has its own length limit
    assert key(Sampling(40, True, 0.7, 0.9)) != key(Sampling(40, True, 1.0, 0.9))
    assert key(Sampling(40, True), seed=1) is None  # a seed is honoured alone
    assert key(greedy, num_beams=2) is None and key(greedy, logits_processor=[object()]) is None
    assert key(greedy, repetition_penalty=1.0, suppress_tokens=[1, 2]) is not None


def test_the_image_batcher_encodes_concurrent_calls_together():
    calls = []

    def encode(images):
        calls.append(len(images))
        time.sleep(0.2)
        return torch.tensor(images, dtype=torch.float32)[:, None, None]

    batcher = ImageBatcher(encode)
    with ThreadPoolExecutor(6) as pool:
        out = list(pool.map(lambda i: batcher([i, i + 100]), range(6)))
    assert [o[:, 0, 0].tolist() for o in out] == [[i, i + 100] for i in range(6)]
    assert sum(calls) == 12 and len(calls) < 6


@pytest.mark.parametrize(
    "address, public",
    [("93.184.216.34", True), ("2606:2800:220:1::1", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
     ("169.254.169.254", False), ("::1", False), ("fe80::1%eth0", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False),
     ("100.64.0.1", False), ("224.0.0.1", False), ("fd00::1", False),
     # IPv6 that carries IPv4: NAT64 and 6to4 are as public as the IPv4 inside; Teredo and local NAT64 never.
     ("64:ff9b::a00:1", False), ("64:ff9b::5db8:d822", True), ("2002:a00:1::1", False), ("2002:5db8:d822::1", True),
     ("64:ff9b:1::5db8:d822", False), ("2001:0:5db8:d822::1", False)],
)
def test_only_global_addresses_are_fetched(address, public):
    assert is_public(address) is public


# ---- the vllm engine's HTTP side, against a stand-in -------------------------------------------------
class StandIn(BaseHTTPRequestHandler):
    """Answers like vLLM's /v1/completions (a fixed reply), or fails as told by ``server.fail``."""

    def log_message(self, *args):
        pass

    def _json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"data": [{"id": "served-llm", "root": self.server.root}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.payloads.append(payload)
        if self.server.fail:
            return self._json(500, {"error": {"message": "CUDA out of memory"}})
        if not payload["stream"]:
            return self._json(200, {"choices": [{"text": "ab", "token_ids": [5, 6, 2], "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in ({"choices": [{"text": "a", "token_ids": [5]}]}, {"choices": [{"text": "b", "token_ids": [6, 2], "finish_reason": "length"}]},
                      {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}):
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), StandIn)
    server.payloads, server.fail, server.root = [], False, "/models/served-llm"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def test_vllm_engine_sends_prompt_embeds_and_reads_token_ids(stand_in):
    engine = VLLMEngine(f"http://127.0.0.1:{stand_in.server_address[1]}/v1", stop=["###"])
    embeds = torch.randn(1, 7, 4)
    request = GenerationRequest(embeds, Sampling(40), stop=("circle",), seed=3, options={"num_beams": 1, "repetition_penalty": 1.0, "min_length": 1})
    result = engine.generate(request)
    assert (result.token_ids, result.prompt_tokens, result.completion_tokens, result.finish_reason) == ([5, 6, 2], 7, 3, "stop")
    payload = stand_in.payloads[-1]
    sent = torch.load(io.BytesIO(base64.b64decode(payload["prompt_embeds"])), weights_only=True)
    assert torch.equal(sent, embeds[0])
    assert payload["model"] == "served-llm" and payload["temperature"] == 0.0 and payload["max_tokens"] == 40
    assert payload["stop"] == ["###", "circle"] and payload["seed"] == 3 and payload["min_tokens"] == 1 and payload["return_token_ids"]
    assert "top_k" not in payload  # greedy
    chunks = list(engine.stream(request))
    assert [c.token_ids for c in chunks[:-1]] == [[5], [6, 2]] and chunks[-1].result.finish_reason == "length"
    # Sampling: generate's top-k (50 unless told; vLLM's own default is none), the request's if it has one.
    for options, top_k in (({}, 50), ({"top_k": 0}, 0), ({"top_k": 7}, 7)):
        engine.generate(GenerationRequest(embeds, Sampling(4, do_sample=True, temperature=0.8, top_p=0.9), options=options))
        sent = stand_in.payloads[-1]
        assert (sent["top_k"], sent["temperature"], sent["top_p"]) == (top_k, 0.8, 0.9), options
    own = VLLMEngine(f"http://127.0.0.1:{stand_in.server_address[1]}", top_k=20)  # the LLM's generation config says 20
    own.generate(GenerationRequest(embeds, Sampling(4, do_sample=True)))
    assert stand_in.payloads[-1]["top_k"] == 20
    with pytest.raises(EngineRequestError, match="beam search"):
        engine.generate(GenerationRequest(embeds, Sampling(4), options={"num_beams": 3}))
    with pytest.raises(EngineRequestError, match="cannot apply the generate option 'logits_processor'"):
        engine.generate(GenerationRequest(embeds, Sampling(4), options={"logits_processor": [object()]}))


def test_vllm_engine_says_when_the_server_is_down_and_recovers(stand_in):
    engine = VLLMEngine(f"http://127.0.0.1:{free_port()}")
    request = GenerationRequest(torch.randn(1, 3, 4), Sampling(4))
    with pytest.raises(EngineUnavailable, match=r"cannot be reached \(ConnectError.*is it running\?"):
        engine.generate(request)
    engine.url = f"http://127.0.0.1:{stand_in.server_address[1]}"  # the same engine, a server that is up
    stand_in.fail = True
    with pytest.raises(EngineUnavailable, match="answered 500: CUDA out of memory"):
        engine.generate(request)
    with pytest.raises(EngineUnavailable, match="answered 500"):
        list(engine.stream(request))
    stand_in.fail = False
    assert engine.generate(request).token_ids == [5, 6, 2]


def test_vllm_engine_refuses_a_server_that_runs_the_llm_without_the_models_lora(stand_in, tmp_path, caplog):
    from minigpt4.models.llm import LORA_MARKER

    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    request = GenerationRequest(torch.randn(1, 3, 4), Sampling(4))
    stand_in.root = str(tmp_path)  # the plain LLM folder: no marker
    with pytest.raises(EngineMismatch, match=r"serves '.*', not this model's LLM with its LoRA merged \(no minigpt4_lora.json there\).*--llm-out"):
        VLLMEngine(url, lora_fingerprint="0123abcd").generate(request)
    (tmp_path / LORA_MARKER).write_text(json.dumps({"lora_fingerprint": "ffff0000"}))
    with pytest.raises(EngineMismatch, match="it holds other adapters"):
        VLLMEngine(url, lora_fingerprint="0123abcd").generate(request)
    (tmp_path / LORA_MARKER).write_text(json.dumps({"lora_fingerprint": "0123abcd"}))
    assert VLLMEngine(url, lora_fingerprint="0123abcd").generate(request).token_ids == [5, 6, 2]
    # A model without LoRA takes any folder; a folder this machine cannot see gets a warning.
    (tmp_path / LORA_MARKER).unlink()
    assert VLLMEngine(url).generate(request).token_ids == [5, 6, 2]
    stand_in.root = "/on/another/machine/llm"
    with caplog.at_level("WARNING", logger="minigpt4.conversation.engines"):
        assert VLLMEngine(url, lora_fingerprint="0123abcd").generate(request).token_ids == [5, 6, 2]
    assert "a folder this machine cannot read" in caplog.text
