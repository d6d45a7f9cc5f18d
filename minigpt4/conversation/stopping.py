"""Stop words: every token sequence of a vocabulary that spells the template's stop text, plus EOS."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StoppingCriteria

from minigpt4.conversation.templates import STOP_TEXT


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
