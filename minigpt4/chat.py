"""Chat with MiniGPT-4 in the terminal, or caption a folder of images.

    python -m minigpt4.chat --cfg-path eval_configs/minigpt4_eval.yaml --image a.jpg
    python -m minigpt4.chat --cfg-path eval_configs/minigpt4_eval.yaml --caption-dir imgs/ --out captions.jsonl

Questions are read line by line from stdin, so the chat also works over a pipe; answers stream to
stdout. Captioning answers ``--batch-size`` images per ``generate`` call, writes one JSON line per
image and skips images already in ``--out``, so an interrupted run resumes where it stopped.
:func:`load_chat` is the model loading shared with ``demo.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from omegaconf import OmegaConf

from minigpt4.conversation.engines import DECODES, ENGINES

logger = logging.getLogger("minigpt4.chat")

# With no --cfg-path, demo.py and this CLI run the nano model: offline, on a CPU, shipped weights.
DEFAULT_CFG = Path(__file__).resolve().parents[1] / "eval_configs" / "minigpt4_nano_eval.yaml"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEFAULT_CAPTION_PROMPT = "Describe this image in detail."


def pick_device(gpu_id: int | None = None) -> torch.device:
    """GPU ``gpu_id`` (None: the first), or the CPU when there is none (a warning only when a GPU was asked for)."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id or 0}")
    if gpu_id is not None:
        logger.warning("no CUDA GPU: running on the CPU (--gpu-id %d ignored)", gpu_id)
    else:
        logger.info("no CUDA GPU: running on the CPU")
    return torch.device("cpu")


def load_chat(
    cfg_path: str | Path,
    options: Sequence[str] | None = None,
    gpu_id: int | None = None,
    reuse_kv_cache: bool = True,
    engine: str = "hf",
    engine_url: str | None = None,
    decode: str = "generate",
):
    """Build the model, its eval image processor and a :class:`Chat` from a config file.

    ``reuse_kv_cache=False`` re-encodes the whole conversation every turn, as the original.
    ``engine``: ``"hf"`` generates in this process; ``"vllm"`` sends the context embeddings to the
    vLLM server at ``engine_url`` (the vision side and the embedding of the prompt stay here).
    ``decode``: how the hf engine writes an answer (or one ``answer_batch``), ``"generate"`` or ``"static"``
    (:class:`~minigpt4.conversation.engines.HFEngine`).
    """
    from minigpt4.common.config import Config, ConfigError
    from minigpt4.common.registry import registry
    from minigpt4.conversation import Chat, conv_template_for
    from minigpt4.conversation.decode import generate_top_k
    from minigpt4.conversation.engines import EngineMismatch, EngineUnavailable, VLLMEngine
    from minigpt4.models.base_model import checkpoint_entries
    from minigpt4.models.llm import lora_fingerprint

    if engine not in ENGINES:
        raise ConfigError(f"engine: '{engine}' is not one of {', '.join(ENGINES)}")
    if engine == "vllm" and not engine_url:
        raise ConfigError("engine_url: the vllm engine needs the vLLM server's URL, e.g. http://127.0.0.1:8001")
    if decode not in DECODES:
        raise ConfigError(f"decode: '{decode}' is not one of {', '.join(DECODES)}")
    if engine != "hf" and decode != "generate":
        raise ConfigError(f"decode: '{decode}' is the hf engine's; the {engine} engine decodes on its server")
    cfg = Config(cfg_path=str(cfg_path), options=list(options or []))
    model_cfg = cfg.model_cfg
    # The stage-2 dataset's processor when the config names it (as the original), else the eval one.
    vis_cfg = OmegaConf.select(cfg.datasets_cfg, "cc_sbu_align.vis_processor.train")
    if vis_cfg is None:
        vis_cfg = OmegaConf.select(cfg.preprocess_cfg, "vis_processor.eval")
    if vis_cfg is None:
        raise ConfigError(
            f"{cfg_path}: no image processor; set datasets.cc_sbu_align.vis_processor.train "
            "or preprocess.vis_processor.eval (e.g. name: blip2_image_eval, image_size: 224)"
        )
    if vis_cfg.get("image_size") is not None and vis_cfg.image_size != model_cfg.image_size:
        raise ConfigError(f"the image processor's image_size {vis_cfg.image_size} is not model.image_size {model_cfg.image_size}: "
                          "the ViT takes pictures of its own size; set them alike")
    vis_processor = registry.get_processor_class(vis_cfg.name).from_config(vis_cfg)
    device = pick_device(gpu_id)
    if device.type == "cpu" and model_cfg.vit_precision != "fp32":
        # Said before the model loads; the CPU runs without autocast (as the original).
        raise ConfigError(f"model.vit_precision: {model_cfg.vit_precision} needs autocast, which a chat on the CPU runs without; "
                          "set vit_precision: fp32 to run on the CPU (--options model.vit_precision=fp32)")
    model_cfg.device_8bit = gpu_id or 0  # the 8-bit LLM is placed on the same GPU, as the original demo
    model = registry.get_model_class(model_cfg.arch).from_config(model_cfg).eval()
    if "llama_proj.weight" not in getattr(model, "checkpoint_keys", set()):
        # The one layer MiniGPT-4 trains: at its random start the chat would answer nonsense, without an error.
        given = [path for _, path in checkpoint_entries(model_cfg.get("ckpt"))]
        where = f"none of {', '.join(repr(p) for p in given)}" if given else "model.ckpt is not set, so nothing"
        raise ConfigError(f"model.ckpt: {where} gives the projection llama_proj; set model.ckpt to a trained MiniGPT-4 "
                          "checkpoint (stage 1 or stage 2, e.g. the released pretrained_minigpt4_7b.pth)")
    if model_cfg.get("low_resource") or model_cfg.get("load_in_4bit"):
        # A quantized LLM is already on its GPU and refuses .to(); move the rest only.
        for name, child in model.named_children():
            if name != "llama_model":
                child.to(device)
        if model.query_tokens is not None:
            model.query_tokens.data = model.query_tokens.data.to(device)
    else:
        model.to(device)

    logger.info("model %s (%s) ready on %s", model_cfg.arch, model_cfg.model_type, device)
    template = conv_template_for(model_cfg.model_type)
    # vLLM knows EOS from the model folder; the template's stop text (Vicuna's ###) goes with each request.
    llm_engine = None
    if engine == "vllm":
        llm_engine = VLLMEngine(engine_url, stop=[template.stop_str or ""], lora_fingerprint=lora_fingerprint(model.llama_model),
                                top_k=generate_top_k(model.llama_model.generation_config))
        try:
            llm_engine.model_name()  # a server running the wrong LLM is an error now, not wrong answers later
        except EngineMismatch as err:
            raise ConfigError(f"engine_url: {err}") from None
        except EngineUnavailable as err:  # not up yet: requests get 503 until it is
            logger.warning("%s", err)
    return Chat(
        model, vis_processor, device, template, reuse_kv_cache=reuse_kv_cache,
        generation=OmegaConf.to_container(cfg.generation_cfg), model_type=model_cfg.model_type, engine=llm_engine,
        decode=decode,
    )


# ---- terminal chat ---------------------------------------------------------------------------
def chat_loop(
    chat, images: Sequence[Path], questions: Iterable[str], out=sys.stdout, interactive: bool | None = None, **generation: Any
) -> None:
    """Answer each question (one per line) about ``images``; ``/reset`` starts over, ``/quit`` ends.
    ``interactive`` (default: whether stdin is a terminal): a greeting, and Ctrl-C stops an answer."""
    from minigpt4.common.cli import ArgumentError
    from minigpt4.conversation import ImageError

    def start():
        conv, img_list = chat.new_conversation(), []
        for image in images:
            chat.upload_img(image, conv, img_list)
        return conv, img_list

    try:
        conv, img_list = start()
    except ImageError as err:
        raise ArgumentError(f"--image: {err}") from None
    interactive = sys.stdin.isatty() if interactive is None else interactive
    if interactive:
        out.write(f"{len(images)} image(s) loaded. Ask away (/reset to start over, /quit or Ctrl-D to leave; "
                  "Ctrl-C stops an answer).\n")
    for line in questions:
        question = line.strip()
        if not question:
            continue
        if question == "/quit":
            break
        if question == "/reset":
            conv, img_list = start()
            out.write("(conversation reset)\n")
            continue
        before = [list(message) for message in conv.messages]
        chat.ask(question, conv)
        out.write("Assistant: ")
        shown = ""
        answer = chat.stream_answer(conv, img_list, **generation)
        try:
            for reply in answer:
                # The cleaned reply can shrink (a "#" that became the stop sign): print only growth.
                if reply.startswith(shown):
                    out.write(reply[len(shown) :])
                    shown = reply
                out.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            # At a terminal, Ctrl-C stops this answer (the engine stops writing it) and forgets the
            # question with it; Ctrl-C at the prompt, or Ctrl-D, leaves.
            answer.close()
            conv.messages[:] = before
            out.write(" [stopped: the question is forgotten; ask again]\n")
            out.flush()
            continue
        out.write("\n")
        out.flush()


# ---- batch captioning ------------------------------------------------------------------------
def list_images(folder: Path, flag: str = "--caption-dir") -> list[str]:
    """The images in ``folder`` and its subfolders (hidden ones left out), sorted, each as its POSIX
    path relative to ``folder`` (``sub/a.jpg``): how captions and stage-2 descriptions name them."""
    from minigpt4.common.cli import existing_folder

    existing_folder(flag, folder)
    found = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(name.as_posix() for name in found if not any(part.startswith(".") for part in name.parts))


def done_images(out_path: Path) -> set[str]:
    """Names already captioned in ``out_path``. A last line without its newline is a whole line
    (one written by hand or by another program: it gets its newline) or a half-written one (a
    killed run: it is dropped, and its image captioned again)."""
    if not out_path.exists():
        return set()
    raw = out_path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        last = raw[raw.rfind(b"\n") + 1 :]
        try:
            whole = isinstance(json.loads(last), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            whole = False
        if whole:
            raw += b"\n"
            with open(out_path, "ab") as out:
                out.write(b"\n")
        else:
            raw = raw[: len(raw) - len(last)]
            out_path.write_bytes(raw)
            logger.warning("%s: dropped a half-written last line", out_path)
    done = set()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            done.add(json.loads(line)["image"])
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s:%d: not a caption line, ignored", out_path, number)
    return done


def caption_folder(chat, folder: Path, out_path: Path, prompt: str = DEFAULT_CAPTION_PROMPT, batch_size: int = 8, **generation: Any) -> int:
    """Caption every image of ``folder`` (subfolders included) not yet in ``out_path``; returns how
    many were written. Each line names its image by its path in ``folder`` (``sub/a.jpg``)."""
    from tqdm import tqdm

    from minigpt4.conversation import ImageError, open_image

    if batch_size < 1:
        from minigpt4.common.cli import ArgumentError

        raise ArgumentError(f"--batch-size: must be at least 1, got {batch_size}")
    done = done_images(out_path)
    found = list_images(folder)
    todo = [name for name in found if name not in done]
    logger.info("%d images in %s, %d already captioned, %d to go", len(found), folder, len(found) - len(todo), len(todo))
    written = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="captioning", unit="img") as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            names, images = [], []
            for name in batch:
                try:
                    images.append(open_image(folder / name))
                    names.append(name)
                except ImageError as err:
                    logger.warning("skipped: %s", err)
            captions = chat.answer_batch(images, prompt, **generation) if images else []
            for name, caption in zip(names, captions):
                out.write(json.dumps({"image": name, "caption": caption}, ensure_ascii=False) + "\n")
            out.flush()
            written += len(names)
            bar.update(len(batch))
    return written


# ---- command line ----------------------------------------------------------------------------
def generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (default: the config's generation section)")
    group.add_argument("--num-beams", type=int)
    group.add_argument("--temperature", type=float, help="sampling temperature (implies --sample); 0: greedy, as in the demo")
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--max-length", type=int, help="context + new tokens kept (older context is dropped)")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--greedy", action="store_true", help="greedy decoding")
    choice.add_argument("--sample", action="store_true", help="top-p sampling, as the original demo")


def generation_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``generate`` settings the flags set; what they leave out comes from the config."""
    if args.temperature is not None and (args.temperature < 0 or (args.temperature == 0 and args.sample)):
        from minigpt4.common.cli import ArgumentError

        raise ArgumentError(f"--temperature: {args.temperature:g} is not a sampling temperature (0 is greedy; above 0 samples)")
    greedy = args.greedy or args.temperature == 0
    temperature = None if args.temperature == 0 else args.temperature
    settings = dict(num_beams=args.num_beams, temperature=temperature, max_new_tokens=args.max_new_tokens, max_length=args.max_length)
    settings = {k: v for k, v in settings.items() if v is not None}
    if greedy:
        settings["do_sample"] = False
    elif args.sample or args.temperature is not None:
        settings["do_sample"] = True
    return settings


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from minigpt4.common.cli import add_gpu_id

    parser = argparse.ArgumentParser(prog="python -m minigpt4.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", default=str(DEFAULT_CFG), help="evaluation config, e.g. eval_configs/minigpt4_eval.yaml (default: the nano model)")
    add_gpu_id(parser)
    parser.add_argument("--options", nargs="+", default=[], help="override config settings, key=value (e.g. model.ckpt=...)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--image", nargs="+", type=Path, help="image(s) to chat about, in order")
    mode.add_argument("--caption-dir", type=Path, help="caption every image in this folder and its subfolders")
    parser.add_argument("--out", type=Path, help="captions file (JSON lines), appended to and resumed")
    parser.add_argument("--prompt", help=f"question asked of every image when captioning (default: {DEFAULT_CAPTION_PROMPT!r})")
    parser.add_argument("--batch-size", type=int, help="images per generate call when captioning (default: 8)")
    parser.add_argument("--no-kv-cache", action="store_true", help="re-encode the whole conversation every turn, as the original")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="static: our decode loop, its step one CUDA graph on a GPU (the KV cache is the loop's own)")
    generation_args(parser)
    args = parser.parse_args(argv)
    if args.caption_dir is not None and args.out is None:
        parser.error("--caption-dir needs --out captions.jsonl")
    if args.caption_dir is None:
        given = [flag for flag, value in (("--out", args.out), ("--prompt", args.prompt), ("--batch-size", args.batch_size)) if value is not None]
        if given:
            parser.error(f"{', '.join(given)}: for --caption-dir only (a chat with --image prints to the terminal)")
    args.prompt = DEFAULT_CAPTION_PROMPT if args.prompt is None else args.prompt
    args.batch_size = 8 if args.batch_size is None else args.batch_size
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every file and number the flags name, checked before the model loads (seconds, not minutes)."""
    from minigpt4.common.cli import ArgumentError, existing_file, existing_folder, writable_file
    from minigpt4.conversation import ImageError, open_image

    existing_file("--cfg-path", args.cfg_path)
    for path in args.image or []:
        try:
            open_image(existing_file("--image", path), name=str(path))
        except ImageError as err:
            raise ArgumentError(f"--image: {err}") from None
    if args.caption_dir is not None:
        existing_folder("--caption-dir", args.caption_dir)
        writable_file("--out", args.out)
    for flag in ("batch_size", "num_beams", "max_new_tokens", "max_length"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')}: must be at least 1, got {value}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    check_args(args)
    generation = generation_from_args(args)  # its flags are checked before the model loads too
    chat = load_chat(args.cfg_path, args.options, args.gpu_id, reuse_kv_cache=not args.no_kv_cache, decode=args.decode)
    try:
        if args.caption_dir is not None:
            written = caption_folder(chat, args.caption_dir, args.out, args.prompt, args.batch_size, **generation)
            logger.info("wrote %d caption%s to %s", written, "" if written == 1 else "s", args.out)
        else:
            chat_loop(chat, args.image, sys.stdin, **generation)
    except KeyboardInterrupt:
        # Every finished batch is already flushed: the next run resumes after it.
        logger.warning("interrupted%s", f"; run the same command again to resume {args.out}" if args.caption_dir else "")
        raise SystemExit(130) from None


if __name__ == "__main__":
    from minigpt4.common.cli import run_main

    run_main(main)
