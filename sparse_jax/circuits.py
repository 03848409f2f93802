"""Circuit search end to end: masks -> discrete circuits -> edges, checks, records (PAPER.md §4).

`find_circuits(params, cfg, taskset, means, circuit_cfg)` finds, for every task at once,
the smallest set of nodes that still does the task with every other node mean-ablated:

1. Solvable? The unablated model's held-out loss must meet the target (default 0.15). A
   task it misses is reported unsolvable (with its loss), and not searched.
2. Train masks for the solvable tasks (x a k_coef grid, if set) as one vmapped program
   (`masks.train_masks`).
3. Discretise (§4 "bisect for the k that exactly reaches the target"): rank nodes by tau
   (descending, ties by node index) and bisect k, the number kept, to the smallest circuit
   whose held-out loss meets the target. Loss is assumed monotone in k; it is not exactly,
   so the search keeps the invariant "k = lo fails, k = hi meets" on losses it actually
   measured, and returns hi: the result always meets the target, and one node fewer in the
   ranking does not. Each round evaluates `candidates` evenly spaced k for every task in
   batched, vmapped calls (a (candidates+1)-ary search).
4. With a k_coef grid, keep per task the circuit with the fewest edges (then nodes, then
   loss, then the earlier grid value).
5. Calibrate (§4): fit d' = a * d + b to the tok-minus-alt logit difference on train pairs
   with 16 steps of `optax.lbfgs`; in a two-way softmax this is every scale and shift of
   the final logits that matters. Report the held-out loss before and after.
6. Checks: sufficiency (the circuit alone, held-out) and necessity (ablate only the circuit's
   nodes, keep the rest: "inverse pruning", Fig 32).

Each task gives a `Circuit` record; `save_circuit` writes its JSON and graph PNG.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_jax import edges as edges_lib
from sparse_jax import masks
from sparse_jax.config import CircuitConfig, ModelConfig
from sparse_jax.fileio import atomic_write_text
from sparse_jax.tasks import TaskArrays, TaskSet, contrast_loss, pair_logit_diff

MAX_JSON_EDGES = 2000  # edges listed in a circuit's JSON (largest |weight| first)


@dataclasses.dataclass
class Circuit:
  """One task's circuit; losses are held-out per-sequence contrast losses (nats)."""

  task: str
  target: float
  solvable: bool
  reason: str  # why not solvable; "" when solvable
  loss_full: float  # unablated model
  loss_empty: float  # every node mean-ablated
  k_coef: float | None = None  # the k_coef whose circuit was kept
  n_nodes: int = 0
  nodes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # site -> channel ids
  edges: dict[str, int] = dataclasses.field(default_factory=dict)  # total, per kind, residual
  loss_before: float | None = None  # circuit only, everything else mean-ablated
  loss_after: float | None = None  # the same after the logit scale + shift fit
  logit_scale: float | None = None
  logit_shift: float | None = None
  sufficiency: dict[str, Any] = dataclasses.field(default_factory=dict)
  necessity: dict[str, Any] = dataclasses.field(default_factory=dict)
  search: dict[str, Any] = dataclasses.field(default_factory=dict)  # training, grid results
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  edge_list: list[Any] = dataclasses.field(default_factory=list)  # edges.Edge tuples

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["edge_list"] = [list(e) for e in self.edge_list[:MAX_JSON_EDGES]]
    d["edge_list_complete"] = len(self.edge_list) <= MAX_JSON_EDGES
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "Circuit":
    d = json.loads(text)
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class _Found(NamedTuple):
  """A discretised circuit of one unit (task x grid value) at one target."""

  k: int  # nodes kept (the top k by mask parameter)
  loss: float  # its held-out loss
  nodes: dict[str, list[int]]
  edges: dict[str, int]


# --- batched evaluation of circuits ---


@functools.partial(jax.jit, static_argnames=("cfg",))
def _circuit_d(params, means, arrays_T: TaskArrays, rank_UxN, task_U, unit_C, k_C, invert_C,
               *, cfg: ModelConfig):
  """d_CxPx2 of candidate circuits: unit u keeps its k top-ranked nodes (or all others)."""

  def one(u, k, invert):
    keep_N = (rank_UxN[u] < k) != invert
    arrays = jax.tree.map(lambda x: x[task_U[u]], arrays_T)
    ablation = masks.node_ablation(keep_N.astype(jnp.float32), means, cfg)
    return pair_logit_diff(params, cfg, arrays, ablation=ablation)

  return jax.vmap(one)(unit_C, k_C, invert_C)


_losses_accs = jax.jit(jax.vmap(contrast_loss))


class _Evaluator:
  """Evaluates many candidate circuits in fixed-size vmapped chunks (one compile per split)."""

  def __init__(self, params, cfg: ModelConfig, taskset: TaskSet, means, max_seqs: int):
    self.cfg, self.mesh = cfg, masks.task_mesh()
    n_dev = 1 if self.mesh is None else self.mesh.size
    self.params, self.means, self.splits = masks.put(
        (params, means, {"train": taskset.train, "heldout": taskset.heldout}), self.mesh, False)
    self.chunk = {}
    for split, arrays in self.splits.items():
      chunk = max(1, max_seqs // (2 * arrays.tok_P.shape[1]))
      self.chunk[split] = -(-chunk // n_dev) * n_dev  # the chunk axis is split over devices

  def set_ranks(self, rank_UxN: np.ndarray, task_U: np.ndarray) -> None:
    self.rank, self.task = masks.put((jnp.asarray(rank_UxN, jnp.int32),
                                      jnp.asarray(task_U, jnp.int32)), self.mesh, False)

  def d(self, split: str, unit_C, k_C, invert_C=None) -> np.ndarray:
    """d_CxPx2 for candidates (unit, k, invert); invert keeps everything but the top k."""
    unit_C, k_C = np.asarray(unit_C, np.int32), np.asarray(k_C, np.int32)
    invert_C = np.zeros(len(unit_C), bool) if invert_C is None else np.asarray(invert_C, bool)
    C, chunk = len(unit_C), self.chunk[split]
    idx = np.minimum(np.arange(-(-C // chunk) * chunk), C - 1)  # pad with repeats
    outs = []
    for s in range(0, len(idx), chunk):
      args = masks.put(tuple(jnp.asarray(a[idx[s:s + chunk]]) for a in (unit_C, k_C, invert_C)),
                       self.mesh, True)
      outs.append(_circuit_d(self.params, self.means, self.splits[split], self.rank, self.task,
                             *args, cfg=self.cfg))
    return np.concatenate(jax.device_get(outs))[:C]

  def loss(self, split: str, unit_C, k_C, invert_C=None) -> tuple[np.ndarray, np.ndarray]:
    loss_C, acc_C = _losses_accs(self.d(split, unit_C, k_C, invert_C))
    return np.asarray(loss_C), np.asarray(acc_C)


def rank_nodes(tau_UxN: np.ndarray) -> np.ndarray:
  """rank_UxN: 0 for the largest tau; ties go to the lower node index (stable sort)."""
  order_UxN = np.argsort(-tau_UxN, axis=1, kind="stable")
  rank_UxN = np.empty_like(order_UxN)
  np.put_along_axis(rank_UxN, order_UxN, np.arange(tau_UxN.shape[1])[None], axis=1)
  return rank_UxN


def _spread(lo: int, hi: int, n: int) -> np.ndarray:
  """n ascending integers strictly inside (lo, hi), evenly spaced (repeats if too few)."""
  if hi - lo - 1 <= n:
    inside = np.arange(lo + 1, hi)
    return inside[np.minimum(np.arange(n), len(inside) - 1)]
  return np.round(np.linspace(lo, hi, n + 2)[1:-1]).astype(np.int64)


def bisect_k(loss_fn, n: int, loss_empty_U: np.ndarray, target: float, candidates: int = 8):
  """Smallest k per unit with loss(k) <= target, by a batched (candidates+1)-ary search.

  Args:
    loss_fn: (unit_C, k_C) -> loss_C, evaluating many candidates in one batched call.
    n: number of nodes; loss(n) <= target is assumed (the full model meets the target).
    loss_empty_U: loss(0) per unit; units meeting the target with k = 0 get k = 0.
    target: loss to reach.
    candidates: k values tried per unit per round.

  Returns:
    (k_U, loss_U): loss_U = loss(k_U) <= target, measured (or loss_empty for k = 0); and
    loss(k_U - 1) > target was measured too (or k_U is 0). The k found is the smallest only
    if loss is monotone in k.
  """
  U = len(loss_empty_U)
  lo, hi = np.zeros(U, np.int64), np.full(U, n, np.int64)
  loss_hi = np.full(U, np.nan)
  empty_ok = loss_empty_U <= target
  hi[empty_ok], loss_hi[empty_ok] = 0, loss_empty_U[empty_ok]
  while True:
    active = np.flatnonzero(hi - lo > 1)
    if not active.size:
      break
    k_AxE = np.stack([_spread(lo[u], hi[u], candidates) for u in active])
    loss_AxE = loss_fn(np.repeat(active, candidates), k_AxE.ravel()).reshape(k_AxE.shape)
    for row, u in enumerate(active):
      ok = loss_AxE[row] <= target
      if ok.any():
        j = int(np.argmax(ok))
        hi[u], loss_hi[u] = k_AxE[row, j], loss_AxE[row, j]
        lo[u] = k_AxE[row, j - 1] if j else lo[u]
      else:
        lo[u] = k_AxE[row, -1]
  need = np.isnan(loss_hi)  # hi is still n: never measured inside the loop
  if need.any():
    loss_hi[need] = loss_fn(np.flatnonzero(need), hi[need])
  return hi, loss_hi


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_logit_scale_shift(d_TxPx2: jax.Array, steps: int = 16) -> jax.Array:
  """(a, b) per task minimising the contrast loss of a * d + b, by `steps` L-BFGS steps."""

  def one(d_Px2):
    loss_fn = lambda ab: contrast_loss(ab[0] * d_Px2 + ab[1])[0]
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def body(_, carry):
      ab, state = carry
      value, grad = value_and_grad(ab, state=state)
      updates, state = opt.update(grad, state, ab, value=value, grad=grad, value_fn=loss_fn)
      return optax.apply_updates(ab, updates), state

    ab0 = jnp.array([1.0, 0.0])
    ab, _ = jax.lax.fori_loop(0, steps, body, (ab0, opt.init(ab0)))
    # A degenerate d (all zero) can give a non-finite step: keep the identity then.
    return jnp.where(jnp.all(jnp.isfinite(ab)), ab, ab0)

  return jax.vmap(one)(d_TxPx2)


# --- the driver ---


def _check_taskset(taskset: TaskSet, cfg: ModelConfig) -> None:
  for split in ("train", "heldout"):
    tokens = getattr(taskset, split).tokens_Px2xL
    if tokens.shape[-1] > cfg.block_size:
      raise ValueError(f"taskset.{split}: sequences are {tokens.shape[-1]} tokens, over "
                       f"model.block_size={cfg.block_size}")
    if int(jnp.max(tokens)) >= cfg.vocab_size:
      raise ValueError(f"taskset.{split}: token ids reach {int(jnp.max(tokens))}, outside "
                       f"model.vocab_size={cfg.vocab_size}: built with another tokenizer?")


def find_circuits(params, cfg: ModelConfig, taskset: TaskSet, means, circuit_cfg: CircuitConfig,
                  *, progress: bool = True) -> list[Circuit]:
  """Finds one circuit per task of `taskset`, all tasks at once (module docstring).

  Args:
    params: model params.
    cfg: the model config.
    taskset: tasks with train pairs (mask training, calibration) and held-out pairs
      (bisection target, reported losses, checks).
    means: {site: mean_C} from `masks.compute_means` over pretraining batches.
    circuit_cfg: search settings; `k_coef_grid`, if set, is searched for every task;
      `bisect_candidates` k values are evaluated per task per bisection round, in calls of
      at most `eval_max_seqs` sequences.
    progress: show a progress bar while training masks.

  Returns:
    A `Circuit` per task, in `taskset.names` order.
  """
  ccfg = circuit_cfg
  masks.check_means(means, cfg)
  _check_taskset(taskset, cfg)
  T, N, target = len(taskset.names), masks.n_nodes(cfg), ccfg.target_loss
  settings = dataclasses.asdict(ccfg)
  ev = _Evaluator(params, cfg, taskset, means, ccfg.eval_max_seqs)

  ev.set_ranks(np.zeros((T, N)), np.arange(T))  # k = N keeps all, k = 0 none
  loss_full, _ = ev.loss("heldout", np.arange(T), np.full(T, N))
  loss_empty, _ = ev.loss("heldout", np.arange(T), np.zeros(T))
  out = [Circuit(name, target, bool(loss_full[t] <= target), "", float(loss_full[t]),
                 float(loss_empty[t]), settings=settings) for t, name in enumerate(taskset.names)]
  for c in out:
    if not c.solvable:
      c.reason = (f"the unablated model's held-out loss {c.loss_full:.4f} is above the "
                  f"target {target}")
      logging.warning("task %s unsolvable: %s", c.task, c.reason)
  # Tasks are searched if the full model meets the loosest target (extra_targets give the
  # circuit-size-vs-target curve of PAPER.md Fig 2 from the same trained masks).
  targets = sorted({target, *ccfg.extra_targets})
  searched = np.flatnonzero(loss_full <= targets[-1])
  if not searched.size:
    return out

  grid_G = tuple(ccfg.k_coef_grid) or (ccfg.k_coef,)
  G = len(grid_G)
  train_S = jax.tree.map(lambda x: x[searched], taskset.train)
  # Each task's noise and minibatches are keyed by its name, not its place in the list.
  ids_S = [zlib.crc32(taskset.names[t].encode()) & 0x7FFFFFFF for t in searched]
  tau_SxGxN, train_metrics = masks.train_masks(params, cfg, train_S, means, ccfg, grid_G,
                                               task_ids=ids_S, progress=progress)
  task_U = np.repeat(searched, G)  # unit u = (searched task u // G, grid value u % G)
  rank_UxN = rank_nodes(tau_SxGxN.reshape(-1, N))
  ev.set_ranks(rank_UxN, task_U)
  np_params = jax.device_get(params)
  by_target = {}  # target -> {unit: _Found} over the units whose task can meet it
  for t in targets:
    units = np.flatnonzero(loss_full[task_U] <= t)
    k_U, loss_U = bisect_k(lambda u, k: ev.loss("heldout", units[u], k)[0], N,
                           loss_empty[task_U[units]], t, ccfg.bisect_candidates)
    by_target[t] = {}
    for u, k, loss in zip(units, k_U, loss_U):
      nodes = masks.nodes_from_keep(rank_UxN[u] < k, cfg)
      by_target[t][u] = _Found(k, loss, nodes, edges_lib.count_edges(nodes, np_params, cfg))
  # Per searched task (row) and target, the grid value with the fewest edges, then nodes,
  # then loss, then the earlier grid value.
  best = {}
  for row, task in enumerate(searched):
    curve = []
    for t in targets:
      units = [u for u in range(row * G, row * G + G) if u in by_target[t]]
      if units:
        f = by_target[t]
        u = best[t, row] = min(units, key=lambda u: (f[u].edges["total"], f[u].k, f[u].loss, u))
        curve.append({"target": t, "n_nodes": int(f[u].k), "edges": int(f[u].edges["total"]),
                      "loss": float(f[u].loss)})
    out[task].search["by_target"] = curve
  rows = [row for row in range(len(searched)) if (target, row) in best]
  if not rows:
    return out

  # Calibration and checks for the chosen circuits at the primary target.
  primary = by_target[target]
  best_S = [best[target, row] for row in rows]
  k_S = np.array([primary[u].k for u in best_S])
  d_train = ev.d("train", best_S, k_S)
  d_held = ev.d("heldout", best_S, k_S)
  ab_Sx2 = np.asarray(fit_logit_scale_shift(jnp.asarray(d_train), ccfg.lbfgs_steps))
  loss_b, acc_b = _losses_accs(jnp.asarray(d_held))
  loss_a, acc_a = _losses_accs(ab_Sx2[:, :1, None] * d_held + ab_Sx2[:, 1:, None])
  loss_n, acc_n = ev.loss("heldout", best_S, k_S, np.ones(len(best_S), bool))
  for s, (row, u) in enumerate(zip(rows, best_S)):
    c, g, found = out[searched[row]], u % G, primary[u]
    c.k_coef, c.n_nodes, c.nodes, c.edges = grid_G[g], int(found.k), found.nodes, found.edges
    c.loss_before, c.loss_after = float(loss_b[s]), float(loss_a[s])
    c.logit_scale, c.logit_shift = float(ab_Sx2[s, 0]), float(ab_Sx2[s, 1])
    c.sufficiency = {"loss": float(loss_b[s]), "acc": float(acc_b[s]),
                     "loss_calibrated": float(loss_a[s]), "acc_calibrated": float(acc_a[s]),
                     "meets_target": bool(loss_b[s] <= target)}
    c.necessity = {"loss": float(loss_n[s]), "acc": float(acc_n[s])}
    grid = [primary[row * G + j] for j in range(G)]
    c.search.update({
        "n_nodes_total": N, "d_head": cfg.d_head,
        "train_final_loss": float(train_metrics["loss"][row, g]),
        "train_final_kept": int(train_metrics["kept"][row, g]),
        "grid": [{"k_coef": grid_G[j], "n_nodes": int(f.k), "edges": f.edges["total"],
                  "loss": float(f.loss)} for j, f in enumerate(grid)]})
    c.edge_list = edges_lib.list_edges(c.nodes, np_params, cfg)
  return out


def file_stem(task: str) -> str:
  """A file name for a task (user task files are named "file:PATH")."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("._") or "task"


def save_circuit(circuit: Circuit, out_dir: str) -> tuple[str, str]:
  """Writes `<task>.json` and the graph `<task>.png` into out_dir; returns their paths."""
  from sparse_jax import viz  # matplotlib is imported only when plotting

  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, file_stem(circuit.task))
  atomic_write_text(base + ".json", circuit.to_json())
  viz.plot_circuit(circuit, base + ".png")
  return base + ".json", base + ".png"
