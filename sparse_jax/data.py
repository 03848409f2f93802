"""BPE tokenizer, token cache, deterministic batches and the training mixture.

The data's way: a corpus spec -> documents (unusable files skipped and counted by reason) ->
train/validation split by a stable hash of each document's name (both in `corpus`) -> a
byte-level BPE trained on the training documents -> each split tokenized once into a uint16
stream with `<|endoftext|>` before every document -> random windows whose offsets are a pure
function of (seed, step), so a resumed run sees exactly the batches it would have seen.
`corpus` describes the corpus specs; its `Document`, `load_corpus`, `split_documents`,
`fingerprint` and `resolve_cache_dir` can also be imported from here.

Mixture: each `"source:weight"` entry makes that source a fraction `weight` of the training
rows; `DataConfig.corpus` gets the rest. Each row draws its source from (seed, step, row).
Validation batches are drawn the same way from the validation splits, with a fixed seed, so the
validation loss estimates the training objective; `val_batches(..., source=spec)` evaluates
one source alone.

Cache (`DataConfig.cache_dir`, else $SPARSE_JAX_CACHE, else ~/.cache/sparse_jax), every file
written atomically by `corpus.cached`: `tokenizer-<key>.json` keyed by the training documents'
fingerprint, the vocab size and the tokenizer recipe; `tokens-<key>.npy` keyed by the split's
fingerprint and the tokenizer (the `simple` corpus's own cache file is described in `corpus`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tqdm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from sparse_jax.config import Config
from sparse_jax.corpus import (Document, cached, fingerprint, load_corpus, resolve_cache_dir,
                               split_documents)
from sparse_jax.fileio import atomic_write

EOT = "<|endoftext|>"
# The authors' tinypython pre-tokenisation regex (PAPER.md §1, tiktoken_ext/tinypython.py).
TINYPYTHON_PATTERN = (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
VAL_SEED = 0  # validation batches use this seed whatever the training seed
_MIX_STREAM = 1 << 20  # rng stream of the per-row source draws; sources use streams 0, 1, ...
_TOKENS_FORMAT = "eot-before-each-doc/uint16/v1"  # part of the token cache key

log = logging.getLogger(__name__)


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
  return _literal_specials(tok)


def _literal_specials(tok: Tokenizer) -> Tokenizer:
  # A document that contains the text "<|endoftext|>" must not produce the separator id.
  # This setting is not saved in the JSON, so every loader sets it again.
  tok.encode_special_tokens = True
  return tok


# Cache -----------------------------------------------------------------------------------------



def _key(*parts: str) -> str:
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def tokenizer_hash(tok: Tokenizer) -> str:
  """sha256 of the tokenizer's JSON: identifies it in token cache keys."""
  return hashlib.sha256(tok.to_str().encode()).hexdigest()


def get_tokenizer(docs: Sequence[Document], vocab_size: int, cache_dir: Path) -> Tokenizer:
  """The BPE trained on docs, from the cache or trained now and cached.

  Args:
    docs: the training documents (of every source).
    vocab_size: BPE vocabulary size including `<|endoftext|>`.
    cache_dir: cache directory; the file is keyed by the documents' fingerprint, the
      vocab size and the untrained tokenizer's JSON (pre-tokenizer regex, decoder).

  Returns:
    The tokenizer; a document's text round-trips through encode/decode exactly.
  """
  key = _key(fingerprint(docs), str(vocab_size), new_tokenizer().to_str(), EOT)

  def write(tmp: Path):
    log.info("training a %d-token BPE on %d documents (%.1f MB)", vocab_size, len(docs),
             sum(len(d.text) for d in docs) / 1e6)
    train_tokenizer((d.text for d in docs), vocab_size).save(str(tmp))
  tok = cached(cache_dir / f"tokenizer-{key}.json", write, "tokenizer",
               load=lambda path: Tokenizer.from_file(str(path)))
  return _literal_specials(tok)


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike) -> Path:
  """Writes tok to directory/tokenizer.json (atomically), e.g. beside a checkpoint."""
  Path(directory).mkdir(parents=True, exist_ok=True)
  return atomic_write(Path(directory, "tokenizer.json"), lambda tmp: tok.save(str(tmp)))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer JSON file, or the tokenizer.json `save_tokenizer` wrote into a directory.

  Raises:
    ValueError: no readable tokenizer at path.
  """
  path = Path(path)
  if path.is_dir() or not path.suffix:
    path = path / "tokenizer.json"
  if not path.exists():
    raise ValueError(f"{path}: cannot load tokenizer: no such file (a run made by "
                     "experiments.import_model without --tokenizer has none; import again "
                     "with --tokenizer FILE)")
  try:
    tok = Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on missing or invalid files
    raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
  if tok.token_to_id(EOT) is None:
    raise ValueError(f"{path}: tokenizer has no {EOT} token")
  return _literal_specials(tok)


def tokenize_documents(tok: Tokenizer, docs: Sequence[Document], *,
                       progress: bool | None = None) -> np.ndarray:
  """One uint16 token stream: `<|endoftext|>` then the tokens of each document, in order."""
  if tok.get_vocab_size() > 1 << 16:
    raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens; the uint16 token cache "
                     "holds at most 65536")
  eot = np.array([tok.token_to_id(EOT)], np.uint16)
  pieces, chunk = [], 64  # encode_batch runs each chunk on all cores; chunks drive tqdm
  with tqdm.tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True,
                 desc="tokenizing", disable=None if progress is None else not progress) as bar:
    for i in range(0, len(docs), chunk):
      texts = [d.text for d in docs[i:i + chunk]]
      for enc in tok.encode_batch_fast(texts, add_special_tokens=False):
        pieces += [eot, np.asarray(enc.ids, np.uint16)]
      bar.update(sum(map(len, texts)))
  return np.concatenate(pieces)


def get_tokens(tok: Tokenizer, docs: Sequence[Document], cache_dir: Path, *,
               progress: bool | None = None) -> np.ndarray:
  """`tokenize_documents`, cached as .npy keyed by the documents and the tokenizer.

  Returns:
    tokens_N: a read-only uint16 memmap.
  """
  key = _key(fingerprint(docs), tokenizer_hash(tok), _TOKENS_FORMAT)

  def write(tmp: Path):
    with open(tmp, "wb") as f:  # a file object, so np.save adds no ".npy" to the temp name
      np.save(f, tokenize_documents(tok, docs, progress=progress))
  return cached(cache_dir / f"tokens-{key}.npy", write, "tokens",
                load=lambda path: np.load(path, mmap_mode="r"))


# Batches ---------------------------------------------------------------------------------------


def get_batch(tokens_N: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int, *,
              stream: int = 0) -> np.ndarray:
  """Random windows of a token stream, a pure function of (seed, step, stream).

  Args:
    tokens_N: the token stream (e.g. a memmap).
    seed: run seed (any int).
    step: training step (>= 0).
    batch_size: windows B.
    seq_len: L; each window has L + 1 tokens (inputs [:, :-1], targets [:, 1:]).
    stream: separates independent draws with the same (seed, step), e.g. mixture sources.

  Returns:
    batch_BxL1: int32 [batch_size, seq_len + 1].
  """
  n = len(tokens_N)
  if n < seq_len + 1:
    raise ValueError(f"token stream of {n} tokens is shorter than seq_len + 1 = {seq_len + 1}")
  # SeedSequence wants non-negative entries; seed % 2**64 keeps negative seeds distinct.
  rng = np.random.default_rng([seed % 2**64, step, stream])
  starts_B = rng.integers(0, n - seq_len, size=batch_size)
  return np.asarray(tokens_N[starts_B[:, None] + np.arange(seq_len + 1)], np.int32)


@dataclasses.dataclass
class Source:
  """One corpus of the training mixture, tokenized."""

  spec: str  # corpus spec, as in DataConfig
  weight: float  # fraction of training rows
  train_N: np.ndarray  # uint16 token stream (memmap)
  val_N: np.ndarray
  stats: dict


@dataclasses.dataclass
class Dataset:
  """The tokenizer and token streams a training run reads, and how they were made."""

  tokenizer: Tokenizer
  sources: list[Source]  # data.corpus first, then the mixture entries in order
  stats: dict  # JSON-serialisable: per-source documents, skipped, tokens, fingerprints

  def train_batch(self, seed: int, step: int, batch_size: int, seq_len: int) -> np.ndarray:
    """The global training batch of a step: int32 [batch_size, seq_len + 1]."""
    return _mixed_batch(self.sources, "train_N", seed, step, batch_size, seq_len)

  def val_batches(self, n: int, batch_size: int, seq_len: int,
                  source: str | None = None) -> np.ndarray:
    """A fixed validation set: int32 [n, batch_size, seq_len + 1], the same in every run.

    Rows draw their source with the mixture weights (as training does) unless `source`
    names one spec, whose validation split alone is used.
    """
    sources = self.sources
    if source is not None:
      sources = [dataclasses.replace(s, weight=1.0) for s in sources if s.spec == source]
      if not sources:
        raise ValueError(f"unknown source {source!r}; known: "
                         f"{', '.join(s.spec for s in self.sources)}")
    return np.stack([_mixed_batch(sources, "val_N", VAL_SEED, i, batch_size, seq_len)
                     for i in range(n)])


def _mixed_batch(sources: Sequence[Source], split: str, seed: int, step: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
  """Each row draws its source by weight from (seed, step, row), then a window of it."""
  if len(sources) == 1:
    return get_batch(getattr(sources[0], split), seed, step, batch_size, seq_len)
  u_B = np.random.default_rng([seed % 2**64, step, _MIX_STREAM]).random(batch_size)
  cum = np.cumsum([s.weight for s in sources])
  src_B = np.minimum(np.searchsorted(cum / cum[-1], u_B, side="right"), len(sources) - 1)
  batch_BxL1 = np.empty((batch_size, seq_len + 1), np.int32)
  for i, s in enumerate(sources):
    rows = np.flatnonzero(src_B == i)
    batch_BxL1[rows] = get_batch(getattr(s, split), seed, step, len(rows), seq_len,
                                 stream=i)
  return batch_BxL1


# Entry point -----------------------------------------------------------------------------------


def parse_mixture(entries: Sequence[str], corpus: str = "stdlib") -> list[tuple[str, float]]:
  """Parses `DataConfig.mixture` into (spec, weight) pairs.

  Raises:
    ValueError: naming the entry, for a malformed string, a weight outside (0, 1), an unknown
      source, a repeated source, or weights summing to >= 1 (`corpus` needs the rest).
  """
  out: list[tuple[str, float]] = []
  for i, entry in enumerate(entries):
    where = f"data.mixture[{i}] {entry!r}"
    spec, _, text = entry.rpartition(":")  # rpartition: specs may hold colons (C:\...)
    if not spec or not text:
      raise ValueError(f"{where}: expected 'source:weight', e.g. 'simple:0.5'")
    try:
      weight = float(text)
    except ValueError:
      raise ValueError(f"{where}: weight {text!r} is not a number") from None
    if not 0 < weight < 1:
      raise ValueError(f"{where}: weight must be in (0, 1), got {weight}")
    if spec not in ("stdlib", "simple") and not Path(spec).expanduser().exists():
      raise ValueError(f"{where}: unknown source; expected 'stdlib', 'simple' or an existing "
                       ".py directory, .jsonl or text file")
    if spec == corpus or spec in (s for s, _ in out):
      raise ValueError(f"{where}: source {spec!r} is already in the data")
    out.append((spec, weight))
  total = sum(w for _, w in out)
  if total >= 1 - 1e-9:
    raise ValueError(f"data.mixture: weights sum to {total:g}; they must sum to < 1, the rest "
                     "being data.corpus")
  return out


def prepare_data(cfg: Config, *, progress: bool | None = None,
                 tokenizer: Tokenizer | None = None) -> Dataset:
  """Loads, splits, tokenizes (with caching) every source of cfg.data.

  Args:
    cfg: the experiment config: `data` (corpus, mixture, val_frac, max_files, cache_dir,
      text_field), `model.vocab_size` and `train.seq_len` (checked against each split).
    progress: tqdm bars while tokenizing; default: when stderr is a terminal.
    tokenizer: tokenize with this one instead of the BPE trained on the corpus (an imported
      model's own tokenizer, so that its mean activations see the token ids it was trained on).

  Returns:
    The Dataset; `train_batch(seed, step, B, L)` and `val_batches(n, B, L)` give batches.

  Raises:
    ValueError: naming the config field, for any bad corpus, mixture or size.
  """
  d, vocab_size, min_len = cfg.data, cfg.model.vocab_size, cfg.train.seq_len + 1
  if not 257 <= vocab_size <= 1 << 16:
    raise ValueError(f"model.vocab_size: {vocab_size} must be in [257, 65536]: a byte-level "
                     "BPE needs 256 bytes + <|endoftext|>, and the token cache is uint16")
  cache = resolve_cache_dir(d.cache_dir)
  mixture = parse_mixture(d.mixture, d.corpus)
  specs = [("data.corpus", d.corpus, 1 - sum(w for _, w in mixture))]
  specs += [(f"data.mixture[{i}]", spec, w) for i, (spec, w) in enumerate(mixture)]
  splits, stats = [], []
  for field, spec, weight in specs:
    try:
      docs, skipped = load_corpus(spec, text_field=d.text_field, max_files=d.max_files,
                                  cache_dir=cache)
      splits.append(split_documents(docs, d.val_frac))
    except ValueError as e:
      raise ValueError(f"{field}: {e}") from None
    stats.append({"spec": spec, "weight": weight, "skipped": skipped, "fingerprint":
                  fingerprint(docs), "train_docs": len(splits[-1][0]),
                  "val_docs": len(splits[-1][1])})
    log.info("%s: %s", field, stats[-1])

  # One tokenizer for every source, trained on all their training documents (unless given).
  tok = tokenizer if tokenizer is not None else get_tokenizer(
      [doc for train, _ in splits for doc in train], vocab_size, cache)
  sources = []
  for (field, spec, weight), (train, val), st in zip(specs, splits, stats):
    train_N, val_N = (get_tokens(tok, docs, cache, progress=progress) for docs in (train, val))
    for split, tokens_N in (("train", train_N), ("val", val_N)):
      if len(tokens_N) < min_len:
        raise ValueError(f"{field}: the {split} split of {spec!r} has {len(tokens_N)} tokens, "
                         f"fewer than train.seq_len + 1 = {min_len} (use more documents or a "
                         "larger data.val_frac)")
    st.update(train_tokens=len(train_N), val_tokens=len(val_N))
    log.info("%s: %d train tokens, %d val tokens", field, len(train_N), len(val_N))
    sources.append(Source(spec, weight, train_N, val_N, st))
  return Dataset(tok, sources, {"sources": stats, "vocab_size": tok.get_vocab_size(),
                                "tokenizer_sha256": tokenizer_hash(tok), "cache_dir": str(cache)})
