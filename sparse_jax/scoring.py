"""Scoring discretised circuits: batched evaluation, logit calibration, bisection of k (§4).

A candidate circuit is a unit u (a task, or a task x k_coef grid value, with its node
ranking) and a k: it keeps the k top-ranked nodes and mean-ablates the rest (or, inverted,
ablates only those k). `Evaluator` computes the tok-minus-alt logit differences d_CxPx2 of
many candidates on one split of the task pairs in fixed-size vmapped chunks, and `Scores`
turns them into the contrast loss twice: raw, and after a scale and shift of d fitted by
`fit_logit_scale_shift` (PAPER.md §4: discretised circuits are badly calibrated, so the
paper scores them after 16 L-BFGS steps of this fit). The fit comes from the split being
scored (selection) or is passed in (test: the selection split's fit, never refitted).
`bisect_k` finds the smallest passing k per unit with a batched (candidates+1)-ary search.

Splits (`split_heldout`): a `TaskSet`'s held-out pairs are the selection pairs followed by
the test pairs (`CircuitConfig.n_select_pairs`, `n_heldout_pairs`); build such a TaskSet
with `circuit_taskset`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_jax import masks
from sparse_jax import task_groups
from sparse_jax import tasks as tasks_lib
from sparse_jax.config import CircuitConfig, ModelConfig
from sparse_jax.tasks import (TaskArrays, TaskSet, contrast_loss, contrast_loss_se,
                              pair_logit_diff)


# --- splits ---


def circuit_taskset(tokenizer, names: Sequence[str] | None, ccfg: CircuitConfig, *,
                    max_len: int) -> TaskSet:
  """Tasks for `find_circuits`: train pairs, then selection + test pairs as `heldout`."""
  return tasks_lib.build_taskset(tokenizer, names, n_train=ccfg.n_train_pairs,
                                 n_heldout=ccfg.n_select_pairs + ccfg.n_heldout_pairs,
                                 seed=ccfg.seed, max_len=max_len)


def split_heldout(taskset: TaskSet, ccfg: CircuitConfig) -> tuple[TaskArrays, TaskArrays]:
  """(selection, test) arrays: the first n_select_pairs held-out pairs, then the rest."""
  P, want = taskset.heldout.tok_P.shape[1], ccfg.n_select_pairs + ccfg.n_heldout_pairs
  if P != want:
    raise ValueError(f"taskset.heldout: {P} pairs per task, but circuit.n_select_pairs + "
                     f"circuit.n_heldout_pairs = {ccfg.n_select_pairs} + "
                     f"{ccfg.n_heldout_pairs} = {want} (build it with circuit_taskset)")
  n = ccfg.n_select_pairs
  return (jax.tree.map(lambda x: x[:, :n], taskset.heldout),
          jax.tree.map(lambda x: x[:, n:], taskset.heldout))


def seen_in_selection(select: TaskArrays, test: TaskArrays) -> np.ndarray:
  """Per task, how many test pairs repeat a selection pair token for token (user task
  files with few distinct pairs are cycled to fill both splits; generated tasks never)."""
  sel, tst = np.asarray(select.tokens_Px2xL), np.asarray(test.tokens_Px2xL)
  out = []
  for s_PxS, t_PxS in zip(sel.reshape(*sel.shape[:2], -1), tst.reshape(*tst.shape[:2], -1)):
    seen = {row.tobytes() for row in s_PxS}
    out.append(sum(row.tobytes() in seen for row in t_PxS))
  return np.array(out, np.int64)


# --- batched evaluation of circuits ---


@functools.partial(jax.jit, static_argnames=("cfg",))
def _circuit_d(params, means, groups_T: tuple[TaskArrays, ...], rank_UxN, task_U, unit_C, k_C,
               invert_C, *, cfg: ModelConfig):
  """d_CxPx2 (pairs in group order) of candidate circuits: unit u keeps its k top-ranked
  nodes (or all others)."""

  def one(u, k, invert):
    keep_N = (rank_UxN[u] < k) != invert
    ablation = masks.node_ablation(keep_N.astype(jnp.float32), means, cfg)
    return jnp.concatenate([
        pair_logit_diff(params, cfg, jax.tree.map(lambda x: x[task_U[u]], group),
                        ablation=ablation) for group in groups_T])

  return jax.vmap(one)(unit_C, k_C, invert_C)


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


class Scores(NamedTuple):
  """Per candidate circuit (leading axis C): contrast loss, its standard error over the
  pairs, and accuracy, raw and after the logit scale + shift `ab_Cx2` (a, b: d -> a * d + b)."""

  loss: np.ndarray
  acc: np.ndarray
  loss_se: np.ndarray
  loss_cal: np.ndarray
  acc_cal: np.ndarray
  loss_cal_se: np.ndarray
  ab_Cx2: np.ndarray

  def row(self, i: int) -> "Scores":
    return Scores(*(x[i] for x in self))

  def se(self, calibrated: bool) -> np.ndarray:
    """The standard error of the loss `criterion` reads."""
    return self.loss_cal_se if calibrated else self.loss_se

  def criterion(self, calibrated: bool, margin_se: float = 0.0) -> np.ndarray:
    """The loss a circuit must bring to the target (calibrated, or raw), plus `margin_se`
    standard errors of it (`CircuitConfig.select_margin_se`, applied on the selection pairs)."""
    loss = self.loss_cal if calibrated else self.loss
    return loss + margin_se * self.se(calibrated) if margin_se else loss


@jax.jit
def _score(d_CxPx2: jax.Array, ab_Cx2: jax.Array):
  one = lambda d_Px2: (*contrast_loss(d_Px2), contrast_loss_se(d_Px2))
  return (*jax.vmap(one)(d_CxPx2),
          *jax.vmap(one)(ab_Cx2[:, :1, None] * d_CxPx2 + ab_Cx2[:, 1:, None]))


class Evaluator:
  """Evaluates many candidate circuits in fixed-size vmapped chunks (one compile per split
  size: splits with as many pairs share a program).

  Each split's pairs are evaluated in `n_groups` groups by length
  (`task_groups.length_groups`: exact up to float rounding, and on the 20 tasks about 40%
  fewer token positions than padding every pair to the longest); `d` returns them in the
  split's own order.
  """

  def __init__(self, params, cfg: ModelConfig, splits: dict[str, TaskArrays], means,
               max_seqs: int, lbfgs_steps: int, n_groups: int = 1, max_units: int = 0):
    """`max_units` > 0 pads every rank table to that many rows, so that `set_ranks` calls
    with up to that many units share one compiled program (each new row count recompiles
    the whole vmapped forward: 25-35 s on a 2-core CPU at the cpu preset)."""
    self.cfg, self.mesh, self.lbfgs_steps = cfg, masks.task_mesh(), lbfgs_steps
    self.max_units = max_units
    n_dev = 1 if self.mesh is None else self.mesh.size
    self.chunk, self.order, groups = {}, {}, {}
    for split, arrays in splits.items():
      groups[split], self.order[split] = task_groups.length_groups(arrays, n_groups)
      chunk = max(1, max_seqs // (2 * arrays.tok_P.shape[1]))
      self.chunk[split] = -(-chunk // n_dev) * n_dev  # the chunk axis is split over devices
    # Splits of equal size share one program: each group padded to its longest over them
    # (compiling a program of many groups costs more than the few columns added).
    for size in {a.tok_P.shape for a in splits.values()}:
      same = [split for split, a in splits.items() if a.tok_P.shape == size]
      L_G = np.max([[g.tokens_Px2xL.shape[-1] for g in groups[s]] for s in same], axis=0)
      for s in same:
        groups[s] = tuple(task_groups.pad_columns(g, L) for g, L in zip(groups[s], L_G))
    self.params, self.means, self.groups = masks.put((params, means, groups), self.mesh, False)

  def set_ranks(self, rank_UxN: np.ndarray, task_U: np.ndarray) -> None:
    """Unit u keeps nodes by rank_UxN[u] and is scored on task task_U[u]."""
    rank_UxN, self.task_U = np.asarray(rank_UxN, np.int32), np.asarray(task_U, np.int32)
    U = len(self.task_U)
    if self.max_units and U > self.max_units:
      raise ValueError(f"Evaluator.set_ranks: {U} units, over max_units={self.max_units}")
    pad = max(self.max_units - U, 0)  # padded rows are never indexed: units are < U
    self.rank, self.task = masks.put((jnp.asarray(np.pad(rank_UxN, ((0, pad), (0, 0)))),
                                      jnp.asarray(np.pad(self.task_U, (0, pad)))),
                                     self.mesh, False)

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
      outs.append(_circuit_d(self.params, self.means, self.groups[split], self.rank, self.task,
                             *args, cfg=self.cfg))
    d_CxPx2 = np.concatenate(jax.device_get(outs))[:C]
    return task_groups.ungroup(d_CxPx2, self.order[split][self.task_U[unit_C]])

  def scores(self, split: str, unit_C, k_C, invert_C=None, ab_Cx2=None) -> Scores:
    """Scores of candidates on a split; the scale + shift is fitted on this split's d unless
    `ab_Cx2` is given."""
    d_CxPx2 = self.d(split, unit_C, k_C, invert_C)
    C, chunk = len(d_CxPx2), self.chunk[split]
    idx = np.minimum(np.arange(-(-C // chunk) * chunk), C - 1)  # pad with repeats
    outs = []
    for s in range(0, len(idx), chunk):  # fixed-size blocks: one compile of the fit per split
      d = jnp.asarray(d_CxPx2[idx[s:s + chunk]])
      ab = (fit_logit_scale_shift(d, self.lbfgs_steps) if ab_Cx2 is None
            else jnp.asarray(np.asarray(ab_Cx2, np.float32)[idx[s:s + chunk]]))
      outs.append((*_score(d, ab), ab))
    return Scores(*(np.concatenate(x)[:C] for x in zip(*jax.device_get(outs))))


# --- discretisation ---


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


def bisect_k(loss_fn, n: int, loss_empty_U: np.ndarray, target: float, candidates: int = 8,
             known_U: Sequence[dict[int, float]] | None = None):
  """Smallest k per unit with loss(k) <= target, by a batched (candidates+1)-ary search.

  Args:
    loss_fn: (unit_C, k_C) -> loss_C, evaluating many candidates in one batched call.
    n: number of nodes; loss(n) <= target is assumed (the full model meets the target).
    loss_empty_U: loss(0) per unit; units meeting the target with k = 0 get k = 0.
    target: loss to reach.
    candidates: k values tried per unit per round.
    known_U: per unit, losses {k: loss} already measured (e.g. while bisecting for another
      target). They narrow the first bracket, keeping the invariant on measured scores:
      hi is the smallest known k that meets the target, lo the largest known k below it
      that misses.

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
  for u, known in enumerate(known_U or ()):
    if empty_ok[u]:
      continue
    meets = [k for k, loss in known.items() if 0 < k < n and loss <= target]
    if meets:
      hi[u] = min(meets)
      loss_hi[u] = known[hi[u]]
    lo[u] = max([k for k, loss in known.items() if 0 < k < hi[u] and loss > target], default=0)
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
