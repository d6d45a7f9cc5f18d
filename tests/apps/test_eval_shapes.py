"""The nano model's scorer: each scoring rule, the other renderer, and the three protocols end to end."""
from __future__ import annotations

import json
import random

import pytest

from minigpt4.datasets.datasets.synthetic_shapes import COLOURS, PROMPT_KINDS, Shape, SyntheticShapesDataset, Turn, ask, describe
from minigpt4.apps import eval_shapes
from minigpt4.apps.eval_shapes import (
    EXISTS_CASES,
    OTHER_SHADES,
    OTHER_SIZES,
    by_scene,
    conversation_figures,
    conversation_turns,
    counts_right,
    describes_layout,
    describes_scene,
    evaluate_conversations,
    evaluate_renderer,
    exists_case,
    names_colour,
    other_scene,
    places_right,
    says_yes_no,
    score_turn,
    verdict,
)

SCENE = [Shape("red", "circle", 0.2, 0.5, 0.3), Shape("blue", "square", 0.5, 0.3, 0.2), Shape("green", "triangle", 0.8, 0.6, 0.25)]


def test_exact_scene_needs_every_shape_and_nothing_more():
    truth = describe(SCENE)
    assert describes_scene("a red circle, a blue square and a green triangle.", truth)
    assert not describes_scene("a red circle and a blue square.", truth)
    assert not describes_scene("a red circle, a blue square, a green triangle and a red square.", truth)


def test_exact_scene_in_order_also_needs_left_to_right():
    truth = describe(SCENE)
    assert describes_layout("a red circle, a blue square and a green triangle, from left to right.", truth)
    assert describes_scene("a blue square, a red circle and a green triangle.", truth)
    assert not describes_layout("a blue square, a red circle and a green triangle.", truth)
    assert not describes_layout("a red circle and a blue square.", truth)


def test_count_needs_the_right_number_and_no_other():
    assert counts_right("there are two shapes.", 2)
    assert counts_right("There are 2 shapes.", 2)
    assert not counts_right("there are three shapes.", 2)
    assert not counts_right("two or three shapes.", 2)
    assert not counts_right("some shapes.", 2)


def test_colour_needs_exactly_the_right_colour():
    assert names_colour("the circle is red.", "red")
    assert not names_colour("the circle is red and blue.", "red")
    assert not names_colour("the circle is blue.", "red")
    assert not names_colour("a circle.", "red")


def test_position_needs_exactly_the_right_place():
    assert places_right("the red circle is in the middle.", "in the middle")
    assert not places_right("the red circle is on the left.", "in the middle")
    assert not places_right("on the left or in the middle.", "in the middle")
    assert not places_right("the red circle is on the leftmost side.", "on the left")


def test_yes_no_is_read_from_the_last_verdict():
    assert says_yes_no("Yes, there is a red circle.", True)
    assert not says_yes_no("no, there is no red circle.", True)  # the circle is there
    assert says_yes_no("no, there is no red square.", False)
    assert says_yes_no("the square is blue, so no.", False)
    assert says_yes_no("there is no square, so no.", False)
    assert not says_yes_no("there is no square, so yes.", False)
    assert says_yes_no("the circles are red and green, so yes.", True)
    assert not says_yes_no("nothing like that, but yes.", False)
    assert not says_yes_no("the square is blue.", False)  # no verdict at all
    assert not says_yes_no("", True)
    assert [verdict(r) for r in ("no, there is no red square.", "the circles are red, so yes.", "the square is blue.")] == ["no", "yes", None]


@pytest.mark.parametrize("reasoned", [False, True])
@pytest.mark.parametrize("kind", PROMPT_KINDS)
def test_the_dataset_answer_of_every_kind_scores_right_and_another_one_wrong(kind, reasoned):
    rng = random.Random(3)
    turns = [t for t in (ask(SCENE, kind, rng, reasoned=reasoned) for _ in range(20)) if t is not None]
    assert turns
    for turn in turns:
        assert score_turn(turn, SCENE, turn.answer), turn
        wrong = {
            "describe": "a red circle.",
            "count": "there are two shapes.",
            "colour": "it is purple.",
            "where": "it is on the right." if turn.focus and turn.focus.place != "on the right" else "it is on the left.",
            "exists": "yes." if verdict(turn.answer) == "no" else "no.",
        }[kind]
        assert not score_turn(turn, SCENE, wrong), turn


def test_a_follow_up_about_it_is_scored_on_its_shape():
    turn = ask(SCENE, "colour", random.Random(0), focus=SCENE[1])
    assert turn.refers_back and turn.question == "What colour is it?"
    assert score_turn(turn, SCENE, "it is blue.") and not score_turn(turn, SCENE, "it is red.")


def test_conversation_figures_count_every_question_and_split_only_where_both_occur():
    colour_plain = ask(SCENE, "colour", random.Random(0))
    colour_back = ask(SCENE, "colour", random.Random(0), focus=SCENE[0])
    count = ask(SCENE, "count", random.Random(0))
    figures = conversation_figures([(colour_plain, True), (colour_back, False), (count, True), (count, False)])
    assert figures["all"] == {"accuracy": 0.5, "questions": 4}
    assert figures["colour"]["plain"] == {"accuracy": 1.0, "questions": 1}
    assert figures["colour"]["refers_back"] == {"accuracy": 0.0, "questions": 1}
    assert figures["count"] == {"accuracy": 0.5, "questions": 2}


def test_is_there_is_sorted_by_what_the_scene_holds_of_the_asked_pair():
    def case(name: str) -> str:
        return exists_case(Turn("exists", f"Is there a {name}?", ""), SCENE)

    assert case("blue square") == "pair"
    assert case("blue circle") == "crossed"  # a blue square and a red circle
    assert case("purple square") == "kind_only"
    assert case("green circle") == "crossed"
    assert case("purple triangle") == "kind_only"
    two = SCENE[:2]  # a red circle and a blue square: no triangle, no green
    assert exists_case(Turn("exists", "Is there a red triangle?", ""), two) == "colour_only"
    assert exists_case(Turn("exists", "Is there a green triangle?", ""), two) == "neither"
    with pytest.raises(ValueError, match="Describe this image"):
        exists_case(Turn("describe", "Describe this image.", ""), SCENE)
    # every "no" the dataset asks is one of the four other cases, every "yes" the pair
    rng = random.Random(5)
    for _ in range(200):
        turn = ask(SCENE, "exists", rng, hard=0.5)
        assert (exists_case(turn, SCENE) == "pair") == (verdict(turn.answer) == "yes"), turn


def test_by_scene_lists_every_case_and_says_none_where_none_was_asked():
    figures = by_scene([("pair", True), ("pair", False), ("crossed", True)])
    assert list(figures) == list(EXISTS_CASES)
    assert figures["pair"] == {"accuracy": 0.5, "questions": 2}
    assert figures["crossed"] == {"accuracy": 1.0, "questions": 1}
    assert figures["neither"] == {"accuracy": None, "questions": 0}


def test_held_out_conversations_start_with_describe_and_are_deterministic():
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=20, seed=1)
    for i in range(20):
        scene, _ = scenes.scene(i)
        turns = conversation_turns(scene, 1, i)
        assert len(turns) == 4 and turns[0].question == "Describe this image."
        assert all(t.kind != "describe" for t in turns[1:])
        assert turns == conversation_turns(scene, 1, i)


def _nearest_colour(rgb: tuple[int, ...]) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, COLOURS[name])))


def test_other_renderer_draws_other_shades_of_the_same_colour_names():
    for name, shades in OTHER_SHADES.items():
        for rgb in shades.values():
            assert _nearest_colour(rgb) == name, (name, rgb)
            # outside the training shades (each channel within 25 of the palette)
            assert max(abs(a - b) for a, b in zip(rgb, COLOURS[name])) > 25, (name, rgb)
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=40, seed=1)
    seen = set()
    for i in range(40):
        shapes, image = other_scene(scenes, i)
        for s in shapes:
            pixel = image.getpixel((int(s.cx * image.width), int(s.cy * image.height)))
            assert _nearest_colour(pixel) == s.colour, (i, s, pixel)
            # the centre of a small anti-aliased triangle is a shade blended a little with the white
            shade = min(OTHER_SHADES[s.colour].values(), key=lambda rgb: max(abs(a - b) for a, b in zip(rgb, pixel)))
            assert max(abs(a - b) for a, b in zip(shade, pixel)) <= 10, (i, s, pixel)
            seen.add(shade)
    assert len(seen) >= 12  # most shades occur


def test_other_renderer_relays_out_the_same_shapes_at_other_sizes_anti_aliased():
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=40, seed=1)
    sizes = []
    for i in range(40):
        shapes, image = other_scene(scenes, i)
        trained, trained_image = scenes.scene(i)
        assert [(s.colour, s.shape) for s in shapes] == [(s.colour, s.shape) for s in trained]
        assert [s.cx for s in shapes] == sorted(s.cx for s in shapes)
        for j, a in enumerate(shapes):
            for b in shapes[j + 1 :]:
                assert abs(a.cx - b.cx) > (a.size + b.size) / 2 or abs(a.cy - b.cy) > (a.size + b.size) / 2
        sizes += [s.size for s in shapes]
        palette = {(255, 255, 255)} | {rgb for shades in OTHER_SHADES.values() for rgb in shades.values()}
        assert set(image.getdata()) - palette  # blended edges: colours that no fill has
        assert image.size == trained_image.size
    assert all(OTHER_SIZES[0] <= s <= OTHER_SIZES[1] for s in sizes)
    assert any(s < 0.2 for s in sizes) and any(s > 0.4 for s in sizes)  # training draws 0.2-0.4
    assert other_scene(scenes, 3)[0] == other_scene(scenes, 3)[0]


# ---- the real nano model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nano_chat(request):
    import torch

    from minigpt4.chat import DEFAULT_CFG, load_chat

    # A 135M model answering one question at a time gains little from threads, and on a busy CPU
    # (a training job beside the tests) a second thread makes every step wait: 10x slower here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.getfixturevalue("smollm2_dir")
    yield load_chat(DEFAULT_CFG)
    torch.set_num_threads(threads)


def _questions(figure: dict) -> int:
    return figure["questions"]


@pytest.mark.slow
def test_conversation_and_renderer_protocols_on_the_nano_model(nano_chat):
    conv = evaluate_conversations(nano_chat, num_scenes=3, show_progress=False)
    assert conv["first_turn_exact_scene"]["questions"] == 3
    assert len(conv["examples"]) == 3 and all(len(turns) == 4 for turns in conv["examples"])
    follow_ups = conv["follow_ups"]
    by_type = {k: v for k, v in follow_ups.items() if k != "all"}
    assert follow_ups["all"]["questions"] == 9 == sum(map(_questions, by_type.values()))
    assert set(by_type) <= {"count", "colour", "position", "yes/no"}
    for figure in by_type.values():
        if "plain" in figure:
            assert _questions(figure["plain"]) + _questions(figure["refers_back"]) == figure["questions"]
    first_ok = sum(turns[0]["ok"] for turns in conv["examples"])
    assert conv["first_turn_exact_scene"]["accuracy"] == first_ok / 3
    assert sum(t["ok"] for turns in conv["examples"] for t in turns[1:]) == round(follow_ups["all"]["accuracy"] * 9)
    # the first 3 held-out chats ask "is there" 4 times; by_scene sorts each of them once
    yes_no, split = follow_ups["yes/no"], follow_ups["yes/no"]["by_scene"]
    assert yes_no["questions"] == 4 == sum(map(_questions, split.values()))
    right = sum(f["accuracy"] * f["questions"] for f in split.values() if f["questions"])
    assert round(right) == round(yes_no["accuracy"] * 4)

    rend = evaluate_renderer(nano_chat, num_scenes=4, batch_size=4, show_progress=False)
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=4, seed=1)
    three = sum(len(other_scene(scenes, i)[0]) == 3 for i in range(4))
    assert rend["exact_scene"]["questions"] == 4 and rend["exact_scene_three_shapes"]["questions"] == three
    assert len(rend["examples"]) == 4
    exact = [describes_scene(e["reply"], e["truth"]) for e in rend["examples"]]
    in_order = [describes_layout(e["reply"], e["truth"]) for e in rend["examples"]]
    assert rend["exact_scene"]["accuracy"] == sum(exact) / 4 and rend["exact_scene_in_order"]["accuracy"] == sum(in_order) / 4
    first_in_order = sum(t[0]["ok"] and describes_layout(t[0]["reply"], t[0]["truth"]) for t in conv["examples"])
    assert conv["first_turn_exact_scene_in_order"]["accuracy"] == first_in_order / 3


def test_cli_keeps_the_single_protocol_keys_on_top(monkeypatch, capsys):
    """``scripts/train_nano.sh`` and ``tests/test_nano.py`` read the single protocol's keys at the top."""
    single = {"scenes": 2, "seed": 1, "exact_scene_accuracy": 0.5, "counting_accuracy": 1.0, "colour_accuracy": 0.0, "examples": []}
    monkeypatch.setattr("minigpt4.chat.load_chat", lambda *args, **kwargs: "chat")
    monkeypatch.setattr(eval_shapes, "evaluate", lambda chat, n, *args: dict(single, scenes=n))
    conversation = {"turns": 4, "first_turn_exact_scene": {"accuracy": 1.0, "questions": 2},
                    "follow_ups": {"all": {"accuracy": 0.75, "questions": 4}, "colour": {"accuracy": 0.5, "questions": 2},
                                   "yes/no": {"accuracy": 1.0, "questions": 2}}}
    renderer = {"exact_scene": {"accuracy": 0.5, "questions": 2}}
    monkeypatch.setattr(eval_shapes, "evaluate_conversations", lambda chat, n, *args: dict(conversation, scenes=n))
    monkeypatch.setattr(eval_shapes, "evaluate_renderer", lambda chat, n, *args: dict(renderer, scenes=n))
    result = eval_shapes.main(["-n", "2"])
    printed = capsys.readouterr()
    assert json.loads(printed.out) == result
    assert result == {**single, "single": single, "conversation": dict(conversation, scenes=2), "renderer": dict(renderer, scenes=2)}
    # The figures the README quotes, readable, after the JSON.
    assert printed.err.splitlines()[-3:] == [
        "one question a scene (2 scenes): exact 50%, counting 100%, colour 0%",
        "4-turn chat (2 scenes): turn 1 exact 100%; follow-ups 75% (colour 50% of 2, yes/no 100% of 2)",
        "another renderer (2 scenes): exact 50%",
    ]
    assert eval_shapes.main(["-n", "3", "--protocol", "renderer"]) == {"renderer": dict(renderer, scenes=3)}


@pytest.mark.parametrize("flags, message", [(["-n", "0"], "--num-scenes: must be at least 1, got 0"),
                                            (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
                                            (["--image-size", "0"], "--image-size: must be at least 1, got 0")])
def test_cli_checks_its_numbers_before_the_model_loads(flags, message, monkeypatch, capsys):
    monkeypatch.setattr("minigpt4.chat.load_chat", lambda *args, **kwargs: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit) as exit_:
        eval_shapes.main(flags)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().endswith(message)


def test_cli_logs_each_protocol_as_it_ends(monkeypatch, caplog):
    """An interrupted run keeps the figures of the protocols that ended."""
    monkeypatch.setattr("minigpt4.chat.load_chat", lambda *args, **kwargs: "chat")
    monkeypatch.setattr(eval_shapes, "evaluate", lambda chat, n, *args: {"scenes": n})

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_shapes, "evaluate_conversations", interrupted)
    with caplog.at_level("INFO", logger="minigpt4.apps.eval_shapes"), pytest.raises(KeyboardInterrupt):
        eval_shapes.main(["-n", "2"])
    assert 'single: {"scenes": 2}' in caplog.text
