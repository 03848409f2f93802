"""Plots, offline, with matplotlib's Agg backend: circuit graphs and sweep figures.

`plot_frontier(rows, path)` and `plot_size_vs_target(curves, path)` draw the sweep's
capability-vs-interpretability frontier (PAPER.md Fig 3) and circuit size against target
task loss for a matched sparse/dense pair (Fig 2).

`plot_circuit(circuit, path)` draws one `circuits.Circuit`: layers bottom to top, one row
per node site that keeps any node (q, k and v share a row, grouped by head), each node a
box labelled with its channel id (`r` residual read, `q`/`k`/`v` with their head, `n`
neuron, `w` residual write). Weight edges are lines coloured by sign (blue positive, red
negative) and as thick as |weight|; q-k pairs are grey arcs; identity connections through
the residual stream are faint dotted lines. At most `max_edges` weight edges are drawn
(the largest |weight|), and the title says so when some are left out.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from matplotlib.lines import Line2D  # pylint: disable=wrong-import-position

from sparse_jax.edges import QK_KIND, residual_edges  # pylint: disable=wrong-import-position

# Rows within a layer, bottom to top, and what each node is called and coloured.
_ROWS = (("attn.act_in",), ("attn.q", "attn.k", "attn.v"), ("attn.resid_delta",),
         ("mlp.act_in",), ("mlp.post_act",), ("mlp.resid_delta",))
_PREFIX = {"attn.act_in": "r", "attn.q": "q", "attn.k": "k", "attn.v": "v",
           "attn.resid_delta": "w", "mlp.act_in": "r", "mlp.post_act": "n",
           "mlp.resid_delta": "w"}
FACE = {"r": "#d9f0d3", "q": "#fde0c5", "k": "#fde0c5", "v": "#fdd0a2", "n": "#e7d4e8",
         "w": "#c6dbef"}


def layout(nodes: dict[str, list[int]], d_head: int | None):
  """Node positions {(site, ch): (x, y)}, labels, and the row labels [(y, text)]."""
  layers = sorted({int(site.split(".", 1)[0]) for site in nodes})
  pos, labels, rows = {}, {}, []
  for layer in range(max(layers, default=-1) + 1):
    for kinds in _ROWS:
      items = [(f"{layer}.{kind}", ch) for kind in kinds for ch in nodes.get(f"{layer}.{kind}", ())]
      if not items:
        continue
      if len(kinds) > 1 and d_head:  # q, k, v of a head side by side
        items.sort(key=lambda it: (it[1] // d_head, kinds.index(it[0].split(".", 1)[1]), it[1]))
      y = len(rows)
      rows.append((y, f"{layer}.{kinds[0].split('.')[0]}." +
                   "/".join(k.split(".")[1] for k in kinds)))
      for j, (site, ch) in enumerate(items):
        pos[site, ch] = (j - (len(items) - 1) / 2, y)
        head = f" h{ch // d_head}" if len(kinds) > 1 and d_head else ""
        labels[site, ch] = f"{_PREFIX[site.split('.', 1)[1]]}{ch}{head}"
  return pos, labels, rows


def plot_circuit(circuit, path: str, *, max_edges: int = 300,
                 explanations: dict[tuple[str, int], str] | None = None) -> None:
  """Draws a circuit graph to a PNG.

  Args:
    circuit: a `circuits.Circuit` (or one read back with `Circuit.from_json`).
    path: output .png path.
    max_edges: most weight edges drawn, largest |weight| first.
    explanations: optional {(site, channel): short text} written under each node's label
      (e.g. `explore_html.short_explanation` of `explain.explain_node`).
  """
  nodes = {site: list(ids) for site, ids in circuit.nodes.items()}
  pos, labels, rows = layout(nodes, circuit.search.get("d_head"))
  widest = max((sum(1 for p in pos.values() if p[1] == y) for y, _ in rows), default=1)
  per_node = 1.3 if explanations else 0.75  # inches; an explanation widens each box
  fig, ax = plt.subplots(figsize=(min(4 + per_node * widest, 60), 2 + 0.8 * max(len(rows), 1)))
  ax.set_axis_off()
  if not circuit.solvable:
    ax.text(0.5, 0.5, f"{circuit.task}: unsolvable\n{circuit.reason}", ha="center",
            va="center", wrap=True, transform=ax.transAxes)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return
  head = (f"{circuit.task}: {circuit.n_nodes} nodes, {circuit.edges['total']} edges, test "
          f"loss {circuit.loss_before:.3g} (calibrated {circuit.loss_after:.3g}), target "
          f"{circuit.target}")
  # The edge list is sorted by |weight| (and may be truncated in JSON): draw its head.
  drawn = [e for e in circuit.edge_list if e[0] != QK_KIND][:max_edges]
  # Circuit JSON written before q-k pairs left the edge count had them in "total".
  n_weighted = circuit.edges["total"] - circuit.edges.get(QK_KIND, 0)
  resid = residual_edges(nodes, n_layer=1 + max((int(s.split(".")[0]) for s in nodes), default=0))
  if len(drawn) < n_weighted or len(resid) > max_edges:
    head += (f"\nshowing the {len(drawn)} largest-|w| of {n_weighted} weight edges and "
             f"{min(len(resid), max_edges)} of {len(resid)} residual-stream connections")
  w_max = max((abs(e[5]) for e in drawn), default=1.0) or 1.0

  def line(a, b, rad=0.0, **style):
    ax.annotate("", xy=pos[b], xytext=pos[a], zorder=1,
                arrowprops=dict(arrowstyle="-", shrinkA=9, shrinkB=9,
                                connectionstyle=f"arc3,rad={rad}", **style))

  for write, read, ch in resid[:max_edges]:
    line((write, ch), (read, ch), rad=0.15, color="0.6", lw=0.6, ls=":")
  for kind, src, s_ch, dst, d_ch, _ in circuit.edge_list:
    if kind == QK_KIND:
      line((src, s_ch), (dst, d_ch), rad=-0.5, color="0.45", lw=1.0)
  for _, src, s_ch, dst, d_ch, w in drawn:
    line((src, s_ch), (dst, d_ch), color="#2166ac" if w > 0 else "#b2182b",
         lw=0.4 + 2.6 * abs(w) / w_max, alpha=0.85)
  for key, (x, y) in pos.items():
    text = labels[key]
    if explanations and key in explanations:
      text += "\n" + explanations[key]
    ax.text(x, y, text, ha="center", va="center", fontsize=7 if text == labels[key] else 5.5,
            zorder=3,
            bbox=dict(boxstyle="round,pad=0.25", fc=FACE[labels[key][0]], ec="0.3", lw=0.5))
  x_lo = min((p[0] for p in pos.values()), default=0) - 1.5
  for y, text in rows:
    ax.text(x_lo, y, text, ha="right", va="center", fontsize=8, family="monospace")
  ax.set_xlim(x_lo - 2.5, -x_lo + 0.5)
  ax.set_ylim(-0.7, len(rows) - 0.3)
  ax.set_title(head, fontsize=9)
  ax.legend(handles=[Line2D([], [], color="#2166ac", label="weight > 0"),
                     Line2D([], [], color="#b2182b", label="weight < 0"),
                     Line2D([], [], color="0.45", label="q-k pair"),
                     Line2D([], [], color="0.6", ls=":", label="residual stream")],
            loc="upper right", fontsize=7, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_frontier(rows, geomeans: dict, n_shared: dict, path: str,
                  checkpoints: dict | None = None) -> None:
  """Pretraining loss vs geometric-mean circuit edges (Fig 3), one panel per target loss.

  Args:
    rows: sweep rows with name, width, l0_target (None = dense) and val_loss.
    geomeans: {target: {model name: geometric-mean edges over the shared tasks}}.
    n_shared: {target: number of tasks every model meets there}.
    path: PNG to write.
    checkpoints: {target: [(val_loss, geometric-mean edges over the same shared tasks,
      label)]}: dense checkpoints along training, drawn as hollow squares (the dense
      frontier at the sparse models' losses).
  """
  targets = sorted(geomeans)
  fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.8), squeeze=False)
  series = sorted({r["l0_target"] for r in rows}, key=lambda l0: (l0 is None, l0 or 0))
  cmap = plt.get_cmap("viridis", max(len(series), 2))
  for ax, target in zip(axes[0], targets):
    for i, l0 in enumerate(series):
      pts = sorted(((r, geomeans[target][r["name"]]) for r in rows if r["l0_target"] == l0),
                   key=lambda p: p[0]["width"])
      pts = [(r, y) for r, y in pts if math.isfinite(y)]
      if not pts:
        continue
      dense = l0 is None
      ax.plot([r["val_loss"] for r, _ in pts], [y for _, y in pts],
              marker="s" if dense else "o", linestyle="--" if dense else "-",
              color="black" if dense else cmap(i), label="dense" if dense else f"L0 = {l0:,}")
      for r, y in pts:
        ax.annotate(f"d{r['width']}", (r["val_loss"], y), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ckpts = sorted(p for p in (checkpoints or {}).get(target, ()) if math.isfinite(p[1]))
    if ckpts:
      ax.plot([p[0] for p in ckpts], [p[1] for p in ckpts], marker="s", linestyle=":",
              color="black", markerfacecolor="none", label="dense checkpoints")
      for x, y, label in ckpts:
        ax.annotate(label, (x, y), fontsize=8, textcoords="offset points", xytext=(4, -10))
    ax.set_yscale("log")
    ax.set_xlabel("pretraining (validation) loss, nats/token")
    ax.set_ylabel("circuit size: geometric-mean edges")
    ax.set_title(f"target task loss {target}: {n_shared[target]} tasks every model meets",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle("capability vs interpretability (lower left is better)", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_size_vs_target(curves, path: str, *, title: str) -> None:
  """Circuit size vs target task loss, one line per model.

  Args:
    curves: {label: [(target, geomean_edges, n_tasks), ...]}.
    path: PNG to write.
    title: figure title (say how the models were matched).
  """
  fig, ax = plt.subplots(figsize=(7, 5))
  for (label, points), style in zip(curves.items(), ("o-", "s--", "^-.", "v:")):
    points = [p for p in points if math.isfinite(p[1])]
    if not points:
      continue
    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    for target, edges, n in points:
      ax.annotate(f"{n}", (target, edges), fontsize=7, textcoords="offset points",
                  xytext=(3, -10))
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("target task loss (nats, held-out)")
  ax.set_ylabel("circuit size: geometric-mean edges (tasks counted at each point)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
