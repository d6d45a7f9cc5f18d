"""A LLaMA-style sentencepiece tokenizer trained in a second on a few lines of text.

Tests and benchmarks need a real tokenizer but may not download one. This one has LLaMA's
special ids (unk 0, bos 1, eos 2, no pad) and byte fallback, so it encodes any text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def train_llama_sentencepiece(out_dir: str | Path, lines: Sequence[str], vocab_size: int) -> Path:
    """Train a BPE model on ``lines``; returns ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return out_dir / "tokenizer.model"
