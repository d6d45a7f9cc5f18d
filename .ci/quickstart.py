"""The README's quick start, word for word, as a new user meets it; then a question through the page.

The fenced block after ``<!-- quickstart -->`` in README.md runs unchanged with bash in a fresh clone
of this checkout: its own venv with only the extras it names, an empty model cache, the real package
index. When the page answers, Debian's chromium opens it, clicks an example scene, asks for a
description and checks that the answer names coloured shapes. Run with a Python that has
Playwright (CI's test venv): ``python .ci/quickstart.py``.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
URL = "http://127.0.0.1:7860/"  # demo.py's default, as the README's command starts it
START_LIMIT_S = 30 * 60  # the install downloads torch and the LLM wheel


def quickstart_block(readme: Path) -> str:
    match = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", readme.read_text(encoding="utf-8"), re.S)
    if match is None:
        raise SystemExit("README.md: no ```bash block after <!-- quickstart -->")
    return match.group(1)


def wait_for_page(server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the quick start ended with {server.returncode} before the page came up:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(URL, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no page at {URL} after {START_LIMIT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)


def ask_through_the_page() -> str:
    from playwright.sync_api import sync_playwright

    from browser_page import ARTIFACTS, DemoPage, launch_chromium
    from minigpt4.datasets.datasets.synthetic_shapes import parse_objects

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = DemoPage(browser, URL)
        intro = page.page.locator("#model-intro").inner_text()
        if "nano MiniGPT-4" not in intro:
            raise SystemExit(f"the page does not say which model runs: {intro!r}")
        page.click_example(0)
        page.send("Describe this image.")
        page.wait_for_answers(1)
        page.page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=True)
        answer = page.messages("bot")[0]
        browser.close()
    if not parse_objects(answer):
        raise SystemExit(f"the answer names no coloured shape: {answer!r}")
    return answer


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="minigpt4-quickstart-"))
    clone = work / "minigpt4"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    script = work / "quickstart.sh"
    script.write_text("set -e\n" + quickstart_block(REPO / "README.md"))
    print(f"the README's quick start, in {clone}:\n{script.read_text()}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(MINIGPT4_CACHE=str(work / "cache"), GRADIO_ANALYTICS_ENABLED="False")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(os.environ.get("VIRTUAL_ENV", "\0")))
    log = work / "quickstart.log"
    start = time.monotonic()
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", str(script)], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_page(server, log)
        print(f"page up after {time.monotonic() - start:.0f} s (install, first start)", flush=True)
        answer = ask_through_the_page()
        print(f"the page answered: {answer!r} ({time.monotonic() - start:.0f} s in all)")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        text = log.read_text()
        shutil.rmtree(work, ignore_errors=True)
    if "Traceback" in text:
        raise SystemExit(f"the demo logged a traceback:\n{text[-4000:]}")


if __name__ == "__main__":
    main()
