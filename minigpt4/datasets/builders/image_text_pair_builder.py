"""The registered builders: ``laion``, ``cc_sbu`` (stage 1), ``cc_sbu_align`` (stage 2), ``synthetic_shapes`` (nano)."""
from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Callable

from minigpt4.common.registry import registry
from minigpt4.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from minigpt4.datasets.data_utils import DatasetError
from minigpt4.datasets.datasets import CCSBUAlignDataset, ImageTextShards
from minigpt4.datasets.datasets.synthetic_shapes import PROMPT_KINDS, SyntheticShapesDataset

logger = logging.getLogger(__name__)


def expand_shards(storage: str, key: str) -> list[str]:
    """``/data/{00000..01255}.tar`` (or a folder of ``.tar`` files) -> the shard files that exist."""
    try:
        from braceexpand import braceexpand  # arrives with webdataset, in the [train] extra
    except ImportError:
        raise DatasetError(f"{key}: reading webdataset shards needs the webdataset package: pip install -e '.[train]'") from None
    patterns = [storage] if not Path(storage).is_dir() else [str(Path(storage) / "*.tar")]
    candidates = [p for pattern in patterns for p in braceexpand(pattern)]
    shards = sorted({s for c in candidates for s in (glob.glob(c) if any(ch in c for ch in "*?[") else [c]) if Path(s).is_file()})
    if not shards:
        folder = Path(storage) if Path(storage).is_dir() else Path(storage).parent
        if not folder.is_dir():
            raise DatasetError(f"{key}: no such folder '{folder}'")
        raise DatasetError(f"{key}: no shard matches '{storage}'")
    missing = len(candidates) - len(shards)
    if missing > 0 and not any(ch in storage for ch in "*?["):
        logger.warning("%s: %d of the %d shards of '%s' are missing; using the %d found", key, missing, len(candidates), storage, len(shards))
    return shards


class ImageTextShardBuilder(BaseDatasetBuilder):
    def build(self, vis_processor: Callable, text_processor: Callable | None) -> ImageTextShards:
        key = self.key("build_info", "storage")
        return ImageTextShards(expand_shards(self.storage(), key), vis_processor, text_processor, location=key)


@registry.register_builder("laion")
class LaionBuilder(ImageTextShardBuilder):
    name = "laion"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/laion/defaults.yaml"}


@registry.register_builder("cc_sbu")
class CCSBUBuilder(ImageTextShardBuilder):
    name = "cc_sbu"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/cc_sbu/defaults.yaml"}


@registry.register_builder("cc_sbu_align")
class CCSBUAlignBuilder(BaseDatasetBuilder):
    name = "cc_sbu_align"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/cc_sbu_align/defaults.yaml"}
    text_processor_required = False  # captions are used raw

    def build(self, vis_processor: Callable, text_processor: Callable | None) -> CCSBUAlignDataset:
        return CCSBUAlignDataset(self.storage_folder(), vis_processor, text_processor, location=self.key("build_info", "storage"))


@registry.register_builder("synthetic_shapes")
class SyntheticShapesBuilder(BaseDatasetBuilder):
    name = "synthetic_shapes"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/synthetic_shapes/defaults.yaml"}
    text_processor_required = False  # answers are generated already clean

    def build(self, vis_processor: Callable, text_processor: Callable | None) -> SyntheticShapesDataset:
        info = self.config.get("build_info", {})
        try:
            return SyntheticShapesDataset(
                vis_processor,
                num_samples=int(info.get("num_samples", 100_000)),
                image_size=int(info.get("image_size", 64)),
                seed=int(info.get("seed", 0)),
                max_shapes=int(info.get("max_shapes", 3)),
                prompt_kinds=list(info.get("prompt_kinds", PROMPT_KINDS)),
                instruction_template=info.get("instruction_template"),
                turns=list(info.get("turns", [1, 1])),
                history_template=info.get("history_template"),
                first_describe=float(info.get("first_describe", 0.5)),
                restyle=float(info.get("restyle", 0.0)),
                hard_questions=float(info.get("hard_questions", 0.0)),
                every_answer=bool(info.get("every_answer", False)),
                reasoned_exists=bool(info.get("reasoned_exists", False)),
                location=self.key("build_info"),
            )
        except ValueError as err:
            raise DatasetError(str(err)) from None
