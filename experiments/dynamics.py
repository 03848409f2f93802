"""CLI: watch circuits form over training, and compare circuits across seeds.

  python -m experiments.dynamics --workdir RUN [--tasks a,b|all] [--steps all|a,b,c]
                                 [--out DIR] [--target-loss 0.15] [--set circuit.F=V ...]
  python -m experiments.dynamics --compare RUN_A RUN_B ... [--tasks ...] [--out DIR]

Over training: prunes the chosen tasks at every chosen checkpoint of RUN (means recomputed
per checkpoint, the vmapped search of `circuits.find_circuits`) and writes into --out
(default RUN/dynamics): checkpoints/step_<N>.json (each checkpoint's circuits), means/,
dynamics.json (per task: full-model loss, circuit nodes and edges per step, first step
meeting the target, Jaccard overlap with the next and the final checkpoint's circuit) and
dynamics.png. Nothing is written inside RUN when --out points elsewhere.

Across seeds (runs from `experiments.train --seeds N`): prunes each run's latest checkpoint
and writes compare.json into --out (default RUN_A_compare): per task the circuit size
spread, per-site composition per run, and per pair of runs the best-match correlation of
circuit-node activations on the same task inputs.

Both resume: a checkpoint (or run) whose JSON is complete and made with the same tasks and
settings is not searched again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import logging
from pathlib import Path

import jax
import numpy as np

from experiments import cli
from experiments import prune as prune_lib
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import dynamics as dyn
from sparse_jax import fileio
from sparse_jax.config import CircuitConfig


def choose_steps(workdir: str | Path, spec: str) -> list[int]:
  """The run's checkpoint steps named by spec ("all" or "a,b,c"); unknown steps are an error."""
  have = ckpt_lib.checkpoint_steps(workdir)
  if not have:
    raise FileNotFoundError(f"{workdir}: no finished checkpoints yet")
  if spec == "all":
    return have
  try:
    want = sorted({int(s) for s in spec.split(",") if s.strip()})
  except ValueError:
    raise ValueError(f"--steps: expected 'all' or comma-separated integers, got {spec!r}") from None
  missing = [s for s in want if s not in have]
  if missing or not want:
    raise ValueError(f"--steps: no checkpoint at step(s) {missing or spec!r} in {workdir}; "
                     f"kept steps: {have}")
  return want


def _searched(workdir, step, names, ccfg, means_dir, progress):
  """(record, params, cfg, taskset) of one checkpoint, searched now."""
  step, params, cfg, taskset, found = prune_lib.find_at_step(
      workdir, task_names=names, circuit_cfg=ccfg, step=step, means_dir=means_dir,
      progress=progress)
  rec = dyn.record(step, str(workdir), names or [], dataclasses.asdict(ccfg), found,
                   taskset.unavailable)
  return rec, params, cfg, taskset


def run_dynamics(workdir: str | Path, *, task_names: list[str] | None, steps: str = "all",
                 circuit_cfg: CircuitConfig | None = None, out: str | Path | None = None,
                 progress: bool = True) -> dict:
  """Circuits at each chosen checkpoint of a run; writes and returns dynamics.json's dict."""
  workdir = Path(workdir)
  ccfg = circuit_cfg or ckpt_lib.load_config(workdir).circuit
  out = Path(out) if out is not None else workdir / "dynamics"
  settings = dataclasses.asdict(ccfg)
  records = []
  for step in choose_steps(workdir, steps):
    path = out / "checkpoints" / f"step_{step}.json"
    rec = dyn.load_record(path, task_names or [], settings)
    if rec is None:
      logging.info("checkpoint %d: searching circuits", step)
      rec = _searched(workdir, step, task_names, ccfg, out / "means", progress)[0]
      dyn.save_record(path, rec)
    else:
      logging.info("checkpoint %d: done before (%s)", step, path)
    records.append(rec)
  series = dyn.task_series(records)
  summary = {"workdir": str(workdir), "steps": [r["step"] for r in records],
             "target_loss": ccfg.target_loss, "note": dyn.NODE_IDS_NOTE,
             "unavailable": records[-1]["unavailable"], "circuit_config": settings,
             "tasks": series}
  fileio.atomic_write_text(out / "dynamics.json", json.dumps(summary, indent=1))
  dyn.plot_dynamics(series, str(out / "dynamics.png"),
                    title=f"{workdir.name}: circuits across training checkpoints "
                          f"(target {ccfg.target_loss} nats; node ids comparable within this run)")
  return summary


def _inputs_digest(taskset) -> str:
  """A hash of the held-out task inputs, to check that compared runs saw the same ones."""
  h = hashlib.sha256(",".join(taskset.names).encode())
  for x in (taskset.heldout.tokens_Px2xL, taskset.heldout.last_Px2):
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def _run_with_acts(i, workdir, names, ccfg, out, progress):
  """A run's last-checkpoint record (with an inputs digest) and {task: acts_SxN}, resumably."""
  run_dir = out / "runs" / f"{i}_{Path(workdir).name}"
  rec_path, acts_path = run_dir / "circuits.json", run_dir / "acts.npz"
  settings = dataclasses.asdict(ccfg)
  rec = dyn.load_record(rec_path, names or [], settings)
  step = ckpt_lib.checkpoint_steps(workdir)[-1:] or [None]
  if rec is not None and rec["step"] == step[0] and acts_path.exists():
    with np.load(acts_path) as f:
      return rec, {k: f[k] for k in f.files}
  rec, params, cfg, taskset = _searched(workdir, None, names, ccfg, run_dir / "means", progress)
  rec["inputs_sha256"] = _inputs_digest(taskset)
  acts = {}
  for name, c in dyn.circuits_of(rec).items():
    if dyn.is_met(c):
      t = taskset.names.index(name)
      arrays = jax.tree.map(lambda x, t=t: x[t], taskset.heldout)
      acts[name] = dyn.node_activations(params, cfg.model, arrays, c.nodes)[1]

  def write(tmp):
    with open(tmp, "wb") as f:
      np.savez(f, **acts)
  run_dir.mkdir(parents=True, exist_ok=True)
  fileio.atomic_write(acts_path, write)
  dyn.save_record(rec_path, rec)  # last: a complete record means the activations are there
  return rec, acts


def run_compare(workdirs: list[str | Path], *, task_names: list[str] | None,
                circuit_cfg: CircuitConfig | None = None, out: str | Path | None = None,
                progress: bool = True) -> dict:
  """Circuits of several runs (e.g. seeds) compared without matching node ids."""
  if len(workdirs) < 2:
    raise ValueError("--compare needs at least two run directories")
  workdirs = [Path(w) for w in workdirs]
  tokenizers = {w: (w / "tokenizer.json").read_bytes() if (w / "tokenizer.json").exists()
                else None for w in workdirs}
  if None in tokenizers.values() or len(set(tokenizers.values())) != 1:
    raise ValueError("--compare: the runs must share one tokenizer (tokenizer.json), so that "
                     "they see the same task inputs; "
                     f"differs or missing in {[str(w) for w in workdirs]}")
  cfgs = [ckpt_lib.load_config(w) for w in workdirs]
  if len({c.model for c in cfgs}) != 1:
    raise ValueError("--compare: the runs have different model configs; compare seeds of one "
                     "config")
  ccfg = circuit_cfg or cfgs[0].circuit
  out = Path(out) if out is not None else workdirs[0].with_name(workdirs[0].name + "_compare")
  runs = [_run_with_acts(i, w, task_names, ccfg, out, progress) for i, w in enumerate(workdirs)]
  if len({r["inputs_sha256"] for r, _ in runs}) != 1:
    raise ValueError("--compare: the runs' task inputs differ (task set or tokenizer); "
                     "activations cannot be correlated")
  circuits = [dyn.circuits_of(r) for r, _ in runs]
  n_layer = cfgs[0].model.n_layer
  tasks = {}
  for task in circuits[0]:
    cs = [c[task] for c in circuits]
    pairs = []
    for a, b in itertools.combinations(range(len(runs)), 2):
      if not (dyn.is_met(cs[a]) and dyn.is_met(cs[b])):
        pairs.append({"a": a, "b": b, "similarity": None,
                      "reason": "the target is not met in both runs"})
        continue
      sim = dyn.activation_similarity(runs[a][1][task], runs[b][1][task])
      pairs.append({"a": a, "b": b, "similarity": sim,
                    "same_ids_jaccard": dyn.jaccard(cs[a].nodes, cs[b].nodes)})
    met = [c for c in cs if dyn.is_met(c)]
    identical = (len(met) == len(cs) and all(
        dyn.node_set(c.nodes) == dyn.node_set(cs[0].nodes) and c.edges == cs[0].edges
        for c in cs))
    tasks[task] = {
        "size_spread": dyn.size_spread(cs),
        "composition": [dyn.composition(c.nodes, n_layer) if dyn.is_met(c) else None
                        for c in cs],
        "loss_full": [c.loss_full for c in cs], "met": [dyn.is_met(c) for c in cs],
        "pairs": pairs, "identical_circuits": identical}
  summary = {"runs": [str(w) for w in workdirs], "steps": [r["step"] for r, _ in runs],
             "target_loss": ccfg.target_loss,
             "note": (dyn.NODE_IDS_NOTE + " 'same_ids_jaccard' is only meaningful for runs "
                      "from the same initialisation (same seed); 'identical_circuits' "
                      "likewise."),
             "similarity_definition": (
                 "per node of run a, the largest |Pearson r| with any circuit node of run b, "
                 "over all real token positions of the held-out pairs, unablated model; "
                 "averaged over a's nodes (a_to_b) and b's (b_to_a)"),
             "circuit_config": dataclasses.asdict(ccfg), "tasks": tasks}
  fileio.atomic_write_text(out / "compare.json", json.dumps(summary, indent=1))
  return summary


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--workdir", help="a training run with several kept checkpoints")
  where.add_argument("--compare", nargs="+", metavar="RUN", help="runs to compare (seeds)")
  parser.add_argument("--steps", default="all", help="'all' kept checkpoints, or a,b,c")
  parser.add_argument("--out", default=None,
                      help="output directory (default RUN/dynamics, or RUN_A_compare)")
  prune_lib.add_circuit_args(parser)
  args = parser.parse_args(argv)
  ccfg, names = prune_lib.circuit_args(args, args.workdir or args.compare[0])
  kw = dict(task_names=names, circuit_cfg=ccfg, out=args.out, progress=not args.no_progress)
  if args.compare:
    summary = run_compare(args.compare, **kw)
  else:
    summary = run_dynamics(args.workdir, steps=args.steps, **kw)
  if args.compare:
    print(f"{'task':28s} {'met':>5s} {'nodes (per run)':>24s} {'act. similarity (pairs)':>28s}")
    for name, t in summary["tasks"].items():
      sims = [f"{p['similarity']['mean']:.3f}" if p["similarity"] and p["similarity"]["mean"]
              is not None else "-" for p in t["pairs"]]
      print(f"{name:28s} {sum(t['met']):2d}/{len(t['met']):<2d} "
            f"{str(t['size_spread']['nodes']['values']):>24s} {' '.join(sims):>28s}")
    return 0
  print(f"{'task':28s} {'first step met':>14s}  nodes/edges per step")
  for name, s in summary["tasks"].items():
    sizes = " ".join(f"{p['step']}:{p['n_nodes']}/{p['edges']}" if p["met"] else
                     f"{p['step']}:-" for p in s["checkpoints"])
    print(f"{name:28s} {str(s['first_step_met']):>14s}  {sizes}")
  return 0


if __name__ == "__main__":
  cli.run(main)
