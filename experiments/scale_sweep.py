"""The main job: capability vs interpretability of sparse and dense models (PAPER.md §6).

  python -m experiments.scale_sweep [--preset cpu] [--out DIR] [--list] [--only I]
                                    [--collect [--match]] [--tasks a,b|all] [--add RUN ...]
                                    [--set section.field=value ...]

Trains every grid point (widths x L0 targets, plus dense models at the dense widths), finds a
circuit for every task in every model, and writes into --out: results.csv / results.json (a
row per model), frontier.png (pretraining loss vs geometric-mean circuit edges, Fig 3),
circuit_size_vs_task_loss.png (a sparse and a dense model matched on pretraining loss,
Fig 2) and report.md. Each point is an ordinary train + prune workdir under OUT/points/,
so rerunning skips finished points and finishes partial ones; `--only I` runs one point
(array jobs, pod slices), `--collect` only aggregates what exists. The same steps are
importable (`make_sweep`, `run_sweep`, `collect`) for notebooks/colab_tpu.ipynb.

Loss matching: with the sweep's `dense_ckpt_every`, dense points keep a checkpoint every N
steps, and once every point is finished the sweep prunes the dense checkpoints whose
validation loss brackets each sparse model's (for the tasks that sparse model solves), so a
sparse model is compared with a dense one at its own loss, and interpolated between the two
(`sweep.interpolate`). Array jobs run `--collect --match` after their last point.

`--add RUN` puts a run from outside the grid into the same tables and figures: any run pruned
by `experiments.prune` at the sweep's target, e.g. one of the authors' models made into a run
by `experiments.import_model`. It counts as sparse (its measured L0 standing in for a target)
when at most half of its sparsifiable params are nonzero, as dense otherwise. A run without
metrics.jsonl (an imported one) gets its validation loss evaluated on the batches training
would have logged, tokenised with the run's own tokenizer: losses compare only between models
that share a tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax

from experiments import cli
from experiments import presets
from experiments import prune as prune_lib
from experiments import sweep_report
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax.circuits import file_stem
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import sparsity
from sparse_jax import sweep as sweep_lib
from sparse_jax import train as train_lib
from sparse_jax.config import apply_overrides

log = logging.getLogger("experiments.scale_sweep")  # not __name__: that is "__main__" under -m
_REDO = "delete it to redo that stage"


def _training_done(workdir: Path, steps: int) -> bool:
  return (workdir / ckpt_lib.CKPT_DIR / str(steps)).is_dir()


def _pruning_done(circuits_dir: Path, circuit_cfg, tasks: list[str] | None = None) -> bool:
  """Whether circuits exist in circuits_dir for this circuit config and task list (None:
  all tasks)."""
  path = circuits_dir / "summary.json"
  if not path.exists():
    return False
  summary = fileio.read_json(path, _REDO)
  return (summary.get("circuit_config") == json.loads(json.dumps(dataclasses.asdict(circuit_cfg)))
          and summary.get("requested_tasks") == tasks)


def _ckpt_circuits(workdir: Path, step: int) -> Path:
  """Where a loss-matched dense checkpoint's circuits go (the final model's: circuits/)."""
  return workdir / f"circuits_step{step}"


def run_point(point: sweep_lib.Point, out: Path, *, tasks: list[str] | None = None,
              progress: bool = True) -> None:
  """Trains (or resumes) and prunes one grid point for `tasks` (None: all); finished stages
  are skipped."""
  workdir = out / "points" / point.name
  timing_path = workdir / "timing.json"
  timing = fileio.read_json(timing_path, _REDO) if timing_path.exists() else {}
  if not _training_done(workdir, point.config.train.steps):
    t0 = time.perf_counter()
    train_lib.train(point.config, workdir, progress=progress)
    timing["train_s"] = timing.get("train_s", 0.0) + time.perf_counter() - t0
  else:
    ckpt_lib.check_or_write_config(workdir, point.config)  # refuses a changed sweep config
  if not _pruning_done(workdir / "circuits", point.config.circuit, tasks):
    t0 = time.perf_counter()
    prune_lib.prune(workdir, task_names=tasks, circuit_cfg=point.config.circuit,
                    progress=progress)
    timing["prune_s"] = time.perf_counter() - t0
  if not timing_path.exists() or fileio.read_json(timing_path) != timing:
    fileio.atomic_write_text(timing_path, json.dumps(timing))


def point_row(point: sweep_lib.Point, out: Path, tasks: list[str] | None = None,
              step: int | None = None) -> dict | None:
  """The results row of a finished point, or None if it is not finished. With `step`, the
  row of that pruned checkpoint of a dense point (a loss-matched point; `match_dense`)."""
  workdir = out / "points" / point.name
  circuits_dir = workdir / "circuits" if step is None else _ckpt_circuits(workdir, step)
  if step is None and not (_training_done(workdir, point.config.train.steps)
                           and _pruning_done(circuits_dir, point.config.circuit, tasks)):
    return None
  if step is not None and not (circuits_dir / "summary.json").exists():
    return None
  row = run_row(workdir, point.name, point.width, point.l0_target, circuits_dir)
  if step is not None:
    row["name"] = f"{point.name}@{row['step']}"
    row["timing"] = {"prune_s": row["timing"].get(f"prune_step{row['step']}_s")}
  return row


def added_row(workdir: str | Path, target: float) -> dict:
  """The row of a run outside the grid (`--add`): its circuits in RUN/circuits, searched at
  `target`; sparse (l0_target = its L0) when at most half its sparsifiable params are
  nonzero, dense (None) otherwise."""
  workdir = Path(workdir)
  path = workdir / "circuits" / "summary.json"
  if not path.exists():
    raise ValueError(f"--add {workdir}: no {path.relative_to(workdir)}; find its circuits "
                     f"first: python -m experiments.prune --workdir {workdir} "
                     f"--target-loss {target}")
  found_at = fileio.read_json(path, _REDO)["target_loss"]
  if found_at != target:
    raise ValueError(f"--add {workdir}: its circuits were searched at target {found_at}, "
                     f"the sweep's is {target}; find them again (this rewrites "
                     f"{path.parent}): python -m experiments.prune --workdir {workdir} "
                     f"--target-loss {target}")
  row = run_row(workdir, workdir.name, None, None)
  row["l0_target"] = row["l0"] if 2 * row["l0"] <= row["sparsifiable_params"] else None
  # Its config's densities are no targets it was trained to (an imported run has defaults).
  row["weight_density"] = row["measured_density"].get("matrix", 1.0)
  row["embed_density"] = row["measured_density"].get("embed", 1.0)
  return row


def tasks_solved(tasks: dict[str, dict]) -> int:
  """How many of a circuits summary's tasks are solved: a circuit was found on the selection
  pairs *and* meets the target on the test pairs (the report's definition of solved)."""
  return sum(1 for s in tasks.values()
             if s["solvable"] and s.get("meets_target_test") and sweep_lib.solved_point(s))


def run_row(workdir: Path, name: str, width: int | None, l0_target: int | None,
            circuits_dir: Path | None = None) -> dict:
  """The results row of a run pruned into circuits_dir (default RUN/circuits; width None:
  its d_model), at the checkpoint its circuits were found in. The validation loss is the one
  metrics.jsonl logged at that step; without one (an imported model, or a checkpoint between
  validations) it is evaluated on the same batches."""
  circuits_dir = circuits_dir or workdir / "circuits"
  summary = fileio.read_json(circuits_dir / "summary.json", _REDO)
  cfg, params, at = ckpt_lib.load_params(workdir, summary.get("step"))
  # Which params count (not their densities): min_per_neuron's check is for training.
  specs = sparsity.leaf_specs(params, dataclasses.replace(cfg.sparsity, enabled=True,
                                                          min_per_neuron=0))
  stats = sparsity.l0_stats(params, specs)
  numel = {}
  for spec in specs.values():
    numel[spec.group] = numel.get(spec.group, 0) + spec.numel
  l0 = sum(v for k, v in stats.items() if k.startswith("sparsity/l0/"))
  val = [r["val/loss"] for r in train_lib.read_metrics(workdir)
         if "val/loss" in r and r["step"] == at]
  if not val:
    tokenizer = data_lib.load_tokenizer(workdir)
    val = [train_lib.validation_loss(params, cfg, data_lib.prepare_data(cfg,
                                                                        tokenizer=tokenizer))]
  found = {t: s for t, s in summary["tasks"].items() if s["solvable"]}  # incl. test misses
  curves = {}
  for task in summary["tasks"]:
    rec = fileio.read_json(circuits_dir / f"{file_stem(task)}.json", _REDO)
    curves[task] = rec.get("search", {}).get("by_target", [])
  timing_path = workdir / "timing.json"
  timing = fileio.read_json(timing_path, _REDO) if timing_path.exists() else {}
  return {
      "name": name, "run": name, "step": at, "workdir": str(workdir),
      "width": width or cfg.model.d_model, "n_layer": cfg.model.n_layer,
      "l0_target": l0_target, "total_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "sparsifiable_params": int(sum(s.numel for s in specs.values() if s.sparsified)),
      "l0": int(l0), "weight_density": cfg.sparsity.weight_density if cfg.sparsity.enabled
      else 1.0, "embed_density": cfg.sparsity.embed_density if cfg.sparsity.enabled else 1.0,
      "measured_density": {g: stats[f"sparsity/l0_group/{g}"] / n for g, n in numel.items()
                           if g in ("matrix", "embed", "bias")},
      "val_loss": val[-1] if val else math.nan, "tasks_available": len(summary["tasks"]),
      "tasks_solved": tasks_solved(summary["tasks"]),
      "task_edges": {t: s["edges"] for t, s in found.items()},
      "task_meets_target_test": {t: s.get("meets_target_test") for t, s in found.items()},
      "task_meets_target_select": {t: s.get("meets_target_select") for t, s in found.items()},
      "task_nodes": {t: s["n_nodes"] for t, s in found.items()},
      "task_loss_full": {t: s["loss_full"] for t, s in summary["tasks"].items()},
      "size_vs_target": curves, "unavailable": summary["unavailable"],
      "timing": timing}


def _val_curve(workdir: Path) -> list[tuple[int, float]]:
  """[(step, validation loss)] at the run's kept checkpoints."""
  kept = set(ckpt_lib.checkpoint_steps(workdir))
  return [(r["step"], r["val/loss"]) for r in train_lib.read_metrics(workdir)
          if "val/loss" in r and r["step"] in kept]


def _solved_tasks(row: dict) -> set[str]:
  """The tasks a model solves at some target (their circuits are worth comparing)."""
  return {t for t, curve in row["size_vs_target"].items()
          if any(sweep_lib.solved_point(p) for p in curve)}


def match_dense(sweep: sweep_lib.SweepConfig, out: Path, *, tasks: list[str] | None = None,
                progress: bool = True) -> None:
  """Prunes, in every finished dense point that kept checkpoints along training, the
  checkpoints whose validation loss brackets a finished sparse model's, for the tasks that
  sparse model solves (only those enter its ratio). Finished ones are skipped."""
  if sweep.dense_ckpt_every is None:
    return
  points = sweep_lib.grid(sweep)
  sparse = [r for r in (point_row(p, out, tasks) for p in points if p.l0_target is not None)
            if r is not None]
  for p in (p for p in points if p.l0_target is None):
    workdir = out / "points" / p.name
    if not _training_done(workdir, p.config.train.steps):
      continue
    wanted: dict[int, set[str]] = {}
    for s in sparse:
      for step in sweep_lib.bracketing_steps(_val_curve(workdir), s["val_loss"]):
        if step != p.config.train.steps:  # the final model is pruned already
          wanted.setdefault(step, set()).update(_solved_tasks(s))
    for step, names in sorted(wanted.items()):
      names = sorted(names)
      circuits_dir = _ckpt_circuits(workdir, step)
      if not names or _pruning_done(circuits_dir, p.config.circuit, names):
        continue
      log.info("loss-matched checkpoint %s@%d: %s", p.name, step, ", ".join(names))
      t0 = time.perf_counter()
      prune_lib.prune(workdir, task_names=names, circuit_cfg=p.config.circuit,
                      out=circuits_dir, step=step, progress=progress)
      timing_path = workdir / "timing.json"
      timing = fileio.read_json(timing_path, _REDO) if timing_path.exists() else {}
      timing[f"prune_step{step}_s"] = time.perf_counter() - t0
      fileio.atomic_write_text(timing_path, json.dumps(timing))


def checkpoint_rows(sweep: sweep_lib.SweepConfig, out: Path) -> list[dict]:
  """The rows of every pruned loss-matched dense checkpoint."""
  rows = []
  for p in (p for p in sweep_lib.grid(sweep) if p.l0_target is None):
    workdir = out / "points" / p.name
    steps = sorted(int(d.name.removeprefix("circuits_step"))
                   for d in workdir.glob("circuits_step*") if d.name[13:].isdigit())
    rows += [r for r in (point_row(p, out, step=s) for s in steps) if r is not None]
  return rows


def make_sweep(preset: str, overrides: list[str] = (), *, widths: tuple[int, ...] | None = None,
               l0_targets: tuple[int, ...] | None = None) -> sweep_lib.SweepConfig:
  """The preset's sweep with `section.field=value` overrides applied to its base config
  (`sweep.field=value` ones to the sweep itself, e.g. sweep.sparse_lr=0.04), and optionally
  fewer (or other) widths and L0 targets than the preset's grid. The base width stays the
  preset's, so every point keeps the config it has in the full grid."""
  sweep = sweep_lib.apply_sweep_overrides(
      presets.get_sweep(preset), [o for o in overrides if o.startswith("sweep.")])
  overrides = [o for o in overrides if not o.startswith("sweep.")]
  grid = {k: tuple(v) for k, v in (("widths", widths), ("l0_targets", l0_targets))
          if v is not None}
  grid["base_width"] = sweep.base_width or min(sweep.widths)
  if widths is not None and sweep.dense_widths is not None:
    # The preset's dense widths that remain; a cut that keeps none gets a dense model at
    # every width it has (its points still need a dense model to be matched with).
    grid["dense_widths"] = tuple(w for w in sweep.dense_widths if w in widths) or None
  return dataclasses.replace(sweep, base=apply_overrides(sweep.base, list(overrides)), **grid)


def describe_grid(sweep: sweep_lib.SweepConfig) -> str:
  """One line per grid point: index, name, size, densities, peak lr and steps (`--list`
  prints it)."""
  lines = []
  for i, p in enumerate(sweep_lib.grid(sweep)):
    m, s = p.config.model, p.config.sparsity
    dens = (f"weight density {s.weight_density:.4f}, embed {s.embed_density:.4f}"
            if s.enabled else "dense")
    lines.append(f"{i:3d}  {p.name:24s} d_model={m.d_model} n_layer={m.n_layer} {dens}, "
                 f"lr {p.config.optim.lr:g}, {p.config.train.steps} steps")
  return "\n".join(lines)


def run_sweep(sweep: sweep_lib.SweepConfig, out: str | Path, *, only: int | None = None,
              tasks: list[str] | None = None, progress: bool = True) -> None:
  """Trains and prunes every point (or point `only`), skipping what is already finished;
  after all points, prunes the loss-matched dense checkpoints (`match_dense`)."""
  points = sweep_lib.grid(sweep)
  if only is not None and not 0 <= only < len(points):
    raise ValueError(f"--only {only}: the grid has points 0..{len(points) - 1}")
  todo = points if only is None else [points[only]]
  for i, p in enumerate(todo):
    log.info("sweep point %d/%d: %s", i + 1, len(todo), p.name)
    run_point(p, Path(out), tasks=tasks, progress=progress)
  if only is None:  # needs every point: an array job runs --collect --match after its last
    match_dense(sweep, Path(out), tasks=tasks, progress=progress)


def collect(sweep: sweep_lib.SweepConfig, out: str | Path, *, command: str,
            tasks: list[str] | None = None, added: list[str | Path] = ()) -> dict:
  """Aggregates every finished point, and the `added` runs (see `added_row`), into
  results.{csv,json}, the plots and report.md."""
  out = Path(out)
  points = sweep_lib.grid(sweep)
  primary = sweep.base.circuit.target_loss
  names = [p.name for p in points] + [Path(w).name for w in added]
  clash = sorted({n for n in names if names.count(n) > 1})
  if clash:
    raise ValueError(f"--add: run name(s) {clash} already taken by a grid point or another "
                     "added run; rename the run directory")
  rows = [r for r in (point_row(p, out, tasks) for p in points) if r is not None]
  missing = [p.name for p in points if not any(r["name"] == p.name for r in rows)]
  rows += [added_row(w, primary) for w in added]
  # Pruned dense checkpoints were searched for the tasks of the sparse models they match
  # only: they enter the loss matching, and the frontier as extra points over its shared
  # tasks (where they solve them all), but not the model table or the shared-task sets.
  ckpt_rows = checkpoint_rows(sweep, out)
  targets = sorted(set(sweep_lib.targets_of(rows)) | {primary})
  frontiers = {t: sweep_lib.frontier(rows, t) for t in targets}
  pairs = {t: sweep_lib.matched_pairs(rows + ckpt_rows, t) for t in targets}
  for r in rows:
    r["geomean_edges"] = frontiers[primary][1][r["name"]]
    r["geomean_tasks"] = len(frontiers[primary][0])
    r["geomean_edges_by_target"] = {str(t): frontiers[t][1][r["name"]] for t in targets}
    # The headline per model: over the paper tasks it solves, with how many it fails.
    r["summary_by_target"] = {str(t): sweep_lib.model_summary(r, t) for t in targets}
    r["geomean_edges_solved"] = r["summary_by_target"][str(primary)]["geomean_edges_solved"]
    r["paper_tasks_failed"] = r["summary_by_target"][str(primary)]["n_failed"]
  results = {"rows": rows, "added": [Path(w).name for w in added], "target": primary,
             "targets": targets,
             "paper_tasks": list(sweep_lib.PAPER_TASKS),
             "control_tasks": list(sweep_lib.CONTROL_TASKS),
             "shared_tasks": {str(t): f[0] for t, f in frontiers.items()},
             "matched_pairs": {str(t): p for t, p in pairs.items()}, "missing_points": missing,
             "checkpoint_rows": ckpt_rows}
  fileio.atomic_write_text(out / "results.json", json.dumps(results, indent=1))
  _write_csv(rows, targets, out / "results.csv")
  sweep_report.write_figures(rows, frontiers, pairs, primary, out, ckpt_rows)
  sweep_report.write_report(sweep, rows, frontiers, pairs, missing, out, command=command,
                            ckpt_rows=ckpt_rows, added=results["added"])
  return results


_CSV_FIELDS = ("name", "width", "n_layer", "total_params", "sparsifiable_params", "l0_target",
               "l0", "weight_density", "embed_density", "val_loss", "tasks_available",
               "tasks_solved", "geomean_edges", "geomean_tasks", "geomean_edges_solved",
               "paper_tasks_failed")


def _write_csv(rows: list[dict], targets: list[float], path: Path) -> None:
  tasks = sorted({t for r in rows for t in r["task_loss_full"]})

  def write(tmp: Path):
    with open(tmp, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(list(_CSV_FIELDS) + [f"geomean_edges@{t}" for t in targets]
                 + [f"edges/{t}" for t in tasks])
      for r in rows:
        w.writerow([r.get(k) for k in _CSV_FIELDS]
                   + [r["geomean_edges_by_target"][str(t)] for t in targets]
                   + [r["task_edges"].get(t, "") for t in tasks])
  fileio.atomic_write(path, write)


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=presets.PRESETS)
  parser.add_argument("--out", default=None, help="output directory (default runs/sweep_<preset>)")
  parser.add_argument("--list", action="store_true", help="print the grid points and exit")
  parser.add_argument("--only", type=int, default=None, metavar="I", help="run point I only")
  parser.add_argument("--collect", action="store_true", help="only aggregate finished points")
  parser.add_argument("--match", action="store_true",
                      help="with --collect: first prune the loss-matched dense checkpoints")
  parser.add_argument("--tasks", default="all",
                      help="comma-separated task names to find circuits for, or all")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.FIELD=VALUE",
                      help="override the base config, or the sweep (sweep.sparse_lr=0.04)")
  parser.add_argument("--add", action="append", default=[], metavar="RUN",
                      help="also aggregate this pruned run (e.g. an imported model)")
  parser.add_argument("--no-progress", action="store_true")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first; run on every host")
  args = parser.parse_args(argv)
  out = Path(args.out or f"runs/sweep_{args.preset}")
  sweep = make_sweep(args.preset, args.overrides)
  points = sweep_lib.grid(sweep)
  if args.list:
    print(describe_grid(sweep))
    return 0
  if args.only is not None and not 0 <= args.only < len(points):
    raise ValueError(f"--only {args.only}: the grid has points 0..{len(points) - 1}")
  tasks = prune_lib.task_list(args.tasks)
  fileio.check_writable_dir(out, "--out")  # before hours of training, not after
  if args.distributed:
    jax.distributed.initialize()
  if not args.collect:
    run_sweep(sweep, out, only=args.only, tasks=tasks, progress=not args.no_progress)
  elif args.match:
    match_dense(sweep, out, tasks=tasks, progress=not args.no_progress)
  command = "python -m experiments.scale_sweep " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
  results = collect(sweep, out, command=command.strip(), tasks=tasks, added=args.add)
  n_points = len(results["rows"]) + len(results["missing_points"])
  print(f"wrote {out}/report.md ({len(results['rows'])} of {n_points} points finished)")
  return 0


if __name__ == "__main__":
  cli.run(main)
