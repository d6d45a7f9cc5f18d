"""What the command-line entry points share: a config, checkpoint or download that cannot be used
ends the program with its one-line message (which names the key, file or URL) and exit status 2,
instead of a traceback."""
from __future__ import annotations

import os
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


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main()``; a :data:`USER_ERRORS` error exits with status 2 after printing ``error: ...``."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
