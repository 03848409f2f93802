"""Frozen, hashable configuration dataclasses with validation and JSON round-trip.

Every experiment is described by one `Config`, made of one section per concern:

- `ModelConfig`: the transformer (field names follow the authors' `GPTConfig`).
- `SparsityConfig`: weight sparsity targets and the L0 annealing schedule (PAPER.md §2).
- `OptimConfig`: the paper's optimiser (Adam eps 0.1, grad RMS normalisation, sharkfin LR).
- `DataConfig`: corpus and tokenizer.
- `TrainConfig`: steps, batches, evaluation and checkpoint cadence.
- `CircuitConfig`: node-mask circuit search (PAPER.md §4, Table 2 centres as defaults).

Configs are frozen so they can be static arguments to `jax.jit`. Invalid values raise
`ValueError` naming the offending field (`model.d_model: ...`) at construction time, before
any compute. `Config.to_dict`/`Config.from_dict` round-trip through JSON, and
`apply_overrides(cfg, ["model.d_model=128"])` implements the CLI's `--set`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Sequence

# AbsTopK locations, as the authors name them in `afrac_loctypes` (PAPER.md §1).
LOCTYPES = ("attn_in", "attn_q", "attn_k", "attn_v", "attn_out", "mlp_in", "mlp_neuron", "mlp_out")
# Input precisions of the weight matmuls (ModelConfig.matmul_dtype, sparse_jax/matmul.py).
MATMUL_DTYPES = ("float32", "bfloat16")


def _fail(field: str, msg: str) -> None:
  raise ValueError(f"{field}: {msg}")


def _positive_int(section: str, obj: Any, *names: str) -> None:
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      _fail(f"{section}.{name}", f"must be a positive integer, got {value!r}")


def _fraction(section: str, name: str, value: Any, *, allow_zero: bool = False) -> None:
  lo_ok = value >= 0 if allow_zero else value > 0
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo_ok and value <= 1):
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    _fail(f"{section}.{name}", f"must be in {interval}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """GPT-2-style transformer; names follow the authors' `GPTConfig`."""

  n_layer: int = 2  # number of transformer blocks
  d_model: int = 64  # residual stream width
  n_head: int = 4  # attention heads per layer
  d_head: int = 16  # per-head q/k/v width (paper: 16)
  d_mlp: int = 256  # MLP hidden width (paper: 4 * d_model)
  vocab_size: int = 2048  # BPE vocabulary size (tinypython_2k)
  block_size: int = 256  # maximum sequence length (paper: n_ctx 256)
  afrac: float | None = None  # fraction kept by AbsTopK at each loctype; None = no AbsTopK
  afrac_loctypes: tuple[str, ...] = LOCTYPES  # where AbsTopK applies when afrac is set
  sink: bool = False  # per-head learnable attention-sink logit (paper Fig 18)
  enable_bigram_table: bool = True  # dense V x V table added to the logits (paper Fig 24)
  learned_pos_emb: bool = False  # learned absolute positions (paper default: none)
  # Rotary positions on q and k (not in the paper; docs/ablations.md). Each q channel a then
  # meets k channels a and a +- d_head/2 of its head, its rotation partner.
  rope: bool = False
  # Smeared keys (Olsson et al. 2022; not in the paper): each head's keys mix in the previous
  # position's, k_t -> (1 - a_h) k_t + a_h k_{t-1}, a_h = sigmoid of a learned per-head logit,
  # so one attention layer can find "the token after an earlier copy of this one".
  smear_keys: bool = False
  # A [V] vector added to the logits. The authors' models carry it (a buffer, zero unless set);
  # off by default, on only for imported models whose bias is nonzero (interop.py).
  final_logits_bias: bool = False
  activation_type: str = "gelu"  # "gelu" (exact erf) or "relu"
  # Input precision of the weight matmuls (sparse_jax/matmul.py): "bfloat16" rounds both
  # operands and accumulates in float32, forward and backward; weights stay float32.
  matmul_dtype: str = "float32"

  def __post_init__(self):
    _positive_int("model", self, "n_layer", "d_model", "n_head", "d_head", "d_mlp",
                  "vocab_size", "block_size")
    if self.d_model % self.n_head:
      _fail("model.d_model", f"{self.d_model} is not a multiple of n_head={self.n_head}")
    if self.afrac is not None:
      _fraction("model", "afrac", self.afrac)
    if self.rope and self.d_head % 2:
      _fail("model.rope", f"needs an even d_head (rotated in pairs), got d_head={self.d_head}")
    object.__setattr__(self, "afrac_loctypes", tuple(self.afrac_loctypes))
    for loc in self.afrac_loctypes:
      if loc not in LOCTYPES:
        _fail("model.afrac_loctypes", f"unknown loctype {loc!r}; known: {', '.join(LOCTYPES)}")
    if self.activation_type not in ("gelu", "relu"):
      _fail("model.activation_type", f"must be 'gelu' or 'relu', got {self.activation_type!r}")
    if self.matmul_dtype not in MATMUL_DTYPES:
      names = " or ".join(repr(d) for d in MATMUL_DTYPES)
      _fail("model.matmul_dtype", f"must be {names}, got {self.matmul_dtype!r}")

  @property
  def d_attn(self) -> int:
    """Width of the concatenated q (or k, or v) vector: n_head * d_head."""
    return self.n_head * self.d_head


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
  """Weight sparsity (PAPER.md §2): exact per-matrix L0, annealed dense -> target."""

  enabled: bool = True  # False trains the dense baseline with the same optimiser
  weight_density: float = 1 / 16  # final fraction of nonzeros in each c_attn/c_proj/c_fc matrix
  embed_density: float = 1 / 4  # final fraction for wte, wpe, lm_head (and biases, see below)
  sparsify_biases: bool = True  # paper: biases are sparse too (authors' script: they are not)
  anneal_start_frac: float = 0.01  # fraction of training at which the L0 starts to fall
  anneal_end_frac: float = 0.5  # fraction of training at which the L0 reaches its target
  min_per_neuron: int = 4  # nonzeros protected per neuron / attention channel (paper j=4);
  # a density whose final k cannot give every neuron this many is an error naming the matrix

  def __post_init__(self):
    _fraction("sparsity", "weight_density", self.weight_density)
    _fraction("sparsity", "embed_density", self.embed_density)
    _fraction("sparsity", "anneal_start_frac", self.anneal_start_frac, allow_zero=True)
    _fraction("sparsity", "anneal_end_frac", self.anneal_end_frac, allow_zero=True)
    if self.anneal_end_frac < self.anneal_start_frac:
      _fail("sparsity.anneal_end_frac",
            f"{self.anneal_end_frac} is before anneal_start_frac={self.anneal_start_frac}")
    if isinstance(self.min_per_neuron, bool) or not isinstance(self.min_per_neuron, int) \
        or self.min_per_neuron < 0:
      _fail("sparsity.min_per_neuron", f"must be an integer >= 0, got {self.min_per_neuron!r}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The paper's optimiser (PAPER.md §2): normalised grads, Adam, sharkfin LR, AdamW decay."""

  lr: float = 1e-2  # peak learning rate (authors' script: 1.28e-2)
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 0.1  # large on purpose (paper)
  weight_decay: float = 0.1  # decoupled; on matrices and embeddings (authors' script)
  decay_biases: bool = False  # also decay biases (the authors' script does not)
  warmup_frac: float = 0.01  # linear warmup, then linear decay to 0
  grad_rms_normalize: bool = True  # divide grads by their global RMS (paper: essential)
  sharkfin: bool = True  # multiply LR by sqrt(L0_final / L0_now) while annealing
  sharkfin_l0: str = "matrix"  # whose L0: "matrix" (authors' script) or "all" sparsified params

  def __post_init__(self):
    for name in ("lr", "eps"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        _fail(f"optim.{name}", f"must be a positive finite number, got {value!r}")
    for name in ("b1", "b2"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0 <= value < 1:
        _fail(f"optim.{name}", f"must be in [0, 1), got {value!r}")
    if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
      _fail("optim.weight_decay", f"must be >= 0, got {self.weight_decay!r}")
    _fraction("optim", "warmup_frac", self.warmup_frac, allow_zero=True)
    if self.sharkfin_l0 not in ("matrix", "all"):
      _fail("optim.sharkfin_l0", f"must be 'matrix' or 'all', got {self.sharkfin_l0!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from."""

  corpus: str = "stdlib"  # "stdlib", "simple" (generated), a .py directory, a .jsonl or text file
  text_field: str = "text"  # field read from each .jsonl line
  # Extra sources mixed in, as "path_or_name:weight" strings, e.g. "simple:0.5" adds the
  # generated everyday-Python corpus (issue 6) so that it makes up half the token stream.
  mixture: tuple[str, ...] = ()
  val_frac: float = 0.02  # fraction of files (by stable path hash) held out for validation
  max_files: int | None = None  # cap on documents per source (first N sorted), for quick runs
  cache_dir: str | None = None  # tokenizer/token cache; default ~/.cache/sparse_jax

  def __post_init__(self):
    if not isinstance(self.corpus, str) or not self.corpus:
      _fail("data.corpus", f"must be a non-empty string, got {self.corpus!r}")
    object.__setattr__(self, "mixture", tuple(self.mixture))
    _fraction("data", "val_frac", self.val_frac)
    if self.val_frac >= 1:
      _fail("data.val_frac", "must leave some files for training (< 1)")
    if self.max_files is not None:
      _positive_int("data", self, "max_files")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training loop cadence."""

  steps: int = 1000
  batch_size: int = 16  # global batch (sequences); must divide over the devices
  seq_len: int = 128  # tokens per training sequence (<= model.block_size)
  seed: int = 0
  eval_every: int = 100  # validation loss (and task metrics) every N steps
  eval_batches: int = 4  # validation batches per evaluation
  log_every: int = 10  # metrics line every N steps
  ckpt_every: int = 500  # periodic checkpoint every N steps
  max_to_keep: int = 2  # periodic checkpoints kept (log-spaced ones are never deleted)
  n_log_ckpts: int = 0  # number of log-spaced checkpoints kept forever (training dynamics)
  task_eval_pairs: int = 16  # held-out pairs per task evaluated at each validation; 0 = off

  def __post_init__(self):
    _positive_int("train", self, "steps", "batch_size", "seq_len", "eval_every",
                  "eval_batches", "log_every", "ckpt_every", "max_to_keep")
    for name in ("n_log_ckpts", "task_eval_pairs"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(f"train.{name}", f"must be an integer >= 0, got {value!r}")
    if not isinstance(self.seed, int):
      _fail("train.seed", f"must be an integer, got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class CircuitConfig:
  """Node-mask circuit search (PAPER.md §4). Defaults are Table 2's CARBS centres."""

  k_coef: float = 1e-4  # penalty per kept node
  k_coef_grid: tuple[float, ...] = ()  # if set, search every value per task and keep the best
  init_noise_scale: float = 1e-2
  init_noise_bias: float = 1e-1
  weight_decay: float = 1e-3
  lr: float = 3e-3
  b2: float = 0.95  # Table 2: inv_beta2 = 0.05
  warmup_frac: float = 0.05
  heaviside_temp: float = 1.0  # temperature of the sigmoid-derivative surrogate
  steps: int = 500  # mask-training steps
  batch_size: int = 32  # task pairs per step
  # Mask training splits each task's train pairs by length into this many equal strata and
  # draws batch_size / strata pairs from each (an unbiased minibatch; each stratum is padded
  # only to its own longest pair). 1: uniform draws over all pairs, as the paper.
  train_length_strata: int = 1
  # Task loss the discretised circuit must reach: the per-sequence mean contrast loss (half
  # the authors' stored pair sum, so 0.15 here is 0.30 in their reading; PAPER.md §4).
  target_loss: float = 0.15
  extra_targets: tuple[float, ...] = ()  # also bisect at these (circuit size vs target curve)
  lbfgs_steps: int = 16  # logit scale+shift calibration steps
  mean_batches: int = 8  # pretraining batches averaged for the mean-ablation values
  # Three disjoint splits of each task's pairs: mask training; selection (the bisection of
  # k, the k_coef choice and the logit scale+shift fit); and an untouched test split on which
  # the reported losses, sufficiency and necessity are measured.
  n_train_pairs: int = 256
  n_select_pairs: int = 64
  n_heldout_pairs: int = 64  # the test split
  calibrate: bool = True  # bisect on the loss after the logit scale+shift fit (PAPER.md §4)
  # The bisection's k must meet the target by this many standard errors of its selection
  # loss (over the selection pairs), so that the chosen circuit's test loss is not a coin
  # toss around the target (docs/measurement.md §6). 0: exactly the target, as the paper.
  select_margin_se: float = 2.0
  bisect_candidates: int = 8  # k values evaluated per task per bisection round
  eval_max_seqs: int = 1024  # sequences per batched evaluation call (bounds memory)
  # Evaluation groups each split's pairs by length into this many groups, each padded only to
  # its own longest sequence (exact; 1 pads every pair to the longest of all tasks).
  eval_length_groups: int = 8
  seed: int = 0

  def __post_init__(self):
    for name in ("lr", "heaviside_temp", "target_loss"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or not 0 < value < math.inf:
        _fail(f"circuit.{name}", f"must be finite and > 0, got {value!r}")
    object.__setattr__(self, "k_coef_grid", tuple(self.k_coef_grid))
    object.__setattr__(self, "extra_targets", tuple(self.extra_targets))
    for value in self.extra_targets:
      if not isinstance(value, (int, float)) or not 0 < value < math.inf:
        _fail("circuit.extra_targets", f"must be finite and > 0, got {value!r}")
    for value in (self.k_coef, *self.k_coef_grid):
      if not isinstance(value, (int, float)) or value < 0:
        _fail("circuit.k_coef", f"must be >= 0, got {value!r}")
    _positive_int("circuit", self, "steps", "batch_size", "mean_batches", "n_train_pairs",
                  "n_select_pairs", "n_heldout_pairs", "bisect_candidates", "eval_max_seqs",
                  "eval_length_groups", "train_length_strata")
    for name in ("batch_size", "n_train_pairs"):
      if getattr(self, name) % self.train_length_strata:
        _fail("circuit.train_length_strata", f"must divide circuit.{name}="
              f"{getattr(self, name)}, got {self.train_length_strata}")
    _fraction("circuit", "warmup_frac", self.warmup_frac, allow_zero=True)
    if not isinstance(self.calibrate, bool):
      _fail("circuit.calibrate", f"must be true or false, got {self.calibrate!r}")
    margin = self.select_margin_se
    if (isinstance(margin, bool) or not isinstance(margin, (int, float))
        or not 0 <= margin < math.inf):
      _fail("circuit.select_margin_se", f"must be finite and >= 0, got {margin!r}")
    if not 0 <= self.b2 < 1:
      _fail("circuit.b2", f"must be in [0, 1), got {self.b2!r}")


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: every section, validated together."""

  model: ModelConfig = ModelConfig()
  sparsity: SparsityConfig = SparsityConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  circuit: CircuitConfig = CircuitConfig()

  def __post_init__(self):
    # No setting has a use for nan or inf (a target loss of inf is met by any circuit).
    for section in dataclasses.fields(self):
      for f in dataclasses.fields(getattr(self, section.name)):
        value = getattr(getattr(self, section.name), f.name)
        for v in value if isinstance(value, tuple) else (value,):
          if isinstance(v, float) and not math.isfinite(v):
            _fail(f"{section.name}.{f.name}", f"must be finite, got {v!r}")
    if self.train.seq_len > self.model.block_size:
      _fail("train.seq_len", f"{self.train.seq_len} exceeds model.block_size="
            f"{self.model.block_size}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """Builds a Config from a (possibly partial) nested dict; unknown keys are errors."""
    if not isinstance(d, dict):
      raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
    sections = {}
    for f in dataclasses.fields(cls):
      sub = d.get(f.name, {})
      if not isinstance(sub, dict):
        _fail(f.name, f"expected an object, got {sub!r}")
      sections[f.name] = _build_section(_SECTIONS[f.name], f.name, sub)
    unknown = set(d) - set(sections)
    if unknown:
      _fail(sorted(unknown)[0], f"unknown config section; known: {', '.join(_SECTIONS)}")
    return cls(**sections)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    return cls.from_dict(json.loads(text))


_SECTIONS = {"model": ModelConfig, "sparsity": SparsityConfig, "optim": OptimConfig,
             "data": DataConfig, "train": TrainConfig, "circuit": CircuitConfig}


def _build_section(section_cls, name: str, d: dict[str, Any]):
  fields = {f.name for f in dataclasses.fields(section_cls)}
  unknown = set(d) - fields
  if unknown:
    _fail(f"{name}.{sorted(unknown)[0]}", f"unknown field; known: {', '.join(sorted(fields))}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
  return section_cls(**kwargs)


def _parse_value(field_type: Any, text: str, where: str) -> Any:
  """Parses a CLI string into the type annotated on a config field."""
  hints = typing.get_args(field_type) if isinstance(field_type, types.UnionType) else ()
  if text.lower() in ("none", "null") and type(None) in hints:
    return None
  base = next((h for h in hints if h is not type(None)), field_type)
  origin = typing.get_origin(base)
  try:
    if origin is tuple:
      (item_type, *_) = typing.get_args(base)
      return tuple(_parse_value(item_type, t, where) for t in text.split(",") if t)
    if base is bool:
      if text.lower() in ("1", "true", "yes"):
        return True
      if text.lower() in ("0", "false", "no"):
        return False
      raise ValueError(text)
    if base is int:
      return int(text)
    if base is float:
      return float(eval_fraction(text))
    return text
  except ValueError:
    raise ValueError(f"{where}: cannot parse {text!r} as {base}") from None


def parse_field_overrides(cls: type, prefix: str, overrides: Sequence[str],
                          exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """{field: value} from `prefix.field=value` items (a CLI's --set), typed by cls's fields."""
  hints = {k: v for k, v in typing.get_type_hints(cls).items() if k not in exclude}
  out = {}
  for item in overrides:
    key, _, text = item.partition("=")
    field = key[len(prefix) + 1:]
    if field not in hints:
      raise ValueError(f"{key}: unknown field; known: {', '.join(sorted(hints))}")
    out[field] = _parse_value(hints[field], text, key)
  return out


def eval_fraction(text: str) -> float:
  """Parses '0.25', '1/16' or '1e-3'."""
  if "/" in text:
    num, den = text.split("/", 1)
    return float(num) / float(den)
  return float(text)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
  """Returns cfg with `section.field=value` overrides applied (the CLI's --set)."""
  d = cfg.to_dict()
  for item in overrides:
    if "=" not in item or "." not in item.split("=", 1)[0]:
      raise ValueError(f"--set {item!r}: expected section.field=value, e.g. model.d_model=128")
    key, text = item.split("=", 1)
    section, field = key.split(".", 1)
    if section not in _SECTIONS:
      _fail(section, f"unknown config section; known: {', '.join(_SECTIONS)}")
    hints = typing.get_type_hints(_SECTIONS[section])
    if field not in hints:
      _fail(key, f"unknown field; known: {', '.join(sorted(hints))}")
    d[section][field] = _parse_value(hints[field], text, key)
  return Config.from_dict(d)


def diff_configs(a: Config, b: Config) -> list[str]:
  """Lists `section.field: a -> b` for every field that differs."""
  out = []
  da, db = a.to_dict(), b.to_dict()
  for section in _SECTIONS:
    for field in da[section]:
      if da[section][field] != db[section][field]:
        out.append(f"{section}.{field}: {da[section][field]!r} -> {db[section][field]!r}")
  return out
