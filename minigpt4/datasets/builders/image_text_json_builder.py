"""``image_text_json``: fine-tuning on your own folder of images and a JSON Lines file.

Every line is checked here, before the first training step, so a typo on line 9,000 does not
surface hours into a run: refused lines are listed in one warning (file:line: reason) and
skipped, or stop the run under ``build_info.strict: True``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import OmegaConf

from minigpt4.common.config import ConfigError
from minigpt4.common.registry import registry
from minigpt4.common.utils import get_abs_path
from minigpt4.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from minigpt4.datasets.data_utils import DatasetError
from minigpt4.datasets.datasets.image_text_json_dataset import ImageTextJsonDataset, Problem, read_annotations
from minigpt4.prompts import load_prompt_list

logger = logging.getLogger(__name__)

DEFAULT_ANN_NAME = "annotations.jsonl"


def problem_report(problems: Sequence[Problem], total: int) -> str:
    lines = [f"{len(problems)} of {total} lines refused:"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


@registry.register_builder("image_text_json")
class ImageTextJsonBuilder(BaseDatasetBuilder):
    name = "image_text_json"
    DATASET_CONFIG_DICT = {"default": "configs/datasets/image_text_json/defaults.yaml"}
    text_processor_required = False  # answers are used raw, as cc_sbu_align's captions

    def annotation_path(self, root: Path) -> Path:
        ann = OmegaConf.select(self.config, "build_info.ann_path")
        if not ann:
            path = root / DEFAULT_ANN_NAME
        else:
            # a relative ann_path is read from the working directory, else from the image folder
            path = get_abs_path(ann)
            if not path.exists() and (root / ann).exists():
                path = root / ann
        if not path.is_file():
            key = self.key("build_info", "ann_path")
            shown = ann or f"<storage>/{DEFAULT_ANN_NAME}"
            raise DatasetError(f"{key}: no such file '{path}' ({shown}); write one JSON object per line: "
                               '{"image": "relative/path.jpg", "answer": "..."}')
        return path

    def fallback_prompts(self) -> list[str]:
        value = OmegaConf.select(self.config, "build_info.prompt_path")
        if not value:
            return []
        try:
            return load_prompt_list(value, key=self.key("build_info", "prompt_path"))
        except ConfigError as err:
            raise DatasetError(str(err)) from None

    def build(self, vis_processor: Callable, text_processor: Callable | None) -> ImageTextJsonDataset:
        storage_key = self.key("build_info", "storage")
        root = self.storage_folder()
        ann_path = self.annotation_path(root)
        ann_key = self.key("build_info", "ann_path")
        logger.info("%s: checking every line of %s and its images", self.name, ann_path)
        records, problems = read_annotations(ann_path, root)
        total = len(records) + len(problems)
        if not records:
            detail = f"\n{problem_report(problems, total)}" if problems else ""
            raise DatasetError(f"{ann_key}: no usable line in '{ann_path}'{detail}")
        if problems:
            if OmegaConf.select(self.config, "build_info.strict"):
                raise DatasetError(f"{ann_key}: {problem_report(problems, total)}\n"
                                   f"(strict: fix these lines or set {self.key('build_info', 'strict')}=False to skip them)")
            logger.warning("%s: skipping %d of %d lines of %s\n%s", ann_key, len(problems), total, ann_path, problem_report(problems, total))
        with_instruction = sum(1 for r in records if r.instruction)
        mixed = 0 < with_instruction < len(records)
        fallback = self.fallback_prompts() if mixed else []
        dataset = ImageTextJsonDataset(records, root, vis_processor, text_processor, fallback, location=storage_key)
        logger.info("%s: %d pairs from %s (%d with their own instruction)", self.name, len(dataset), ann_path, with_instruction)
        return dataset
