"""Circuit size in edges: the nonzero weights that join two kept nodes (PAPER.md §4).

A circuit is a set of kept nodes, `{site: channel ids}` (sites as in `model.py`). Its size
is its number of *edges*, as in the paper: a weight w[src, dst] != 0 whose source and
destination channels are both kept. Per layer i the rules are:

  attn.read_q   i.attn.act_in[c] -> i.attn.q[a]   if c_attn.w[c, a] != 0      (q slice)
  attn.read_k   i.attn.act_in[c] -> i.attn.k[a]   if c_attn.w[c, A + a] != 0  (k slice)
  attn.read_v   i.attn.act_in[c] -> i.attn.v[a]   if c_attn.w[c, 2A + a] != 0 (v slice)
  attn.v_write  i.attn.v[a] -> i.attn.resid_delta[d]  if attn c_proj.w[a, d] != 0
                (v reaches the output projection through the attention mix of its own
                head, which has no weights of its own)
  mlp.read_neuron   i.mlp.act_in[c] -> i.mlp.post_act[f]      if c_fc.w[c, f] != 0
  mlp.neuron_write  i.mlp.post_act[f] -> i.mlp.resid_delta[d] if mlp c_proj.w[f, d] != 0

`total` sums these. Not in `total`, and reported apart:

- `qk_pairs` (`count_qk_pairs`): kept pairs i.attn.q[a] -- i.attn.k[a]. The q.k dot product
  pairs channel a of q only with channel a of k (same head, same within-head index; with
  rotary positions also with a's rotation partner, d_head/2 away in the head), so a
  circuit that keeps both uses that product, but there is no weight between them: the paper
  counts nonzero weights, so these pairs are not edges (q and k are untied nodes, fn 17).
- `residual`: the identity connections of the residual stream, from a write node
  j.*.resid_delta[c] to every later read node i.*.act_in[c] of the same channel (a later
  layer, or the MLP read of the same layer after its attention write). They are not weights
  either, so they do not add to the circuit's size.

Embedding and unembedding weights are not edges either: tokens and logits are not nodes.
AbsTopK may silence a nonzero weight on a given input; edges count weights, not activity.

Everything here is numpy on the host (no jit): a circuit's kept channels index sub-blocks
of each weight matrix and `np.count_nonzero` counts them, with no loop over channels.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from sparse_jax.config import ModelConfig
from sparse_jax.model import node_sites

EDGE_KINDS = ("attn.read_q", "attn.read_k", "attn.read_v", "attn.v_write",
              "mlp.read_neuron", "mlp.neuron_write")
QK_KIND = "attn.qk"  # the kind of a q-k pair in `list_edges` (not an edge kind)
# (kind, src site, src channel, dst site, dst channel, weight); weight is None for q-k pairs.
Edge = tuple[str, str, int, str, int, float | None]


def keep_by_site(nodes: Mapping[str, Sequence[int]], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Boolean keep vector per site from {site: channel ids} (missing sites keep nothing)."""
  sites = node_sites(cfg)
  unknown = set(nodes) - set(sites)
  if unknown:
    raise ValueError(f"unknown node site(s) {sorted(unknown)}")
  keep = {site: np.zeros(width, bool) for site, width in sites.items()}
  for site, ids in nodes.items():
    keep[site][np.asarray(ids, np.int64)] = True
  return keep


def _weight_blocks(keep: Mapping[str, np.ndarray], params: Any, cfg: ModelConfig
                   ) -> Iterator[tuple[str, str, np.ndarray, str, np.ndarray, np.ndarray]]:
  """(kind, src site, src ids, dst site, dst ids, weights between them) for each rule."""
  A = cfg.d_attn
  for i in range(cfg.n_layer):
    p = params["blocks"][str(i)]
    site = lambda kind: f"{i}.{kind}"
    ids = lambda kind: np.flatnonzero(keep[site(kind)])
    w_Dx3A = np.asarray(p["attn"]["c_attn"]["w"])
    read = ids("attn.act_in")
    for j, name in enumerate("qkv"):
      dst = ids(f"attn.{name}")
      yield (f"attn.read_{name}", site("attn.act_in"), read, site(f"attn.{name}"), dst,
             w_Dx3A[np.ix_(read, j * A + dst)])
    v, write = ids("attn.v"), ids("attn.resid_delta")
    yield ("attn.v_write", site("attn.v"), v, site("attn.resid_delta"), write,
           np.asarray(p["attn"]["c_proj"]["w"])[np.ix_(v, write)])
    read, neuron, write = ids("mlp.act_in"), ids("mlp.post_act"), ids("mlp.resid_delta")
    yield ("mlp.read_neuron", site("mlp.act_in"), read, site("mlp.post_act"), neuron,
           np.asarray(p["mlp"]["c_fc"]["w"])[np.ix_(read, neuron)])
    yield ("mlp.neuron_write", site("mlp.post_act"), neuron, site("mlp.resid_delta"), write,
           np.asarray(p["mlp"]["c_proj"]["w"])[np.ix_(neuron, write)])


def _qk_blocks(keep: Mapping[str, np.ndarray], cfg: ModelConfig):
  """(QK_KIND, q site, q ids, k site, k ids, 1 where the q.k product pairs the channels).

  Without rotary positions q channel a meets k channel a only. With them (cfg.rope) it also
  meets its rotation partner, the channel d_head/2 away in the same head.
  """
  half = cfg.d_head // 2
  for i in range(cfg.n_layer):
    q, k = np.flatnonzero(keep[f"{i}.attn.q"]), np.flatnonzero(keep[f"{i}.attn.k"])
    pairs = q[:, None] == k[None, :]
    if cfg.rope:
      partner = q + np.where(q % cfg.d_head < half, half, -half)
      pairs |= partner[:, None] == k[None, :]
    yield (QK_KIND, f"{i}.attn.q", q, f"{i}.attn.k", k, pairs.astype(np.float32))


def _residual_pairs(keep: Mapping[str, np.ndarray], n_layer: int):
  """writes_SxD, reads_SxD (sublayers in forward order) and before_SxS[w, r] = w < r."""
  order = [(i, part) for i in range(n_layer) for part in ("attn", "mlp")]
  writes_SxD = np.stack([keep[f"{i}.{part}.resid_delta"] for i, part in order])
  reads_SxD = np.stack([keep[f"{i}.{part}.act_in"] for i, part in order])
  # Sublayer s reads the stream before it adds its own write, so write w reaches read r
  # exactly when w comes strictly earlier.
  before_SxS = np.triu(np.ones((len(order), len(order)), bool), k=1)
  return order, writes_SxD, reads_SxD, before_SxS


def count_edges(nodes: Mapping[str, Sequence[int]], params: Any, cfg: ModelConfig
                ) -> dict[str, int]:
  """Counts a circuit's edges by kind (rules in the module docstring).

  Args:
    nodes: {site: kept channel ids}.
    params: model params (numpy or jax arrays; pass `jax.device_get(params)` when counting
      many circuits, to copy the weights to the host once).
    cfg: the model config.

  Returns:
    {"total": weight edges, one count per EDGE_KINDS entry,
     "residual": identity residual-stream connections (not in total)}; q-k pairs are
    counted by `count_qk_pairs`, not here.
  """
  keep = keep_by_site(nodes, cfg)
  counts = dict.fromkeys(EDGE_KINDS, 0)
  for kind, _, _, _, _, w in _weight_blocks(keep, params, cfg):
    counts[kind] += int(np.count_nonzero(w))
  _, writes_SxD, reads_SxD, _ = _residual_pairs(keep, cfg.n_layer)
  # Kept writes strictly before each read, per channel: an exclusive cumulative sum.
  earlier_SxD = np.cumsum(writes_SxD, axis=0) - writes_SxD
  return {"total": sum(counts.values()), **counts,
          "residual": int(np.sum(reads_SxD * earlier_SxD))}


def count_qk_pairs(nodes: Mapping[str, Sequence[int]], cfg: ModelConfig) -> int:
  """Kept (q, k) channel pairs that meet in a q.k product; needs no weights (not edges)."""
  keep = keep_by_site(nodes, cfg)
  return sum(int(np.count_nonzero(m)) for *_, m in _qk_blocks(keep, cfg))


def list_edges(nodes: Mapping[str, Sequence[int]], params: Any, cfg: ModelConfig
               ) -> list[Edge]:
  """Every weight edge of a circuit, largest |weight| first, after its q-k pairs (kind
  QK_KIND, weight None: listed for drawing, not counted as edges)."""
  keep = keep_by_site(nodes, cfg)
  out = []
  for kind, src_site, src, dst_site, dst, w in itertools.chain(
      _qk_blocks(keep, cfg), _weight_blocks(keep, params, cfg)):
    r, c = np.nonzero(w)
    weights = [None] * len(r) if kind == QK_KIND else w[r, c].tolist()
    out.extend(zip([kind] * len(r), [src_site] * len(r), src[r].tolist(), [dst_site] * len(r),
                   dst[c].tolist(), weights))
  return sorted(out, key=lambda e: -np.inf if e[5] is None else -abs(e[5]))


def residual_edges(nodes: Mapping[str, Sequence[int]], n_layer: int
                   ) -> list[tuple[str, str, int]]:
  """Identity residual connections (write site, read site, channel); needs no weights."""
  resid = [f"{i}.{part}.{kind}" for i in range(n_layer) for part in ("attn", "mlp")
           for kind in ("act_in", "resid_delta")]
  width = 1 + max((max(nodes.get(site, ()), default=-1) for site in resid), default=-1)
  keep = {site: np.zeros(width, bool) for site in resid}
  for site in resid:
    keep[site][np.asarray(nodes.get(site, ()), np.int64)] = True
  order, writes_SxD, reads_SxD, before_SxS = _residual_pairs(keep, n_layer)
  w, r, ch = np.nonzero(writes_SxD[:, None, :] & reads_SxD[None, :, :] & before_SxS[..., None])
  name = lambda s, kind: f"{order[s][0]}.{order[s][1]}.{kind}"
  return [(name(a, "resid_delta"), name(b, "act_in"), int(c)) for a, b, c in zip(w, r, ch)]
