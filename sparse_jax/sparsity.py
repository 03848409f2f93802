"""The paper's optimiser as one optax chain, ending in an exact-L0 projection (PAPER.md §2).

Chain: gradient RMS normalised to 1 -> Adam(b1 0.9, b2 0.95, eps 0.1) -> decoupled weight
decay -> learning rate (1% warmup, linear decay, times the "sharkfin" sqrt(L0_final/L0_now))
-> L0 projection. The projection is last: it sees the update and the params and returns
u' = where(keep, u, -p), so after `optax.apply_updates` every sparsified matrix holds exactly
its scheduled number of nonzeros k (top-|w|, ties to the lowest flat index). Adam moments stay
dense, so pruned weights keep receiving gradient and can grow back into the top-k.

Which parameters are sparsified is decided by regex rules over param paths that must cover
every parameter (`RULES`):
  - weight matrices (c_attn, c_proj, c_fc) use `weight_density`, with at least
    `min_per_neuron` nonzeros kept per neuron / attention channel in the authors' orientation
    (c_attn and c_fc: per output column; the c_proj's: per input row). Residual channels get
    no protection, as in the authors' script.
  - wte, wpe and lm_head use `embed_density` (plain top-k, no per-neuron minimum).
  - biases: the paper says all weights *and biases* are sparse, the authors' released script
    leaves 1-D biases dense. We follow the paper (`sparsify_biases=True`, `embed_density`, as
    the script's L0frac for biases); set it False to reproduce the script.
  - RMSNorm scales, sink and smear logits, the bigram table and final_logits_bias are never
    sparsified.
  - bridges/... (bridges.py's encoders and decoders, trained beside a sparse model) are
    dense linear maps: never sparsified, weight-decayed like the model's weight matrices;
    their fixed scales bridges/rms/... are in the "dense" group (not decayed, no gradient).
Weight decay (`OptimConfig.decay_biases`) follows the authors' script: weight matrices and
embeddings (every >= 2-D parameter but the bigram table) are decayed, biases are not unless
asked; norms, sinks and the bigram table never are. The sharkfin factor
(`OptimConfig.sharkfin_l0`) is sqrt(L0_final / L0_now) over the weight matrices only, as the
script's sqrt(pfrac / this_pfrac); "all" counts every sparsified parameter instead. A
`min_per_neuron` that the final k of a matrix cannot give every neuron is a `ValueError`
naming the matrix (`leaf_specs`), never a silent tie-break among protected entries.

The schedule anneals every group's density linearly from 1 (dense) to its target between
`anneal_start_frac` and `anneal_end_frac` of training. k is computed from the optimiser's
step count inside the jitted update, so annealing never recompiles.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparse_jax.config import Config, OptimConfig, SparsityConfig
from sparse_jax.model import kth_largest_bits_and_count

# (regex over the param path, group, neuron axis). First match wins; every path must match.
# The neuron axis indexes neurons / attention channels; the minimum is counted along the other.
RULES = (
    (r"blocks/\d+/attn/c_attn/w", "matrix", 1),
    (r"blocks/\d+/attn/c_proj/w", "matrix", 0),
    (r"blocks/\d+/mlp/c_fc/w", "matrix", 1),
    (r"blocks/\d+/mlp/c_proj/w", "matrix", 0),
    (r"wte|wpe|lm_head/w", "embed", None),
    (r"bridges/rms/.*", "dense", None),  # bridges.py's fixed rho constants: never decayed
    (r"bridges/.*", "bridge", None),
    (r".*/b", "bias", None),
    (r".*/scale|blocks/\d+/attn/(sink|smear)|bigram|final_logits_bias", "dense", None),
)
_INT32_MAX = jnp.iinfo(jnp.int32).max
# Score of protected entries: above every finite |w| (and inf), but below the exclusive upper
# bound of the bisection, so a protected entry can still be the k-th largest.
_PROTECTED = _INT32_MAX - 1


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """How one parameter is sparsified."""

  path: str
  group: str  # the RULES group: "matrix", "embed", "bias", "bridge" or "dense"
  shape: tuple[int, ...]
  density: float  # final fraction of nonzeros; 1.0 = dense
  neuron_axis: int | None  # axis of neurons protected by min_per_neuron, if any
  sparsified: bool

  @property
  def numel(self) -> int:
    n = 1
    for s in self.shape:
      n *= s
    return n

  @property
  def final_k(self) -> int:
    return max(1, int(self.density * self.numel))


def path_str(path) -> str:
  """'blocks/0/attn/c_attn/w' from a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def rule_of(name: str) -> tuple[str, int | None]:
  """(group, neuron axis) of the first rule in `RULES` matching a param path."""
  match = next(((g, ax) for rx, g, ax in RULES if re.fullmatch(rx, name)), None)
  if match is None:
    raise ValueError(f"parameter {name!r} matches no sparsity rule in sparsity.RULES")
  return match


def leaf_specs(params: Any, scfg: SparsityConfig) -> dict[str, LeafSpec]:
  """Applies `RULES` to every parameter (params may be arrays or ShapeDtypeStructs).

  Raises:
    ValueError: naming the matrix, if its final k cannot keep `min_per_neuron` nonzeros in
      every neuron.
  """
  specs = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    group, axis = rule_of(name)
    if group == "bias" and not scfg.sparsify_biases:
      group = "dense"
    density = {"matrix": scfg.weight_density, "embed": scfg.embed_density,
               "bias": scfg.embed_density, "bridge": 1.0, "dense": 1.0}[group]
    sparsified = scfg.enabled and group not in ("bridge", "dense")
    specs[name] = LeafSpec(name, group, tuple(leaf.shape), density if sparsified else 1.0,
                           axis if sparsified and scfg.min_per_neuron else None, sparsified)
    _check_neuron_minimum(specs[name], scfg.min_per_neuron)
  return specs


def _check_neuron_minimum(spec: LeafSpec, min_per_neuron: int) -> None:
  """k only falls during the anneal, so a minimum the final k can hold always holds."""
  if spec.neuron_axis is None or len(spec.shape) != 2:
    return
  n_neurons = spec.shape[spec.neuron_axis]
  j = min(min_per_neuron, spec.shape[1 - spec.neuron_axis])
  if spec.final_k < j * n_neurons:
    raise ValueError(
        f"sparsity.min_per_neuron: {spec.path} {spec.shape} keeps {spec.final_k} nonzeros at "
        f"density {spec.density:.4g}, fewer than min_per_neuron={j} x {n_neurons} neurons = "
        f"{j * n_neurons}; raise its density to >= {j * n_neurons / spec.numel:.4g} or lower "
        f"sparsity.min_per_neuron")


def anneal_window(total_steps: int, scfg: SparsityConfig) -> tuple[int, int]:
  """(first annealing step, number of annealing steps >= 1) of a run of total_steps."""
  start = int(scfg.anneal_start_frac * total_steps)
  return start, max(int(scfg.anneal_end_frac * total_steps) - start, 1)


def scheduled_k(spec: LeafSpec, step, total_steps: int, scfg: SparsityConfig) -> jax.Array:
  """Number of nonzeros `spec`'s parameter must hold after optimiser step `step` (int32).

  Linear in the number of *removed* entries, so the first steps are exactly dense and the
  anneal ends exactly at final_k. Computed as one float32 multiply by a Python constant, so
  eager and jitted evaluations agree bit for bit (a division could be rewritten by XLA).
  """
  if not spec.sparsified:
    return jnp.int32(spec.numel)
  start, span = anneal_window(total_steps, scfg)
  removable = spec.numel - spec.final_k
  done_steps = jnp.clip(jnp.asarray(step, jnp.int32) - start, 0, span)
  removed = jnp.floor(done_steps.astype(jnp.float32) * jnp.float32(removable / span))
  removed = jnp.where(done_steps >= span, removable,
                      jnp.minimum(removed.astype(jnp.int32), removable))
  return jnp.int32(spec.numel) - removed


def scheduled_l0(specs: dict[str, LeafSpec], step, total_steps: int,
                 scfg: SparsityConfig) -> jax.Array:
  """Total scheduled nonzeros over the sparsified params in specs (float32)."""
  total = jnp.float32(0.0)
  for spec in specs.values():
    if spec.sparsified:
      total = total + scheduled_k(spec, step, total_steps, scfg).astype(jnp.float32)
  return total


def sharkfin_specs(specs: dict[str, LeafSpec], which: str) -> dict[str, LeafSpec]:
  """The params whose L0 drives the sharkfin factor: "matrix" (authors) or "all"."""
  if which == "all":
    return specs
  return {n: s for n, s in specs.items() if s.group == "matrix"}


def _protect_per_neuron(bits: jax.Array, neuron_axis: int, j: int) -> jax.Array:
  """Boolean mask of the top-j |w| of each neuron (ties to the lowest index)."""
  other = 1 - neuron_axis
  j = min(j, bits.shape[other])
  idx = jnp.arange(bits.shape[other]).reshape([-1 if a == other else 1 for a in range(2)])
  protected = jnp.zeros(bits.shape, bool)
  # j argmax passes are cheaper than lax.top_k on CPU and tie-break deterministically.
  for _ in range(j):
    best = jnp.argmax(jnp.where(protected, -1, bits), axis=other, keepdims=True)
    protected = protected | (idx == best)
  return protected


def topk_keep_mask(w: jax.Array, k: jax.Array, neuron_axis: int | None = None,
                   min_per_neuron: int = 0, stop_at_k: bool = True) -> jax.Array:
  """Boolean mask of exactly k entries of w to keep: protected entries first, then top-|w|.

  Non-negative float32 values order like their int32 bit patterns, so the k-th largest is
  found by bisection over bits (at most 31 counting passes, stopping once exactly k count;
  ~20x faster than a sort on CPU; `stop_at_k` False runs all 31, for `experiments.bench`).
  Ties at the threshold go to the lowest flat index, so exactly k survive.
  """
  bits = jax.lax.bitcast_convert_type(jnp.abs(w).astype(jnp.float32), jnp.int32)
  if neuron_axis is not None and min_per_neuron > 0 and w.ndim == 2:
    bits = jnp.where(_protect_per_neuron(bits, neuron_axis, min_per_neuron), _PROTECTED, bits)
  flat = bits.reshape(-1)
  count_dtype = jnp.float32 if flat.size < 2**24 else jnp.int32
  thresh, n_at_or_above = kth_largest_bits_and_count(flat[None], k, count_dtype, stop_at_k)
  thresh, n_at_or_above = thresh[0, 0], n_at_or_above[0, 0].astype(jnp.int32)

  def break_ties(_):
    above, at = flat > thresh, flat == thresh
    n_above = jnp.sum(above, dtype=jnp.int32)
    return above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= k - n_above))

  # The cumsum is only needed when several entries tie at the threshold (e.g. exact zeros).
  keep = jax.lax.cond(n_at_or_above == k, lambda _: flat >= thresh, break_ties, None)
  return keep.reshape(w.shape)


class ProjectState(NamedTuple):
  count: jax.Array  # optimiser steps taken; drives the L0 schedule


def project_l0(specs: dict[str, LeafSpec], total_steps: int,
               scfg: SparsityConfig) -> optax.GradientTransformation:
  """The L0 projection: after the update each sparsified param has exactly its scheduled k."""

  def init_fn(params):
    del params
    return ProjectState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_l0 needs params: call opt.update(grads, state, params)")
    def project(path, u, w):
      spec = specs[path_str(path)]
      if not spec.sparsified:
        return u
      k = scheduled_k(spec, state.count, total_steps, scfg)
      keep = topk_keep_mask(w + u, k, spec.neuron_axis, scfg.min_per_neuron)
      return jnp.where(keep, u, -w)  # w + (-w) == 0 exactly

    updates = jax.tree_util.tree_map_with_path(project, updates, params)
    return updates, ProjectState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def normalize_grad_rms(eps: float = 1e-5) -> optax.GradientTransformation:
  """g <- g / (global_rms(g) + eps): the gradient RMS is always 1 (authors' script)."""

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    n = sum(x.size for x in leaves)
    rms = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves) / n)
    return jax.tree.map(lambda g: g / (rms + eps), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def learning_rate_fn(ocfg: OptimConfig, scfg: SparsityConfig, specs: dict[str, LeafSpec],
                     total_steps: int):
  """lr(count): linear warmup, linear decay to 0, times sqrt(L0_final / L0_now) (sharkfin)."""
  warm = max(int(ocfg.warmup_frac * total_steps), 1)
  l0_specs = sharkfin_specs(specs, ocfg.sharkfin_l0)
  final_l0 = float(sum(s.final_k for s in l0_specs.values() if s.sparsified))
  use_sharkfin = ocfg.sharkfin and scfg.enabled and final_l0 > 0

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warmup = (step + 1.0) / warm
    decay = 1.0 - (step - warm) / max(total_steps - warm, 1)
    lr = ocfg.lr * jnp.clip(jnp.where(step < warm, warmup, decay), 0.0, 1.0)
    if use_sharkfin:
      lr = lr * jnp.sqrt(final_l0 / scheduled_l0(l0_specs, count, total_steps, scfg))
    return lr

  return schedule


def make_optimizer(cfg: Config, params: Any, total_steps: int) -> optax.GradientTransformation:
  """The full chain for `params` (arrays or ShapeDtypeStructs) trained for total_steps."""
  specs = leaf_specs(params, cfg.sparsity)
  ocfg = cfg.optim
  # By RULES group, not by spec, so that the dense baseline decays exactly what a sparse run
  # does: matrices, embeddings and bridges, biases only if asked, never norms, sinks or bigram.
  decayed = {"matrix", "embed", "bridge"} | ({"bias"} if ocfg.decay_biases else set())
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda path, _: rule_of(path_str(path))[0] in decayed, params)
  lr = learning_rate_fn(ocfg, cfg.sparsity, specs, total_steps)
  parts = [normalize_grad_rms()] if ocfg.grad_rms_normalize else []
  parts += [optax.scale_by_adam(b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps),
            optax.add_decayed_weights(ocfg.weight_decay, mask=decay_mask),
            optax.scale_by_schedule(lambda count: -lr(count))]
  if cfg.sparsity.enabled:
    parts.append(project_l0(specs, total_steps, cfg.sparsity))
  return optax.chain(*parts)


def l0_stats(params: Any, specs: dict[str, LeafSpec], step: int | None = None,
             total_steps: int | None = None, scfg: SparsityConfig | None = None) -> dict:
  """Nonzero counts per sparsified param, per RULES group ("matrix", "embed", "bias",
  "bridge", "dense") and in total over the model, bridges excluded (plus the scheduled total
  L0 if step given)."""
  stats = {}
  groups = {}
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, spec in specs.items():
    nz = int(jnp.count_nonzero(flat[name]))
    groups[spec.group] = groups.get(spec.group, 0) + nz
    if spec.sparsified:
      stats[f"sparsity/l0/{name}"] = nz
  stats.update({f"sparsity/l0_group/{g}": n for g, n in sorted(groups.items())})
  stats["sparsity/l0_total"] = sum(n for g, n in groups.items() if g != "bridge")
  stats["sparsity/params_total"] = sum(s.numel for s in specs.values() if s.group != "bridge")
  if step is not None and scfg is not None:
    stats["sparsity/l0_scheduled"] = int(scheduled_l0(specs, step, total_steps, scfg)) + sum(
        s.numel for s in specs.values() if not s.sparsified)
  return stats
