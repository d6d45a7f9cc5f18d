"""The nano model's scenes: deterministic per seed, and every answer true of its picture."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from minigpt4.datasets.datasets.synthetic_shapes import (
    COLOURS,
    NO_SHAPE,
    PAIRS,
    SyntheticShapesDataset,
    describe,
    make_scene,
    parse_objects,
    questions,
    render,
    scene_labels,
    scene_slots,
)


def nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], rgb)))


@pytest.mark.parametrize("index", range(60))
def test_scene_is_well_formed_and_its_answers_are_true(index):
    rng = random.Random(index)
    scene = make_scene(rng)
    image = render(scene, 128, rng)
    assert 1 <= len(scene) <= 3
    assert [s.cx for s in scene] == sorted(s.cx for s in scene)
    for s in scene:
        assert 0.2 <= s.size <= 0.4
        # the centre pixel (a triangle's lower centre) shows the named colour
        y = s.cy + (s.size / 4 if s.shape == "triangle" else 0)
        assert nearest_colour(image.getpixel((int(s.cx * 128), int(y * 128)))) == s.colour
    for a in scene:
        for b in scene:
            if a is not b:
                gap = (a.size + b.size) / 2
                assert abs(a.cx - b.cx) > gap or abs(a.cy - b.cy) > gap  # no overlap
    qa = questions(scene)
    assert parse_objects(qa["describe"][1]) == Counter((s.colour, s.shape) for s in scene)
    assert ["one", "two", "three"][len(scene) - 1] in qa["count"][1]
    if "colour" in qa:
        shape = qa["colour"][0].split()[-1].rstrip("?")
        assert [s.colour for s in scene if s.shape == shape] == [qa["colour"][1].split()[-1].rstrip(".")]
    if "where" in qa:
        colour, shape = qa["where"][0].rstrip("?").split()[-2:]
        (s,) = [s for s in scene if (s.colour, s.shape) == (colour, shape)]
        assert qa["where"][1].endswith(s.place + ".")
    assert sum(scene_labels(scene)) == len({(s.colour, s.shape) for s in scene})
    slots = scene_slots(scene)
    assert [PAIRS[i] for i in slots[: len(scene)]] == [(s.colour, s.shape) for s in scene]  # left to right
    assert slots[len(scene) :] == [NO_SHAPE] * (3 - len(scene))


def test_descriptions_read_naturally():
    make = lambda *names: [type("S", (), {"name": n})() for n in names]  # noqa: E731
    assert describe(make("red circle")) == "a red circle."
    assert describe(make("red circle", "blue square")) == "a red circle to the left of a blue square."
    assert describe(make("orange square", "red circle", "blue square")) == (
        "an orange square, a red circle and a blue square, from left to right."
    )


def test_parse_objects_counts_repeats_and_ignores_other_words():
    text = "A red circle, a red circle and a green triangles; the sky is blue."
    assert parse_objects(text) == Counter({("red", "circle"): 2, ("green", "triangle"): 1})
    assert len(PAIRS) == 18


def test_dataset_is_a_pure_function_of_seed_and_index():
    identity = lambda image: image  # noqa: E731
    a = SyntheticShapesDataset(identity, seed=0)
    b = SyntheticShapesDataset(identity, seed=0)
    held_out = SyntheticShapesDataset(identity, seed=1)
    for i in range(5):
        x, y = a.load(i, seed=3), b.load(i, seed=3)
        assert x["answer"] == y["answer"] and x["image"].tobytes() == y["image"].tobytes()
    assert [a.load(i, 0)["image"].tobytes() for i in range(5)] != [held_out.load(i, 0)["image"].tobytes() for i in range(5)]


def test_prompt_kinds_restrict_the_questions():
    captions = SyntheticShapesDataset(lambda im: im, prompt_kinds=["describe"], instruction_template=None)
    item = captions.load(0, 0)
    assert "instruction_input" not in item and item["answer"].endswith(".")
    with pytest.raises(ValueError, match="prompt_kinds: unknown"):
        SyntheticShapesDataset(lambda im: im, prompt_kinds=["poems"])
