"""What the command-line entry points share: a config, checkpoint or download that cannot be used
ends the program with its one-line message (which names the key, file or URL) and exit status 2,
instead of a traceback."""
from __future__ import annotations

import sys
from typing import Any, Callable

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import CheckpointError, DownloadError

USER_ERRORS = (ConfigError, CheckpointError, DownloadError)


def run_main(main: Callable[[], Any]) -> None:
    """Call ``main()``; a :data:`USER_ERRORS` error exits with status 2 after printing ``error: ...``."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
