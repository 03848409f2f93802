"""The authors' release format in and out: `beeg_config.json` + `final_model.pt`, and their
tiktoken-format tokenizer (PAPER.md §1, §7).

`read_model(dir)` gives `(ModelConfig, params, beeg)` and `write_model(dir, cfg, params, beeg)`
writes the same format back; `beeg` is their config dict, kept so that fields with no
counterpart here (`tokenizer_name`, `dropout`, `learnable_bigram_table`, ...) survive a round
trip unchanged. Their `GPTConfig` maps onto `ModelConfig` field by field; what we do not
implement (LayerNorm, `bias=False`, concatenated or sinusoidal positions, a ReLU residual
activation, other activations or AbsTopK sites) is refused with an error naming the field,
never approximated.

Weights: torch Linear weights are [out, in]; ours are [in, out], so each is transposed.
`tied_unembed` (their default) means lm_head = wte^T: we store the copy, and write one shared
storage back when the two are still bitwise equal. Their `wpe` and `final_logits_bias` always
exist; the released models keep both zero, read as "off" (no learned positions, no bias), and a
nonzero one turns the matching `ModelConfig` flag on. The bigram table is in the state dict
whether or not it is learnable (a buffer when not); the forward is the same either way.

The tokenizer is tiktoken's mergeable ranks, from a tiktoken file (one
`base64(token bytes) rank` per line) or from the GPT-2 style `vocab.bpe` + `encoder.json`
pair the authors publish (their tiktoken plugin reads those). It becomes a byte-level HF BPE
with the tinypython pre-tokenizer whose merges reproduce tiktoken's rank order, with
`<|endoftext|>` appended after the last rank (id 2047 for tinypython_2k).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, models

from sparse_jax import data
from sparse_jax.config import LOCTYPES, ModelConfig
from sparse_jax.fileio import atomic_write_text
from sparse_jax.torch_format import read_state_dict, write_state_dict

CONFIG_FILE = "beeg_config.json"
WEIGHTS_FILE = "final_model.pt"

# Their GPTConfig defaults [G]; used for fields a config file leaves out, and as the starting
# point when exporting a model that was not imported.
GPT_CONFIG_DEFAULTS: dict[str, Any] = {
    "block_size": 1024, "vocab_size": 50304, "n_layer": 12, "n_head": 12, "d_head": None,
    "d_model": 768, "dropout": 0.0, "bias": True, "ln_bias": True, "rms_norm": False,
    "residual_activation_type": "identity", "activation_type": "gelu", "afrac": None,
    "afrac_loctypes": "attn_in,attn_out,mlp_in,mlp_out", "debug_nans": False,
    "tied_unembed": True, "tokenizer_name": "tinypython_2k", "d_mlp": None,
    "enable_bigram_table": False, "learnable_bigram_table": False, "d_pos_emb": None,
    "dropout_cat_pos_emb": False, "sinusoidal_cat_pos_emb": False,
    "enable_sparse_kernels": False, "sink": False,
}
# Runtime switches of some versions of their GPTConfig: accepted when read, never written
# (the released beeg_config.json files do not have them).
_RUNTIME_ONLY = {"grad_checkpointing": True, "flash": True}
# Fields that must have exactly these values: anything else is a model we do not implement.
_REQUIRED = {"rms_norm": (True, "only RMSNorm is implemented, not LayerNorm"),
             "bias": (True, "only models with biases (bias=true) are implemented"),
             "residual_activation_type": ("identity", "only the identity residual is implemented"),
             "d_pos_emb": (None, "concatenated positional embeddings are not implemented"),
             "sinusoidal_cat_pos_emb": (False, "sinusoidal positions are not implemented"),
             "dropout_cat_pos_emb": (False, "concatenated positional embeddings are not "
                                     "implemented")}


def _fail(where: Any, field: str, msg: str):
  raise ValueError(f"{where}: {field}: {msg}")


def model_config_from_beeg(beeg: dict[str, Any], *, learned_pos_emb: bool = False,
                           final_logits_bias: bool = False, where: Any = CONFIG_FILE
                           ) -> ModelConfig:
  """Their GPTConfig dict -> ModelConfig; refuses what we do not implement, naming the field."""
  unknown = sorted(set(beeg) - set(GPT_CONFIG_DEFAULTS) - set(_RUNTIME_ONLY))
  if unknown:
    _fail(where, unknown[0], "unknown GPTConfig field; it may change the model, so it is "
          "refused rather than ignored")
  b = {**GPT_CONFIG_DEFAULTS, **beeg}
  for field, (value, why) in _REQUIRED.items():
    if b[field] != value:
      _fail(where, field, f"{b[field]!r} is not supported ({why})")
  if b["activation_type"] not in ("gelu", "relu"):
    _fail(where, "activation_type", f"{b['activation_type']!r} is not supported (gelu, relu)")
  loctypes = tuple(t for t in str(b["afrac_loctypes"]).split(",") if t)
  bad = [t for t in loctypes if t not in LOCTYPES]
  if bad:
    _fail(where, "afrac_loctypes", f"AbsTopK at {bad} is not implemented; known: "
          f"{', '.join(LOCTYPES)}")
  d_head = b["d_head"] if b["d_head"] is not None else b["d_model"] // b["n_head"]
  d_mlp = b["d_mlp"] if b["d_mlp"] is not None else 4 * b["d_model"]
  try:
    return ModelConfig(
        n_layer=b["n_layer"], d_model=b["d_model"], n_head=b["n_head"], d_head=d_head,
        d_mlp=d_mlp, vocab_size=b["vocab_size"], block_size=b["block_size"], afrac=b["afrac"],
        afrac_loctypes=loctypes, sink=b["sink"], enable_bigram_table=b["enable_bigram_table"],
        learned_pos_emb=learned_pos_emb, activation_type=b["activation_type"],
        final_logits_bias=final_logits_bias)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def beeg_from_model_config(cfg: ModelConfig, params: dict[str, Any],
                           beeg: dict[str, Any] | None = None) -> dict[str, Any]:
  """ModelConfig -> their GPTConfig dict, keeping `beeg`'s fields that we do not model."""
  for field, what in (("rope", "rotary positions"), ("smear_keys", "smeared keys")):
    if getattr(cfg, field):
      raise ValueError(f"model.{field}: the authors' GPT has no {what}, so a model trained "
                       "with them cannot be written in their format")
  # A model trained here: our table is learned, lm_head untied, and the tokenizer is the run's
  # own BPE (export_model copies its tokenizer.json), not one of their named ones.
  out = dict(beeg) if beeg is not None else {
      **GPT_CONFIG_DEFAULTS, "tied_unembed": False, "learnable_bigram_table": True,
      "tokenizer_name": None, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp}
  implied = lambda field, value, default: (  # keep their None where it means the same value
      None if out.get(field, "absent") is None and value == default else value)
  out.update(
      n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head,
      d_head=implied("d_head", cfg.d_head, cfg.d_model // cfg.n_head),
      d_mlp=implied("d_mlp", cfg.d_mlp, 4 * cfg.d_model), vocab_size=cfg.vocab_size,
      block_size=cfg.block_size, afrac=cfg.afrac, afrac_loctypes=",".join(cfg.afrac_loctypes),
      sink=cfg.sink, enable_bigram_table=cfg.enable_bigram_table,
      activation_type=cfg.activation_type, rms_norm=True, bias=True,
      residual_activation_type="identity", d_pos_emb=None, sinusoidal_cat_pos_emb=False,
      dropout_cat_pos_emb=False,
      tied_unembed=bool(out.get("tied_unembed")) and _tied(params))
  return out


def _tied(params) -> bool:
  wte, lm_head = np.asarray(params["wte"]), np.asarray(params["lm_head"]["w"])
  return wte.shape == lm_head.T.shape and \
      wte.tobytes() == np.ascontiguousarray(lm_head.T).tobytes()


def _all_zero_bits(x: np.ndarray) -> bool:
  # Bitwise, not x == 0: a -0.0 entry must survive the round trip, so it counts as nonzero.
  return not np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8).any()


def _linear(sd, name: str) -> dict[str, np.ndarray]:
  return {"w": np.ascontiguousarray(sd[f"{name}.weight"].T), "b": sd[f"{name}.bias"]}


def read_model(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any], dict]:
  """Reads a model directory in the authors' format.

  Returns:
    (ModelConfig, params as numpy float32 arrays, their config dict as read).

  Raises:
    ValueError: naming the file and field (config) or key (weights) that is wrong.
  """
  directory = Path(directory)
  cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
  for path in (cfg_path, weights_path):
    if not path.is_file():
      raise ValueError(f"{directory}: no {path.name}; expected the authors' model directory "
                       f"({CONFIG_FILE} + {WEIGHTS_FILE})")
  try:
    beeg = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: not JSON ({e})") from None
  if not isinstance(beeg, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object")
  cfg = model_config_from_beeg(beeg, where=cfg_path)  # refuse early, before reading weights
  sd = {k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v)
        for k, v in read_state_dict(weights_path).items()}
  cfg = model_config_from_beeg(
      beeg, where=cfg_path,
      learned_pos_emb=not _all_zero_bits(sd.get("transformer.wpe.weight", np.zeros(0))),
      final_logits_bias=not _all_zero_bits(sd.get("final_logits_bias", np.zeros(0))))
  expected = _expected_shapes(cfg)
  for key in sorted(set(sd) | set(expected)):
    if key not in sd:
      raise ValueError(f"{weights_path}: missing {key}")
    if key not in expected:
      raise ValueError(f"{weights_path}: unexpected {key} (not part of a model with "
                       f"{CONFIG_FILE}'s settings)")
    if sd[key].shape != expected[key]:
      raise ValueError(f"{weights_path}: {key} has shape {sd[key].shape}, expected "
                       f"{expected[key]} from {CONFIG_FILE}")
  return cfg, _params_from_state_dict(sd, cfg), beeg


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  D, A, F, V = cfg.d_model, cfg.d_attn, cfg.d_mlp, cfg.vocab_size
  shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (cfg.block_size, D),
            "transformer.ln_f.weight": (D,), "lm_head.weight": (V, D),
            "final_logits_bias": (V,)}
  if cfg.enable_bigram_table:
    shapes["bigram_table"] = (V, V)
  for i in range(cfg.n_layer):
    h = f"transformer.h.{i}."
    shapes.update({
        h + "ln_1.weight": (D,), h + "attn.c_attn.weight": (3 * A, D),
        h + "attn.c_attn.bias": (3 * A,), h + "attn.c_proj.weight": (D, A),
        h + "attn.c_proj.bias": (D,), h + "ln_2.weight": (D,),
        h + "mlp.c_fc.weight": (F, D), h + "mlp.c_fc.bias": (F,),
        h + "mlp.c_proj.weight": (D, F), h + "mlp.c_proj.bias": (D,)})
    if cfg.sink:
      shapes[h + "attn.attn_imp.sink_logit"] = (cfg.n_head,)
  return shapes


def _params_from_state_dict(sd, cfg: ModelConfig) -> dict[str, Any]:
  blocks = {}
  for i in range(cfg.n_layer):
    h = f"transformer.h.{i}."
    attn = {"c_attn": _linear(sd, h + "attn.c_attn"), "c_proj": _linear(sd, h + "attn.c_proj")}
    if cfg.sink:
      attn["sink"] = sd[h + "attn.attn_imp.sink_logit"]
    blocks[str(i)] = {"ln_1": {"scale": sd[h + "ln_1.weight"]}, "attn": attn,
                      "ln_2": {"scale": sd[h + "ln_2.weight"]},
                      "mlp": {"c_fc": _linear(sd, h + "mlp.c_fc"),
                              "c_proj": _linear(sd, h + "mlp.c_proj")}}
  params = {"wte": sd["transformer.wte.weight"], "blocks": blocks,
            "ln_f": {"scale": sd["transformer.ln_f.weight"]},
            "lm_head": {"w": np.ascontiguousarray(sd["lm_head.weight"].T)}}
  if cfg.learned_pos_emb:
    params["wpe"] = sd["transformer.wpe.weight"]
  if cfg.final_logits_bias:
    params["final_logits_bias"] = sd["final_logits_bias"]
  if cfg.enable_bigram_table:
    params["bigram"] = sd["bigram_table"]
  return params


def state_dict_from_params(cfg: ModelConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
  """Our params -> their state dict (names, [out, in] weights, zero wpe/bias when off)."""
  p = params
  f32 = lambda x: np.asarray(x, np.float32)
  t = lambda x: np.ascontiguousarray(f32(x).T)
  sd = {}
  if cfg.enable_bigram_table:
    sd["bigram_table"] = f32(p["bigram"])
  sd["final_logits_bias"] = f32(p["final_logits_bias"]) if cfg.final_logits_bias \
      else np.zeros(cfg.vocab_size, np.float32)
  sd["transformer.wte.weight"] = f32(p["wte"])
  sd["transformer.wpe.weight"] = f32(p["wpe"]) if cfg.learned_pos_emb \
      else np.zeros((cfg.block_size, cfg.d_model), np.float32)
  for i in range(cfg.n_layer):
    b, h = p["blocks"][str(i)], f"transformer.h.{i}."
    sd[h + "ln_1.weight"] = f32(b["ln_1"]["scale"])
    for name in ("c_attn", "c_proj"):
      sd[h + f"attn.{name}.weight"] = t(b["attn"][name]["w"])
      sd[h + f"attn.{name}.bias"] = f32(b["attn"][name]["b"])
    if cfg.sink:
      sd[h + "attn.attn_imp.sink_logit"] = f32(b["attn"]["sink"])
    sd[h + "ln_2.weight"] = f32(b["ln_2"]["scale"])
    for name in ("c_fc", "c_proj"):
      sd[h + f"mlp.{name}.weight"] = t(b["mlp"][name]["w"])
      sd[h + f"mlp.{name}.bias"] = f32(b["mlp"][name]["b"])
  sd["transformer.ln_f.weight"] = f32(p["ln_f"]["scale"])
  sd["lm_head.weight"] = t(p["lm_head"]["w"])
  return sd


def write_model(directory: str | os.PathLike, cfg: ModelConfig, params: dict[str, Any],
                beeg: dict[str, Any] | None = None) -> Path:
  """Writes cfg + params in the authors' format (both files atomically); returns directory.

  Args:
    beeg: the config dict the model was imported with, if any: fields we do not model are
      copied from it, so an imported model exports to the same config.
  """
  out = beeg_from_model_config(cfg, params, beeg)  # refuses what their format cannot hold
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  shared = {"lm_head.weight": "transformer.wte.weight"} if out["tied_unembed"] else None
  sd = state_dict_from_params(cfg, params)
  if not out["learnable_bigram_table"] and "bigram_table" in sd:
    # torch lists parameters before buffers: a buffer table comes after final_logits_bias.
    sd = {"final_logits_bias": sd.pop("final_logits_bias"), **sd}
  write_state_dict(directory / WEIGHTS_FILE, sd, shared)
  atomic_write_text(directory / CONFIG_FILE, json.dumps(out))
  return directory


# Tokenizer -------------------------------------------------------------------------------------


def _byte_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table, which HF's ByteLevel pre-tokenizer uses."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
  """Parses a tiktoken BPE file ("base64 rank" per line); errors name the line."""
  path = Path(path)
  ranks: dict[bytes, int] = {}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError("expected 'base64token rank'")
      token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
    except ValueError as e:
      raise ValueError(f"{path}:{n}: not a tiktoken line ({e}): {line[:60]!r}") from None
    if token in ranks:
      raise ValueError(f"{path}:{n}: token {token!r} appears twice")
    ranks[token] = rank
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{path}: ranks must be 0..{len(ranks) - 1}, each once")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(f"{path}: not a byte-level BPE: single bytes {missing[:8]} have no rank")
  return ranks


def read_data_gym_ranks(directory: str | os.PathLike) -> dict[bytes, int]:
  """tiktoken's ranks from the GPT-2 style pair the authors publish (`tinypython/`:
  `vocab.bpe` + `encoder.json`), as `tiktoken.load.data_gym_to_mergeable_bpe_ranks` builds
  them: the 256 bytes first (printable ones in byte order, then the rest), then one rank per
  merge line in file order; encoder.json must agree with every rank.
  """
  directory = Path(directory)
  u2b = {u: b for b, u in _byte_to_unicode().items()}
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  byte_order = printable + [b for b in range(256) if b not in printable]
  ranks = {bytes([b]): r for r, b in enumerate(byte_order)}
  decode = lambda text: bytes(u2b[c] for c in text)
  path = directory / "vocab.bpe"
  lines, next_rank = path.read_text(encoding="utf-8").split("\n"), len(ranks)
  for n, line in enumerate(lines[1:], 2):  # line 1 is the "#version" header
    if not line:
      continue
    parts = line.split(" ")
    try:
      if len(parts) != 2:
        raise KeyError("expected two space-separated pieces")
      token = decode(parts[0]) + decode(parts[1])
    except KeyError as e:
      raise ValueError(f"{path}:{n}: not a merge line ({e}): {line[:60]!r}") from None
    ranks[token] = next_rank  # as tiktoken: a repeated merge result takes the later rank
    next_rank += 1
  path = directory / "encoder.json"
  encoder = json.loads(path.read_text(encoding="utf-8"))
  for text, rank in encoder.items():
    if text in ("<|endoftext|>", "<|startoftext|>"):
      continue
    if ranks.get(decode(text)) != rank:
      raise ValueError(f"{path}: {text!r} has id {rank}, but vocab.bpe gives it "
                       f"{ranks.get(decode(text))}")
  return ranks


def load_authors_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A tiktoken-format file, or a directory holding the authors' vocab.bpe + encoder.json."""
  path = Path(path)
  if path.is_dir():
    if not (path / "vocab.bpe").is_file() or not (path / "encoder.json").is_file():
      raise ValueError(f"{path}: expected vocab.bpe and encoder.json in this directory")
    return tokenizer_from_ranks(read_data_gym_ranks(path))
  return tokenizer_from_ranks(read_tiktoken_ranks(path))


def tokenizer_from_tiktoken(path: str | os.PathLike) -> Tokenizer:
  """The authors' tiktoken-format BPE file as an HF Tokenizer with the same token ids."""
  return tokenizer_from_ranks(read_tiktoken_ranks(path))


def tokenizer_from_ranks(ranks: dict[bytes, int]) -> Tokenizer:
  """tiktoken mergeable ranks (token bytes -> id) as an HF Tokenizer with the same token ids.

  tiktoken merges, within each pre-token, the adjacent pair whose concatenation has the
  lowest rank, and takes a pre-token that is itself a token whole. The HF BPE gets one merge
  per (left, right) split of every multi-byte token, ordered by the merged token's rank
  (`ignore_merges` gives the whole-pre-token shortcut), which yields the same ids.
  """
  b2u = _byte_to_unicode()
  text = lambda token: "".join(b2u[b] for b in token)
  vocab = {text(token): rank for token, rank in ranks.items()}
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
    splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
              if token[:i] in ranks and token[i:] in ranks]
    merges += [(text(token[:i]), text(token[i:])) for _, _, i in sorted(splits)]
  tok = data.new_tokenizer()  # the tinypython pre-tokenizer and byte-level decoder
  tok.model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True)
  tok.add_special_tokens([AddedToken(data.EOT, special=True)])  # id len(ranks), i.e. 2047
  tok.encode_special_tokens = True  # as data.load_tokenizer: text "<|endoftext|>" is not EOT
  return tok
