"""CLI: a self-contained HTML explorer of a run's circuits, with every node explained.

  python -m experiments.explore --workdir RUN [--circuits DIR] [--out DIR] [--step N]
                                [--text-rows 64] [--min-score 0.5] [--explainer MOD:NAME]

Reads the circuit JSONs in --circuits (default RUN/circuits; the checkpoint step is taken
from its summary.json unless --step is given), the run's params, tokenizer and mean
activations (prune's RUN/means_<step>_<key>.npz if there, else computed in memory), held-out pretraining
text (the run's validation stream) and each task's held-out pairs (rebuilt with the settings
in the circuit record, so they are the pairs the circuit was checked on). Writes into --out
(default RUN/explore): index.html, one <task>.html per solved circuit (opens offline; see
`sparse_jax/explore_html.py`), <task>.png (the circuit graph with each node's short
explanation) and explanations.json (every node's rule and score, per task).

--explainer plugs in another explainer: MOD:NAME names a class or factory that takes no
arguments and returns an object with `name` and `propose(stream, acts_RxL, select_RxL)`
(see `sparse_jax/explain.py`). The default explainer uses no network.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from pathlib import Path

import jax
import numpy as np

from experiments import cli
from experiments import prune as prune_lib
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import circuits as circuits_lib
from sparse_jax import data as data_lib
from sparse_jax import explain, explore, explore_html, fileio, masks, viz
from sparse_jax import tasks as tasks_lib


def _load_circuits(directory: Path) -> list[dict]:
  paths = sorted(p for p in directory.glob("*.json") if p.name != "summary.json")
  out = []
  for p in paths:
    try:
      d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or "task" not in d or "nodes" not in d:
      continue  # another JSON file that is not a circuit record
    out.append(d)
  if not out:
    raise ValueError(f"{directory}: no circuit JSON files (run experiments.prune first)")
  return out


def _explainer(spec: str | None):
  if not spec:
    return explain.FeatureExplainer()
  module, _, name = spec.partition(":")
  if not name:
    raise ValueError(f"--explainer {spec!r}: expected MODULE:NAME")
  return getattr(importlib.import_module(module), name)()


def explore_run(workdir, *, circuits_dir=None, out=None, step=None, text_rows: int = 64,
                min_score: float = 0.5, explainer=None) -> dict:
  """Writes the explorer for a run's circuits; returns {task: summary row}."""
  workdir = Path(workdir)
  circuits_dir = Path(circuits_dir) if circuits_dir else workdir / "circuits"
  out = Path(out) if out else workdir / "explore"
  records = _load_circuits(circuits_dir)
  summary_path = circuits_dir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  if step is None:
    step = summary.get("step")
  cfg, params, step = ckpt_lib.load_params(workdir, step)
  # The means the search ablated with: its own mean_batches, which --set may have changed.
  ccfg = dataclasses.replace(cfg.circuit, mean_batches=summary.get(
      "circuit_config", {}).get("mean_batches", cfg.circuit.mean_batches))
  tokenizer = data_lib.load_tokenizer(workdir)
  pieces = explain.vocab_pieces(tokenizer)
  dataset = data_lib.prepare_data(cfg)
  B, L = cfg.train.batch_size, cfg.train.seq_len
  text_RxL = dataset.val_batches(-(-text_rows // B), B, L)[:, :, :-1].reshape(-1, L)[:text_rows]
  text = explain.TokenStream(text_RxL, np.ones(text_RxL.shape, bool), pieces)
  means_path = prune_lib.means_path(workdir, step, cfg, ccfg)
  if means_path.exists():
    means = masks.load_means(str(means_path), cfg.model)
  else:  # computed, not cached: the run directory may not be ours to write into
    means = masks.compute_means(params, cfg.model, dataset.val_batches(
        ccfg.mean_batches, B, L)[:, :, :-1])
  explainer = explainer or explain.FeatureExplainer()
  out.mkdir(parents=True, exist_ok=True)
  rows, explanations = [], {}
  for rec in sorted(records, key=lambda r: r["task"]):
    task, stem = rec["task"], circuits_lib.file_stem(rec["task"])
    if not rec.get("solvable") or not rec.get("nodes"):
      rows.append({"task": task, "note": rec.get("reason") or "no circuit"})
      continue
    known = {f.name for f in dataclasses.fields(cfg.circuit)}
    ccfg = dataclasses.replace(cfg.circuit, **{k: v for k, v in (rec.get("settings") or {}).items()
                                               if k in known and not isinstance(v, list)})
    taskset = tasks_lib.build_taskset(tokenizer, [task], n_train=ccfg.n_train_pairs,
                                      n_heldout=ccfg.n_heldout_pairs, seed=ccfg.seed,
                                      max_len=min(128, cfg.model.block_size))
    arrays = jax.tree.map(lambda x: x[0], taskset.heldout)
    logging.info("explaining %d nodes of %s", rec.get("n_nodes", 0), task)
    page = explore.circuit_page_data(rec, params, cfg.model, means, text, arrays,
                                     explainer=explainer, min_score=min_score)
    fileio.atomic_write_text(out / f"{stem}.html", explore_html.render_circuit(page))
    short = {(n["site"], n["ch"]): explore_html.short_explanation(n["explanation"])
             for n in page["nodes"]}
    viz.plot_circuit(circuits_lib.Circuit.from_json(json.dumps(rec)), str(out / f"{stem}.png"),
                     explanations=short)
    scores = [n["explanation"]["score"] for n in page["nodes"]]
    explanations[task] = [{"site": n["site"], "ch": n["ch"], **n["explanation"]}
                          for n in page["nodes"]]
    rows.append({"task": task, "href": f"{stem}.html", "n_nodes": len(page["nodes"]),
                 "edges": (rec.get("edges") or {}).get("total"), "loss": page["loss_circuit"],
                 "explained": page["explained_fraction"], "mean_score": float(np.mean(scores))})
  title = f"circuits of {workdir.name} (step {step})"
  fileio.atomic_write_text(out / "index.html", explore_html.render_index(title, rows))
  fileio.atomic_write_text(out / "explanations.json", json.dumps(
      {"workdir": str(workdir), "step": step, "min_score": min_score,
       "explainer": explainer.name, "text_rows": text_rows, "tasks": explanations}, indent=1))
  return {r["task"]: r for r in rows}


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run directory")
  parser.add_argument("--circuits", default=None, help="circuit JSON directory (RUN/circuits)")
  parser.add_argument("--out", default=None, help="output directory (default RUN/explore)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the circuits' summary.json, else latest)")
  parser.add_argument("--text-rows", type=int, default=64,
                      help="held-out pretraining sequences to explain nodes on")
  parser.add_argument("--min-score", type=float, default=0.5,
                      help="held-out Pearson r below which a node is 'unexplained'")
  parser.add_argument("--explainer", default=None, metavar="MODULE:NAME",
                      help="another explainer (default: the offline feature explainer)")
  args = parser.parse_args(argv)
  if args.text_rows < 2:
    raise ValueError(f"--text-rows must be >= 2 (half choose, half score), got {args.text_rows}")
  rows = explore_run(args.workdir, circuits_dir=args.circuits, out=args.out, step=args.step,
                     text_rows=args.text_rows, min_score=args.min_score,
                     explainer=_explainer(args.explainer))
  print(f"{'task':28s} {'nodes':>6s} {'explained':>9s} {'mean r':>7s}")
  for task, r in rows.items():
    if r.get("href"):
      print(f"{task:28s} {r['n_nodes']:6d} {r['explained']:9.0%} {r['mean_score']:7.3f}")
    else:
      print(f"{task:28s} {'-':>6s}  {r['note']}")
  return 0


if __name__ == "__main__":
  cli.run(main)
