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

- ``exists``: "is there a green triangle?" -> "no, there is no green triangle." (or "yes, there
  is a green triangle."; half the questions name a pair that is not there). Reasoned, the answer
  first says what the scene has of that kind, then the verdict: "the triangle is blue, so no."

:func:`conversation` chains 1–4 such turns about one scene, and a follow-up may refer back to
the shape the previous turn was about ("where is it?"). Another seed gives held-out scenes.
``restyle`` > 0 draws another stream of scenes (shapes 14–46% of the side) twice: as the training
renderer draws them (for a teacher) and, with that probability, in other shades of each colour
name, anti-aliased (for the student of ``vision_distiller``).
:func:`parse_objects` reads the (colour, shape) pairs back out of a generated description, which
is how exact-scene accuracy is scored.
"""
from __future__ import annotations

import colorsys
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image, ImageDraw

from minigpt4.datasets.data_utils import derive_seed, seeded_call
from minigpt4.prompts import template_head

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "in the middle", "on the right")  # by thirds of the image, as "where" answers
PAIRS = [(c, s) for c in COLOURS for s in SHAPES]  # the 18 classes of the stage-0 vision task
NUMBERS = {1: "one", 2: "two", 3: "three"}
PROMPT_KINDS = ("describe", "count", "colour", "where", "exists")
QUESTIONS = {
    "describe": "Describe this image.",
    "count": "How many shapes are there?",
    "colour": "What colour is the {shape}?",
    "where": "Where is the {colour} {shape}?",
    "exists": "Is there {a_name}?",
}
# Follow-ups about the shape the previous turn was about.
REFERRING = {"colour": "What colour is it?", "where": "Where is it?"}
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
    def third(self) -> int:
        """Which third of the image its centre is in: 0 left, 1 middle, 2 right."""
        return 0 if self.cx < 1 / 3 else 1 if self.cx < 2 / 3 else 2

    @property
    def place(self) -> str:
        return PLACES[self.third]


SIZES = (0.2, 0.4)  # the side of a shape's box, as a fraction of the image side
RESTYLE_SIZES = (0.14, 0.46)  # restyled scenes: smaller and larger shapes too


def make_scene(rng: random.Random, max_shapes: int = 3, tries: int = 100, sizes: tuple[float, float] = SIZES) -> list[Shape]:
    """1..max_shapes non-overlapping shapes, sorted left to right."""
    count = rng.randint(1, max_shapes)
    placed: list[Shape] = []
    for _ in range(tries):
        if len(placed) == count:
            break
        size = rng.uniform(*sizes)
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
        draw_shape(draw, s, image_size, fill)
    return img


# Restyled drawings: per colour name, a band of hue (degrees), saturation and value a person still
# calls by that name. Wider than the training shades (+-25 per channel around COLOURS), so the
# vision side learns the names rather than six RGB points.
HUE_BANDS = {
    "red": ((-16, 10), (0.45, 1.0), (0.5, 1.0)),
    "orange": ((14, 40), (0.6, 1.0), (0.75, 1.0)),
    "yellow": ((43, 62), (0.4, 1.0), (0.8, 1.0)),
    "green": ((95, 155), (0.45, 1.0), (0.45, 0.95)),
    "blue": ((205, 245), (0.5, 1.0), (0.55, 1.0)),
    "purple": ((265, 295), (0.45, 1.0), (0.45, 0.9)),
}
SUPERSAMPLING = (1, 2, 3, 4)  # 1: hard edges, as the training renderer; more: anti-aliased
RESAMPLING = (Image.BOX, Image.BILINEAR, Image.LANCZOS)


def restyled_shade(colour: str, rng: random.Random) -> tuple[int, int, int]:
    """An RGB shade of ``colour`` from its :data:`HUE_BANDS`."""
    hues, sats, vals = HUE_BANDS[colour]
    rgb = colorsys.hsv_to_rgb((rng.uniform(*hues) % 360) / 360, rng.uniform(*sats), rng.uniform(*vals))
    return tuple(round(255 * v) for v in rgb)


def render_restyled(scene: Sequence[Shape], image_size: int, rng: random.Random) -> Image.Image:
    """``scene`` in shades from :data:`HUE_BANDS`, drawn at 1-4x and resampled down (anti-aliased)."""
    factor = rng.choice(SUPERSAMPLING)
    big = image_size * factor
    img = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(img)
    for s in scene:
        draw_shape(draw, s, big, restyled_shade(s.colour, rng))
    return img if factor == 1 else img.resize((image_size, image_size), rng.choice(RESAMPLING))


def canonical_geometry(scene: Sequence[Shape]) -> list[Shape]:
    """The same shapes at the same centres, sizes clipped to the training renderer's :data:`SIZES`."""
    return [Shape(s.colour, s.shape, s.cx, s.cy, min(max(s.size, SIZES[0]), SIZES[1])) for s in scene]


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape, side: float, fill: tuple[int, int, int]) -> None:
    """``s`` on a canvas ``side`` pixels wide: a disc, a square or an upward triangle in its box."""
    half = s.size * side / 2
    x, y = s.cx * side, s.cy * side
    if s.shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
    elif s.shape == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
    else:
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)


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


@dataclass(frozen=True)
class Turn:
    """One question about a scene and its answer; ``focus`` is the shape it is about, if one."""

    kind: str
    question: str
    answer: str
    focus: Shape | None = None
    refers_back: bool = False


def _unique(scene: Sequence[Shape], key: Callable[[Shape], Any]) -> list[Shape]:
    counts = Counter(key(s) for s in scene)
    return [s for s in scene if counts[key(s)] == 1]


def order_third(index: int, count: int) -> int:
    """The third that the rank ``index`` from left to right among ``count`` shapes alone suggests:
    the middle for a lone shape, left and right for two, left, middle and right for three."""
    return 1 if count == 1 else round(2 * index / (count - 1))


def kind_colours_phrase(scene: Sequence[Shape], shape: str) -> str:
    """What ``scene`` has of one shape kind, in words: "the triangle is blue", "the circles are red
    and green" (left to right, each colour once), "there is no square"."""
    colours = list(dict.fromkeys(s.colour for s in scene if s.shape == shape))
    if not colours:
        return f"there is no {shape}"
    if sum(s.shape == shape for s in scene) == 1:
        return f"the {shape} is {colours[0]}"
    listed = colours[0] if len(colours) == 1 else f"{', '.join(colours[:-1])} and {colours[-1]}"
    return f"the {shape}s are {listed}"


def ask(
    scene: Sequence[Shape], kind: str, rng: random.Random, focus: Shape | None = None, hard: float = 0.0, reasoned: bool = False
) -> Turn | None:
    """A question of ``kind`` with a well-defined answer for ``scene``, or None where there is none.

    With ``focus`` (a shape the conversation just talked about) ``colour`` and ``where`` refer to it
    as "it". With probability ``hard`` a question is one that the text or the shapes' order cannot
    answer: "where" asks about a shape whose place its rank from left to right does not give away,
    and a "no" to "is there" names the colour of one shape in the kind of another. At 0 no random
    number is drawn for it, so the questions are those of a run without it. ``reasoned`` words the
    answer to "is there" as what the scene has of that kind, then the verdict ("the triangle is
    blue, so no."): the same questions, so the verdict is read off the colours just written.
    """
    n = len(scene)
    if kind == "describe":
        return Turn(kind, QUESTIONS["describe"], describe(scene))
    if kind == "count":
        return Turn(kind, QUESTIONS["count"], f"there {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' if n > 1 else ''}.")
    if kind in REFERRING and focus is not None:
        answer = f"the {focus.shape} is {focus.colour}." if kind == "colour" else f"the {focus.name} is {focus.place}."
        return Turn(kind, REFERRING[kind], answer, focus, refers_back=True)
    if kind == "colour":
        # a shape kind that occurs once, so "the circle" names one shape
        options = _unique(scene, lambda s: s.shape)
        if not options:
            return None
        s = rng.choice(options)
        return Turn(kind, QUESTIONS["colour"].format(shape=s.shape), f"the {s.shape} is {s.colour}.", s)
    if kind == "where":
        options = _unique(scene, lambda s: s.name)
        if not options:
            return None
        if hard and rng.random() < hard:
            surprising = [o for o in options if o.third != order_third(scene.index(o), n)]
            options = surprising or options
        s = rng.choice(options)
        return Turn(kind, QUESTIONS["where"].format(colour=s.colour, shape=s.shape), f"the {s.name} is {s.place}.", s)
    if kind == "exists":
        present = {(s.colour, s.shape) for s in scene}
        if rng.random() < 0.5:
            s = rng.choice(scene)
            name = s.name
            focus = s if [o.name for o in scene].count(name) == 1 else None
            answer = f"{kind_colours_phrase(scene, s.shape)}, so yes." if reasoned else f"yes, there is {_a(name)}."
            return Turn(kind, QUESTIONS["exists"].format(a_name=_a(name)), answer, focus)
        # mostly near misses: the colour of a shape that is there, or a shape in a colour that is there
        s = rng.choice(scene)
        near = [(c, s.shape) for c in COLOURS] + [(s.colour, k) for k in SHAPES]
        if hard and rng.random() < hard:
            near = [(a.colour, b.shape) for a in scene for b in scene if (a.colour, b.shape) not in present] or near
        absent = [p for p in near if p not in present] or [p for p in PAIRS if p not in present]
        colour, shape = rng.choice(absent)
        name = f"{colour} {shape}"
        answer = f"{kind_colours_phrase(scene, shape)}, so no." if reasoned else f"no, there is no {name}."
        return Turn(kind, QUESTIONS["exists"].format(a_name=_a(name)), answer)
    raise ValueError(f"unknown question kind '{kind}'; choose from {', '.join(PROMPT_KINDS)}")


def conversation(
    scene: Sequence[Shape],
    rng: random.Random,
    turns: int,
    kinds: Sequence[str] = PROMPT_KINDS,
    first: str | None = None,
    hard: float = 0.0,
    reasoned: bool = False,
) -> list[Turn]:
    """``turns`` questions about one scene, as a user would chat: no question twice, and after a
    turn about one shape a follow-up may ask about "it" (``refers_back``). ``first`` fixes the
    kind of the first turn; ``hard`` and ``reasoned`` are :func:`ask`'s."""
    asked: list[Turn] = []
    for _ in range(20 * turns):
        if len(asked) == turns:
            break
        kind = first if first is not None and not asked else rng.choice(list(kinds))
        if kind == "describe" and any(t.kind == "describe" for t in asked):
            continue
        focus = asked[-1].focus if asked and rng.random() < 0.5 else None
        turn = ask(scene, kind, rng, focus, hard, reasoned)
        if turn is None or any(t.question == turn.question and t.answer == turn.answer for t in asked):
            continue
        asked.append(turn)
    return asked


def parse_objects(text: str) -> Counter:
    """The multiset of (colour, shape) pairs a description names."""
    return Counter(_OBJECT.findall(text.lower()))


def object_sequence(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a description names, in the order it names them (left to right)."""
    return _OBJECT.findall(text.lower())


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


NO_PLACE = len(PLACES)  # the place class of an empty slot


def scene_places(scene: Sequence[Shape], max_shapes: int = 3) -> list[int]:
    """Per slot, left to right, which third of the image holds its shape (``NO_PLACE`` if empty):
    what a "where" answer says, as a target for the vision side."""
    return [s.third for s in scene] + [NO_PLACE] * (max_shapes - len(scene))


ABSENT, SEVERAL = 0, 1  # offsets past the last colour / place: the kind is not there, or more than once
KIND_COLOUR_CLASSES = len(COLOURS) + 2  # the classes of scene_kinds: a colour, absent or several
KIND_PLACE_CLASSES = len(PLACES) + 2  # a third, absent or several


def scene_kinds(scene: Sequence[Shape]) -> tuple[list[int], list[int]]:
    """Per shape kind (:data:`SHAPES`): the colour (index into :data:`COLOURS`) and the third of
    its shape, or ``len(COLOURS)`` / ``len(PLACES)`` where the kind is absent and one more where it
    occurs several times. What "what colour is the circle?" and "where is the circle?" ask, by kind
    rather than by rank from left to right: a target for the vision side."""
    colours, places = [], []
    for kind in SHAPES:
        found = [s for s in scene if s.shape == kind]
        if len(found) == 1:
            colours.append(list(COLOURS).index(found[0].colour))
            places.append(found[0].third)
        else:
            extra = ABSENT if not found else SEVERAL
            colours.append(len(COLOURS) + extra)
            places.append(len(PLACES) + extra)
    return colours, places


class SyntheticShapesDataset:
    """Map-style: ``load(index, seed)`` renders scene ``index`` and picks its prompt kind.

    ``prompt_kinds`` restricts the questions (``["describe"]`` for captioning). With
    ``instruction_template`` set, items carry ``instruction_input`` (the question after the
    image slot); without it the model's prompt list supplies the instruction. Items also carry
    the targets of the vision stages: ``slots`` (per slot, left to right, which pair or none),
    ``places`` (per slot, which third of the image or none), ``kind_colours`` and ``kind_places``
    (per shape kind, see :func:`scene_kinds`) and ``labels`` (18-way multi-hot). With
    ``every_answer``, conversations also carry ``answer_spans``: the (start, end) characters of each
    earlier answer inside ``instruction_input``, which the model trains on too. With
    ``reasoned_exists``, a conversation's "is there" answers say the colours of that kind before
    the verdict (:func:`ask`).
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
        turns: Sequence[int] = (1, 1),
        history_template: str | None = None,
        first_describe: float = 0.5,
        restyle: float = 0.0,
        hard_questions: float = 0.0,
        every_answer: bool = False,
        reasoned_exists: bool = False,
    ):
        unknown = set(prompt_kinds) - set(PROMPT_KINDS)
        if unknown or not prompt_kinds:
            raise ValueError(f"{location}.prompt_kinds: unknown {sorted(unknown)}; choose from {', '.join(PROMPT_KINDS)}")
        if len(turns) != 2 or not 1 <= turns[0] <= turns[1]:
            raise ValueError(f"{location}.turns: expected [min, max] with 1 <= min <= max, got {list(turns)}")
        if turns[1] > 1 and (not history_template or "{question}" not in history_template or "{answer}" not in history_template):
            raise ValueError(
                f"{location}.history_template: conversations of more than one turn need the template of a "
                "finished turn, with {question} and {answer} (e.g. the model's chat template)"
            )
        self.vis_processor = vis_processor
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed
        self.max_shapes = max_shapes
        self.prompt_kinds = list(prompt_kinds)
        self.instruction_template = instruction_template
        self.location = location
        self.turns = (int(turns[0]), int(turns[1]))
        self.history_template = history_template
        self.first_describe = first_describe
        if not 0.0 <= restyle <= 1.0:
            raise ValueError(f"{location}.restyle: a probability in [0, 1], got {restyle}")
        self.restyle = restyle
        if not 0.0 <= hard_questions <= 1.0:
            raise ValueError(f"{location}.hard_questions: a probability in [0, 1], got {hard_questions}")
        if hard_questions and turns[1] == 1:
            raise ValueError(f"{location}.hard_questions: only conversations (turns above [1, 1]) draw their questions with it")
        self.hard_questions = hard_questions
        if every_answer and (turns[1] == 1 or not instruction_template):
            raise ValueError(
                f"{location}.every_answer: only conversations (turns above [1, 1]) written into instruction_template have earlier answers"
            )
        self.every_answer = bool(every_answer)
        if reasoned_exists and (turns[1] == 1 or "exists" not in self.prompt_kinds):
            raise ValueError(f"{location}.reasoned_exists: only conversations (turns above [1, 1]) that ask \"is there\" (prompt_kinds) use it")
        self.reasoned_exists = bool(reasoned_exists)

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[list[Shape], Image.Image]:
        rng = random.Random(derive_seed(self.seed, "scene", index))
        scene = make_scene(rng, self.max_shapes)
        return scene, render(scene, self.image_size, rng)

    def restyled_scene(self, index: int) -> tuple[list[Shape], Image.Image, Image.Image]:
        """Scene ``index`` of the restyled stream, laid out with :data:`RESTYLE_SIZES`: its shapes,
        the picture the student sees (restyled with probability ``restyle``, else the training
        drawing) and the training renderer's drawing of the same layout (what the teacher sees)."""
        rng = random.Random(derive_seed(self.seed, "restyled-scene", index))
        scene = make_scene(rng, self.max_shapes, sizes=RESTYLE_SIZES)
        teacher = render(canonical_geometry(scene), self.image_size, rng)
        image = render_restyled(scene, self.image_size, rng) if rng.random() < self.restyle else render(scene, self.image_size, rng)
        return scene, image, teacher

    def load(self, index: int, seed: int) -> dict[str, Any]:
        import torch

        teacher_image = None
        if self.restyle > 0:
            scene, image, teacher_image = self.restyled_scene(index)
        else:
            scene, image = self.scene(index)
        spans: list[tuple[int, int]] = []
        if self.turns[1] > 1:
            question, answer, spans = self.conversation_prompt(scene, index)
        else:
            qa = questions(scene)
            available = [k for k in self.prompt_kinds if k in qa]
            kind = random.Random(derive_seed(self.seed, "kind", index)).choice(available or ["describe"])
            question, answer = qa[kind]
        kind_colours, kind_places = scene_kinds(scene)
        item = {
            "image": seeded_call(seed, self.vis_processor, image),
            "answer": answer,
            "labels": torch.tensor(scene_labels(scene)),
            "slots": torch.tensor(scene_slots(scene, self.max_shapes)),
            "places": torch.tensor(scene_places(scene, self.max_shapes)),
            "kind_colours": torch.tensor(kind_colours),
            "kind_places": torch.tensor(kind_places),
        }
        if teacher_image is not None:
            item["teacher_image"] = seeded_call(seed, self.vis_processor, teacher_image)
        if self.instruction_template:
            item["instruction_input"] = self.instruction_template.format(question)
            if self.every_answer:
                head = template_head(self.instruction_template)  # where the conversation starts in it
                item["answer_spans"] = [(head + start, head + end) for start, end in spans]
        return item

    def conversation_prompt(self, scene: Sequence[Shape], index: int) -> tuple[str, str, list[tuple[int, int]]]:
        """A conversation of ``turns`` questions as (everything up to the last question, its
        answer, the (start, end) characters of each earlier answer in the first).

        Earlier turns are written out with ``history_template``, exactly as the chat template
        renders them, so the model learns to answer a follow-up with the conversation before it
        in view. The loss is on the last answer (every other position masked, as in stage 2), and
        with ``every_answer`` on the earlier answers too (only the questions and the template
        masked).
        """
        rng = random.Random(derive_seed(self.seed, "conversation", index))
        count = rng.randint(*self.turns)
        first = "describe" if rng.random() < self.first_describe else None
        *history, last = conversation(scene, rng, count, self.prompt_kinds, first, self.hard_questions, self.reasoned_exists)
        written, spans = "", []
        head, tail = self.history_template.split("{answer}", 1)
        for turn in history:
            before = head.format(question=turn.question)
            spans.append((len(written) + len(before), len(written) + len(before) + len(turn.answer)))
            written += before + turn.answer + tail.format(question=turn.question)
        return written + last.question, last.answer, spans
