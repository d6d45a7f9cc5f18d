"""Fast decoding of a conversation or a caller's batch: prefill, then a one-token step as one CUDA graph.

gpt-fast's ``generate.py`` on a transformers LLM. :func:`prefill` runs the prompt once, eagerly,
into a static KV cache sized to the prompt + ``max_new_tokens`` rounded up to a power of two (so
every prompt in a bucket reuses one compiled graph, and a conversation meets few buckets). :func:`decode_one_token` is the whole step on
the device: embed the last token, the LLM forward on it, the LM head, argmax or sampling, and the
stop check (EOS, and the stop text in any spelling: transformers' ``StopStringCriteria``, tensor
operations alone). It reads and writes only fixed buffers and takes no decision on the host, so
``torch.compile(mode="reduce-overhead")`` captures it as one CUDA graph. The host loop replays it ``steps_per_sync``
times, then copies the new tokens and the "done" flag to pinned memory (``non_blocking``) and
reads them once: the GPU is never waited on between those steps. On the CPU the same code runs
eagerly. The cache outlives the answer, with a record of what it holds: the next answer whose
context starts with the same embeddings (the next turn of the conversation) prefills only the rest,
and with ``compile`` that prefill, padded to a power of two, is captured as a graph too
(:func:`prefill_padded`): a follow-up's tens of positions cost a replay, not hundreds of launches.

What transformers offers and what it does not:
- ``StaticCache`` (fixed key/value tensors with static addresses, the filled length as a device
  tensor from which the model derives positions): used as is.
- Attention over the filled part only: not available with a static cache. Its mask always spans
  the whole cache (``get_mask_sizes`` returns ``max_cache_len``), the unfilled part masked out;
  a shape that changes every step would defeat graph capture. Bucketing keeps the waste small:
  at 7B a 1024-position cache reads 0.5 GB of keys/values a step next to 13 GB of weights.
- Stopping, sampling and streaming in ``generate`` decide on the host every step (stopping
  criteria return Python booleans, the streamer receives each token): that is what this file
  replaces, in its own code. Sampling draws exponential noise per token from the caller's seeded
  generator outside the graph (a graph cannot take a ``torch.Generator``), into a ring of
  ``steps_per_sync`` rows the step reads: the draws are the same whatever ``steps_per_sync``.
  The filters are ``generate``'s, in its order: temperature, top-k (the LLM's generation config's,
  else transformers' default of 50, which ``generate`` applies whenever it samples, and the
  original's demo sampled with), then top-p. The draw is the exponential race (argmax of
  probs / Exp(1)), a sample from the same distribution as ``generate``'s multinomial but not the
  same numbers.

One conversation (:func:`stream_decode`), or B contexts decoded side by side (:func:`decode_rows`:
``Chat.answer_batch``'s, e.g. captions). Every state tensor has a row per context; a row that
stopped stops counting while the others go on, and the loop ends when every row has stopped.
Contexts of several lengths come left-padded, with their mask: the padding is masked out of every
step's attention (the mask is fixed for the answer: only the padding is masked, and it stays where
it is) and each row's positions count from its own first one, as ``generate`` does.
The in-process engine built with ``decode="static"`` (``HFEngine``, ``Chat``, ``load_chat``,
``serve --decode static``) runs a request that runs alone, and one caller's batch
(``answer_batch``), with this loop. Each number of rows is a compiled graph of its own.
"""
from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import GenerationConfig, StaticCache

from minigpt4.conversation.stopping import NO_TOKEN, StopCriteria

SMALLEST_CACHE = 64
# Compiled variants of the step: one per cache size, times greedy or sampled, with or without a
# stop check. Dynamo's default of 8 would be reached in one long conversation (and with
# fullgraph=True that is an error, not a slow-down).
RECOMPILE_LIMIT = 64
# The prefill of a turn's new positions, padded to a power of two, is captured too (a follow-up's
# question is tens of positions, whose prefill a GPU spends launching kernels, not computing).
SMALLEST_PREFILL, LARGEST_PREFILL = 16, 512


def cache_length(positions: int, smallest: int = SMALLEST_CACHE) -> int:
    """``positions`` rounded up to a power of two, at least ``smallest``: a conversation meets few
    cache sizes, so few compilations (each costs seconds on a GPU) and few captured graphs; the
    price is attention over at most twice the filled positions."""
    length = smallest
    while length < positions:
        length *= 2
    return length


def generate_top_k(generation_config: GenerationConfig | None) -> int:
    """The top-k ``generate`` samples with: the generation config's, else transformers' default
    (50: ``generate`` fills in every setting a config leaves unset). 0: no top-k filter."""
    if generation_config is not None and generation_config.top_k is not None:
        return int(generation_config.top_k)
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)  # transformers 5's own table
    return int(defaults()["top_k"]) if defaults is not None else 50


def pick(logits: torch.Tensor, noise: torch.Tensor | None, temperature: torch.Tensor, top_p: torch.Tensor,
         top_k: torch.Tensor | int = 0) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: argmax when ``noise`` is None, else a sample after
    temperature, top-k (``top_k`` > 0) and top-p, as ``generate`` filters. ``top_k`` may be a
    device tensor: one captured graph then serves every value."""
    if noise is None:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    sorted_scores, order = scores.sort(-1)
    # transformers' TopKLogitsWarper: keep the scores at least the k-th largest (ties kept). In the
    # ascending sort that one is at V - k; k = 0 (no filter) reads index 0, the smallest: nothing is below it.
    vocab = scores.shape[-1]
    top_k = torch.as_tensor(top_k, device=scores.device)
    kth = sorted_scores.gather(-1, ((vocab - top_k.clamp(max=vocab)) % vocab).view(1, 1).expand(scores.shape[0], 1))
    below_k = sorted_scores < kth
    sorted_scores = sorted_scores.masked_fill(below_k, -float("inf"))
    # transformers' TopPLogitsWarper, on what top-k kept: drop the least likely tokens whose total stays <= 1 - top_p.
    drop = below_k | (sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p)
    drop[..., -1] = False
    scores = scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))
    return (scores.softmax(-1) / noise).argmax(-1)


def record(token: torch.Tensor, tokens: torch.Tensor, written: torch.Tensor, count: torch.Tensor,
           done: torch.Tensor, window: torch.Tensor, stop: StopCriteria | None) -> None:
    """Append ``token`` (B,) to the rows of ``tokens`` (B, length); a row's ``count`` stops growing
    after its first stop, which sets its ``done``.

    ``window``: (B, stop.window) each row's last tokens, what the stop check reads.
    """
    tokens.index_copy_(1, written, token.unsqueeze(1))
    written.add_(1)
    count.add_((~done).long())
    if stop is not None:
        window.copy_(torch.cat([window[:, 1:], token.unsqueeze(1)], dim=1))
        done.logical_or_(stop(window))


def prefill(llm, cache: StaticCache, inputs_embeds: torch.Tensor, mask: torch.Tensor | None = None,
            positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits of the last prompt position; the prompt's keys and values go into ``cache``.
    Rows left-padded to one length: ``mask`` (B, cache size) zero on each row's padding, and
    ``positions`` (B, N) each row's own positions (None: no padding)."""
    return llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
               logits_to_keep=1).logits[:, -1]


def prefill_padded(llm, cache: StaticCache, padded: torch.Tensor, last: torch.Tensor, pad: torch.Tensor,
                   mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`prefill` of ``padded`` (B, P, H), whose last ``pad`` positions are padding after the
    real ones (``last``: (1,), the index of the last real one): one fixed shape per ``P``, so it can
    be captured as a graph. The padding's keys and values land after the real ones and the cache's
    length is cut back past them: the next position overwrites them, and nothing attends to them."""
    logits = llm(inputs_embeds=padded, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                 logits_to_keep=last).logits[:, -1]
    for layer in cache.layers:
        layer.cumulative_length.sub_(pad)
    return logits


def prefill_length(positions: int) -> int | None:
    """The captured prefill's size for ``positions`` new positions: a power of two from
    ``SMALLEST_PREFILL``, or None past ``LARGEST_PREFILL`` (a long first prompt runs eagerly: its
    arithmetic, not the launches, is what it costs)."""
    length = cache_length(positions, SMALLEST_PREFILL)
    return length if length <= LARGEST_PREFILL else None


def decode_one_token(llm, cache: StaticCache, tokens, written, count, done, window, stop, noise, temperature, top_p,
                     mask=None, lengths=None, top_k: torch.Tensor | int = 0) -> None:
    """One step, all on the device and in place: what one CUDA graph replays. Left-padded rows:
    ``mask`` (B, cache size) zero on the padding, ``lengths`` (B,) each row's own context length."""
    last = tokens.index_select(1, written - 1)  # (B, 1)
    positions = None if lengths is None else (lengths + written - 1).unsqueeze(1)
    logits = llm(inputs_embeds=llm.get_input_embeddings()(last), attention_mask=mask, position_ids=positions, cache=cache,
                 use_cache=True).logits[:, -1]
    draws = None if noise is None else noise.index_select(0, written % noise.shape[0])[0]
    record(pick(logits, draws, temperature, top_p, top_k), tokens, written, count, done, window, stop)


_compiled: dict[str, Callable] = {}


def compiled_step() -> Callable:
    if "step" not in _compiled:
        # dynamic=False: each cache bucket gets its own graph instead of one with symbolic shapes.
        _compiled["step"] = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled["step"]


def compiled_prefill() -> Callable:
    if "prefill" not in _compiled:
        # One graph per (cache size, padded length).
        _compiled["prefill"] = torch.compile(prefill_padded, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return _compiled["prefill"]


def run_prefill(llm, b: _Buffers, new: torch.Tensor, compile: bool, mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits after prefilling ``new`` (B, N, H) into ``b.cache`` after what it keeps: captured
    and padded when ``compile`` and the padded positions fit (the cache must already exist: a graph
    cannot allocate it), else eagerly. Rows left-padded to N (``lengths``: each row's own, ``mask``
    as :func:`decode_one_token` takes it) start from an empty cache, each at its own position 0."""
    positions = new.shape[1]

    def row_positions(n: int) -> torch.Tensor | None:
        if lengths is None:
            return None  # the model counts from the cache's length
        return (torch.arange(n, device=new.device) - (positions - lengths)[:, None]).clamp(min=0)

    padded_length = prefill_length(positions) if compile else None
    filled = int(b.cache.get_seq_length()) if b.cache.layers[0].is_initialized else None
    if padded_length is None or filled is None or filled + padded_length > b.length:
        return prefill(llm, b.cache, new, mask, row_positions(positions))
    padded = torch.zeros(new.shape[0], padded_length, new.shape[2], dtype=new.dtype, device=new.device)
    padded[:, :positions] = new
    last = torch.tensor([positions - 1], device=new.device)
    pad = torch.tensor(padded_length - positions, device=new.device)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        torch.compiler.cudagraph_mark_step_begin()
        # The graph's output is overwritten by its next replay.
        return compiled_prefill()(llm, b.cache, padded, last, pad, mask, row_positions(padded_length)).clone()


class _Buffers:
    """The fixed tensors of one cache size and number of rows: their addresses are what a captured
    graph holds. ``written`` is shared (the rows step together); ``count`` and ``done`` are per row."""

    def __init__(self, llm, length: int, rows: int, device: torch.device):
        self.length, self.rows = length, rows
        self.cache = StaticCache(config=llm.config, max_cache_len=length)
        self.tokens = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.written = torch.zeros(1, dtype=torch.long, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.temperature, self.top_p = (torch.ones((), device=device) for _ in range(2))
        self.top_k = torch.zeros((), dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self.host_tokens = torch.zeros(rows, length, dtype=torch.long, pin_memory=pin)
        self.host_state = torch.zeros(2, rows, dtype=torch.long, pin_memory=pin)
        self.noise: torch.Tensor | None = None
        self.window: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # left-padded rows: (rows, length), False on the padding
        self.lengths: torch.Tensor | None = None  # left-padded rows: each row's own context length
        # The (positions, hidden) input embeddings whose keys and values the cache holds, in order:
        # the last answer's context and the reply tokens fed back. None: nothing reusable (always,
        # for several rows: a batch of fresh contexts has no next turn).
        self.held: torch.Tensor | None = None
        self.reused = 0  # positions the last answer took from the cache instead of prefilling them
        self.answers = 0  # answers begun on these buffers: only the latest may say what the cache holds
        for t in (self.tokens, self.written, self.count, self.done, self.temperature, self.top_p, self.top_k):
            torch._dynamo.mark_static_address(t)

    def keep(self, inputs_embeds: torch.Tensor) -> int:
        """How many leading positions of ``inputs_embeds`` (1, L, H) the cache already holds (at
        most L - 1: the last one is prefilled for its logits); the cache is cut back to them."""
        positions = min(0 if self.held is None else len(self.held), inputs_embeds.shape[1] - 1)
        keep = 0
        if positions > 0:
            differ = (self.held[:positions] != inputs_embeds[0, :positions]).any(-1).nonzero()
            keep = int(differ[0]) if len(differ) else positions
        if keep == 0:
            self.cache.reset()
        else:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(keep)
        self.held, self.reused = None, keep  # held: None until this answer is done
        return keep

    def take_prefix(self, other: _Buffers, device: torch.device) -> None:
        """``other``'s held positions (a cache of another size), copied into this cache."""
        if other.held is None or not other.cache.layers[0].is_initialized:
            return
        keep = min(len(other.held), self.length - 1)
        first = other.cache.layers[0]
        self.cache.early_initialization(first.batch_size, first.num_heads, first.k_head_dim, first.keys.dtype, device)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys[:, :, :keep].copy_(theirs.keys[:, :, :keep])
            mine.values[:, :, :keep].copy_(theirs.values[:, :, :keep])
            mine.cumulative_length.fill_(keep)
        self.held = other.held[:keep]

    def static(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` in the buffer ``name``, reallocated (a new graph) only when its shape changes."""
        current = getattr(self, name)
        if current is None or current.shape != value.shape:
            current = value.clone()
            torch._dynamo.mark_static_address(current)
            setattr(self, name, current)
        else:
            current.copy_(value)
        return current


# One set of buffers per LLM, kept while the LLM lives: the next answer in the same bucket replays
# the graphs already captured; another bucket, or another number of rows, replaces them (a
# conversation's turns and a batch of captions take turns at the cost of a new capture).
_buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget(llm, after: int = 0) -> None:
    """Let the next call reuse at most the first ``after`` positions the cache holds (0: a cold
    start, its whole context prefilled)."""
    buffers = _buffers.get(llm)
    if buffers is not None and buffers.held is not None:
        buffers.held = buffers.held[:after] if after > 0 else None


def on_device(stop: StopCriteria, device: torch.device) -> None:
    """``stop``'s tables on ``device``, at addresses a captured graph may keep (no copy per replay)."""
    stop.to(device)
    tables = [stop.eos] + ([stop.strings.embedding_vec, stop.strings.target_lens] if stop.strings is not None else [])
    for t in tables:
        torch._dynamo.mark_static_address(t)


def buffers_for(llm, length: int, rows: int, device: torch.device) -> _Buffers:
    held = _buffers.get(llm)
    if held is None or held.length != length or held.rows != rows or held.tokens.device != device:
        old = _buffers.pop(llm, None)
        held = _buffers[llm] = _Buffers(llm, length, rows, device)
        if old is not None and old.tokens.device == device and old.rows == rows == 1:
            held.take_prefix(old, device)  # the conversation goes on in a cache of another size
    return held


def stream_decode(llm, inputs_embeds: torch.Tensor, max_new_tokens: int, *args: Any, **kwargs: Any) -> Iterator[list[int]]:
    """The new token ids after ``inputs_embeds`` (1, positions, hidden), batch 1, up to and including
    the first stop, in chunks as they reach the host: the prefill's token alone, then up to
    ``steps_per_sync`` at a time. Together they are what ``llm.generate(inputs_embeds=...,
    stopping_criteria=..., eos_token_id=...)`` returns for that row (the same ids when greedy).
    The other arguments are :func:`stream_decode_rows`'s.

    The cache is kept after the answer with what it holds (the context and the reply's tokens fed
    back): a next call whose context starts with the same embeddings prefills only the rest, also
    when it needs a cache of another size (the held positions are copied over).
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds: expected (1, positions, hidden) for batch 1, got {tuple(inputs_embeds.shape)}")
    rows = stream_decode_rows(llm, inputs_embeds, max_new_tokens, *args, **kwargs)
    try:
        for chunks in rows:
            if chunks[0]:
                yield chunks[0]
    finally:
        rows.close()  # the loop records what the cache holds, however far it was read


def left_padded_lengths(attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor | None:
    """Each row's own context length (B,) from a left-padding ``attention_mask``; None when there
    is no padding (no mask, or every position real). A mask of another kind is refused by name."""
    if attention_mask is None:
        return None
    rows, positions = inputs_embeds.shape[:2]
    if tuple(attention_mask.shape) != (rows, positions):
        raise ValueError(f"attention_mask: expected ({rows}, {positions}) for inputs_embeds {tuple(inputs_embeds.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    real = attention_mask.to(device=inputs_embeds.device, dtype=torch.long)
    lengths = real.sum(1)
    # Left padding: each row is zeros, then ones to the end (at least one).
    expected = torch.arange(positions, device=real.device) >= (positions - lengths)[:, None]
    if not torch.equal(real.bool(), expected) or bool((lengths == 0).any()):
        raise ValueError("attention_mask: expected left padding (each row zeros, then at least one 1 to the end)")
    return None if bool((lengths == positions).all()) else lengths


@torch.no_grad()
def stream_decode_rows(
    llm,
    inputs_embeds: torch.Tensor,
    max_new_tokens: int,
    stop: StopCriteria | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    steps_per_sync: int = 8,
    compile: bool = False,
    suppress_first: Sequence[int] = (),
    cache_positions: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[list[list[int]]]:
    """B contexts, ``inputs_embeds`` (B, positions, hidden), decoded side by side: at
    each host read (after the prefill's token, then every ``steps_per_sync`` steps), every row's new
    tokens (empty for a row that had stopped). Each row's tokens are what ``generate`` writes for
    that row alone, up to and including its own first stop (the same ids when greedy).

    ``stop``: the template's stop text and EOS ids (``Chat.stop``); None: only ``max_new_tokens`` ends it.
    ``do_sample``: temperature, then top-k (None: :func:`generate_top_k` of the LLM's generation
    config, as ``generate``; 0: none), then top-p, then a draw from ``generator`` (on the
    embeddings' device; None: the global RNG), each row's noise in turn. ``steps_per_sync``: steps between host
    reads; up to ``steps_per_sync - 1`` steps past the last stop are computed and dropped.
    ``compile``: the step as a CUDA graph (``torch.compile(mode="reduce-overhead")``; the first call
    per cache size and number of rows compiles). ``suppress_first``: token ids the first new token
    may not be (``generate``'s ``min_length=1`` keeps the EOS from it). ``cache_positions``: the
    least size of the static cache (e.g. the chat's ``max_length``: one cache, and one captured
    graph, for every turn of a conversation that fits). Run it in the model's autocast context, as
    ``generate`` is (``model.maybe_autocast``). Only a single row's cache is kept for a next call
    (:func:`stream_decode`); a batch's rows are fresh contexts, each its own conversation.

    Contexts of several lengths come left-padded to one, with ``attention_mask`` (B, positions): 0
    on each row's padding, then 1 (what ``engines.left_pad`` gives and ``generate`` takes). The
    padding is masked out of every step's attention and each row counts its positions from its own
    first one, so a row writes what it writes alone.
    """
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] < 1:
        raise ValueError(f"inputs_embeds: expected (rows, positions, hidden), got {tuple(inputs_embeds.shape)}")
    if max_new_tokens < 1 or steps_per_sync < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}, steps_per_sync {steps_per_sync}: both must be at least 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature {temperature}, top_p {top_p}: sampling needs temperature > 0 and 0 < top_p <= 1")
    if top_k is None:
        top_k = generate_top_k(llm.generation_config) if do_sample else 0
    if top_k < 0:
        raise ValueError(f"top_k {top_k}: must be 0 (no top-k filter) or more")
    device, rows = inputs_embeds.device, inputs_embeds.shape[0]
    lengths = left_padded_lengths(attention_mask, inputs_embeds)
    b = buffers_for(llm, cache_length(max(inputs_embeds.shape[1] + max_new_tokens, cache_positions)), rows, device)
    keep = b.keep(inputs_embeds)
    b.answers += 1
    mine = b.answers
    mask = None
    if lengths is not None:
        # Fixed for the whole answer: the padding stays where it is, every later position is real.
        mask = torch.ones(rows, b.length, dtype=torch.bool, device=device)
        mask[:, : attention_mask.shape[1]] = attention_mask.bool()
        mask, lengths = b.static("mask", mask), b.static("lengths", lengths)
    for t in (b.written, b.count, b.done):
        t.zero_()
    width = stop.window if stop is not None else 1
    window = b.static("window", torch.full((rows, width), NO_TOKEN, dtype=torch.long, device=device))
    if stop is not None:
        on_device(stop, device)
    noise = None
    if do_sample:
        b.temperature.fill_(temperature)
        b.top_p.fill_(top_p)
        b.top_k.fill_(top_k)
        vocab = llm.get_output_embeddings().weight.shape[0]
        noise = b.static("noise", torch.empty(steps_per_sync, rows, vocab, device=device))
    step = compiled_step() if compile else decode_one_token
    state = (b.tokens, b.written, b.count, b.done, window, stop)

    def draw(index: int) -> None:
        # One (rows, vocab) draw per step, in order: the same draws whatever steps_per_sync.
        if noise is not None:
            noise[index % steps_per_sync].exponential_(generator=generator)

    def read(written: int, emitted: list[int]) -> tuple[list[list[int]], bool]:
        start = min(emitted)
        b.host_tokens[:, start:written].copy_(b.tokens[:, start:written], non_blocking=True)
        b.host_state[0].copy_(b.count, non_blocking=True)
        b.host_state[1].copy_(b.done, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        counts, done = b.host_state.tolist()
        return [b.host_tokens[row, emitted[row] : counts[row]].tolist() for row in range(rows)], all(done)

    draw(0)
    logits = run_prefill(llm, b, inputs_embeds[:, keep:], compile, mask, lengths)
    if suppress_first:
        logits[:, list(suppress_first)] = -float("inf")
    record(pick(logits, None if noise is None else noise[0], b.temperature, b.top_p, b.top_k), *state)
    written, emitted = 1, [0] * rows
    try:
        chunks, done = read(1, emitted)
        emitted = [len(chunk) for chunk in chunks]
        yield chunks
        while not done and written < max_new_tokens:
            steps = min(steps_per_sync, max_new_tokens - written)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if compile else nullcontext():
                for i in range(steps):
                    draw(written + i)
                    if compile:
                        torch.compiler.cudagraph_mark_step_begin()  # nothing of the last replay is kept
                    step(llm, b.cache, *state, noise, b.temperature, b.top_p, mask, lengths, b.top_k)
            written += steps
            chunks, done = read(written, emitted)
            emitted = [sent + len(chunk) for sent, chunk in zip(emitted, chunks)]
            yield chunks
    except GeneratorExit:  # the caller stopped reading: what the cache holds is still known
        pass
    # (Any other error leaves b.held None: nothing is reused from a cache in an unknown state.)
    # The cache holds the context and every token fed back (all but the last written); of those,
    # the reply's (up to its stop) are what a next turn can start with.
    # Only while no later answer has used these buffers (a reader left open, closed after another
    # call ran, must not describe the other call's cache as its own).
    if rows == 1 and b.answers == mine and _buffers.get(llm) is b:
        fed = min(written - 1, emitted[0])
        b.held = torch.cat([inputs_embeds[0], llm.get_input_embeddings()(b.tokens[0, :fed]).to(inputs_embeds.dtype)])


def decode(llm, inputs_embeds: torch.Tensor, max_new_tokens: int, *args: Any,
           on_tokens: Callable[[list[int]], None] | None = None, **kwargs: Any) -> list[int]:
    """The new token ids of :func:`stream_decode` (same arguments), up to and including the first
    stop; ``on_tokens`` receives each chunk as it reaches the host."""
    ids: list[int] = []
    for chunk in stream_decode(llm, inputs_embeds, max_new_tokens, *args, **kwargs):
        ids += chunk
        if on_tokens is not None:
            on_tokens(chunk)
    return ids


def decode_rows(llm, inputs_embeds: torch.Tensor, max_new_tokens: int, *args: Any, **kwargs: Any) -> list[list[int]]:
    """Each row's new token ids from :func:`stream_decode_rows` (same arguments), up to and
    including its first stop."""
    ids: list[list[int]] = [[] for _ in range(inputs_embeds.shape[0])]
    for chunks in stream_decode_rows(llm, inputs_embeds, max_new_tokens, *args, **kwargs):
        for row, chunk in zip(ids, chunks):
            row += chunk
    return ids
