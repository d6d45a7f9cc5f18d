"""The hf engine with ``decode="static"``: Chat's answers written by the static decode loop.

What a user of ``Chat(decode="static")`` (or ``serve --decode static``) meets: the same replies as
``generate`` under greedy decoding, streamed, cut at the request's own stop strings, seeded samples
that repeat, a caller's batch decoded side by side by the loop (left-padded when its contexts'
lengths differ; concurrent requests batched by the queue go to ``generate``), and a clear refusal of a setting the loop does not have.
"""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minigpt4.conversation import CONV_VISION_LLama2, CONV_VISION_Vicuna0, Chat
from minigpt4.conversation import decode as decode_module
from minigpt4.conversation.engines import EngineRequestError, HFEngine
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(do_sample=False, max_new_tokens=40)


TEMPLATES = {"vicuna0": CONV_VISION_Vicuna0, "llama2": CONV_VISION_LLama2}


def chat_pair(tiny_models, variant: str) -> tuple[Chat, Chat]:
    model = tiny_models[variant]
    processor = Blip2ImageEvalProcessor(224)
    plain = Chat(model, processor, "cpu", TEMPLATES[variant], reuse_kv_cache=False)
    static = Chat(model, processor, "cpu", TEMPLATES[variant], decode="static")
    assert static.engine.decode == "static" and not static.engine.reuses_kv_cache and static.engine.compile is None
    return plain, static


@pytest.fixture(scope="module", params=["vicuna0", "llama2"])
def chats(tiny_models, request):
    """The tiny Vicuna writes "###" after a few tokens; the tiny Llama-2 chat runs to the limit."""
    return chat_pair(tiny_models, request.param)


@pytest.fixture(scope="module")
def long_chats(tiny_models):
    return chat_pair(tiny_models, "llama2")


def conversation(chat: Chat, image, question: str):
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(question, conv)
    return conv, img_list


def test_greedy_replies_are_generates_over_two_turns(chats, tiny_images):
    plain, static = chats
    for image in tiny_images:
        a, b = conversation(plain, image, "What is in the picture?"), conversation(static, image, "What is in the picture?")
        previous = None
        for question in ("And what colour is it?", None):
            expected, got = plain.reply(*a, **GREEDY), static.reply(*b, **GREEDY)
            assert got.result.token_ids == expected.result.token_ids and got.text == expected.text
            assert got.result.finish_reason == expected.result.finish_reason
            assert got.result.completion_tokens == len(got.result.token_ids) and got.result.prompt_tokens == expected.result.prompt_tokens
            assert b[0].kv_cache is None  # the loop's cache is its own: nothing kept on the conversation
            if previous is not None:  # the second turn starts from what the first left in the loop's cache
                assert decode_module._buffers[static.model.llama_model].reused >= previous.prompt_tokens
            previous = got.result
            if question:
                plain.ask(question, a[0])
                static.ask(question, b[0])


def test_every_answer_decodes_on_the_same_thread(long_chats, tiny_images, monkeypatch):
    # CUDA graphs captured by torch.compile belong to the thread that captured them.
    from minigpt4.conversation import engines

    _, static = long_chats
    threads, original = [], engines.stream_decode_rows

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(engines, "stream_decode_rows", recording)
    for image in tiny_images:
        static.reply(*conversation(static, image, "What is in the picture?"), **GREEDY)
        time.sleep(0.2)  # the queue's worker thread ends when the queue is empty
    assert len(threads) == 3 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


def test_a_reply_cut_by_max_new_tokens_ends_by_length(chats, tiny_images):
    plain, static = chats
    expected = plain.reply(*conversation(plain, tiny_images[0], "Describe it."), do_sample=False, max_new_tokens=3)
    got = static.reply(*conversation(static, tiny_images[0], "Describe it."), do_sample=False, max_new_tokens=3)
    assert got.result.token_ids == expected.result.token_ids and len(got.result.token_ids) <= 3
    assert got.result.finish_reason == expected.result.finish_reason


def test_streaming_shows_what_generate_shows(long_chats, tiny_images):
    plain, static = long_chats
    whole = static.reply(*conversation(static, tiny_images[1], "What is in the picture?"), **GREEDY)
    parts = list(static.stream_reply(*conversation(static, tiny_images[1], "What is in the picture?"), **GREEDY))
    assert parts[-1].text == whole.text and parts[-1].result.token_ids == whole.result.token_ids
    assert all(p.result is None for p in parts[:-1]) and len(parts) > 5
    # token by token, as generate's streamer hands them on: the same partial replies in the same order
    expected = list(plain.stream_reply(*conversation(plain, tiny_images[1], "What is in the picture?"), **GREEDY))
    assert [p.text for p in parts] == [p.text for p in expected]


def test_the_requests_own_stop_string_cuts_where_generate_cuts(long_chats, tiny_images):
    plain, static = long_chats
    free = plain.reply(*conversation(plain, tiny_images[2], "What is in the picture?"), **GREEDY)
    word = re.search(r"[a-z]{4,}", free.text[4:])
    assert word, free.text
    stop = (word.group(),)  # a word from inside the reply
    expected = plain.reply(*conversation(plain, tiny_images[2], "What is in the picture?"), stop=stop, **GREEDY)
    got = static.reply(*conversation(static, tiny_images[2], "What is in the picture?"), stop=stop, **GREEDY)
    assert got.result.token_ids == expected.result.token_ids and got.text == expected.text
    assert got.result.finish_reason == expected.result.finish_reason == "stop"
    assert len(got.result.token_ids) < len(free.result.token_ids)


def test_seeded_sampling_repeats(long_chats, tiny_images):
    _, static = long_chats
    settings = dict(do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=24)
    first = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), seed=7, **settings)
    torch.manual_seed(99)  # the seed alone decides
    again = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), seed=7, **settings)
    assert again.result.token_ids == first.result.token_ids
    greedy = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), **GREEDY)
    assert first.result.token_ids != greedy.result.token_ids[:24]  # it sampled


def test_a_setting_the_loop_does_not_have_is_refused_by_name_and_the_engine_goes_on(long_chats, tiny_images):
    plain, static = long_chats
    with pytest.raises(EngineRequestError, match=r"repetition_penalty=1\.3: the static decode loop"):
        static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), repetition_penalty=1.3, **GREEDY)
    expected = plain.reply(*conversation(plain, tiny_images[0], "What is in the picture?"), **GREEDY)
    assert static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), **GREEDY).text == expected.text


def loop_rows(monkeypatch, hold: float = 0.0) -> list[int]:
    """The number of rows of each call of the static loop, from now on; each call first waits
    ``hold`` seconds (so that other threads' requests queue behind it)."""
    from minigpt4.conversation import engines

    calls, original = [], engines.stream_decode_rows

    def recording(llm, inputs_embeds, *args, **kwargs):
        calls.append(inputs_embeds.shape[0])
        time.sleep(hold)
        return original(llm, inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(engines, "stream_decode_rows", recording)
    return calls


def test_a_callers_batch_runs_in_the_loop_of_one_length_or_left_padded(chats, tiny_images, monkeypatch):
    plain, static = chats
    calls = loop_rows(monkeypatch)
    one = "What is in the picture?"  # one question: the contexts are of one length (answer_batch's captions)
    assert static.answer_batch(tiny_images, one, **GREEDY) == plain.answer_batch(tiny_images, one, **GREEDY)
    several = ["What is in the picture?", "Describe it.", "What colour is the square on the left?"]
    assert static.answer_batch(tiny_images, several, **GREEDY) == plain.answer_batch(tiny_images, several, **GREEDY)
    assert calls == [3, 3]


def test_concurrent_requests_the_queue_batches_together_go_to_generate(long_chats, tiny_images, monkeypatch):
    # Their number changes with the load: each number of rows would be a compiled graph of its own.
    plain, static = long_chats
    question = "What is in the picture?"
    alone = [plain.reply(*conversation(plain, image, question), **GREEDY) for image in tiny_images]
    calls = loop_rows(monkeypatch, hold=0.5)
    batched, generate = [], static.model.llama_model.generate

    def counted(**kwargs):
        batched.append(kwargs["inputs_embeds"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(static.model.llama_model, "generate", counted)
    with ThreadPoolExecutor(len(tiny_images)) as pool:
        together = list(pool.map(lambda image: static.reply(*conversation(static, image, question), **GREEDY), tiny_images))
    assert [r.result.token_ids for r in together] == [r.result.token_ids for r in alone]
    assert set(calls) <= {1} and batched and max(batched) > 1, (calls, batched)  # the loop: requests alone only
    assert sum(calls) + sum(batched) == len(tiny_images)


def test_rows_of_a_batch_keep_their_own_limits_and_stop_strings(long_chats, tiny_images, monkeypatch):
    # Requests with different max_new_tokens and stop strings share a greedy batch: each row ends
    # as it ends with generate (the same tokens, the same finish reason).
    plain, static = long_chats
    free = plain.reply(*conversation(plain, tiny_images[2], "What is in the picture?"), **GREEDY)
    word = re.search(r"[a-z]{4,}", free.text[4:])
    assert word, free.text

    def requests(chat: Chat) -> list:
        out = []
        for image, limit, stop in zip(tiny_images, (40, 7, 40), ((), (), (word.group(),))):
            conv, img_list = conversation(chat, image, "What is in the picture?")
            conv.append_message(conv.roles[1], None)
            context = chat.get_context_emb(conv.get_prompt(), img_list)
            generation = chat.generation_kwargs(do_sample=False, max_new_tokens=limit)
            out.append(chat.engine_request({**generation, "inputs_embeds": context}, stop=stop))
        return out

    calls = loop_rows(monkeypatch)
    expected, got = plain.engine.generate_many(requests(plain)), static.engine.generate_many(requests(static))
    assert calls == [3]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in expected] == ["length", "length", "stop"]
    assert len(got[1].token_ids) == 7 and len(got[2].token_ids) < len(got[0].token_ids) == 40


def test_a_batch_ends_when_its_rows_have_ended_on_either_side(long_chats, tiny_images, monkeypatch):
    # Row 0 ends by its own limit (the engine's side) and writes on on the device; row 1 stops on
    # the device (at an "EOS" of this test: a token it writes early and row 0 never writes). The
    # loop must stop at the next host read, not at the longest limit.
    from minigpt4.conversation import engines
    from minigpt4.conversation.stopping import StopCriteria

    plain, static = long_chats
    model, images = static.model, [tiny_images[0], tiny_images[2]]

    def requests(chat: Chat, limits) -> list:
        out = []
        for image, limit in zip(images, limits):
            conv, img_list = conversation(chat, image, "What is in the picture?")
            conv.append_message(conv.roles[1], None)
            context = chat.get_context_emb(conv.get_prompt(), img_list)
            out.append(chat.engine_request({**chat.generation_kwargs(do_sample=False, max_new_tokens=limit), "inputs_embeds": context}))
        return out

    free = [r.token_ids for r in plain.engine.generate_many(requests(plain, (200, 200)))]
    stop_token = next(t for t in free[1][1:8] if t not in free[0])
    stop = StopCriteria(model.llama_tokenizer, None, [stop_token])
    reads, original = [], engines.stream_decode_rows

    def counted(*args, **kwargs):
        for chunks in original(*args, **kwargs):
            reads.append([len(chunk) for chunk in chunks])
            yield chunks

    monkeypatch.setattr(engines, "stream_decode_rows", counted)
    generate_engine, loop_engine = HFEngine(model, stop), HFEngine(model, stop, decode="static")
    try:
        expected = generate_engine.generate_many(requests(plain, (2, 200)))
        got = loop_engine.generate_many(requests(static, (2, 200)))
    finally:
        generate_engine.close(), loop_engine.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert [r.finish_reason for r in got] == ["length", "stop"]
    stopped = len(got[1].token_ids)
    # The first read, then 8 steps a read until row 1's stop, then the read that shows it ended.
    assert len(reads) <= 1 + -(-(stopped - 1) // 8) + 1, reads


def test_sampling_takes_generates_top_k_and_a_callers(long_chats, tiny_images):
    # generate samples with top_k=50 unless told otherwise; the loop takes the same, and a request's top_k.
    _, static = long_chats
    settings = dict(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=8)
    greedy = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), **{**settings, "do_sample": False})
    narrowed = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), seed=3, top_k=1, **settings)
    assert narrowed.result.token_ids == greedy.result.token_ids  # top-1 sampling is greedy
    with pytest.raises(EngineRequestError, match=r"top_k=-2: the static decode loop"):
        static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), top_k=-2, **settings)


def test_wrong_settings_say_what_is_wrong(tiny_models):
    model = tiny_models["vicuna0"]
    chat = Chat(model, Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    with pytest.raises(ValueError, match="decode: expected one of generate, static, got 'graph'"):
        HFEngine(model, chat.stop, decode="graph")
    with pytest.raises(ValueError, match="steps_per_sync: must be at least 1, got 0"):
        HFEngine(model, chat.stop, decode="static", steps_per_sync=0)
    with pytest.raises(ValueError, match="decode='static': it sets up the engine Chat builds"):
        Chat(model, Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0, engine=chat.engine, decode="static")


@pytest.mark.gpu
def test_on_a_gpu_the_step_is_a_cuda_graph_and_the_replies_are_generates(tiny_models, tiny_images):
    import copy

    model = copy.deepcopy(tiny_models["llama2"]).cuda()
    processor = Blip2ImageEvalProcessor(224)
    plain = Chat(model, processor, "cuda", CONV_VISION_LLama2, reuse_kv_cache=False)
    static = Chat(model, processor, "cuda", CONV_VISION_LLama2, decode="static")
    for image in tiny_images:  # the first compiles and captures; the rest replay in the same bucket
        expected = plain.reply(*conversation(plain, image, "What is in the picture?"), **GREEDY)
        got = static.reply(*conversation(static, image, "What is in the picture?"), **GREEDY)
        assert got.result.token_ids == expected.result.token_ids and got.text == expected.text
    for _ in range(2):  # a batch of captions: its own graphs, captured, then replayed
        one = "What is in the picture?"
        assert static.answer_batch(tiny_images, one, **GREEDY) == plain.answer_batch(tiny_images, one, **GREEDY)


def test_min_new_tokens_keeps_an_eos_from_the_first_token_as_generate_does(tiny_models, tiny_images):
    import copy

    model = copy.deepcopy(tiny_models["llama2"])
    plain, _ = chat_pair({"llama2": model}, "llama2")
    first = plain.reply(*conversation(plain, tiny_images[0], "What is in the picture?"), **GREEDY).result.token_ids[0]
    model.llama_model.generation_config.eos_token_id = [first]  # the model's first word is now its EOS
    plain, static = chat_pair({"llama2": model}, "llama2")
    for settings in ({}, {"min_new_tokens": 1}):
        expected = plain.reply(*conversation(plain, tiny_images[0], "What is in the picture?"), **GREEDY, **settings)
        got = static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), **GREEDY, **settings)
        assert got.result.token_ids == expected.result.token_ids and got.result.finish_reason == expected.result.finish_reason
        if settings:
            assert got.result.token_ids[0] != first and len(got.result.token_ids) > 1
        else:
            assert got.result.token_ids == [first] and got.result.finish_reason == "stop"
    with pytest.raises(EngineRequestError, match=r"min_new_tokens=2: the static decode loop"):
        static.reply(*conversation(static, tiny_images[0], "What is in the picture?"), **GREEDY, min_new_tokens=2)
