"""What the command-line entry points share: a config, checkpoint or download that cannot be used
ends the program with its one-line message (which names the key, file or URL) and exit status 2,
instead of a traceback."""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import CheckpointError, DownloadError



class ArgumentError(ValueError):
    """A command-line argument that cannot be used; the message starts with the flag."""


USER_ERRORS = (ConfigError, CheckpointError, DownloadError, ArgumentError)


def existing_file(flag: str, path: str | Path) -> Path:
    """``path`` as typed, if it is a file; checked before any model is loaded."""
    if Path(path).is_dir():
        raise ArgumentError(f"{flag}: '{path}' is a folder, not a file")
    if not Path(path).is_file():
        raise ArgumentError(f"{flag}: no such file '{path}'")
    return Path(path)


def existing_folder(flag: str, path: str | Path) -> Path:
    if Path(path).is_file():
        raise ArgumentError(f"{flag}: '{path}' is a file, not a folder")
    if not Path(path).is_dir():
        raise ArgumentError(f"{flag}: no such folder '{path}'")
    return Path(path)


def writable_file(flag: str, path: str | Path) -> Path:
    """``path`` as typed, if a file can be written there (it, or the folders it needs, can be made)."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{flag}: '{path}' is a folder; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArgumentError(f"{flag}: '{parent}' is a file, so '{path}' cannot be written")
    if not os.access(parent, os.W_OK):
        raise ArgumentError(f"{flag}: cannot write in '{parent}'")
    return path


def port_number(text: str) -> int:
    """An argparse ``type``: a TCP port to listen on, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def add_gpu_id(parser: argparse.ArgumentParser, help: str = "GPU to load the model on") -> None:
    """``--gpu-id``: None unless given, so that a run without a GPU says it ignores only a GPU asked for."""
    def gpu(text: str) -> int:
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"expected a GPU number (0, 1, ...), got '{text}'")
        return int(text)

    parser.add_argument("--gpu-id", type=gpu, default=None, help=f"{help} (default: 0)")


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be listened on now (checked before the model takes minutes to load)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port_for(host: str, port: int) -> None:
    """Refuse ``--port`` when ``host:port`` is taken: said before a model loads, not after."""
    if not port_is_free(host, port):
        raise ArgumentError(f"--port: {host}:{port} is in use; pick another with --port")


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main()``; a :data:`USER_ERRORS` error exits with status 2 after printing ``error: ...``."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
