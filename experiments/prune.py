"""CLI: find each task's circuit in a trained run.

  python -m experiments.prune --workdir RUN [--tasks a,b|all] [--target-loss 0.15]
                              [--out DIR] [--step N] [--set circuit.field=value ...]

Loads the run's latest good checkpoint (or --step), its tokenizer and config; computes (once
per checkpoint and data setting, cached as RUN/means_<step>_<key>.npz) the mean activation of
every node site over validation batches of the pretraining data; builds the tasks with the
run's tokenizer; trains node masks for all tasks as one vmapped program; writes one JSON and
one graph PNG per task plus summary.json into --out (default RUN/circuits).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from pathlib import Path

from experiments import cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import circuits as circuits_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import masks
from sparse_jax.config import CircuitConfig, apply_overrides


def find_at_step(workdir: str | Path, *, task_names: list[str] | None, circuit_cfg: CircuitConfig,
                 step: int | None = None, means_dir: str | Path | None = None,
                 progress: bool = True):
  """(step, params, cfg, taskset, circuits) of one checkpoint (latest good one by default).

  The means are cached as means_<step>_<key>.npz in means_dir (default: the run directory).
  """
  workdir = Path(workdir)
  cfg, params, step = ckpt_lib.load_params(workdir, step)
  ccfg = circuit_cfg
  means_dir = Path(means_dir if means_dir is not None else workdir)
  # Written only after the search's first stage: prove it can be, before it starts.
  fileio.check_writable_dir(means_dir, "the means cache directory")
  tokenizer = data_lib.load_tokenizer(workdir)
  taskset = circuits_lib.circuit_taskset(tokenizer, task_names, ccfg,
                                         max_len=min(128, cfg.model.block_size))
  means = circuit_means(means_dir, step, params, cfg, ccfg, tokenizer)
  found = circuits_lib.find_circuits(params, cfg.model, taskset, means, ccfg, progress=progress)
  return step, params, cfg, taskset, found


def task_list(spec: str) -> list[str] | None:
  """"a,b" -> ["a", "b"]; "all" -> None (every task); a list of no names is an error."""
  if spec == "all":
    return None
  names = [t.strip() for t in spec.split(",") if t.strip()]
  if not names:
    raise ValueError(f"--tasks {spec!r}: no task names; give a comma-separated list or all")
  return names


def prune(workdir: str | Path, *, task_names: list[str] | None = None,
          circuit_cfg: CircuitConfig | None = None, out: str | Path | None = None,
          step: int | None = None, progress: bool = True) -> dict:
  """Finds and saves circuits for a run; returns the summary written to out/summary.json."""
  workdir = Path(workdir)
  ccfg = circuit_cfg or ckpt_lib.load_config(workdir).circuit
  out = Path(out) if out is not None else workdir / "circuits"
  fileio.check_writable_dir(out, "--out")  # before the search, not after it
  step, _, _, taskset, found = find_at_step(workdir, task_names=task_names, circuit_cfg=ccfg,
                                            step=step, progress=progress)
  for circuit in found:
    circuits_lib.save_circuit(circuit, str(out))
  summary = {
      "workdir": str(workdir), "step": step, "target_loss": ccfg.target_loss,
      "circuit_config": dataclasses.asdict(ccfg), "requested_tasks": task_names,
      "unavailable": taskset.unavailable,
      "tasks": {c.task: {"solvable": c.solvable, "reason": c.reason, "n_nodes": c.n_nodes,
                         "edges": c.edges.get("total") if c.edges else None,
                         "qk_pairs": c.qk_pairs, "loss_full": c.loss_full,
                         "loss_before": c.loss_before, "loss_after": c.loss_after,
                         "meets_target_select": c.sufficiency.get("select", {}).get(
                             "meets_target"),
                         "meets_target_test": c.sufficiency.get("meets_target_test")}
                for c in found}}
  fileio.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
  return summary


def circuit_means(means_dir: Path, step: int, params, cfg, ccfg: CircuitConfig, tokenizer):
  """The mean activation of every node site at a checkpoint, cached in means_dir."""
  def val_batches():  # inputs only: each batch holds seq_len + 1 tokens
    dataset = data_lib.prepare_data(cfg, tokenizer=tokenizer)  # the run's (maybe imported)
    batches = dataset.val_batches(ccfg.mean_batches, cfg.train.batch_size, cfg.train.seq_len)
    return batches[:, :, :-1]
  return masks.cached_means(str(means_path(means_dir, step, cfg, ccfg)), params, cfg.model,
                            val_batches)


def means_path(workdir: Path, step: int, cfg, ccfg: CircuitConfig) -> Path:
  """The means cache of a checkpoint, keyed by every setting that shapes the means: the
  data (corpus, mixture, split, seed), the batch shape and circuit.mean_batches."""
  data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
  shape = {"data": data, "batch_size": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
           "mean_batches": ccfg.mean_batches}
  key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
  return workdir / f"means_{step}_{key}.npz"


def add_circuit_args(parser: argparse.ArgumentParser) -> None:
  """--tasks, --target-loss, --set circuit.F=V and --no-progress (see `circuit_args`)."""
  parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
  parser.add_argument("--target-loss", type=float, default=None,
                      help="held-out task loss the circuit must reach (default: config, 0.15)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="circuit.FIELD=VALUE")
  parser.add_argument("--no-progress", action="store_true")


def circuit_args(args: argparse.Namespace, workdir: str | Path
                 ) -> tuple[CircuitConfig, list[str] | None]:
  """(circuit config, task names or None for all) from the run's config and the arguments."""
  if any(not o.startswith("circuit.") for o in args.overrides):
    raise ValueError("only circuit.* overrides are taken here")
  ccfg = apply_overrides(ckpt_lib.load_config(workdir), args.overrides).circuit
  if args.target_loss is not None:
    ccfg = dataclasses.replace(ccfg, target_loss=args.target_loss)
  return ccfg, task_list(args.tasks)


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run directory")
  add_circuit_args(parser)
  parser.add_argument("--out", default=None, help="output directory (default RUN/circuits)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  args = parser.parse_args(argv)
  # Every argument is checked before the checkpoint is even read.
  task_list(args.tasks)
  if args.target_loss is not None and not (math.isfinite(args.target_loss)
                                           and args.target_loss > 0):
    raise ValueError(f"--target-loss: must be a finite loss > 0, got {args.target_loss}")
  if args.step is not None and args.step < 0:
    raise ValueError(f"--step: must be >= 0, got {args.step}")
  if args.out is not None:
    fileio.check_writable_dir(args.out, "--out")
  ccfg, names = circuit_args(args, args.workdir)
  summary = prune(args.workdir, task_names=names, circuit_cfg=ccfg, out=args.out,
                  step=args.step, progress=not args.no_progress)
  # loss: the circuit's calibrated test loss (the unablated model's when unsolvable);
  # select: whether it meets the target on the selection pairs (by the margin); test: on the
  # test pairs. A task is solved when both hold.
  print(f"{'task':32s} {'solvable':>8s} {'nodes':>6s} {'edges':>7s} {'qk':>4s} {'loss':>7s} "
        f"{'select':>6s} {'test':>5s}")
  for name, t in summary["tasks"].items():
    loss = t["loss_after"] if t["loss_after"] is not None else t["loss_full"]
    print(f"{name:32s} {str(t['solvable']):>8s} {t['n_nodes'] or 0:6d} {t['edges'] or 0:7d} "
          f"{t['qk_pairs']:4d} {loss:7.3f} {str(t['meets_target_select'] or False):>6s} "
          f"{str(t['meets_target_test'] or False):>5s}")
  for name, why in summary["unavailable"].items():
    print(f"{name:32s} unavailable: {why}")
  return 0


if __name__ == "__main__":
  cli.run(main)
