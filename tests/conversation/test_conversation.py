"""Conversation templates, stop words, and the Chat engine on the reference's tiny models."""
from __future__ import annotations

import dataclasses

import itertools
import logging
import zlib

import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import REF, first_stop, text_of
from minigpt4.conversation import (
    CONV_VISION_LLama2,
    CONV_VISION_Vicuna0,
    IMAGE_MESSAGE,
    Chat,
    ImageError,
    StopCriteria,
    open_image,
)
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

TEMPLATES = {"vicuna0": CONV_VISION_Vicuna0, "llama2": CONV_VISION_LLama2}
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)
# The reference chat: greedy, 20 new tokens, byte pieces 3..258 suppressed.
REF_GENERATION = dict(do_sample=False, max_new_tokens=20, suppress_tokens=list(range(3, 259)))


@pytest.fixture(scope="module")
def chats(tiny_models):
    processor = Blip2ImageEvalProcessor(224)
    return {v: Chat(tiny_models[v], processor, "cpu", TEMPLATES[v]) for v in TEMPLATES}


# ---- templates ------------------------------------------------------------------------------------
def play_script(chat, image_a, image_b):
    """Image, two answered questions, a second image, a question: the prompt before answering."""
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image_a, conv, img_list)
    chat.ask("What is in the picture?", conv)
    conv.append_message(conv.roles[1], "A square.")
    chat.ask("Which colour is it?", conv)
    conv.append_message(conv.roles[1], "Purple.")
    chat.upload_img(image_b, conv, img_list)
    chat.ask("And here?", conv)
    conv.append_message(conv.roles[1], None)
    return conv, img_list


EXPECTED_PROMPTS = {
    "vicuna0": SYSTEM + "###Human: <Img><ImageHere></Img> What is in the picture?###Assistant: A square.###"
    "Human: Which colour is it?###Assistant: Purple.###"
    "Human: <Img><ImageHere></Img> And here?###Assistant: ",
    "llama2": SYSTEM + "<s>[INST] <Img><ImageHere></Img> What is in the picture? [/INST] A square."
    "<s>[INST] Which colour is it? [/INST] Purple."
    "<s>[INST] <Img><ImageHere></Img> And here? [/INST] ",
}


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_prompt_over_turns_and_two_images(chats, variant):
    conv, img_list = play_script(chats[variant], REF / "img0.png", REF / "img1.png")
    assert conv.get_prompt() == EXPECTED_PROMPTS[variant]
    assert len(img_list) == 2


def test_two_images_in_a_row_then_a_question(chats):
    chat = chats["vicuna0"]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.upload_img(REF / "img1.png", conv, img_list)
    chat.ask("Compare them.", conv)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        SYSTEM + "###Human: <Img><ImageHere></Img>###Human: <Img><ImageHere></Img> Compare them.###Assistant: "
    )
    # Each image's tokens sit where its placeholder was, in upload order.
    emb = chat.get_context_emb(conv.get_prompt(), img_list)
    first, _ = conv.get_prompt().split("<ImageHere>", 1)
    start = len(chat.model.llama_tokenizer(first).input_ids)
    n = img_list[0].shape[1]
    torch.testing.assert_close(emb[0, start : start + n], img_list[0][0])
    assert not torch.equal(img_list[0], img_list[1])
    with pytest.raises(ValueError, match="2 <ImageHere> but 1 images"):
        chat.get_context_emb(conv.get_prompt(), img_list[:1])


def test_copy_never_mutates_the_template(chats):
    play_script(chats["vicuna0"], REF / "img0.png", REF / "img1.png")
    play_script(chats["llama2"], REF / "img0.png", REF / "img1.png")
    assert CONV_VISION_Vicuna0.messages == [] and CONV_VISION_LLama2.messages == []
    conv = CONV_VISION_Vicuna0.copy()
    conv.append_message(conv.roles[0], IMAGE_MESSAGE)
    clone = conv.copy()
    clone.messages[0][1] += " changed"
    assert conv.messages == [["Human: ", IMAGE_MESSAGE]]


def test_upload_accepts_path_pil_and_tensor(chats, ref_tensors):
    chat = chats["vicuna0"]
    embs = []
    for image in (REF / "img0.png", str(REF / "img0.png"), Image.open(REF / "img0.png"), ref_tensors["images"][0]):
        conv, img_list = chat.new_conversation(), []
        assert chat.upload_img(image, conv, img_list) == "Received."
        embs.append(img_list[0])
    for emb in embs[1:]:
        torch.testing.assert_close(emb, embs[0], rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="expected a path, a PIL image or a tensor"):
        chat.upload_img(42, chat.new_conversation(), [])


# ---- fidelity to the original ------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_chat_matches_reference(chats, ref_json, ref_tensors, variant):
    chat = chats[variant]
    if variant == "llama2":
        # The original cut Llama-2 replies at "###" too (our template does not: see reply_cut).
        chat = Chat(chat.model, chat.vis_processor, "cpu", dataclasses.replace(TEMPLATES[variant], reply_cut="###"))
    tokenizer = chat.model.llama_tokenizer
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    for turn, ref in enumerate(ref_json[f"{variant}_chat"]):
        chat.ask(ref["question"], conv)
        generation = chat.answer_prepare(conv, img_list, **REF_GENERATION)
        prompt = conv.get_prompt()
        assert prompt == ref["prompt"]
        segments = prompt.split("<ImageHere>")
        ids = [tokenizer(s, add_special_tokens=i == 0).input_ids for i, s in enumerate(segments)]
        assert ids == ref["segment_ids"]
        torch.testing.assert_close(generation["inputs_embeds"], ref_tensors[f"{variant}_chat_emb_{turn}"], rtol=0, atol=1e-5)

        conv.messages.pop()  # answer() appends the assistant turn itself
        reply, tokens = chat.answer(conv, img_list, **REF_GENERATION)
        assert reply == ref["answer"]
        assert conv.messages[-1] == [conv.roles[1], ref["answer"]]
        # 4.28 returned a BOS before the new tokens; 5.x returns only the new ones.
        assert tokens == ref["generated_ids"][1:]


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_stream_answer_gives_the_same_reply(chats, ref_json, variant):
    chat = chats[variant]
    ref = ref_json[f"{variant}_chat"][0]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.ask(ref["question"], conv)
    pieces = list(chat.stream_answer(conv, img_list, **REF_GENERATION))
    assert len(pieces) > 1
    whole = chat.new_conversation()
    chat.upload_img(REF / "img0.png", whole, [])
    chat.ask(ref["question"], whole)
    reply, _ = chat.answer(whole, img_list, **REF_GENERATION)
    assert pieces[-1] == reply == conv.messages[-1][1]
    if variant == "vicuna0":
        assert reply == ref["answer"]
        assert all("#" not in p for p in pieces)  # a half-written stop sign is never shown
    else:
        assert reply.startswith(ref["answer"]) and "###" in reply  # not cut at "###" (see reply_cut)


def test_context_is_truncated_with_a_warning(chats, caplog):
    chat = chats["vicuna0"]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.ask("Describe the shapes.", conv)
    full = chat.get_context_emb(conv.get_prompt() + "Assistant: ", img_list)
    with caplog.at_level(logging.WARNING, logger="minigpt4.conversation.chat"):
        generation = chat.answer_prepare(conv, img_list, max_new_tokens=20, max_length=100)
    assert generation["inputs_embeds"].shape[1] == 80
    torch.testing.assert_close(generation["inputs_embeds"][0], full[0, -80:])
    assert "max_length 100" in caplog.text



def test_a_context_too_long_is_refused_before_it_is_embedded_when_truncation_is_off(chats, monkeypatch):
    from minigpt4.conversation import ContextTooLong

    chat = chats["vicuna0"]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.ask("Describe the shapes.", conv)
    before = [list(m) for m in conv.messages]
    positions = chat.get_context_emb(conv.get_prompt() + "Assistant: ", img_list).shape[1]
    embedded = []
    embed = chat.model.llama_model.get_input_embeddings()
    monkeypatch.setattr(embed, "forward", lambda ids, _f=embed.forward: embedded.append(ids.numel()) or _f(ids))
    with pytest.raises(ContextTooLong, match=f"the conversation is {positions} positions .* 20 more, over the model's max_length of {positions + 19}"):
        chat.answer_prepare(conv, img_list, max_new_tokens=20, max_length=positions + 19, truncate=False)
    assert embedded == [] and [list(m) for m in conv.messages] == before  # nothing embedded, the conversation as it was
    generation = chat.answer_prepare(conv, img_list, max_new_tokens=20, max_length=positions + 20, truncate=False)
    assert generation["inputs_embeds"].shape[1] == positions

# ---- stop words --------------------------------------------------------------------------------
def hash_tokens(tokenizer) -> list[int]:
    """Every piece whose text holds "#": only these can take part in spelling "###"."""
    return [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and "#" in text_of(tokenizer, [i])]


def brute_force_stops(tokenizer) -> set[tuple[int, ...]]:
    """Minimal token sequences whose text holds "###"."""
    hashes = hash_tokens(tokenizer)
    found = set()
    for n in (1, 2, 3):
        for seq in itertools.product(hashes, repeat=n):
            if "###" in text_of(tokenizer, seq) and "###" not in text_of(tokenizer, seq[1:]) and "###" not in text_of(tokenizer, seq[:-1]):
                found.add(seq)
    return found


def test_stop_text_ends_a_reply_in_every_spelling_and_only_there(chats, sp_llama_dir):
    from minigpt4.models.llm import load_llm_tokenizer

    reference = chats["vicuna0"].model.llama_tokenizer
    stop = StopCriteria(reference, "###", [reference.eos_token_id])
    ids = {t: reference.convert_tokens_to_ids(t) for t in ("▁###", "##", "#", "<0x23>", "▁##")}
    spellings = brute_force_stops(reference)
    assert {(ids["▁###"],), (ids["##"], ids["#"]), (ids["#"], ids["<0x23>"], ids["#"])} <= spellings
    lead = reference("The square", add_special_tokens=False).input_ids
    for seq in spellings | {(reference.eos_token_id,)}:
        assert stop.cut(lead + list(seq) + lead) == lead + list(seq), seq
    assert stop.cut(lead + [ids["#"], ids["▁##"]] + lead) == lead + [ids["#"], ids["▁##"]] + lead  # "# ##" is not "###"
    # Every run of up to three "#" pieces after a word, against the oracle: the stop fires exactly
    # where the text first holds "###" ending in the last piece.
    hashes = hash_tokens(reference)
    for n in (1, 2, 3):
        for seq in itertools.product(hashes, repeat=n):
            row = lead + list(seq)
            assert len(stop.cut(row)) == (first_stop(reference, row, "###") or len(row)), seq
    # A batch: each row stops on its own.
    rows = torch.tensor([lead + [ids["##"], ids["#"]], lead + [ids["#"], ids["▁##"]], [ids["▁###"]] * len(lead) + lead[:1] + [reference.eos_token_id]])
    assert stop(rows).tolist() == [True, False, True]
    # Another vocabulary, trained in the test: its own spellings, found the same way.
    other = load_llm_tokenizer(str(sp_llama_dir), "$$")
    other_stop = StopCriteria(other, "###")
    assert brute_force_stops(other)
    for seq in brute_force_stops(other):
        assert other_stop.cut(list(seq) * 2) == list(seq), seq


class Script(LogitsProcessor):
    """Turns the tiny LLM into a scripted one: it emits ``tokens`` in order, then token 300 forever."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1]
        forced = self.tokens[step] if step < len(self.tokens) else 300
        out = torch.full_like(scores, -float("inf"))
        out[:, forced] = 0
        return out


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_reply_ends_at_each_stop_spelling_and_eos(chats, variant):
    chat = chats[variant]
    tokenizer = chat.model.llama_tokenizer
    lead = tokenizer("The square", add_special_tokens=False).input_ids
    if variant == "vicuna0":
        stops = sorted(brute_force_stops(tokenizer)) + [(tokenizer.eos_token_id,)]
        assert len(stops) > 10
    else:  # the original's Llama-2 chat stops at EOS only
        assert chat.stop.strings is None
        stops = [(tokenizer.eos_token_id,)]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    for stop in stops:
        script = lead + list(stop) + tokenizer("Human: more", add_special_tokens=False).input_ids
        draft = conv.copy()
        chat.ask("Describe the shapes.", draft)
        reply, tokens = chat.answer(draft, img_list, do_sample=False, max_new_tokens=30, logits_processor=LogitsProcessorList([Script(script)]))
        assert tokens == lead + list(stop), f"did not stop at {stop}"
        assert reply == "The square" or (reply == "The square#" and text_of(tokenizer, stop).startswith("#")), stop


def test_streamed_reply_hides_the_stop_sign(chats):
    chat = chats["vicuna0"]
    tokenizer = chat.model.llama_tokenizer
    script = tokenizer("The square", add_special_tokens=False).input_ids + [tokenizer.convert_tokens_to_ids(t) for t in ("##", "#")]
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.ask("Describe the shapes.", conv)
    pieces = list(chat.stream_answer(conv, img_list, do_sample=False, max_new_tokens=30, logits_processor=LogitsProcessorList([Script(script)])))
    assert pieces[-1] == "The square" == conv.messages[-1][1]
    assert all("#" not in p for p in pieces)


# ---- batches -----------------------------------------------------------------------------------
class StopAt(LogitsProcessor):
    """Row ``r`` of the batch is forced to end after ``lengths[r]`` tokens, by "###" or by EOS."""

    def __init__(self, lengths, stop_id, eos_id):
        self.lengths, self.stop_id, self.eos_id = lengths, stop_id, eos_id

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, length in enumerate(self.lengths):
            if input_ids.shape[1] == length - 1:
                scores[row] = -float("inf")
                scores[row, self.eos_id if length % 2 else self.stop_id] = 0
        return scores


IMAGES = [REF / "img0.png", REF / "img1.png", "red", "green", "blue", REF / "img_wide.png"]
QUESTIONS = ["Describe the shapes.", "What?", "How many shapes are there in this picture?", "Colour?", "Left or right of the square?", "Is it wide?"]


def batch_inputs():
    return [Image.new("RGB", (64 + 8 * i, 64), im) if isinstance(im, str) else im for i, im in enumerate(IMAGES)]


def one_at_a_time(chat, images, questions, make_processor=None, **generation):
    replies, lengths = [], []
    for i, (image, question) in enumerate(zip(images, questions)):
        conv, img_list = chat.new_conversation(), []
        chat.upload_img(image, conv, img_list)
        chat.ask(question, conv)
        extra = {"logits_processor": LogitsProcessorList([make_processor(i)])} if make_processor else {}
        reply, tokens = chat.answer(conv, img_list, **generation, **extra)
        replies.append(reply)
        lengths.append(len(tokens))
    return replies, lengths


def count_generate_calls(chat, monkeypatch):
    calls = []
    generate = chat.model.llama_model.generate
    monkeypatch.setattr(chat.model.llama_model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    return calls


GREEDY = dict(do_sample=False, max_new_tokens=12, suppress_tokens=list(range(3, 259)))


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_batch_equals_one_at_a_time_with_stops_at_different_lengths(chats, variant, monkeypatch):
    chat = chats[variant]
    tokenizer = chat.model.llama_tokenizer
    eos_id = tokenizer.eos_token_id
    # Llama-2's template stops at EOS only
    stop_id = tokenizer.convert_tokens_to_ids("▁###") if chat.conv_template.stop_str else eos_id
    stop_after = [3, 7, 2, 12, 5, 8]  # odd: EOS, even: "###" (Vicuna)
    images = batch_inputs()
    singles, lengths = one_at_a_time(chat, images, QUESTIONS, lambda i: StopAt([stop_after[i]], stop_id, eos_id), **GREEDY)
    # The model may stop on its own first (the tiny Llama-2 does).
    assert all(n <= limit for n, limit in zip(lengths, stop_after)) and len(set(lengths)) > 3, lengths

    calls = count_generate_calls(chat, monkeypatch)
    batched = chat.answer_batch(images, QUESTIONS, logits_processor=LogitsProcessorList([StopAt(stop_after, stop_id, eos_id)]), **GREEDY)
    assert len(calls) == 1 and calls[0]["inputs_embeds"].shape[0] == len(images)
    assert batched == singles
    if variant == "vicuna0":
        assert all("#" not in reply for reply in batched)


def test_batch_equals_one_at_a_time_with_the_models_own_stops(chats, monkeypatch):
    # The tiny Llama-2 model, greedy, writes "###" by itself after 2, 4, 8 or 12 tokens; a
    # template that stops there gives rows that end at different lengths without any forcing.
    chat = Chat(chats["llama2"].model, chats["llama2"].vis_processor, "cpu", dataclasses.replace(CONV_VISION_LLama2, stop_str="###"))
    images = batch_inputs()
    singles, lengths = one_at_a_time(chat, images, QUESTIONS, **GREEDY)
    assert len(set(lengths)) > 2, lengths
    calls = count_generate_calls(chat, monkeypatch)
    assert chat.answer_batch(images, QUESTIONS, **GREEDY) == singles
    assert len(calls) == 1


def test_batch_checks_its_inputs(chats):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        chats["vicuna0"].answer_batch([REF / "img0.png"] * 2, ["one"])
    assert chats["vicuna0"].answer_batch([], []) == []


# ---- image files -------------------------------------------------------------------------------
def png_header_only(path, width, height):
    """A PNG that declares its size but holds no pixels: enough to test the size limit cheaply."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_open_image_says_what_is_wrong(tmp_path):
    assert open_image(REF / "img_wide.png").size == (300, 200)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageError, match="'notes.png' is not an image"):
        open_image(tmp_path / "notes.png")
    data = (REF / "img0.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="'cut.png' is a damaged image file"):
        open_image(tmp_path / "cut.png")
    with pytest.raises(ImageError, match="'huge.png' is 10000x6000 = 60 megapixels; the limit is 50"):
        open_image(png_header_only(tmp_path / "huge.png", 10000, 6000))
    with pytest.raises(ImageError, match="'gone.png': no such file"):
        open_image(tmp_path / "gone.png")
    # Only the formats asked for: a BMP is refused by a caller that names PNG and JPEG.
    Image.open(REF / "img0.png").save(tmp_path / "pic.bmp")
    assert open_image(tmp_path / "pic.bmp").size == open_image(REF / "img0.png").size
    with pytest.raises(ImageError, match="'pic.bmp' is not an image \\(or not one of PNG, JPEG\\)"):
        open_image(tmp_path / "pic.bmp", formats=("PNG", "JPEG"))


def test_smollm2_chatml_template_matches_the_nano_training_prompt():
    from omegaconf import OmegaConf

    from minigpt4.common.utils import LIBRARY_ROOT
    from minigpt4.conversation import CONV_VISION_SmolLM2, conv_template_for

    assert conv_template_for("nano") is CONV_VISION_SmolLM2
    conv = CONV_VISION_SmolLM2.copy()
    conv.append_message(conv.roles[0], f"{IMAGE_MESSAGE} Describe this image.")
    conv.append_message(conv.roles[1], None)
    template = OmegaConf.load(LIBRARY_ROOT / "configs" / "models" / "minigpt4_nano.yaml").model.prompt_template
    assert conv.get_prompt() == template.format(f"{IMAGE_MESSAGE} Describe this image.")
    conv.messages[-1][1] = "a red circle."
    conv.append_message(conv.roles[0], "How many shapes are there?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "<|im_start|>user\n<Img><ImageHere></Img> Describe this image.<|im_end|>\n"
        "<|im_start|>assistant\na red circle.<|im_end|>\n"
        "<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert CONV_VISION_SmolLM2.messages == []  # the template itself is untouched


def test_clean_reply_follows_the_conversations_own_template():
    from minigpt4.conversation import CONV_VISION_LLama2, CONV_VISION_SmolLM2, CONV_VISION_Vicuna0, clean_reply

    # Vicuna V0: the original's cut at "###" and after the last "Assistant:"
    assert clean_reply(" Assistant: a cat ### Human: more", CONV_VISION_Vicuna0) == "a cat"
    # Llama-2 and ChatML replies keep a "###" (a Markdown heading) and an "Assistant:" they wrote
    assert clean_reply("### Title\nAssistant: text ", CONV_VISION_LLama2) == "### Title\nAssistant: text"
    assert clean_reply(" a red circle ### ", CONV_VISION_SmolLM2) == "a red circle ###"
