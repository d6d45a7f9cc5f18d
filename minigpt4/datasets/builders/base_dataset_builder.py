"""What a dataset builder does: find its default YAML, build processors, check storage, build."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from minigpt4.common.registry import RegistryError, registry
from minigpt4.common.utils import LIBRARY_ROOT, get_abs_path
from minigpt4.datasets.data_utils import DatasetError

logger = logging.getLogger(__name__)


class BaseDatasetBuilder:
    """``builder = Cls(cfg); builder.build_datasets() -> {"train": dataset}``.

    ``cfg`` is the merged ``datasets.<name>`` section (the builder's default YAML under the
    user's). Subclasses set ``DATASET_CONFIG_DICT`` and implement :meth:`build`.
    """

    DATASET_CONFIG_DICT: dict[str, str] = {}
    name: str = ""
    text_processor_required = True

    def __init__(self, cfg: Mapping[str, Any] | None = None):
        if cfg is None:
            cfg = OmegaConf.load(self.default_config_path("default")).datasets[self.name]
        self.config: DictConfig = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))

    @classmethod
    def default_config_path(cls, type: str = "default") -> Path:
        if type not in cls.DATASET_CONFIG_DICT:
            known = ", ".join(sorted(cls.DATASET_CONFIG_DICT))
            raise KeyError(f"unknown dataset config type '{type}' for {cls.name}; known: {known}")
        return LIBRARY_ROOT / cls.DATASET_CONFIG_DICT[type]

    def key(self, *parts: str) -> str:
        """The config key path of a setting, for error messages."""
        return ".".join(("datasets", self.name, *parts))

    def _processor(self, kind: str, required: bool) -> Callable | None:
        cfg = OmegaConf.select(self.config, f"{kind}.train")
        if cfg is None or not cfg.get("name"):
            if required:
                raise DatasetError(f"{self.key(kind, 'train', 'name')}: missing (e.g. blip2_image_train / blip_caption)")
            return None
        try:
            cls = registry.get_processor_class(cfg.name)
        except RegistryError as err:
            raise DatasetError(f"{self.key(kind, 'train', 'name')}: {err}") from None
        try:
            return cls.from_config(cfg)
        except ValueError as err:  # a key the processor does not take, or a value it refuses
            raise DatasetError(f"{self.key(kind, 'train')}: {err}") from None

    def build_processors(self) -> tuple[Callable, Callable | None]:
        return self._processor("vis_processor", True), self._processor("text_processor", self.text_processor_required)

    def storage(self) -> str:
        storage = OmegaConf.select(self.config, "build_info.storage")
        if not storage:
            raise DatasetError(f"{self.key('build_info', 'storage')}: missing; set it to where the data lives")
        return str(storage)

    def storage_folder(self) -> Path:
        """``build_info.storage`` as an existing folder (relative paths from the working directory)."""
        root = get_abs_path(self.storage())
        if not root.is_dir():
            raise DatasetError(f"{self.key('build_info', 'storage')}: no such folder '{self.storage()}'")
        return root

    def build_datasets(self) -> dict[str, Any]:
        vis_processor, text_processor = self.build_processors()
        logger.info("building dataset %s", self.name)
        return {"train": self.build(vis_processor, text_processor)}

    def build(self, vis_processor: Callable, text_processor: Callable | None) -> Any:
        raise NotImplementedError
