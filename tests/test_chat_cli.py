"""``python -m minigpt4.chat``: terminal chat over a pipe, and resumable batch captioning."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REF, REPO, free_port, tiny_model_section

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "minigpt4.chat", *args]


@pytest.fixture(scope="module")
def tiny_cfg(write_yaml) -> Path:
    return write_yaml({"model": tiny_model_section("vicuna0")}, "tiny_vicuna0.yaml")


def test_chat_over_a_pipe(tiny_cfg):
    questions = "Describe the shapes.\n\nHow many are there?\n"
    run = subprocess.run(
        cli("--cfg-path", str(tiny_cfg), "--image", str(REF / "img0.png"), "--max-new-tokens", "20", "--greedy"),
        input=questions, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    answers = [line for line in run.stdout.splitlines() if line.startswith("Assistant: ")]
    assert len(answers) == 2, run.stdout
    assert "Traceback" not in run.stderr


def test_ctrl_c_at_a_terminal_stops_the_answer_not_the_chat(caplog):
    """Ctrl-C while an answer is printed (here: raised by the terminal's third write) stops that
    answer, the engine stops writing it, the question is forgotten, and the chat goes on."""
    import io
    import logging

    from minigpt4.chat import DEFAULT_CFG, chat_loop, load_chat
    from minigpt4.datasets.datasets.synthetic_shapes import SyntheticShapesDataset

    chat = load_chat(DEFAULT_CFG, reuse_kv_cache=False)
    scene = SyntheticShapesDataset(lambda image: image, seed=5).scene(0)[1]

    class Screen(io.StringIO):
        writes = 0

        def write(self, text):
            Screen.writes += 1
            if Screen.writes == 3:  # the greeting, "Assistant: ", then Ctrl-C at the answer's first piece
                raise KeyboardInterrupt
            return super().write(text)

    screen = Screen()
    seen = []
    ask = chat.ask
    chat.ask = lambda text, conv: seen.append([list(m) for m in conv.messages]) or ask(text, conv)
    with caplog.at_level(logging.INFO, logger="minigpt4.conversation.engines"):
        chat_loop(chat, [scene], ["Describe this image.", "How many shapes are there?"], out=screen, interactive=True, max_new_tokens=40)
    assert "[stopped: the question is forgotten; ask again]" in screen.getvalue()
    assert "reader left after" in caplog.text  # the engine stopped writing the answer
    assert seen[1] == seen[0]  # the second question is asked of the conversation before the first
    assert screen.getvalue().rstrip().endswith(".") and screen.getvalue().count("Assistant: ") == 2


def test_decode_static_answers_as_generate_over_a_pipe(write_yaml):
    # The tiny Llama-2 chat: a short answer, then one to the token limit.
    cfg = write_yaml({"model": tiny_model_section("llama2")}, "tiny_llama2.yaml")
    answers = []
    for decode in ("generate", "static"):
        run = subprocess.run(
            cli("--cfg-path", str(cfg), "--image", str(REF / "img0.png"), "--max-new-tokens", "24", "--greedy", "--decode", decode),
            input="Describe the shapes.\nHow many are there?\n", capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        answers.append([line for line in run.stdout.splitlines() if line.startswith("Assistant: ")])
    assert len(answers[0]) == 2 and answers[1] == answers[0]
    assert any(len(a) > len("Assistant: ") + 10 for a in answers[0]), answers[0]


def test_decode_static_captions_a_folder_as_generate_does(write_yaml, tiny_images, tmp_path):
    # One prompt for every image: each batch's contexts are of one length, and the static loop
    # decodes them side by side (the tiny Llama-2 chat writes to the limit, so rows run long).
    cfg = write_yaml({"model": tiny_model_section("llama2")}, "tiny_llama2.yaml")
    folder = tmp_path / "images"
    folder.mkdir()
    for path in tiny_images:
        shutil.copy(path, folder / path.name)
    captions = {}
    for decode in ("generate", "static"):
        out = tmp_path / f"{decode}.jsonl"
        run = subprocess.run(
            cli("--cfg-path", str(cfg), "--caption-dir", str(folder), "--out", str(out), "--batch-size", "3",
                "--max-new-tokens", "16", "--greedy", "--decode", decode),
            capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        captions[decode] = {line["image"]: line["caption"] for line in read_captions(out)}
    assert len(captions["static"]) == 3 and captions["static"] == captions["generate"]
    assert all(len(caption) > 10 for caption in captions["generate"].values()), captions


def test_a_bad_config_ends_with_its_message_not_a_traceback(write_yaml, tmp_path):
    cfg = write_yaml({"model": tiny_model_section("vicuna0", llama_model=str(tmp_path / "no-vicuna"))}, "bad_llm.yaml")
    run = subprocess.run(
        cli("--cfg-path", str(cfg), "--image", str(REF / "img0.png")),
        input="", capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120,
    )
    assert run.returncode == 2
    assert f"error: model.llama_model: no such folder '{tmp_path / 'no-vicuna'}'" in run.stderr
    assert "Traceback" not in run.stderr


def test_chat_names_a_bad_image(tiny_models, tmp_path):
    from minigpt4.chat import chat_loop
    from minigpt4.common.cli import ArgumentError
    from minigpt4.conversation import CONV_VISION_Vicuna0, Chat
    from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    (tmp_path / "bad.jpg").write_text("no picture here")
    with pytest.raises(ArgumentError, match="--image: 'bad.jpg' is not an image"):
        chat_loop(chat, [tmp_path / "bad.jpg"], ["hi"])


def cli_error(argv: list[str], capsys) -> str:
    """``python -m minigpt4.chat ARGV`` in this process: its exit status must be 2; returns the last stderr line."""
    from minigpt4.chat import main
    from minigpt4.common.cli import run_main

    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: main(argv))
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "tests"], "error: --image: 'tests' is a folder, not a file"),
        (["--image", "README.md"], "error: --image: 'README.md' is not an image"),
        (["--cfg-path", "eval_configs", "--image", "nope.png"], "error: --cfg-path: 'eval_configs' is a folder, not a file"),
        (["--caption-dir", "nowhere", "--out", "c.jsonl"], "error: --caption-dir: no such folder 'nowhere'"),
        (["--image", str(REF / "img0.png"), "--max-new-tokens", "0"], "error: --max-new-tokens: must be at least 1, got 0"),
        (["--image", str(REF / "img0.png"), "--decode", "graph"], "python -m minigpt4.chat: error: argument --decode: invalid choice: 'graph'"),
        (["--image", str(REF / "img0.png"), "--out", "c.jsonl"], "python -m minigpt4.chat: error: --out: for --caption-dir only"),
        (["--image", str(REF / "img0.png"), "--prompt", "Hi", "--batch-size", "2"], "python -m minigpt4.chat: error: --prompt, --batch-size: for --caption-dir only"),
        (["--image", str(REF / "img0.png"), "--temperature", "-1"], "error: --temperature: -1 is not a sampling temperature (0 is greedy; above 0 samples)"),
        (["--caption-dir", "tests", "--out", "README.md/c.jsonl"], "error: --out: 'README.md' is a file, so 'README.md/c.jsonl' cannot be written"),
        (["--caption-dir", "tests", "--out", "tests"], "error: --out: 'tests' is a folder; give a file name"),
    ],
)
def test_arguments_are_checked_before_the_model_loads(args, message, capsys, monkeypatch):
    import minigpt4.chat

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(minigpt4.chat, "load_chat", lambda *a, **k: pytest.fail("the model was loaded before the arguments were checked"))
    assert cli_error(args, capsys).startswith(message)


def test_a_missing_image_ends_the_real_command_with_one_line_and_status_2():
    run = subprocess.run(cli("--image", "nope.png"), input="", capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == "error: --image: no such file 'nope.png'"
    assert "Traceback" not in run.stderr and "ready on" not in run.stderr  # no model was loaded


def test_demo_checks_its_config_path_before_loading():
    run = subprocess.run([sys.executable, "demo.py", "--cfg-path", "eval_configs"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == "error: --cfg-path: 'eval_configs' is a folder, not a file"


def test_an_unreachable_hub_id_ends_with_one_line(tiny_cfg, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there: the hub "is down"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(tiny_cfg).parent / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    argv = ["--cfg-path", str(tiny_cfg), "--options", "model.llama_model=someone/vicuna-7b", "--image", str(REF / "img0.png")]
    assert cli_error(argv, capsys) == (
        "error: model.llama_model: cannot reach the Hugging Face hub for 'someone/vicuna-7b' (ConnectError); "
        "download it where there is network (huggingface-cli download someone/vicuna-7b) and set model.llama_model to that folder"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in cli_error(argv, capsys)


def read_captions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_captioning_resumes_after_an_interrupt(tiny_cfg, tiny_images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    # Enough images that the interrupt lands mid-run even where a tiny model captions fast.
    for i in range(48):
        src = tiny_images[i % len(tiny_images)]
        shutil.copy(src, folder / f"{i:02d}_{src.name}")
    (folder / "broken.jpg").write_text("not a jpeg")
    (folder / "readme.txt").write_text("not an image at all, and not named like one")
    out = tmp_path / "captions.jsonl"
    args = cli(
        "--cfg-path", str(tiny_cfg), "--caption-dir", str(folder), "--out", str(out),
        "--batch-size", "2", "--max-new-tokens", "300", "--greedy", "--prompt", "Describe this image.",
    )

    first = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    done_first = read_captions(out)
    assert 2 <= len(done_first) < 48

    # A run killed while writing leaves half a line: the next run drops it and redoes that image.
    with open(out, "a") as f:
        f.write('{"image": "07_img1.jp')
    second = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert "skipped: 'broken.jpg' is not an image" in second.stderr
    assert f"{len(done_first)} already captioned" in second.stderr

    captions = read_captions(out)
    assert captions[: len(done_first)] == done_first
    assert sorted(c["image"] for c in captions) == sorted(p.name for p in folder.glob("[0-9]*.jpg"))
    assert all(isinstance(c["caption"], str) and set(c) == {"image", "caption"} for c in captions)


def test_caption_folder_in_process_matches_one_at_a_time(tiny_models, tiny_images, tmp_path):
    """The CLI's batches give the captions a one-image-at-a-time chat gives (greedy)."""
    from minigpt4.chat import caption_folder
    from minigpt4.conversation import CONV_VISION_Vicuna0, Chat
    from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for path, place in zip(tiny_images, ["", "sub/", "sub/"]):
        shutil.copy(path, folder / f"{place}{path.name}")
    shutil.copy(tiny_images[0], folder / ".hidden" / "skipped.jpg")
    generation = dict(do_sample=False, max_new_tokens=8)
    out = tmp_path / "captions.jsonl"
    assert caption_folder(chat, folder, out, "Describe this image.", batch_size=2, **generation) == 3
    assert [line["image"] for line in read_captions(out)] == ["img0.jpg", "sub/img1.jpg", "sub/img2.jpg"]  # subfolders too, by their path
    assert caption_folder(chat, folder, out, "Describe this image.", batch_size=2, **generation) == 0
    for line in read_captions(out):
        conv, img_list = chat.new_conversation(), []
        chat.upload_img(folder / line["image"], conv, img_list)
        chat.ask("Describe this image.", conv)
        assert chat.answer(conv, img_list, **generation)[0] == line["caption"]


@pytest.mark.parametrize("name, model_type, end_sym, template", [
    ("minigpt4_eval.yaml", "pretrain_vicuna0", "###", "###Human: {} ###Assistant: "),
    ("minigpt4_llama2_eval.yaml", "pretrain_llama2", "</s>", "[INST] {} [/INST] "),
])
def test_eval_configs_are_the_originals(name, model_type, end_sym, template):
    from minigpt4.common.config import Config
    cfg = Config(cfg_path=str(REPO / "eval_configs" / name))
    model = cfg.model_cfg
    assert (model.arch, model.model_type, model.max_txt_len, model.end_sym) == ("mini_gpt4", model_type, 160, end_sym)
    assert model.low_resource is True and model.prompt_template == template
    assert dict(cfg.datasets_cfg.cc_sbu_align.vis_processor.train) == {"name": "blip2_image_eval", "image_size": 224}
    assert cfg.run_cfg.task == "image_text_pretrain"


def test_decoding_flags_override_only_what_they_name():
    from minigpt4.chat import generation_from_args, parse_args

    def settings(*flags):
        return generation_from_args(parse_args(["--image", "x.png", *flags]))

    assert settings() == {}  # everything from the config's generation section
    assert settings("--greedy", "--max-new-tokens", "20") == {"do_sample": False, "max_new_tokens": 20}
    assert settings("--temperature", "0.5") == {"do_sample": True, "temperature": 0.5}
    assert settings("--sample") == {"do_sample": True}
    assert settings("--temperature", "0") == {"do_sample": False}  # greedy, as in the demo


def test_a_whole_last_line_without_its_newline_is_kept(tmp_path):
    """A captions file written by hand or another program: its last line is a caption, not a half-written one."""
    from minigpt4.chat import done_images

    out = tmp_path / "mine.jsonl"
    out.write_text('{"image": "x.jpg", "caption": "a"}\n{"image": "y.jpg", "caption": "b"}')
    assert done_images(out) == {"x.jpg", "y.jpg"}
    assert out.read_text().endswith('"b"}\n')  # the next line written starts a line of its own
    out.write_text('{"image": "x.jpg", "caption": "a"}\n{"image": "y.jp')
    assert done_images(out) == {"x.jpg"} and out.read_text() == '{"image": "x.jpg", "caption": "a"}\n'


def test_demo_checks_its_numbers_and_its_port_before_loading():
    run = subprocess.run([sys.executable, "demo.py", "--concurrency", "0"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith("error: --concurrency: must be at least 1, got 0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "demo.py", "--port", str(port)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: --port: 127.0.0.1:{port} is in use; pick another with --port"
    assert "Initializing Chat" not in run.stderr  # before the model loads


@pytest.mark.parametrize("program", [["demo.py"], ["-m", "minigpt4.apps.serve"]])
def test_a_port_is_checked_before_loading(program):
    """Out of range: argparse says so; in use: said before the model loads (the server once logged
    "serving ... on" and "startup complete" first)."""
    run = subprocess.run([sys.executable, *program, "--port", "99999"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith("error: argument --port: a port is 1 to 65535, got 99999")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, *program, "--port", str(port)], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"error: --port: 127.0.0.1:{port} is in use; pick another with --port"
    assert "ready on" not in run.stderr and "serving" not in run.stderr  # before the model loads


def test_without_a_gpu_only_a_gpu_asked_for_is_said_to_be_ignored(caplog):
    import logging

    from minigpt4.chat import pick_device

    with caplog.at_level(logging.INFO, logger="minigpt4.chat"):
        assert pick_device() == torch.device("cpu")
        assert pick_device(1) == torch.device("cpu")
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert said == [(logging.INFO, "no CUDA GPU: running on the CPU"), (logging.WARNING, "no CUDA GPU: running on the CPU (--gpu-id 1 ignored)")]
    run = subprocess.run([sys.executable, "-m", "minigpt4.chat", "--gpu-id", "-1", "--image", "x.png"], capture_output=True, text=True,
                         cwd=REPO, env=ENV, timeout=120)
    assert run.returncode == 2 and "argument --gpu-id: expected a GPU number (0, 1, ...), got '-1'" in run.stderr


def test_chat_starts_from_the_configs_decoding(tiny_models):
    from minigpt4.conversation import CONV_VISION_Vicuna0, Chat
    from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

    chat = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0, generation={"do_sample": False, "max_new_tokens": 7})
    kwargs = chat.generation_kwargs()
    assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] == 7 and "temperature" not in kwargs
    assert chat.generation_kwargs(do_sample=True, temperature=0.5)["temperature"] == 0.5
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(REF / "img0.png", conv, img_list)
    chat.ask("What is it?", conv)
    _, tokens = chat.answer(conv, img_list)
    assert len(tokens) <= 7
    original = Chat(tiny_models["vicuna0"], Blip2ImageEvalProcessor(224), "cpu", CONV_VISION_Vicuna0).generation_kwargs()
    assert (original["do_sample"], original["top_p"], original["temperature"], original["max_new_tokens"]) == (True, 0.9, 1.0, 300)
