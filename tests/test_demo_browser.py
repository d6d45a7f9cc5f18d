"""demo.py in a real browser: Debian's chromium driven by Playwright, on the tiny model."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REF, REPO, tiny_model_section

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(write_yaml, tmp_path_factory):
    cfg = write_yaml({"model": tiny_model_section("vicuna0")}, "demo_tiny.yaml")
    port = free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "demo.py", "--cfg-path", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--concurrency", "1"],
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
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class DemoPage:
    """One browser session on the demo, in the words of the page's controls."""

    def __init__(self, browser, url):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.page.goto(url, wait_until="load")
        self.start_button.wait_for()

    @property
    def start_button(self):
        return self.page.get_by_role("button", name="Upload & Start Chat")

    @property
    def question_box(self):
        return self.page.locator("#question textarea")

    def messages(self, who: str) -> list[str]:
        return [t.strip() for t in self.page.locator(f"#chatbot .message-row.{who}-row").all_inner_texts()]

    def upload(self, path: Path) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        # A page still hydrating can drop the file input's change event: give it the file again.
        file_input = self.page.locator("#image-upload input[type=file]")
        for attempt in range(3):
            if file_input.count():
                file_input.set_input_files(str(path))
            try:
                self.page.locator("#image-upload").get_by_text(path.name).wait_for(timeout=15_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    self.page.screenshot(path=str(ARTIFACTS / "demo_upload_failed.png"), full_page=True)
                    raise
        self.start_button.click()

    def start_chat(self, path: Path) -> None:
        self.upload(path)
        self.page.locator("#image-view img").wait_for()
        self.page.wait_for_function("() => !document.querySelector('#question textarea').disabled")

    def send(self, question: str) -> None:
        self.question_box.fill(question)
        self.question_box.press("Enter")

    def wait_for_answers(self, n: int) -> None:
        self.page.wait_for_function(
            f"() => document.querySelectorAll('#chatbot .message-row.bot-row').length >= {n}"
            " && !document.querySelector('#question textarea').disabled"
        )

    def toast(self, text: str) -> str:
        toast = self.page.locator(".toast-body", has_text=text)
        toast.first.wait_for()
        return toast.first.inner_text()

    def dismiss_toasts(self) -> None:
        from playwright.sync_api import Error as PlaywrightError

        for button in self.page.locator("button.toast-close").all():
            try:
                button.click(timeout=2000)
            except PlaywrightError:
                pass  # it timed out and went away by itself
        self.page.locator(".toast-body").first.wait_for(state="detached")

    def close(self) -> None:
        self.context.close()


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
