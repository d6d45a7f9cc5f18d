"""demo.py's handlers without a browser: bad input and failed generations leave a usable session."""
from __future__ import annotations

import importlib.util

import gradio as gr
import pytest

from conftest import REF, REPO


@pytest.fixture(scope="module")
def demo_module():
    spec = importlib.util.spec_from_file_location("minigpt4_demo", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.fixture(scope="module")
def handlers(tiny_models, demo_module):
    demo = demo_module
    from minigpt4.conversation import CONV_VISION_Vicuna0, Chat
    from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    return demo.Handlers(chat)


def started(handlers):
    *_, conv, img_list = handlers.start_chat(str(REF / "img0.png"), None, [])
    return conv, img_list


def test_uploads_are_checked(handlers, tmp_path):
    with pytest.raises(gr.Error, match="choose an image"):
        handlers.start_chat(None, None, [])
    (tmp_path / "a.png").write_text("text")
    with pytest.raises(gr.Error, match="'a.png' is not an image"):
        handlers.start_chat(str(tmp_path / "a.png"), None, [])
    conv, img_list = started(handlers)
    assert conv.messages == [["Human: ", "<Img><ImageHere></Img>"]] and len(img_list) == 1


def test_a_failed_generation_leaves_the_session_usable(handlers, monkeypatch):
    conv, img_list = started(handlers)
    _, chatbot, pending = handlers.ask("What is it?", [], conv)
    assert pending == "What is it?" and chatbot == [{"role": "user", "content": "What is it?"}]

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")
        yield  # pragma: no cover

    monkeypatch.setattr(handlers.chat, "stream_answer", broken)
    steps = handlers.answer(pending, chatbot, conv, img_list, 1, 1.0)
    with pytest.raises(gr.Error, match="CUDA out of memory"):
        list(steps)
    assert conv.messages == [["Human: ", "<Img><ImageHere></Img>"]]  # untouched
    monkeypatch.undo()

    outputs = list(handlers.answer(pending, chatbot, conv, img_list, 1, 1.0))
    chatbot, new_conv = outputs[-1]
    assert [m["role"] for m in chatbot] == ["user", "assistant"] and chatbot[-1]["content"]
    assert new_conv.messages[0][1] == "<Img><ImageHere></Img> What is it?"
    assert new_conv.messages[-1][0] == "Assistant: " and new_conv.messages[-1][1] is not None


@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a page is a Python warning
def test_empty_questions_and_chat_before_upload_are_refused(handlers):
    conv, _ = started(handlers)
    update, chatbot, pending = handlers.ask("   ", [], conv)
    assert pending == "" and chatbot == []
    update, chatbot, pending = handlers.ask("hello", [], None)
    assert pending == "" and chatbot == []


def test_clear_keeps_the_picture(handlers):
    conv, img_list = started(handlers)
    handlers.chat.ask("Q", conv)
    conv.append_message(conv.roles[1], "A")
    fresh, pending, question_box = handlers.clear_history(conv, img_list)
    assert fresh.messages == [["Human: ", "<Img><ImageHere></Img>"]] and pending == ""
    assert question_box["interactive"] is True  # also when the clear stopped an answer that had locked it


def test_restart_and_clear_stop_the_answer_being_written(demo_module, handlers):
    """Otherwise the answer's last step writes the old conversation back into the session."""
    page = demo_module.build_demo(handlers.chat)
    dependencies = page.get_config_file()["dependencies"]
    name = {d["id"]: getattr(page.fns[d["id"]], "name", None) for d in dependencies}
    [answer] = [i for i, n in name.items() if n == "answer"]
    for handler in ("restart", "clear_history"):
        [trigger] = [d["targets"] for d in dependencies if name[d["id"]] == handler]
        # Gradio cancels through an event of its own on the same trigger.
        assert any(d["targets"] == trigger and answer in d["cancels"] for d in dependencies), handler
