"""Node masks for circuit search: means, the Heaviside mask, vmapped training (PAPER.md §4).

1. Means. `compute_means` averages every node site's activation, per channel, over
   pretraining (validation) tokens; an ablated node is replaced by its mean (§4: mean
   ablation, not zero ablation or patching). `save_means`/`load_means` keep them beside a
   checkpoint.
2. Masks. One parameter tau per node (all sites of `model.node_sites`; q and k untied, fn 17),
   a flat vector tau_N with the sites' channels in forward order (`site_slices`). The forward
   uses m = H(tau) (Heaviside, m = 1 iff tau > 0); the backward a sigmoid-derivative
   surrogate, dm/dtau = sigmoid'(tau / temp) / temp. Loss: task loss + k_coef * sum(H(tau)).
   AdamW (b1 0.9, b2 from the config, linear warmup then linear decay to 0) after clipping
   the gradient norm to 1; tau is clamped to [-1, 1] after every step and initialised
   N(init_noise_bias, init_noise_scale^2). Defaults are Table 2's centres.
3. vmap. `mask_step` trains one task; `train_masks` runs it as one jitted program vmapped
   over tasks (outer axis) and a grid of k_coef values (inner axis), the task axis sharded
   over a 1-D ("data",) mesh of the local devices when there are several. With
   `circuit.train_length_strata` S > 1 each task's pairs are split by length into S strata,
   each padded only to its own longest pair, and every minibatch draws equally from each.

`circuits.py` discretises the trained masks into circuits. Shapes: T tasks, G k_coef grid
values, N nodes, P pairs, C channels of one site.
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_jax import model as model_lib
from sparse_jax import task_groups
from sparse_jax.config import CircuitConfig, ModelConfig
from sparse_jax.fileio import atomic_write
from sparse_jax.tasks import TaskArrays, contrast_loss, pair_logit_diff

log = logging.getLogger(__name__)

Means = Mapping[str, Any]  # site -> mean_C


def site_slices(cfg: ModelConfig) -> dict[str, slice]:
  """Where each site's channels sit in the flat node vector (forward order)."""
  out, start = {}, 0
  for site, width in model_lib.node_sites(cfg).items():
    out[site] = slice(start, start + width)
    start += width
  return out


def n_nodes(cfg: ModelConfig) -> int:
  return sum(model_lib.node_sites(cfg).values())


def nodes_from_keep(keep_N: np.ndarray, cfg: ModelConfig) -> dict[str, list[int]]:
  """{site: kept channel ids} for the sites with any kept node, from a flat keep vector."""
  keep_N = np.asarray(keep_N, bool)
  out = {site: np.flatnonzero(keep_N[sl]).tolist() for site, sl in site_slices(cfg).items()}
  return {site: ids for site, ids in out.items() if ids}


def node_ablation(m_N: jax.Array, means: Means, cfg: ModelConfig) -> model_lib.Ablation:
  """The `forward` ablation dict {site: (m_C, mean_C)} from a flat mask vector."""
  return {site: (m_N[sl], means[site]) for site, sl in site_slices(cfg).items()}


# --- means ---


@functools.partial(jax.jit, static_argnames=("cfg",))
def _site_sums(params, tokens_BxL: jax.Array, cfg: ModelConfig) -> dict[str, jax.Array]:
  sites = tuple(model_lib.node_sites(cfg))
  _, acts = model_lib.forward(params, tokens_BxL, cfg, capture=sites)
  return {site: jnp.sum(a.astype(jnp.float32), axis=(0, 1)) for site, a in acts.items()}


def compute_means(params, cfg: ModelConfig, batches: Iterable[Any]) -> dict[str, np.ndarray]:
  """Per-channel mean activation of every node site over all tokens of `batches`.

  Args:
    params: model params.
    cfg: the model config.
    batches: int token arrays [B, L] from the pretraining (validation) stream; every
      position counts (no padding expected). Same-shaped batches compile once.

  Returns:
    {site: float32 mean_C}, summed in float64 on the host.
  """
  totals, count = None, 0
  for tokens_BxL in batches:
    sums = jax.device_get(_site_sums(params, jnp.asarray(tokens_BxL, jnp.int32), cfg))
    totals = {s: (0.0 if totals is None else totals[s]) + np.float64(v) for s, v in sums.items()}
    count += int(np.prod(np.shape(tokens_BxL)))
  if not count:
    raise ValueError("compute_means: no tokens in `batches`")
  return {site: (total / count).astype(np.float32) for site, total in totals.items()}


def save_means(path: str, means: Means) -> None:
  """Writes means to an .npz atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp):
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
      np.savez(f, **{site: np.asarray(v, np.float32) for site, v in means.items()})
  atomic_write(path, write)


def load_means(path: str, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
  """Reads means from `save_means`; with `cfg`, checks every site is there at its width."""
  with np.load(path) as f:
    means = {site: f[site] for site in f.files}
  if cfg is not None:
    check_means(means, cfg, where=path)
  return means


def cached_means(path: str, params, cfg: ModelConfig, batches: Callable[[], Iterable[Any]]
                 ) -> dict[str, np.ndarray]:
  """Loads the means at `path` (e.g. beside a checkpoint), or computes and saves them.

  `batches()` gives the token batches (as for `compute_means`); it is only called when the
  file does not exist yet, so loading the pretraining data is skipped when cached. A cache
  file that cannot be read back (truncated, damaged, another model's) is recomputed.
  """
  if os.path.exists(path):
    try:
      return load_means(path, cfg)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      log.warning("%s: unreadable means cache (%s: %s); recomputing it", path,
                  type(e).__name__, str(e)[:200])
  means = compute_means(params, cfg, batches())
  save_means(path, means)
  return means


def check_means(means: Means, cfg: ModelConfig, where: str = "means") -> None:
  """Raises ValueError unless means has every node site of cfg with the right width."""
  for site, width in model_lib.node_sites(cfg).items():
    if site not in means:
      raise ValueError(f"{where}: no mean for node site {site!r}; were they computed for "
                       f"this model? (recompute with compute_means)")
    if np.shape(means[site]) != (width,):
      raise ValueError(f"{where}: mean of {site!r} has shape {np.shape(means[site])}, "
                       f"expected ({width},)")


# --- masks ---


@jax.custom_vjp
def heaviside(tau: jax.Array, temp: jax.Array | float) -> jax.Array:
  """H(tau) = 1 where tau > 0 else 0; gradient sigmoid'(tau / temp) / temp (§4)."""
  return (tau > 0).astype(tau.dtype)


def _heaviside_fwd(tau, temp):
  return heaviside(tau, temp), (tau, temp)


def _heaviside_bwd(res, g):
  tau, temp = res
  s = jax.nn.sigmoid(tau / temp)
  return g * s * (1.0 - s) / temp, jnp.zeros_like(temp)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


class MaskState(NamedTuple):
  """Mask parameters and optimiser state of one (task, k_coef) search."""

  tau_N: jax.Array
  opt_state: Any
  step: jax.Array  # int32; keys the minibatch with (seed, step, task)


def mask_optimizer(ccfg: CircuitConfig) -> optax.GradientTransformation:
  """Clip the gradient norm to 1, then AdamW with linear warmup and linear decay to 0."""
  warm = int(ccfg.warmup_frac * ccfg.steps)
  lr = optax.join_schedules(
      [optax.linear_schedule(0.0, ccfg.lr, max(warm, 1)),
       optax.linear_schedule(ccfg.lr, 0.0, max(ccfg.steps - warm, 1))], [warm])
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=ccfg.b2, weight_decay=ccfg.weight_decay))


def init_mask_state(ccfg: CircuitConfig, n: int, task_id: jax.Array,
                    grid_index: jax.Array | int = 0) -> MaskState:
  """tau ~ N(init_noise_bias, init_noise_scale^2), clamped; keyed by (seed, task, grid index).

  Each k_coef value of a grid starts from its own noise, so the grid doubles as restarts:
  keeping the best circuit guards against an unlucky run. (A run fails when two nodes of a
  chain, e.g. a q channel and the residual read feeding it, drop out together: the forward
  mask is hard, so neither gets a gradient while the other is off.)
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ccfg.seed), 0), task_id)
  key = jax.random.fold_in(key, grid_index)
  tau_N = ccfg.init_noise_bias + ccfg.init_noise_scale * jax.random.normal(key, (n,))
  tau_N = jnp.clip(tau_N, -1.0, 1.0)
  return MaskState(tau_N, mask_optimizer(ccfg).init(tau_N), jnp.zeros((), jnp.int32))


def mask_step(params, means: Means, state: MaskState, arrays: TaskArrays | tuple[TaskArrays, ...],
              k_coef: jax.Array, task_id: jax.Array, *, cfg: ModelConfig, ccfg: CircuitConfig):
  """One mask-training step for one task (vmap it over tasks and k_coef values).

  Args:
    params: model params (shared by all tasks).
    means: {site: mean_C} ablation values.
    state: this search's MaskState.
    arrays: this task's train pairs (leading axis P); a minibatch of `ccfg.batch_size`
      pairs is drawn with replacement, keyed by (seed, step, task_id). Or a tuple of S
      equal-sized strata of them (`train_masks` makes them by length): batch_size / S
      pairs are drawn from each, so the minibatch loss estimates the same mean over all
      pairs, without bias.
    k_coef: penalty per kept node.
    task_id: int, keys the minibatch (and nothing else).
    cfg, ccfg: static configs.

  Returns:
    (new state, {"loss": task loss, "kept": nodes kept}), the metrics before the update.
  """
  strata = (arrays,) if isinstance(arrays, TaskArrays) else tuple(arrays)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ccfg.seed), 1), state.step)
  key = jax.random.fold_in(key, task_id)
  keys = [key] if len(strata) == 1 else [jax.random.fold_in(key, s) for s in range(len(strata))]
  per_stratum = ccfg.batch_size // len(strata)
  batches = []
  for k, stratum in zip(keys, strata):
    idx_b = jax.random.randint(k, (per_stratum,), 0, stratum.tok_P.shape[0])
    batches.append(jax.tree.map(lambda x: x[idx_b], stratum))

  def loss_fn(tau_N):
    m_N = heaviside(tau_N, ccfg.heaviside_temp)
    ablation = node_ablation(m_N, means, cfg)
    d_Bx2 = jnp.concatenate([pair_logit_diff(params, cfg, b, ablation=ablation)
                             for b in batches])
    loss, _ = contrast_loss(d_Bx2)
    kept = jnp.sum(m_N)  # same surrogate gradient: the count is differentiable in tau
    return loss + k_coef * kept, (loss, kept)

  grads_N, (loss, kept) = jax.grad(loss_fn, has_aux=True)(state.tau_N)
  updates_N, opt_state = mask_optimizer(ccfg).update(grads_N, state.opt_state, state.tau_N)
  tau_N = jnp.clip(optax.apply_updates(state.tau_N, updates_N), -1.0, 1.0)
  return MaskState(tau_N, opt_state, state.step + 1), {"loss": loss, "kept": kept}


def task_mesh() -> Mesh | None:
  """A 1-D ("data",) mesh over the local devices, or None when there is one."""
  devices = jax.local_devices()
  return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def put(tree, mesh: Mesh | None, split: bool):
  """Places a tree on the mesh: leading axis split over "data", or replicated."""
  if mesh is None:
    return tree
  spec = PartitionSpec("data") if split else PartitionSpec()
  return jax.device_put(tree, NamedSharding(mesh, spec))


def pad_tasks(tree, multiple: int):
  """Pads the leading (task) axis to a multiple by repeating the last entry."""
  n = jax.tree.leaves(tree)[0].shape[0]
  idx = np.minimum(np.arange(-(-n // multiple) * multiple), n - 1)
  return jax.tree.map(lambda x: x[idx], tree)


@functools.partial(jax.jit, static_argnames=("n", "g", "ccfg"))
def _init_states(task_ids_T: jax.Array, *, n: int, g: int, ccfg: CircuitConfig) -> MaskState:
  """MaskState [T, G, ...]."""
  over_g = lambda t: jax.vmap(lambda i: init_mask_state(ccfg, n, t, i))(jnp.arange(g))
  return jax.vmap(over_g)(task_ids_T)


@functools.partial(jax.jit, static_argnames=("cfg", "ccfg"), donate_argnames=("state",))
def _train_chunk(params, means, state: MaskState, strata: tuple[TaskArrays, ...], k_coef_TxG,
                 task_ids_T, n_steps: jax.Array, *, cfg: ModelConfig, ccfg: CircuitConfig):
  """n_steps (traced: no recompile) vmapped steps; returns the state and last metrics."""
  step = functools.partial(mask_step, cfg=cfg, ccfg=ccfg)
  over_g = jax.vmap(step, in_axes=(None, None, 0, None, 0, None))
  over_tg = jax.vmap(over_g, in_axes=(None, None, 0, 0, 0, 0))
  zeros_TxG = jnp.zeros(k_coef_TxG.shape)
  # Many steps per call: one dispatch, and XLA's temporaries are allocated once per call
  # instead of once per step (on CPU, large fresh buffers cost page faults every call).
  return jax.lax.fori_loop(
      0, n_steps, lambda _, c: over_tg(params, means, c[0], strata, k_coef_TxG, task_ids_T),
      (state, {"loss": zeros_TxG, "kept": zeros_TxG}))


def train_masks(params, cfg: ModelConfig, arrays: TaskArrays, means: Means,
                ccfg: CircuitConfig, k_coefs_G: tuple[float, ...] | None = None, *,
                task_ids: np.ndarray | None = None, progress: bool = False,
                desc: str = "circuit masks"):
  """Trains masks for T tasks x G k_coef values as one jitted, vmapped program.

  Args:
    params: model params.
    cfg: the model config.
    arrays: train pairs of T tasks, stacked (leading axis T).
    means: {site: mean_C}.
    ccfg: circuit config (steps, optimiser, init, seed).
    k_coefs_G: k_coef values searched for every task; default (ccfg.k_coef,).
    task_ids: int per task keying its init noise and minibatches; default 0..T-1.
    progress: show a progress bar (20 updates) with the mean task loss and kept nodes;
      without it all steps run in one call.
    desc: the progress bar's label.

  Returns:
    (tau_TxGxN, {"loss": TxG, "kept": TxG} from the last step), numpy arrays.
  """
  k_coefs_G = tuple(k_coefs_G or (ccfg.k_coef,))
  T, G = arrays.tok_P.shape[0], len(k_coefs_G)
  S = ccfg.train_length_strata
  if arrays.tok_P.shape[1] % S:
    raise ValueError(f"train_masks: {arrays.tok_P.shape[1]} train pairs per task do not split "
                     f"into circuit.train_length_strata={S} equal strata")
  # Strata by length: each is padded only to its own longest pair (task_groups.length_groups).
  strata = (arrays,) if S == 1 else task_groups.length_groups(arrays, S)[0]
  mesh = task_mesh()
  n_dev = 1 if mesh is None else mesh.size
  strata = put(pad_tasks(strata, n_dev), mesh, True)
  task_ids = np.arange(T) if task_ids is None else np.asarray(task_ids)
  task_ids_T = put(pad_tasks(jnp.asarray(task_ids, jnp.int32), n_dev), mesh, True)
  k_coef_TxG = put(jnp.broadcast_to(jnp.asarray(k_coefs_G, jnp.float32),
                                    (task_ids_T.shape[0], G)), mesh, True)
  params, means = put((params, means), mesh, False)
  state = _init_states(task_ids_T, n=n_nodes(cfg), g=G, ccfg=ccfg)
  chunk = -(-ccfg.steps // 20) if progress else ccfg.steps
  with tqdm.tqdm(total=ccfg.steps, desc=desc, disable=not progress) as bar:
    for start in range(0, ccfg.steps, chunk):
      n = min(chunk, ccfg.steps - start)
      state, metrics = _train_chunk(params, means, state, strata, k_coef_TxG, task_ids_T,
                                    jnp.int32(n), cfg=cfg, ccfg=ccfg)
      if progress:
        bar.set_postfix(loss=float(jnp.mean(metrics["loss"][:T])),
                        kept=float(jnp.mean(metrics["kept"][:T])))
        bar.update(n)
  tau_TxGxN, metrics = jax.device_get((state.tau_N[:T], jax.tree.map(lambda x: x[:T], metrics)))
  return np.asarray(tau_TxGxN), {k: np.asarray(v) for k, v in metrics.items()}
