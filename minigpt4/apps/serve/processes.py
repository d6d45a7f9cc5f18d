"""Servers as child processes, for the benchmark and the tests: start one on a free loopback port,
wait until its ``/health`` answers, stop it (with the processes it spawned) by its process group."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Sequence


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once ``url/health`` answers 200; raise with the log's tail if the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.name}: exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{log.name}: no answer from {url}/health within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def launch(cmd: Sequence[str], log: Path, timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """Run ``cmd --host 127.0.0.1 --port P`` (its own process group, one thread unless ``env`` says
    otherwise) and return its URL and process once it is healthy."""
    port = port or free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env,
                               stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log, timeout)
    except BaseException:
        stop(process)
        raise
    return url, process


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    """Signal the process group (vLLM's engine and worker processes too) and wait; kill after ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode
