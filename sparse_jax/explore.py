"""What the circuit explorer shows about each node: explanation, snippets, prompts, ablation.

`circuit_page_data(...)` takes a circuit record (the JSON `circuits.save_circuit` writes, read
as a dict and tolerant of fields it does not know), the model, its mean activations, a
stream of held-out pretraining text and the task's held-out pairs, and returns one
JSON-serialisable dict for `explore_html.render_circuit`:

  for every node (site, channel) of the circuit
    explanation: the best rule (`explain.explain_node`) over text rows + the task's pair
      rows (even rows choose and fit, odd rows score), with its held-out score
    snippets: the top-|activation| positions of the held-out text, with context
    prompts: the node's activation at every token of the first held-out pair (both sides),
      and its mean at the last position of side A and side B over all held-out pairs
    ablation: the task's held-out contrast loss when the node alone is mean-ablated, from
      the circuit (everything else already ablated) and from the full model

Every activation comes from `model.forward(..., capture=...)` and every ablation from
`masks.node_ablation` + `tasks.pair_logit_diff`: no second copy of the forward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import explain
from sparse_jax import masks
from sparse_jax import model as model_lib
from sparse_jax.config import ModelConfig
from sparse_jax.tasks import TaskArrays, contrast_loss, pair_logit_diff


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _capture(params, tokens_BxL, *, cfg: ModelConfig, sites: tuple[str, ...]):
  return model_lib.forward(params, tokens_BxL, cfg, capture=sites)[1]


def capture_acts(params, cfg: ModelConfig, tokens_RxL: np.ndarray, sites: tuple[str, ...],
                 batch: int = 16) -> dict[str, np.ndarray]:
  """{site: act_RxLxC} over token rows, in batches of `batch` rows (the last one padded)."""
  R = tokens_RxL.shape[0]
  pad = -R % batch
  tokens = np.concatenate([tokens_RxL, np.zeros((pad, tokens_RxL.shape[1]), tokens_RxL.dtype)])
  outs = [jax.device_get(_capture(params, jnp.asarray(tokens[i:i + batch], jnp.int32), cfg=cfg,
                                  sites=sites)) for i in range(0, len(tokens), batch)]
  return {s: np.concatenate([o[s] for o in outs])[:R] for s in sites}


def pair_rows(arrays: TaskArrays) -> tuple[np.ndarray, np.ndarray]:
  """(tokens_RxL, valid_RxL) of one task's pairs, rows ordered pair 0 A, pair 0 B, pair 1 A..."""
  tokens = np.asarray(arrays.tokens_Px2xL)
  P, _, L = tokens.shape
  last = np.asarray(arrays.last_Px2).reshape(-1)
  return tokens.reshape(P * 2, L), np.arange(L)[None, :] <= last[:, None]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ablated_losses(params, means, arrays: TaskArrays, keep_CxN, *, cfg: ModelConfig):
  def one(keep_N):
    ablation = masks.node_ablation(keep_N.astype(jnp.float32), means, cfg)
    return contrast_loss(pair_logit_diff(params, cfg, arrays, ablation=ablation))[0]
  return jax.lax.map(one, keep_CxN)


def node_keys(nodes: Mapping[str, list[int]]) -> list[tuple[str, int]]:
  """The circuit's nodes as (site, channel), sites in forward order."""
  order = {kind: i for i, kind in enumerate(model_lib.SITE_KINDS)}
  key = lambda s: (int(s.split(".", 1)[0]), order.get(s.split(".", 1)[1], 99))
  return [(site, int(ch)) for site in sorted(nodes, key=key) for ch in nodes[site]]


def ablation_losses(params, cfg: ModelConfig, means, arrays: TaskArrays,
                    keys: list[tuple[str, int]]) -> dict[str, Any]:
  """Held-out task loss of: the circuit, the full model, and each of them minus one node."""
  slices = masks.site_slices(cfg)
  N = masks.n_nodes(cfg)
  circuit_N = np.zeros(N, bool)
  flat = [slices[site].start + ch for site, ch in keys]
  circuit_N[flat] = True
  rows = [circuit_N, np.ones(N, bool)]
  for i in flat:
    for base in (circuit_N, np.ones(N, bool)):
      row = base.copy()
      row[i] = False
      rows.append(row)
  loss = np.asarray(_ablated_losses(params, means, arrays, jnp.asarray(np.stack(rows)), cfg=cfg))
  return {"circuit": float(loss[0]), "full": float(loss[1]),
          "without_in_circuit": loss[2::2].tolist(), "without_in_full": loss[3::2].tolist()}


def circuit_page_data(circuit: Mapping[str, Any], params, cfg: ModelConfig, means,
                      text: explain.TokenStream, arrays: TaskArrays, *,
                      explainer: explain.Explainer | None = None, min_score: float = 0.5,
                      n_snippets: int = 8) -> dict[str, Any]:
  """Everything the page of one solved circuit shows (module docstring).

  Args:
    circuit: the circuit record as a dict (`nodes`, `task`, `edge_list`, losses...).
    params, cfg: the model the circuit was found in.
    means: {site: mean_C}, the mean-ablation values the circuit was found with.
    text: held-out pretraining text rows.
    arrays: the task's held-out pairs (one task, no leading T axis).
    explainer: default `explain.FeatureExplainer()`.
    min_score: held-out score under which a node is shown as unexplained.
    n_snippets: top-activating snippets per node.
  """
  keys = node_keys(circuit.get("nodes") or {})
  sites = tuple(dict.fromkeys(site for site, _ in keys))
  pair_tok, pair_valid = pair_rows(arrays)
  L = max(text.tokens_RxL.shape[1], pair_tok.shape[1])
  pad = lambda a, fill: np.pad(a, ((0, 0), (0, L - a.shape[1])), constant_values=fill)
  stream = explain.TokenStream(
      np.concatenate([pad(text.tokens_RxL, 0), pad(pair_tok, 0)]),
      np.concatenate([pad(text.valid_RxL, False), pad(pair_valid, False)]), text.pieces)
  acts = capture_acts(params, cfg, stream.tokens_RxL, sites) if sites else {}
  R_text = text.tokens_RxL.shape[0]
  # Even text rows and even pairs (both sides of a pair together) choose the rule; the rest
  # score it.
  row_R = np.concatenate([np.arange(R_text), np.arange(len(pair_tok)) // 2])
  select = np.broadcast_to((row_R % 2 == 0)[:, None], stream.tokens_RxL.shape)
  text_view = explain.TokenStream(stream.tokens_RxL[:R_text], stream.valid_RxL[:R_text],
                                  text.pieces)
  ablated = ablation_losses(params, cfg, means, arrays, keys) if keys else {}
  last = np.asarray(arrays.last_Px2)
  out_nodes = []
  for i, (site, ch) in enumerate(keys):
    a_RxL = acts[site][..., ch]
    e = explain.explain_node(stream, a_RxL, select, explainer, min_score=min_score)
    pair_a = a_RxL[R_text:]
    at_last_Px2 = pair_a[np.arange(last.size), last.reshape(-1)].reshape(last.shape)
    prompts = [[[text.pieces[t], float(v)] for t, v, ok in
                zip(pair_tok[s], pair_a[s], pair_valid[s]) if ok] for s in (0, 1)]
    out_nodes.append({
        "site": site, "ch": ch, "explanation": e.to_dict(),
        "snippets": explain.top_snippets(text_view, a_RxL[:R_text], k=n_snippets),
        "prompts": prompts, "last_mean": at_last_Px2.mean(axis=0).tolist(),
        "loss_without_in_circuit": ablated["without_in_circuit"][i],
        "loss_without_in_full": ablated["without_in_full"][i]})
  explained = [n["explanation"]["explained"] for n in out_nodes]
  return {"task": circuit.get("task"), "circuit": dict(circuit), "nodes": out_nodes,
          "loss_circuit": ablated.get("circuit"), "loss_full_model": ablated.get("full"),
          "explained_fraction": float(np.mean(explained)) if explained else None,
          "min_score": min_score, "explainer": (explainer or explain.FeatureExplainer()).name}
