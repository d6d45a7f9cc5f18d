"""``synthetic_shapes``: scenes of coloured shapes rendered on the fly, with questions and answers.

The data of the nano MiniGPT-4, which trains and is evaluated offline. Scene ``i`` of seed ``s``
is a pure function of ``(s, i)``: a white canvas with 1–3 non-overlapping shapes (circle,
square, triangle; six colours drawn in a few shades; each 20–40% of the image side). Every scene
comes with answers in plain English for four kinds of prompt:

- ``describe``: "a red circle to the left of a blue square."
- ``count``: "there are two shapes."
- ``colour``: "what colour is the circle?" -> "the circle is red." (asked of a shape kind that
  occurs once)
- ``where``: "where is the red circle?" -> "the red circle is on the left." (left / in the
  middle / on the right, by thirds of the image)

Another seed gives held-out scenes. :func:`parse_objects` reads the (colour, shape) pairs back
out of a generated description, which is how exact-scene accuracy is scored.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image, ImageDraw

from minigpt4.datasets.data_utils import derive_seed, seeded_call

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]  # the 18 classes of the stage-0 vision task
NUMBERS = {1: "one", 2: "two", 3: "three"}
PROMPT_KINDS = ("describe", "count", "colour", "where")
QUESTIONS = {
    "describe": "Describe this image.",
    "count": "How many shapes are there?",
    "colour": "What colour is the {shape}?",
    "where": "Where is the {colour} {shape}?",
}
_OBJECT = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?\b")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cx: float  # centre, as a fraction of the image side
    cy: float
    size: float  # side of the bounding box, as a fraction of the image side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def place(self) -> str:
        if self.cx < 1 / 3:
            return "on the left"
        return "in the middle" if self.cx < 2 / 3 else "on the right"


def make_scene(rng: random.Random, max_shapes: int = 3, tries: int = 100) -> list[Shape]:
    """1..max_shapes non-overlapping shapes, sorted left to right."""
    count = rng.randint(1, max_shapes)
    placed: list[Shape] = []
    for _ in range(tries):
        if len(placed) == count:
            break
        size = rng.uniform(0.2, 0.4)
        cx, cy = rng.uniform(size / 2, 1 - size / 2), rng.uniform(size / 2, 1 - size / 2)
        # keep a small gap between bounding boxes so neighbours never touch
        if all(abs(cx - o.cx) > (size + o.size) / 2 + 0.02 or abs(cy - o.cy) > (size + o.size) / 2 + 0.02 for o in placed):
            placed.append(Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), cx, cy, size))
    return sorted(placed, key=lambda s: s.cx)


def render(scene: Sequence[Shape], image_size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(img)
    for s in scene:
        # a few shades per colour, so the colour names a range rather than one RGB value
        fill = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[s.colour])
        half = s.size * image_size / 2
        x, y = s.cx * image_size, s.cy * image_size
        if s.shape == "circle":
            draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
        elif s.shape == "square":
            draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
        else:
            draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    return img


def _a(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def describe(scene: Sequence[Shape]) -> str:
    names = [_a(s.name) for s in scene]
    if len(names) == 1:
        return f"{names[0]}."
    if len(names) == 2:
        return f"{names[0]} to the left of {names[1]}."
    return f"{', '.join(names[:-1])} and {names[-1]}, from left to right."


def questions(scene: Sequence[Shape]) -> dict[str, tuple[str, str]]:
    """Every prompt kind that has a well-defined answer for this scene: kind -> (question, answer)."""
    n = len(scene)
    out = {
        "describe": (QUESTIONS["describe"], describe(scene)),
        "count": (QUESTIONS["count"], f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}."),
    }
    kinds = Counter(s.shape for s in scene)
    unique_kind = [s for s in scene if kinds[s.shape] == 1]
    if unique_kind:
        s = unique_kind[0]
        out["colour"] = (QUESTIONS["colour"].format(shape=s.shape), f"the {s.shape} is {s.colour}.")
    names = Counter(s.name for s in scene)
    unique_name = [s for s in scene if names[s.name] == 1]
    if unique_name:
        s = unique_name[-1]
        out["where"] = (QUESTIONS["where"].format(colour=s.colour, shape=s.shape), f"the {s.name} is {s.place}.")
    return out


def parse_objects(text: str) -> Counter:
    """The multiset of (colour, shape) pairs a description names."""
    return Counter(_OBJECT.findall(text.lower()))


def scene_labels(scene: Sequence[Shape]) -> list[float]:
    """18-way multi-hot: which (colour, shape) pairs the scene holds."""
    present = {(s.colour, s.shape) for s in scene}
    return [1.0 if pair in present else 0.0 for pair in PAIRS]


NO_SHAPE = len(PAIRS)  # the slot class of an empty slot


def scene_slots(scene: Sequence[Shape], max_shapes: int = 3) -> list[int]:
    """The stage-0 target: per slot, left to right, the index of its (colour, shape) in PAIRS.

    Empty slots are ``NO_SHAPE``. Unlike the multi-hot labels this says how many shapes there
    are (duplicates included) and in which order, which is what the answers need.
    """
    slots = [PAIRS.index((s.colour, s.shape)) for s in scene]
    return slots + [NO_SHAPE] * (max_shapes - len(slots))


class SyntheticShapesDataset:
    """Map-style: ``load(index, seed)`` renders scene ``index`` and picks its prompt kind.

    ``prompt_kinds`` restricts the questions (``["describe"]`` for captioning). With
    ``instruction_template`` set, items carry ``instruction_input`` (the question after the
    image slot); without it the model's prompt list supplies the instruction. Items also carry
    the stage-0 targets: ``slots`` (per slot, left to right, which pair or none) and ``labels``
    (18-way multi-hot).
    """

    def __init__(
        self,
        vis_processor: Callable,
        num_samples: int = 100_000,
        image_size: int = 64,
        seed: int = 0,
        max_shapes: int = 3,
        prompt_kinds: Sequence[str] = PROMPT_KINDS,
        instruction_template: str | None = "<Img><ImageHere></Img> {}",
        location: str = "datasets.synthetic_shapes",
    ):
        unknown = set(prompt_kinds) - set(PROMPT_KINDS)
        if unknown or not prompt_kinds:
            raise ValueError(f"{location}.prompt_kinds: unknown {sorted(unknown)}; choose from {', '.join(PROMPT_KINDS)}")
        self.vis_processor = vis_processor
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.max_shapes = max_shapes
        self.prompt_kinds = list(prompt_kinds)
        self.instruction_template = instruction_template
        self.location = location

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[list[Shape], Image.Image]:
        rng = random.Random(derive_seed(self.seed, "scene", index))
        scene = make_scene(rng, self.max_shapes)
        return scene, render(scene, self.image_size, rng)

    def load(self, index: int, seed: int) -> dict[str, Any]:
        import torch

        scene, image = self.scene(index)
        qa = questions(scene)
        available = [k for k in self.prompt_kinds if k in qa]
        kind = random.Random(derive_seed(self.seed, "kind", index)).choice(available or ["describe"])
        question, answer = qa[kind]
        item = {
            "image": seeded_call(seed, self.vis_processor, image),
            "answer": answer,
            "labels": torch.tensor(scene_labels(scene)),
            "slots": torch.tensor(scene_slots(scene, self.max_shapes)),
        }
        if self.instruction_template:
            item["instruction_input"] = self.instruction_template.format(question)
        return item
