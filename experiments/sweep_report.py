"""Figures and report.md of a scale sweep (see experiments.scale_sweep)."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

from sparse_jax import fileio
from sparse_jax import sweep as sweep_lib
from sparse_jax import viz


def size_vs_target(row: dict, other: dict) -> list[tuple[float, float, int]]:
  """[(target, geomean edges of `row` over paper tasks both rows solve there, n_tasks)]."""
  out = []
  for t in sweep_lib.targets_of([row]):
    mine, theirs = sweep_lib.edges_at(row, t), sweep_lib.edges_at(other, t)
    shared = sorted(set(mine) & set(theirs))
    if shared:
      out.append((t, sweep_lib.geomean([mine[task] for task in shared]), len(shared)))
  return out


def checkpoint_points(ckpt_rows: list[dict], shared: list[str], target: float
                      ) -> list[tuple[float, float, str]]:
  """(val loss, geometric-mean edges, "d128@750") of each pruned dense checkpoint that
  solves every one of a frontier panel's shared tasks, so it sits on the panel's scale.
  The checkpoints were searched for the sparse models' solved tasks, which include them."""
  out = []
  for c in ckpt_rows:
    edges = sweep_lib.edges_at(c, target)
    if shared and all(t in edges for t in shared):
      out.append((c["val_loss"], sweep_lib.geomean([edges[t] for t in shared]),
                  f"d{c['width']}@{c['step']}"))
  return out


def write_figures(rows: list[dict], frontiers: dict, pairs: dict, primary: float,
                  out: Path, ckpt_rows: list[dict] = ()) -> None:
  viz.plot_frontier(rows, {t: f[1] for t, f in frontiers.items()},
                    {t: len(f[0]) for t, f in frontiers.items()}, str(out / "frontier.png"),
                    checkpoints={t: checkpoint_points(ckpt_rows, shared, t)
                                 for t, (shared, _) in frontiers.items()})
  if pairs.get(primary):
    best = pairs[primary][0]  # the matching (by validation loss) is the same at every target
    by_name = {r["name"]: r for r in list(rows) + list(ckpt_rows)}
    s, d = by_name[best["sparse"]], by_name[best["dense"]]
    viz.plot_size_vs_target(
        {f"sparse {s['name']} (val {s['val_loss']:.3f})": size_vs_target(s, d),
         f"dense {d['name']} (val {d['val_loss']:.3f})": size_vs_target(d, s)},
        str(out / "circuit_size_vs_task_loss.png"),
        title="circuit size vs target task loss, models matched on pretraining loss\n"
              "(numbers: tasks both models meet at that target)")


def _k_coefs(ccfg) -> str:
  """The node penalty, or the grid searched per task (the best circuit is kept)."""
  if ccfg.k_coef_grid:
    return "grid " + ", ".join(f"{k:g}" for k in ccfg.k_coef_grid) + " (best kept per task)"
  return f"{ccfg.k_coef:g}"


def _dense_widths(sweep) -> str:
  """Which widths have a plain dense baseline, and whether its checkpoints are pruned."""
  if not sweep.dense_baseline:
    return "none"
  widths = list(sweep.dense_widths or sweep.widths)
  along = (f", checkpoints every {sweep.dense_ckpt_every} steps as loss-matched points"
           if sweep.dense_ckpt_every else "")
  return f"width {', '.join(map(str, widths))}{along}"


def _fmt(x, spec: str) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return format(x, spec)


def headline(pairs: dict, primary: float) -> dict | None:
  """The closest-matched pair at the primary target, or at the strictest target where it
  shares a task, if it shares none at the primary one."""
  if not pairs.get(primary):
    return None
  best = pairs[primary][0]
  if best["shared_tasks"]:
    return best
  for t in sorted(pairs):
    match = [p for p in pairs[t] if p["sparse"] == best["sparse"] and p["shared_tasks"]]
    if match:
      return match[0]
  return best


def _tokens(tc, steps: int) -> int:
  """Training tokens of a run of `steps` steps."""
  return steps * tc.batch_size * tc.seq_len


def _steps(tc, steps: int) -> str:
  """'N steps of B x L tokens (xM tokens)'."""
  return (f"{steps} steps of {tc.batch_size} x {tc.seq_len} tokens "
          f"({_tokens(tc, steps) / 1e6:.1f}M tokens)")


# The paper's claim and scale (PAPER.md §6 and its training table): at matched pretraining
# loss, sparse circuits ~16x smaller at every target, over its 20 tasks; 32B training tokens.
PAPER_RATIO, PAPER_TOKENS = 16, 32e9


def against_paper(sweep, rows: list[dict], ckpt_rows: list[dict], best: dict | None,
                  primary: float) -> list[str]:
  """The report's "Against the paper" section: where this sweep's result is weaker than the
  paper's and why, each point computed from the sweep's own figures."""
  n = len(sweep_lib.PAPER_TASKS)
  tc, ccfg = sweep.base.train, sweep.base.circuit
  solved = {r["name"]: sweep_lib.model_summary(r, primary)["n_solved"] for r in rows}
  lines = ["## Against the paper", "",
           f"The paper (Fig 2): at matched pretraining loss, sparse circuits are "
           f"~{PAPER_RATIO}x smaller than dense ones at every target, as a geometric mean over "
           f"its {n} tasks, in models trained on {PAPER_TOKENS / 1e9:.0f}B tokens. Here:", ""]
  if solved:
    lines.append(
        f"- **Tasks.** The models solve {min(solved.values())}-{max(solved.values())} of the "
        f"{n} at {primary} (" + ", ".join(f"{k} {v}" for k, v in solved.items()) + "). A "
        "ratio here is a geometric mean over the tasks both models of a pair solve, the "
        f"easiest few, not over the {n}.")
  shared = best["shared_tasks"] if best else []
  if shared:
    by_name = {r["name"]: r for r in [*rows, *ckpt_rows]}
    e_s = sweep_lib.edges_at(by_name[best["sparse"]], best["target"])
    e_d = sweep_lib.edges_at(by_name[best["dense"]], best["target"])
    per_task = ", ".join(f"{t} {max(e_d[t], 1) / max(e_s[t], 1):.1f}x ({e_s[t]} vs {e_d[t]} "
                         "edges)" for t in shared)
    few = (" Fewer than 8 shared tasks: an anecdote, not the paper's mean."
           if len(shared) < 8 else "")
    checkpoint = ("a checkpoint of a dense run stopped early, at a high learning rate"
                  if "@" in best["dense"] else "a final dense model")
    lines += [
        f"- **Ratio.** The headline {best['ratio_dense_over_sparse']:.1f}x rests on "
        f"{len(shared)} task(s): {per_task}.{few}",
        f"- **Matching.** {best['dense']} is {checkpoint}, {best['loss_gap']:.3f} nats from "
        f"{best['sparse']}; the paper matches fully trained, annealed models."]
  sparse_steps = sweep.sparse_steps if sweep.sparse_steps is not None else tc.steps
  vals = [r["val_loss"] for r in rows]
  lines.append(
      f"- **Scale.** {_tokens(tc, sparse_steps) / 1e6:.1f}M tokens per sparse model and "
      f"{_tokens(tc, tc.steps) / 1e6:.1f}M per dense one, "
      f"{PAPER_TOKENS / _tokens(tc, sparse_steps):,.0f}x fewer than the paper's; the validation "
      + (f"losses ({min(vals):.2f}-{max(vals):.2f} nats/token) are " if vals else "losses are ")
      + "on this corpus and tokenizer, not comparable with the paper's.")
  margin = (f", and k must meet it on the selection pairs by {ccfg.select_margin_se:g} "
            "standard errors (the paper bisects to exactly the target; a few percent more "
            "edges for large circuits, docs/measurement.md §6)" if ccfg.select_margin_se else "")
  lines.append(f"- **Measurement.** Stricter than the paper's: each circuit must also meet the "
               f"target on {ccfg.n_heldout_pairs} test pairs it was not chosen on{margin}.")
  return lines + [""]


def write_report(sweep, rows: list[dict], frontiers: dict, pairs: dict, missing: list[str],
                 out: Path, *, command: str, ckpt_rows: list[dict] = (),
                 added: list[str] = ()) -> None:
  base, primary = sweep.base, sweep.base.circuit.target_loss
  targets = sorted(frontiers)
  mixture = ", ".join(base.data.mixture) or "none"
  lines = [
      "# Scale sweep: capability vs interpretability", "",
      f"Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{command}`.", "",
      f"- depth {base.model.n_layer} layers, widths {list(sweep.widths)}, L0 targets "
      f"{list(sweep.l0_targets)}, dense baselines: {_dense_widths(sweep)}",
      f"- corpus `{base.data.corpus}`, mixture: {mixture}; vocab {base.model.vocab_size}; "
      f"{_steps(base.train, base.train.steps)} per model"
      + (f" (sparse models {_steps(base.train, sweep.sparse_steps)})"
         if sweep.sparse_steps is not None else "")
      + f", peak lr {base.optim.lr:g}"
      + (f" (sparse models {sweep.sparse_lr:g})" if sweep.sparse_lr is not None else ""),
      f"- circuits: target task loss {primary} (also measured at "
      f"{[t for t in targets if t != primary]}), {base.circuit.steps} mask "
      f"steps of {base.circuit.batch_size} pairs, lr {base.circuit.lr}, k_coef "
      f"{_k_coefs(base.circuit)}; pairs per task: {base.circuit.n_train_pairs} train, "
      f"{base.circuit.n_select_pairs} selection (k, k_coef, logit scale + shift), "
      f"{base.circuit.n_heldout_pairs} test (every reported loss and check); circuits are "
      f"scored {'after' if base.circuit.calibrate else 'without'} the logit scale + shift fit, "
      f"and k is the smallest whose selection loss plus {base.circuit.select_margin_se:g} "
      "standard errors meets the target",
      "- every target is the per-sequence mean contrast loss; the authors store the pair sum, "
      "twice as large, so target t here is 2t in their reading: "
      + ", ".join(f"{t} here = {2 * t:g} pair sum" for t in targets),
      f"- geometric means run over the paper's {len(sweep_lib.PAPER_TASKS)} tasks only "
      f"({', '.join(sweep_lib.CONTROL_TASKS)}: a control, reported apart); a task is solved "
      "when its circuit meets the target on the selection pairs (by that margin) and on the "
      "test pairs",
      "- L0 counts nonzero weight matrices, embeddings, unembedding and biases (not norms or "
      "the dense bigram table)", ""]
  if missing:
    lines += [f"**Unfinished points (not in the tables):** {', '.join(missing)}", ""]
  if added:
    lines += [f"**Runs added to the grid (`--add`):** {', '.join(added)}: their own config "
              "and circuits; a run without logged metrics (an imported model) has its "
              "validation loss evaluated with its own tokenizer, so losses compare only "
              "between models sharing a tokenizer.", ""]
  control = ", ".join(sweep_lib.CONTROL_TASKS)
  lines += ["## Models", "",
            f"Per model at the primary target {primary}: the geometric mean of circuit edges "
            f"over the paper tasks it solves, how many of the {len(sweep_lib.PAPER_TASKS)} "
            f"it fails, and the control ({control}) apart; then, per target, the geometric "
            "mean over the tasks every model solves.", "",
            "| model | width | params | L0 | val loss | tasks solved | geomean edges "
            f"(solved) @{primary} | failed @{primary} | {control} edges @{primary} | "
            + " | ".join(f"shared geomean @{t}" for t in targets) + " |",
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(targets)]
  for r in rows:
    m = sweep_lib.model_summary(r, primary)
    controls = ", ".join(_fmt(v, "d") for v in m["controls"].values())
    lines.append(f"| {r['name']} | {r['width']} | {r['total_params']:,} | {r['l0']:,} | "
                 f"{r['val_loss']:.3f} | {r['tasks_solved']}/{r['tasks_available']} | "
                 f"{_fmt(m['geomean_edges_solved'], '.0f')} | {m['n_failed']}/{m['n_tasks']} "
                 f"| {controls} | "
                 + " | ".join(_fmt(frontiers[t][1][r["name"]], ".0f") for t in targets) + " |")
  lines.append("")
  for t in targets:
    shared = frontiers[t][0]
    lines.append(f"- @{t}: geometric mean over the {len(shared)} paper tasks every model "
                 f"solves: {', '.join(shared) or 'none'}")
  lines += ["", "## Dense vs sparse at matched pretraining loss", ""]
  best = headline(pairs, primary)
  if best is None:
    lines.append("No sparse/dense pair finished yet.")
  else:
    at = "" if best["target"] == primary else (
        f" (at target {best['target']}: the pair shares no task at {primary})")
    lines += [
        "Each sparse model is matched with the dense model closest in validation loss; the "
        "ratio is the dense model's geometric-mean circuit edges over the sparse model's, over "
        "the paper tasks both solve at the target (their number is given; the failed columns "
        f"count the tasks of the {len(sweep_lib.PAPER_TASKS)} each model fails). The headline "
        "is the closest-matched pair. `name@step` is a checkpoint along a dense run, pruned "
        "because its validation loss brackets a sparse model's (for that sparse model's "
        "tasks only); `interpolated` is the dense run's geometric mean interpolated (log "
        "edges linear in loss) between the two checkpoints bracketing the sparse loss, over "
        "the tasks all three solve. Such a checkpoint is a dense model stopped early, at a "
        "high learning rate, not a fully annealed one as in the paper's sweep.", "",
        ("**Headline: dense/sparse circuit size = "
         f"{_fmt(best['ratio_dense_over_sparse'], '.1f')}x** ({best['dense']} vs "
         f"{best['sparse']}, val loss {best['val_loss_dense']:.3f} vs "
         f"{best['val_loss_sparse']:.3f}, over the {len(best['shared_tasks'])} tasks both "
         f"solve: {', '.join(best['shared_tasks'])}){at}." if best["shared_tasks"] else
         "**Headline: no dense/sparse circuit size**: the closest-matched pair "
         f"({best['dense']} vs {best['sparse']}, val loss {best['val_loss_dense']:.3f} vs "
         f"{best['val_loss_sparse']:.3f}) solves no paper task in common at any target."),
        "",
        "| target | sparse | dense | val loss gap | shared tasks | failed sparse | failed dense "
        "| edges sparse | edges dense | ratio | interpolated ratio (tasks) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
      for p in pairs[t]:
        interp = p.get("interpolated")
        interp = (f"{interp['ratio_dense_over_sparse']:.1f} ({interp['n_shared']})"
                  if interp else "-")
        lines.append(f"| {t} | {p['sparse']} | {p['dense']} | {p['loss_gap']:.3f} | "
                     f"{len(p['shared_tasks'])} | {p['n_failed_sparse']} | "
                     f"{p['n_failed_dense']} | {_fmt(p['geomean_edges_sparse'], '.0f')} | "
                     f"{_fmt(p['geomean_edges_dense'], '.0f')} | "
                     f"{_fmt(p['ratio_dense_over_sparse'], '.1f')} | {interp} |")
    if ckpt_rows:
      lines += ["", "Loss-matched dense checkpoints: " + "; ".join(
          f"{r['name']} (val {r['val_loss']:.3f}, {len(r['task_loss_full'])} tasks)"
          for r in ckpt_rows)]
  lines += ["", *against_paper(sweep, rows, ckpt_rows, best, primary)]
  tasks = sorted({t for r in rows for t in r["task_loss_full"]})
  lines += ["", f"## Per-task circuit edges at {primary} (in brackets: the full model "
            "misses the target, with its test loss; *: the circuit misses it on the test "
            "pairs, or no circuit meets it on the selection pairs by the margin)", "",
            "| task | " + " | ".join(r["name"] for r in rows) + " |",
            "|---|" + "---|" * len(rows)]
  for t in tasks:
    fails = lambda r: False in (r.get("task_meets_target_test", {}).get(t),
                                r.get("task_meets_target_select", {}).get(t))
    cells = [f"{r['task_edges'][t]}{'*' * fails(r)}" if t in r["task_edges"]
             else f"({r['task_loss_full'][t]:.2f})" for r in rows]
    lines.append(f"| {t} | " + " | ".join(cells) + " |")
  unavailable = rows[0]["unavailable"] if rows else {}
  if unavailable:
    lines += ["", "Unavailable with this tokenizer: " +
              "; ".join(f"{k}: {v}" for k, v in unavailable.items())]
  lines += ["", "## Figures", "", "![frontier](frontier.png)", ""]
  if ckpt_rows:
    lines += ["Hollow squares: the loss-matched dense checkpoints, where they solve every task "
              "of the panel's geometric mean.", ""]
  lines += ["![circuit size vs task loss](circuit_size_vs_task_loss.png)", "",
            "## Time per point (seconds)", "",
            "| model | train | prune | prune loss-matched checkpoints |", "|---|---|---|---|"]
  for r in rows:
    t = r["timing"]
    matched = sum(v for k, v in t.items() if k.startswith("prune_step"))
    lines.append(f"| {r['name']} | {_fmt(t.get('train_s'), '.0f')} | "
                 f"{_fmt(t.get('prune_s'), '.0f')} | {_fmt(matched or None, '.0f')} |")
  fileio.atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
