"""The capability-vs-interpretability sweep: grid points, L0 -> densities, aggregation.

A sweep trains, at a fixed depth, every width in `widths` at every total L0 in `l0_targets`
(plus one dense model per width), then finds circuits for every task in every model
(PAPER.md §6, Figs 2-3). This module is pure bookkeeping; `experiments.scale_sweep` runs it.

L0 is the number of nonzero *sparsified* parameters (weight matrices, embeddings,
unembedding, biases); RMSNorm scales, sink logits and the dense bigram table are not counted,
as in the paper's L0 values. A target L0 is split as in the authors' script: with
e = width / base_width, weight matrices keep a fraction rho and embeddings and biases keep
min(1, e * rho) (the script's pfrac/e^2 and pfrac/e), so nonzeros per matrix stay roughly
constant as the model widens.

Aggregation (PAPER.md §4 "Metric"): the headline is the geometric mean of circuit edges
over the paper's fixed 20 tasks (`PAPER_TASKS`) at one target; `induction` is a control,
reported apart and never in a mean. A task counts as solved at a target when its circuit
was found there and also meets the target on the untouched test pairs. A model that fails
tasks does not silently shrink the task set: `model_summary` gives the geometric mean over
the tasks it solves *and* how many of the 20 it fails, and `matched_pairs` compares a
dense and a sparse model over the tasks both solve, with their number.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from sparse_jax import model as model_lib
from sparse_jax import sparsity
from sparse_jax.config import Config, SparsityConfig, TrainConfig, parse_field_overrides
from sparse_jax.task_generators import TASKS

CONTROL_TASKS = ("induction",)  # controls: reported apart, in no geometric mean
PAPER_TASKS = tuple(t for t in TASKS if t not in CONTROL_TASKS)  # the paper's fixed 20


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A grid over widths and L0 targets, all other settings from `base`."""

  base: Config
  widths: tuple[int, ...]  # d_model values; n_head = width // d_head, d_mlp = 4 * width
  l0_targets: tuple[int, ...]  # total nonzero sparsified params of each sparse model
  dense_baseline: bool = True  # plain dense models (no AbsTopK either), see dense_widths
  # The widths that get a dense baseline (None: every width). With dense_ckpt_every, one
  # dense run's checkpoints already span the sparse models' losses, so a laptop sweep can
  # spend its time on sparse widths instead of a dense model per width.
  dense_widths: tuple[int, ...] | None = None
  base_width: int | None = None  # e = width / base_width; default: the smallest width
  # Dense points keep a checkpoint, and validate, every N steps (None: final only). The
  # sweep then also prunes the dense checkpoints whose validation loss brackets each sparse
  # model's: loss-matched dense points along training (`bracketing_steps`).
  dense_ckpt_every: int | None = None
  # Peak lr of the sparse points (None: the base config's optim.lr, which the dense points
  # keep). At the cpu preset's size sparse models train better at 4x the dense models' rate
  # (docs/ablations.md, "Learning rate per kind").
  sparse_lr: float | None = None
  # Training steps of the sparse points (None: the base config's train.steps, which the dense
  # points keep). The dense run's checkpoints give the loss-matched points, so the sparse
  # models can train longer without the dense one (docs/ablations.md, "Steps").
  sparse_steps: int | None = None

  def __post_init__(self):
    if not self.widths:
      raise ValueError("sweep.widths: the grid is empty; give at least one width")
    if not self.l0_targets and not self.dense_baseline:
      raise ValueError("sweep.l0_targets: the grid is empty; give an L0 target or a dense "
                       "baseline")
    for name in ("widths", "l0_targets"):
      values = getattr(self, name)
      if len(set(values)) != len(values):
        dup = sorted(v for v in set(values) if values.count(v) > 1)
        raise ValueError(f"sweep.{name}: duplicate points {dup}")
      if any(not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"sweep.{name}: must be positive integers, got {values}")
    if self.dense_widths is not None:
      stray = sorted(set(self.dense_widths) - set(self.widths))
      if stray or not self.dense_widths:
        raise ValueError(f"sweep.dense_widths: must be a non-empty subset of sweep.widths="
                         f"{self.widths} (or None for all), got {self.dense_widths}")
    every = self.dense_ckpt_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or not 0 < every < self.base.train.steps):
      raise ValueError(f"sweep.dense_ckpt_every: must be None or an integer in "
                       f"[1, train.steps={self.base.train.steps}), got {every!r}")
    lr = self.sparse_lr
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))
                           or not 0 < lr < math.inf):
      raise ValueError(f"sweep.sparse_lr: must be None or a positive finite number, got {lr!r}")
    steps = self.sparse_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps <= 0):
      raise ValueError(f"sweep.sparse_steps: must be None or a positive integer, got {steps!r}")
    d_head = self.base.model.d_head
    bad = [w for w in self.widths if w % d_head]
    if bad:
      raise ValueError(f"sweep.widths: {bad} not multiples of model.d_head={d_head}")


def apply_sweep_overrides(sweep: SweepConfig, overrides: Sequence[str]) -> SweepConfig:
  """sweep with `sweep.field=value` overrides (the sweep CLI's --set) applied."""
  changes = parse_field_overrides(SweepConfig, "sweep", overrides, exclude=("base",))
  return dataclasses.replace(sweep, **changes)


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # directory name, e.g. "d128_l0_60000" or "d128_dense"
  width: int
  l0_target: int | None  # None: dense
  config: Config


@functools.lru_cache(maxsize=64)
def _abstract_params(mcfg):
  return jax.eval_shape(lambda: model_lib.init_params(mcfg, jax.random.PRNGKey(0)))


def param_groups(cfg: Config) -> tuple[int, int]:
  """(weight-matrix params, embedding + unembedding + bias params) that sparsity may prune."""
  abstract = _abstract_params(cfg.model)
  specs = sparsity.leaf_specs(abstract, dataclasses.replace(cfg.sparsity, enabled=True))
  n_mat = sum(s.numel for s in specs.values() if s.sparsified and s.group == "matrix")
  n_emb = sum(s.numel for s in specs.values() if s.sparsified and s.group != "matrix")
  return n_mat, n_emb


def densities_for_l0(l0: int, n_mat: int, n_emb: int, e: float) -> tuple[float, float]:
  """(weight_density rho, embed_density min(1, e*rho)) whose total L0 is about l0."""
  total = lambda rho: rho * n_mat + min(1.0, e * rho) * n_emb
  if l0 >= n_mat + n_emb:
    raise ValueError(f"sweep.l0_targets: L0 {l0} is not smaller than the model's "
                     f"{n_mat + n_emb} sparsifiable params: that model would be dense")
  lo, hi = 0.0, 1.0
  for _ in range(60):  # total is increasing in rho: bisect
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if total(mid) < l0 else (lo, mid)
  return hi, min(1.0, e * hi)


def model_at_width(base: Config, width: int) -> Config:
  d_head = base.model.d_head
  model = dataclasses.replace(base.model, d_model=width, n_head=width // d_head,
                              d_mlp=4 * width)
  return dataclasses.replace(base, model=model)


def grid(sweep: SweepConfig) -> list[Point]:
  """Every point of the sweep, dense baselines first within each width."""
  base_width = sweep.base_width or min(sweep.widths)
  points = []
  for width in sorted(sweep.widths):
    cfg = model_at_width(sweep.base, width)
    if sweep.dense_baseline and width in (sweep.dense_widths or sweep.widths):
      # The paper's dense baselines are plain dense models: no AbsTopK either.
      dense = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, afrac=None),
                                  sparsity=dataclasses.replace(cfg.sparsity, enabled=False),
                                  train=_dense_train(cfg.train, sweep.dense_ckpt_every))
      points.append(Point(f"d{width}_dense", width, None, dense))
    n_mat, n_emb = param_groups(cfg)
    if sweep.sparse_lr is not None:
      cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=sweep.sparse_lr))
    if sweep.sparse_steps is not None:
      cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                               steps=sweep.sparse_steps))
    for l0 in sorted(sweep.l0_targets):
      rho, emb = densities_for_l0(l0, n_mat, n_emb, width / base_width)
      scfg = dataclasses.replace(cfg.sparsity, enabled=True, weight_density=rho,
                                 embed_density=emb)
      _check_neuron_minimum(cfg, scfg, width, l0)
      points.append(Point(f"d{width}_l0_{l0}", width, l0,
                          dataclasses.replace(cfg, sparsity=scfg)))
  return points


def _dense_train(tc: TrainConfig, every: int | None) -> TrainConfig:
  """The dense points' training cadence: with `every`, a kept checkpoint and a validation
  every `every` steps, so that any of them can be pruned as a loss-matched point."""
  if every is None:
    return tc
  return dataclasses.replace(tc, ckpt_every=every, eval_every=every,
                             max_to_keep=-(-tc.steps // every) + 1)


def bracketing_steps(curve: Sequence[tuple[int, float]], loss: float) -> tuple[int, ...]:
  """The steps of one run's checkpoints, `curve` = [(step, validation loss)], whose losses
  bracket `loss`: the closest at or below it and the closest above it (just one where the
  run never crosses `loss`). Pruned, they are a dense model at the sparse model's loss."""
  below = [(l, s) for s, l in curve if l <= loss]
  above = [(l, s) for s, l in curve if l > loss]
  steps = ([max(below)[1]] if below else []) + ([min(above)[1]] if above else [])
  return tuple(sorted(steps))


def _check_neuron_minimum(cfg: Config, scfg: SparsityConfig, width: int, l0: int) -> None:
  """Refuses a point whose densities cannot keep `min_per_neuron` weights in every neuron."""
  try:
    sparsity.leaf_specs(_abstract_params(cfg.model), scfg)
  except ValueError as e:
    raise ValueError(f"sweep point width {width}, L0 {l0}: {e}") from None


# --- aggregation ---


def geomean(values: Sequence[float]) -> float:
  """Geometric mean; an empty circuit (0 edges) counts as 1 edge, so the mean is defined."""
  if not values:
    return math.nan
  return float(math.exp(np.mean(np.log(np.maximum(values, 1)))))


def edges_at(row: dict[str, Any], target: float, tasks: Sequence[str] | None = PAPER_TASKS
             ) -> dict[str, int]:
  """{task: circuit edges} for every task of `tasks` (None: all) the row's model solves at
  `target`: a circuit was found (`solved_point`)."""
  return {task: p["edges"] for task, curve in row["size_vs_target"].items() for p in curve
          if p["target"] == target and solved_point(p) and (tasks is None or task in tasks)}


def solved_point(point: dict[str, Any]) -> bool:
  """A circuit (a `search.by_target` point, or a summary's task) solves its task when it
  meets the target on the selection pairs, by the selection margin, *and* on the test pairs.
  Records written before either check existed count as meeting it."""
  return bool(point.get("meets_target_select", True) and point.get("meets_target_test", True))


def model_summary(row: dict[str, Any], target: float) -> dict[str, Any]:
  """One model at one target: geometric-mean edges over the paper tasks it solves, how many
  of the 20 it fails (unsolvable, unavailable, or failing on the test pairs), and the
  control tasks' edges (None where not solved)."""
  solved = edges_at(row, target)
  controls = edges_at(row, target, CONTROL_TASKS)
  return {"target": target, "n_tasks": len(PAPER_TASKS), "n_solved": len(solved),
          "n_failed": len(PAPER_TASKS) - len(solved),
          "geomean_edges_solved": geomean(list(solved.values())),
          "controls": {t: controls.get(t) for t in CONTROL_TASKS}}


def targets_of(rows: Sequence[dict[str, Any]]) -> list[float]:
  return sorted({p["target"] for r in rows for c in r["size_vs_target"].values() for p in c})


def frontier(rows: Sequence[dict[str, Any]], target: float) -> tuple[list[str], dict[str, float]]:
  """(paper tasks every model solves at target, {model: geometric-mean edges over them}):
  the y axis of the paper's Fig 3, whose geometric mean runs over shared tasks."""
  per_row = [edges_at(r, target) for r in rows]
  shared = sorted(set.intersection(*(set(e) for e in per_row))) if rows else []
  return shared, {r["name"]: geomean([e[t] for t in shared]) for r, e in zip(rows, per_row)}


def matched_pairs(rows: Sequence[dict[str, Any]], target: float) -> list[dict[str, Any]]:
  """For each sparse model, the dense model nearest in validation loss, and the
  dense/sparse ratio of geometric-mean edges over the paper tasks both solve at `target`
  (`shared_tasks`; `n_shared` of them). Dense rows include pruned checkpoints along a dense
  run (`run`, `step`); where two of one run bracket the sparse model's loss, `interpolated`
  also gives the dense run's edges interpolated to that loss (`interpolate`). Sorted by the
  validation-loss gap, closest first."""
  dense = [r for r in rows if r["l0_target"] is None]
  out = []
  for s in (r for r in rows if r["l0_target"] is not None):
    if not dense:
      break
    d = min(dense, key=lambda r: abs(r["val_loss"] - s["val_loss"]))
    e_s, e_d = edges_at(s, target), edges_at(d, target)
    shared = sorted(set(e_s) & set(e_d))
    ge_s = geomean([e_s[t] for t in shared])
    ge_d = geomean([e_d[t] for t in shared])
    out.append({"target": target, "sparse": s["name"], "dense": d["name"],
                "val_loss_sparse": s["val_loss"], "val_loss_dense": d["val_loss"],
                "loss_gap": abs(s["val_loss"] - d["val_loss"]), "shared_tasks": shared,
                "n_shared": len(shared), "n_failed_sparse": len(PAPER_TASKS) - len(e_s),
                "n_failed_dense": len(PAPER_TASKS) - len(e_d),
                "geomean_edges_sparse": ge_s, "geomean_edges_dense": ge_d,
                "ratio_dense_over_sparse": ge_d / ge_s if shared else math.nan,
                "interpolated": interpolate(s, dense, target)})
  return sorted(out, key=lambda p: p["loss_gap"])


def interpolate(sparse: dict[str, Any], dense: Sequence[dict[str, Any]], target: float
                ) -> dict[str, Any] | None:
  """The dense frontier at the sparse model's validation loss, as the paper plots it: two
  rows of one dense run (two checkpoints, or the final model and one) whose losses bracket
  the sparse model's, log geometric-mean edges linear in loss between them, over the paper
  tasks all three solve. Of several runs, the one sharing most tasks. None if no run
  brackets the sparse loss or no task is shared."""
  loss, e_s = sparse["val_loss"], edges_at(sparse, target)
  best = None
  for run in sorted({r.get("run", r["name"]) for r in dense}):
    curve = [r for r in dense if r.get("run", r["name"]) == run]
    steps = bracketing_steps([(i, r["val_loss"]) for i, r in enumerate(curve)], loss)
    if len(steps) != 2:
      continue
    lo, hi = sorted((curve[i] for i in steps), key=lambda r: r["val_loss"])
    e_lo, e_hi = edges_at(lo, target), edges_at(hi, target)
    shared = sorted(set(e_s) & set(e_lo) & set(e_hi))
    if not shared or (best and len(shared) <= best["n_shared"]):
      continue
    w = (loss - lo["val_loss"]) / (hi["val_loss"] - lo["val_loss"])
    g_lo, g_hi = (geomean([e[t] for t in shared]) for e in (e_lo, e_hi))
    ge_d = math.exp((1 - w) * math.log(g_lo) + w * math.log(g_hi))
    ge_s = geomean([e_s[t] for t in shared])
    best = {"dense_run": run, "below": lo["name"], "above": hi["name"], "weight_above": w,
            "shared_tasks": shared, "n_shared": len(shared), "geomean_edges_dense": ge_d,
            "geomean_edges_sparse": ge_s, "ratio_dense_over_sparse": ge_d / ge_s}
  return best
