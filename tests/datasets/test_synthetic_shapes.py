"""The nano model's scenes: deterministic per seed, and every answer true of its picture."""
from __future__ import annotations

import hashlib
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


CHATML_TURN = "{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n<|im_start|>user\n"


@pytest.mark.parametrize("index", range(40))
def test_conversation_answers_are_true_and_follow_ups_refer_to_the_last_shape(index):
    from minigpt4.datasets.datasets.synthetic_shapes import conversation

    rng = random.Random(index)
    scene = make_scene(rng)
    turns = conversation(scene, rng, 4)
    assert 1 <= len(turns) <= 4 and len({(t.question, t.answer) for t in turns}) == len(turns)
    names = Counter(s.name for s in scene)
    for previous, turn in zip([None] + turns, turns):
        if turn.kind == "count":
            assert str(len(scene)) in turn.answer or ["one", "two", "three"][len(scene) - 1] in turn.answer
        if turn.kind == "exists":
            asked = turn.question[len("Is there a"):].strip(" n?")
            assert turn.answer.startswith("yes" if names[asked] else "no")
        if turn.refers_back:
            assert turn.question in ("What colour is it?", "Where is it?")
            assert previous is not None and previous.focus is turn.focus is not None
            assert turn.focus.name in turn.answer or turn.focus.colour in turn.answer
        if turn.kind in ("colour", "where") and turn.focus is not None:
            assert turn.focus in scene and (turn.focus.colour in turn.answer)


def test_a_training_conversation_renders_as_chat_renders_it():
    """The prompt a stage-2 conversation trains on is the prompt Chat builds for the same turns."""
    from minigpt4.common.config import Config
    from minigpt4.conversation import CONV_VISION_SmolLM2

    prompt_template = Config(cfg_path="eval_configs/minigpt4_nano_eval.yaml").model_cfg.prompt_template
    dataset = SyntheticShapesDataset(
        lambda image: image, seed=3, prompt_kinds=["describe", "count", "colour", "where", "exists"],
        turns=(3, 4), history_template=CHATML_TURN,
    )
    for index in range(10):
        item = dataset.load(index, seed=0)
        rendered = prompt_template.format(item["instruction_input"])
        *history, last = rendered.split("<|im_start|>assistant\n")
        conv = CONV_VISION_SmolLM2.copy()
        conv.append_message(conv.roles[0], "<Img><ImageHere></Img>")
        questions_and_answers = item["instruction_input"][len("<Img><ImageHere></Img> "):].split("<|im_start|>user\n")
        for i, chunk in enumerate(questions_and_answers):
            question, _, answer = chunk.partition("<|im_end|>\n<|im_start|>assistant\n")
            if i == 0:
                conv.messages[-1][1] += " " + question
            else:
                conv.append_message(conv.roles[0], question)
            if answer:
                conv.append_message(conv.roles[1], answer.removesuffix("<|im_end|>\n"))
        conv.append_message(conv.roles[1], None)
        assert conv.get_prompt() == rendered
        assert len(questions_and_answers) >= 3


def test_every_answer_points_at_each_earlier_answer_of_the_conversation():
    """With every_answer, ``answer_spans`` covers exactly the earlier answers inside
    ``instruction_input`` (the questions and the template outside them), one per earlier turn;
    the text itself is the text of a run without the option."""
    kinds = ["describe", "count", "colour", "where", "exists"]
    plain = SyntheticShapesDataset(lambda image: image, seed=3, prompt_kinds=kinds, turns=(1, 4), history_template=CHATML_TURN)
    every = SyntheticShapesDataset(lambda image: image, seed=3, prompt_kinds=kinds, turns=(1, 4), history_template=CHATML_TURN, every_answer=True)
    lengths = Counter()
    for index in range(30):
        item, same = every.load(index, seed=0), plain.load(index, seed=0)
        assert "answer_spans" not in same
        assert (item["instruction_input"], item["answer"]) == (same["instruction_input"], same["answer"])
        prompt = item["instruction_input"]
        answers = [chunk.split("<|im_end|>")[0] for chunk in prompt.split("<|im_start|>assistant\n")[1:]]
        assert [prompt[start:end] for start, end in item["answer_spans"]] == answers
        for (_, end), (start, _) in zip(item["answer_spans"], item["answer_spans"][1:]):
            assert "<|im_start|>user\n" in prompt[end:start]  # a question between two answers
        lengths[len(answers)] += 1
    assert set(lengths) == {0, 1, 2, 3}  # single questions too, with no earlier answer


def test_every_answer_needs_a_conversation():
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.every_answer: only conversations"):
        SyntheticShapesDataset(lambda image: image, every_answer=True)
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.every_answer: only conversations"):
        SyntheticShapesDataset(lambda image: image, turns=(1, 3), history_template=CHATML_TURN, instruction_template=None, every_answer=True)


def test_conversations_need_a_history_template():
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.history_template: conversations of more than one turn"):
        SyntheticShapesDataset(lambda image: image, turns=(1, 3))
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.turns: expected \[min, max\]"):
        SyntheticShapesDataset(lambda image: image, turns=(3, 1), history_template=CHATML_TURN)


def test_hard_questions_ask_what_the_text_and_the_order_cannot_answer():
    """hard_questions=1: a "where" about a shape off the place its rank suggests whenever the scene
    has one, and a "no" that crosses one shape's colour with another's kind whenever one exists;
    hard_questions=0 asks exactly the questions of a run without the option."""
    from minigpt4.datasets.datasets.synthetic_shapes import ask, conversation, order_third

    assert [order_third(i, n) for n in (1, 2, 3) for i in range(n)] == [1, 0, 2, 0, 1, 2]
    checked = Counter()
    for index in range(300):
        scene = make_scene(random.Random(index))
        present = {(s.colour, s.shape) for s in scene}
        where = ask(scene, "where", random.Random(index), hard=1.0)
        unique = [s for s in scene if [o.name for o in scene].count(s.name) == 1]
        if where is not None and any(s.third != order_third(scene.index(s), len(scene)) for s in unique):
            assert where.focus.third != order_third(scene.index(where.focus), len(scene)), (scene, where)
            checked["where"] += 1
        crossed = {(a.colour, b.shape) for a in scene for b in scene} - present
        for draw in range(4):  # half the "is there" questions are a "yes"
            turn = ask(scene, "exists", random.Random(1000 * index + draw), hard=1.0)
            if turn.answer.startswith("no") and crossed:
                colour, shape = turn.answer.removeprefix("no, there is no ").rstrip(".").split()
                assert (colour, shape) in crossed, (scene, turn)
                checked["no"] += 1
    assert checked["where"] > 50 and checked["no"] > 50
    # without the option, the conversations are those drawn before it existed (the held-out
    # evaluation's questions among them): a digest of 200 of them, taken from the code before it
    digest = hashlib.sha256()
    for index in range(200):
        for turn in conversation(make_scene(random.Random(index)), random.Random(index), 4):
            digest.update(f"{turn.question}|{turn.answer}\n".encode())
    assert digest.hexdigest()[:16] == "b7ea88f0c01de0e5"


def test_reasoned_exists_says_the_colours_of_the_kind_then_the_same_verdict():
    """reasoned_exists asks the same questions and gives each "is there" the verdict of the plain
    answer, after the colours (left to right, each once) of the shapes of the kind asked about."""
    from minigpt4.datasets.datasets.synthetic_shapes import ask, kind_colours_phrase, object_sequence

    assert kind_colours_phrase([], "circle") == "there is no circle"
    seen = Counter()
    for index in range(300):
        scene = make_scene(random.Random(index))
        for draw in range(4):
            plain = ask(scene, "exists", random.Random(1000 * index + draw), hard=0.5)
            turn = ask(scene, "exists", random.Random(1000 * index + draw), hard=0.5, reasoned=True)
            assert (turn.question, turn.focus) == (plain.question, plain.focus)
            shape = turn.question.rstrip("?").split()[-1]
            named = [colour for colour, kind in object_sequence(describe(scene)) if kind == shape]  # left to right
            colours = [colour for i, colour in enumerate(named) if colour not in named[:i]]
            reason, verdict = turn.answer.rstrip(".").rsplit(", so ", 1)
            assert verdict == plain.answer.split(",")[0], (scene, turn, plain)
            if not colours:
                assert reason == f"there is no {shape}"
            elif len(named) == 1:
                assert reason == f"the {shape} is {colours[0]}"
            else:
                listed = reason.removeprefix(f"the {shape}s are ").replace(" and ", ", ").split(", ")
                assert listed == colours, (scene, turn)
            seen[(verdict, len(colours) > 1, bool(colours))] += 1
    assert {key for key, count in seen.items() if count >= 5} == {
        ("yes", False, True), ("yes", True, True), ("no", False, True), ("no", True, True), ("no", False, False)
    }
    kinds = ["describe", "count", "colour", "where", "exists"]
    chats = SyntheticShapesDataset(lambda image: image, seed=3, prompt_kinds=kinds, turns=(2, 4), history_template=CHATML_TURN, reasoned_exists=True)
    assert any(", so no." in chats.load(index, seed=0)["instruction_input"] for index in range(20))
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.reasoned_exists: only conversations"):
        SyntheticShapesDataset(lambda image: image, reasoned_exists=True)
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.reasoned_exists: only conversations"):
        SyntheticShapesDataset(lambda image: image, turns=(1, 3), history_template=CHATML_TURN, prompt_kinds=["count"], reasoned_exists=True)


def test_hard_questions_are_checked():
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.hard_questions: a probability in \[0, 1\], got 1\.5"):
        SyntheticShapesDataset(lambda image: image, turns=(1, 3), history_template=CHATML_TURN, hard_questions=1.5)
    with pytest.raises(ValueError, match=r"datasets\.synthetic_shapes\.hard_questions: only conversations"):
        SyntheticShapesDataset(lambda image: image, hard_questions=0.5)
