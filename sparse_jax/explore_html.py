"""Self-contained HTML pages of the circuit explorer (inline SVG, CSS and JS; no CDN).

`render_circuit(page)` turns one `explore.circuit_page_data` dict into a page: the circuit
graph (layers bottom to top, one row per node site as in `viz.plot_circuit`; weight edges
blue for positive and red for negative, as thick as |weight|; q-k pairs grey dashed arcs;
residual-stream connections faint dotted lines), each node showing its label, its short
explanation and its held-out score ("unexplained" under the threshold). Hovering a node
shows, in the side panel, its explanation and simulation fit, the task loss when it alone is
ablated, its activation on the task's two prompts and its top-activating snippets with each
token shaded by its activation; clicking pins the panel to a node. `render_index(rows)` is
the table of tasks. The data travels as one JSON block inside the page, read by the script,
so every page opens from disk with no network.
"""

from __future__ import annotations

import html
import json
from typing import Any, Mapping

from sparse_jax import viz
from sparse_jax.edges import residual_edges

_DX, _DY, _W, _H, _MARGIN = 96, 96, 88, 44, 150  # px: spacing, node box, left margin
MAX_DRAWN_EDGES = 400  # weight edges drawn, largest |weight| first

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;display:flex;height:100vh}
#graph{flex:1 1 auto;overflow:auto;border-right:1px solid #ccc}
#panel{flex:0 0 430px;overflow:auto;padding:10px 14px}
h1{font-size:16px;margin:8px 12px} .sub{margin:0 12px 8px;color:#444}
.node rect{stroke:#333;stroke-width:1} .node{cursor:pointer}
.node.unexplained rect{stroke-dasharray:3 2;stroke:#999} .node.sel rect{stroke:#000;stroke-width:3}
.node text{font-size:10px;text-anchor:middle;pointer-events:none}
.node .lab{font-weight:600} .node .ex{font-size:8.5px;fill:#222} .node .sc{font-size:8px;fill:#555}
.rowlab{font:11px monospace;text-anchor:end;fill:#333}
.snip,.prompt{font:12px/1.5 monospace;white-space:pre-wrap;border:1px solid #ddd;padding:4px;
margin:4px 0;background:#fafafa} .tok{border-radius:2px} .tok.top{outline:1px solid #000}
.muted{color:#777} table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #eee;
text-align:left} .bad{color:#b2182b} .good{color:#1a7a1a}
"""

_JS = """
const D = JSON.parse(document.getElementById('page-data').textContent);
let pinned = null;
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function shade(a, amax) {
  const f = amax > 0 ? Math.min(1, Math.abs(a) / amax) : 0;
  return a >= 0 ? `rgba(255,140,0,${f})` : `rgba(33,102,172,${f})`;
}
function tokens(box, toks, amax, top) {
  toks.forEach(([t, a], j) => {
    const s = el('span', 'tok' + (j === top ? ' top' : ''), t.replace(/\\n/g, '\\u21b5\\n'));
    s.style.background = shade(a, amax);
    s.title = a.toFixed(3);
    box.appendChild(s);
  });
}
function show(i) {
  const n = D.nodes[i], e = n.explanation, p = document.getElementById('panel');
  document.querySelectorAll('.node').forEach(g => g.classList.toggle('sel', +g.dataset.node === i));
  p.replaceChildren();
  p.appendChild(el('h2', '', `${n.label}  (${n.site}[${n.ch}])`));
  p.appendChild(el('div', e.explained ? 'good' : 'bad',
    (e.explained ? '' : 'unexplained; best rule: ') + (e.scale < 0 ? 'low when ' : 'high when ') + e.text));
  p.appendChild(el('div', 'muted', `held-out score r = ${e.score.toFixed(3)} (selection r = ` +
    `${e.select_r.toFixed(3)}); simulation = ${e.scale.toFixed(3)} * rule + ${e.offset.toFixed(3)}; ` +
    `${e.n_select} positions chose the rule, ${e.n_heldout} scored it; explainer: ${e.explainer}`));
  p.appendChild(el('h3', '', 'Ablating this node alone'));
  const dc = n.loss_without_in_circuit - D.loss_circuit, df = n.loss_without_in_full - D.loss_full_model;
  p.appendChild(el('div', '', `from the circuit: task loss ${D.loss_circuit.toFixed(3)} \\u2192 ` +
    `${n.loss_without_in_circuit.toFixed(3)} (${dc >= 0 ? '+' : ''}${dc.toFixed(3)})`));
  p.appendChild(el('div', '', `from the full model: ${D.loss_full_model.toFixed(3)} \\u2192 ` +
    `${n.loss_without_in_full.toFixed(3)} (${df >= 0 ? '+' : ''}${df.toFixed(3)})`));
  p.appendChild(el('h3', '', 'The task\\'s two prompts (first held-out pair)'));
  const amax = Math.max(1e-9, ...n.snippets.flatMap(s => s.tokens.map(t => Math.abs(t[1]))),
    ...n.prompts.flat().map(t => Math.abs(t[1])));
  n.prompts.forEach((toks, s) => {
    const box = el('div', 'prompt');
    box.appendChild(el('b', '', s ? 'B: ' : 'A: '));
    tokens(box, toks, amax, toks.length - 1);
    p.appendChild(box);
  });
  p.appendChild(el('div', 'muted', `mean activation at the last token over held-out pairs: ` +
    `A ${n.last_mean[0].toFixed(3)}, B ${n.last_mean[1].toFixed(3)}`));
  p.appendChild(el('h3', '', 'Top-activating held-out text'));
  const list = el('div', '');
  list.id = 'snippets';
  n.snippets.forEach(s => {
    const box = el('div', 'snip');
    tokens(box, s.tokens, amax, s.at);
    box.appendChild(el('span', 'muted', `   [${s.act.toFixed(3)}]`));
    list.appendChild(box);
  });
  p.appendChild(list);
}
document.querySelectorAll('.node').forEach(g => {
  const i = +g.dataset.node;
  g.addEventListener('mouseenter', () => { if (pinned === null) show(i); });
  g.addEventListener('click', () => { pinned = pinned === i ? null : i; show(i); });
});
"""


def _esc(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
  return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>{body}"
          f"{script}</body></html>\n")


def short_explanation(e: Mapping[str, Any], width: int = 26) -> str:
  """One line for a node box: the rule (or "unexplained"), shortened to `width` chars."""
  if not e["explained"]:
    return "unexplained"
  text = ("low: " if e["scale"] < 0 else "") + e["text"]
  return text if len(text) <= width else text[:width - 1] + "\u2026"


def _qk_pairs(circuit: Mapping[str, Any]) -> list[tuple[str, int, str, int]]:
  """q-k pairs, from `edge_list` entries of kind attn.qk and/or a separate `qk_pairs` field
  (entries [src, ch, dst, ch], optionally with the kind first and a weight last)."""
  out = [tuple(e[1:5]) for e in circuit.get("edge_list") or [] if e[0] == "attn.qk"]
  for e in circuit.get("qk_pairs") or []:
    e = [x for x in e if x != "attn.qk"]
    out.append((e[0], e[1], e[2], e[3]))
  return list(dict.fromkeys((str(a), int(b), str(c), int(d)) for a, b, c, d in out))


def _svg(page: Mapping[str, Any]) -> str:
  circuit = page["circuit"]
  nodes = {site: list(ids) for site, ids in (circuit.get("nodes") or {}).items()}
  pos, labels, rows = viz.layout(nodes, (circuit.get("search") or {}).get("d_head"))
  x_min = min((x for x, _ in pos.values()), default=0)
  x_max = max((x for x, _ in pos.values()), default=0)
  width = int(_MARGIN + (x_max - x_min + 1) * _DX + 40)
  height = int((len(rows) + 0.5) * _DY)
  px = lambda key: (_MARGIN + (pos[key][0] - x_min + 0.5) * _DX,
                    height - (pos[key][1] + 0.75) * _DY)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
  for y, text in rows:
    parts.append(f'<text class="rowlab" x="{_MARGIN - 12}" y="{height - (y + 0.75) * _DY + 4:.1f}">'
                 f"{_esc(text)}</text>")
  n_layer = 1 + max((int(s.split(".")[0]) for s in nodes), default=0)
  for write, read, ch in residual_edges(nodes, n_layer)[:MAX_DRAWN_EDGES]:
    (x1, y1), (x2, y2) = px((write, ch)), px((read, ch))
    parts.append(f'<path d="M{x1:.1f},{y1:.1f} Q{x1 + 30:.1f},{(y1 + y2) / 2:.1f} {x2:.1f},'
                 f'{y2:.1f}" fill="none" stroke="#999" stroke-width="0.8" stroke-dasharray="1 3"/>')
  for src, s_ch, dst, d_ch in _qk_pairs(circuit):
    if (src, s_ch) in pos and (dst, d_ch) in pos:
      (x1, y1), (x2, y2) = px((src, s_ch)), px((dst, d_ch))
      parts.append(f'<path d="M{x1:.1f},{y1 - _H / 2:.1f} Q{(x1 + x2) / 2:.1f},{y1 - _H:.1f} '
                   f'{x2:.1f},{y2 - _H / 2:.1f}" fill="none" stroke="#777" stroke-dasharray="4 2"/>')
  drawn = [e for e in circuit.get("edge_list") or [] if e[0] != "attn.qk" and e[5] is not None
           and (e[1], e[2]) in pos and (e[3], e[4]) in pos][:MAX_DRAWN_EDGES]
  w_max = max((abs(e[5]) for e in drawn), default=1.0) or 1.0
  for _, src, s_ch, dst, d_ch, w in reversed(drawn):  # the heaviest on top
    (x1, y1), (x2, y2) = px((src, s_ch)), px((dst, d_ch))
    parts.append(f'<line x1="{x1:.1f}" y1="{y1 - _H / 2:.1f}" x2="{x2:.1f}" y2="{y2 + _H / 2:.1f}" '
                 f'stroke="{"#2166ac" if w > 0 else "#b2182b"}" stroke-opacity="0.8" '
                 f'stroke-width="{0.5 + 3.5 * abs(w) / w_max:.2f}"><title>weight {w:+.4f}'
                 f"</title></line>")
  for i, node in enumerate(page["nodes"]):
    key = (node["site"], node["ch"])
    x, y = px(key)
    e = node["explanation"]
    face = viz.FACE[labels[key][0]]
    cls = "node" + ("" if e["explained"] else " unexplained")
    parts.append(
        f'<g class="{cls}" data-node="{i}" id="node-{i}"><rect x="{x - _W / 2:.1f}" '
        f'y="{y - _H / 2:.1f}" width="{_W}" height="{_H}" rx="5" fill="{face}"/>'
        f'<text class="lab" x="{x:.1f}" y="{y - 8:.1f}">{_esc(labels[key])}</text>'
        f'<text class="ex" x="{x:.1f}" y="{y + 5:.1f}">{_esc(short_explanation(e, 20))}</text>'
        f'<text class="sc" x="{x:.1f}" y="{y + 16:.1f}">r={e["score"]:.2f}</text></g>')
  parts.append("</svg>")
  return "\n".join(parts)


def render_circuit(page: Mapping[str, Any]) -> str:
  """The HTML page of one circuit (module docstring)."""
  circuit = page["circuit"]
  _, labels, _ = viz.layout({s: list(i) for s, i in (circuit.get("nodes") or {}).items()},
                            (circuit.get("search") or {}).get("d_head"))
  data = dict(page, nodes=[dict(n, label=labels[n["site"], n["ch"]]) for n in page["nodes"]])
  data.pop("circuit")
  frac = page["explained_fraction"]
  edges = circuit.get("edges") or {}
  head = (f"<h1>{_esc(page['task'])}: {circuit.get('n_nodes')} nodes, {edges.get('total')} "
          f"edges</h1><div class=\"sub\">held-out task loss: circuit {page['loss_circuit']:.3f}"
          f", full model {page['loss_full_model']:.3f} (target {circuit.get('target')}); "
          f"{frac:.0%} of nodes explained (held-out r &ge; {page['min_score']}, explainer "
          f"{_esc(page['explainer'])}). Hover a node for its snippets; click to pin. "
          f"<a href=\"index.html\">all tasks</a></div>")
  blob = json.dumps(data).replace("</", "<\\/")  # nothing in the data can close the script
  body = (f'<div id="graph">{head}{_svg(page)}</div><div id="panel"><p class="muted">Hover a '
          f"node.</p></div>")
  script = (f'<script id="page-data" type="application/json">{blob}</script>'
            f"<script>{_JS}</script>")
  return _page(f"circuit: {page['task']}", body, script)


def render_index(title: str, rows: list[Mapping[str, Any]]) -> str:
  """The index page: one row per task ({task, href or None, n_nodes, edges, loss, explained,
  mean_score, note})."""
  cells = []
  for r in rows:
    name = (f'<a href="{_esc(r["href"])}">{_esc(r["task"])}</a>' if r.get("href")
            else _esc(r["task"]))
    num = lambda v, f: "" if v is None else format(v, f)
    cells.append(f"<tr><td>{name}</td><td>{num(r.get('n_nodes'), 'd')}</td>"
                 f"<td>{num(r.get('edges'), 'd')}</td><td>{num(r.get('loss'), '.3f')}</td>"
                 f"<td>{num(r.get('explained'), '.0%')}</td>"
                 f"<td>{num(r.get('mean_score'), '.2f')}</td><td>{_esc(r.get('note', ''))}</td></tr>")
  body = (f"<div style=\"padding:12px\"><h1>{_esc(title)}</h1><table><tr><th>task</th>"
          f"<th>nodes</th><th>edges</th><th>circuit loss</th><th>explained</th>"
          f"<th>mean score</th><th></th></tr>{''.join(cells)}</table></div>")
  return _page(title, body)
