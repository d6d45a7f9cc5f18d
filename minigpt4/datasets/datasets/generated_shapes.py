"""``generated_shapes``: coloured shapes drawn on the fly, for CPU smoke runs without any download.

Sample ``i`` is a pure function of ``(seed, i)``: one or two shapes on a white canvas and the
caption that names them ("a red circle and a blue square").
"""
from __future__ import annotations

import random
from typing import Any, Callable

from PIL import Image, ImageDraw

from minigpt4.datasets.data_utils import derive_seed, seeded_call

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_scene(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    names = []
    count = rng.randint(1, 2)
    for slot in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        cell = size // count
        r = rng.randint(cell // 6, cell // 3)
        cx = slot * cell + cell // 2
        cy = rng.randint(r, size - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        names.append(f"a {colour} {shape}")
    return img, " and ".join(names)


class GeneratedShapesDataset:
    def __init__(self, vis_processor: Callable, text_processor: Callable | None = None, num_samples: int = 256, image_size: int = 224, seed: int = 0, location: str = "build_info"):
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.location = location

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int, seed: int) -> dict[str, Any]:
        image, caption = draw_scene(random.Random(derive_seed(self.seed, index)), self.image_size)
        if self.text_processor is not None:
            caption = self.text_processor(caption)
        return {"image": seeded_call(seed, self.vis_processor, image), "answer": caption}
