"""Figures and report.md of a scale sweep (see experiments.scale_sweep)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

from sparse_jax import sweep as sweep_lib
from sparse_jax import viz


def size_vs_target(row: dict, other: dict) -> list[tuple[float, float, int]]:
  """[(target, geomean edges of `row` over tasks both rows meet at that target, n_tasks)]."""
  targets = sorted({p["target"] for c in row["size_vs_target"].values() for p in c})
  out = []
  for t in targets:
    mine = {task: p["edges"] for task, c in row["size_vs_target"].items() for p in c
            if p["target"] == t}
    theirs = {task for task, c in other["size_vs_target"].items() for p in c
              if p["target"] == t}
    shared = sorted(set(mine) & theirs)
    if shared:
      out.append((t, sweep_lib.geomean([mine[task] for task in shared]), len(shared)))
  return out


def write_figures(rows: list[dict], pairs: list[dict], shared: list[str], out: Path) -> None:
  viz.plot_frontier(rows, str(out / "frontier.png"), n_tasks=len(shared))
  if pairs:
    best = pairs[0]
    by_name = {r["name"]: r for r in rows}
    s, d = by_name[best["sparse"]], by_name[best["dense"]]
    viz.plot_size_vs_target(
        {f"sparse {s['name']} (val {s['val_loss']:.3f})": size_vs_target(s, d),
         f"dense {d['name']} (val {d['val_loss']:.3f})": size_vs_target(d, s)},
        str(out / "circuit_size_vs_task_loss.png"),
        title="circuit size vs target task loss, models matched on pretraining loss\n"
              "(numbers: tasks both models meet at that target)")


def _fmt(x, spec: str) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return format(x, spec)


def write_report(sweep, rows: list[dict], pairs: list[dict], shared: list[str],
                 missing: list[str], out: Path, *, command: str) -> None:
  base = sweep.base
  mixture = ", ".join(base.data.mixture) or "none"
  lines = [
      "# Scale sweep: capability vs interpretability", "",
      f"Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{command}`.", "",
      f"- depth {base.model.n_layer} layers, widths {list(sweep.widths)}, L0 targets "
      f"{list(sweep.l0_targets)}, dense baseline per width: {sweep.dense_baseline}",
      f"- corpus `{base.data.corpus}`, mixture: {mixture}; vocab {base.model.vocab_size}; "
      f"{base.train.steps} steps of {base.train.batch_size} x {base.train.seq_len} tokens "
      f"({base.train.steps * base.train.batch_size * base.train.seq_len / 1e6:.1f}M tokens) "
      "per model",
      f"- circuits: target held-out task loss {base.circuit.target_loss} (per-sequence mean "
      f"contrast loss), {base.circuit.steps} mask steps of {base.circuit.batch_size} pairs, "
      f"k_coef {base.circuit.k_coef}, extra targets {list(base.circuit.extra_targets)}",
      f"- L0 counts nonzero weight matrices, embeddings, unembedding and biases (not norms or "
      "the dense bigram table)", ""]
  if missing:
    lines += [f"**Unfinished points (not in the table):** {', '.join(missing)}", ""]
  lines += ["## Models", "",
            "| model | width | params | L0 | val loss | tasks solved | geomean edges |",
            "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['width']} | {r['total_params']:,} | {r['l0']:,} | "
                 f"{r['val_loss']:.3f} | {r['tasks_solved']}/{r['tasks_available']} | "
                 f"{_fmt(r['geomean_edges'], '.0f')} |")
  lines += ["", f"Geometric mean over the {len(shared)} tasks every model solves: "
            f"{', '.join(shared) or 'none'}.", ""]
  lines += ["## Dense vs sparse at matched pretraining loss", ""]
  if pairs:
    best = pairs[0]
    lines += [
        "Each sparse model is matched with the dense model closest in validation loss; the "
        "ratio is the dense model's geometric-mean circuit edges over the sparse model's, over "
        "the tasks both solve at the target. The headline is the closest-matched pair.", "",
        "**Headline: dense/sparse circuit size = "
        f"{_fmt(best['ratio_dense_over_sparse'], '.1f')}x** "
        f"({best['dense']} vs {best['sparse']}, val loss {best['val_loss_dense']:.3f} vs "
        f"{best['val_loss_sparse']:.3f}, {len(best['shared_tasks'])} shared tasks).", "",
        "| sparse | dense | val loss gap | shared tasks | edges sparse | edges dense | ratio |",
        "|---|---|---|---|---|---|---|"]
    for p in pairs:
      lines.append(f"| {p['sparse']} | {p['dense']} | {p['loss_gap']:.3f} | "
                   f"{len(p['shared_tasks'])} | {_fmt(p['geomean_edges_sparse'], '.0f')} | "
                   f"{_fmt(p['geomean_edges_dense'], '.0f')} | "
                   f"{_fmt(p['ratio_dense_over_sparse'], '.1f')} |")
  else:
    lines.append("No sparse/dense pair finished yet.")
  tasks = sorted({t for r in rows for t in r["task_loss_full"]})
  lines += ["", "## Per-task circuit edges (blank: the full model misses the target)", "",
            "| task | " + " | ".join(r["name"] for r in rows) + " |",
            "|---|" + "---|" * len(rows)]
  for t in tasks:
    cells = [str(r["task_edges"].get(t, "")) for r in rows]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  unavailable = rows[0]["unavailable"] if rows else {}
  if unavailable:
    lines += ["", "Unavailable with this tokenizer: " +
              "; ".join(f"{k}: {v}" for k, v in unavailable.items())]
  lines += ["", "## Figures", "", "![frontier](frontier.png)", "",
            "![circuit size vs task loss](circuit_size_vs_task_loss.png)", "",
            "## Time per point (seconds)", "", "| model | train | prune |", "|---|---|---|"]
  for r in rows:
    t = r["timing"]
    lines.append(f"| {r['name']} | {_fmt(t.get('train_s'), '.0f')} | "
                 f"{_fmt(t.get('prune_s'), '.0f')} |")
  (out / "report.md").write_text("\n".join(lines) + "\n")
