"""``image_text_json``: your own images and answers, a folder plus a JSON Lines file.

One line per sample::

    {"image": "cats/tom.jpg", "answer": "A grey cat asleep on a sofa."}
    {"image": "dog.png", "answer": "It is a beagle.", "instruction": "What breed is this dog?", "id": "q7"}

``image`` is relative to the folder (any format Pillow opens). ``instruction`` replaces the
model's prompt list for that line; ``<Img><ImageHere></Img> `` is put in front when it has no
``<ImageHere>``. :func:`read_annotations` checks every line before training starts and returns the
usable ones with one :class:`Problem` (file, line, reason) for each line it refuses.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from minigpt4.datasets.data_utils import SampleError, seeded_call
from minigpt4.prompts import IMAGE_PLACEHOLDER

IMAGE_SLOT = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
REQUIRED_KEYS = ("image", "answer")
OPTIONAL_KEYS = ("instruction", "id")


@dataclass(frozen=True)
class Record:
    line: int
    image: str
    answer: str
    instruction: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Problem:
    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def with_image_slot(instruction: str) -> str:
    """The instruction as the model expects it: the image slot first unless the user placed it."""
    return instruction if IMAGE_PLACEHOLDER in instruction else f"{IMAGE_SLOT} {instruction}"


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes."""
    try:
        with Image.open(path) as image:
            # draft() lets JPEGs decode at 1/8 scale: the whole stream is still read, so a
            # truncated file fails, at a fraction of the cost of a full decode per image.
            image.draft("RGB", (64, 64))
            image.load()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a folder, not an image"
    except Image.UnidentifiedImageError:
        return "not an image (or not a format Pillow can read)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"damaged image file ({err})"
    return None


def _parse_line(text: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(item, dict):
        return None, f"expected a JSON object, got {type(item).__name__}"
    missing = [key for key in REQUIRED_KEYS if key not in item]
    if missing:
        return None, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(repr(k) for k in missing)}"
    for key in (*REQUIRED_KEYS, "instruction"):
        if key in item and item[key] is not None and not isinstance(item[key], str):
            return None, f"'{key}' must be a string, got {type(item[key]).__name__}"
    if "id" in item and not isinstance(item["id"], (str, int)):
        return None, f"'id' must be a string or a number, got {type(item['id']).__name__}"
    if item["image"] is None or not item["image"].strip():
        return None, "'image' is empty"
    if item["answer"] is None or not item["answer"].strip():
        return None, "'answer' is empty"
    if item.get("instruction") is not None and not item["instruction"].strip():
        return None, "'instruction' is empty (leave the key out to use the prompt list)"
    return item, None


def read_annotations(ann_path: Path, root: Path) -> tuple[list[Record], list[Problem]]:
    """Every usable line of ``ann_path`` (images under ``root``) and a problem for each other one.

    Refused: malformed JSON, missing keys or wrong types, empty answers, an ``id`` seen before,
    the same image with the same instruction seen before (the same image under different
    instructions is a set of questions about it, and stays), missing or undecodable images.
    Blank lines are ignored.
    """
    records: list[Record] = []
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    seen_pairs: dict[tuple[str, str | None], int] = {}
    image_status: dict[Path, str | None] = {}
    with open(ann_path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            item, reason = _parse_line(text)
            if item is None:
                problems.append(Problem(ann_path, number, reason))
                continue
            sample_id = str(item["id"]) if item.get("id") is not None else None
            instruction = item.get("instruction")
            image = item["image"].strip()
            if sample_id is not None and sample_id in seen_ids:
                problems.append(Problem(ann_path, number, f"duplicate id '{sample_id}' (first on line {seen_ids[sample_id]})"))
                continue
            pair = (str(Path(image)), instruction.strip() if instruction else None)
            if pair in seen_pairs:
                what = "image and instruction" if instruction else "image"
                problems.append(Problem(ann_path, number, f"duplicate {what} '{image}' (first on line {seen_pairs[pair]})"))
                continue
            image_path = root / image
            if image_path not in image_status:
                image_status[image_path] = check_image(image_path)
            if image_status[image_path] is not None:
                problems.append(Problem(ann_path, number, f"image '{image}': {image_status[image_path]}"))
                continue
            if sample_id is not None:
                seen_ids[sample_id] = number
            seen_pairs[pair] = number
            records.append(Record(number, image, item["answer"].strip(), instruction.strip() if instruction else None, sample_id))
    return records, problems


class ImageTextJsonDataset:
    """Map-style pairs: item = ``{"image", "answer", "image_id"}`` (+ ``instruction_input``).

    When any line has an instruction, every item carries ``instruction_input`` (a batch must be
    uniform for ``collate``); lines without one then draw a prompt from ``fallback_prompts``,
    seeded by the sample's seed. When no line has one, items carry none and the model's own
    prompt list applies, exactly as in stage 2.
    """

    def __init__(
        self,
        records: Sequence[Record],
        root: str | Path,
        vis_processor: Callable,
        text_processor: Callable | None = None,
        fallback_prompts: Sequence[str] = (),
        location: str = "build_info.storage",
    ):
        self.records = list(records)
        self.root = Path(root)
        self.vis_processor = vis_processor
        self.text_processor = text_processor  # kept for the builder interface; answers stay raw, as cc_sbu_align
        self.location = location
        self.with_instructions = any(r.instruction for r in self.records)
        self.fallback_prompts = list(fallback_prompts)
        if self.with_instructions and any(not r.instruction for r in self.records) and not self.fallback_prompts:
            raise ValueError(f"{location}: some lines have no instruction and there are no fallback prompts")

    def __len__(self) -> int:
        return len(self.records)

    def instruction(self, record: Record, seed: int) -> str:
        if record.instruction:
            return with_image_slot(record.instruction)
        return random.Random(seed).choice(self.fallback_prompts)

    def load(self, index: int, seed: int) -> dict[str, Any]:
        record = self.records[index]
        path = self.root / record.image
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as err:  # the file changed since validation
            raise SampleError(f"{path} (line {record.line}): {type(err).__name__}: {err}") from None
        item = {
            "image": seeded_call(seed, self.vis_processor, image),
            "answer": record.answer,
            "image_id": record.id if record.id is not None else record.image,
        }
        if self.with_instructions:
            item["instruction_input"] = self.instruction(record, seed)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, seed=index)
