"""Score a MiniGPT-4 on held-out synthetic scenes through the public ``Chat`` API.

    python -m minigpt4.apps.eval_shapes --cfg-path eval_configs/minigpt4_nano_eval.yaml -n 200 --protocol all

Three protocols, each printed as a section of one JSON line:

- ``single``: every scene is asked three questions in fresh conversations, answered greedily in
  batches: "Describe this image." (exact-scene accuracy: every (colour, shape) named, nothing
  extra; "in order" also asks that they are named left to right, as the truth does), "How many shapes are there?" (counting accuracy) and, where a shape kind occurs once,
  "What colour is the <shape>?" (colour accuracy). Its figures are also the top-level keys.
- ``conversation``: one chat per scene, as a demo user would: "Describe this image." and three
  follow-ups (how many, what colour, where, is there), some about "it", each answered with the
  model's own earlier replies in view and the chat's default decoding. Its yes/no figure is also
  split ``by_scene``: whether the scene holds the asked pair, a crossed pair, the kind or the colour
  alone, or neither.
- ``renderer``: "Describe this image." on the same scenes drawn by a renderer training never
  sees (other shades of the colours, other sizes, anti-aliased edges).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from collections import defaultdict
from typing import Any, Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

from minigpt4.common.cli import add_gpu_id
from minigpt4.datasets.data_utils import derive_seed
from minigpt4.datasets.datasets.synthetic_shapes import (
    COLOURS,
    NUMBERS,
    QUESTIONS,
    Shape,
    SyntheticShapesDataset,
    Turn,
    conversation,
    describe,
    draw_shape,
    object_sequence,
    parse_objects,
    questions,
)

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 1  # training configs use seed 0
PROTOCOLS = ("single", "conversation", "renderer")
CONVERSATION_TURNS = 4
CONVERSATION_KINDS = ("describe", "count", "colour", "where", "exists")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PLACES = ("on the left", "in the middle", "on the right")
# the type each follow-up is scored as
SCORED_AS = {"describe": "exact_scene", "count": "count", "colour": "colour", "where": "position", "exists": "yes/no"}
# what a scene holds of the (colour, shape) an "is there" question names; see exists_case
EXISTS_CASES = ("pair", "crossed", "kind_only", "colour_only", "neither")


def evaluate(chat, num_scenes: int = 200, seed: int = HELD_OUT_SEED, batch_size: int = 16, image_size: int = 64, show_progress: bool = True) -> dict[str, Any]:
    """The ``single`` protocol: three questions per scene, each in a fresh conversation."""
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=num_scenes, image_size=image_size, seed=seed)
    exact = in_order = counted = coloured = colour_asked = 0
    examples = []
    batches = range(0, num_scenes, batch_size)
    for start in tqdm(batches, desc="single", disable=not show_progress):
        items = [scenes.scene(i) for i in range(start, min(start + batch_size, num_scenes))]
        asks, checks = [], []
        for scene, image in items:
            qa = questions(scene)
            asks += [(image, qa["describe"][0]), (image, qa["count"][0])]
            checks += [("describe", scene), ("count", scene)]
            if "colour" in qa:
                asks.append((image, qa["colour"][0]))
                checks.append(("colour", qa["colour"][1]))
        replies = chat.answer_batch([a[0] for a in asks], [a[1] for a in asks], do_sample=False, max_new_tokens=40)
        for (kind, truth), reply in zip(checks, replies):
            if kind == "describe":
                exact += describes_scene(reply, describe(truth))
                in_order += describes_layout(reply, describe(truth))
                if len(examples) < 5:
                    examples.append({"truth": describe(truth), "reply": reply})
            elif kind == "count":
                counted += NUMBERS[len(truth)] in reply.lower().split() or str(len(truth)) in reply.split()
            else:
                colour_asked += 1
                coloured += truth.rstrip(".").split()[-1] in reply.lower()
    return {
        "scenes": num_scenes,
        "seed": seed,
        "exact_scene_accuracy": exact / num_scenes,
        "exact_scene_in_order_accuracy": in_order / num_scenes,
        "counting_accuracy": counted / num_scenes,
        "colour_accuracy": coloured / max(colour_asked, 1),
        "examples": examples,
    }


# ---- scoring one reply ---------------------------------------------------------------------------
def _words(reply: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", reply.lower())


def describes_scene(reply: str, truth: str) -> bool:
    """Exact scene: the reply names every (colour, shape) of the true description, nothing more."""
    return parse_objects(reply) == parse_objects(truth)


def describes_layout(reply: str, truth: str) -> bool:
    """Exact scene in order: the same (colour, shape) pairs, named left to right as the truth does."""
    return object_sequence(reply) == object_sequence(truth)


def counts_right(reply: str, count: int) -> bool:
    """The right number (word or digit) and no other number."""
    numbers = {w for w in _words(reply) if w in NUMBER_WORDS or w.isdigit()}
    return bool(numbers) and numbers <= {NUMBER_WORDS[count], str(count)}


def names_colour(reply: str, colour: str) -> bool:
    """The colour words of the reply are exactly ``{colour}``."""
    return {w for w in _words(reply) if w in COLOURS} == {colour}


def places_right(reply: str, place: str) -> bool:
    """Exactly the right one of "on the left" / "in the middle" / "on the right"."""
    text = " ".join(_words(reply))
    return {p for p in PLACES if re.search(rf"\b{p}\b", text)} == {place}


def verdict(reply: str) -> str | None:
    """The reply's verdict, the last "yes" or "no" in it, or None: "no, there is no red square."
    and "the square is blue, so no." both say "no"."""
    verdicts = [w for w in _words(reply) if w in ("yes", "no")]
    return verdicts[-1] if verdicts else None


def says_yes_no(reply: str, yes: bool) -> bool:
    """The reply's :func:`verdict` is the right one."""
    return verdict(reply) == ("yes" if yes else "no")


def score_turn(turn: Turn, scene: Sequence[Shape], reply: str) -> bool:
    """Whether ``reply`` answers ``turn`` (a question of :func:`conversation`) about ``scene``."""
    if turn.kind == "describe":
        return describes_scene(reply, turn.answer)
    if turn.kind == "count":
        return counts_right(reply, len(scene))
    if turn.kind == "colour":
        return names_colour(reply, turn.focus.colour)
    if turn.kind == "where":
        return places_right(reply, turn.focus.place)
    if turn.kind == "exists":
        return says_yes_no(reply, verdict(turn.answer) == "yes")
    raise ValueError(f"no scoring rule for question kind '{turn.kind}'; choose from {', '.join(SCORED_AS)}")


def _figure(oks: Sequence[bool]) -> dict[str, Any]:
    return {"accuracy": sum(oks) / max(len(oks), 1), "questions": len(oks)}


def exists_case(turn: Turn, scene: Sequence[Shape]) -> str:
    """What ``scene`` holds of the pair an "is there" question names, one of :data:`EXISTS_CASES`:
    ``pair`` (it is there: "yes"), ``crossed`` (the colour in another kind and the kind in another
    colour: "is there a blue square?" with a blue triangle and a yellow square), ``kind_only`` (the
    kind in other colours), ``colour_only`` (the colour in other kinds) or ``neither``."""
    named = object_sequence(turn.question)
    if turn.kind != "exists" or len(named) != 1:
        raise ValueError(f"not an 'is there' question about one coloured shape: {turn.question!r}")
    colour, shape = named[0]
    has_colour = any(s.colour == colour for s in scene)
    has_kind = any(s.shape == shape for s in scene)
    if any((s.colour, s.shape) == (colour, shape) for s in scene):
        return "pair"
    if has_colour and has_kind:
        return "crossed"
    return "kind_only" if has_kind else "colour_only" if has_colour else "neither"


def by_scene(cases: Sequence[tuple[str, bool]]) -> dict[str, Any]:
    """Accuracy and number of questions for each of :data:`EXISTS_CASES` (None where none was asked)."""
    figures = {}
    for case in EXISTS_CASES:
        oks = [ok for c, ok in cases if c == case]
        figures[case] = _figure(oks) if oks else {"accuracy": None, "questions": 0}
    return figures


# ---- conversation protocol -----------------------------------------------------------------------
def conversation_turns(scene: Sequence[Shape], seed: int, index: int) -> list[Turn]:
    """The held-out conversation about scene ``index``: "Describe this image." then follow-ups."""
    rng = random.Random(derive_seed(seed, "eval-conversation", index))
    return conversation(scene, rng, CONVERSATION_TURNS, kinds=CONVERSATION_KINDS, first="describe")


def chat_through(chat, image: Image.Image, turns: Sequence[Turn], max_new_tokens: int = 40) -> list[str]:
    """Ask ``turns`` one after the other in ONE chat; later questions see the model's own replies."""
    conv = chat.new_conversation()
    img_list: list = []
    chat.upload_img(image, conv, img_list)
    replies = []
    for turn in turns:
        chat.ask(turn.question, conv)
        reply, _ = chat.answer(conv, img_list, max_new_tokens=max_new_tokens)
        replies.append(reply)
    return replies


def conversation_figures(scored: Sequence[tuple[Turn, bool]]) -> dict[str, Any]:
    """Per scored type of the follow-ups: accuracy and number of questions, split into plain and
    refers-back questions where a type has both."""
    by_type: dict[str, list[tuple[Turn, bool]]] = defaultdict(list)
    for turn, ok in scored:
        by_type[SCORED_AS[turn.kind]].append((turn, ok))
    figures: dict[str, Any] = {"all": _figure([ok for _, ok in scored])}
    for kind in sorted(by_type):
        pairs = by_type[kind]
        figures[kind] = _figure([ok for _, ok in pairs])
        plain = [ok for turn, ok in pairs if not turn.refers_back]
        back = [ok for turn, ok in pairs if turn.refers_back]
        if plain and back:
            figures[kind].update(plain=_figure(plain), refers_back=_figure(back))
    return figures


def evaluate_conversations(
    chat, num_scenes: int = 200, seed: int = HELD_OUT_SEED, image_size: int = 64, show_progress: bool = True, num_examples: int = 3
) -> dict[str, Any]:
    """The ``conversation`` protocol: a 4-turn chat per scene, scored turn by turn."""
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=num_scenes, image_size=image_size, seed=seed)
    first, first_in_order, follow_ups, exists_cases, examples = [], [], [], [], []
    for i in tqdm(range(num_scenes), desc="conversation", disable=not show_progress):
        scene, image = scenes.scene(i)
        turns = conversation_turns(scene, seed, i)
        replies = chat_through(chat, image, turns)
        oks = [score_turn(turn, scene, reply) for turn, reply in zip(turns, replies)]
        first.append(oks[0])
        first_in_order.append(oks[0] and describes_layout(replies[0], turns[0].answer))
        follow_ups += list(zip(turns[1:], oks[1:]))
        exists_cases += [(exists_case(turn, scene), ok) for turn, ok in zip(turns[1:], oks[1:]) if turn.kind == "exists"]
        if len(examples) < num_examples:
            examples.append(
                [
                    {"question": t.question, "truth": t.answer, "reply": r, "scored_as": SCORED_AS[t.kind], "refers_back": t.refers_back, "ok": ok}
                    for t, r, ok in zip(turns, replies, oks)
                ]
            )
    figures = conversation_figures(follow_ups)
    if exists_cases:
        figures[SCORED_AS["exists"]]["by_scene"] = by_scene(exists_cases)
    return {
        "scenes": num_scenes,
        "seed": seed,
        "turns": CONVERSATION_TURNS,
        "first_turn_exact_scene": _figure(first),
        "first_turn_exact_scene_in_order": _figure(first_in_order),
        "follow_ups": figures,
        "examples": examples,
    }


# ---- robustness protocol: a renderer training never uses -----------------------------------------
# Named colours (CSS / X11) a person still calls by the colour name, each outside the training
# shades (more than 25 away from the training RGB in some channel) and nearest to its own name.
OTHER_SHADES = {
    "red": {"crimson": (220, 20, 60), "firebrick": (178, 34, 34), "red": (255, 0, 0)},
    "green": {"limegreen": (50, 205, 50), "seagreen": (46, 139, 87), "green": (0, 128, 0)},
    "blue": {"royalblue": (65, 105, 225), "mediumblue": (0, 0, 205), "dodgerblue": (30, 144, 255)},
    "yellow": {"yellow": (255, 255, 0), "goldenrod": (218, 165, 32), "khaki": (240, 230, 140)},
    "purple": {"darkviolet": (148, 0, 211), "mediumorchid": (186, 85, 211), "indigo": (75, 0, 130)},
    "orange": {"orange": (255, 165, 0), "coral": (255, 127, 80), "darkorange3": (205, 102, 0)},
}
OTHER_SIZES = (0.15, 0.45)  # training draws 0.2-0.4 of the side
SUPERSAMPLE = 4


def relayout(scene: Sequence[Shape], rng: random.Random, sizes: tuple[float, float] = OTHER_SIZES, tries: int = 1000) -> list[Shape]:
    """The same shapes, left to right, at new sizes and non-overlapping places."""
    for _ in range(tries):
        placed: list[Shape] = []
        for _ in range(50):
            if len(placed) == len(scene):
                break
            size = rng.uniform(*sizes)
            cx, cy = rng.uniform(size / 2, 1 - size / 2), rng.uniform(size / 2, 1 - size / 2)
            if all(abs(cx - o.cx) > (size + o.size) / 2 + 0.02 or abs(cy - o.cy) > (size + o.size) / 2 + 0.02 for o in placed):
                placed.append(Shape("", "", cx, cy, size))
        if len(placed) == len(scene):
            placed.sort(key=lambda s: s.cx)
            return [Shape(s.colour, s.shape, p.cx, p.cy, p.size) for s, p in zip(scene, placed)]
    raise RuntimeError(f"could not lay out {len(scene)} shapes of sizes {sizes} in {tries} tries")


def render_other(scene: Sequence[Shape], image_size: int, rng: random.Random) -> Image.Image:
    """Draw ``scene`` with :data:`OTHER_SHADES`, anti-aliased (drawn 4x larger, LANCZOS down)."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), "white")
    draw = ImageDraw.Draw(img)
    for s in scene:
        draw_shape(draw, s, big, rng.choice(list(OTHER_SHADES[s.colour].values())))
    return img.resize((image_size, image_size), Image.LANCZOS)


def other_scene(scenes: SyntheticShapesDataset, index: int) -> tuple[list[Shape], Image.Image]:
    """Held-out scene ``index`` re-laid out and drawn by :func:`render_other`."""
    shapes, _ = scenes.scene(index)
    rng = random.Random(derive_seed(scenes.seed, "eval-renderer", index))
    shapes = relayout(shapes, rng)
    return shapes, render_other(shapes, scenes.image_size, rng)


def evaluate_renderer(
    chat, num_scenes: int = 200, seed: int = HELD_OUT_SEED, batch_size: int = 16, image_size: int = 64, show_progress: bool = True
) -> dict[str, Any]:
    """The ``renderer`` protocol: "Describe this image." on scenes drawn by :func:`render_other`."""
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=num_scenes, image_size=image_size, seed=seed)
    results: list[tuple[int, bool, bool]] = []
    examples = []
    for start in tqdm(range(0, num_scenes, batch_size), desc="renderer", disable=not show_progress):
        items = [other_scene(scenes, i) for i in range(start, min(start + batch_size, num_scenes))]
        # greedy, as the single protocol, so the two exact-scene figures differ only by the drawing
        replies = chat.answer_batch([image for _, image in items], QUESTIONS["describe"], do_sample=False, max_new_tokens=40)
        for (shapes, _), reply in zip(items, replies):
            truth = describe(shapes)
            results.append((len(shapes), describes_scene(reply, truth), describes_layout(reply, truth)))
            if len(examples) < 5:
                examples.append({"truth": describe(shapes), "reply": reply})
    return {
        "scenes": num_scenes,
        "seed": seed,
        "exact_scene": _figure([ok for _, ok, _ in results]),
        "exact_scene_three_shapes": _figure([ok for n, ok, _ in results if n == 3]),
        "exact_scene_in_order": _figure([ok for _, _, ok in results]),
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from minigpt4.conversation.engines import DECODES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", default=None, help="eval config (default: the nano model)")
    parser.add_argument("-n", "--num-scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="scene seed; training uses 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, help="side of the rendered scenes in pixels")
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "all"], default="all")
    add_gpu_id(parser)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="static: each batch of questions by our decode loop (left-padded rows; one CUDA graph a step on a GPU)")
    args = parser.parse_args(argv)
    for flag, value in (("--num-scenes", args.num_scenes), ("--batch-size", args.batch_size), ("--image-size", args.image_size)):
        if value < 1:
            parser.error(f"{flag}: must be at least 1, got {value}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from minigpt4.chat import DEFAULT_CFG, load_chat

    chat = load_chat(args.cfg_path or DEFAULT_CFG, args.options, args.gpu_id, decode=args.decode)
    run = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    result: dict[str, Any] = {}
    # Each protocol's figures go to the log as it ends: an interrupted run keeps the finished ones.
    if "single" in run:
        single = evaluate(chat, args.num_scenes, args.seed, args.batch_size, args.image_size)
        result.update(single, single=single)  # the top-level keys stay those of the single protocol
        logger.info("single: %s", json.dumps(single))
    if "conversation" in run:
        result["conversation"] = evaluate_conversations(chat, args.num_scenes, args.seed, args.image_size)
        logger.info("conversation: %s", json.dumps(result["conversation"]))
    if "renderer" in run:
        result["renderer"] = evaluate_renderer(chat, args.num_scenes, args.seed, args.batch_size, args.image_size)
        logger.info("renderer: %s", json.dumps(result["renderer"]))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stderr.write(summary(result) + "\n")
    return result


def summary(result: dict[str, Any]) -> str:
    """The figures the README quotes, one per line (the JSON on stdout holds them all, with examples)."""
    def pct(value: float) -> str:
        return f"{100 * value:.0f}%"

    lines = []
    single = result.get("single")
    if single:
        lines.append(f"one question a scene ({single['scenes']} scenes): exact {pct(single['exact_scene_accuracy'])}, "
                     f"counting {pct(single['counting_accuracy'])}, colour {pct(single['colour_accuracy'])}")
    chat = result.get("conversation")
    if chat:
        follow = ", ".join(f"{kind} {pct(f['accuracy'])} of {f['questions']}" for kind, f in chat["follow_ups"].items() if kind != "all")
        lines.append(f"{chat['turns']}-turn chat ({chat['scenes']} scenes): turn 1 exact {pct(chat['first_turn_exact_scene']['accuracy'])}; "
                     f"follow-ups {pct(chat['follow_ups']['all']['accuracy'])} ({follow})")
    renderer = result.get("renderer")
    if renderer:
        lines.append(f"another renderer ({renderer['scenes']} scenes): exact {pct(renderer['exact_scene']['accuracy'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
