"""Bridges: read a dense model through a weight-sparse one (PAPER.md §5; paper §3.3, Fig 9).

A bridge sits at every sublayer j (before each attention and each MLP: j = 2 * layer for
attention, 2 * layer + 1 for the MLP, named "LAYER.attn" / "LAYER.mlp") and maps between the
two models' pre-RMSNorm residuals there (h^d_j of width Dd, h^s_j of width Ds):
  encoder f_j(h^d) = rho^s_j * AbsTopK((h^d / rho^d_j) @ enc_w[j] + enc_b[j])   dense -> sparse
  decoder g_j(h^s) = rho^d_j * ((h^s / rho^s_j) @ dec_w[j] + dec_b[j])          sparse -> dense
rho^d_j, rho^s_j are fixed scalars: each model's mean per-token residual RMS at j on a
reference batch, measured when the bridges are initialised (the dense model is frozen, so its
rho is exact throughout; the sparse model's is its value at initialisation). They are why
the bridges can learn at all: at `cpu` scale the dense residual is ~800x the sparse one at
layer 1, so unscaled maps need weights of ~1e-3 (encoder) and ~50 (decoder), and Adam, which
moves every weight by about the learning rate per step, drowns the first in noise and takes
thousands of steps to grow the second (docs/bridges.md measured both). Scaled, the bridge
weights have the model weights' O(1/sqrt(fan_in)) scale, the maps stay linear (AbsTopK
aside), and the steering scale below, the paper's RMS ratio, is exactly the decoder's.
A sparse model and its bridges are trained together against a frozen dense model (y^d its
next-token distribution) on
  ce      * CE(sparse model)
  + nmse  * sum_j [NMSE(f_j(h^d_j), h^s_j) + NMSE(g_j(h^s_j), h^d_j)]
  + kl_ds * sum_j KL(y^d || sparse model run from sublayer j on f_j(h^d_j))
  + kl_sd * sum_j KL(y^d || dense model run from sublayer j on g_j(h^s_j))
  + kl_full * KL(y^d || sparse model)
The two KL paths are the single-transition "hybrid" models (dense up to j, then sparse; and
sparse up to j, then dense); their cross-entropies are reported as well.

What the paper leaves open (PAPER.md §5), as `BridgeConfig` fields with our defaults: the
coefficients (all 1; the extra whole-model KL(dense || sparse) term is off, kl_full = 0), the
NMSE normaliser ("token": per-token fraction of variance unexplained, ||pred - t||^2 /
||t||^2 with the denominator detached so it cannot be gamed), the encoder's AbsTopK fraction
(1/4, the paper's main afrac; 1 disables it) and the bridge init (N(0, 1/fan_in)). The dense
model is always frozen: it is passed to the loss as a fixed input, never trained.

Params: the sparse model's params dict plus "bridges" = {"enc": {"w" [S,Dd,Ds], "b" [S,Ds]},
"dec": {"w" [S,Ds,Dd], "b" [S,Dd]}, "rms": {"dense" [S], "sparse" [S]}} (S = 2 n_layer), so `checkpoint.load_params` reads a
bridge run's sparse model like any run's, `model.forward` ignores the bridges, and the
project's optax chain trains both (sparsity.RULES: bridge maps are dense and weight-decayed, the
rho constants are read through stop_gradient and never decayed, so they never move; the model
keeps its exact-L0 projection).

Steering (Fig 9, A.4): for the sparse residual channel c read at sublayer j (by
"LAYER.attn.act_in" or "LAYER.mlp.act_in"), delta_BxL = h^s_j[c](counterfactual) -
h^s_j[c](presented) at every token; the dense residual at sublayer j gets
  strength * (rho^d_j / rho^s_j) * delta_BxL[..., None] * dec_w[j, c]
which is g_j(h^s + delta e_c) - g_j(h^s): the decoder's image of the channel's change, and
the paper's "outer product with the channel's bridge row, scaled by the ratio of mean
residual RMS (dense/sparse) on a reference set". A set of channels (e.g. every channel a
circuit reads at j) adds the sum of theirs. delta is taken on the pre-norm residual (the
read's input) rather than on the post-norm read: the decoder maps pre-norm residuals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import model as model_lib
from sparse_jax import train as train_lib
from sparse_jax.config import Config, ModelConfig

NMSE_NORMS = ("token", "batch")


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
  """Loss coefficients and the choices the paper leaves open (module docstring)."""

  ce_coef: float = 1.0  # the sparse model's own next-token cross-entropy
  nmse_coef: float = 1.0  # both reconstruction directions, every sublayer
  kl_ds_coef: float = 1.0  # KL(dense || dense-then-sparse hybrid), every sublayer
  kl_sd_coef: float = 1.0  # KL(dense || sparse-then-dense hybrid), every sublayer
  kl_full_coef: float = 0.0  # KL(dense || sparse) on whole models; an optional extra term
  # "token": mean over tokens of ||pred - t||^2 / ||t||^2; "batch": mean ||pred - t||^2 over
  # the summed per-channel variance of t across the batch's tokens. Denominators detached.
  nmse_norm: str = "token"
  enc_afrac: float = 0.25  # fraction of sparse-residual channels the encoder's AbsTopK keeps
  init_std: float | None = None  # bridge weight init std; None = 1/sqrt(fan_in)

  def __post_init__(self):
    for f in ("ce_coef", "nmse_coef", "kl_ds_coef", "kl_sd_coef", "kl_full_coef"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"bridge.{f}: must be a number >= 0, got {v!r}")
    if self.nmse_norm not in NMSE_NORMS:
      raise ValueError(f"bridge.nmse_norm: must be one of {NMSE_NORMS}, got {self.nmse_norm!r}")
    if not isinstance(self.enc_afrac, (int, float)) or not 0 < self.enc_afrac <= 1:
      raise ValueError(f"bridge.enc_afrac: must be in (0, 1], got {self.enc_afrac!r}")
    if self.init_std is not None and not self.init_std > 0:
      raise ValueError(f"bridge.init_std: must be > 0 or None, got {self.init_std!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BridgeConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"bridge.{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
    return cls(**d)


def apply_overrides(bcfg: BridgeConfig, overrides: list[str]) -> BridgeConfig:
  """bcfg with `bridge.field=value` overrides (the CLI's --set) applied."""
  from sparse_jax.config import parse_field_overrides  # the one CLI value parser

  d = dataclasses.asdict(bcfg)
  d.update(parse_field_overrides(BridgeConfig, "bridge", overrides))
  return BridgeConfig.from_dict(d)


def site_name(j: int) -> str:
  return f"{j // 2}.{'attn' if j % 2 == 0 else 'mlp'}"


def check_pair(dense: ModelConfig, sparse: ModelConfig) -> None:
  """The two models must share depth and vocabulary to be bridged."""
  for f in ("n_layer", "vocab_size", "enable_bigram_table"):
    if getattr(dense, f) != getattr(sparse, f):
      raise ValueError(f"model.{f}: the sparse model has {getattr(sparse, f)!r} but the dense "
                       f"model {getattr(dense, f)!r}; bridged models must match")


def init_bridges(dense: ModelConfig, sparse: ModelConfig, bcfg: BridgeConfig,
                 key: jax.Array, rms_dense_S=None, rms_sparse_S=None) -> dict[str, Any]:
  """Fresh bridges; the rho constants default to 1 (unscaled maps)."""
  S, Dd, Ds = model_lib.n_sublayers(sparse), dense.d_model, sparse.d_model
  k_enc, k_dec = jax.random.split(key)
  std_enc = bcfg.init_std or 1 / np.sqrt(Dd)
  std_dec = bcfg.init_std or 1 / np.sqrt(Ds)
  ones = jnp.ones((S,), jnp.float32)
  return {"enc": {"w": std_enc * jax.random.normal(k_enc, (S, Dd, Ds)), "b": jnp.zeros((S, Ds))},
          "dec": {"w": std_dec * jax.random.normal(k_dec, (S, Ds, Dd)), "b": jnp.zeros((S, Dd))},
          "rms": {"dense": ones if rms_dense_S is None else jnp.asarray(rms_dense_S, jnp.float32),
                  "sparse": ones if rms_sparse_S is None else jnp.asarray(rms_sparse_S,
                                                                          jnp.float32)}}


def _rho(bridges, j: int) -> tuple[jax.Array, jax.Array]:
  rms = jax.lax.stop_gradient(bridges["rms"])  # constants: never trained
  return rms["dense"][j], rms["sparse"][j]


def encode(bridges, j: int, h_BxLxDd: jax.Array, bcfg: BridgeConfig) -> jax.Array:
  rho_d, rho_s = _rho(bridges, j)
  x_BxLxDs = (h_BxLxDd / rho_d) @ bridges["enc"]["w"][j] + bridges["enc"]["b"][j]
  return rho_s * model_lib.abs_topk(x_BxLxDs, max(1, int(bcfg.enc_afrac * x_BxLxDs.shape[-1])))


def decode(bridges, j: int, h_BxLxDs: jax.Array) -> jax.Array:
  rho_d, rho_s = _rho(bridges, j)
  return rho_d * ((h_BxLxDs / rho_s) @ bridges["dec"]["w"][j] + bridges["dec"]["b"][j])


def mean_rms_S(params, tokens_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """[S]: the mean over tokens of the per-token RMS of the pre-norm residual at each sublayer."""
  hs, _ = residuals(params, tokens_BxL, cfg)
  return jnp.stack([jnp.mean(jnp.sqrt(jnp.mean(h**2, axis=-1))) for h in hs])


def residuals(params, tokens_BxL: jax.Array, cfg: ModelConfig):
  """([h_j for every sublayer j], logits_BxLxV): the pre-norm residuals and the output."""
  x_BxLxD, hs = model_lib.embed(params, tokens_BxL, cfg), []
  for j in range(model_lib.n_sublayers(cfg)):
    hs.append(x_BxLxD)
    x_BxLxD = model_lib.run_sublayers(params, x_BxLxD, cfg, j, j + 1)
  return hs, model_lib.unembed(params, x_BxLxD, tokens_BxL, cfg)


def run_from(params, h_BxLxD: jax.Array, j: int, tokens_BxL: jax.Array, cfg: ModelConfig):
  """Logits of the model run from sublayer j on the residual h."""
  return model_lib.unembed(params, model_lib.run_sublayers(params, h_BxLxD, cfg, j), tokens_BxL,
                           cfg)


def nmse(pred_BxLxD: jax.Array, target_BxLxD: jax.Array, norm: str) -> jax.Array:
  err_BxL = jnp.sum((pred_BxLxD - target_BxLxD) ** 2, axis=-1)
  if norm == "token":
    den_BxL = jnp.sum(target_BxLxD**2, axis=-1)
    return jnp.mean(err_BxL / jax.lax.stop_gradient(den_BxL + 1e-12))
  den = jnp.sum(jnp.var(target_BxLxD, axis=(0, 1)))
  return jnp.mean(err_BxL) / jax.lax.stop_gradient(den + 1e-12)


def kl(logp_ref_BxLxV: jax.Array, logits_BxLxV: jax.Array) -> jax.Array:
  """Mean over tokens of KL(ref || softmax(logits)), nats."""
  logq_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp_ref_BxLxV) * (logp_ref_BxLxV - logq_BxLxV), axis=-1))


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1))


def bridge_loss(params, dense_params, batch_BxL1: jax.Array, sparse: ModelConfig,
                dense: ModelConfig, bcfg: BridgeConfig) -> tuple[jax.Array, dict[str, Any]]:
  """(total loss, metrics): every term of the module docstring, per sublayer and summed.

  Metrics: ce_sparse, ce_dense, kl_full, and per sublayer "bridge/SITE/{nmse_enc, nmse_dec,
  kl_ds, kl_sd, ce_ds, ce_sd}" (ce_ds: the hybrid dense up to SITE, sparse after; ce_sd: the
  reverse), plus the summed terms nmse, kl_ds, kl_sd.
  """
  tokens_BxL, targets_BxL = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  dense_params = jax.lax.stop_gradient(dense_params)  # frozen
  hd, logits_d = residuals(dense_params, tokens_BxL, dense)
  hs, logits_s = residuals(params, tokens_BxL, sparse)
  logp_d = jax.nn.log_softmax(logits_d, axis=-1)
  m = {"ce_sparse": cross_entropy(logits_s, targets_BxL),
       "ce_dense": cross_entropy(logits_d, targets_BxL), "kl_full": kl(logp_d, logits_s)}
  sums = {"nmse": 0.0, "kl_ds": 0.0, "kl_sd": 0.0}
  for j in range(model_lib.n_sublayers(sparse)):
    enc, dec = encode(params["bridges"], j, hd[j], bcfg), decode(params["bridges"], j, hs[j])
    logits_ds = run_from(params, enc, j, tokens_BxL, sparse)
    logits_sd = run_from(dense_params, dec, j, tokens_BxL, dense)
    site = {"nmse_enc": nmse(enc, hs[j], bcfg.nmse_norm),
            "nmse_dec": nmse(dec, hd[j], bcfg.nmse_norm),
            "kl_ds": kl(logp_d, logits_ds), "kl_sd": kl(logp_d, logits_sd),
            "ce_ds": cross_entropy(logits_ds, targets_BxL),
            "ce_sd": cross_entropy(logits_sd, targets_BxL)}
    m.update({f"bridge/{site_name(j)}/{k}": v for k, v in site.items()})
    sums["nmse"] += site["nmse_enc"] + site["nmse_dec"]
    sums["kl_ds"] += site["kl_ds"]
    sums["kl_sd"] += site["kl_sd"]
  m.update(sums)
  loss = (bcfg.ce_coef * m["ce_sparse"] + bcfg.nmse_coef * sums["nmse"]
          + bcfg.kl_ds_coef * sums["kl_ds"] + bcfg.kl_sd_coef * sums["kl_sd"]
          + bcfg.kl_full_coef * m["kl_full"])
  return loss, m


def objective(cfg: Config, dense: ModelConfig, dense_params, bcfg: BridgeConfig,
              reference_BxL: jax.Array | None = None) -> train_lib.Objective:
  """What `train.train` optimises for a bridge run: cfg's sparse model plus the bridges.

  The sparse model starts exactly as a plain run of cfg would (same key); the bridges use a
  key folded from it. Their rho constants are both models' mean residual RMS on
  reference_BxL (the freshly initialised sparse model's), or 1 without it.
  """
  check_pair(dense, cfg.model)
  # The frozen dense model's scales are computed once, here: inside the jitted init the dense
  # params would be constants, and XLA would constant-fold the whole dense forward.
  rms_d = None if reference_BxL is None else jax.jit(mean_rms_S, static_argnums=2)(
      dense_params, reference_BxL, dense)

  def init_params(key):
    params = model_lib.init_params(cfg.model, key)
    rms_s = None if reference_BxL is None else mean_rms_S(params, reference_BxL, cfg.model)
    params["bridges"] = init_bridges(dense, cfg.model, bcfg, jax.random.fold_in(key, 1),
                                     rms_d, rms_s)
    return params

  def loss_fn(params, frozen, batch_BxL1):
    return bridge_loss(params, frozen, batch_BxL1, cfg.model, dense, bcfg)

  return train_lib.Objective(init_params, loss_fn, frozen=dense_params)


def evaluate(params, dense_params, batches, sparse: ModelConfig, dense: ModelConfig,
             bcfg: BridgeConfig) -> dict[str, float]:
  """Every `bridge_loss` metric (and "loss"), averaged over batches_Bx(L+1)."""
  fn = jax.jit(lambda p, d, b: bridge_loss(p, d, b, sparse, dense, bcfg))
  rows = []
  for batch in batches:
    loss, m = fn(params, dense_params, jnp.asarray(batch))
    rows.append({"loss": float(loss), **{k: float(v) for k, v in m.items()}})
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# --- steering (Fig 9) ---


def parse_channel(text: str, cfg: ModelConfig,
                  circuit_nodes: dict[str, list[int]] | None = None) -> tuple[int, tuple[int, ...]]:
  """'LAYER.SITE.CHANNELS' -> (sublayer j, channels) for the residual read of SITE (attn or
  mlp). CHANNELS: one channel (1.attn.37), several joined by + (1.attn.37+52), "all" (every
  residual channel), or "circuit" (the channels circuit_nodes, a pruned circuit's nodes, keep
  at that read)."""
  parts = text.split(".")
  ok = len(parts) == 3 and parts[1] in ("attn", "mlp") and parts[0].isdigit() and (
      parts[2] in ("all", "circuit") or all(c.isdigit() for c in parts[2].split("+")))
  if not ok:
    raise ValueError(f"--channel {text!r}: expected LAYER.SITE.CHANNELS with SITE attn or mlp "
                     "and CHANNELS a channel, several joined by +, 'all' or 'circuit', e.g. "
                     "1.attn.37")
  layer = int(parts[0])
  if parts[2] == "all":
    channels = tuple(range(cfg.d_model))
  elif parts[2] == "circuit":
    if circuit_nodes is None:
      raise ValueError(f"--channel {text!r}: 'circuit' needs the task's pruned circuit")
    channels = tuple(int(c) for c in circuit_nodes.get(f"{parts[0]}.{parts[1]}.act_in", ()))
    if not channels:
      raise ValueError(f"--channel {text!r}: the circuit reads no channel at "
                       f"{parts[0]}.{parts[1]}.act_in")
  else:
    channels = tuple(int(c) for c in parts[2].split("+"))
  if layer >= cfg.n_layer or max(channels) >= cfg.d_model:
    raise ValueError(f"--channel {text!r}: the sparse model has {cfg.n_layer} layers and "
                     f"{cfg.d_model} residual channels")
  return 2 * layer + (parts[1] == "mlp"), channels


def steering_direction(params, sparse: ModelConfig, presented_BxL: jax.Array,
                       counterfactual_BxL: jax.Array, j: int, channels) -> jax.Array:
  """add_BxLxDd at strength 1: decode(h^s with `channels` set to the counterfactual's) -
  decode(h^s), i.e. (rho^d_j / rho^s_j) * sum_c delta_c[..., None] * dec_w[j, c] with
  delta_c = h^s_j[c](counterfactual) - h^s_j[c](presented).
  """
  idx_C = jnp.asarray(channels, jnp.int32).reshape(-1)
  h_presented, h_cf = (residuals(params, t, sparse)[0][j] for t in (presented_BxL,
                                                                     counterfactual_BxL))
  delta_BxLxC = h_cf[..., idx_C] - h_presented[..., idx_C]
  rho_d, rho_s = _rho(params["bridges"], j)
  return (rho_d / rho_s) * (delta_BxLxC @ params["bridges"]["dec"]["w"][j][idx_C])


def steered_logits(dense_params, dense: ModelConfig, tokens_BxL: jax.Array, j: int,
                   add_BxLxD: jax.Array, strength, positions_B: jax.Array) -> jax.Array:
  """The dense model's logits_BxV at positions_B with strength * add added at sublayer j."""
  x_BxLxD = model_lib.run_sublayers(dense_params, model_lib.embed(dense_params, tokens_BxL, dense),
                                    dense, 0, j)
  x_BxLxD = model_lib.run_sublayers(dense_params, x_BxLxD + strength * add_BxLxD, dense, j)
  rows_B = jnp.arange(tokens_BxL.shape[0])
  return model_lib.unembed(dense_params, x_BxLxD[rows_B, positions_B],
                           tokens_BxL[rows_B, positions_B], dense)
