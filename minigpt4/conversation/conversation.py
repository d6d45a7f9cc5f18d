"""Chat with MiniGPT-4: conversation templates, stop words, and the ``Chat`` engine.

A conversation is the original's prompt format (``system + sep + Σ(role + message + sep)``) with
``<Img><ImageHere></Img>`` where each uploaded image goes. ``Chat`` turns the prompt into LLM input
embeddings (text segments interleaved with image tokens), generates, and cleans the reply exactly
as the original did. On top of the original it computes its stop words from the tokenizer (so any
vocabulary works), streams from a worker thread whose errors reach the caller, answers a batch
of (image, question) pairs in one ``generate`` call, and keeps the LLM's KV cache between turns
(:class:`PrefixCache`), so a new turn prefills only what the conversation added since the last
one instead of the whole conversation.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any, Hashable, Iterator, Sequence

import torch
from PIL import Image
from transformers import DynamicCache, StaticCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from minigpt4.models.mini_gpt4 import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
STOP_TEXT = "###"
MAX_IMAGE_PIXELS = 50_000_000


class SeparatorStyle(Enum):
    SINGLE = auto()
    TWO = auto()


@dataclass
class Conversation:
    """A conversation history and the template that renders it as one prompt string."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]] = field(default_factory=list)
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    # Generation stops when the reply spells this (Vicuna's "###"); None: only at EOS, as the
    # original's Llama-2 chat, whose reference run went on past a "###".
    stop_str: str | None = STOP_TEXT
    skip_next: bool = False
    conv_id: Any = None
    # The LLM's KV cache after the last answer; a copy starts without it (see PrefixCache).
    kv_cache: "PrefixCache | None" = field(default=None, init=False, repr=False, compare=False)

    def get_prompt(self) -> str:
        seps = [self.sep, self.sep2 if self.sep_style == SeparatorStyle.TWO else self.sep]
        prompt = self.system + seps[0] if self.system else ""  # ChatML without a system turn
        for i, (role, message) in enumerate(self.messages):
            # An empty message is the turn the model is about to write: just its role.
            prompt += role + message + seps[i % 2] if message else role
        return prompt

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append([role, message])

    def copy(self) -> "Conversation":
        return dataclasses.replace(self, messages=copy.deepcopy(self.messages))

    def to_gradio_chatbot(self) -> list[dict[str, str]]:
        """The turns after ``offset`` as Gradio ``messages`` (user, assistant, ...)."""
        out = []
        for i, (_, message) in enumerate(self.messages[self.offset :]):
            if message is not None:
                out.append({"role": "user" if i % 2 == 0 else "assistant", "content": message})
        return out


SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions."
)

CONV_VISION_Vicuna0 = Conversation(
    system=SYSTEM, roles=("Human: ", "Assistant: "), messages=[], offset=2, sep_style=SeparatorStyle.SINGLE, sep="###"
)
CONV_VISION_LLama2 = Conversation(
    system=SYSTEM, roles=("<s>[INST] ", " [/INST] "), messages=[], offset=2, sep_style=SeparatorStyle.SINGLE, sep="",
    stop_str=None,
)
# ChatML for the nano model's SmolLM2-Instruct, without a system turn: every token costs on a
# CPU. Its first turn renders exactly as the nano model.prompt_template, so chat feeds the LLM
# what training did; EOS (<|im_end|>) ends a reply.
CONV_VISION_SmolLM2 = Conversation(
    system="",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=[],
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="<|im_end|>\n",
    stop_str=None,
)
CONV_VISION = CONV_VISION_Vicuna0
CONV_TEMPLATES = {
    "pretrain_vicuna0": CONV_VISION_Vicuna0,
    "pretrain_llama2": CONV_VISION_LLama2,
    "nano": CONV_VISION_SmolLM2,
}


def conv_template_for(model_type: str) -> Conversation:
    if model_type not in CONV_TEMPLATES:
        raise ValueError(f"model.model_type: no chat template for '{model_type}'; known: {', '.join(CONV_TEMPLATES)}")
    return CONV_TEMPLATES[model_type]


# ---- stop words ---------------------------------------------------------------------------------
def _token_text(tokenizer, token: str) -> str:
    # Decoding a piece alone drops sentencepiece's leading space; an anchor in front keeps it,
    # and "▁##" after "#" must not count as "###".
    return tokenizer.convert_tokens_to_string(["a", token])[1:]


def stop_sequences(tokenizer, stop_text: str | None = STOP_TEXT, eos_token_ids: Sequence[int] = ()) -> set[tuple[int, ...]]:
    """Every token-id sequence that completes ``stop_text`` in its last token, plus each EOS.

    A sequence is either one token whose text contains ``stop_text``, or a token ending in part
    of it, then tokens made only of its characters, then a token starting with the rest: in the
    LLaMA vocabulary ``###`` alone, ``##`` + ``#``, byte-fallback ``<0x23>`` three times, ...
    Only ``stop_text`` made of one repeated character (``###``) is supported; None stops at EOS only.
    """
    if stop_text is None:
        return {(i,) for i in eos_token_ids}
    char = stop_text[0]
    if set(stop_text) != {char}:
        raise ValueError(f"stop_text '{stop_text}': only a repeated single character is supported")
    n = len(stop_text)
    special = set(tokenizer.all_special_ids)
    texts: dict[int, str] = {}
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token is None or token_id in special:
            continue
        # Byte-fallback pieces (<0x23>) hide the character, so they are decoded too.
        if char in token or token.startswith("<0x"):
            text = _token_text(tokenizer, token)
            if char in text:
                texts[token_id] = text

    def leading(text: str) -> int:
        return len(text) - len(text.lstrip(char))

    def trailing(text: str) -> int:
        return len(text) - len(text.rstrip(char))

    sequences: set[tuple[int, ...]] = {(i,) for i, t in texts.items() if stop_text in t}
    partial = {i: t for i, t in texts.items() if stop_text not in t}
    pure = {i: len(t) for i, t in partial.items() if t == char * len(t)}

    def before(need: int) -> list[tuple[int, ...]]:
        """Token sequences whose text ends with at least ``need`` stop characters."""
        found = [(i,) for i, t in partial.items() if trailing(t) >= need]
        for i, length in pure.items():
            if length < need:
                found += [prefix + (i,) for prefix in before(need - length)]
        return found

    for last, text in partial.items():
        if 0 < leading(text) < n:
            for prefix in before(n - leading(text)):
                # Generation would already have stopped inside a prefix that spells it.
                if stop_text not in "".join(texts[i] for i in prefix):
                    sequences.add(prefix + (last,))
    sequences.update((int(i),) for i in eos_token_ids if i is not None)
    return sequences


class StopMatcher:
    """Finds where a generated token list first completes one of the stop sequences."""

    def __init__(self, sequences: set[tuple[int, ...]]):
        self.by_last: dict[int, list[tuple[int, ...]]] = {}
        for seq in sequences:
            self.by_last.setdefault(seq[-1], []).append(seq)

    def ends_at(self, ids: Sequence[int], end: int) -> bool:
        """Whether ``ids[:end]`` ends with a stop sequence."""
        for seq in self.by_last.get(ids[end - 1], ()):
            if end >= len(seq) and tuple(ids[end - len(seq) : end]) == seq:
                return True
        return False

    def cut(self, ids: Sequence[int]) -> list[int]:
        """``ids`` up to and including the first stop sequence."""
        ids = list(ids)
        for end in range(1, len(ids) + 1):
            if self.ends_at(ids, end):
                return ids[:end]
        return ids


class StoppingCriteriaSub(StoppingCriteria):
    """Per sequence: stop once the generated tokens end with a stop sequence."""

    def __init__(self, matcher: StopMatcher):
        super().__init__()
        self.matcher = matcher

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs) -> torch.BoolTensor:
        rows = input_ids.tolist()
        return torch.tensor([self.matcher.ends_at(row, len(row)) for row in rows], dtype=torch.bool, device=input_ids.device)


# ---- images --------------------------------------------------------------------------------------
class ImageError(ValueError):
    """An upload that is not a usable image; the message names the file and the reason."""


def open_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open and fully decode an image file as RGB, or raise :class:`ImageError` saying why not."""
    name = os.path.basename(str(path))
    try:
        with Image.open(path) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageError(
                    f"'{name}' is {width}x{height} = {width * height / 1e6:.0f} megapixels; "
                    f"the limit is {max_pixels / 1e6:.0f} megapixels"
                )
            probe.verify()
        # verify() leaves the file unusable and misses truncated pixel data, so decode it for real.
        with Image.open(path) as image:
            return image.convert("RGB")
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"'{name}': no such file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"'{name}' is not an image (or not a format Pillow can read)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"'{name}' is a damaged image file ({err})") from None


# ---- the KV cache between turns ------------------------------------------------------------------
# What one cache position was computed from: a token id, or (id(image embedding), row) for a row
# of an uploaded image's embedding.
PositionKey = Hashable


def common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """The LLM's KV cache kept on a conversation between turns, and what it holds, position by position.

    The original re-encodes the whole conversation every turn. A turn's context starts with the
    previous turn's context, so the positions the two share (``keys`` equal) are taken from the
    cache and only the rest is prefilled. After generating, the cache holds ``context +
    reply[:-1]`` (the last generated token is never fed back). The next prompt holds the reply as
    *text*, which the templates' trailing space ("Assistant: ") re-tokenizes differently, so the
    reply is then prefilled as that prompt will tokenize it (:meth:`Chat.answer`). Image
    positions name their embedding tensor, which ``images`` keeps alive so its id cannot be
    recycled for another tensor. While a turn is written into the cache, and for good after one
    that failed, ``keys`` is None and nobody uses the cache: a later turn starts a fresh one.
    """

    def __init__(self, cache: DynamicCache | StaticCache, llm: Any):
        self.cache = cache
        self.llm = llm  # a cache is only valid for the model that computed it
        self.keys: list[PositionKey] | None = None  # a new cache is busy until its first turn is done
        self.images: list[torch.Tensor] = []
        self.context: list[PositionKey] = []  # the keys of the turn being generated
        self.reused = 0  # positions of the last turn's context taken from the cache
        self._lock = threading.Lock()

    def claim(self, llm: Any, static: bool, length: int) -> list[PositionKey] | None:
        """What the cache holds, and the cache is busy until :meth:`finish`; None if it cannot serve."""
        with self._lock:
            usable = (
                self.keys is not None
                and self.llm is llm
                and isinstance(self.cache, StaticCache) == static
                and (not static or self.cache.get_max_length() >= length)
            )
            if not usable:
                return None
            held, self.keys = self.keys, None
            return held

    def start(self, held: Sequence[PositionKey], context: list[PositionKey], images: Sequence[torch.Tensor]) -> None:
        """Crop the cache to the part of ``held`` that ``context`` starts with."""
        # At least one position is prefilled: generate needs the logits of the last one.
        self.reused = min(common_prefix(held, context), len(context) - 1)
        self.crop(len(held), self.reused)
        self.context = context
        self.images = list(images)

    def crop(self, held: int, keep: int) -> None:
        if held > keep:
            # A static cache crops by updating its length counter in place, and on a GPU that
            # counter was made inside generate's inference mode: only inference mode may touch it.
            with torch.inference_mode():
                self.cache.crop(keep - held)

    def finish(self, generated: Sequence[int]) -> None:
        """Record the turn that generated ``generated``; the cache stays unusable if it holds anything else."""
        held = self.context + list(generated[:-1])
        if int(self.cache.get_seq_length()) == len(held):
            self.keys = held
        else:
            logger.warning("the KV cache holds %d positions, expected %d: not reused", int(self.cache.get_seq_length()), len(held))

    def __deepcopy__(self, memo: dict) -> None:
        # A deep-copied conversation starts without a cache, as Conversation.copy().
        return None


# Generation settings under which a reused cache would not give the original's output, or that
# bring their own cache: those turns prefill everything, as the original.
_OWN_CACHE = ("cache", "past_key_values", "assistant_model", "prompt_lookup_num_tokens", "prefill_chunk_size")


# ---- the chat engine -----------------------------------------------------------------------------
def clean_reply(text: str) -> str:
    """The original's post-processing: cut at the stop sign, keep what follows ``Assistant:``."""
    return text.split(STOP_TEXT)[0].split("Assistant:")[-1].strip()


class Chat:
    """Upload images, ask, answer: the original ``Chat`` API on our MiniGPT4.

    ``img_list`` holds one embedding tensor per ``<ImageHere>`` in the conversation, in order.
    With ``reuse_kv_cache`` (the default) each answer keeps the LLM's KV cache on the conversation
    and the next answer prefills only the new part of the context; ``False`` re-encodes the whole
    conversation every turn, as the original. Pass ``cache_implementation="static"`` to
    :meth:`answer` for a fixed-size cache of ``max_length`` positions, whose decoding step
    transformers compiles on a GPU (the first answer pays the compilation).
    """

    def __init__(
        self,
        model,
        vis_processor,
        device: str | torch.device = "cuda:0",
        conv_template: Conversation = CONV_VISION,
        reuse_kv_cache: bool = True,
    ):
        self.model = model
        self.vis_processor = vis_processor
        self.device = torch.device(device)
        self.conv_template = conv_template
        self.reuse_kv_cache = reuse_kv_cache
        tokenizer = model.llama_tokenizer
        eos = {tokenizer.eos_token_id}
        config_eos = getattr(model.llama_model.generation_config, "eos_token_id", None)
        eos.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
        eos_ids = sorted(i for i in eos if i is not None)
        self.stop_matcher = StopMatcher(stop_sequences(tokenizer, conv_template.stop_str, eos_ids))
        self.stopping_criteria = StoppingCriteriaList([StoppingCriteriaSub(self.stop_matcher)])

    def new_conversation(self) -> Conversation:
        return self.conv_template.copy()

    # ---- images and questions ----
    def _image_tensor(self, image: str | os.PathLike | Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image)
        if isinstance(image, Image.Image):
            image = self.vis_processor(image.convert("RGB"))
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image: expected a path, a PIL image or a tensor, got {type(image).__name__}")
        if image.dim() == 3:
            image = image.unsqueeze(0)
        return image.to(self.device)

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """(N, tokens, hidden) LLM-width embeddings of N images, in one ``encode_img`` call."""
        batch = torch.cat([self._image_tensor(image) for image in images])
        with torch.inference_mode():
            image_emb, _ = self.model.encode_img(batch)
        return image_emb

    def upload_img(self, image: Any, conv: Conversation, img_list: list[torch.Tensor]) -> str:
        img_list.append(self.encode_images([image]))
        conv.append_message(conv.roles[0], IMAGE_MESSAGE)
        return "Received."

    def ask(self, text: str, conv: Conversation) -> None:
        last = conv.messages[-1] if conv.messages else None
        if last is not None and last[0] == conv.roles[0] and last[1] is not None and last[1].endswith("</Img>"):
            last[1] = " ".join([last[1], text])
        else:
            conv.append_message(conv.roles[0], text)

    # ---- prompt -> embeddings ----
    def get_context_emb(self, prompt: str, img_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Text segments (BOS on the first only) interleaved with the image embeddings: (1, L, H)."""
        return self.context_with_keys(prompt, img_list)[0]

    @torch.no_grad()
    def context_with_keys(self, prompt: str, img_list: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[PositionKey]]:
        """:meth:`get_context_emb` and the :class:`PrefixCache` key of each of its positions."""
        segments = prompt.split(IMAGE_PLACEHOLDER)
        if len(segments) != len(img_list) + 1:
            raise ValueError(f"the prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} but {len(img_list)} images were uploaded")
        tokenizer = self.model.llama_tokenizer
        embed = self.model.llama_model.get_input_embeddings()
        device = embed.weight.device
        pieces, keys = [], []
        for i, segment in enumerate(segments):
            ids = tokenizer(segment, add_special_tokens=i == 0).input_ids
            pieces.append(embed(torch.tensor([ids], dtype=torch.long, device=device)))
            keys += ids
            if i < len(img_list):
                image = img_list[i]
                pieces.append(image.to(device=device, dtype=embed.weight.dtype))
                keys += [(id(image), row) for row in range(image.shape[1])]
        return torch.cat(pieces, dim=1), keys

    def generation_kwargs(
        self,
        max_new_tokens: int = 300,
        num_beams: int = 1,
        min_length: int = 1,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        temperature: float = 1.0,
        do_sample: bool = True,
        **extra: Any,
    ) -> dict[str, Any]:
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            stopping_criteria=self.stopping_criteria,
            num_beams=num_beams,
            do_sample=do_sample,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            pad_token_id=self.model.llama_tokenizer.pad_token_id,
        )
        if do_sample:
            kwargs.update(top_p=top_p, temperature=float(temperature))
        kwargs.update(extra)
        return kwargs

    def _truncate(self, embs: torch.Tensor, max_new_tokens: int, max_length: int) -> torch.Tensor:
        overflow = embs.shape[1] + max_new_tokens - max_length
        if overflow > 0:
            logger.warning(
                "the conversation is %d tokens, more than max_length %d minus max_new_tokens %d: "
                "the model will not see its first %d positions",
                embs.shape[1], max_length, max_new_tokens, overflow,
            )
            embs = embs[:, overflow:]
        return embs

    def answer_prepare(
        self, conv: Conversation, img_list: Sequence[torch.Tensor], max_new_tokens: int = 300, max_length: int = 2000, **generation: Any
    ) -> dict[str, Any]:
        """The ``generate`` arguments of the assistant's next turn.

        ``inputs_embeds`` is always the whole context; with a reused cache, ``cache`` holds the
        conversation's KV cache cropped to what that context starts with, and ``generate``
        prefills only the positions after it.
        """
        conv.append_message(conv.roles[1], None)
        embs, keys = self.context_with_keys(conv.get_prompt(), img_list)
        kept = self._truncate(embs, max_new_tokens, max_length)
        kwargs = dict(inputs_embeds=kept, **self.generation_kwargs(max_new_tokens=max_new_tokens, **generation))
        # Truncation shifts every position: nothing in the cache fits any more.
        self._attach_cache(conv, kwargs, keys if kept is embs else None, img_list, max_length)
        return kwargs

    def _cache_kind(self, generation: dict[str, Any]) -> str | None:
        """The kind of cache this generation can carry between turns ("dynamic", "static"), or None."""
        if not self.reuse_kv_cache or generation.get("num_beams", 1) > 1 or generation.get("num_return_sequences", 1) > 1:
            return None
        if generation.get("use_cache") is False or any(generation.get(k) is not None for k in _OWN_CACHE):
            return None
        if getattr(self.model.llama_model.generation_config, "cache_implementation", None) is not None:
            return None  # the model's own choice; generate refuses a cache next to it
        kind = generation.get("cache_implementation") or "dynamic"
        return kind if kind in ("dynamic", "static") else None

    def _attach_cache(
        self, conv: Conversation, generation: dict[str, Any], keys: list[PositionKey] | None, img_list: Sequence[torch.Tensor], max_length: int
    ) -> None:
        previous, conv.kv_cache = conv.kv_cache, None
        kind = self._cache_kind(generation) if keys is not None else None
        if kind is None:
            return
        llm = self.model.llama_model
        length = len(keys) + generation["max_new_tokens"]
        held = previous.claim(llm, kind == "static", length) if previous is not None else None
        if held is None:
            if kind == "static":
                # max_length bounds every untruncated turn: one cache (one compiled graph) serves them all.
                cache = StaticCache(config=llm.config, max_cache_len=max(length, max_length))
            else:
                cache = DynamicCache(config=llm.config)
            state, held = PrefixCache(cache, llm), []
        else:
            state = previous
        state.start(held, keys, img_list)
        generation.pop("cache_implementation", None)
        generation["cache"] = state.cache
        conv.kv_cache = state

    def _keep_cache(self, conv: Conversation, img_list: Sequence[torch.Tensor], generation: dict[str, Any], output: Sequence[int]) -> None:
        """After a successful turn, its reply stored in ``conv``: prefill the reply as the next
        prompt will tokenize it, up to the user's role, so the next turn prefills only its question.
        """
        state = conv.kv_cache
        if state is None or generation.get("cache") is not state.cache:
            return
        state.finish(output)
        upcoming = conv.copy()
        upcoming.append_message(upcoming.roles[0], None)
        # Up to the role's last visible character: a trailing space tokenizes with the next word.
        embs, keys = self.context_with_keys(upcoming.get_prompt().rstrip(), img_list)
        llm = self.model.llama_model
        held = state.claim(llm, isinstance(state.cache, StaticCache), len(keys))
        if held is None:
            return
        keep = common_prefix(held, keys)
        state.crop(len(held), keep)
        try:
            if keep < len(keys):
                with torch.inference_mode(), self.model.maybe_autocast(self.model.autocast_dtype):
                    llm(inputs_embeds=embs[:, keep:], cache=state.cache, use_cache=True, logits_to_keep=1)
        except Exception as err:  # the reply is fine; only the next turn's head start is lost
            logger.warning("prefilling the reply for the next turn failed (%s: %s); the next turn prefills it", type(err).__name__, err)
            return
        state.keys, state.images = keys, list(img_list)

    def model_generate(self, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode(), self.model.maybe_autocast(self.model.autocast_dtype):
            return self.model.llama_model.generate(**kwargs)

    def decode_reply(self, token_ids: Sequence[int]) -> str:
        tokenizer = self.model.llama_tokenizer
        ids = self.stop_matcher.cut(token_ids)
        # transformers 4.28 put a BOS (and models sometimes an unk) before the new tokens.
        if ids and ids[0] == tokenizer.unk_token_id:
            ids = ids[1:]
        if ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        return clean_reply(tokenizer.decode(ids, skip_special_tokens=True))

    def answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], **kwargs: Any) -> tuple[str, list[int]]:
        """Generate the assistant's turn, store it in ``conv`` and return it with its token ids."""
        generation = self.answer_prepare(conv, img_list, **kwargs)
        output = self.model_generate(**generation)[0].tolist()
        reply = self.decode_reply(output)
        conv.messages[-1][1] = reply
        self._keep_cache(conv, img_list, generation, output)
        return reply, output

    def stream_answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], **kwargs: Any) -> Iterator[str]:
        """Like :meth:`answer`, yielding the cleaned reply so far as tokens arrive.

        When the generator is exhausted the final reply (the same text :meth:`answer` gives) is
        stored in ``conv``; an error in the generation thread is raised here.
        """
        generation = self.answer_prepare(conv, img_list, **kwargs)
        if generation.get("num_beams", 1) > 1:
            # transformers cannot stream beam search: answer in one piece instead.
            output = self.model_generate(**generation)[0].tolist()
            conv.messages[-1][1] = self.decode_reply(output)
            yield conv.messages[-1][1]
            return
        streamer = TextIteratorStreamer(self.model.llama_tokenizer, skip_prompt=False, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["output"] = self.model_generate(streamer=streamer, **generation)
            except BaseException as err:  # handed to the consumer below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="minigpt4-generate", daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            # Hide a half-written stop sign ("#", "##") until we know what it becomes.
            yield clean_reply(text).rstrip(STOP_TEXT[0]).rstrip()
        thread.join()
        if "error" in result:
            raise result["error"]
        output = result["output"][0].tolist()
        conv.messages[-1][1] = self.decode_reply(output)
        self._keep_cache(conv, img_list, generation, output)
        yield conv.messages[-1][1]

    # ---- batches ----
    def answer_batch(
        self,
        images: Sequence[Any],
        questions: str | Sequence[str],
        conv_template: Conversation | None = None,
        max_new_tokens: int = 300,
        max_length: int = 2000,
        **generation: Any,
    ) -> list[str]:
        """Answer N (image, question) pairs, each in a fresh conversation, in ONE ``generate`` call.

        Contexts are left-padded (pad embedding, mask 0), each sequence stops on its own stop
        words, and each reply is cut at its own stop, so under greedy decoding the replies equal
        those of :meth:`answer` one at a time.
        """
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"answer_batch: {len(images)} images but {len(questions)} questions")
        if not images:
            return []
        template = conv_template or self.conv_template
        image_embs = self.encode_images(images)
        contexts = []
        for image_emb, question in zip(image_embs, questions):
            conv = template.copy()
            conv.append_message(conv.roles[0], IMAGE_MESSAGE)
            self.ask(question, conv)
            conv.append_message(conv.roles[1], None)
            emb = self.get_context_emb(conv.get_prompt(), [image_emb.unsqueeze(0)])
            contexts.append(self._truncate(emb, max_new_tokens, max_length)[0])

        embed = self.model.llama_model.get_input_embeddings()
        pad_id = torch.tensor(self.model.llama_tokenizer.pad_token_id, device=embed.weight.device)
        longest = max(len(c) for c in contexts)
        inputs_embeds = embed(pad_id).expand(len(contexts), longest, -1).clone()
        attention_mask = torch.zeros(len(contexts), longest, dtype=torch.long, device=embed.weight.device)
        for i, context in enumerate(contexts):
            inputs_embeds[i, longest - len(context) :] = context
            attention_mask[i, longest - len(context) :] = 1
        outputs = self.model_generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **self.generation_kwargs(max_new_tokens=max_new_tokens, **generation),
        )
        return [self.decode_reply(row) for row in outputs.tolist()]
