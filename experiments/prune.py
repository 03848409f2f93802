"""CLI: find each task's circuit in a trained run.

  python -m experiments.prune --workdir RUN [--tasks a,b|all] [--target-loss 0.15]
                              [--out DIR] [--step N] [--set circuit.field=value ...]

Loads the run's latest good checkpoint (or --step), its tokenizer and config; computes (once
per checkpoint, cached as RUN/means_<step>.npz) the mean activation of every node site over
validation batches of the pretraining data; builds the tasks with the run's tokenizer; trains
node masks for all tasks as one vmapped program; writes one JSON and one graph PNG per task
plus summary.json into --out (default RUN/circuits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import circuits as circuits_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import masks
from sparse_jax import tasks as tasks_lib
from sparse_jax.config import CircuitConfig, apply_overrides


def task_list(spec: str) -> list[str] | None:
  """"a,b" -> ["a", "b"]; "all" -> None (every task)."""
  return None if spec == "all" else [t for t in spec.split(",") if t]


def prune(workdir: str | Path, *, task_names: list[str] | None = None,
          circuit_cfg: CircuitConfig | None = None, out: str | Path | None = None,
          step: int | None = None, progress: bool = True) -> dict:
  """Finds and saves circuits for a run; returns the summary written to out/summary.json."""
  workdir = Path(workdir)
  cfg, params, step = ckpt_lib.load_params(workdir, step)
  ccfg = circuit_cfg or cfg.circuit
  out = Path(out) if out is not None else workdir / "circuits"
  tokenizer = data_lib.load_tokenizer(workdir)
  taskset = tasks_lib.build_taskset(
      tokenizer, task_names, n_train=ccfg.n_train_pairs, n_heldout=ccfg.n_heldout_pairs,
      seed=ccfg.seed, max_len=min(128, cfg.model.block_size))

  def val_batches():  # inputs only: each batch holds seq_len + 1 tokens
    dataset = data_lib.prepare_data(cfg)
    batches = dataset.val_batches(ccfg.mean_batches, cfg.train.batch_size, cfg.train.seq_len)
    return batches[:, :, :-1]
  means = masks.cached_means(str(workdir / f"means_{step}.npz"), params, cfg.model, val_batches)
  found = circuits_lib.find_circuits(params, cfg.model, taskset, means, ccfg, progress=progress)
  for circuit in found:
    circuits_lib.save_circuit(circuit, str(out))
  summary = {
      "workdir": str(workdir), "step": step, "target_loss": ccfg.target_loss,
      "circuit_config": dataclasses.asdict(ccfg), "requested_tasks": task_names,
      "unavailable": taskset.unavailable,
      "tasks": {c.task: {"solvable": c.solvable, "reason": c.reason, "n_nodes": c.n_nodes,
                         "edges": c.edges.get("total") if c.edges else None,
                         "loss_full": c.loss_full, "loss_before": c.loss_before,
                         "loss_after": c.loss_after} for c in found}}
  fileio.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run directory")
  parser.add_argument("--tasks", default="all", help="comma-separated task names, or all")
  parser.add_argument("--target-loss", type=float, default=None,
                      help="held-out task loss the circuit must reach (default: config, 0.15)")
  parser.add_argument("--out", default=None, help="output directory (default RUN/circuits)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="circuit.FIELD=VALUE")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    cfg = ckpt_lib.load_config(args.workdir)
    if any(not o.startswith("circuit.") for o in args.overrides):
      raise ValueError("prune only takes circuit.* overrides")
    cfg = apply_overrides(cfg, args.overrides)
    ccfg = cfg.circuit
    if args.target_loss is not None:
      ccfg = dataclasses.replace(ccfg, target_loss=args.target_loss)
    names = task_list(args.tasks)
    summary = prune(args.workdir, task_names=names, circuit_cfg=ccfg, out=args.out,
                    step=args.step, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{'task':32s} {'solved':>6s} {'nodes':>6s} {'edges':>7s} {'loss':>7s}")
  for name, t in summary["tasks"].items():
    loss = t["loss_before"] if t["solvable"] else t["loss_full"]
    print(f"{name:32s} {str(t['solvable']):>6s} {t['n_nodes'] or 0:6d} {t['edges'] or 0:7d} "
          f"{loss:7.3f}")
  for name, why in summary["unavailable"].items():
    print(f"{name:32s} unavailable: {why}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
