"""Corpus discovery, BPE tokenizer, token cache and deterministic batches.

(Being filled in: corpus loading, token cache and batches.)
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
# The authors' tinypython pre-tokenisation regex (PAPER.md §1, tiktoken_ext/tinypython.py).
TINYPYTHON_PATTERN = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def new_tokenizer() -> Tokenizer:
  """An untrained byte-level BPE with the tinypython pre-tokenizer (round-trips any text)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(TINYPYTHON_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains the BPE on texts; `<|endoftext|>` is id 0 (HF puts special tokens first)."""
  tok = new_tokenizer()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok
