"""Paths, cached downloads and checkpoint reading shared by models, runner and chat."""
from __future__ import annotations

import logging
import os
import urllib.error
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import torch

from minigpt4.common.registry import registry

logger = logging.getLogger(__name__)

LIBRARY_ROOT = Path(__file__).resolve().parents[1]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: missing, truncated, or of a foreign format."""


class DownloadError(RuntimeError):
    """A URL that could not be fetched into the cache."""


def default_cache_root() -> Path:
    env = os.environ.get("MINIGPT4_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(xdg).expanduser() / "minigpt4"


registry.register_path("library_root", str(LIBRARY_ROOT))
registry.register_path("cache_root", str(default_cache_root()))


def is_url(value: str) -> bool:
    return urlparse(str(value)).scheme in ("http", "https")


def get_abs_path(rel_path: str | os.PathLike) -> Path:
    """A path as written in a packaged YAML: absolute, relative to the cwd, or to the package."""
    path = Path(rel_path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    packaged = LIBRARY_ROOT / path
    return packaged if packaged.exists() else path


def cached_download(url: str, key: str) -> Path:
    """Fetch ``url`` once into the cache (tqdm bar, temp file + rename) and return the local file.

    ``key`` is the config key the URL came from, named in the error so the user knows what to
    point at a local copy instead.
    """
    target = Path(registry.get_path("cache_root")) / "checkpoints" / Path(urlparse(url).path).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s to %s", url, target)
    try:
        # download_url_to_file writes to a temporary file beside the target and renames it
        # when complete, so an interrupted download never leaves a truncated checkpoint.
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DownloadError(
            f"{key}: could not download {url} ({err}). Download it by hand and set {key} to the "
            f"local file, or place it at {target}."
        ) from err
    return target


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``.

    A reader, another process writing the same path, or a run killed mid-write sees the old file
    or the new one, never half of one. The temporary name holds the process id, so concurrent
    writers (DDP ranks) never share it. A write that fails (a full disk) removes its temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve_file(value: str | os.PathLike, key: str) -> Path:
    """A config value naming a file: a URL (downloaded once) or a local path that must exist."""
    if is_url(str(value)):
        return cached_download(str(value), key)
    path = get_abs_path(value)
    if not path.is_file():
        raise CheckpointError(f"{key}: no such file '{value}'")
    return path


def load_state_dict_file(path: str | os.PathLike, key: str = "checkpoint") -> dict[str, Any]:
    """Read a ``.pth``/``.bin``/``.safetensors`` file without executing pickled code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; one clear message here
        raise CheckpointError(f"{key}: cannot read '{path}' as a checkpoint ({type(err).__name__}: {err})") from err


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Take the tensors out of the usual containers (``model``, ``state_dict``, ``module``...)."""
    for container in ("model", "state_dict", "module", "model_ema"):
        inner = checkpoint.get(container) if isinstance(checkpoint, Mapping) else None
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    return {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
