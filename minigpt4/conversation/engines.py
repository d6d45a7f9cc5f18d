"""The engines ``Chat`` generates with, and the server shares: one small interface, two engines.

A :class:`GenerationRequest` is one reply to write: the context embeddings (1, L, H) that ``Chat``
built (text segments interleaved with image tokens, ``embed_prompt``), the :class:`Sampling`
settings, extra stop strings and an optional seed. An engine answers with a
:class:`GenerationResult` (the new token ids, token counts, why it stopped) or streams
:class:`StreamChunk` s. Turning tokens into text stays with ``Chat`` (``decode_reply``), so every
engine's reply is cleaned the same way.

- :class:`HFEngine` (``hf``, the default; in-process, CPU or GPU): transformers ``generate`` with
  the stop words ``Chat`` always used. Requests submitted from several threads are batched by one
  worker thread: those that arrive while a batch generates join the next one, grouped by their
  settings, left-padded with an attention mask (as ``Chat.answer_batch``), each row stopped on its
  own and handed back as soon as it is done. Under greedy decoding a row gets the tokens it gets
  alone. A seeded sampling request runs alone, so its seed means what it says.
  With ``decode="static"`` a request that runs alone, and one caller's batch (``Chat.answer_batch``,
  left-padded when its contexts' lengths differ), are written by :mod:`~minigpt4.conversation.decode`
  instead (a static cache, the one-token step as one CUDA graph on a GPU, the host reading the
  tokens every ``steps_per_sync`` steps): the same tokens as ``generate`` under greedy decoding,
  a sample from the same distribution when sampling (temperature, generate's top-k, top-p). The queue's batches of concurrent requests
  (whose size changes with the load: each size would be a compiled graph of its own) still go to
  ``generate``. The loop keeps the last answer's positions in its own cache, so a request whose
  context starts the same way (the next turn of that conversation) prefills only the rest. It
  refuses settings the loop does not have (``EngineRequestError``).
- :class:`VLLMEngine` (``vllm``): the LLM runs on a vLLM server started with
  ``--enable-prompt-embeds``; the context goes to ``/v1/completions`` as ``prompt_embeds``. The
  vision side stays in-process, with ``Chat``.

:class:`ImageBatcher` puts the same kind of queue in front of ``Chat.encode_images``, so the
images of concurrent requests are encoded in one batch.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Literal, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from minigpt4.conversation.decode import generate_top_k, stream_decode_rows
from minigpt4.conversation.stopping import NO_TOKEN, StopCriteria
from minigpt4.models.llm import LORA_MARKER

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
ENGINES = ("hf", "vllm")
DECODES = ("generate", "static")  # how the hf engine writes a request alone, or one caller's batch


# ---- the interface -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy unless ``do_sample``; ``temperature`` and ``top_p`` apply to sampling only."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class GenerationRequest:
    """One reply to write, from the whole context as embeddings."""

    inputs_embeds: torch.Tensor  # (1, L, H)
    sampling: Sampling
    stop: tuple[str, ...] = ()  # besides the template's stop words: the reply ends where it spells one
    seed: int | None = None
    # Further generate() arguments (num_beams, repetition_penalty, a logits processor, the KV cache
    # Chat keeps between turns, ...): the hf engine passes them on, the vllm engine maps the ones
    # vLLM has and refuses the rest.
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs_embeds.shape[1])


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens, the stop word included (Chat.decode_reply cuts it)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass
class StreamChunk:
    token_ids: list[int]  # the tokens new since the previous chunk
    result: GenerationResult | None = None  # on the last chunk only: the whole reply


class EngineUnavailable(RuntimeError):
    """The engine cannot answer right now (its server is down or failing); a later request may succeed."""


class EngineMismatch(EngineUnavailable):
    """The engine's server answers, but runs another LLM than this model's (e.g. without its LoRA)."""


class EngineRequestError(ValueError):
    """A request this engine cannot run as asked (a setting it does not have, a context it refuses)."""


class Engine(ABC):
    """Writes replies from context embeddings; safe to call from several threads at once."""

    name: str = ""
    # Whether a request may carry a KV cache between chat turns (options["cache"]).
    reuses_kv_cache: bool = False

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self.generate_many([request])[0]

    @abstractmethod
    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every request's reply, in order; requests with the same settings may share a batch."""

    @abstractmethod
    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        """The reply's tokens as they come; the last chunk carries the result. Closing early cancels it."""

    def close(self) -> None:
        """Let go of connections; an engine with nothing to release does nothing."""


# ---- a queue whose worker runs batches ------------------------------------------------------------
class _Job:
    """What one submission asks for: ``size`` rows; jobs with equal, non-None keys may share a batch."""

    def __init__(self, size: int, key: Hashable | None):
        self.size, self.key = size, key

    def fail(self, err: BaseException) -> None:
        raise NotImplementedError


class _BatchQueue(ABC):
    """Jobs submitted from any thread, run in batches by one worker thread.

    The worker starts with the first job and ends when the queue is empty, so an idle engine holds
    no thread. A batch is the oldest job plus later ones with the same key, up to ``max_batch``
    rows (a larger job still runs whole); a job whose key is None runs alone. Jobs that arrive
    while a batch runs wait for the next one.
    """

    def __init__(self, max_batch: int, name: str):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self._name = name
        self._jobs: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._worker is None:
                # Not a daemon: a daemon thread still inside torch when the interpreter exits (the
                # caller got its answer a moment before the worker returned) aborts the process
                # ("terminate called without an active exception"). The worker ends by itself as
                # soon as the queue is empty, so waiting for it at exit costs nothing.
                self._worker = threading.Thread(target=self._work, name=self._name, daemon=False)
                self._worker.start()

    def _take(self) -> list[_Job]:
        if not self._jobs:
            return []
        batch = [self._jobs.popleft()]
        if batch[0].key is None:
            return batch
        rows = batch[0].size
        for job in list(self._jobs):
            if job.key == batch[0].key and rows + job.size <= self.max_batch:
                self._jobs.remove(job)
                batch.append(job)
                rows += job.size
        return batch

    def _work(self) -> None:
        while True:
            with self._lock:
                batch = self._take()
                if not batch:
                    self._worker = None
                    return
            try:
                self._run(batch)
            except BaseException as err:  # every submitter gets the error; none waits forever
                for job in batch:
                    job.fail(err)
                if not isinstance(err, Exception):
                    raise

    @abstractmethod
    def _run(self, jobs: list[_Job]) -> None:
        """Run one batch and hand each job its outcome."""


# ---- the hf engine -----------------------------------------------------------------------------
def hf_generate(model, **kwargs: Any) -> torch.Tensor:
    """``model.llama_model.generate`` as Chat always ran it: inference mode, the model's autocast."""
    with torch.inference_mode(), model.maybe_autocast(model.autocast_dtype):
        return model.llama_model.generate(**kwargs)


def left_pad(contexts: Sequence[torch.Tensor], pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest, H) embeddings with each (L, H) context at the right, and the attention mask.

    Left, so every row's next token comes at the same position; the mask hides the padding, and
    transformers derives each row's positions from it, so a row computes what it computes alone.
    """
    longest = max(len(c) for c in contexts)
    embeds = pad.expand(len(contexts), longest, -1).clone()
    mask = torch.zeros(len(contexts), longest, dtype=torch.long, device=pad.device)
    for i, context in enumerate(contexts):
        embeds[i, longest - len(context) :] = context
        mask[i, longest - len(context) :] = 1
    return embeds, mask


class _Row:
    """One request in a batch: the tokens it has so far, and the queue its outcome goes to."""

    def __init__(self, request: GenerationRequest, streaming: bool):
        self.request, self.streaming = request, streaming
        self.ids: list[int] = []
        self.end: int | None = None  # its length, once its own stop fired
        self.finish: FinishReason = "length"
        self.cancelled = False
        self.completed = False
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.streaming:
            self._events.put([token])

    def complete(self, ids: list[int], finish: FinishReason) -> None:
        if not self.completed:
            self.completed = True
            self._events.put(GenerationResult(list(ids), self.request.prompt_tokens, len(ids), finish))

    def fail(self, err: BaseException) -> None:
        if not self.completed:
            self.completed = True
            self._events.put(err)

    def chunks(self) -> Iterator[StreamChunk]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, GenerationResult):
                yield StreamChunk([], event)
                return
            yield StreamChunk(event)

    def result(self) -> GenerationResult:
        for chunk in self.chunks():
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("unreachable: chunks() ends with a result")


class _RowsJob(_Job):
    def __init__(self, rows: list[_Row], key: Hashable | None):
        super().__init__(len(rows), key)
        self.rows = rows

    def fail(self, err: BaseException) -> None:
        for row in self.rows:
            row.fail(err)


def _has_stop_string(tokenizer, ids: list[int], stop: Sequence[str]) -> bool:
    """Whether the text of ``ids`` holds one of a request's own stop strings (checked after each token)."""
    return bool(stop) and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)


class _RowStops(StoppingCriteria):
    """Per row: the template's stop words, the row's own stop strings and length limit.

    Records the length at which each row ended; a row that ended stays ended (transformers pads it).
    """

    def __init__(self, rows: list[_Row], stop: StopCriteria, tokenizer):
        super().__init__()
        self.rows, self.stop, self.tokenizer = rows, stop, tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        stopped = self.stop(input_ids, scores).tolist()
        for row, ids, at_stop in zip(self.rows, input_ids.tolist(), stopped):
            if row.end is None:
                reason = self._reason(row, ids, at_stop)
                if reason is not None:
                    row.end, row.finish = len(ids), reason
        return torch.tensor([row.end is not None for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def _reason(self, row: _Row, ids: list[int], at_stop: bool) -> FinishReason | None:
        if at_stop:
            return "stop"
        if _has_stop_string(self.tokenizer, ids, row.request.stop):
            return "stop"
        if row.cancelled or len(ids) >= row.request.sampling.max_new_tokens:
            return "length"
        return None


class _RowStreamer(BaseStreamer):
    """``generate`` hands ``put`` each step's new token of every row; each goes to its own row.

    With ``early``, a row whose stop fired is complete as soon as its last token is in, while the
    batch's other rows go on.
    """

    def __init__(self, rows: list[_Row], early: bool):
        self.rows, self.early, self.steps = rows, early, 0

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # generate's first call: the prompt's token ids (none: it is embeddings)
            return
        self.steps += 1
        for row, token in zip(self.rows, value.tolist()):
            if row.end is None or self.steps <= row.end:
                row.add(token)
            if self.early and row.end is not None and len(row.ids) >= row.end:
                row.complete(row.ids, row.finish)

    def end(self) -> None:
        pass


def _frozen(value: Any) -> Hashable:
    """``value`` as a hashable key part; TypeError for objects (a logits processor, a cache)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    raise TypeError(type(value).__name__)


def batch_key(request: GenerationRequest) -> Hashable | None:
    """Requests with equal keys can share one ``generate`` call; None: this one runs alone.

    Greedy rows share whatever their temperature; sampled rows share only equal settings; a
    seeded sampling request, beam search and options that are objects run alone.
    """
    sampling, options = request.sampling, request.options
    if (sampling.do_sample and request.seed is not None) or options.get("num_beams", 1) > 1:
        return None
    try:
        frozen = tuple(sorted((k, _frozen(v)) for k, v in options.items()))
    except TypeError:
        return None
    how = ("sample", sampling.temperature, sampling.top_p) if sampling.do_sample else ("greedy",)
    return how + frozen


# generate() options the static loop honours, with the values it can take, given the context's length.
_STATIC_OPTIONS: dict[str, Callable[[Any, int], bool]] = {
    "num_beams": lambda v, _: v == 1,
    "num_return_sequences": lambda v, _: v == 1,
    "repetition_penalty": lambda v, _: v == 1.0,
    "top_k": lambda v, _: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "length_penalty": lambda v, _: True,  # beam search only
    # From context embeddings generate counts min_length over the context and the reply together:
    # up to the context's length it changes nothing.
    "min_length": lambda v, context: v is None or v <= context,
    "min_new_tokens": lambda v, _: v is None or v <= 1,  # 1: the first new token is not an EOS
    "cache_implementation": lambda v, _: v in (None, "static"),
    "use_cache": lambda v, _: v is not False,
}


def static_options(request: GenerationRequest) -> None:
    """Refuse, naming it, a setting the static decode loop does not have."""
    for key, value in request.options.items():
        allowed = _STATIC_OPTIONS.get(key)
        if allowed is None or not allowed(value, request.prompt_tokens):
            raise EngineRequestError(
                f"{key}={value!r}: the static decode loop (decode='static') writes with greedy or "
                f"top-k/top-p sampling alone; use decode='generate' for this setting"
            )


def first_token_suppressed(options: dict[str, Any], generation_config) -> list[int]:
    """The EOS ids ``generate`` keeps from being the first new token (``min_new_tokens=1``)."""
    eos = generation_config.eos_token_id
    if not options.get("min_new_tokens") or eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """The global RNG seeded for one generate call, and given back as it was afterwards."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFEngine(_BatchQueue, Engine):
    """transformers ``generate`` in this process; concurrent requests batched (see the module doc)."""

    name = "hf"
    reuses_kv_cache = True

    def __init__(self, model, stop: StopCriteria, max_batch: int = 32, decode: str = "generate",
                 steps_per_sync: int = 8, compile: bool | None = None):
        super().__init__(max_batch, "minigpt4-hf-engine")
        if decode not in DECODES:
            raise ValueError(f"decode: expected one of {', '.join(DECODES)}, got {decode!r}")
        if steps_per_sync < 1:
            raise ValueError(f"steps_per_sync: must be at least 1, got {steps_per_sync}")
        self.model = model
        self.stop = stop
        self.decode, self.steps_per_sync = decode, steps_per_sync
        # decode static: the step as a CUDA graph where there is one (None: on a GPU).
        self.compile = compile
        # The static loop's cache lives with the loop, one per LLM: no conversation can hold it.
        self.reuses_kv_cache = decode == "generate"
        self._decoder: ThreadPoolExecutor | None = None

    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        rows = [_Row(request, streaming=False) for request in requests]
        groups: dict[Hashable, list[_Row]] = {}
        for row in rows:
            key = batch_key(row.request)
            # Requests that run alone still run together when they share their options object
            # (Chat.answer_batch with a logits processor: one generate call).
            group = key if key is not None else ("alone", id(row.request.options), row.request.seed, row.request.sampling)
            groups.setdefault(group, []).append(row)
        for group in groups.values():
            self._submit(_RowsJob(group, batch_key(group[0].request)))
        return [row.result() for row in rows]

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        row = _Row(request, streaming=True)
        self._submit(_RowsJob([row], batch_key(request)))
        try:
            yield from row.chunks()
        finally:
            if not row.completed:
                logger.info("a reply's reader left after %d of its tokens: its row stops at the next step", len(row.ids))
            row.cancelled = True  # a consumer that leaves early frees its row at the next step

    def _run(self, jobs: list[_Job]) -> None:
        rows = [row for job in jobs for row in job.rows if not row.cancelled]
        if not rows:
            return
        if self.decode == "static":
            for row in rows:  # one rule for every request, whichever way it runs
                static_options(row.request)
            # The loop takes a request alone, or one caller's batch (answer_batch): its size is the
            # caller's, so a few compiled graphs serve it. The queue's batches of concurrent requests
            # change size with the load, and each size would be a graph (and a compilation) of its
            # own: generate runs those.
            if len(rows) == 1 or len(jobs) == 1:
                self._run_static(rows)
                return
        first = rows[0].request
        kwargs = self._generate_kwargs(rows)
        # Beam search cannot stream, and a caller's own streamer takes the only place.
        if first.options.get("num_beams", 1) == 1 and "streamer" not in first.options:
            # Rows of a job that runs alone (it may hold Chat's KV cache, which generate still
            # uses until it returns) are complete only when generate has returned.
            kwargs["streamer"] = _RowStreamer(rows, early=jobs[0].key is not None)
        # Greedy rows ignore their seeds (they may share a batch); a seeded sampling request runs alone.
        with _seeded(first.seed if first.sampling.do_sample else None, first.inputs_embeds.device):
            output = hf_generate(self.model, **kwargs)
        for row, ids in zip(rows, output.tolist()):
            if row.end is not None:
                ids = ids[: row.end]
            elif len(rows) > 1:  # ended by a criterion of the caller's: drop the padding after it
                ids = self.stop.cut(ids)
            finish = row.finish if row.end is not None else ("length" if len(ids) >= row.request.sampling.max_new_tokens else "stop")
            row.complete(ids, finish)

    def _run_static(self, rows: list[_Row]) -> None:
        """A request, or one caller's batch, by the static decode loop, on the engine's one decoding thread.

        PyTorch keeps captured CUDA graphs per thread (its cudagraph trees are thread-local), and the
        queue's worker thread ends whenever the queue empties: a thread of its own that lives as long
        as the engine replays the graphs it captured, answer after answer.
        """
        with self._lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minigpt4-static-decode")
        self._decoder.submit(self._static_rows, rows).result()

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None

    def _static_rows(self, rows: list[_Row]) -> None:
        """Requests by the static decode loop, side by side (left-padded when their lengths differ):
        each row's tokens go to it as each chunk reaches the host. A batch shares its options (``batch_key``)."""
        first, llm = rows[0].request, self.model.llama_model
        sampling, device = first.sampling, first.inputs_embeds.device
        generator = None
        if sampling.do_sample and first.seed is not None:
            generator = torch.Generator(device).manual_seed(first.seed)
        compile = device.type == "cuda" if self.compile is None else self.compile
        tokenizer = self.model.llama_tokenizer
        limits = [row.request.sampling.max_new_tokens for row in rows]
        embeds, mask = self._padded(rows)
        ended: dict[int, FinishReason | None] = {}  # row -> "stop" (its own stop string), None: decided below
        stream = stream_decode_rows(
            llm, embeds, max(limits), self.stop, do_sample=sampling.do_sample, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=first.options.get("top_k"), generator=generator, steps_per_sync=self.steps_per_sync, compile=compile,
            suppress_first=first_token_suppressed(first.options, llm.generation_config), attention_mask=mask,
        )
        with self.model.maybe_autocast(self.model.autocast_dtype):
            try:
                for chunks in stream:
                    for i, (row, chunk) in enumerate(zip(rows, chunks)):
                        for token in chunk if i not in ended else ():
                            row.add(token)
                            # The request's own stop strings, token by token as _RowStops checks them.
                            if _has_stop_string(tokenizer, row.ids, row.request.stop):
                                ended[i] = "stop"
                                break
                            if len(row.ids) >= limits[i]:
                                ended[i] = None
                                break
                        if row.cancelled:  # its consumer left: it takes no more tokens
                            ended.setdefault(i, None)
                        elif not chunk:
                            # A row that writes gets tokens at every read: none means it stopped on
                            # the device (the template's stop, or EOS). Once every row has ended here
                            # the loop ends, also when some ended by their own limits or stop strings.
                            ended.setdefault(i, None)
                    if len(ended) == len(rows):
                        break
            finally:
                stream.close()
        for i, row in enumerate(rows):
            finish = ended.get(i)
            if finish is None:
                # The loop ends a row at its first stop or at max_new_tokens: a stop, if any, is the last token.
                finish = "stop" if row.ids and not row.cancelled and self._ends_at_stop(row.ids) else "length"
            row.complete(row.ids, finish)

    def _ends_at_stop(self, ids: list[int]) -> bool:
        """Whether the template's stop check fires on the last token of ``ids``."""
        tail = ([NO_TOKEN] * self.stop.window + ids)[-self.stop.window :]
        return bool(self.stop(torch.tensor([tail], device=self.stop.eos.device))[0])

    def _generate_kwargs(self, rows: list[_Row]) -> dict[str, Any]:
        first = rows[0].request
        tokenizer = self.model.llama_tokenizer
        kwargs: dict[str, Any] = dict(
            stopping_criteria=StoppingCriteriaList([_RowStops(rows, self.stop, tokenizer)]),
            pad_token_id=tokenizer.pad_token_id,
            max_new_tokens=max(row.request.sampling.max_new_tokens for row in rows),
            do_sample=first.sampling.do_sample,
            **first.options,
        )
        if first.sampling.do_sample:
            kwargs.update(top_p=first.sampling.top_p, temperature=float(first.sampling.temperature))
        kwargs["inputs_embeds"], mask = self._padded(rows)
        if mask is not None:
            kwargs["attention_mask"] = mask
        return kwargs

    def _padded(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows' contexts as one (B, L, H) batch, left-padded with the pad token's embedding,
        and its mask (:func:`left_pad`); one row as it is, mask None."""
        contexts = [row.request.inputs_embeds for row in rows]
        if len(contexts) == 1:
            return contexts[0], None
        embed = self.model.llama_model.get_input_embeddings()
        with torch.inference_mode():
            pad = embed(torch.tensor(self.model.llama_tokenizer.pad_token_id, device=embed.weight.device))
        return left_pad([c[0] for c in contexts], pad.to(contexts[0].dtype))


# ---- the images of concurrent requests in one batch ---------------------------------------------
class _ImagesJob(_Job):
    def __init__(self, images: list[Any]):
        super().__init__(len(images), key="images")
        self.images = images
        self.future: Future = Future()

    def fail(self, err: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(err)


class ImageBatcher(_BatchQueue):
    """``encode`` (``Chat.encode_images``) behind a queue: concurrent calls are encoded in one batch.

    Call it like ``encode``: a list of images in, their (N, tokens, hidden) embeddings out.
    """

    def __init__(self, encode: Callable[[Sequence[Any]], torch.Tensor], max_batch: int = 64):
        super().__init__(max_batch, "minigpt4-image-batcher")
        self.encode = encode

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        job = _ImagesJob(list(images))
        self._submit(job)
        return job.future.result()

    def _run(self, jobs: list[_Job]) -> None:
        try:
            embeddings = self.encode([image for job in jobs for image in job.images])
        except Exception:
            if len(jobs) == 1:
                raise
            # One caller's bad image must not fail the others: each job on its own.
            for job in jobs:
                try:
                    job.future.set_result(self.encode(job.images))
                except Exception as err:
                    job.fail(err)
            return
        start = 0
        for job in jobs:
            job.future.set_result(embeddings[start : start + job.size])
            start += job.size


# ---- the vllm engine ---------------------------------------------------------------------------
def encode_prompt_embeds(inputs_embeds: torch.Tensor) -> str:
    """(1, L, H) or (L, H) embeddings as vLLM's ``prompt_embeds``: base64 of ``torch.save`` of (L, H)."""
    tensor = inputs_embeds.reshape(-1, inputs_embeds.shape[-1]).detach().to("cpu")
    buffer = io.BytesIO()
    # clone(): torch.save writes a view's whole storage (e.g. a whole padded batch), not the view.
    torch.save(tensor.contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# generate() options the vllm engine maps onto vLLM's sampling parameters; a value equal to the
# neutral one is left out. Beam-only and cache options mean nothing to it and are dropped.
# top_k is the payload's own (generate's default applies when a request leaves it out).
_VLLM_OPTIONS = {"repetition_penalty": ("repetition_penalty", 1.0), "min_length": ("min_tokens", 0), "min_new_tokens": ("min_tokens", 0)}
_VLLM_IGNORED = {"num_beams", "length_penalty", "use_cache", "cache_implementation", "top_k"}


class VLLMEngine(Engine):
    """The LLM on a vLLM server (``--enable-prompt-embeds``), through ``/v1/completions``.

    ``url`` is the server's root (``http://host:8000``; a trailing ``/v1`` is accepted). ``stop``:
    the template's stop text (Vicuna's ``###``), sent with every request; EOS the server knows from
    the model folder. ``model``: the served model's name (default: the first the server lists).
    A failed call leaves nothing behind: when the server is back, the next request goes through.
    """

    name = "vllm"

    def __init__(self, url: str, stop: Sequence[str] = (), model: str | None = None, timeout: float = 600.0,
                 max_connections: int = 256, lora_fingerprint: str | None = None, top_k: int | None = None):
        import httpx  # the serve extra's; only this engine needs it

        self.url = url.rstrip("/").removesuffix("/v1")
        self.stop = tuple(s for s in stop if s)
        self._model = model
        # A model with LoRA: the server must run the folder `export --llm-out` wrote (its marker holds this).
        self.lora_fingerprint = lora_fingerprint
        # The top-k a sampled request gets when it sets none: generate's for this LLM (its generation
        # config's, else transformers' 50); vLLM's own default is no top-k.
        self.top_k = generate_top_k(None) if top_k is None else top_k
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), limits=limits)
        self._httpx = httpx

    # -- the interface
    def generate_many(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if len(requests) == 1:
            return [self._complete(requests[0])]
        # vLLM batches what arrives together itself: send them all at once.
        with ThreadPoolExecutor(max_workers=min(len(requests), 32), thread_name_prefix="minigpt4-vllm") as pool:
            return list(pool.map(self._complete, requests))

    def stream(self, request: GenerationRequest) -> Iterator[StreamChunk]:
        payload = self._payload(request, stream=True)
        ids: list[int] = []
        finish, usage = None, {}
        for event in self._events(payload):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                new = list(choice.get("token_ids") or ())
                ids += new
                finish = choice.get("finish_reason") or finish
                if new:
                    yield StreamChunk(new)
        yield StreamChunk([], self._result(request, ids, finish, usage))

    def health(self) -> None:
        """Raise :class:`EngineUnavailable` unless the vLLM server answers its ``/health``."""
        self._checked(lambda: self._client.get(f"{self.url}/health", timeout=5.0))

    def close(self) -> None:
        self._client.close()

    # -- HTTP
    def model_name(self) -> str:
        if self._model is None:
            listing = self._checked(lambda: self._client.get(f"{self.url}/v1/models", timeout=10.0)).json()
            models = listing.get("data", [])
            if not models:
                raise EngineUnavailable(f"the vLLM server at {self.url} serves no model")
            self._check_llm(models[0])
            self._model = models[0]["id"]
        return self._model

    def _check_llm(self, served: dict[str, Any]) -> None:
        """With LoRA, the served folder must hold this model's LLM with those adapters merged."""
        if self.lora_fingerprint is None:
            return
        root = Path(str(served.get("root") or served.get("id")))
        how = "write it with `python -m minigpt4.apps.export --cfg-path <this config> --llm-out FOLDER` and serve FOLDER"
        if not root.is_dir():
            logger.warning("the vLLM server serves '%s', a folder this machine cannot read: it must be this model's LLM with its LoRA merged (%s)", root, how)
            return
        try:
            recorded = json.loads((root / LORA_MARKER).read_text()).get("lora_fingerprint")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != self.lora_fingerprint:
            found = f"no {LORA_MARKER} there" if recorded is None else "it holds other adapters"
            raise EngineMismatch(f"the vLLM server at {self.url} serves '{root}', not this model's LLM with its LoRA merged ({found}); {how}")

    def _payload(self, request: GenerationRequest, stream: bool) -> dict[str, Any]:
        sampling = request.sampling
        payload: dict[str, Any] = {
            "model": self.model_name(),
            "prompt_embeds": encode_prompt_embeds(request.inputs_embeds),
            "max_tokens": sampling.max_new_tokens,
            # vLLM decodes greedily at temperature 0.
            "temperature": float(sampling.temperature) if sampling.do_sample else 0.0,
            "top_p": float(sampling.top_p) if sampling.do_sample else 1.0,
            "stop": list(self.stop + tuple(request.stop)),
            "return_token_ids": True,
            "stream": stream,
        }
        if stream:
            payload["stream_options"] = {"include_usage": True}
        if request.seed is not None:
            payload["seed"] = request.seed
        if sampling.do_sample:
            # generate's top-k unless the request sets one (0 turns it off in both).
            top_k = request.options.get("top_k")
            payload["top_k"] = self.top_k if top_k is None else int(top_k)
        payload.update(self._options(request.options))
        return payload

    @staticmethod
    def _options(options: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if options.get("num_beams", 1) > 1:
            raise EngineRequestError(f"the vllm engine does not run beam search (num_beams={options['num_beams']}); use the hf engine")
        for key, value in options.items():
            if key in _VLLM_OPTIONS:
                name, neutral = _VLLM_OPTIONS[key]
                if value is not None and value != neutral:
                    out[name] = value
            elif key not in _VLLM_IGNORED and value is not None:
                raise EngineRequestError(f"the vllm engine cannot apply the generate option '{key}'; use the hf engine")
        return out

    def _complete(self, request: GenerationRequest) -> GenerationResult:
        payload = self._payload(request, stream=False)
        body = self._checked(lambda: self._client.post(f"{self.url}/v1/completions", json=payload)).json()
        choice = body["choices"][0]
        return self._result(request, list(choice.get("token_ids") or ()), choice.get("finish_reason"), body.get("usage") or {})

    @staticmethod
    def _result(request: GenerationRequest, ids: list[int], finish: str | None, usage: dict[str, Any]) -> GenerationResult:
        return GenerationResult(
            token_ids=ids,
            prompt_tokens=int(usage.get("prompt_tokens") or request.prompt_tokens),
            completion_tokens=int(usage.get("completion_tokens") or len(ids)),
            finish_reason="length" if finish == "length" else "stop",
        )

    def _events(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The server-sent events of a streamed completion, parsed, up to ``[DONE]``."""
        try:
            with self._client.stream("POST", f"{self.url}/v1/completions", json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:  # vLLM reports a failure mid-stream as an event
                        raise EngineUnavailable(f"the vLLM server at {self.url} failed mid-answer: {_message(event)}")
                    yield event
        except self._httpx.TransportError as err:
            raise self._unreachable(err) from None

    def _checked(self, call: Callable[[], Any]):
        try:
            response = call()
        except self._httpx.TransportError as err:
            raise self._unreachable(err) from None
        if response.status_code >= 400:
            self._raise_for(response)
        return response

    def _unreachable(self, err: Exception) -> EngineUnavailable:
        return EngineUnavailable(
            f"the vLLM server at {self.url} cannot be reached ({type(err).__name__}: {err or 'no answer'}); "
            "is it running? (--engine-url)"
        )

    def _raise_for(self, response) -> None:
        try:
            message = _message(response.json())
        except ValueError:
            message = response.text[:500]
        if response.status_code == 404:
            self._model = None  # a restarted server may serve the model under another name
        if response.status_code >= 500:
            raise EngineUnavailable(f"the vLLM server at {self.url} answered {response.status_code}: {message}")
        raise EngineRequestError(f"the vLLM server refused the request ({response.status_code}): {message}")


def _message(body: Any) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}`` or ``{"message": ...}``)."""
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
    return json.dumps(body)[:500]
