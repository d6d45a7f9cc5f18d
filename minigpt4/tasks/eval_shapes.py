"""Score a MiniGPT-4 on held-out synthetic scenes through the public ``Chat`` API.

    python -m minigpt4.tasks.eval_shapes --cfg-path eval_configs/minigpt4_nano_eval.yaml -n 200

Every scene is asked three questions in fresh conversations, answered greedily in batches:
"Describe this image." (exact-scene accuracy: every (colour, shape) named, nothing extra),
"How many shapes are there?" (counting accuracy) and, where a shape kind occurs once,
"What colour is the <shape>?" (colour accuracy). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from tqdm import tqdm

from minigpt4.datasets.datasets.synthetic_shapes import NUMBERS, SyntheticShapesDataset, parse_objects, questions

HELD_OUT_SEED = 1  # training configs use seed 0


def evaluate(chat, num_scenes: int = 200, seed: int = HELD_OUT_SEED, batch_size: int = 16, image_size: int = 64, show_progress: bool = True) -> dict[str, Any]:
    scenes = SyntheticShapesDataset(lambda image: image, num_samples=num_scenes, image_size=image_size, seed=seed)
    exact = counted = coloured = colour_asked = 0
    examples = []
    batches = range(0, num_scenes, batch_size)
    for start in tqdm(batches, desc="scenes", disable=not show_progress):
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
                ok = parse_objects(reply) == parse_objects(questions(truth)["describe"][1])
                exact += ok
                if len(examples) < 5:
                    examples.append({"truth": questions(truth)["describe"][1], "reply": reply})
            elif kind == "count":
                counted += NUMBERS[len(truth)] in reply.lower().split() or str(len(truth)) in reply.split()
            else:
                colour_asked += 1
                coloured += truth.rstrip(".").split()[-1] in reply.lower()
    return {
        "scenes": num_scenes,
        "seed": seed,
        "exact_scene_accuracy": exact / num_scenes,
        "counting_accuracy": counted / num_scenes,
        "colour_accuracy": coloured / max(colour_asked, 1),
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", default=None, help="eval config (default: the nano model)")
    parser.add_argument("-n", "--num-scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="scene seed; training uses 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, help="side of the rendered scenes in pixels")
    parser.add_argument("--gpu-id", type=int, default=0)
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from minigpt4.chat import DEFAULT_CFG, load_chat

    chat = load_chat(args.cfg_path or DEFAULT_CFG, args.options, args.gpu_id)
    result = evaluate(chat, args.num_scenes, args.seed, args.batch_size, args.image_size)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
