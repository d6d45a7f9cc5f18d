"""A browser on demo.py: Debian's chromium driven by Playwright, and the page in its controls' words.

Shared by the browser tests and .ci/quickstart.py (which drives the README's quick start).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 60_000


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


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

        # A page still hydrating can drop the file input's change event: give it the file again. On
        # a busy machine the upload can also just be slow: a file that shows up late is not re-sent.
        # Success is the file's name in the upload box's text content, whitespace removed: Gradio
        # writes it as two spans, "img0" and ".png", with a space between them that innerText keeps
        # or drops depending on whether the box's styles apply yet.
        file_input = self.page.locator("#image-upload input[type=file]")
        listed = (
            "() => (document.querySelector('#image-upload')?.textContent || '')"
            f".replace(/\\s+/g, '').includes({path.name!r})"
        )
        for attempt in range(3):
            if file_input.count() and not self.page.evaluate(listed):
                file_input.set_input_files(str(path))
            try:
                self.page.wait_for_function(listed, timeout=30_000)
                break
            except PlaywrightTimeout:
                if attempt == 2:
                    self.save_failure("demo_upload_failed")
                    raise
        self.start_button.click()

    def save_failure(self, name: str) -> None:
        """A screenshot and the upload box's DOM, for a wait that timed out."""
        ARTIFACTS.mkdir(exist_ok=True)
        upload_box = self.page.evaluate("() => document.querySelector('#image-upload')?.outerHTML ?? 'no #image-upload'")
        (ARTIFACTS / f"{name}.html").write_text(upload_box + "\n")
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

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

    def click_example(self, index: int) -> None:
        """Click one of the nano page's example scenes and start the chat with it."""
        self.page.locator("#examples .thumbnail-item").nth(index).click()
        self.page.locator("#image-upload").get_by_text(".png").wait_for()
        self.start_button.click()
        self.page.locator("#image-view img").wait_for()
        self.page.wait_for_function("() => !document.querySelector('#question textarea').disabled")
