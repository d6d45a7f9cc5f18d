from __future__ import annotations

from typing import Any, Mapping

from omegaconf import OmegaConf


class BaseProcessor:
    """A callable turning one raw item (PIL image, caption) into model input."""

    # True where the same item can give different outputs (random crops): nothing computed from
    # the output can be cached per item (``run.feature_cache``).
    random_augmentation = False

    def __call__(self, item: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None = None) -> "BaseProcessor":
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg or {})
        cfg.pop("name", None)
        try:
            return cls(**cfg)
        except TypeError as err:
            raise ValueError(f"{cls.__name__}: bad processor config {cfg} ({err})") from err
