"""Build a stage-2 set from your own images, the way the paper built cc_sbu_align (section 3.2).

1. **Describe**: the stage-1 model answers ``###Human: <Img><ImageHere></Img> Describe this image in
   detail. Give as many details as possible. Say everything you see. ###Assistant:`` (Vicuna
   template), a batch of images per ``generate`` call. While a description has fewer than
   ``min_tokens`` (80) tokens of the model's tokenizer, the same conversation goes on with
   ``###Human: Continue ###Assistant:`` (at most ``max_continuations`` times) and the replies are
   joined. Raw descriptions go to ``<out>.raw.jsonl``.
2. **Polish** (optional; the paper used ChatGPT): a local instruction-tuned causal LM rewrites each
   description with the paper's instruction, through its chat template when it has one.
3. **Filter** with rules you can read (:func:`filter_rules`): kept pairs go to ``<out>`` in the
   ``image_text_json`` format (``{"image": relative path, "answer": text}``), refused ones to
   ``<out>.rejected.jsonl`` with the rule that refused them.

Every file is written line by line and flushed; a rerun skips every image already in them, so an
interrupted run resumes where it stopped (and loads no model for a step that has nothing left).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from minigpt4.common.cli import ArgumentError, add_gpu_id

logger = logging.getLogger(__name__)

DESCRIBE_QUESTION = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE_QUESTION = "Continue"
POLISH_INSTRUCTION = (
    "Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not "
    "English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. Return "
    "directly the results without explanation. Return directly the input paragraph if it is already correct "
    "without explanation."
)
MIN_TOKENS = 80  # the paper's threshold for asking the model to continue
DEFAULT_MAX_CONTINUATIONS = 2
DEFAULT_MIN_WORDS = 20


# ---- files ---------------------------------------------------------------------------------------
def side_files(out_path: Path) -> tuple[Path, Path]:
    """``annotations.jsonl`` -> ``annotations.raw.jsonl``, ``annotations.rejected.jsonl``."""
    stem = out_path.name[: -len(out_path.suffix)] if out_path.suffix else out_path.name
    return out_path.with_name(f"{stem}.raw.jsonl"), out_path.with_name(f"{stem}.rejected.jsonl")


def check_filter_settings(out_path: Path, rejected_path: Path, settings: dict[str, Any]) -> None:
    """The polish and filter settings a set was made with stay the set's: a rerun with other ones
    (a new --min-words, another --polish-model) would add rows judged otherwise and report the
    earlier ones by rules that did not judge them. Refused with what to remove; the raw descriptions,
    the expensive part, are kept either way."""
    record = out_path.with_name(f"{out_path.name}.settings.json")
    started = any(path.is_file() and path.stat().st_size for path in (out_path, rejected_path))
    if started and record.is_file():
        earlier = json.loads(record.read_text())
        if earlier != settings:
            changed = ", ".join(f"{key} {earlier.get(key)!r} -> {value!r}" for key, value in settings.items() if earlier.get(key) != value)
            raise ArgumentError(
                f"--out: '{out_path}' was polished and filtered with other settings ({changed}); to apply the new ones, "
                f"remove '{out_path}', '{rejected_path}' and '{record}' (the raw descriptions are kept and not redone)"
            )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines of a file this script wrote; a half-written last line (a killed run) is dropped."""
    from minigpt4.chat import done_images

    done_images(path)  # truncates a half-written last line and warns about foreign ones
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "image" in row:
            rows.append(row)
    return rows


def append_jsonl(f, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


# ---- 1. describe -----------------------------------------------------------------------------------
def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def continue_description(chat, image: Any, first: str, min_tokens: int, max_continuations: int, **generation: Any) -> tuple[str, int]:
    """Ask "Continue" in the conversation that produced ``first`` until it is long enough."""
    tokenizer = chat.model.llama_tokenizer
    text, rounds = first, 0
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(DESCRIBE_QUESTION, conv)
    conv.append_message(conv.roles[1], first)
    while count_tokens(tokenizer, text) < min_tokens and rounds < max_continuations:
        chat.ask(CONTINUE_QUESTION, conv)
        reply, _ = chat.answer(conv, img_list, **generation)
        rounds += 1
        if not reply:
            break  # asking again in the same conversation would only repeat the empty turn
        text = f"{text} {reply}".strip()
    return text, rounds


def describe_images(
    chat, images: Sequence[Any], min_tokens: int = MIN_TOKENS, max_continuations: int = DEFAULT_MAX_CONTINUATIONS, **generation: Any
) -> list[dict[str, Any]]:
    """One description per image: a batched first answer, then continuations for short ones."""
    tokenizer = chat.model.llama_tokenizer
    results = []
    for image, first in zip(images, chat.answer_batch(images, DESCRIBE_QUESTION, **generation)):
        text, rounds = first, 0
        if count_tokens(tokenizer, first) < min_tokens and max_continuations > 0:
            text, rounds = continue_description(chat, image, first, min_tokens, max_continuations, **generation)
        results.append({"answer": text, "tokens": count_tokens(tokenizer, text), "continuations": rounds})
    return results


def describe_folder(
    chat_factory: Callable[[], Any],
    image_dir: Path,
    raw_path: Path,
    batch_size: int = 8,
    min_tokens: int = MIN_TOKENS,
    max_continuations: int = DEFAULT_MAX_CONTINUATIONS,
    **generation: Any,
) -> int:
    """Describe every image of ``image_dir`` not yet in ``raw_path``; returns how many were added.

    ``chat_factory`` builds the model only when something is left to describe.
    """
    from minigpt4.chat import list_images
    from minigpt4.conversation import ImageError, open_image

    if batch_size < 1:
        raise SystemExit(f"--batch-size: must be at least 1, got {batch_size}")
    done = {row["image"] for row in read_jsonl(raw_path)}
    names = list_images(image_dir, "--image-dir")
    todo = [name for name in names if name not in done]
    logger.info("describe: %d images in %s, %d already described, %d to go", len(names), image_dir, len(names) - len(todo), len(todo))
    if not todo:
        return 0
    chat = chat_factory()
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    with open(raw_path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="describe", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for name in todo[start : start + batch_size]:
                try:
                    images.append(open_image(image_dir / name))
                    batch.append(name)
                except ImageError as err:
                    # recorded, so a resumed run does not try it again and the report counts it
                    logger.warning("skipped: %s", err)
                    append_jsonl(out, {"image": name, "error": str(err)})
            if images:
                for name, result in zip(batch, describe_images(chat, images, min_tokens, max_continuations, **generation)):
                    append_jsonl(out, {"image": name, **result})
            bar.update(len(todo[start : start + batch_size]))
    return len(todo)


# ---- 2. polish -------------------------------------------------------------------------------------
class Polisher:
    """A local instruction-tuned causal LM that mends descriptions with the paper's instruction."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", max_new_tokens: int = 512, batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            dtype = "auto" if self.device.type == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_kernels=False).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise SystemExit(f"--polish-model: cannot load a causal LM from '{path}' ({err})") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenizer.padding_side = "left"  # generation continues each row right after its prompt
        self.use_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        logger.info("polish: %s on %s (%s)", path, self.device, "its chat template" if self.use_chat_template else "a plain prompt")

    def prompt(self, paragraph: str) -> str:
        message = f"{POLISH_INSTRUCTION}\n\n{paragraph}"
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        return f"{message}\n\nResult:"

    @torch.inference_mode()
    def __call__(self, paragraphs: Sequence[str]) -> list[str]:
        results: list[str] = []
        for start in range(0, len(paragraphs), self.batch_size):
            prompts = [self.prompt(p) for p in paragraphs[start : start + self.batch_size]]
            # a chat template writes its own BOS; adding another would shift what the model expects
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat_template).to(self.device)
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
            )
            new = out[:, enc.input_ids.shape[1] :]
            results += [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return results


# ---- 3. filter -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    rejects: Callable[[str], bool]


def sentences(text: str) -> list[str]:
    """Sentences, normalised (lower case, words only) so that punctuation cannot hide a repeat."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [norm for part in parts if (norm := " ".join(re.findall(r"[\w']+", part.lower())))]


def has_repeated_sentence(text: str) -> bool:
    counts = Counter(sentences(text))
    return any(n > 1 for n in counts.values())


def filter_rules(min_words: int = DEFAULT_MIN_WORDS) -> list[Rule]:
    """The rules in the order they are tried; the first that refuses a description names it."""
    return [
        Rule("empty", "no text", lambda text: not text.strip()),
        Rule("repeated_sentences", "the same sentence more than once", has_repeated_sentence),
        Rule("too_short", f"fewer than {min_words} words", lambda text: len(text.split()) < min_words),
    ]


def first_failed_rule(text: str, rules: Sequence[Rule]) -> Rule | None:
    return next((rule for rule in rules if rule.rejects(text)), None)


def finish(
    raw_path: Path,
    out_path: Path,
    rejected_path: Path,
    rules: Sequence[Rule],
    polisher_factory: Callable[[], Polisher] | None = None,
    batch_size: int = 8,
) -> None:
    """Polish (optionally) and filter every raw description not yet in ``out_path``/``rejected_path``."""
    done = {row["image"] for path in (out_path, rejected_path) for row in read_jsonl(path)}
    todo = [row for row in read_jsonl(raw_path) if row["image"] not in done]
    logger.info("filter: %d descriptions to %s", len(todo), "polish and filter" if polisher_factory else "filter")
    if not todo:
        return
    polisher = polisher_factory() if polisher_factory and any("answer" in row for row in todo) else None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as kept, open(rejected_path, "a", encoding="utf-8") as refused, tqdm(
        total=len(todo), desc="polish + filter" if polisher else "filter", unit="img"
    ) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            for row in batch:
                if "answer" not in row:
                    append_jsonl(refused, {"image": row["image"], "rule": "unreadable", "error": row.get("error", "")})
            described = [row for row in batch if "answer" in row]
            texts = [row["answer"] for row in described]
            if polisher is not None and texts:
                texts = polisher(texts)
            for row, text in zip(described, texts):
                rule = first_failed_rule(text, rules)
                if rule is None:
                    append_jsonl(kept, {"image": row["image"], "answer": text})
                else:
                    append_jsonl(refused, {"image": row["image"], "rule": rule.name, "answer": text, "raw": row["answer"]})
            bar.update(len(batch))


def report(out_path: Path, rejected_path: Path, rules: Sequence[Rule]) -> dict[str, int]:
    """Counts over the whole output (every run so far): kept, and refused per rule."""
    counts = {"kept": len(read_jsonl(out_path))}
    refused = Counter(row.get("rule", "?") for row in read_jsonl(rejected_path))
    for rule in rules:
        counts[rule.name] = refused.pop(rule.name, 0)
    counts.update(refused)  # "unreadable", and rules of an earlier run with other settings
    return counts


def format_report(counts: dict[str, int], rules: Sequence[Rule], out_path: Path, rejected_path: Path) -> str:
    described = {rule.name: rule.description for rule in rules}
    described["unreadable"] = "the image could not be opened"
    lines = [f"kept {counts['kept']} pairs in {out_path}; refused (details in {rejected_path}):"]
    lines += [f"  {name:<20} {n:>6}  ({described.get(name, 'an earlier run')})" for name, n in counts.items() if name != "kept"]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from minigpt4.chat import generation_args
    from minigpt4.conversation.engines import DECODES

    parser = argparse.ArgumentParser(
        prog="python dataset/make_stage2_data.py",
        description="Describe, polish and filter your images into a stage-2 set (image_text_json format).",
    )
    parser.add_argument("--cfg-path", required=True, help="evaluation config of the stage-1 model, e.g. eval_configs/minigpt4_eval.yaml")
    parser.add_argument("--image-dir", type=Path, required=True, help="folder of images (subfolders included)")
    parser.add_argument("--out", type=Path, help="output JSON Lines (default: <image-dir>/annotations.jsonl)")
    parser.add_argument("--options", nargs="+", default=[], help="override config settings, key=value (e.g. model.ckpt=...)")
    add_gpu_id(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--min-tokens", type=int, default=MIN_TOKENS, help="ask 'Continue' while a description is shorter (paper: 80)")
    parser.add_argument("--max-continuations", type=int, default=DEFAULT_MAX_CONTINUATIONS, help="cap on 'Continue' turns per image")
    parser.add_argument("--polish-model", help="local instruction-tuned causal LM folder (any AutoModelForCausalLM) to mend descriptions")
    parser.add_argument("--polish-max-new-tokens", type=int, default=512)
    parser.add_argument("--min-words", type=int, default=DEFAULT_MIN_WORDS, help="filter: refuse descriptions with fewer words")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="static: each batch of descriptions and each continuation by our decode loop (one CUDA graph a step on a GPU)")
    generation_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    from minigpt4.chat import generation_from_args, load_chat, pick_device
    from minigpt4.common.cli import existing_folder, writable_file

    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    out_path = args.out or args.image_dir / "annotations.jsonl"
    raw_path, rejected_path = side_files(out_path)
    generation = generation_from_args(args)
    # Checked now, not after hours of describing.
    writable_file("--out", out_path)
    if args.polish_model:
        existing_folder("--polish-model", args.polish_model)
    check_filter_settings(out_path, rejected_path, {"min_words": args.min_words, "polish_model": args.polish_model})
    rules = filter_rules(args.min_words)
    try:
        describe_folder(
            lambda: load_chat(args.cfg_path, args.options, args.gpu_id, decode=args.decode),
            args.image_dir, raw_path, args.batch_size, args.min_tokens, args.max_continuations, **generation,
        )
        # the stage-1 model is gone before the polishing LM loads: both may not fit on one GPU
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        polisher_factory = None
        if args.polish_model:
            polisher_factory = partial(Polisher, args.polish_model, pick_device(args.gpu_id), args.polish_max_new_tokens, args.batch_size)
        finish(raw_path, out_path, rejected_path, rules, polisher_factory, args.batch_size)
    except KeyboardInterrupt:
        logger.warning("interrupted; run the same command again to resume (%s)", out_path)
        raise SystemExit(130) from None
    counts = report(out_path, rejected_path, rules)
    logger.info("%s", format_report(counts, rules, out_path, rejected_path))
    return counts
