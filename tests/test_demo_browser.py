"""demo.py in a real browser: Debian's chromium driven by Playwright, on the tiny model."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from browser_page import ARTIFACTS, CHROMIUM, DemoPage, launch_chromium
from conftest import REF, REPO, free_port, tiny_model_section

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def serve_demo(tmp_path_factory, *args: str):
    """Start ``demo.py ARGS`` on a free port; yields its URL, then stops it and checks its log."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "demo.py", *args, "--host", "127.0.0.1", "--port", str(port), "--concurrency", "1"],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        if server.poll() is not None:
            pytest.fail(f"demo.py exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline:
                server.kill()
                pytest.fail(f"demo.py did not serve {url} in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def demo_url(write_yaml, tmp_path_factory):
    cfg = write_yaml({"model": tiny_model_section("vicuna0")}, "demo_tiny.yaml")
    yield from serve_demo(tmp_path_factory, "--cfg-path", str(cfg))


@pytest.fixture(scope="module")
def nano_url(smollm2_dir, tmp_path_factory):
    yield from serve_demo(tmp_path_factory)  # no --cfg-path: the nano default, as the quick start


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


def corrupt_png(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    return path


def test_chat_restart_errors_and_separate_sessions(demo_url, browser, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    alice = DemoPage(browser, demo_url)
    assert alice.question_box.is_disabled()

    alice.start_chat(REF / "img0.png")
    alice.send("Describe the shapes.")
    alice.wait_for_answers(1)
    alice.send("How many are there?")
    alice.wait_for_answers(2)
    assert alice.messages("user") == ["Describe the shapes.", "How many are there?"]
    assert len(alice.messages("bot")) == 2 and all(alice.messages("bot"))
    alice.page.screenshot(path=str(ARTIFACTS / "demo_chat.png"), full_page=True)

    # An empty question gets a message on the page, and the session goes on.
    alice.send("   ")
    assert "Please type a question" in alice.toast("Please type a question")

    # Two browser sessions at once: each sees only its own conversation.
    bob = DemoPage(browser, demo_url)
    bob.start_chat(REF / "img1.png")
    bob.send("Bob's question?")
    alice.send("Alice's third question?")
    bob.wait_for_answers(1)
    alice.wait_for_answers(3)
    assert bob.messages("user") == ["Bob's question?"]
    assert alice.messages("user") == ["Describe the shapes.", "How many are there?", "Alice's third question?"]
    bob.page.screenshot(path=str(ARTIFACTS / "demo_second_session.png"), full_page=True)
    bob.close()

    # Restart: empty chat, the upload box is back, no questions until a new picture.
    alice.page.get_by_role("button", name="Restart").click()
    alice.page.locator("#image-upload input[type=file]").wait_for(state="attached")
    alice.page.wait_for_function("() => document.querySelector('#question textarea').disabled")
    assert alice.messages("user") == [] and alice.messages("bot") == []
    assert alice.page.locator("#image-view img").count() == 0

    # A corrupt upload is refused with the reason, and the page stays usable.
    alice.dismiss_toasts()
    alice.upload(corrupt_png(tmp_path))
    assert "'corrupt.png' is not an image" in alice.toast("Cannot use this upload")
    alice.page.screenshot(path=str(ARTIFACTS / "demo_corrupt_upload.png"), full_page=True)
    alice.page.get_by_role("button", name="Restart").click()
    alice.start_chat(REF / "img_wide.png")
    alice.send("And this one?")
    alice.wait_for_answers(1)
    assert alice.messages("user") == ["And this one?"]
    alice.close()


def test_the_nano_page_says_what_it_is_and_its_example_scenes_get_answers(nano_url, browser):
    from minigpt4.datasets.datasets.synthetic_shapes import parse_objects

    ARTIFACTS.mkdir(exist_ok=True)
    page = DemoPage(browser, nano_url)
    intro = page.page.locator("#model-intro").inner_text()
    assert "nano MiniGPT-4" in intro and "SmolLM2-135M-Instruct" in intro and "eval_configs/minigpt4_eval.yaml" in intro
    thumbnails = page.page.locator("#examples .thumbnail-item")
    thumbnails.nth(5).wait_for()  # the gallery fills in after the page: on a loaded machine, later
    assert thumbnails.count() == 6
    page.click_example(2)
    page.send("Describe this image.")
    page.wait_for_answers(1)
    page.page.screenshot(path=str(ARTIFACTS / "demo_nano_example.png"), full_page=True)
    answer = page.messages("bot")[0]
    assert parse_objects(answer), answer  # it names coloured shapes
    # the temperature slider starts at the config's greedy decoding
    assert page.page.get_by_label("Temperature (0: greedy)").first.input_value() == "0"
    page.close()
