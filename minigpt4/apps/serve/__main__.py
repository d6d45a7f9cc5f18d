"""Serve MiniGPT-4 over an OpenAI-compatible API (``/v1/chat/completions``, ``/v1/models``, ``/health``).

    python -m minigpt4.apps.serve                                 # the nano model, http://127.0.0.1:8000
    python -m minigpt4.apps.serve --cfg-path eval_configs/minigpt4_eval.yaml --api-key KEY
    python -m minigpt4.apps.serve --engine vllm --engine-url http://127.0.0.1:8001   # the LLM on a vLLM server
    python -m minigpt4.apps.serve --cfg-path eval_configs/minigpt4_eval.yaml --decode static   # lone requests: one CUDA graph a step

Images come inline as ``data:`` URLs; ``--allow-remote-images`` also fetches http(s) URLs from
public addresses. SIGTERM (or Ctrl-C) stops accepting requests, finishes those in flight, then exits.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Sequence

from minigpt4.chat import DEFAULT_CFG
from minigpt4.conversation.engines import DECODES, ENGINES

logger = logging.getLogger("minigpt4.serve")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from minigpt4.common.cli import add_gpu_id, port_number

    # As the user typed it: the minigpt4-serve script, or python -m (whose argv[0] is this file).
    prog = "python -m minigpt4.apps.serve" if sys.argv[0].endswith("__main__.py") else None
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", default=str(DEFAULT_CFG), help="evaluation config (default: the nano model)")
    parser.add_argument("--options", nargs="+", default=[], help="override config settings, key=value")
    add_gpu_id(parser, "GPU for the model (the hf engine) or the vision side (vllm)")
    parser.add_argument("--engine", choices=ENGINES, default="hf", help="hf: transformers in this process; vllm: the LLM on a vLLM server")
    parser.add_argument("--engine-url", help="the vLLM server, e.g. http://127.0.0.1:8001 (started with --enable-prompt-embeds)")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="the hf engine's way of writing a request that runs alone: transformers generate, or our "
                             "static-cache loop (its step one CUDA graph on a GPU); concurrent requests batched together use generate")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--model-name", help="the model id clients name (default: minigpt4-<model_type>, e.g. minigpt4-nano)")
    security = parser.add_argument_group("security and limits")
    security.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: MINIGPT4_API_KEY, else none)")
    security.add_argument("--max-queue", type=int, default=64, help="requests in the server at once; one more gets 429 (default: 64)")
    security.add_argument("--max-batch", type=int, default=32,
                          help="requests generated together (the hf engine); 1 answers one at a time (default: 32)")
    security.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for (default: 1024)")
    security.add_argument("--max-images", type=int, default=8, help="images per request (default: 8)")
    security.add_argument("--max-body-mb", type=float, default=20.0, help="request body size; larger gets 413 (default: 20)")
    security.add_argument("--max-image-mp", type=float, default=50.0,
                          help="largest image, in megapixels (decoded: 3 bytes a pixel, per image of every request in progress; default: 50)")
    security.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (public addresses only, no redirects)")
    security.add_argument("--remote-image-mb", type=float, default=10.0, help="largest remote image (default: 10)")
    security.add_argument("--remote-image-timeout", type=float, default=10.0, help="seconds to fetch a remote image (default: 10)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before the model loads."""
    import os

    from minigpt4.common.cli import ArgumentError, existing_file, free_port_for

    existing_file("--cfg-path", args.cfg_path)
    free_port_for(args.host, args.port)  # before the model loads, not after "serving ... on"
    if args.engine == "vllm" and not args.engine_url:
        raise ArgumentError("--engine-url: the vllm engine needs the vLLM server's URL, e.g. http://127.0.0.1:8001")
    if args.engine_url and not args.engine_url.startswith(("http://", "https://")):
        raise ArgumentError(f"--engine-url: expected an http(s) URL, got '{args.engine_url}'")
    if args.decode != "generate" and args.engine != "hf":
        raise ArgumentError(f"--decode {args.decode}: the hf engine's; the {args.engine} engine decodes on its server")
    for flag in ("max_queue", "max_batch", "max_tokens", "max_images", "max_body_mb", "max_image_mp", "remote_image_mb", "remote_image_timeout"):
        if getattr(args, flag) <= 0:
            raise ArgumentError(f"--{flag.replace('_', '-')}: must be positive, got {getattr(args, flag)}")
    args.api_key = args.api_key or os.environ.get("MINIGPT4_API_KEY") or None
    if args.host not in LOOPBACK and args.api_key is None:
        logger.warning("listening on %s without --api-key: anyone who can reach it can use the model", args.host)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from minigpt4.apps.serve.app import ServeSettings, create_app
    from minigpt4.apps.serve.images import ImageLimits
    from minigpt4.chat import load_chat

    check_args(args)
    # Requests share no KV cache: a cache per conversation would keep each in a batch of its own.
    chat = load_chat(args.cfg_path, args.options, args.gpu_id, reuse_kv_cache=False, engine=args.engine, engine_url=args.engine_url,
                     decode=args.decode)
    if hasattr(chat.engine, "max_batch"):
        chat.engine.max_batch = args.max_batch
    settings = ServeSettings(
        model_name=args.model_name or f"minigpt4-{chat.model_type}",
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_images=args.max_images,
        max_tokens=args.max_tokens,
        images=ImageLimits(
            max_pixels=int(args.max_image_mp * 1e6), allow_remote=args.allow_remote_images,
            max_remote_bytes=int(args.remote_image_mb * 2**20), remote_timeout_s=args.remote_image_timeout,
        ),
    )
    app = create_app(chat, settings)
    logger.info("serving %s (%s engine) on http://%s:%d/v1", settings.model_name, chat.engine.name, args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False))
    # uvicorn finishes the requests in flight on SIGTERM, then raises the signal again to end the
    # process the default way (status -15); the process has done what was asked: exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    logger.info("stopped")


def main(argv: Sequence[str] | None = None) -> None:
    from minigpt4.common.cli import run_main

    def run() -> None:
        args = parse_args(argv)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        serve(args)

    run_main(run)


if __name__ == "__main__":
    main()
