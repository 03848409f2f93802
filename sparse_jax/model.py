"""GPT-2-style transformer as pure functions over a plain params dict (PAPER.md §1).

Shape legend (used in every module's names):
  B batch, L sequence length, D d_model, H n_head, K d_head, A n_head*d_head,
  F d_mlp, V vocab, T tasks, N nodes, C channels of one node site.

Architecture, as the authors' `gpt.py`: token embedding (learned positions optional, off by
default), pre-norm blocks with RMSNorm, causal attention with an optional per-head sink
logit, exact-GELU MLP, biases everywhere but the unembedding, untied `lm_head`, and an
optional dense bigram table whose row for the current token is added to the logits. AbsTopK
(keep the k largest |x|) applies at each loctype in `cfg.afrac_loctypes` with
k = int(afrac * width); q, k and v are each top-k'd over all heads jointly, as the authors do.
Two options the authors' model lacks, both off by default and applied after the q/k node
sites: rotary positions on q and k (`cfg.rope`) and smeared keys (`cfg.smear_keys`).

Params paths (regex-able, used by the sparsity rules):
  wte [V,D], wpe [block_size,D] (optional), ln_f/scale [D], lm_head/w [D,V], bigram [V,V],
  final_logits_bias [V] (optional, imported models only),
  blocks/{i}/ln_1/scale, blocks/{i}/attn/c_attn/{w [D,3A], b [3A]},
  blocks/{i}/attn/c_proj/{w [A,D], b [D]}, blocks/{i}/attn/sink [H] (optional),
  blocks/{i}/attn/smear [H] (optional, smeared keys),
  blocks/{i}/ln_2/scale, blocks/{i}/mlp/c_fc/{w [D,F], b [F]},
  blocks/{i}/mlp/c_proj/{w [F,D], b [D]}.
Weights are stored [in, out] (TF orientation), so x @ w.

Node sites (activation capture and circuit masks), per layer i, each seen after its AbsTopK,
matching the authors' hook names:
  i.attn.act_in [D]   residual read of attention (after ln_1)
  i.attn.q, i.attn.k, i.attn.v [A]
  i.attn.resid_delta [D]   residual write of attention (after c_proj)
  i.mlp.act_in [D]    residual read of the MLP (after ln_2)
  i.mlp.post_act [F]  MLP neurons (after the activation)
  i.mlp.resid_delta [D]    residual write of the MLP
Ablation at a site interpolates towards a mean: x -> mean + m * (x - mean).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sparse_jax.config import ModelConfig
from sparse_jax.matmul import matmul

Params = dict[str, Any]
# site name -> (mask_C, mean_C); both broadcast against the site's [B, L, C] activation.
Ablation = Mapping[str, tuple[jax.Array, jax.Array]]

SITE_KINDS = ("attn.act_in", "attn.q", "attn.k", "attn.v", "attn.resid_delta",
              "mlp.act_in", "mlp.post_act", "mlp.resid_delta")


def node_sites(cfg: ModelConfig) -> dict[str, int]:
  """All node sites in forward order, mapped to their channel counts."""
  width = {"attn.act_in": cfg.d_model, "attn.q": cfg.d_attn, "attn.k": cfg.d_attn,
           "attn.v": cfg.d_attn, "attn.resid_delta": cfg.d_model, "mlp.act_in": cfg.d_model,
           "mlp.post_act": cfg.d_mlp, "mlp.resid_delta": cfg.d_model}
  return {f"{i}.{kind}": width[kind] for i in range(cfg.n_layer) for kind in SITE_KINDS}


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
  """Initialises params as the authors do: N(0, 0.02), c_proj N(0, 0.02/sqrt(2 n_layer))."""
  std, proj_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layer)
  D, A, F, V = cfg.d_model, cfg.d_attn, cfg.d_mlp, cfg.vocab_size
  keys = iter(jax.random.split(key, 4 + 4 * cfg.n_layer))

  def normal(shape, s):
    return s * jax.random.normal(next(keys), shape, jnp.float32)

  blocks = {}
  for i in range(cfg.n_layer):
    attn = {"c_attn": {"w": normal((D, 3 * A), std), "b": jnp.zeros(3 * A)},
            "c_proj": {"w": normal((A, D), proj_std), "b": jnp.zeros(D)}}
    if cfg.sink:
      attn["sink"] = jnp.zeros(cfg.n_head)
    if cfg.smear_keys:
      attn["smear"] = jnp.zeros(cfg.n_head)  # a_h = 0.5 at the start
    blocks[str(i)] = {
        "ln_1": {"scale": jnp.ones(D)}, "attn": attn, "ln_2": {"scale": jnp.ones(D)},
        "mlp": {"c_fc": {"w": normal((D, F), std), "b": jnp.zeros(F)},
                "c_proj": {"w": normal((F, D), proj_std), "b": jnp.zeros(D)}}}
  params = {"wte": normal((V, D), std), "blocks": blocks, "ln_f": {"scale": jnp.ones(D)},
            "lm_head": {"w": normal((D, V), std)}}
  if cfg.learned_pos_emb:
    params["wpe"] = normal((cfg.block_size, D), std)
  if cfg.final_logits_bias:
    params["final_logits_bias"] = jnp.zeros(V)
  if cfg.enable_bigram_table:
    # The authors' script initialises the learnable table with rand * 0.02.
    params["bigram"] = 0.02 * jax.random.uniform(next(keys), (V, V), jnp.float32)
  return params


def abs_topk(x_xC: jax.Array, k: int, stop_at_k: bool | None = None) -> jax.Array:
  """Keeps exactly the k largest-|x| entries along the last axis, zeroing the rest.

  The k-th largest |x| is found by bisection over the float32 bit pattern (non-negative
  floats order like their int32 bits): at most 31 counting passes, much faster on CPU than
  `lax.top_k` (measured 3-4x, docs/throughput.md). With `stop_at_k` it stops once every row
  counts exactly k; the result is the same. None (the default) stops where the rows are
  bisected in cache-sized blocks (CPU), each block as soon as its slowest row is done; with
  all rows at once (accelerators) the slowest of that many rows needs nearly all 31 passes,
  and the fixed loop saves a check per pass. Ties at the threshold keep the lowest indices,
  so exactly k survive. Gradients flow to the kept entries only.
  """
  width = x_xC.shape[-1]
  if k >= width:
    return x_xC
  bits_RxC = jax.lax.bitcast_convert_type(jnp.abs(jax.lax.stop_gradient(x_xC)),
                                          jnp.int32).reshape(-1, width)
  keep_RxC = _keep_mask_fn(k, stop_at_k)(bits_RxC)
  return jnp.where(keep_RxC.reshape(x_xC.shape), x_xC, 0.0)


def _keep_mask_fn(k: int, stop_at_k: bool | None):
  """`_topk_keep_blocks` for rows of bits, with its batch folded into the rows under vmap.

  Circuit search vmaps the model over tasks and candidate circuits. vmap's own rule would
  widen every cache-sized block by the batch (scan over blocks, each [batch, block, C]) and
  run each block until the slowest row of the whole batch is done; rows are independent, so
  the batch is instead folded into the rows and blocked as usual (measured 2-4x on a vmapped
  AbsTopK, docs/throughput.md). The mask has no gradient: it is computed from stopped bits.
  """

  @jax.custom_batching.custom_vmap
  def keep(bits_RxC):
    return _topk_keep_blocks(bits_RxC, k, stop_at_k)

  @keep.def_vmap
  def keep_batched(axis_size, in_batched, bits_BxRxC):
    del in_batched  # the one argument is batched, along axis 0
    rows, width = bits_BxRxC.shape[1:]
    return keep(bits_BxRxC.reshape(-1, width)).reshape(axis_size, rows, width), True

  return keep


def _topk_keep_blocks(bits_RxC: jax.Array, k: int, stop_at_k: bool | None) -> jax.Array:
  """`_topk_keep_rows` over cache-sized blocks of rows on CPU, all rows at once elsewhere."""
  width = bits_RxC.shape[-1]
  block = rows_per_block(width)
  if stop_at_k is None:
    stop_at_k = block is not None
  if block is None or block >= bits_RxC.shape[0]:
    return _topk_keep_rows(bits_RxC, k, stop_at_k)
  # The bisection reads its rows up to 31 times: on CPU it runs over blocks of rows that stay
  # in the core's L2 cache instead of streaming the whole activation from memory each pass.
  n_rows = bits_RxC.shape[0]
  padded_RxC = jnp.pad(bits_RxC, ((0, -n_rows % block), (0, 0)))
  return jax.lax.map(lambda b: _topk_keep_rows(b, k, stop_at_k),
                     padded_RxC.reshape(-1, block, width)).reshape(-1, width)[:n_rows]


# Elements per block of rows in `abs_topk`'s bisection on CPU: 64 KiB of int32, well inside
# a core's L2 (measured on the 2-core CPU: [4096, 512] 5x faster than all rows at once, best
# of 8..256 rows; docs/throughput.md).
_CPU_BLOCK_ELEMS = 2**14


def rows_per_block(width: int) -> int | None:
  """Rows per cache-sized block for row-wise bisections, or None: all rows at once.

  The one place that picks by backend: blocks help a CPU's caches; an accelerator runs
  every row in parallel and would only serialise. `abs_topk` stops its bisection early only
  in blocks.
  """
  if jax.default_backend() != "cpu":
    return None
  return max(1, _CPU_BLOCK_ELEMS // width)


def _topk_keep_rows(bits_RxC: jax.Array, k: int, stop_at_k: bool) -> jax.Array:
  """Boolean mask of the k largest bits of each row, ties at the threshold to the lowest index."""
  # float32 counts are exact for rows shorter than 2**24 and vectorise better on CPU.
  thresh_Rx1, count_Rx1 = kth_largest_bits_and_count(bits_RxC, k, jnp.float32, stop_at_k)
  at_or_above_RxC = bits_RxC >= thresh_Rx1

  def break_ties(_):
    above_RxC = bits_RxC > thresh_Rx1
    at_RxC = bits_RxC == thresh_Rx1
    room_Rx1 = k - jnp.sum(above_RxC, axis=-1, keepdims=True)
    return above_RxC | (at_RxC & (jnp.cumsum(at_RxC, axis=-1) <= room_Rx1))

  # The cumsum is only needed when several entries of a row tie at its threshold (e.g. zeros).
  exact = jnp.all(count_Rx1 == k)
  return jax.lax.cond(exact, lambda _: at_or_above_RxC, break_ties, None)


def kth_largest_bits(bits_xC: jax.Array, k: jax.Array | int, count_dtype=jnp.int32,
                     stop_at_k: bool = False) -> jax.Array:
  """The threshold of `kth_largest_bits_and_count`, without its count."""
  return kth_largest_bits_and_count(bits_xC, k, count_dtype, stop_at_k)[0]


def kth_largest_bits_and_count(bits_xC: jax.Array, k: jax.Array | int, count_dtype=jnp.int32,
                               stop_at_k: bool = False) -> tuple[jax.Array, jax.Array]:
  """Largest t with count(bits >= t) >= k along the last axis (bits are non-negative int32).

  k may be traced (an int32 scalar or broadcastable array). Returns t and count(bits >= t),
  both of shape [..., 1] (the count in `count_dtype`), so callers need no pass to recount.
  `count_dtype` float32 counts faster on CPU (it vectorises better) and is exact while the
  last axis is shorter than 2**24.

  With `stop_at_k` the bisection stops as soon as every row has a t with count(bits >= t)
  exactly k, and returns that t (any t between the k+1-th and the k-th largest, not only the
  largest). `bits >= t` is then the same top-k set, found in ~20 passes instead of 31
  (docs/throughput.md). A row whose k-th value is tied never counts exactly k and gets the
  k-th largest, as without it.
  """
  lo = jnp.zeros(bits_xC.shape[:-1] + (1,), jnp.int32)  # count(bits >= lo) >= k holds
  hi = jnp.full_like(lo, jnp.iinfo(jnp.int32).max)  # treated as exclusive
  count_lo = jnp.full(lo.shape, bits_xC.shape[-1], count_dtype)  # count(bits >= lo)
  k = jnp.asarray(k, count_dtype)

  def body(state):
    lo, hi, count_lo = state
    mid = lo + (hi - lo) // 2
    count = jnp.sum(bits_xC >= mid, axis=-1, keepdims=True, dtype=count_dtype)
    ok = count >= k
    # Once count_lo == k it stays k: a larger mid counts at most k, and moves lo only at k.
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid), jnp.where(ok, count, count_lo)

  if not stop_at_k:
    lo, _, count_lo = jax.lax.fori_loop(0, 31, lambda _, state: body(state), (lo, hi, count_lo))
    return lo, count_lo

  def unfinished(state):
    lo, hi, count_lo = state
    # hi - lo == 1 after at most 31 passes, where the fixed loop would have stopped.
    return jnp.any((hi - lo > 1) & (count_lo != k))

  lo, _, count_lo = jax.lax.while_loop(unfinished, body, (lo, hi, count_lo))
  return lo, count_lo


def rms_norm(x_xD: jax.Array, scale_D: jax.Array) -> jax.Array:
  eps = jnp.finfo(x_xD.dtype).eps  # torch.nn.RMSNorm's default
  return x_xD * jax.lax.rsqrt(jnp.mean(x_xD**2, axis=-1, keepdims=True) + eps) * scale_D


class _Sites:
  """Applies AbsTopK, ablation and capture at each location, in one place."""

  def __init__(self, cfg: ModelConfig, ablation: Ablation | None, capture):
    self.cfg, self.ablation = cfg, ablation or {}
    self.capture = set(capture)
    self.acts: dict[str, jax.Array] = {}

  def topk(self, loctype: str, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    if cfg.afrac is None or loctype not in cfg.afrac_loctypes:
      return x
    return abs_topk(x, int(cfg.afrac * x.shape[-1]))

  def node(self, name: str, x: jax.Array) -> jax.Array:
    if name in self.ablation:
      m, mean = self.ablation[name]
      # Written as m*x + (1-m)*mean (= mean + m*(x - mean)) so that m == 1 gives x bitwise.
      x = m * x + (1.0 - m) * mean
    if name in self.capture:
      self.acts[name] = x
    return x


def _linear(x_BxLxI: jax.Array, w_IxO: jax.Array, b_O: jax.Array, cfg: ModelConfig):
  return matmul(x_BxLxI, w_IxO, cfg.matmul_dtype) + b_O


def _attention(p: Params, x_BxLxD: jax.Array, cfg: ModelConfig, s: _Sites, i: int,
               positions_B: jax.Array | None = None):
  """The attention sublayer's residual delta: at every position (out_BxLxD), or with
  positions_B only at query position positions_B[b] of each sequence (out_Bx1xD)."""
  B, L, _ = x_BxLxD.shape
  H, K, A = cfg.n_head, cfg.d_head, cfg.d_attn
  x_BxLxD = s.node(f"{i}.attn.act_in", s.topk("attn_in", rms_norm(x_BxLxD, p["ln_1"]["scale"])))
  w_Dx3A, b_3A = p["attn"]["c_attn"]["w"], p["attn"]["c_attn"]["b"]
  if positions_B is None:  # Q = L queries
    q_BxQxA, k_BxLxA, v_BxLxA = jnp.split(_linear(x_BxLxD, w_Dx3A, b_3A, cfg), 3, axis=-1)
  else:  # Q = 1 query per sequence; keys and values stay at every position
    x_Bx1xD = x_BxLxD[jnp.arange(B), positions_B][:, None]
    q_BxQxA = _linear(x_Bx1xD, w_Dx3A[:, :A], b_3A[:A], cfg)
    k_BxLxA, v_BxLxA = jnp.split(_linear(x_BxLxD, w_Dx3A[:, A:], b_3A[A:], cfg), 2, axis=-1)
    causal_xQxL = (jnp.arange(L)[None, :] <= positions_B[:, None])[:, None, None, :]
  Q = q_BxQxA.shape[1]
  q_BxQxA = s.node(f"{i}.attn.q", s.topk("attn_q", q_BxQxA))
  k_BxLxA = s.node(f"{i}.attn.k", s.topk("attn_k", k_BxLxA))
  v_BxLxA = s.node(f"{i}.attn.v", s.topk("attn_v", v_BxLxA))
  q_BxQxHxK = q_BxQxA.reshape(B, Q, H, K)
  k_BxLxHxK, v_BxLxHxK = (t.reshape(B, L, H, K) for t in (k_BxLxA, v_BxLxA))
  if cfg.smear_keys:
    # After the k node site, so a circuit's kept k channels are what gets smeared; position 0
    # has no previous key and keeps its own.
    a_H1 = jax.nn.sigmoid(p["attn"]["smear"])[:, None]
    prev_BxLxHxK = jnp.concatenate([k_BxLxHxK[:, :1], k_BxLxHxK[:, :-1]], axis=1)
    k_BxLxHxK = k_BxLxHxK + a_H1 * (prev_BxLxHxK - k_BxLxHxK)
  if cfg.rope:
    # Rotated after the node sites: a circuit masks q and k channels as they are computed.
    q_pos_BxQ = jnp.arange(L)[None] if positions_B is None else positions_B[:, None]
    q_BxQxHxK = rotary(q_BxQxHxK, q_pos_BxQ)
    k_BxLxHxK = rotary(k_BxLxHxK, jnp.arange(L)[None])
  if positions_B is None:
    # Causal: the first half of the queries sees only the first half of the keys, so its
    # scores are computed against those alone, a quarter fewer score entries (the step
    # 1.08-1.18x faster on CPU; more halvings lost more to the extra ops than they saved,
    # docs/throughput.md, "Attention in two causal halves").
    h = L // 2
    spans = ((0, h), (h, L)) if h else ((0, L),)
    y_BxQxHxK = jnp.concatenate(
        [_attend(p, q_BxQxHxK[:, lo:hi], k_BxLxHxK[:, :hi], v_BxLxHxK[:, :hi],
                 jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :], cfg)
         for lo, hi in spans], axis=1)
  else:
    y_BxQxHxK = _attend(p, q_BxQxHxK, k_BxLxHxK, v_BxLxHxK, causal_xQxL, cfg)
  y_BxQxA = y_BxQxHxK.reshape(B, Q, A)
  out_BxQxD = _linear(y_BxQxA, p["attn"]["c_proj"]["w"], p["attn"]["c_proj"]["b"], cfg)
  return s.node(f"{i}.attn.resid_delta", s.topk("attn_out", out_BxQxD))


def _attend(p: Params, q_BxQxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
            causal_xQxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Softmax attention of Q queries over L keys under a boolean mask: y_BxQxHxK."""
  B, Q, H, K = q_BxQxHxK.shape
  att_BxHxQxL = jnp.einsum("blhk,bmhk->bhlm", q_BxQxHxK, k_BxLxHxK) / math.sqrt(K)
  att_BxHxQxL = jnp.where(causal_xQxL, att_BxHxQxL, -jnp.inf)
  if cfg.sink:
    # The sink is an always-visible key with k=0, v=0 and a learned logit: it only adds
    # exp(sink_h) to the softmax denominator (authors' SDPAWithSink).
    sink_BxHxQx1 = jnp.broadcast_to(p["attn"]["sink"][None, :, None, None], (B, H, Q, 1))
    probs = jax.nn.softmax(jnp.concatenate([att_BxHxQxL, sink_BxHxQx1], axis=-1), axis=-1)
    probs_BxHxQxL = probs[..., :-1]
  else:
    probs_BxHxQxL = jax.nn.softmax(att_BxHxQxL, axis=-1)
  return jnp.einsum("bhlm,bmhk->blhk", probs_BxHxQxL, v_BxLxHxK)


def rotary(x_BxQxHxK: jax.Array, pos_BxQ: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotates channel pairs (a, a + K/2) of each head by pos * base^(-2a/K) (RoPE, half split).

  After rotation q_t . k_s depends on the positions only through t - s, so a head can attend
  "one token back" with the same weights at every position.
  """
  half = x_BxQxHxK.shape[-1] // 2
  freq_P = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxQx1xP = (pos_BxQ[..., None].astype(jnp.float32) * freq_P)[:, :, None, :]
  cos, sin = jnp.cos(angle_BxQx1xP), jnp.sin(angle_BxQx1xP)
  x1, x2 = x_BxQxHxK[..., :half], x_BxQxHxK[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _mlp(p: Params, x_BxLxD: jax.Array, cfg: ModelConfig, s: _Sites, i: int):
  x_BxLxD = s.node(f"{i}.mlp.act_in", s.topk("mlp_in", rms_norm(x_BxLxD, p["ln_2"]["scale"])))
  pre_BxLxF = _linear(x_BxLxD, p["mlp"]["c_fc"]["w"], p["mlp"]["c_fc"]["b"], cfg)
  if cfg.activation_type == "gelu":
    act_BxLxF = jax.nn.gelu(pre_BxLxF, approximate=False)
  else:
    act_BxLxF = jax.nn.relu(pre_BxLxF)
  act_BxLxF = s.node(f"{i}.mlp.post_act", s.topk("mlp_neuron", act_BxLxF))
  out_BxLxD = _linear(act_BxLxF, p["mlp"]["c_proj"]["w"], p["mlp"]["c_proj"]["b"], cfg)
  return s.node(f"{i}.mlp.resid_delta", s.topk("mlp_out", out_BxLxD))


def forward(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig, *,
            ablation: Ablation | None = None, capture=(), positions_B: jax.Array | None = None):
  """Runs the model.

  Args:
    params: from `init_params`.
    tokens_BxL: int token ids.
    cfg: the model config (static under jit).
    ablation: optional {site: (mask, mean)}; each site becomes mean + mask * (x - mean).
    capture: site names whose (post-ablation) activations are returned.
    positions_B: if given, unembed only position positions_B[b] of each sequence and return
      logits_BxV (task losses read one position; this skips the [B, L, V] logits).

  Returns:
    logits_BxLxV (or logits_BxV), plus {site: act_BxLxC} when `capture` is non-empty.
  """
  unknown = (set(capture) | set(ablation or {})) - set(node_sites(cfg))
  if unknown:
    raise ValueError(f"unknown node site(s) {sorted(unknown)}; sites look like '0.attn.q'")
  s = _Sites(cfg, ablation, capture)
  x_BxLxD = embed(params, tokens_BxL, cfg)
  if positions_B is None:
    x_BxLxD = run_sublayers(params, x_BxLxD, cfg, sites=s)
  else:  # from here on "L" is the single position read
    x_BxLxD = _read_positions(params, x_BxLxD, cfg, s, positions_B)
    tokens_BxL = tokens_BxL[jnp.arange(tokens_BxL.shape[0]), positions_B]
  logits_BxLxV = unembed(params, x_BxLxD, tokens_BxL, cfg)
  return (logits_BxLxV, s.acts) if capture else logits_BxLxV


def _read_positions(params: Params, x_BxLxD: jax.Array, cfg: ModelConfig, s: _Sites,
                    positions_B: jax.Array) -> jax.Array:
  """The final residual x_BxD at position positions_B[b] of each sequence.

  Nothing the last layer computes at one position reaches another position's output, so it
  runs only at the positions read: its queries, attention output and MLP (for a 2-layer model
  about 40% fewer matmul FLOPs and a third less AbsTopK work; its keys and values still need
  every position). Captured activations keep every position: then all layers run in full.
  """
  rows_B = jnp.arange(x_BxLxD.shape[0])
  if s.capture:
    return run_sublayers(params, x_BxLxD, cfg, sites=s)[rows_B, positions_B]
  i = cfg.n_layer - 1
  x_BxLxD = run_sublayers(params, x_BxLxD, cfg, 0, 2 * i, sites=s)
  p = params["blocks"][str(i)]
  x_Bx1xD = x_BxLxD[rows_B, positions_B][:, None] + _attention(p, x_BxLxD, cfg, s, i,
                                                                positions_B)
  return (x_Bx1xD + _mlp(p, x_Bx1xD, cfg, s, i))[:, 0]


# `forward` in pieces, for code that reads or replaces the residual stream between sublayers
# (bridges). Sublayer j is layer j // 2's attention (j even) or MLP (j odd); "the residual at
# sublayer j" is the pre-norm residual entering it.


def n_sublayers(cfg: ModelConfig) -> int:
  return 2 * cfg.n_layer


def embed(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The residual at sublayer 0: token (plus learned position) embeddings, x_BxLxD."""
  x_BxLxD = params["wte"][tokens_BxL]
  if cfg.learned_pos_emb:
    x_BxLxD = x_BxLxD + params["wpe"][:tokens_BxL.shape[1]]
  return x_BxLxD


def run_sublayers(params: Params, x_BxLxD: jax.Array, cfg: ModelConfig, start: int = 0,
                  stop: int | None = None, *, sites: _Sites | None = None) -> jax.Array:
  """The residual after sublayers start..stop-1, given the residual x entering `start`."""
  s = sites if sites is not None else _Sites(cfg, None, ())
  for j in range(start, n_sublayers(cfg) if stop is None else stop):
    i = j // 2
    sublayer = _attention if j % 2 == 0 else _mlp
    x_BxLxD = x_BxLxD + sublayer(params["blocks"][str(i)], x_BxLxD, cfg, s, i)
  return x_BxLxD


def unembed(params: Params, x_BxLxD: jax.Array, tokens_BxL: jax.Array,
            cfg: ModelConfig) -> jax.Array:
  """Logits from the final residual (tokens index the bigram table's rows)."""
  x_BxLxD = rms_norm(x_BxLxD, params["ln_f"]["scale"])
  logits_BxLxV = matmul(x_BxLxD, params["lm_head"]["w"], cfg.matmul_dtype)
  if cfg.final_logits_bias:
    logits_BxLxV = logits_BxLxV + params["final_logits_bias"]
  if cfg.enable_bigram_table:
    logits_BxLxV = logits_BxLxV + params["bigram"][tokens_BxL]
  return logits_BxLxV


def next_token_loss(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Mean cross-entropy (nats/token) of predicting tokens[:, 1:] from tokens[:, :-1]."""
  logits_BxLxV = forward(params, tokens_BxL[:, :-1], cfg).astype(jnp.float32)
  # logsumexp minus the target's logit, picked by an elementwise select rather than
  # take_along_axis: the select's gradient fuses with the softmax's, where take_along_axis's
  # is a scatter into a fresh [B, L, V] buffer of zeros (docs/throughput.md).
  is_target_BxLxV = jnp.arange(logits_BxLxV.shape[-1]) == tokens_BxL[:, 1:, None]
  target_BxL = jnp.sum(jnp.where(is_target_BxLxV, logits_BxLxV, 0.0), axis=-1)
  nll_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL
  return jnp.mean(nll_BxL)


def count_params(params: Params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
