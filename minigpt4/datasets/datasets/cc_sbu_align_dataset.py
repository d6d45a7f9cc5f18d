"""``cc_sbu_align``: the 3,439 curated pairs of stage 2, a folder on disk.

Layout: ``filter_cap.json`` = ``{"annotations": [{"image_id": ..., "caption": ...}]}`` and
``image/<image_id>.jpg``. The caption is used raw, without the text processor, as the original.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from minigpt4.datasets.data_utils import DatasetError, SampleError, seeded_call


class CCSBUAlignDataset:
    def __init__(self, root: str | Path, vis_processor: Callable, text_processor: Callable | None = None, location: str = "build_info.storage"):
        self.root = Path(root)
        self.vis_processor = vis_processor
        self.text_processor = text_processor  # kept for the builder interface; captions stay raw
        self.location = location
        ann_path = self.root / "filter_cap.json"
        if not ann_path.is_file():
            raise DatasetError(f"{location}: no annotation file '{ann_path}'")
        try:
            annotations = json.loads(ann_path.read_text(encoding="utf-8"))["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{location}: '{ann_path}' is not {{\"annotations\": [...]}} ({type(err).__name__}: {err})") from None
        if not annotations:
            raise DatasetError(f"{location}: '{ann_path}' holds no annotations")
        for i, ann in enumerate(annotations):
            if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
                raise DatasetError(f"{location}: '{ann_path}' annotation {i} lacks image_id or caption: {ann!r}")
            if not isinstance(ann["caption"], str):
                raise DatasetError(f"{location}: '{ann_path}' annotation {i}: the caption must be text, got {ann['caption']!r}")
        self.annotation = annotations

    def __len__(self) -> int:
        return len(self.annotation)

    def load(self, index: int, seed: int) -> dict[str, Any]:
        ann = self.annotation[index]
        image_path = self.root / "image" / f"{ann['image_id']}.jpg"
        try:
            image = Image.open(image_path).convert("RGB")
        except Exception as err:  # missing or undecodable file
            raise SampleError(f"{image_path}: {type(err).__name__}: {err}") from None
        return {"image": seeded_call(seed, self.vis_processor, image), "answer": ann["caption"], "image_id": ann["image_id"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, seed=index)
