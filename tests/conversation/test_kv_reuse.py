"""The KV cache kept between chat turns: the replies of re-encoding every turn, with less prefill."""
from __future__ import annotations

import copy
import functools
import importlib.util
import io

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StaticCache

from conftest import REF, REPO, tiny_model_section
from minigpt4.chat import chat_loop, parse_args
from minigpt4.conversation import CONV_VISION_LLama2, CONV_VISION_SmolLM2, CONV_VISION_Vicuna0, Chat
from minigpt4.conversation.kv_cache import PrefixCache, common_prefix
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["What is in the picture?", "Which colour is it?", "And the shape on the left?"]
# Greedy; byte pieces, unk and BOS suppressed so replies are words of the tiny vocabularies.
GREEDY = dict(do_sample=False, max_new_tokens=8, suppress_tokens=[0, 1, *range(3, 259)])


@pytest.fixture(scope="module")
def models(tiny_models):
    return {"vicuna0": tiny_models["vicuna0"], "llama2": tiny_models["llama2"]}


@pytest.fixture(scope="module")
def chatml_model(sp_llama_dir):
    """The tiny vision parts on the sentencepiece LLaMA trained in the tests, for the ChatML template."""
    from minigpt4.models import MiniGPT4

    torch.manual_seed(0)
    return MiniGPT4.from_config(tiny_model_section("vicuna0", llama_model=str(sp_llama_dir), ckpt=None)).eval()


TEMPLATES = {"vicuna0": CONV_VISION_Vicuna0, "llama2": CONV_VISION_LLama2, "chatml": CONV_VISION_SmolLM2}


@pytest.fixture(scope="module")
def make_chat(models, chatml_model):
    processor = Blip2ImageEvalProcessor(224)

    def make(variant: str, reuse: bool = True) -> Chat:
        model = chatml_model if variant == "chatml" else models[variant]
        return Chat(model, processor, "cpu", TEMPLATES[variant], reuse_kv_cache=reuse)

    return make


@pytest.fixture
def prefills(models, chatml_model):
    """The number of positions each LLM forward is given (the prefill, then 1 per decoding step)."""
    lengths: list[int] = []

    def record(module, args, kwargs):
        tokens = kwargs.get("inputs_embeds")
        lengths.append((tokens if tokens is not None else kwargs["input_ids"]).shape[1])

    hooks = [m.llama_model.register_forward_pre_hook(record, with_kwargs=True) for m in (*models.values(), chatml_model)]
    yield lengths
    for hook in hooks:
        hook.remove()


@pytest.fixture(scope="module")
def original(make_chat):
    """Per variant, the chat of :func:`play` re-encoding every turn, as the original: played once."""
    played: dict[str, list] = {}

    def get(variant: str) -> list:
        if variant not in played:
            played[variant] = play(make_chat(variant, reuse=False), [], **GREEDY)[0]
        return played[variant]

    return get


def start(chat: Chat):
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    return conv, img_list


def answered_once(chat: Chat):
    """A conversation with an image and the first question answered."""
    conv, img_list = start(chat)
    chat.ask(QUESTIONS[0], conv)
    chat.answer(conv, img_list, **GREEDY)
    return conv, img_list


def demo_draft(conv):
    """What demo.py answers in: a copy of the session's conversation that takes its cache along."""
    draft = conv.copy()
    draft.kv_cache = conv.kv_cache
    return draft


def context_length(chat: Chat, conv, img_list) -> int:
    """Positions of the context the next answer starts from (conv already asked)."""
    draft = conv.copy()
    draft.append_message(draft.roles[1], None)
    return chat.get_context_emb(draft.get_prompt(), img_list).shape[1]


def play(chat: Chat, prefills: list[int], stream: bool = False, **generation):
    """Ask :data:`QUESTIONS` in one conversation: per turn (reply, token ids, context length, positions prefilled)."""
    conv, img_list = start(chat)
    turns = []
    for question in QUESTIONS:
        chat.ask(question, conv)
        length = context_length(chat, conv, img_list)
        prefills.clear()
        if stream:
            reply = list(chat.stream_answer(conv, img_list, **generation))[-1]
            tokens = None
        else:
            reply, tokens = chat.answer(conv, img_list, **generation)
        assert conv.messages[-1][1] == reply
        # The `original` fixture records no prefill: that is the whole context.
        turns.append((reply, tokens, length, prefills[0] if prefills else length))
    return turns, conv


# ---- same replies, less prefill --------------------------------------------------------------------
def next_turn_keys(chat: Chat, conv, img_list) -> list:
    """The keys of what the next turn's context starts with: the conversation up to the user's role."""
    upcoming = conv.copy()
    upcoming.append_message(upcoming.roles[0], None)
    return chat.context_with_keys(upcoming.get_prompt().rstrip(), img_list)[1]


@pytest.mark.parametrize("variant", ["vicuna0", "llama2", "chatml"])
def test_greedy_chat_equals_reencoding_every_turn(make_chat, original, prefills, variant):
    chat = make_chat(variant)
    conv, img_list = start(chat)
    held = None
    for question, (reply, tokens, length, prefilled) in zip(QUESTIONS, original(variant)):
        chat.ask(question, conv)
        assert context_length(chat, conv, img_list) == length
        prefills.clear()
        assert chat.answer(conv, img_list, **GREEDY) == (reply, tokens)
        state = conv.kv_cache
        if held is None:
            assert prefills[0] == length
        else:
            # Only the question was prefilled: everything before it was in the cache.
            assert state.reused == len(held) and prefills[0] == length - len(held)
        # The cache holds the conversation up to the next user role, as the next prompt tokenizes it.
        held = next_turn_keys(chat, conv, img_list)
        assert state.keys == held and int(state.cache.get_seq_length()) == len(held)
    image = state.images[0]
    assert [k for k in state.keys if isinstance(k, tuple)] == [(id(image), row) for row in range(image.shape[1])]


class ForceReply(LogitsProcessor):
    """The model writes ``tokens``, then stops with EOS."""

    def __init__(self, tokens: list[int], eos: int):
        self.tokens = tokens + [eos]

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -float("inf"))
        out[:, self.tokens[min(input_ids.shape[1], len(self.tokens) - 1)]] = 0
        return out


@pytest.mark.parametrize("variant", ["vicuna0", "chatml"])
def test_the_reply_is_prefilled_again_only_where_the_prompt_tokenizes_it_differently(make_chat, prefills, variant):
    # A reply written the way the prompt tokenizes it (what a trained model mostly writes): under
    # ChatML, whose assistant role ends with a newline, the generated tokens stay in the cache;
    # Vicuna's role ends with a space that the prompt merges into the reply's first word, so the
    # whole reply is computed again.
    chat = make_chat(variant)
    tokenizer = chat.model.llama_tokenizer
    conv, img_list = start(chat)
    chat.ask(QUESTIONS[0], conv)
    draft = conv.copy()
    draft.append_message(draft.roles[1], None)
    before = draft.get_prompt().split("<ImageHere>")[-1].rstrip()
    reply = "the red circle is left of the square"
    ids_before = tokenizer(before, add_special_tokens=False).input_ids
    ids_after = tokenizer(f"{before} {reply}" if variant == "vicuna0" else before + reply, add_special_tokens=False).input_ids
    assert ids_after[: len(ids_before)] == ids_before
    script = ids_after[len(ids_before) :]
    prefills.clear()
    force = LogitsProcessorList([ForceReply(script, tokenizer.eos_token_id)])
    assert chat.answer(conv, img_list, do_sample=False, max_new_tokens=30, logits_processor=force) == (reply, script + [tokenizer.eos_token_id])
    reply_prefill = prefills[-1]  # the forward after generating
    if variant == "chatml":
        assert reply_prefill <= len(tokenizer("<|im_end|>\n<|im_start|>user").input_ids)
    else:
        assert reply_prefill > len(script)


@pytest.mark.parametrize("variant", ["vicuna0", "chatml"])
def test_streaming_equals_answering_and_reuses_the_cache(make_chat, original, prefills, variant):
    streamed, conv = play(make_chat(variant), prefills, stream=True, **GREEDY)
    assert [t[0] for t in streamed] == [t[0] for t in original(variant)]
    assert streamed[2][3] < streamed[2][2] / 2
    assert conv.kv_cache.keys is not None


def test_static_cache_gives_the_same_chat(make_chat, original, prefills):
    static, conv = play(make_chat("vicuna0"), prefills, cache_implementation="static", **GREEDY)
    assert [t[:2] for t in static] == [t[:2] for t in original("vicuna0")]
    assert static[2][3] < static[2][2] / 2
    # one fixed-size cache for the whole chat (on a GPU: one compiled decoding step)
    assert conv.kv_cache.cache.get_max_length() == 2000


# ---- when the cache must not be used ------------------------------------------------------------
def test_a_copy_starts_without_the_cache(make_chat, original, prefills):
    chat = make_chat("vicuna0")
    reference = original("vicuna0")
    conv, img_list = answered_once(chat)
    assert conv.copy().kv_cache is None and copy.deepcopy(conv).kv_cache is None
    assert conv.copy() == conv and "kv_cache" not in repr(conv)

    other = conv.copy()
    chat.ask(QUESTIONS[1], other)
    length = context_length(chat, other, img_list)
    prefills.clear()
    assert chat.answer(other, img_list, **GREEDY)[0] == reference[1][0]
    assert prefills[0] == length  # a full prefill
    assert other.kv_cache.cache is not conv.kv_cache.cache

    chat.ask(QUESTIONS[1], conv)  # the original still has its own cache
    prefills.clear()
    assert chat.answer(conv, img_list, **GREEDY)[0] == reference[1][0]
    assert prefills[0] == length - conv.kv_cache.reused < length / 2


def test_a_shared_cache_always_knows_what_it_holds(make_chat, original):
    # The demo hands the session's cache to a draft conversation; the session may later go on
    # from its old state (the draft failed or was dropped) with the cache the draft wrote into.
    reference = original("vicuna0")
    chat = make_chat("vicuna0")
    conv, img_list = answered_once(chat)
    draft = demo_draft(conv)
    chat.ask("Something else entirely?", draft)
    chat.answer(draft, img_list, **GREEDY)
    chat.ask(QUESTIONS[1], conv)
    assert chat.answer(conv, img_list, **GREEDY)[0] == reference[1][0]


def test_truncation_falls_back_to_a_full_prefill(make_chat, prefills, caplog):
    chat, original = make_chat("vicuna0"), make_chat("vicuna0", reuse=False)
    replies = []
    for c in (original, chat):
        conv, img_list = start(c)
        c.ask(QUESTIONS[0], conv)
        c.answer(conv, img_list, **GREEDY)
        c.ask(QUESTIONS[1], conv)
        length = context_length(c, conv, img_list)
        prefills.clear()
        replies.append(c.answer(conv, img_list, max_length=length, **GREEDY))  # drops the first 8 positions
        assert prefills[0] == length - GREEDY["max_new_tokens"]
        assert conv.kv_cache is None
        c.ask(QUESTIONS[2], conv)
        length = context_length(c, conv, img_list)
        prefills.clear()
        replies.append(c.answer(conv, img_list, **GREEDY))
        assert prefills[0] == length  # nothing left to reuse
    assert replies[:2] == replies[2:]
    assert "max_length" in caplog.text


def test_beam_search_does_not_reuse(make_chat, prefills):
    chat = make_chat("vicuna0")
    conv, img_list = answered_once(chat)
    chat.ask(QUESTIONS[1], conv)
    length = context_length(chat, conv, img_list)
    prefills.clear()
    chat.answer(conv, img_list, **{**GREEDY, "num_beams": 2})
    assert prefills[0] == length and conv.kv_cache is None


class Explode(LogitsProcessor):
    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == 3:
            raise RuntimeError("out of memory")
        return scores


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_turn_leaves_no_usable_cache(make_chat, original, prefills, stream):
    reference = original("vicuna0")
    chat = make_chat("vicuna0")
    conv, img_list = answered_once(chat)
    draft = demo_draft(conv)
    chat.ask(QUESTIONS[1], draft)
    with pytest.raises(RuntimeError, match="out of memory"):
        generation = {**GREEDY, "logits_processor": LogitsProcessorList([Explode()])}
        list(chat.stream_answer(draft, img_list, **generation)) if stream else chat.answer(draft, img_list, **generation)
    assert conv.kv_cache.keys is None  # half written: never used again
    chat.ask(QUESTIONS[1], conv)
    length = context_length(chat, conv, img_list)
    prefills.clear()
    assert chat.answer(conv, img_list, **GREEDY)[0] == reference[1][0]
    assert prefills[0] == length


@pytest.mark.parametrize("other", ["another model", "reuse turned off"])
def test_no_reuse_by_another_model_or_when_turned_off(make_chat, models, prefills, other):
    chat = make_chat("vicuna0")
    conv, img_list = answered_once(chat)
    if other == "another model":  # the same vocabulary and shapes, other weights
        second = Chat(models["llama2"], chat.vis_processor, "cpu", CONV_VISION_Vicuna0)
    else:
        second = make_chat("vicuna0", reuse=False)
    chat.ask(QUESTIONS[1], conv)
    length = context_length(chat, conv, img_list)
    prefills.clear()
    second.answer(conv, img_list, **GREEDY)
    assert prefills[0] == length
    assert (conv.kv_cache is None) == (other == "reuse turned off")


def test_common_prefix():
    assert common_prefix([1, 2, (7, 0)], [1, 2, (7, 0), 5]) == 3
    assert common_prefix([1, 2, 3], [1, 9]) == 1
    assert common_prefix([], [1]) == 0


def test_terminal_chat_is_the_same_without_the_cache(make_chat):
    transcripts = []
    for reuse in (True, False):
        out = io.StringIO()
        chat_loop(make_chat("vicuna0", reuse), [REF / "img0.png"], QUESTIONS, out=out, **GREEDY)
        transcripts.append(out.getvalue())
    assert transcripts[0] == transcripts[1] and transcripts[0].count("Assistant: ") == 3
    assert parse_args(["--image", "a.png", "--no-kv-cache"]).no_kv_cache and not parse_args(["--image", "a.png"]).no_kv_cache


def test_demo_sessions_reuse_the_cache_and_answer_as_the_original(make_chat, original, prefills, monkeypatch):
    spec = importlib.util.spec_from_file_location("minigpt4_demo", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    chat = make_chat("vicuna0")
    monkeypatch.setattr(chat, "stream_answer", functools.partial(chat.stream_answer, **GREEDY))
    handlers = demo.Handlers(chat)
    *_, conv, img_list = handlers.start_chat(str(REF / "img0.png"), None, [])

    def turn(question: str, conv):
        _, chatbot, pending = handlers.ask(question, [], conv)
        prefills.clear()
        chatbot, conv = list(handlers.answer(pending, chatbot, conv, img_list, 1, 0.0))[-1]  # temperature 0: greedy
        return chatbot[-1]["content"], conv, prefills[0]

    reference = original("vicuna0")
    reply, conv, first = turn(QUESTIONS[0], conv)
    reply, conv, second = turn(QUESTIONS[1], conv)
    assert [reply, second < first / 2] == [reference[1][0], True]
    fresh, _, _ = handlers.clear_history(conv, img_list)
    reply, fresh, after_clear = turn(QUESTIONS[0], fresh)
    assert reply == reference[0][0] and after_clear < first  # the system prompt and image came from the cache


def test_a_static_cache_filled_under_inference_mode_can_be_cropped(models):
    # On a GPU a static cache's tensors (its length counter too) come into being in generate's
    # inference mode, and cropping updates the counter in place, outside generate (answer_prepare,
    # the reply prefill). Measured on an H100: "Inplace update to inference tensor outside
    # InferenceMode". Building the cache in inference mode gives the CPU the same tensors.
    llm = models["vicuna0"].llama_model
    with torch.inference_mode():
        cache = StaticCache(config=llm.config, max_cache_len=32)
        llm(inputs_embeds=torch.randn(1, 6, llm.config.hidden_size), cache=cache, use_cache=True)
    PrefixCache(cache, llm).crop(6, 4)
    assert int(cache.get_seq_length()) == 4
