"""The static-cache decode loop: the tokens of ``generate``, its stops on the device, its streaming."""
from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
from transformers import StoppingCriteriaList

from conftest import first_stop, text_of
from minigpt4.conversation import CONV_VISION_Vicuna0, Chat, StopCriteria
from minigpt4.conversation import decode as decode_module
from minigpt4.conversation.decode import cache_length, decode, decode_rows, record, stream_decode, stream_decode_rows
from minigpt4.conversation.engines import left_pad
from minigpt4.conversation.stopping import NO_TOKEN
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

N = 48  # new tokens: six chunks of 8 after the first token


def context(chat: Chat, image, question: str) -> torch.Tensor:
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(question, conv)
    conv.append_message(conv.roles[1], None)
    return chat.get_context_emb(conv.get_prompt(), img_list)


def generate(llm, embeds: torch.Tensor, max_new_tokens: int, stop: StopCriteria | None = None) -> list[int]:
    eos_ids = stop.eos.tolist() if stop is not None else []
    with torch.no_grad():
        out = llm.generate(
            inputs_embeds=embeds, max_new_tokens=max_new_tokens, do_sample=False,
            stopping_criteria=StoppingCriteriaList([stop] if stop is not None else []), eos_token_id=eos_ids or None,
        )
    return out[0].tolist()


def first_new_at(ids: list[int], start: int) -> int:
    """The first index >= ``start`` whose token does not occur before it."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i])


@pytest.fixture(scope="module")
def tiny(tiny_models, tiny_images):
    """The reference's tiny Vicuna chat: its LLM, a context with an image, Vicuna's stop sequences."""
    model = tiny_models["vicuna0"]
    chat = Chat(model, Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    tokenizer = model.llama_tokenizer
    embeds = context(chat, tiny_images[0], "What is in the picture?")
    free = generate(model.llama_model, embeds, N)
    assert len(free) == N
    return model.llama_model, embeds, tokenizer, free


def stops(tokenizer, text: str | None = "###", eos_ids=None) -> StopCriteria:
    return StopCriteria(tokenizer, text, [tokenizer.eos_token_id] if eos_ids is None else eos_ids)


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_greedy_equals_generate_over_48_tokens(tiny, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    eos = stops(tokenizer, None)
    ids = decode(llm, embeds, N, eos, steps_per_sync=steps_per_sync)
    assert ids == generate(llm, embeds, N, eos) == free and len(ids) == N


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_vicuna_stop_text_ends_the_reply_at_its_hashes(tiny, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    vicuna = stops(tokenizer, CONV_VISION_Vicuna0.stop_str)
    expected = free[: first_stop(tokenizer, free, "###", [tokenizer.eos_token_id])]
    assert len(expected) < N  # the tiny model writes "###" early, as a chat model does
    ids = decode(llm, embeds, N, vicuna, steps_per_sync=steps_per_sync)
    assert ids == generate(llm, embeds, N, vicuna) == expected


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_multi_token_stop_mid_chunk_ends_the_reply_without_leaking(tiny, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    # The text of three tokens the model writes, the last new at index 12 or later: inside the
    # third chunk of 8 or after.
    end = first_new_at(free, 12)
    text = text_of(tokenizer, free[end - 2 : end + 1])
    stop = stops(tokenizer, text)
    length = first_stop(tokenizer, free, text)
    assert 12 < length <= end + 1 and length % 8 != 1  # not on a chunk's first token
    chunks: list[list[int]] = []
    ids = decode(llm, embeds, N, stop, steps_per_sync=steps_per_sync, on_tokens=chunks.append)
    assert ids == generate(llm, embeds, N, stop) == free[:length]
    assert list(itertools.chain(*chunks)) == ids


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_eos_mid_chunk_ends_the_reply(tiny, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    end = first_new_at(free, 20)
    assert (end + 1) % 8 != 1
    eos = stops(tokenizer, None, [free[end]])
    ids = decode(llm, embeds, N, eos, steps_per_sync=steps_per_sync)
    assert ids == generate(llm, embeds, N, eos) == free[: end + 1]


def test_chunks_stream_the_first_token_then_steps_per_sync(tiny):
    llm, embeds, _, free = tiny
    chunks: list[list[int]] = []
    assert decode(llm, embeds, 20, steps_per_sync=8, on_tokens=chunks.append) == free[:20]
    assert [len(c) for c in chunks] == [1, 8, 8, 3]


def test_one_new_token_is_the_prefill_token(tiny):
    llm, embeds, _, free = tiny
    assert decode(llm, embeds, 1) == free[:1]


def test_device_stop_check_agrees_with_the_oracle(tiny):
    # Random streams of "#" pieces and words, as the rows of one batch: the step's in-place check (a
    # window of each row's last tokens through StopStringCriteria) stops each row where its text
    # first holds "###", as cut() does, and a stopped row stops counting while the others go on.
    _, _, tokenizer, _ = tiny
    stop = stops(tokenizer)
    alphabet = [i for i in range(len(tokenizer)) if "#" in text_of(tokenizer, [i])] + tokenizer("The red square", add_special_tokens=False).input_ids
    rng = random.Random(0)
    streams = [[rng.choice(alphabet) for _ in range(12)] for _ in range(300)]
    rows = len(streams)
    tokens, written = torch.zeros(rows, 12, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    count, done = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.bool)
    window = torch.full((rows, stop.window), NO_TOKEN, dtype=torch.long)
    for step in zip(*streams):
        record(torch.tensor(step), tokens, written, count, done, window, stop)
    assert tokens.tolist() == streams
    stopped = 0
    for stream, counted, ended in zip(streams, count.tolist(), done.tolist()):
        first = first_stop(tokenizer, stream, "###", [tokenizer.eos_token_id])
        assert counted == len(stop.cut(stream)) == (first or len(stream)), stream
        assert ended == (first is not None)
        stopped += first is not None and first < len(stream)
    assert 30 < stopped < rows - 30  # rows that stop early and rows that do not, side by side


def test_cache_is_bucketed_and_kept_between_answers(tiny):
    llm, embeds, _, free = tiny
    assert cache_length(1) == cache_length(64) == 64 and cache_length(65) == 128 and cache_length(129) == cache_length(256) == 256
    assert cache_length(1000) == 1024
    decode(llm, embeds, 8)
    held = decode_module._buffers[llm]
    assert held.length == cache_length(embeds.shape[1] + 8) and held.length >= 64 and held.length & (held.length - 1) == 0
    # A shorter prompt in the same bucket reuses the cache (its graph, on a GPU) and still decodes right.
    shorter = embeds[:, 1:]
    assert decode(llm, shorter, 9) == generate(llm, shorter, 9)
    assert decode_module._buffers[llm] is held


def follow_up(llm, context: torch.Tensor, reply: list[int], tokenizer, question: str = " ###Human: And then?") -> torch.Tensor:
    """The next turn's context: this one, the reply's tokens and a question, as embeddings."""
    ids = torch.tensor(reply + tokenizer(question, add_special_tokens=False).input_ids)
    with torch.no_grad():
        return torch.cat([context, llm.get_input_embeddings()(ids).unsqueeze(0)], dim=1)


def test_a_follow_up_prefills_only_what_it_adds(tiny):
    llm, embeds, tokenizer, free = tiny
    first = decode(llm, embeds, 20)
    assert first == free[:20]
    second = follow_up(llm, embeds, first, tokenizer)
    # The cache holds the context and the 19 tokens fed back; the 20th and the question are new.
    assert decode(llm, second, 20) == generate(llm, second, 20)
    assert decode_module._buffers[llm].reused == embeds.shape[1] + 19
    # A third turn outgrows the bucket: the conversation so far is copied into the larger cache.
    third = follow_up(llm, second, generate(llm, second, 40), tokenizer)
    assert cache_length(third.shape[1] + 40) > decode_module._buffers[llm].length
    assert decode(llm, third, 40) == generate(llm, third, 40)
    assert decode_module._buffers[llm].reused == second.shape[1] + 19  # the second answer's context and 19 of its 20 tokens


def test_another_context_reuses_only_what_it_shares(tiny, tiny_models, tiny_images):
    llm, embeds, tokenizer, free = tiny
    decode(llm, embeds, 8)
    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    other = context(chat, tiny_images[2], "What is in the picture?")  # another image: the system prompt is shared
    shared = int((other[0, : embeds.shape[1]] == embeds[0, : other.shape[1]]).all(-1).long().cumprod(0).sum())
    assert 0 < shared < embeds.shape[1]
    assert decode(llm, other, N) == generate(llm, other, N)
    assert decode_module._buffers[llm].reused == shared


def test_forget_cuts_what_the_next_call_may_reuse(tiny):
    llm, embeds, tokenizer, free = tiny
    first = decode(llm, embeds, 12)
    second = follow_up(llm, embeds, first, tokenizer)
    decode_module.forget(llm, after=embeds.shape[1] + 4)
    assert decode(llm, second, 8) == generate(llm, second, 8)
    assert decode_module._buffers[llm].reused == embeds.shape[1] + 4
    decode_module.forget(llm)
    assert decode(llm, second, 8) == generate(llm, second, 8)
    assert decode_module._buffers[llm].reused == 0


def test_a_reply_left_early_is_reused_as_far_as_it_was_read(tiny):
    llm, embeds, tokenizer, free = tiny
    chunks = stream_decode(llm, embeds, N, steps_per_sync=8)
    read = next(chunks) + next(chunks)  # the first token, then eight: nine steps' keys are in the cache
    chunks.close()
    assert read == free[:9]
    second = follow_up(llm, embeds, read, tokenizer)
    assert decode(llm, second, 16) == generate(llm, second, 16)
    assert decode_module._buffers[llm].reused == embeds.shape[1] + 8


def sample(llm, embeds, seed: int, steps_per_sync: int = 8, **kwargs) -> list[int]:
    settings = dict(temperature=1.5, top_p=0.95) | kwargs
    generator = torch.Generator().manual_seed(seed)
    return decode(llm, embeds, 32, do_sample=True, generator=generator, steps_per_sync=steps_per_sync, **settings)


def test_seeded_sampling_is_reproducible_whatever_steps_per_sync(tiny):
    llm, embeds, _, free = tiny
    first = sample(llm, embeds, seed=0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert sample(llm, embeds, seed=0) == first
    assert sample(llm, embeds, seed=0, steps_per_sync=1) == first
    assert sample(llm, embeds, seed=1) != first  # the draws come from the generator
    assert first != free[:32]  # it sampled


def test_top_p_and_temperature_narrow_sampling_to_greedy(tiny):
    llm, embeds, _, free = tiny
    assert sample(llm, embeds, seed=0, top_p=1e-6) == free[:32]  # only the likeliest token is left
    assert sample(llm, embeds, seed=0, temperature=1e-4, top_p=1.0) == free[:32]


@pytest.mark.parametrize("top_k", [0, 5, 50])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_keeps_the_tokens_generates_filters_keep(top_k, top_p):
    """temperature, then top-k, then top-p: the tokens a draw can give are those transformers'
    warpers leave, in generate's order. Token t is drawable iff a near-zero noise on t alone makes
    the draw pick it (its probability is then not zero)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    vocab, temperature = 400, 0.7
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(top_k)) * 3
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    kept = set(torch.isfinite(scores[0]).nonzero().flatten().tolist())
    noise = torch.ones(vocab, vocab)
    noise.fill_diagonal_(1e-30)
    picked = decode_module.pick(logits.expand(vocab, vocab), noise, torch.tensor(temperature), torch.tensor(top_p), top_k)
    assert {t for t in range(vocab) if picked[t] == t} == kept
    assert len(kept) <= (top_k or vocab)


def test_sampling_uses_generates_top_k_unless_told(tiny, monkeypatch):
    """generate fills in top_k=50 when it samples (the original's demo sampled so): the loop too,
    or the LLM's own generation config's, or the caller's; 0 turns it off."""
    llm, embeds, _, _ = tiny
    with torch.no_grad():
        order = llm(inputs_embeds=embeds).logits[0, -1].argsort(descending=True).tolist()
    rank = {token: i for i, token in enumerate(order)}

    def first_tokens(**settings) -> list[int]:
        generator = torch.Generator().manual_seed(0)
        return [decode(llm, embeds, 1, do_sample=True, temperature=3.0, generator=generator, **settings)[0] for _ in range(48)]

    assert llm.generation_config.top_k is None and decode_module.generate_top_k(llm.generation_config) == 50
    assert max(rank[t] for t in first_tokens()) < 50
    assert max(rank[t] for t in first_tokens(top_k=0)) >= 50  # hot and unfiltered: the tail is drawn
    assert max(rank[t] for t in first_tokens(top_k=3)) < 3
    monkeypatch.setattr(llm.generation_config, "top_k", 2)
    assert max(rank[t] for t in first_tokens()) < 2
    with pytest.raises(ValueError, match="top_k -1: must be 0"):
        decode(llm, embeds, 1, do_sample=True, top_k=-1)


def test_a_reader_closed_after_another_answer_does_not_claim_its_cache(tiny):
    """A reader left open while another answer runs on the same buffers, then closed: the cache
    holds the other answer, and the next call must not reuse it as the first's."""
    llm, embeds, tokenizer, free = tiny
    first = stream_decode(llm, embeds, N)
    read = next(first) + next(first)
    other = embeds.flip(1)  # another context of the same length: the same buffers
    decode(llm, other, 16)
    first.close()
    second = follow_up(llm, embeds, read, tokenizer)
    assert decode(llm, second, 16) == generate(llm, second, 16)
    assert decode_module._buffers[llm].reused == 0  # nothing of `other`'s cache taken for this context


@pytest.mark.slow
def test_the_step_traces_as_one_graph(tiny):
    # fullgraph=True fails on any graph break (a host sync, an unsupported call): what CUDA graph
    # capture needs. The eager backend traces without generating kernels, so this runs on a CPU.
    llm, embeds, tokenizer, free = tiny
    vicuna, eos = stops(tokenizer), stops(tokenizer, None)
    expected = free[: first_stop(tokenizer, free, "###", [tokenizer.eos_token_id])]
    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)
    try:
        assert decode(llm, embeds, N, eos, compile=True) == free
        assert decode(llm, embeds, N, vicuna, compile=True) == expected
        assert decode(llm, embeds, 24, vicuna, do_sample=True, generator=torch.Generator().manual_seed(0), compile=True)
    finally:
        decode_module._compiled.clear()


def left_padded(llm, tokenizer, contexts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L, H) contexts left-padded to one batch with the pad token's embedding, as the engine does."""
    with torch.no_grad():
        pad = llm.get_input_embeddings()(torch.tensor(tokenizer.pad_token_id))
    return left_pad([c[0] for c in contexts], pad)


# ---- B contexts side by side (answer_batch's captions) ---------------------------------------------
@pytest.fixture(scope="module")
def rows(tiny, tiny_models, tiny_images):
    """Three images and questions of one length: three contexts, stacked (3, positions, hidden).
    (The tiny model's random vision side hardly tells the images apart; the questions differ.)"""
    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    questions = ["What is on the picture?", "Who is in the picture?", "What was in the picture?"]
    contexts = [context(chat, image, question) for image, question in zip(tiny_images, questions)]
    assert len({c.shape for c in contexts}) == 1
    return torch.cat(contexts)


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_rows_decode_as_generate_writes_each_alone_and_stop_on_their_own(tiny, rows, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    free_rows = [generate(llm, row.unsqueeze(0), N) for row in rows]

    def stops_at(token: int) -> list[int]:
        return [reply.index(token) + 1 if token in reply else N for reply in free_rows]

    # An "EOS" that row 0 writes mid-reply and each row meets at another step (or never).
    eos = next(t for t in free_rows[0][12:] if len(set(stops_at(t))) == 3 and stops_at(t)[0] > 12)
    stop = stops(tokenizer, None, eos_ids=[eos])
    expected = [generate(llm, row.unsqueeze(0), N, stop) for row in rows]
    assert [len(e) for e in expected] == stops_at(eos)
    assert decode_rows(llm, rows, N, stop, steps_per_sync=steps_per_sync) == expected
    # Without a stop each row writes all N tokens; streamed, a row's chunks add up to its reply.
    streamed = [[] for _ in rows]
    for chunks in stream_decode_rows(llm, rows, N, steps_per_sync=steps_per_sync):
        assert len(chunks) == 3
        for row, chunk in zip(streamed, chunks):
            row += chunk
    assert streamed == [generate(llm, row.unsqueeze(0), N) for row in rows]


def test_a_batch_leaves_nothing_for_the_next_turn_and_the_conversation_starts_afresh(tiny, rows):
    llm, embeds, tokenizer, free = tiny
    decode(llm, embeds, 12)
    assert decode_rows(llm, rows, 12)[1] == generate(llm, rows[1:2], 12)
    assert decode_module._buffers[llm].rows == 3 and decode_module._buffers[llm].held is None
    assert decode(llm, embeds, N) == free  # its own cache again, prefilled from the start
    assert decode_module._buffers[llm].reused == 0


def test_seeded_rows_sample_reproducibly_and_each_their_own(tiny, rows):
    llm, embeds, _, free = tiny

    def sampled(seed: int, steps_per_sync: int = 8) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return decode_rows(llm, rows, 24, do_sample=True, temperature=1.5, top_p=0.95, generator=generator, steps_per_sync=steps_per_sync)

    first = sampled(0)
    assert sampled(0, steps_per_sync=1) == first
    assert sampled(1) != first
    assert len({tuple(row) for row in first}) == 3
    greedy = decode_rows(llm, rows, 24, do_sample=True, temperature=1e-4, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert greedy == decode_rows(llm, rows, 24)


def test_rows_trace_as_one_graph(tiny, rows):
    llm, embeds, tokenizer, free = tiny
    vicuna = stops(tokenizer)
    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)
    try:
        eager = decode_rows(llm, rows, N, vicuna)
        # The first batch prefills eagerly (its cache does not exist yet); the second, padded, in the graph.
        assert decode_rows(llm, rows, N, vicuna, compile=True) == eager
        assert decode_rows(llm, rows, N, vicuna, compile=True) == eager
    finally:
        decode_module._compiled.clear()


def test_rows_of_the_wrong_shape_are_refused_by_name(tiny, rows):
    llm, embeds, _, _ = tiny
    with pytest.raises(ValueError, match=r"inputs_embeds: expected \(1, positions, hidden\) for batch 1, got \(3,"):
        decode(llm, rows, 4)
    with pytest.raises(ValueError, match="inputs_embeds: expected"):
        decode_rows(llm, rows[0], 4)


@pytest.fixture(scope="module")
def padded_rows(tiny, tiny_models, tiny_images):
    """Three contexts of three lengths, left-padded to one as the engine pads a batch: (embeds, mask, contexts)."""
    llm, _, tokenizer, _ = tiny
    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    questions = ["What is in the picture?", "Describe it.", "What colour is the square on the left of the picture?"]
    contexts = [context(chat, image, question) for image, question in zip(tiny_images, questions)]
    assert len({c.shape[1] for c in contexts}) == 3
    return (*left_padded(llm, tokenizer, contexts), contexts)


@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_left_padded_rows_write_what_each_writes_alone(tiny, padded_rows, steps_per_sync):
    llm, _, tokenizer, _ = tiny
    embeds, mask, contexts = padded_rows
    for stop in (stops(tokenizer), stops(tokenizer, None)):  # Vicuna's "###" and EOS; EOS alone (all N tokens)
        expected = [generate(llm, c, N, stop) for c in contexts]
        assert decode_rows(llm, embeds, N, stop, steps_per_sync=steps_per_sync, attention_mask=mask) == expected
    assert len({tuple(e) for e in expected}) == 3


def test_left_padded_rows_see_the_logits_each_sees_alone(tiny, padded_rows, monkeypatch):
    # Greedy tokens barely depend on a few positions' offset; the logits do: each row's own
    # positions and the masked padding give, step by step, the logits generate gives it alone.
    llm, _, _, _ = tiny
    embeds, mask, contexts = padded_rows
    seen = []
    pick = decode_module.pick
    monkeypatch.setattr(decode_module, "pick", lambda logits, *rest: seen.append(logits.clone()) or pick(logits, *rest))
    decode_rows(llm, embeds, 12, attention_mask=mask)
    assert len(seen) == 12
    for row, c in enumerate(contexts):
        with torch.no_grad():
            alone = llm.generate(inputs_embeds=c, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True).logits
        for step, logits in enumerate(alone):
            torch.testing.assert_close(seen[step][row], logits[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"row {row}, step {step}: {m}")


def test_left_padded_rows_trace_as_one_graph(tiny, padded_rows):
    llm, _, tokenizer, _ = tiny
    embeds, mask, contexts = padded_rows
    expected = [generate(llm, c, N) for c in contexts]
    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)
    try:
        for _ in range(2):  # the first prefill eager (no cache yet), the second padded in the graph
            assert decode_rows(llm, embeds, N, attention_mask=mask, compile=True) == expected
    finally:
        decode_module._compiled.clear()


def test_a_mask_that_is_not_left_padding_is_refused_by_name(tiny, padded_rows):
    llm, _, _, _ = tiny
    embeds, mask, _ = padded_rows
    with pytest.raises(ValueError, match=r"attention_mask: expected \(3, \d+\) for inputs_embeds \(3, \d+, 64\), got \(3, 5\)"):
        decode_rows(llm, embeds, 4, attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="attention_mask: expected left padding"):
        decode_rows(llm, embeds, 4, attention_mask=mask.flip(1))
    # Every position real: no padding, the rows decode as a batch of one length.
    rows = embeds[:, -20:]
    assert decode_rows(llm, rows, 4, attention_mask=torch.ones(3, 20, dtype=torch.long)) == decode_rows(llm, rows, 4)


@pytest.mark.slow
def test_a_long_conversation_compiles_once_per_cache_size_and_never_hits_the_limit(tiny):
    # Five cache sizes, greedy and sampled: ten variants of the step (and more of the prefill), past
    # dynamo's default limit of 8, which with fullgraph=True would end the answer with an error.
    # Traced with the eager backend.
    from torch._dynamo.utils import counters

    llm, embeds, _, _ = tiny
    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)
    counters.clear()
    try:
        embed = llm.get_input_embeddings()
        sizes = set()
        for positions in (20, 100, 200, 400, 800):
            with torch.no_grad():
                context = embed(torch.arange(positions) % 200 + 3).unsqueeze(0)
            assert decode(llm, context, 6, compile=True) == generate(llm, context, 6)
            assert decode(llm, context, 6, do_sample=True, generator=torch.Generator().manual_seed(0), compile=True)
            sizes.add(decode_module._buffers[llm].length)
        assert sizes == {64, 128, 256, 512, 1024}
        # ten variants of the step, and the captured prefills of the contexts that grew from the last
        assert counters["stats"]["unique_graphs"] >= 10
    finally:
        decode_module._compiled.clear()


def test_one_graph_serves_every_top_k(tiny):
    # top_k is a buffer the step reads, not a constant traced into it: another value is no new
    # compilation (each would be another capture at 7B). Traced with the eager backend.
    from torch._dynamo.utils import counters

    llm, embeds, _, _ = tiny
    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)
    try:
        sampled = {}
        for top_k in (1, 1, 5, 40):  # the first call compiles the step, the second the padded prefill (the cache exists)
            decode_module.forget(llm)
            sampled[top_k] = decode(llm, embeds, 12, do_sample=True, temperature=3.0, top_k=top_k,
                                    generator=torch.Generator().manual_seed(0), compile=True)
            if top_k == 1:
                counters.clear()  # what the first value compiled; the others must add nothing
        assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
        decode_module.forget(llm)
        assert sampled[1] == decode(llm, embeds, 12)  # top-1 sampling is greedy: the value did reach the graph
        assert sampled[5] != sampled[40]
    finally:
        decode_module._compiled.clear()


@pytest.mark.slow
def test_a_follow_ups_prefill_runs_padded_in_the_graph_and_gives_generates_tokens(tiny):
    # compile=True on the CPU, traced with the eager backend: the prefill of a turn's new positions
    # runs padded to a power of two through the compiled function, and the reply is generate's.
    llm, embeds, tokenizer, free = tiny
    padded_lengths = []
    traced = torch.compile(decode_module.prefill_padded, backend="eager", fullgraph=True, dynamic=False)

    def counting(llm_, cache, padded, last, pad, *rows):
        padded_lengths.append((padded.shape[1], int(last) + 1, int(pad)))
        return traced(llm_, cache, padded, last, pad, *rows)

    decode_module._compiled["step"] = torch.compile(decode_module.decode_one_token, backend="eager", fullgraph=True, dynamic=False)
    decode_module._compiled["prefill"] = counting
    try:
        decode_module.forget(llm)
        decode_module._buffers.pop(llm, None)  # a fresh cache: the first prefill runs eagerly
        first = decode(llm, embeds, 20, compile=True)
        assert first == free[:20] and padded_lengths == []
        second = follow_up(llm, embeds, first, tokenizer)
        assert decode(llm, second, 20, compile=True) == generate(llm, second, 20)
        new = second.shape[1] - decode_module._buffers[llm].reused
        assert padded_lengths == [(cache_length(new, 16), new, cache_length(new, 16) - new)]
        reply = generate(llm, second, 20)
        third = follow_up(llm, second, reply, tokenizer, " ###Human: And what is on the left of it, and what colour is that one?")
        assert decode(llm, third, 12, compile=True) == generate(llm, third, 12)
        assert len(padded_lengths) == 2 and padded_lengths[1][0] != padded_lengths[0][0]  # another padded size
        stop = stops(tokenizer)
        assert decode(llm, third, N, stop, compile=True) == generate(llm, third, N, stop)  # and with the stop check
    finally:
        decode_module._compiled.clear()


@pytest.fixture(scope="module")
def nano_chat(smollm2_dir):
    from minigpt4.chat import DEFAULT_CFG, load_chat

    return load_chat(DEFAULT_CFG)


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_nano_greedy_equals_generate(nano_chat, tiny_images, steps_per_sync):
    chat = nano_chat
    llm = chat.model.llama_model
    embeds = context(chat, tiny_images[1], "Describe this image in detail.")
    free = generate(llm, embeds, N)
    assert decode(llm, embeds, N, steps_per_sync=steps_per_sync) == free and len(free) == N
    stopped = generate(llm, embeds, N, chat.stop)
    assert decode(llm, embeds, N, chat.stop, steps_per_sync=steps_per_sync) == stopped


@pytest.mark.slow
def test_nano_left_padded_rows_write_what_each_writes_alone(nano_chat, tiny_images):
    # A trained model: its attention depends on where each position is (the tiny random models
    # hardly do), so a row's own positions and the masked padding are what make these equal.
    chat, llm = nano_chat, nano_chat.model.llama_model
    questions = ["Describe this image in detail.", "Describe it.", "Which shapes are in this picture, and what colours are they?"]
    contexts = [context(chat, image, question) for image, question in zip(tiny_images, questions)]
    assert len({c.shape[1] for c in contexts}) == 3
    embeds, mask = left_padded(llm, chat.model.llama_tokenizer, contexts)
    expected = [generate(llm, c, N, chat.stop) for c in contexts]
    assert decode_rows(llm, embeds, N, chat.stop, attention_mask=mask) == expected
    assert len({tuple(e) for e in expected}) == 3


@pytest.mark.gpu
def test_cuda_graph_rows_equal_generate_row_by_row(tiny, rows, padded_rows):
    llm, _, tokenizer, _ = tiny
    llm, rows = copy.deepcopy(llm).cuda(), rows.cuda()
    vicuna = stops(tokenizer)
    expected = [generate(llm, row.unsqueeze(0), N, vicuna) for row in rows]
    for _ in range(3):  # the first prefills eagerly and captures the step, the second the prefill; then replays
        assert decode_rows(llm, rows, N, vicuna, compile=True) == expected
    embeds, mask, contexts = padded_rows  # left-padded: the mask and each row's positions in the graphs
    expected = [generate(llm, c.cuda(), N, vicuna) for c in contexts]
    for _ in range(3):
        assert decode_rows(llm, embeds.cuda(), N, vicuna, compile=True, attention_mask=mask.cuda()) == expected


@pytest.mark.gpu
@pytest.mark.parametrize("steps_per_sync", [1, 8])
def test_cuda_graph_greedy_equals_generate(tiny, steps_per_sync):
    llm, embeds, tokenizer, free = tiny
    llm, embeds = copy.deepcopy(llm).cuda(), embeds.cuda()
    end = first_new_at(free, 12)
    text = text_of(tokenizer, free[end - 2 : end + 1])
    stop, vicuna = stops(tokenizer, text), stops(tokenizer)
    expected = generate(llm, embeds, N, stop)
    assert 12 < len(expected) <= end + 1  # the stop fired mid-chunk
    for prompt in (embeds, embeds[:, 1:], embeds):  # compile and capture, then replay in the same bucket
        reference = expected if prompt is embeds else generate(llm, prompt, N, stop)
        assert decode(llm, prompt, N, stop, steps_per_sync=steps_per_sync, compile=True) == reference
    assert decode(llm, embeds, N, vicuna, steps_per_sync=steps_per_sync, compile=True) == generate(llm, embeds, N, vicuna)


@pytest.mark.slow
def test_nano_chat_with_the_static_engine_answers_as_generate(nano_chat, tiny_images):
    # Chat(decode="static"): what `serve --decode static` runs; the nano config decodes greedily.
    plain = nano_chat
    static = Chat(plain.model, plain.vis_processor, "cpu", plain.conv_template, generation=plain.generation, decode="static")
    assert plain.generation["do_sample"] is False
    for image, question in zip(tiny_images, ["Describe this image in detail.", "How many shapes are there?", "What colour is the square?"]):
        replies = []
        for chat in (plain, static):
            conv, img_list = chat.new_conversation(), []
            chat.upload_img(image, conv, img_list)
            chat.ask(question, conv)
            replies.append(chat.reply(conv, img_list))
        assert replies[1].result.token_ids == replies[0].result.token_ids and replies[1].text == replies[0].text
        assert replies[1].result.finish_reason == replies[0].result.finish_reason == "stop"
