"""Chat with MiniGPT-4 at 7B: time to first token over two turns, decode speed, memory, captioning.

    python benchmarks/bench_chat.py                       # fp16, 8-bit, 4-bit; reference and default
    python benchmarks/bench_chat.py --compile             # also fp16 with a static cache, decode compiled
    python benchmarks/bench_chat.py --tiny                # tiny shapes on the CPU: a smoke test
    python benchmarks/bench_chat.py --quant none --decode static  # also our static-cache decode loop

Shapes: EVA-ViT-g, the BLIP-2 Q-Former (32 queries) and LLaMA-7B with random weights, created on
the device (``common.build_model``); nothing is downloaded. The 8-bit and 4-bit LLMs go through the
real loading path (``load_llm`` with ``low_resource``/``load_in_4bit``: ``from_pretrained`` with a
BitsAndBytesConfig) from the random fp16 LLM, saved once to a temporary folder. As in the original,
the 8-bit model runs its ViT on the CPU. The prompt is the Vicuna V0 chat (``###`` stop sign).

Modes:
- ``reference``: executes like the original: every turn prefills the whole conversation
  (``Chat(reuse_kv_cache=False)``), a dynamic cache, eager attention (``attn_implementation: eager``).
- ``default``: ours: the KV cache is kept between turns; after a reply, the reply is prefilled as
  the next prompt will tokenize it (up to the user's role), so the next turn prefills only its
  question; SDPA attention.
- ``compile`` (``--compile``, fp16 only): ``default`` with ``cache_implementation="static"``: one
  fixed-size cache, whose decoding step transformers compiles (CUDA graphs); its first turn pays
  the compilation (reported as ``warmup_s``).

What is timed (the device synchronized before the clock starts; a token counts when it reaches the
host, which a streamer records). Every TTFT is measured ``--repeats`` times (20 by default) and
reported as its median with its spread (``min_s``, ``p25_s``, ``median_s``, ``p75_s``, ``max_s``,
``iters``); the ratios between modes are ratios of medians.
- TTFT turn 1: ``Chat.answer`` on a conversation holding an uploaded image (already encoded: the
  upload is ``encode_image_s``) and the question, from the call to the first new token.
- turn 1 then writes ``--decode-tokens`` tokens. A logits processor makes the random model write
  words of the vocabulary, so the reply has exactly that length (no stop sign, no EOS; checked).
  Decode tokens/s: the tokens after the first over the time from the first to the last.
- TTFT turn 2: a second question after that long turn 1, from the call to its first token; every
  repeat starts from the state right after turn 1 (its KV cache cloned). ``turn2_prefilled`` is
  how many positions it computed. ``turn1_after_last_token_s`` is what turn 1 did after its last
  token (decode the reply; in ``default``, prefill the reply for the next turn): the work
  ``default`` moved out of turn 2 is there, not hidden.
- memory: the allocator's maximum (``torch.cuda.max_memory_allocated``; None on the CPU, which has
  no such counter), in GiB, over three spans of one mode:
  ``load_peak_gb``: building the model on the device (its weights created there, or for 8-bit and
  4-bit loaded by ``from_pretrained`` from the saved folder) and moving it there; the fp16 folder
  the quantized models load from is saved before this span starts. ``upload_peak_gb``: uploading
  the image (the model resident; the 8-bit model's ViT moves to the CPU here). ``peak_gb``: the
  chat after the upload, the model resident: turn 1's TTFT repeats, its long reply, and turn 2's
  repeats, less the clone of turn 1's cache that the benchmark keeps for the repeats.
  ``peak_including_load_gb``, the figure a user meets and the goals' figure, is the largest of the
  three. Captioning, after the chat, reports its own ``peak_gb``.
- ``--decode static`` (fp16, ``default``): ``minigpt4/conversation/decode.py`` answers turn 1's
  context with ``--decode-tokens`` tokens: a static cache, the one-token step (forward, argmax,
  stop check) compiled into one CUDA graph on a GPU (eager on the CPU), the host reading the
  tokens every ``--steps-per-sync`` steps. Its stop table is Chat's, shifted past the vocabulary:
  the check costs what it costs in a chat, and the random model is never cut short. Decode
  tokens/s and TTFT as above (a token counts when its chunk reaches the host), next to the
  ``generate`` rate of the same model in the same process; the first two calls compile and
  capture (``warmup_s``). Every call of the loop here uses one cache size (see
  ``run_static_decode``).
  Then ``greedy_vs_generate``: the loop's greedy tokens against ``generate``'s on the same context
  over ``--greedy-check-tokens`` (200), whether they are the same and where they first differ.
  With captioning on, ``static_decode.captioning``: the captioning images below in one
  ``answer_batch`` call of a Chat whose engine is the loop (one question: contexts of one length,
  decoded side by side), timed as the default mode's batched call and against it in this process
  (``vs_answer_batch``, the goal at least 2x). Its captions are held to ``--caption-tokens`` by
  the blanked stop check rather than the forced words (the loop takes no logits processor).
  ``static_decode.profile``: one answer of ``--profile-tokens`` tokens (64) by the loop and by
  ``generate`` on the same context under ``torch.profiler`` (``common.profile``): per token the
  wall time and, on a GPU, the kernels' time and their share of it, the CUDA runtime calls (graph
  replays, single launches, copies, waits), and the heaviest kernels and host ops: where a gap to
  the bandwidth limit comes from, measured in the same run as the figure.
- ``--profile-turn2``: every mode's record gets ``turn2_profile``, one more turn 2 (its first
  token, from the same state as the timed ones) under the profiler: where a turn 2's time goes
  (the ``default`` mode's 48 ms turn 2 on the H200 is unexplained).
- captioning (fp16): the same ``--caption-images`` images, ``--caption-tokens`` new tokens each
  (forced as above, every length checked), the image preprocessing and encoding included. The
  ``reference`` mode captions them one at a time as a user of the original does: for each image a
  fresh conversation, ``upload_img``, ``ask``, ``answer`` (no KV reuse, eager attention). The
  ``default`` mode captions them all in one ``Chat.answer_batch`` call (median of
  ``--caption-repeats``), and, for comparison only, one ``answer_batch`` call per image
  (``one_per_call``). The headline ``captioning_batch_speedup`` (top-level ``captioning``) is
  default's batched images/s over reference's one-at-a-time images/s; when either did not run,
  it is None and ``no_ratio`` says why: no other baseline stands in.
- the decode limit: a decoding step reads every LLM weight but the embedding table once; the
  bandwidth is that of a large device-to-device copy in this run (2 x bytes / time).
"""
from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the LLM folders are written here; never reach the hub

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import common
from minigpt4.conversation import CONV_VISION_Vicuna0, Chat
from minigpt4.conversation import decode as decode_module
from minigpt4.conversation.decode import cache_length, decode, forget, stream_decode
from minigpt4.conversation.engines import GenerationResult, HFEngine
from minigpt4.conversation.kv_cache import PrefixCache
from minigpt4.conversation.stopping import NO_TOKEN, StopCriteria
from minigpt4.processors.blip_processors import Blip2ImageEvalProcessor

logger = logging.getLogger("bench_chat")

MODES = ("reference", "default", "compile")
QUANTS = ("none", "8bit", "4bit")
DECODES = ("generate", "static")
QUESTION_1 = "Describe this image in detail."
QUESTION_2 = "What is the man on the left holding, and what colour is the car behind him?"
CAPTION_PROMPT = "Describe this image in detail."
GOALS = {
    "ttft_turn2_vs_reference": 0.3,  # at most, fp16
    "decode_fraction_of_limit": 0.8,  # at least, fp16
    "captioning_batch_speedup": 8.0,  # at least
    "static_captioning_vs_answer_batch": 2.0,  # at least, fp16, the default mode's batch
    "peak_gb_8bit": 11.5,  # at most
    "peak_gb_4bit": 6.5,  # at most
}


# ---- generation that is timed and cannot stop early ---------------------------------------------
class ForcedWords(LogitsProcessor):
    """The random model writes ``ids`` in order (every row of a batch the same)."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, -math.inf)
        out[:, self.ids[input_ids.shape[1] % len(self.ids)]] = 0
        return out


class TokenClock(BaseStreamer):
    """When each new token reaches the host (``generate`` hands every step's tokens to ``put``)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.numel():  # the first put is the prompt's ids: none with inputs_embeds
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def filler_ids(tokenizer, n: int) -> list[int]:
    """``n`` ids of plain words (no stop sign, no special token) for :class:`ForcedWords`."""
    text = " ".join(common.WORDS)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = [i for i in ids if i not in tokenizer.all_special_ids]
    return (ids * (n // len(ids) + 1))[:n]


def timed_answer(chat: Chat, conv, img_list, new_tokens: int, words: list[int], **generation: Any) -> dict[str, Any]:
    """Answer ``conv`` with exactly ``new_tokens`` tokens: TTFT, decode rate, the KV cache reuse."""
    clock = TokenClock()
    common.synchronize(chat.device)
    start = time.perf_counter()
    _, tokens = chat.answer(
        conv, img_list, max_new_tokens=new_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([ForcedWords(words)]), streamer=clock, **generation,
    )
    common.synchronize(chat.device)
    end = time.perf_counter()
    if len(tokens) != new_tokens or len(clock.times) != new_tokens:
        raise RuntimeError(f"the reply has {len(tokens)} tokens, not {new_tokens}: something stopped it early")
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return {
        "ttft_s": clock.times[0] - start,
        "after_last_token_s": end - clock.times[-1],
        "decode_tokens_per_s": (new_tokens - 1) / (clock.times[-1] - clock.times[0]) if steps else None,
        "decode_tokens_per_s_median_step": 1 / statistics.median(steps) if steps else None,
        "reused": conv.kv_cache.reused if conv.kv_cache is not None else 0,
    }


def context_positions(chat: Chat, conv, img_list) -> int:
    draft = conv.copy()
    draft.append_message(draft.roles[1], None)
    return chat.get_context_emb(draft.get_prompt(), img_list).shape[1]


def clone_cache(state: PrefixCache | None) -> PrefixCache | None:
    """An independent copy of a conversation's KV cache, to replay the same turn several times."""
    if state is None or state.keys is None:
        return None
    clone = PrefixCache(copy.deepcopy(state.cache), state.llm)
    clone.keys, clone.images = list(state.keys), list(state.images)
    return clone


def cache_bytes(state: PrefixCache | None) -> int:
    if state is None:
        return 0
    return sum(t.numel() * t.element_size() for layer in state.cache.layers for t in (layer.keys, layer.values) if t is not None)


def random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    return [
        Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy())
        for _ in range(n)
    ]


# ---- models ---------------------------------------------------------------------------------------
def quant_unavailable(quant: str, device: torch.device) -> str | None:
    """Why ``quant`` cannot run here, or None."""
    if quant == "none":
        return None
    if device.type != "cuda":
        return "8-bit and 4-bit LLMs need a CUDA GPU (bitsandbytes)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a CUDA library it cannot load
        return f"bitsandbytes cannot be imported: {type(err).__name__}: {err}"
    return None


def save_fp16_llm(folder: Path, device: torch.device, tiny: bool) -> float:
    """The random fp16 LLM as safetensors shards next to a tokenizer: what 8-bit/4-bit load from."""
    from minigpt4.models.llm import load_llm

    start = time.perf_counter()
    common.write_llm_folder(folder, tiny=tiny)
    torch.manual_seed(0)
    with torch.device(device):
        llm = load_llm({"llama_model": str(folder), "torch_dtype": "float16"}, load_weights=False)
    llm.save_pretrained(folder, max_shard_size="4GB")
    del llm
    common.free_memory()
    return time.perf_counter() - start


def build(args, mode: str, quant: str, llm_folder: Path, device: torch.device):
    """The model of ``mode``: fp16 with random weights made on the device, or 8-bit/4-bit loaded
    from ``llm_folder`` (the saved fp16 LLM), as a user's config loads it."""
    attn = "eager" if mode == "reference" else "sdpa"
    if quant == "none":
        torch.manual_seed(0)
        model = common.build_model(common.model_section(llm_folder, tiny=args.tiny, attn_implementation=attn), device)
    else:
        from minigpt4.models import MiniGPT4

        section = common.model_section(
            llm_folder, tiny=args.tiny, attn_implementation=attn,
            low_resource=quant == "8bit", load_in_4bit=quant == "4bit", device_8bit=device.index or 0,
        )
        torch.manual_seed(0)
        with torch.device(device):
            # No ViT, Q-Former or MiniGPT-4 checkpoint is named: only the LLM folder is read.
            model = MiniGPT4.from_config(section, load_weights=True)
    actual = model.llama_model.config._attn_implementation
    if actual != attn:
        logger.warning("%s: asked for %s attention, the LLM runs %s", mode, attn, actual)
    return model.eval()


def decode_bytes(llm) -> int:
    """Bytes a decoding step reads: every LLM weight once, but only one row of the embedding table."""
    embedding = llm.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in llm.parameters())
    return weights - embedding.numel() * embedding.element_size()


def copy_bandwidth(device: torch.device, gib: int = 4) -> float | None:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    if device.type != "cuda":
        return None
    source = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    timing = common.time_calls(lambda: target.copy_(source), device, warmup=2, iters=10)
    del source, target
    common.free_memory()
    return 2 * gib * 2**30 / timing["median_s"]


# ---- one mode --------------------------------------------------------------------------------------
def run_chat(args, chat: Chat, image: Image.Image, words: list[int], generation: dict[str, Any]) -> dict[str, Any]:
    device = chat.device
    conv, img_list = chat.new_conversation(), []
    common.reset_peak_memory(device)
    start = time.perf_counter()
    chat.upload_img(image, conv, img_list)
    common.synchronize(device)
    encode_s = time.perf_counter() - start
    upload_peak = common.peak_memory_gb(device)
    chat.ask(QUESTION_1, conv)
    common.reset_peak_memory(device)

    # Warm-up: kernels, cuBLAS, and for `compile` the compiled decoding step. It answers in the
    # conversation itself, whose answer is then forgotten: the cache object turn 1 decodes into
    # has met the CUDA graphs already.
    start = time.perf_counter()
    timed_answer(chat, conv, img_list, min(16, args.decode_tokens), words, **generation)
    conv.messages.pop()
    warmup_s = time.perf_counter() - start

    turn1_positions = context_positions(chat, conv, img_list)
    if turn1_positions + args.decode_tokens + 64 > args.max_length:  # turn 2 adds its question: < 64 positions
        raise ValueError(f"--max-length {args.max_length}: too short for turn 1's {turn1_positions} positions, --decode-tokens and turn 2")
    ttft1 = [timed_answer(chat, conv.copy(), img_list, 1, words, **generation)["ttft_s"] for _ in range(args.repeats)]
    turn1 = timed_answer(chat, conv, img_list, args.decode_tokens, words, **generation)
    peak_turn1 = common.peak_memory_gb(device)

    # Every repeat of turn 2 starts from the state right after turn 1; the snapshot that keeps it
    # is the benchmark's, so its bytes are taken off the peak.
    snapshot = clone_cache(conv.kv_cache)
    conv.kv_cache = None
    common.reset_peak_memory(device)
    ttft2, reused2 = [], set()
    for _ in range(args.repeats):
        draft = conv.copy()
        draft.kv_cache = clone_cache(snapshot)
        chat.ask(QUESTION_2, draft)
        turn2_positions = context_positions(chat, draft, img_list)
        result = timed_answer(chat, draft, img_list, 1, words, **generation)
        ttft2.append(result["ttft_s"])
        reused2.add(result["reused"])
        del draft
    peak_turn2 = common.peak_memory_gb(device)
    if peak_turn2 is not None:
        peak_turn2 -= cache_bytes(snapshot) / 2**30
    turn2_profile = None
    if args.profile_turn2:  # one more turn 2 (its first token), under the profiler
        draft = conv.copy()
        draft.kv_cache = clone_cache(snapshot)
        chat.ask(QUESTION_2, draft)
        turn2_profile = profiled(lambda: timed_answer(chat, draft, img_list, 1, words, **generation), device, lambda _: 1)
        del draft
    return {
        "image_positions": img_list[0].shape[1],
        "encode_image_s": encode_s,
        "warmup_s": warmup_s,
        "ttft_turn1_s": common.spread(ttft1),
        "ttft_turn2_s": common.spread(ttft2),
        "turn1_context_positions": turn1_positions,
        "turn1_tokens": args.decode_tokens,
        "turn2_context_positions": turn2_positions,
        "turn2_prefilled_positions": turn2_positions - min(reused2),
        "turn1_after_last_token_s": turn1["after_last_token_s"],
        "decode_tokens": args.decode_tokens,
        "decode_tokens_per_s": turn1["decode_tokens_per_s"],
        "decode_tokens_per_s_median_step": turn1["decode_tokens_per_s_median_step"],
        "upload_peak_gb": upload_peak,
        "peak_gb": common.max_known(peak_turn1, peak_turn2),
        "turn2_profile": turn2_profile,
    }


def profiled(run: Callable[[], Any], device: torch.device, units: Callable[[Any], int]) -> dict[str, Any]:
    """:func:`common.profile`, or the error that stopped it: a profile explains the figures, it must not cost them."""
    try:
        return common.profile(run, device, units)
    except Exception as err:
        logger.exception("the profile failed")
        return {"error": f"{type(err).__name__}: {err}"}


def profile_line(name: str, record: dict[str, Any]) -> str:
    if "error" in record:
        return f"profile, {name}: failed: {record['error']}"
    return (
        f"profile, {name} ({record['units']} token{'s' if record['units'] != 1 else ''}): {record['wall_ms_per_unit']:.2f} ms/token, kernels "
        f"{common.fmt(record['device_busy_ms_per_unit'], '.2f')} ms/token ({common.fmt(record['device_busy_share'], '.0%')} busy)"
    )


def blanked(stop: StopCriteria) -> StopCriteria:
    """The template's stop check, every entry blanked so that it never fires: the random model
    writes exactly the tokens asked for, and each step still does the check's work."""
    stops = copy.deepcopy(stop)
    stops.eos = torch.full_like(stops.eos, NO_TOKEN - 1)
    if stops.strings is not None:
        stops.strings.embedding_vec = torch.full_like(stops.strings.embedding_vec, -1)
    return stops


def run_static_decode(args, chat: Chat, image: Image.Image) -> dict[str, Any]:
    """Turn 1 answered by ``decode.decode``: TTFT and decode tokens/s, over ``--repeats`` runs."""
    conv, img_list = chat.new_conversation(), []
    chat.upload_img(image, conv, img_list)
    chat.ask(QUESTION_1, conv)
    conv.append_message(conv.roles[1], None)
    embeds = chat.get_context_emb(conv.get_prompt(), img_list)
    model, llm, n = chat.model, chat.model.llama_model, args.decode_tokens
    stops = blanked(chat.stop)
    compiled = chat.device.type == "cuda"
    # The loop as every call below runs it: the blanked stop check, one host read per steps_per_sync.
    loop = functools.partial(decode, stop=stops, steps_per_sync=args.steps_per_sync, compile=compiled)
    streamed = functools.partial(stream_decode, stop=stops, steps_per_sync=args.steps_per_sync, compile=compiled)

    # One cache size for every call below (turn 1, turn 2, the greedy check, the profile: the size
    # holds the largest of them): turn 2
    # finds turn 1's positions in the cache it decodes with, and every call replays the graphs
    # captured once for that size. (A chat's engine sizes its cache by each turn's context and
    # max_new_tokens, a power of two, and meets a larger size as the conversation grows: each new
    # size is one more compilation, which a benchmark bounded in time cannot afford at 7B. The
    # size holds turn 2 at least: turn 1 attends over more unfilled positions than its own
    # bucket would have, so its rate is, if anything, understated.)
    positions = cache_length(embeds.shape[1] + max(2 * n + 64, args.greedy_check_tokens, args.profile_tokens))

    def decode_with(context: torch.Tensor, tokens: int) -> list[int]:
        with model.maybe_autocast(model.autocast_dtype):
            return loop(llm, context, tokens, cache_positions=positions)

    def once() -> dict[str, float]:
        arrivals: list[float] = []
        forget(llm)  # turn 1 prefills its whole context every time
        common.synchronize(chat.device)
        start = time.perf_counter()
        with model.maybe_autocast(model.autocast_dtype):
            ids = loop(llm, embeds, n, cache_positions=positions, on_tokens=lambda chunk: arrivals.append(time.perf_counter()))
        if len(ids) != n:
            raise RuntimeError(f"the static decode wrote {len(ids)} tokens, not {n}: something stopped it early")
        # The first chunk is the prefill's token alone; the rest arrive steps_per_sync at a time.
        return {"ttft_s": arrivals[0] - start, "decode_tokens_per_s": (n - 1) / (arrivals[-1] - arrivals[0])}

    start = time.perf_counter()
    # The first call compiles the step and the padded prefill for this cache size; a captured
    # graph is recorded on a later call than the one that compiled it (cudagraph trees warm up
    # first), so the second call records the prefill's: the timed calls replay both.
    once()
    once()
    warmup_s = time.perf_counter() - start
    runs = [once() for _ in range(args.repeats)]

    # Turn 2: turn 1's context, its reply's tokens and the second question. The loop's cache still
    # holds turn 1 (context and reply), so only the question is prefilled. Every repeat first cuts
    # what the cache holds back to turn 1 (forget(after=...)), where a chat would find it.
    reply = decode_with(embeds, n)
    turn1_held = embeds.shape[1] + n - 1  # the last token is never fed back
    question = model.llama_tokenizer(f"###Human: {QUESTION_2}###Assistant:", add_special_tokens=False).input_ids
    with torch.no_grad():
        turn2 = torch.cat([embeds, llm.get_input_embeddings()(torch.tensor(reply + question, device=embeds.device)).unsqueeze(0)], dim=1)

    def turn2_once() -> float:
        forget(llm, after=turn1_held)
        common.synchronize(chat.device)
        with model.maybe_autocast(model.autocast_dtype):
            start = time.perf_counter()
            chunks = streamed(llm, turn2, n, cache_positions=positions)
            next(chunks)
            ttft = time.perf_counter() - start
            chunks.close()
        return ttft

    turn2_once()  # compiles turn 2's padded prefill (another padded length than turn 1's)
    turn2_once()  # records its graph
    ttft2 = [turn2_once() for _ in range(args.repeats)]
    prefilled = turn2.shape[1] - decode_module._buffers[llm].reused
    forget(llm)
    check = greedy_vs_generate(args, chat, embeds, functools.partial(loop, cache_positions=positions))
    profiles = None
    if args.profile_tokens:
        k = args.profile_tokens

        def static_answer() -> list[int]:
            forget(llm)  # a whole answer: the prefill, then k - 1 steps
            with model.maybe_autocast(model.autocast_dtype):
                return loop(llm, embeds, k, cache_positions=positions)

        def generate_answer() -> torch.Tensor:
            with torch.no_grad(), model.maybe_autocast(model.autocast_dtype):
                return llm.generate(inputs_embeds=embeds, max_new_tokens=k, min_new_tokens=k, do_sample=False)[0]

        generate_answer()  # warm-up (the loop's graphs are already captured for this cache size)
        profiles = {"static": profiled(static_answer, chat.device, len), "generate": profiled(generate_answer, chat.device, len)}
    return {
        "steps_per_sync": args.steps_per_sync,
        "compiled": compiled,
        "context_positions": embeds.shape[1],
        "decode_tokens": n,
        "warmup_s": warmup_s,
        "ttft_s": common.spread([r["ttft_s"] for r in runs]),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "ttft_turn2_s": common.spread(ttft2),
        "turn2_context_positions": turn2.shape[1],
        "turn2_prefilled_positions": prefilled,
        "greedy_vs_generate": check,
        "profile": profiles,
    }


def greedy_vs_generate(args, chat: Chat, embeds: torch.Tensor, loop: Callable[..., list[int]]) -> dict[str, Any]:
    """The static loop's (``loop``: :func:`decode` with its stop check and settings bound) greedy tokens against ``generate``'s (dynamic cache, as ``Chat.answer``
    runs it) on the same context, model and autocast, over ``--greedy-check-tokens`` tokens.

    ``generate`` keeps the model's own EOS and may stop before the end; the comparison then covers
    its tokens (``compared``). ``first_difference`` is the first index where the two differ.
    """
    n = args.greedy_check_tokens
    model, llm = chat.model, chat.model.llama_model
    with torch.no_grad(), model.maybe_autocast(model.autocast_dtype):
        ours = loop(llm, embeds, n)
        theirs = llm.generate(inputs_embeds=embeds, max_new_tokens=n, do_sample=False)[0].tolist()
    compared = min(len(ours), len(theirs))
    first = next((i for i in range(compared) if ours[i] != theirs[i]), None)
    return {
        "tokens": n,
        "compared": compared,
        "generate_stopped_at_eos": len(theirs) < n,
        "equal": first is None and compared == len(theirs),
        "first_difference": first,
    }


def run_captioning(args, chat: Chat, mode: str, words: list[int]) -> dict[str, Any]:
    """Caption the same ``--caption-images`` images as a user of ``mode`` would: images/s.

    ``reference``: one at a time, as the original's demo (a fresh conversation, upload, ask,
    answer). ``default``: all in one ``answer_batch`` call, and one ``answer_batch`` call per image.
    """
    images = random_images(args.caption_images, 224 if not args.tiny else 32, seed=1)
    n, device = len(images), chat.device
    generation = dict(max_new_tokens=args.caption_tokens, do_sample=False, logits_processor=LogitsProcessorList([ForcedWords(words)]))

    def checked(length: int) -> None:
        if length != args.caption_tokens:
            raise RuntimeError(f"a caption has {length} tokens, not {args.caption_tokens}: something stopped it early")

    def one_conversation(image: Image.Image) -> None:
        conv, img_list = chat.new_conversation(), []
        chat.upload_img(image, conv, img_list)
        chat.ask(CAPTION_PROMPT, conv)
        checked(len(chat.answer(conv, img_list, **generation)[1]))

    def answer_batch(batch: list[Image.Image]) -> None:
        chat.answer_batch(batch, CAPTION_PROMPT, **generation)

    def warm_up_batch(batch: list[Image.Image]) -> None:
        # Untimed: a caller's streamer takes the place of the engine's own, which a user's call runs.
        clock = TokenClock()
        chat.answer_batch(batch, CAPTION_PROMPT, streamer=clock, **generation)
        checked(len(clock.times))

    def each_image(caption: Callable[[Image.Image], None]) -> dict[str, float]:
        times = [common.time_calls(lambda: caption(image), device, 0, 1)["median_s"] for image in images]
        return {**common.spread(times), "total_s": sum(times)}

    common.reset_peak_memory(device)
    record: dict[str, Any] = {"images": n, "new_tokens": args.caption_tokens}
    if mode == "reference":
        one_conversation(images[0])  # warm-up at this length
        record["one_at_a_time_s"] = each_image(one_conversation)
        record["images_per_s"] = {"one_at_a_time": n / record["one_at_a_time_s"]["total_s"]}
    else:
        warm_up_batch(images)
        record["batched_s"] = common.time_calls(lambda: answer_batch(images), device, 0, args.caption_repeats)
        warm_up_batch(images[:1])
        record["one_per_call_s"] = each_image(lambda image: answer_batch([image]))
        rates = {"batched": n / record["batched_s"]["median_s"], "one_per_call": n / record["one_per_call_s"]["total_s"]}
        record["images_per_s"] = rates
        record["batched_vs_own_one_per_call"] = rates["batched"] / rates["one_per_call"]
    record["peak_gb"] = common.peak_memory_gb(device)
    return record


def run_static_captioning(args, chat: Chat, batched_images_per_s: float | None) -> dict[str, Any]:
    """The same images as :func:`run_captioning`, captioned in one ``Chat.answer_batch`` call by a
    Chat whose engine is the static decode loop (``HFEngine(decode="static")``): one question, so
    the contexts are of one length and decode side by side, the step one CUDA graph on a GPU.

    Timed as the default mode's batched call is (images encoded, contexts built, the captions
    decoded to text), against that call in this process (``vs_answer_batch``). Each caption is
    ``--caption-tokens`` long: the default mode forces its words with a logits processor, which
    the loop does not take; here the stop check is blanked instead (it still runs every step).
    """
    images = random_images(args.caption_images, 224 if not args.tiny else 32, seed=1)
    engine = HFEngine(chat.model, blanked(chat.stop), decode="static", steps_per_sync=args.steps_per_sync)
    static = Chat(chat.model, chat.vis_processor, chat.device, CONV_VISION_Vicuna0, engine=engine)
    answered = engine.generate_many

    def checked(requests) -> list[GenerationResult]:
        results = answered(requests)
        if any(len(r.token_ids) != args.caption_tokens for r in results):
            raise RuntimeError(f"a caption's length is not {args.caption_tokens}: {[len(r.token_ids) for r in results]}")
        return results

    engine.generate_many = checked

    def caption() -> None:
        static.answer_batch(images, CAPTION_PROMPT, max_new_tokens=args.caption_tokens, do_sample=False)

    try:
        start = time.perf_counter()
        caption()  # the first batch prefills eagerly (no cache yet) and compiles the step
        caption()  # the second captures the padded prefill
        warmup_s = time.perf_counter() - start
        timed = common.time_calls(caption, chat.device, 0, args.caption_repeats)
    finally:
        engine.close()
    rate = len(images) / timed["median_s"]
    return {
        "images": len(images), "new_tokens": args.caption_tokens, "warmup_s": warmup_s, "batched_s": timed,
        "images_per_s": rate, "vs_answer_batch": common.ratio(rate, batched_images_per_s),
    }


def run_mode(args, mode: str, quant: str, llm_folder: Path, weights_folder, device: torch.device, bandwidth: float | None,
             progress: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """One mode's record; ``progress`` receives it as it grows (the chat, then the static loop, then
    captioning), so that a run cut short keeps the parts already measured."""
    # The fp16 folder the quantized models load from is written first: its own peak and time are
    # the benchmark's, not the load's.
    folder = llm_folder if quant == "none" else weights_folder()
    logger.info("%s, %s: building the model", quant, mode)
    common.reset_peak_memory(device)
    start = time.perf_counter()
    model = build(args, mode, quant, folder, device)
    common.synchronize(device)
    record: dict[str, Any] = {
        "attn_implementation": model.llama_model.config._attn_implementation,
        "reuse_kv_cache": mode != "reference",
        "cache": "static" if mode == "compile" else "dynamic",
        "vit_device": "cpu" if model.low_resource else str(device),
        "load_s": time.perf_counter() - start,
        "load_peak_gb": common.peak_memory_gb(device),
    }
    processor = Blip2ImageEvalProcessor(32 if args.tiny else 224)
    chat = Chat(model, processor, device, CONV_VISION_Vicuna0, reuse_kv_cache=mode != "reference")
    words = filler_ids(model.llama_tokenizer, max(args.decode_tokens, args.caption_tokens))
    # max_length bounds the context Chat keeps, and sizes compile's static cache: every decoding
    # step attends over all of it, so it is no longer than this chat needs.
    generation = {"max_length": args.max_length}
    if mode == "compile":
        generation["cache_implementation"] = "static"
    image = random_images(1, 224 if not args.tiny else 32)[0]
    record.update(run_chat(args, chat, image, words, generation))
    record["peak_including_load_gb"] = common.max_known(record["load_peak_gb"], record["upload_peak_gb"], record["peak_gb"])
    llm_bytes = decode_bytes(model.llama_model)
    limit = bandwidth / llm_bytes if bandwidth else None
    record.update(
        decode_bytes_per_token=llm_bytes,
        decode_limit_tokens_per_s=limit,
        decode_fraction_of_limit=record["decode_tokens_per_s"] / limit if limit else None,
    )
    progress(record)
    if args.decode == "static" and quant == "none" and mode == "default":
        logger.info("%s, %s: the static decode loop", quant, mode)
        static = run_static_decode(args, chat, image)
        static.update(
            decode_fraction_of_limit=static["decode_tokens_per_s"] / limit if limit else None,
            vs_generate=common.ratio(static["decode_tokens_per_s"], record["decode_tokens_per_s"]),
        )
        record["static_decode"] = static
        progress(record)
    if quant == "none" and mode in ("reference", "default") and args.caption_images:
        logger.info("%s, %s: captioning %d images", quant, mode, args.caption_images)
        record["captioning"] = run_captioning(args, chat, mode, words)
        progress(record)
        if "static_decode" in record:
            logger.info("%s, %s: captioning %d images with the static decode loop", quant, mode, args.caption_images)
            batched = record["captioning"]["images_per_s"]["batched"]
            record["static_decode"]["captioning"] = run_static_captioning(args, chat, batched)
    logger.info(
        "%s, %s: TTFT %.1f / %.1f ms (medians of %d), %.1f tokens/s, peak with the load %s GB", quant, mode,
        record["ttft_turn1_s"]["median_s"] * 1e3, record["ttft_turn2_s"]["median_s"] * 1e3, args.repeats,
        record["decode_tokens_per_s"], common.fmt(record["peak_including_load_gb"], ".2f"),
    )
    return record


# ---- the record ------------------------------------------------------------------------------------
def measured(m: dict[str, Any] | None) -> bool:
    return m is not None and "error" not in m and "skipped" not in m


def ratios_of(modes: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    base = modes.get("reference")
    if not measured(base):
        return {}
    out = {}
    for name, m in modes.items():
        if name == "reference" or not measured(m):
            continue
        out[name] = {
            "ttft_turn1": common.ratio(m["ttft_turn1_s"]["median_s"], base["ttft_turn1_s"]["median_s"]),
            "ttft_turn2": common.ratio(m["ttft_turn2_s"]["median_s"], base["ttft_turn2_s"]["median_s"]),
            "decode_tokens_per_s": common.ratio(m["decode_tokens_per_s"], base["decode_tokens_per_s"]),
            "peak_gb": common.ratio(m["peak_gb"], base["peak_gb"]),
            "peak_including_load_gb": common.ratio(m["peak_including_load_gb"], base["peak_including_load_gb"]),
        }
    return out


def captioning_of(runs: dict[str, dict[str, Any]], caption_images: int) -> dict[str, Any]:
    """fp16 captioning as a user meets it: ``default``'s batched images/s over ``reference``'s one
    image at a time. Without both there is no ratio, and ``no_ratio`` says why: no other baseline
    (such as default's own one call per image) stands in."""
    modes = runs.get("none", {})
    rates = {name: (m or {}).get("captioning", {}).get("images_per_s", {}) for name, m in modes.items()}
    out: dict[str, Any] = {
        "reference_one_at_a_time_images_per_s": rates.get("reference", {}).get("one_at_a_time"),
        "default_batched_images_per_s": rates.get("default", {}).get("batched"),
        "default_one_per_call_images_per_s": rates.get("default", {}).get("one_per_call"),
    }
    out["captioning_batch_speedup"] = common.ratio(out["default_batched_images_per_s"], out["reference_one_at_a_time_images_per_s"])
    if out["captioning_batch_speedup"] is None:
        if not caption_images:
            why = ["--caption-images 0: nothing was captioned"]
        elif "none" not in runs:
            why = ["fp16 (--quant none) did not run: captioning is measured in fp16"]
        else:
            why = []
            for name in ("reference", "default"):
                m = modes.get(name)
                if m is None:
                    why.append(f"the {name} mode did not run (--modes)")
                elif not measured(m):
                    why.append(f"the {name} mode did not finish: {m.get('error') or m.get('skipped')}")
        out["no_ratio"] = "; ".join(why) or "no images/s was measured"
    return out


def static_turn2_ratio(fp16: dict[str, dict[str, Any]]) -> float | None:
    """The static loop's turn-2 TTFT over the reference's, when both ran in this process."""
    static, reference = (fp16.get("default") or {}).get("static_decode"), fp16.get("reference")
    if not static or not measured(reference):
        return None
    return common.ratio(static["ttft_turn2_s"]["median_s"], reference["ttft_turn2_s"]["median_s"])


def goals_of(runs: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]], captioning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    def goal(value: float | None, target: float, at_most: bool) -> dict[str, Any]:
        met = None if value is None else (value <= target if at_most else value >= target)
        return {"value": value, "target": target, "at_most" if at_most else "at_least": True, "met": met}

    fp16 = runs.get("none", {})
    turn2 = [r["ttft_turn2"] for r in ratios.get("none", {}).values() if r.get("ttft_turn2")]
    static_turn2 = static_turn2_ratio(fp16)
    if static_turn2 is not None:
        turn2.append(static_turn2)
    decode = [m.get("decode_fraction_of_limit") for name, m in fp16.items() if name != "reference" and m.get("decode_fraction_of_limit")]
    decode += [m["static_decode"]["decode_fraction_of_limit"] for m in fp16.values() if (m.get("static_decode") or {}).get("decode_fraction_of_limit")]
    return {
        "ttft_turn2_vs_reference_fp16": goal(min(turn2, default=None), GOALS["ttft_turn2_vs_reference"], True),
        "decode_fraction_of_limit_fp16": goal(max(decode, default=None), GOALS["decode_fraction_of_limit"], False),
        "captioning_batch_speedup": goal(captioning["captioning_batch_speedup"], GOALS["captioning_batch_speedup"], False),
        "static_captioning_vs_answer_batch": goal(((fp16.get("default") or {}).get("static_decode") or {}).get("captioning", {}).get("vs_answer_batch"),
                                                  GOALS["static_captioning_vs_answer_batch"], False),
        "peak_gb_8bit_default": goal(runs.get("8bit", {}).get("default", {}).get("peak_including_load_gb"), GOALS["peak_gb_8bit"], True),
        "peak_gb_4bit_default": goal(runs.get("4bit", {}).get("default", {}).get("peak_including_load_gb"), GOALS["peak_gb_4bit"], True),
    }


def table(runs: dict[str, dict[str, Any]], ratios: dict[str, Any], captioning: dict[str, Any], goals: dict[str, Any], repeats: int) -> str:
    lines = [
        f"TTFT: the median of {repeats} turns (min, p25, p75, max in the record); peak GB: the chat's, then with the load",
        f"{'quant':<5} {'mode':<9} {'TTFT1 ms':>9} {'TTFT2 ms':>9} {'prefill2':>8} {'tok/s':>7} {'of limit':>8} {'peak GB':>8} {'w/ load':>8} {'TTFT2 x ref':>11}",
    ]
    for quant, modes in runs.items():
        for name, m in modes.items():
            if not measured(m):
                lines.append(f"{quant:<5} {name:<9} {m.get('error') or m.get('skipped')}")
                continue
            lines.append(
                f"{quant:<5} {name:<9} {m['ttft_turn1_s']['median_s'] * 1e3:>9.1f} {m['ttft_turn2_s']['median_s'] * 1e3:>9.1f} "
                f"{m['turn2_prefilled_positions']:>8} {m['decode_tokens_per_s']:>7.1f} {common.fmt(m['decode_fraction_of_limit'], '.0%'):>8} "
                f"{common.fmt(m['peak_gb'], '.2f'):>8} {common.fmt(m['peak_including_load_gb'], '.2f'):>8} {common.fmt(1.0 if name == 'reference' else ratios.get(quant, {}).get(name, {}).get('ttft_turn2'), '.2f'):>11}"
            )
    for quant, modes in runs.items():
        lines += [profile_line(f"turn 2, {quant} {name}", m["turn2_profile"]) for name, m in modes.items() if measured(m) and m.get("turn2_profile")]
    static = runs.get("none", {}).get("default", {}).get("static_decode")
    if static:
        lines.append(
            f"static decode (fp16, default, {'CUDA graph' if static['compiled'] else 'eager'}, sync every {static['steps_per_sync']}): "
            f"{static['decode_tokens_per_s']:.1f} tokens/s, {common.fmt(static['decode_fraction_of_limit'], '.0%')} of limit, "
            f"{common.fmt(static['vs_generate'], '.2f')}x generate, TTFT {static['ttft_s']['median_s'] * 1e3:.1f} ms"
        )
        lines.append(
            f"static decode, turn 2: TTFT {static['ttft_turn2_s']['median_s'] * 1e3:.1f} ms, {static['turn2_prefilled_positions']} of "
            f"{static['turn2_context_positions']} positions prefilled, {common.fmt(static_turn2_ratio(runs.get('none', {})), '.2f')}x the reference"
        )
        check = static["greedy_vs_generate"]
        lines.append(
            f"static decode, greedy: {'the same' if check['equal'] else 'NOT the same'} tokens as generate over {check['compared']}"
            + ("" if check["first_difference"] is None else f" (first difference at token {check['first_difference']})")
        )
        lines += [profile_line(name, record) for name, record in (static.get("profile") or {}).items()]
        captions = static.get("captioning")
        if captions:
            lines.append(
                f"static decode, captioning {captions['images']} images in one batch: {captions['images_per_s']:.2f} images/s, "
                f"{common.fmt(captions['vs_answer_batch'], '.2f')}x the default mode's answer_batch"
            )
    if "no_ratio" not in captioning:
        lines.append(
            f"captioning images/s: reference one at a time {captioning['reference_one_at_a_time_images_per_s']:.2f}, "
            f"default batched {captioning['default_batched_images_per_s']:.2f} ({captioning['captioning_batch_speedup']:.1f}x; "
            f"default one call per image {common.fmt(captioning['default_one_per_call_images_per_s'], '.2f')})"
        )
    else:
        lines.append(f"captioning: no ratio: {captioning['no_ratio']}")
    met = ", ".join(f"{name} {common.fmt(g['value'], '.2f')} {'ok' if g['met'] else '-' if g['met'] is None else 'MISSED'}" for name, g in goals.items())
    lines.append(f"goals: {met}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny ViT/Q-Former/LLaMA on the CPU (a smoke test; fp16 only)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["reference", "default"])
    parser.add_argument("--compile", action="store_true", help="add the compile mode (fp16): static cache, decoding step compiled")
    parser.add_argument("--quant", nargs="+", choices=QUANTS, default=list(QUANTS), help="LLM precisions (none = fp16)")
    parser.add_argument("--decode", choices=DECODES, default="generate",
                        help="static: also time decode.py's static-cache loop (fp16, default mode) next to generate")
    parser.add_argument("--steps-per-sync", type=int, default=8, help="--decode static: steps between host reads")
    parser.add_argument("--greedy-check-tokens", type=int, default=200,
                        help="--decode static: greedy tokens compared with generate's on the same context")
    parser.add_argument("--profile-tokens", type=int, default=64,
                        help="--decode static: profile an answer of this many tokens by the loop and by generate (0: none)")
    parser.add_argument("--profile-turn2", action="store_true", help="also profile one turn 2 (its first token) in each mode")
    parser.add_argument("--decode-tokens", type=int, default=256, help="turn 1's reply length, the decode measurement")
    parser.add_argument("--repeats", type=int, default=20, help="timed turns of each TTFT (median and spread reported)")
    parser.add_argument("--caption-images", type=int, default=16,
                        help="images captioned one at a time by reference, in one batch by default (0: skip)")
    parser.add_argument("--caption-repeats", type=int, default=3, help="timed repeats of the batched captioning")
    parser.add_argument("--caption-tokens", type=int, default=64, help="new tokens per caption")
    parser.add_argument("--max-length", type=int, default=1024, help="Chat's max_length (context + new tokens); compile's static cache size")
    parser.add_argument("--device", help="default: cuda when there is one (cpu with --tiny)")
    parser.add_argument("--tmp-dir", help="where the fp16 7B weights are saved for 8-bit/4-bit (13.5 GB; default: the system's)")
    parser.add_argument("--out", help=f"results folder (default {common.RESULTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not args.tiny:
        parser.error("the real shapes (a 7B LLM) need a CUDA device; use --tiny on the CPU")
    if args.decode_tokens < 2:
        parser.error("--decode-tokens: at least 2 (the decode rate is measured after the first token)")
    if args.repeats < 1 or args.caption_repeats < 1:
        parser.error("--repeats, --caption-repeats: at least 1")
    if args.steps_per_sync < 1:
        parser.error("--steps-per-sync: at least 1")
    modes = [m for m in MODES if m in args.modes or (m == "compile" and args.compile)]
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny matrices: a second thread only adds waiting

    started = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    work = Path(tempfile.mkdtemp(prefix="bench-chat-", dir=args.tmp_dir))
    saved: dict[str, Any] = {}

    def weights_folder() -> Path:
        if "folder" not in saved:
            logger.info("saving the random fp16 LLM for the 8-bit/4-bit loads")
            saved["folder"] = work / "llm-fp16"
            saved["save_s"] = save_fp16_llm(saved["folder"], device, args.tiny)
        return saved["folder"]

    runs: dict[str, dict[str, Any]] = {}
    settings = {
        "tiny": args.tiny, "modes": modes, "quant": args.quant, "decode_tokens": args.decode_tokens,
        "repeats": args.repeats, "caption_images": args.caption_images, "caption_tokens": args.caption_tokens,
        "caption_repeats": args.caption_repeats,
        "max_length": args.max_length, "decode": args.decode, "steps_per_sync": args.steps_per_sync,
        "greedy_check_tokens": args.greedy_check_tokens, "profile_tokens": args.profile_tokens, "profile_turn2": args.profile_turn2,
        "template": "pretrain_vicuna0", "questions": [QUESTION_1, QUESTION_2],
    }
    name = "chat_tiny" if args.tiny else "chat"

    def record(finished: bool) -> dict[str, Any]:
        ratios = {quant: ratios_of(modes_run) for quant, modes_run in runs.items()}
        captioning = captioning_of(runs, args.caption_images)
        return {
            "benchmark": "chat",
            # False while modes are still to run: a run cut short (a time limit) keeps what it measured.
            "finished": finished,
            "environment": common.environment(device),
            "settings": settings,
            "shapes": {
                "llm": common.LLAMA_TINY if args.tiny else common.LLAMA_7B,
                "vit": common.TINY_VIT if args.tiny else "eva_vit_g (depth 39, width 1408)",
                "qformer": common.TINY_QFORMER if args.tiny else "bert-base (12 layers, 768)",
                "image_size": 32 if args.tiny else 224,
            },
            "copy_bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
            "save_fp16_llm_s": saved.get("save_s"),
            "runs": runs,
            "ratios": ratios,
            "captioning": captioning,
            "goals": goals_of(runs, ratios, captioning),
            "total_s": time.perf_counter() - started,
        }

    try:
        llm_folder = common.write_llm_folder(work / "llm", tiny=args.tiny)
        for quant in args.quant:
            runs[quant] = {}
            reason = quant_unavailable(quant, device)
            for mode in modes:
                if mode == "compile" and quant != "none":
                    continue  # bitsandbytes layers are not compiled
                if reason:
                    runs[quant][mode] = {"skipped": reason}
                    continue
                def progress(partial: dict[str, Any], quant: str = quant, mode: str = mode) -> None:
                    runs[quant][mode] = {**partial, "unfinished": True}
                    common.save_partial(name, lambda: record(finished=False), args.out)

                try:
                    runs[quant][mode] = run_mode(args, mode, quant, llm_folder, weights_folder, device, bandwidth, progress)
                except Exception as err:  # a failed precision must not lose the others' numbers
                    logger.exception("%s, %s failed", quant, mode)
                    # What this mode measured before the error stays, next to the error.
                    kept = {k: v for k, v in runs[quant].get(mode, {}).items() if k != "unfinished"}
                    runs[quant][mode] = {**kept, "error": f"{type(err).__name__}: {err}"}
                common.free_memory()
                common.save_results(name, record(finished=False), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    payload = record(finished=True)
    ratios, captioning, goals = payload["ratios"], payload["captioning"], payload["goals"]
    path = common.save_results(name, payload, args.out)
    print(f"results: {path}")
    print(table(runs, ratios, captioning, goals, args.repeats))


if __name__ == "__main__":
    main()
