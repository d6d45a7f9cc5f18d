"""An on-disk cache of what the frozen vision side makes of each image (``run.feature_cache``).

With the ViT and Q-Former frozen, an image gives the same ``MiniGPT4.vision_features`` every
time it is seen: after the first epoch they can be read instead of computed. Entries are keyed
by the *processed* image tensor's bytes (:func:`image_key`, computed in the data loader's
workers), so a hit is exact: the same pixels after the same processor. A processor with random
augmentation would make every sample new; the runner refuses that combination.

Layout: ``<root>/cache.json`` records a fingerprint of the vision weights and settings that made
the features (:func:`vision_fingerprint`); a cache made by other weights is refused, not mixed.
Each image is ``<root>/<key[:2]>/<key>.pt``, written atomically (temp file + rename), so ranks
and killed runs never leave half a file behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from minigpt4.common.config import ConfigError
from minigpt4.common.utils import write_atomic

logger = logging.getLogger(__name__)

FORMAT = "minigpt4-feature-cache"


def image_key(image: torch.Tensor) -> str:
    """A content hash of one processed image (dtype, shape and bytes)."""
    tensor = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def vision_fingerprint(modules: Sequence[nn.Module | nn.Parameter | None], settings: dict) -> str:
    """A digest of the vision weights (per tensor: name, shape, dtype, sum, sum of squares) and ``settings``."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode())
    for index, module in enumerate(modules):
        if module is None:
            continue
        tensors = [("", module)] if isinstance(module, torch.Tensor) else list(module.state_dict().items())
        for name, tensor in tensors:
            values = tensor.detach().double()
            stats = torch.stack([values.sum(), values.square().sum()]).cpu().tolist()
            digest.update(f"{index}.{name}{tuple(tensor.shape)}{tensor.dtype}{stats}".encode())
    return digest.hexdigest()


class FeatureCache:
    """``features(keys, images, compute)``: cached features where present, ``compute`` for the rest."""

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.hits = 0
        self.misses = 0
        meta_path = self.root / "cache.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ConfigError(f"run.feature_cache: {meta_path} is unreadable ({err}); delete the folder to start a new cache") from None
            if meta.get("format") != FORMAT:
                raise ConfigError(f"run.feature_cache: {self.root} is not a feature cache (no '{FORMAT}' in {meta_path.name})")
            if meta.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"run.feature_cache: {self.root} holds features of other vision weights or settings "
                    f"(fingerprint {meta.get('fingerprint')}, this model {fingerprint}); point it at a new folder or delete it"
                )
        else:
            if self.root.exists() and not self.root.is_dir():
                raise ConfigError(f"run.feature_cache: {self.root} is a file, not a folder")
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps({"format": FORMAT, "fingerprint": fingerprint})))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def features(self, keys: Sequence[str], images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(B, N, C) features of ``images``, one per key; computes and stores the ones not cached."""
        if images.dim() != 4 or len(keys) != len(images):
            raise ValueError(f"run.feature_cache: expected one image per key, (B, 3, H, W); got {len(keys)} keys and images {tuple(images.shape)}")
        found = [self._load(key) for key in keys]
        missing = [i for i, feature in enumerate(found) if feature is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = compute(images[missing])
            for i, feature in zip(missing, computed):
                found[i] = feature
                self._store(keys[i], feature)
        reference = computed[0] if missing else found[0]
        return torch.stack([f.to(device=images.device, dtype=reference.dtype) for f in found])

    def _load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged entry is recomputed and rewritten
            logger.warning("run.feature_cache: unreadable entry %s (%s: %s); computing it again", path, type(err).__name__, err)
            return None

    def _store(self, key: str, feature: torch.Tensor) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        feature = feature.detach().to("cpu").clone()
        write_atomic(path, lambda tmp: torch.save(feature, tmp))
