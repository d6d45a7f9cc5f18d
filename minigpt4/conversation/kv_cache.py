"""The LLM's KV cache kept on a conversation between turns, so a new turn prefills only what it adds."""
from __future__ import annotations

import logging
import threading
from typing import Any, Hashable, Sequence

import torch
from transformers import DynamicCache, StaticCache

logger = logging.getLogger(__name__)

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
