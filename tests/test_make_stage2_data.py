"""dataset/make_stage2_data.py (logic in minigpt4/apps/stage2_data.py) on the tiny model, then a
short fine-tune on what it made, whose checkpoint loads in Chat."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REF, tiny_model_section
from minigpt4.chat import load_chat
from minigpt4.conversation import Chat
from minigpt4.apps import stage2_data as s2
from minigpt4.models import MiniGPT4
from train_fixtures import load_train_module

REPO = Path(__file__).resolve().parents[1]
VICUNA = {"max_txt_len": 160, "end_sym": "###", "prompt_template": "###Human: {} ###Assistant: "}
FAST = {"max_new_tokens": 4, "do_sample": False}
DESCRIBE_TURN = (
    "###Human: <Img><ImageHere></Img> Describe this image in detail. Give as many details as possible. "
    "Say everything you see.###Assistant: "
)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def eval_cfg(write_yaml) -> Path:
    return write_yaml({"model": tiny_model_section("vicuna0", **VICUNA), "run": {"task": "image_text_pretrain"}}, "tiny_eval.yaml")


@pytest.fixture(scope="module")
def chat(eval_cfg):
    torch.manual_seed(0)
    return load_chat(eval_cfg)


@pytest.fixture
def image_dir(tmp_path, tiny_images) -> Path:
    folder = tmp_path / "my_images"
    (folder / "more").mkdir(parents=True)
    for path in tiny_images:
        shutil.copy(path, folder / path.name)
    Image.open(tiny_images[0]).save(folder / "more" / "d.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def script_replies(chat, monkeypatch, first: str, continuations: list[str]) -> list[str]:
    """``answer_batch`` says ``first``; each "Continue" gets the next of ``continuations``.

    Returns the prompts the continuations were asked with.
    """
    prompts, replies = [], iter(continuations)
    monkeypatch.setattr(chat, "answer_batch", lambda images, question, **kw: [first] * len(images))

    def answer(conv, img_list, **kw):
        conv.append_message(conv.roles[1], None)  # as Chat.answer: the prompt ends with the assistant's role
        prompts.append(conv.get_prompt())
        conv.messages[-1][1] = reply = next(replies)
        return reply, []

    monkeypatch.setattr(chat, "answer", answer)
    return prompts


# ---- describe + continue -----------------------------------------------------------------------
def test_a_short_answer_is_continued_in_the_same_conversation(chat, tiny_images, monkeypatch):
    long_reply = " ".join(["The box sits on a white background."] * 12)
    prompts = script_replies(chat, monkeypatch, "A red box.", [long_reply, "never asked"])
    [result] = s2.describe_images(chat, [Image.open(tiny_images[0])], min_tokens=80, max_continuations=3)
    # one continuation made it long enough: no second "Continue"
    assert (result["answer"], result["continuations"]) == (f"A red box. {long_reply}", 1)
    assert result["tokens"] == s2.count_tokens(chat.model.llama_tokenizer, result["answer"]) >= 80
    assert prompts == [chat.conv_template.system + DESCRIBE_TURN + "A red box.###Human: Continue###Assistant: "]


def test_continuations_are_capped_and_a_long_answer_is_left_alone(chat, tiny_images, monkeypatch):
    prompts = script_replies(chat, monkeypatch, "A box.", ["Red.", "White.", "Small.", "never asked"])
    [capped] = s2.describe_images(chat, [Image.open(tiny_images[0])], min_tokens=80, max_continuations=2)
    assert capped["answer"] == "A box. Red. White." and capped["continuations"] == 2
    assert prompts[1].endswith("A box.###Human: Continue###Assistant: Red.###Human: Continue###Assistant: ")

    long_first = " ".join(["A red box on white."] * 30)
    script_replies(chat, monkeypatch, long_first, [])
    [done] = s2.describe_images(chat, [Image.open(tiny_images[0])], min_tokens=80)
    assert done == {"answer": long_first, "tokens": done["tokens"], "continuations": 0} and done["tokens"] >= 80


def test_the_tiny_model_describes_a_folder_batched_with_continuations(chat, image_dir, monkeypatch, tmp_path):
    calls = {"batch": [], "continue": 0}
    answer_batch, answer = chat.answer_batch, chat.answer
    monkeypatch.setattr(chat, "answer_batch", lambda images, *a, **kw: calls["batch"].append(len(images)) or answer_batch(images, *a, **kw))
    monkeypatch.setattr(chat, "answer", lambda *a, **kw: calls.__setitem__("continue", calls["continue"] + 1) or answer(*a, **kw))
    raw = tmp_path / "out.raw.jsonl"
    # 4 new tokens at most: always shorter than 80, so every image gets its continuation
    assert s2.describe_folder(lambda: chat, image_dir, raw, batch_size=3, max_continuations=1, **FAST) == 5
    lines = rows(raw)
    assert [r["image"] for r in lines] == ["broken.jpg", "img0.jpg", "img1.jpg", "img2.jpg", "more/d.png"]
    assert "not an image" in lines[0]["error"]
    assert all(r["continuations"] == 1 and r["answer"] for r in lines[1:])
    # each line is what the chat says of that image: the first answer, then its continuation
    first = answer_batch([image_dir / "img0.jpg"], s2.DESCRIBE_QUESTION, **FAST)[0]
    assert lines[1]["answer"].startswith(first)
    assert calls == {"batch": [2, 2], "continue": 4}  # broken.jpg dropped from the first batch of 3


def test_decode_static_describes_a_folder_as_generate_does(chat, image_dir, tmp_path):
    # --decode static: each batch of descriptions side by side in the loop, then each continuation.
    static = Chat(chat.model, chat.vis_processor, chat.device, chat.conv_template, generation=chat.generation, decode="static")
    settings = dict(max_new_tokens=12, do_sample=False)
    written = {}
    for name, which in (("generate", chat), ("static", static)):
        raw = tmp_path / f"{name}.raw.jsonl"
        assert s2.describe_folder(lambda: which, image_dir, raw, batch_size=3, max_continuations=1, **settings) == 5
        written[name] = rows(raw)
    assert written["static"] == written["generate"]
    assert all(r["continuations"] == 1 and r["answer"] for r in written["static"][1:])


# ---- resume ------------------------------------------------------------------------------------
def test_an_interrupted_run_resumes_where_it_stopped(image_dir, tmp_path, monkeypatch):
    raw = tmp_path / "annotations.raw.jsonl"
    calls = []

    def fake_describe(chat, images, *a, **kw):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return [{"answer": f"text {len(calls)}", "tokens": 2, "continuations": 0}] * len(images)

    monkeypatch.setattr(s2, "describe_images", fake_describe)
    with pytest.raises(KeyboardInterrupt):
        s2.describe_folder(lambda: "chat", image_dir, raw, batch_size=2)
    first = [r["image"] for r in rows(raw)]
    assert first == ["broken.jpg", "img0.jpg"]  # the finished batch is on disk
    with open(raw, "a") as f:
        f.write('{"image": "img1.jpg", "ans')  # killed mid-write
    assert s2.describe_folder(lambda: "chat", image_dir, raw, batch_size=2) == 3
    assert [r["image"] for r in rows(raw)] == first + ["img1.jpg", "img2.jpg", "more/d.png"]

    def no_model():
        raise AssertionError("nothing left to describe: the model must not be loaded")

    assert s2.describe_folder(no_model, image_dir, raw) == 0


# ---- polish ------------------------------------------------------------------------------------
def test_polish_with_a_local_llm_without_a_chat_template():
    polisher = s2.Polisher(REF / "llama", max_new_tokens=5, batch_size=2)
    assert not polisher.use_chat_template
    prompt = polisher.prompt("A red box. A red box.")
    assert prompt.startswith(s2.POLISH_INSTRUCTION) and "A red box. A red box." in prompt
    texts = ["A red box. A red box.", "blue", "A green square on a white background."]
    out = polisher(texts)
    # a batch (left-padded) says what each text alone says, and only the new tokens come back
    assert out == [polisher([text])[0] for text in texts]
    assert not any(s2.POLISH_INSTRUCTION[:30] in text for text in out)
    assert any(out)  # the tiny LLM writes something


def test_polish_uses_the_chat_template_when_there_is_one(sp_llama_dir, tmp_path):
    folder = tmp_path / "instruct"
    shutil.copytree(sp_llama_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<s>USER: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    polisher = s2.Polisher(folder, max_new_tokens=3)
    assert polisher.use_chat_template
    assert polisher.prompt("the red box") == f"<s>USER: {s2.POLISH_INSTRUCTION}\n\nthe red box\nASSISTANT:"
    out = polisher(["the red box", "a blue circle"])
    assert out == [polisher(["the red box"])[0], polisher(["a blue circle"])[0]]
    assert not any("USER:" in text or "ASSISTANT:" in text for text in out)  # the template is not echoed


# ---- filter ------------------------------------------------------------------------------------
def test_filter_rules_are_named_and_readable():
    rules = s2.filter_rules(min_words=5)
    assert [(r.name, r.description) for r in rules] == [
        ("empty", "no text"),
        ("repeated_sentences", "the same sentence more than once"),
        ("too_short", "fewer than 5 words"),
    ]
    verdict = lambda text: getattr(s2.first_failed_rule(text, rules), "name", None)  # noqa: E731
    assert verdict("  ") == "empty"
    assert verdict("A red box sits here. It is small. A red box, sits here!") == "repeated_sentences"
    assert verdict("A red box.") == "too_short"
    assert verdict("A red box sits on a white table. It is small.") is None


def test_finish_polishes_filters_and_reports_every_rule(tmp_path):
    out = tmp_path / "annotations.jsonl"
    raw, rejected = s2.side_files(out)
    assert (raw.name, rejected.name) == ("annotations.raw.jsonl", "annotations.rejected.jsonl")
    raw.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "a.jpg", "answer": "A red box sits on a white table. It is small."},
        {"image": "b.jpg", "answer": "Blue."},
        {"image": "c.jpg", "answer": "drop me"},
        {"image": "d.jpg", "answer": "One two three four five. One two three four five."},
        {"image": "e.jpg", "error": "'e.jpg' is not an image"},
    ]))
    rules = s2.filter_rules(min_words=5)
    polish = lambda texts: ["" if t == "drop me" else t.upper() for t in texts]  # noqa: E731
    s2.finish(raw, out, rejected, rules, polisher_factory=lambda: polish, batch_size=2)
    assert rows(out) == [{"image": "a.jpg", "answer": "A RED BOX SITS ON A WHITE TABLE. IT IS SMALL."}]
    assert [(r["image"], r["rule"]) for r in rows(rejected)] == [
        ("b.jpg", "too_short"), ("c.jpg", "empty"), ("d.jpg", "repeated_sentences"), ("e.jpg", "unreadable"),
    ]
    assert rows(rejected)[0]["raw"] == "Blue."  # the text before polishing, to judge the rule
    counts = s2.report(out, rejected, rules)
    assert counts == {"kept": 1, "empty": 1, "repeated_sentences": 1, "too_short": 1, "unreadable": 1}
    text = s2.format_report(counts, rules, out, rejected)
    assert "too_short" in text and "fewer than 5 words" in text and "unreadable" in text

    s2.finish(raw, out, rejected, rules, polisher_factory=lambda: pytest.fail("all done: no polisher needed"))
    assert len(rows(out)) == 1 and len(rows(rejected)) == 4


def test_a_rerun_with_other_filter_settings_is_refused_rather_than_mixed(tmp_path):
    from minigpt4.common.cli import ArgumentError

    out = tmp_path / "annotations.jsonl"
    raw, rejected = s2.side_files(out)
    s2.check_filter_settings(out, rejected, {"min_words": 5, "polish_model": None})  # a first run
    out.write_text('{"image": "a.png", "answer": "a red square on white"}\n')
    s2.check_filter_settings(out, rejected, {"min_words": 5, "polish_model": None})  # the same: resumes
    with pytest.raises(ArgumentError, match=r"other settings \(min_words 5 -> 1\); to apply the new ones, remove '.*annotations\.jsonl', "
                       r"'.*annotations\.rejected\.jsonl' and '.*annotations\.jsonl\.settings\.json' \(the raw descriptions are kept"):
        s2.check_filter_settings(out, rejected, {"min_words": 1, "polish_model": None})
    out.unlink()
    s2.check_filter_settings(out, rejected, {"min_words": 1, "polish_model": None})  # removed as told: the new settings apply


# ---- end to end: the script, then a fine-tune on its output, then chat ----------------------------
def test_make_data_then_finetune_then_chat(eval_cfg, image_dir, tmp_path, monkeypatch):
    out = image_dir / "annotations.jsonl"
    counts = s2.main([
        "--cfg-path", str(eval_cfg), "--image-dir", str(image_dir), "--batch-size", "2", "--greedy",
        "--max-new-tokens", "6", "--max-continuations", "1", "--min-words", "1",
        "--polish-model", str(REF / "llama"), "--polish-max-new-tokens", "6",
    ])
    kept = rows(out)
    assert counts["kept"] == len(kept) >= 2 and counts["unreadable"] == 1
    assert all(set(r) == {"image", "answer"} and r["answer"] for r in kept)

    monkeypatch.chdir(REPO)  # the tiny config's paths are relative to the repository root
    runner = load_train_module().main([
        "--cfg-path", "train_configs/minigpt4_finetune_own_data_tiny_cpu.yaml",
        "--options", f"datasets.image_text_json.build_info.storage={image_dir}",
        f"run.output_dir={tmp_path / 'train'}", "run.job_id=job", "run.iters_per_epoch=3",
    ])
    ckpt = tmp_path / "train" / "job" / "checkpoint_0.pth"
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert set(saved) == {"llama_proj.weight", "llama_proj.bias"}
    start = MiniGPT4.from_config(tiny_model_section("vicuna0")).state_dict()
    trained = runner.unwrap_model().state_dict()
    assert {k for k in start if not torch.equal(start[k], trained[k])} == {"llama_proj.weight", "llama_proj.bias"}

    chat = load_chat(eval_cfg, options=[f"model.ckpt={ckpt}"])
    assert torch.equal(chat.model.llama_proj.weight.cpu(), saved["llama_proj.weight"])
    [reply] = chat.answer_batch([image_dir / kept[0]["image"]], "Describe this image in detail.", **FAST)
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image_dir / kept[0]["image"], conv, img_list)
    chat.ask("Describe this image in detail.", conv)
    assert reply == chat.answer(conv, img_list, **FAST)[0]  # captioning and chat give the fine-tuned model's answer
