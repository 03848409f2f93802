"""CLI: compare circuit directories written by `experiments.prune`, as markdown tables.

  python -m experiments.circuit_table DIR [DIR ...] [--targets 0.15,0.075]

Per directory and target: the paper tasks solved (of 20; a circuit found there that meets
the target on the selection pairs by the margin and on the test pairs, where the JSON has
those checks), the geometric mean of edges over them, and the `induction` control apart
(`sweep.model_summary`). Then per task at each directory's primary target: nodes, edges,
q-k pairs and whether the circuit meets the target on each split. Directories written
before q-k pairs left the edge count (their `edges` has an "attn.qk" entry) are shown both
ways.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments import cli
from sparse_jax import sweep as sweep_lib
from sparse_jax.circuits import file_stem


def load(out: Path) -> dict:
  """A sweep-style row ({"name", "size_vs_target"}) and the circuits of one prune --out."""
  summary = json.loads((out / "summary.json").read_text())
  circuits = {t: json.loads((out / f"{file_stem(t)}.json").read_text()) for t in summary["tasks"]}
  curves = {t: c.get("search", {}).get("by_target", []) for t, c in circuits.items()}
  return {"name": out.name, "size_vs_target": curves, "circuits": circuits,
          "target": summary["target_loss"]}


def without_qk(row: dict) -> dict | None:
  """The row with q-k pairs taken out of old-format edge counts (primary target only)."""
  if not any("attn.qk" in c.get("edges", {}) for c in row["circuits"].values()):
    return None
  curves = {t: [{**p, "edges": p["edges"] - row["circuits"][t]["edges"].get("attn.qk", 0)}
                for p in curve if p["target"] == row["target"]]
            for t, curve in row["size_vs_target"].items()}
  return {**row, "name": row["name"] + " (q-k pairs out)", "size_vs_target": curves}


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("dirs", nargs="+", help="prune output directories (with summary.json)")
  parser.add_argument("--targets", default="0.15,0.075", help="comma-separated targets")
  args = parser.parse_args(argv)
  targets = [float(t) for t in args.targets.split(",") if t]
  rows = [load(Path(d)) for d in args.dirs]
  loaded, rows = rows, [r for row in rows for r in (row, without_qk(row)) if r is not None]
  print("| circuits | target | paper tasks solved | geomean edges (solved) | induction edges |")
  print("|---|---|---|---|---|")
  for r in rows:
    for t in targets:
      m = sweep_lib.model_summary(r, t)
      geo, ind = m["geomean_edges_solved"], m["controls"]["induction"]
      print(f"| {r['name']} | {t} | {m['n_solved']}/{m['n_tasks']} | "
            f"{'-' if geo != geo else f'{geo:.0f}'} | {'-' if ind is None else ind} |")
  print()
  print("| circuits | task | nodes | edges | q-k pairs | meets target on selection pairs "
        "(by the margin) | on test pairs |")
  print("|---|---|---|---|---|---|---|")
  for r in loaded:
    for task, c in sorted(r["circuits"].items()):
      if not c.get("edges"):  # no circuit at the primary target
        continue
      qk = c.get("qk_pairs", c["edges"].get("attn.qk", 0))
      test = c.get("sufficiency", {}).get("meets_target_test", "not checked")
      select = c.get("sufficiency", {}).get("select", {}).get("meets_target", "not checked")
      print(f"| {r['name']} | {task} | {c['n_nodes']} | {c['edges'].get('total')} | {qk} | "
            f"{select} | {test} |")
  return 0


if __name__ == "__main__":
  cli.run(main)
