"""The ``Chat`` engine: upload images, ask, answer, as the original demo, on our MiniGPT4.

``Chat`` turns a conversation's prompt into LLM input embeddings (text segments interleaved with
image tokens), has its engine generate, and cleans the reply as the original did. On top of the
original it computes its stop words from the tokenizer (so any vocabulary works), streams (errors
of the generation reach the caller), answers a batch of (image, question) pairs in one
``generate`` call, and keeps the LLM's KV cache between turns (:class:`PrefixCache`), so a new
turn prefills only what the conversation added since the last one.

Generation goes through ``self.engine`` (:mod:`minigpt4.conversation.engines`): in-process
transformers by default, which batches the requests of concurrent callers, or a vLLM server. The
KV cache between turns is the in-process engine's.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from PIL import Image
from transformers import DynamicCache, StaticCache, StoppingCriteriaList

from minigpt4.common.config import GenerationConfig
from minigpt4.conversation.engines import Engine, GenerationRequest, GenerationResult, HFEngine, Sampling, hf_generate
from minigpt4.conversation.images import open_image
from minigpt4.conversation.kv_cache import _OWN_CACHE, PositionKey, PrefixCache, common_prefix
from minigpt4.conversation.stopping import StopCriteria
from minigpt4.conversation.templates import CONV_VISION, IMAGE_MESSAGE, Conversation, clean_reply
from minigpt4.models.mini_gpt4 import PromptTooLong, embed_prompt

logger = logging.getLogger(__name__)

# The original demo's decoding: the defaults of the config's generation section.
ORIGINAL_DECODING: dict[str, Any] = dataclasses.asdict(GenerationConfig())


@dataclass
class Reply:
    """An assistant turn: its text (what the conversation stores) and, once it is finished, the
    engine's result (token ids, token counts, why it ended). While streaming, ``result`` is None."""

    text: str
    result: GenerationResult | None = None


class ContextTooLong(ValueError):
    """A conversation that, with the answer's ``max_new_tokens``, does not fit in ``max_length``."""

    def __init__(self, positions: int, max_new_tokens: int, max_length: int):
        super().__init__(
            f"the conversation is {positions} positions (image tokens included) and the answer may take "
            f"{max_new_tokens} more, over the model's max_length of {max_length}"
        )
        self.positions, self.max_new_tokens, self.max_length = positions, max_new_tokens, max_length


class Chat:
    """Upload images, ask, answer: the original ``Chat`` API on our MiniGPT4.

    ``img_list`` holds one embedding tensor per ``<ImageHere>`` in the conversation, in order.
    With ``reuse_kv_cache`` (the default) each answer keeps the LLM's KV cache on the conversation
    and the next answer prefills only the new part of the context; ``False`` re-encodes the whole
    conversation every turn, as the original. Pass ``cache_implementation="static"`` to
    :meth:`answer` for a fixed-size cache of ``max_length`` positions, whose decoding step
    transformers compiles on a GPU (the first answer pays the compilation).

    ``engine`` generates (default: an in-process :class:`HFEngine` on ``model``); answering from
    several threads at once is safe, and the in-process engine batches those answers. ``decode``
    is that default engine's way of writing an answer that runs alone, or one
    :meth:`answer_batch`: ``"generate"`` (transformers), or
    ``"static"``, our static-cache loop whose one-token step runs as one CUDA graph on a GPU
    (:mod:`minigpt4.conversation.decode`; the same tokens under greedy decoding). The
    static loop keeps its own cache: an answer whose context starts as the last one's did (the next
    turn of the same conversation) prefills only the rest; nothing is kept on the conversation.
    """

    def __init__(
        self,
        model,
        vis_processor,
        device: str | torch.device = "cuda:0",
        conv_template: Conversation = CONV_VISION,
        reuse_kv_cache: bool = True,
        generation: Mapping[str, Any] | None = None,
        model_type: str | None = None,
        engine: Engine | None = None,
        decode: str = "generate",
    ):
        self.model = model
        self.vis_processor = vis_processor
        self.device = torch.device(device)
        self.conv_template = conv_template
        self.reuse_kv_cache = reuse_kv_cache
        # The decoding a caller gets without asking (the config's generation section; the
        # original demo's sampling when none is given).
        self.generation = {**ORIGINAL_DECODING, **(generation or {})}
        self.model_type = model_type
        tokenizer = model.llama_tokenizer
        eos = {tokenizer.eos_token_id}
        config_eos = getattr(model.llama_model.generation_config, "eos_token_id", None)
        eos.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
        eos_ids = sorted(i for i in eos if i is not None)
        self.stop = StopCriteria(tokenizer, conv_template.stop_str, eos_ids)
        self.stopping_criteria = StoppingCriteriaList([self.stop])
        if engine is not None and decode != "generate":
            raise ValueError(f"decode={decode!r}: it sets up the engine Chat builds; pass it to your own engine instead")
        self.engine = engine if engine is not None else HFEngine(model, self.stop, decode=decode)

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
    def context_with_keys(
        self, prompt: str, img_list: Sequence[torch.Tensor], max_positions: int | None = None
    ) -> tuple[torch.Tensor, list[PositionKey]]:
        """:meth:`get_context_emb` and the :class:`PrefixCache` key of each of its positions
        (``max_positions``: see ``embed_prompt``)."""
        embed = self.model.llama_model.get_input_embeddings()
        emb, keys = embed_prompt(prompt, img_list, self.model.llama_tokenizer, embed, special_tokens=True, max_positions=max_positions)
        return emb.unsqueeze(0), keys

    def generation_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``generate`` arguments: :attr:`generation` with ``overrides`` on top (``max_length`` excluded)."""
        settings = {**self.generation, **overrides}
        settings.pop("max_length", None)
        kwargs = dict(
            stopping_criteria=self.stopping_criteria,
            pad_token_id=self.model.llama_tokenizer.pad_token_id,
            **{k: v for k, v in settings.items() if k not in ("top_p", "temperature")},
        )
        if settings["do_sample"]:
            kwargs.update(top_p=settings["top_p"], temperature=float(settings["temperature"]))
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
        self,
        conv: Conversation,
        img_list: Sequence[torch.Tensor],
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        truncate: bool = True,
        **generation: Any,
    ) -> dict[str, Any]:
        """The ``generate`` arguments of the assistant's next turn.

        ``inputs_embeds`` is always the whole context; with a reused cache, ``cache`` holds the
        conversation's KV cache cropped to what that context starts with, and ``generate``
        prefills only the positions after it. A context that leaves fewer than ``max_new_tokens``
        of ``max_length`` loses its first positions, as in the original (with a warning), or with
        ``truncate=False`` raises :class:`ContextTooLong` (the server's choice: an API answer
        never silently forgets the start of its conversation).
        """
        max_new_tokens = max_new_tokens or self.generation["max_new_tokens"]
        max_length = max_length or self.generation["max_length"]
        conv.append_message(conv.roles[1], None)
        try:
            embs, keys = self.context_with_keys(conv.get_prompt(), img_list, None if truncate else max_length - max_new_tokens)
        except PromptTooLong as err:
            conv.messages.pop()
            raise ContextTooLong(err.positions, max_new_tokens, max_length) from None
        kept = self._truncate(embs, max_new_tokens, max_length)
        kwargs = dict(inputs_embeds=kept, **self.generation_kwargs(max_new_tokens=max_new_tokens, **generation))
        # Truncation shifts every position: nothing in the cache fits any more.
        self._attach_cache(conv, kwargs, keys if kept is embs else None, img_list, max_length)
        return kwargs

    def _cache_kind(self, generation: dict[str, Any]) -> str | None:
        """The kind of cache this generation can carry between turns ("dynamic", "static"), or None."""
        if not self.reuse_kv_cache or not self.engine.reuses_kv_cache or generation.get("num_beams", 1) > 1 or generation.get("num_return_sequences", 1) > 1:
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
        return hf_generate(self.model, **kwargs)

    def engine_request(self, generation: Mapping[str, Any], stop: Sequence[str] = (), seed: int | None = None) -> GenerationRequest:
        """``generate`` arguments (:meth:`answer_prepare`, :meth:`generation_kwargs`) as an engine request.

        The stopping criteria and pad id are the engine's own; what is neither the context nor a
        sampling setting travels as an option (num_beams, repetition_penalty, the KV cache, ...).
        """
        options = dict(generation)
        inputs_embeds = options.pop("inputs_embeds")
        options.pop("stopping_criteria", None)
        options.pop("pad_token_id", None)
        sampling = Sampling(
            max_new_tokens=int(options.pop("max_new_tokens")),
            do_sample=bool(options.pop("do_sample", False)),
            temperature=float(options.pop("temperature", 1.0)),
            top_p=float(options.pop("top_p", 1.0)),
        )
        return GenerationRequest(inputs_embeds, sampling, tuple(stop), seed, options)

    def decode_reply(self, token_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
        """The reply's text: cut at the stop words (and at the first of ``stop``), decoded, cleaned."""
        tokenizer = self.model.llama_tokenizer
        ids = self.stop.cut(token_ids)
        # transformers 4.28 put a BOS (and models sometimes an unk) before the new tokens.
        if ids and ids[0] == tokenizer.unk_token_id:
            ids = ids[1:]
        if ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        for s in stop:
            text = text.split(s)[0]
        return clean_reply(text, self.conv_template)

    def _partial_reply(self, token_ids: Sequence[int], stop: Sequence[str]) -> str:
        """The reply so far, without what may still turn into a stop sign or a whole character."""
        text = self.decode_reply(token_ids, stop).rstrip("\ufffd")  # a character whose bytes are not all in
        if self.conv_template.stop_str:
            # Hide a half-written stop sign ("#", "##") until we know what it becomes.
            text = text.rstrip(self.conv_template.stop_str[0]).rstrip()
        for s in stop:
            # The longest start of ``s`` the text ends with (no longer than the text itself).
            text = next((text[: -k] for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), text)
        return text

    def _finish_turn(
        self, conv: Conversation, img_list: Sequence[torch.Tensor], generation: dict[str, Any], result: GenerationResult, stop: Sequence[str]
    ) -> Reply:
        reply = Reply(self.decode_reply(result.token_ids, stop), result)
        conv.messages[-1][1] = reply.text
        self._keep_cache(conv, img_list, generation, result.token_ids)
        return reply

    def reply(self, conv: Conversation, img_list: Sequence[torch.Tensor], stop: Sequence[str] = (), seed: int | None = None, **kwargs: Any) -> Reply:
        """:meth:`answer` with the engine's whole result: token counts and why the reply ended.

        ``stop``: strings that end the reply besides the template's stop words (the reply is cut
        before the first); ``seed``: the sampling seed of this answer.
        """
        generation = self.answer_prepare(conv, img_list, **kwargs)
        result = self.engine.generate(self.engine_request(generation, stop, seed))
        return self._finish_turn(conv, img_list, generation, result, stop)

    def stream_reply(
        self,
        conv: Conversation,
        img_list: Sequence[torch.Tensor],
        stop: Sequence[str] = (),
        seed: int | None = None,
        decode_partial: bool = True,
        **kwargs: Any,
    ) -> Iterator[Reply]:
        """:meth:`reply` as it is written: the reply so far each time it grows, then the finished one.

        Closing the iterator early cancels the answer. ``decode_partial=False``: each piece as it
        comes is an empty ``Reply("")``, nothing decoded, and only the finished reply has its text:
        for a caller that wants the whole answer but may give up on it between two pieces (the
        server, for a client that leaves before its non-streamed answer).
        """
        generation = self.answer_prepare(conv, img_list, **kwargs)
        request = self.engine_request(generation, stop, seed)
        if generation.get("num_beams", 1) > 1:
            # transformers cannot stream beam search: answer in one piece instead.
            yield self._finish_turn(conv, img_list, generation, self.engine.generate(request), stop)
            return
        ids: list[int] = []
        shown = ""
        for chunk in self.engine.stream(request):
            if chunk.result is not None:
                yield self._finish_turn(conv, img_list, generation, chunk.result, stop)
                return
            ids += chunk.token_ids
            if not decode_partial:
                yield Reply("")
                continue
            text = self._partial_reply(ids, stop)
            if text != shown:
                shown = text
                yield Reply(text)

    def answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], **kwargs: Any) -> tuple[str, list[int]]:
        """Generate the assistant's turn, store it in ``conv`` and return it with its token ids."""
        reply = self.reply(conv, img_list, **kwargs)
        return reply.text, reply.result.token_ids

    def stream_answer(self, conv: Conversation, img_list: Sequence[torch.Tensor], **kwargs: Any) -> Iterator[str]:
        """Like :meth:`answer`, yielding the cleaned reply so far as tokens arrive.

        When the generator is exhausted the final reply (the same text :meth:`answer` gives) is
        stored in ``conv``; an error of the generation is raised here.
        """
        for reply in self.stream_reply(conv, img_list, **kwargs):
            yield reply.text

    # ---- batches ----
    def answer_batch(
        self,
        images: Sequence[Any],
        questions: str | Sequence[str],
        conv_template: Conversation | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        **generation: Any,
    ) -> list[str]:
        """Answer N (image, question) pairs, each in a fresh conversation, in ONE ``generate`` call.

        Contexts are left-padded (pad embedding, mask 0), each sequence stops on its own stop
        words, and each reply is cut at its own stop, so under greedy decoding the replies equal
        those of :meth:`answer` one at a time. (With the vllm engine: one request each, at once.)
        """
        if isinstance(questions, str):
            questions = [questions] * len(images)
        if len(questions) != len(images):
            raise ValueError(f"answer_batch: {len(images)} images but {len(questions)} questions")
        if not images:
            return []
        template = conv_template or self.conv_template
        max_new_tokens = max_new_tokens or self.generation["max_new_tokens"]
        max_length = max_length or self.generation["max_length"]
        image_embs = self.encode_images(images)
        contexts = []
        for image_emb, question in zip(image_embs, questions):
            conv = template.copy()
            conv.append_message(conv.roles[0], IMAGE_MESSAGE)
            self.ask(question, conv)
            conv.append_message(conv.roles[1], None)
            emb = self.get_context_emb(conv.get_prompt(), [image_emb.unsqueeze(0)])
            contexts.append(self._truncate(emb, max_new_tokens, max_length)[0])

        # One options dict for all: the engine runs them as one batch, as one generate call.
        generation = self.generation_kwargs(max_new_tokens=max_new_tokens, **generation)
        requests = [self.engine_request({**generation, "inputs_embeds": context.unsqueeze(0)}) for context in contexts]
        options = requests[0].options
        for request in requests:
            request.options = options
        return [self.decode_reply(result.token_ids) for result in self.engine.generate_many(requests)]
