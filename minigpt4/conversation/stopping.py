"""Where a reply ends: the template's stop text, in any spelling, or an EOS id.

The stop text is transformers' :class:`~transformers.StopStringCriteria`: it knows every token
sequence that spells the text (in the LLaMA vocabulary ``###`` alone, ``##`` + ``#``, three
byte-fallback ``<0x23>``, ...) from the tokenizer's vocabulary, and checks a batch with tensor
operations alone, each row on its own. :class:`StopCriteria` adds the EOS ids and the two uses this
package has beyond ``generate``: cutting a finished token list at its first stop, and the same
check inside a captured CUDA graph (``decode.py``).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import StoppingCriteria, StopStringCriteria

# Stands for "no token" in a window of ids: beyond every vocabulary, so it spells nothing
# (StopStringCriteria clamps it to its row for unknown ids) and is no EOS.
NO_TOKEN = 2**62


class StopCriteria(StoppingCriteria):
    """Per row of ``input_ids``: whether its last tokens complete ``stop_text`` or its last is an EOS.

    ``stop_text`` None: EOS only (the Llama-2 and ChatML templates end at a special token).
    Pure tensor operations on the last :attr:`window` ids, with no host read: usable in ``generate``
    and inside a CUDA graph. :meth:`to` moves the tables to the device once, before a capture.
    """

    def __init__(self, tokenizer, stop_text: str | None, eos_ids: Sequence[int] = ()):
        super().__init__()
        self.stop_text = stop_text
        self.strings = StopStringCriteria(tokenizer, [stop_text]) if stop_text else None
        self.eos = torch.tensor(sorted({int(i) for i in eos_ids if i is not None}), dtype=torch.long)
        # A stop text of n characters is spelled by at most n tokens (each carries at least one).
        self.window = self.strings.maximum_token_len if self.strings is not None else 1

    def to(self, device: torch.device | str) -> "StopCriteria":
        self.eos = self.eos.to(device)
        if self.strings is not None:
            self.strings.embedding_vec = self.strings.embedding_vec.to(device)
            self.strings.target_lens = self.strings.target_lens.to(device)
        return self

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        if self.strings is not None:
            done = done | self.strings(input_ids, scores)
        return done

    def cut(self, ids: Sequence[int]) -> list[int]:
        """``ids`` up to and including the first stop; all of them when none stops."""
        ids = [int(i) for i in ids]
        if not ids:
            return ids
        # One row per prefix: the window of ids that ends it, in one batched check (on the
        # tables' device, so that they stay where a captured graph holds them).
        padded = torch.tensor([NO_TOKEN] * (self.window - 1) + ids, dtype=torch.long, device=self.eos.device)
        ends = self(padded.unfold(0, self.window, 1)).nonzero()
        return ids[: int(ends[0]) + 1] if len(ends) else ids
