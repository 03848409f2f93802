"""Circuit search end to end: masks -> discrete circuits -> edges, checks, records (PAPER.md §4).

`find_circuits(params, cfg, taskset, means, circuit_cfg)` finds, for every task at once,
the smallest set of nodes that still does the task with every other node mean-ablated.
Each task's pairs come in three disjoint splits (`scoring.circuit_taskset`): *train* pairs
train the masks; *selection* pairs choose everything that is chosen (solvability, k, the
k_coef grid value, the logit scale + shift); *test* pairs are touched once, at the end,
and give every reported loss and check, so a circuit that only passes on the pairs it was
chosen on shows as such (`sufficiency["meets_target"]` false).

1. Solvable? The unablated model's selection loss must meet the target (default 0.15). A
   task it misses is reported unsolvable (with its loss), and not searched.
2. Train masks for the solvable tasks (x a k_coef grid, if set) as one vmapped program
   (`masks.train_masks`) on the train pairs.
3. Discretise (§4 "bisect for the k that exactly reaches the target"): rank nodes by tau
   (descending, ties by node index) and bisect k, the number kept, to the smallest circuit
   whose selection score meets the target. The score is the contrast loss after a scale
   and shift of the logit difference fitted to that circuit on the selection pairs (§4:
   discretised circuits are badly calibrated; `scoring.fit_logit_scale_shift`, 16 L-BFGS
   steps; with `calibrate=False`, the raw loss). Loss is assumed monotone in k; it is not
   exactly, so the search keeps the invariant "k = lo fails, k = hi meets" on scores it
   actually measured, and returns hi: the result meets the target on the selection pairs,
   and one node fewer in the ranking does not (`scoring.bisect_k`). Targets are searched
   tightest first, and every score measured so far narrows the next target's first bracket.
   "Meets" at selection means loss + `select_margin_se` standard errors (over the selection
   pairs) <= target: bisecting to exactly the target picks whichever k's noise fell low, so
   a large circuit whose loss creeps up to the target would pass on the test pairs about
   half the time (a winner's curse); a small one whose loss drops far below it is unaffected.
4. With a k_coef grid, keep per task the circuit with the fewest edges (then nodes, then
   selection score, then the earlier grid value).
5. Test: the chosen circuit's loss on the test pairs, raw (`loss_before`) and with the
   selection pairs' scale + shift (`loss_after`); sufficiency (the circuit alone) and
   necessity (ablate only the circuit's nodes, keep the rest: "inverse pruning", Fig 32).

Losses are per-sequence mean contrast losses (nats), half the authors' stored pair sum.
Each task gives a `Circuit` record; `save_circuit` writes its JSON and graph PNG.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np

from sparse_jax import edges as edges_lib
from sparse_jax import masks
from sparse_jax.config import CircuitConfig, ModelConfig
from sparse_jax.fileio import atomic_write_text
from sparse_jax.scoring import (Evaluator, Scores, bisect_k, circuit_taskset,
                                fit_logit_scale_shift, rank_nodes, seen_in_selection,
                                split_heldout)
from sparse_jax.tasks import TaskSet

__all__ = ["Circuit", "bisect_k", "circuit_taskset", "file_stem", "find_circuits",
           "fit_logit_scale_shift", "rank_nodes", "save_circuit"]

MAX_JSON_EDGES = 2000  # edges listed in a circuit's JSON (largest |weight| first)


@dataclasses.dataclass
class Circuit:
  """One task's circuit; losses are per-sequence contrast losses (nats) on the test pairs."""

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
  qk_pairs: int = 0  # kept q-k channel pairs (not weights, so not edges; edges.py)
  loss_before: float | None = None  # circuit only, everything else mean-ablated
  loss_after: float | None = None  # the same after the (selection pairs') scale + shift fit
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
  select: Scores  # its scores on the selection pairs (one row), incl. the scale + shift
  nodes: dict[str, list[int]]
  edges: dict[str, int]
  qk_pairs: int


def _identity(n: int) -> np.ndarray:
  """n (scale, shift) pairs that leave the logit difference as it is."""
  return np.tile(np.array([1.0, 0.0], np.float32), (n, 1))


def _check_taskset(taskset: TaskSet, cfg: ModelConfig) -> None:
  for split in ("train", "heldout"):
    tokens = getattr(taskset, split).tokens_Px2xL
    if tokens.shape[-1] > cfg.block_size:
      raise ValueError(f"taskset.{split}: sequences are {tokens.shape[-1]} tokens, over "
                       f"model.block_size={cfg.block_size}")
    if int(np.max(tokens)) >= cfg.vocab_size:
      raise ValueError(f"taskset.{split}: token ids reach {int(np.max(tokens))}, outside "
                       f"model.vocab_size={cfg.vocab_size}: built with another tokenizer?")


def find_circuits(params, cfg: ModelConfig, taskset: TaskSet, means, circuit_cfg: CircuitConfig,
                  *, progress: bool = True) -> list[Circuit]:
  """Finds one circuit per task of `taskset`, all tasks at once (module docstring).

  Args:
    params: model params.
    cfg: the model config.
    taskset: tasks with train pairs (mask training) and held-out pairs: the
      `n_select_pairs` selection pairs, then the `n_heldout_pairs` test pairs
      (`scoring.circuit_taskset` builds it).
    means: {site: mean_C} from `masks.compute_means` over pretraining batches.
    circuit_cfg: search settings; `k_coef_grid`, if set, is searched for every task;
      `bisect_candidates` k values are evaluated per task per bisection round, in calls of
      at most `eval_max_seqs` sequences.
    progress: show a progress bar while training masks.

  Returns:
    A `Circuit` per task, in `taskset.names` order.
  """
  ccfg, cal = circuit_cfg, circuit_cfg.calibrate
  masks.check_means(means, cfg)
  _check_taskset(taskset, cfg)
  select, test = split_heldout(taskset, ccfg)
  T, N, target = len(taskset.names), masks.n_nodes(cfg), ccfg.target_loss
  settings = dataclasses.asdict(ccfg)
  grid_G = tuple(ccfg.k_coef_grid) or (ccfg.k_coef,)
  G = len(grid_G)
  # Rank tables of T (the solvability check) and up to T x G units (the search) rows share
  # one compiled evaluation program.
  ev = Evaluator(params, cfg, {"select": select, "test": test}, means, ccfg.eval_max_seqs,
                 ccfg.lbfgs_steps, ccfg.eval_length_groups, max_units=T * G)

  ev.set_ranks(np.zeros((T, N)), np.arange(T))  # k = N keeps all, k = 0 none
  every, full, none = np.arange(T), np.full(T, N), np.zeros(T)
  # The model itself must do the task: its raw (uncalibrated) loss decides solvability.
  full_select = ev.scores("select", every, full, ab_Cx2=_identity(T)).loss
  full_test = ev.scores("test", every, full, ab_Cx2=_identity(T)).loss
  empty_test = ev.scores("test", every, none, ab_Cx2=_identity(T)).loss
  empty_select = ev.scores("select", every, none, ab_Cx2=_identity(T)).loss
  seen_T = seen_in_selection(select, test)
  out = [Circuit(name, target, bool(full_select[t] <= target), "", float(full_test[t]),
                 float(empty_test[t]), settings=settings,
                 search={"loss_full_select": float(full_select[t]),
                         "loss_empty_select": float(empty_select[t]),
                         "test_pairs_seen_in_selection": int(seen_T[t])})
         for t, name in enumerate(taskset.names)]
  for c in out:
    if not c.solvable:
      c.reason = (f"the unablated model's loss {c.search['loss_full_select']:.4f} on the "
                  f"selection pairs is above the target {target}")
      logging.warning("task %s unsolvable: %s", c.task, c.reason)
    if c.search["test_pairs_seen_in_selection"]:
      logging.warning("task %s: %d of %d test pairs repeat a selection pair (too few distinct "
                      "pairs): its test figures are not independent", c.task,
                      c.search["test_pairs_seen_in_selection"], ccfg.n_heldout_pairs)
  # Tasks are searched if the full model meets the loosest target (extra_targets give the
  # circuit-size-vs-target curve of PAPER.md Fig 2 from the same trained masks).
  targets = sorted({target, *ccfg.extra_targets})
  searched = np.flatnonzero(full_select <= targets[-1])
  if not searched.size:
    return out

  train_S = jax.tree.map(lambda x: x[searched], taskset.train)
  # Each task's noise and minibatches are keyed by its name, not its place in the list.
  ids_S = [zlib.crc32(taskset.names[t].encode()) & 0x7FFFFFFF for t in searched]
  tau_SxGxN, train_metrics = masks.train_masks(params, cfg, train_S, means, ccfg, grid_G,
                                               task_ids=ids_S, progress=progress)
  task_U = np.repeat(searched, G)  # unit u = (searched task u // G, grid value u % G)
  rank_UxN = rank_nodes(tau_SxGxN.reshape(-1, N))
  ev.set_ranks(rank_UxN, task_U)
  np_params = jax.device_get(params)
  cache: dict[tuple[int, int], Scores] = {}  # (unit, k) -> its selection scores

  def select_scores(unit_C, k_C) -> list[Scores]:
    keys = list(zip(np.asarray(unit_C).tolist(), np.asarray(k_C).tolist()))
    todo = list(dict.fromkeys(key for key in keys if key not in cache))
    if todo:
      scores = ev.scores("select", *np.array(todo).T)  # each fitted on its own selection d
      cache.update({key: scores.row(i) for i, key in enumerate(todo)})
    return [cache[key] for key in keys]

  margin = ccfg.select_margin_se  # selection must clear the target by this many SEs
  score = lambda rows: np.array([float(r.criterion(cal, margin)) for r in rows])
  by_target = {}  # target -> {unit: _Found} over the units whose task can meet it
  for t in targets:
    units = np.flatnonzero(full_select[task_U] <= t)
    # Every circuit already scored (at the other targets) narrows this target's search.
    known = collections.defaultdict(dict)  # unit -> {k: selection score}
    for (u, k), scores in cache.items():
      known[u][k] = float(scores.criterion(cal, margin))
    known_U = [known[u] for u in units.tolist()]
    k_U, _ = bisect_k(lambda u, k: score(select_scores(units[u], k)), N,
                      score(select_scores(units, np.zeros(len(units), np.int64))), t,
                      ccfg.bisect_candidates, known_U)
    by_target[t] = {}
    for u, k in zip(units.tolist(), k_U.tolist()):
      nodes = masks.nodes_from_keep(rank_UxN[u] < k, cfg)
      by_target[t][u] = _Found(k, select_scores([u], [k])[0], nodes,
                               edges_lib.count_edges(nodes, np_params, cfg),
                               edges_lib.count_qk_pairs(nodes, cfg))
  # Per searched task (row) and target, the grid value with the fewest edges, then nodes,
  # then selection score, then the earlier grid value.
  best = {}
  for row in range(len(searched)):
    for t in targets:
      f = by_target[t]
      units = [u for u in range(row * G, row * G + G) if u in f]
      if units:
        best[t, row] = min(units, key=lambda u: (f[u].edges["total"], f[u].k,
                                                 float(f[u].select.criterion(cal)), u))
  if not best:
    return out
  # The test pairs, once, for every chosen circuit: scored with its selection fit.
  chosen = list(best)
  found = [by_target[t][best[t, row]] for t, row in chosen]
  tested = ev.scores("test", [best[key] for key in chosen], [f.k for f in found],
                     ab_Cx2=np.stack([f.select.ab_Cx2 for f in found]))
  test_of = {key: tested.row(i) for i, key in enumerate(chosen)}
  for row, task in enumerate(searched):
    curve = []
    for t in targets:
      if (t, row) in best:
        f, s = by_target[t][best[t, row]], test_of[t, row]
        curve.append({"target": t, "n_nodes": f.k, "edges": f.edges["total"],
                      "qk_pairs": f.qk_pairs, "loss": float(f.select.criterion(cal)),
                      "loss_se": float(f.select.se(cal)),
                      "meets_target_select": bool(f.select.criterion(cal, margin) <= t),
                      "loss_test": float(s.criterion(cal)),
                      "loss_test_uncalibrated": float(s.loss),
                      "meets_target_test": bool(s.criterion(cal) <= t)})
    out[task].search["by_target"] = curve
  rows = [row for row in range(len(searched)) if (target, row) in best]
  if not rows:
    return out

  # Checks for the chosen circuits at the primary target, on the test pairs.
  best_S = [best[target, row] for row in rows]
  k_S = [by_target[target][u].k for u in best_S]
  necessity = ev.scores("test", best_S, k_S, np.ones(len(best_S), bool),
                        ab_Cx2=_identity(len(best_S)))
  for s, (row, u) in enumerate(zip(rows, best_S)):
    c, g, f, te = out[searched[row]], u % G, by_target[target][u], test_of[target, row]
    c.k_coef, c.n_nodes, c.nodes = grid_G[g], f.k, f.nodes
    c.edges, c.qk_pairs = f.edges, f.qk_pairs
    c.loss_before, c.loss_after = float(te.loss), float(te.loss_cal)
    c.logit_scale, c.logit_shift = (float(x) for x in f.select.ab_Cx2)
    meets = bool(te.criterion(cal) <= target)
    c.sufficiency = {
        "split": "test", "scored": "calibrated" if cal else "uncalibrated",
        "loss": float(te.loss), "acc": float(te.acc), "loss_calibrated": float(te.loss_cal),
        "acc_calibrated": float(te.acc_cal), "meets_target": meets, "meets_target_test": meets,
        "meets_target_uncalibrated": bool(te.loss <= target),
        "select": {"loss": float(f.select.loss), "acc": float(f.select.acc),
                   "loss_calibrated": float(f.select.loss_cal),
                   "acc_calibrated": float(f.select.acc_cal),
                   "loss_se": float(f.select.loss_se),
                   "loss_calibrated_se": float(f.select.loss_cal_se), "margin_se": margin,
                   "meets_target": bool(f.select.criterion(cal, margin) <= target)}}
    c.necessity = {"split": "test", "loss": float(necessity.loss[s]),
                   "acc": float(necessity.acc[s])}
    grid = [by_target[target][row * G + j] for j in range(G)]
    c.search.update({
        "n_nodes_total": N, "d_head": cfg.d_head,
        "train_final_loss": float(train_metrics["loss"][row, g]),
        "train_final_kept": int(train_metrics["kept"][row, g]),
        "grid": [{"k_coef": grid_G[j], "n_nodes": gf.k, "edges": gf.edges["total"],
                  "qk_pairs": gf.qk_pairs, "loss": float(gf.select.criterion(cal))}
                 for j, gf in enumerate(grid)]})
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
