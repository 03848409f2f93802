"""Circuits across training checkpoints and across seeds: the analysis half of issue 15.

`experiments/dynamics.py` runs `circuits.find_circuits` (through `experiments.prune`) at each
kept checkpoint of a run, or at the last checkpoint of several runs, and hands the
`Circuit` records to this module:

- Over training (one run): `task_series` turns per-checkpoint records into, per task, the
  full-model task loss, circuit nodes and edges against step, the first step whose circuit
  meets the target, and the Jaccard node overlap of each checkpoint's circuit with the next
  checkpoint's and with the final one. Node ids (site, channel) name the same parameters at
  every checkpoint of one run, so these overlaps mean something.
- Across seeds: node ids are NOT comparable (channel 7 of one seed has nothing to do with
  channel 7 of another), so `compare_runs` reports what needs no matching: circuit size
  spread, per-site composition (nodes of each of the 8 site kinds per layer) and
  `activation_similarity`, the correlation of circuit-node activations on the same task
  inputs, best match per node.

Per-checkpoint records are written atomically and reused when complete (`load_record`), so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import model as model_lib
from sparse_jax.circuits import Circuit
from sparse_jax.config import ModelConfig
from sparse_jax.fileio import atomic_write_text
from sparse_jax.tasks import TaskArrays

NODE_IDS_NOTE = ("Node ids (site, channel) are comparable across checkpoints of one run (the "
                 "same parameters, trained further), so Jaccard overlaps over training are "
                 "meaningful; they are not comparable across seeds, where only sizes, "
                 "per-site composition and activation similarity are reported.")
RECORD_VERSION = 1


# --- node sets ---


def node_set(nodes: Mapping[str, Iterable[int]]) -> set[tuple[str, int]]:
  """{(site, channel)} from a circuit's `nodes` dict."""
  return {(site, int(ch)) for site, chans in nodes.items() for ch in chans}


def jaccard(nodes_a: Mapping[str, Iterable[int]], nodes_b: Mapping[str, Iterable[int]]) -> float:
  """|A & B| / |A | B| of two circuits' node sets; two empty circuits count as identical (1)."""
  a, b = node_set(nodes_a), node_set(nodes_b)
  union = a | b
  return len(a & b) / len(union) if union else 1.0


def composition(nodes: Mapping[str, Iterable[int]], n_layer: int) -> dict[str, dict[str, int]]:
  """{layer: {site kind: node count}} over all 8 site kinds (zeros included)."""
  out = {str(i): {kind: 0 for kind in model_lib.SITE_KINDS} for i in range(n_layer)}
  for site, chans in nodes.items():
    layer, kind = site.split(".", 1)
    if layer not in out or kind not in out[layer]:
      raise ValueError(f"circuit node site {site!r} is not a site of a {n_layer}-layer model")
    out[layer][kind] += len(list(chans))
  return out


def is_met(c: Circuit) -> bool:
  """Whether a circuit meeting the target was found: the full model met it and one was chosen.

  A circuit of 0 nodes counts: the fully mean-ablated model already meets the target (early
  checkpoints with a loose target do), which `task_series` flags as "empty".
  """
  return bool(c.solvable and c.loss_before is not None)


# --- per-checkpoint records (resumable) ---


def record(step: int, workdir: str, task_names: Sequence[str], circuit_settings: dict,
           circuits: Sequence[Circuit], unavailable: Mapping[str, str]) -> dict[str, Any]:
  """The JSON record of one checkpoint's circuits; `complete` marks a finished write."""
  return {"version": RECORD_VERSION, "workdir": str(workdir), "step": int(step),
          "requested_tasks": list(task_names), "circuit_config": circuit_settings,
          "unavailable": dict(unavailable), "circuits": [c.to_dict() for c in circuits],
          "complete": True}


def save_record(path: str | Path, rec: dict[str, Any]) -> None:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  atomic_write_text(path, json.dumps(rec, indent=1))


def load_record(path: str | Path, task_names: Sequence[str], circuit_settings: dict
                ) -> dict[str, Any] | None:
  """The record at path if it is complete and was made with these tasks and settings.

  Anything else (missing, unreadable, older format, other tasks or settings) returns None:
  the checkpoint is searched again and the file replaced.
  """
  try:
    rec = json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None
  ok = (isinstance(rec, dict) and rec.get("complete") is True
        and rec.get("version") == RECORD_VERSION
        and rec.get("requested_tasks") == list(task_names)
        and rec.get("circuit_config") == json.loads(json.dumps(circuit_settings)))
  return rec if ok else None


def circuits_of(rec: Mapping[str, Any]) -> dict[str, Circuit]:
  """{task: Circuit} of a record."""
  return {d["task"]: Circuit.from_json(json.dumps(d)) for d in rec["circuits"]}


# --- over training ---


def _rounded(x: float | None, nd: int = 6) -> float | None:
  return None if x is None or not math.isfinite(x) else round(float(x), nd)


def task_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per task, the circuit at every checkpoint (records sorted by step; see module docstring).

  Jaccard overlaps are None where either circuit was not found (target not met).
  """
  records = sorted(records, key=lambda r: r["step"])
  if not records:
    raise ValueError("task_series: no checkpoint records")
  by_step = [(r["step"], circuits_of(r)) for r in records]
  final_step, final = by_step[-1]
  tasks = list(dict.fromkeys(t for _, cs in by_step for t in cs))
  out = {}
  for task in tasks:
    rows = []
    for i, (step, cs) in enumerate(by_step):
      c = cs.get(task)
      if c is None:
        continue
      met = is_met(c)
      nxt = by_step[i + 1][1].get(task) if i + 1 < len(by_step) else None
      fin = final.get(task)
      rows.append({
          "step": step, "loss_full": _rounded(c.loss_full), "met": met,
          "reason": "" if met else (c.reason or "no circuit meets the target"),
          "n_nodes": c.n_nodes if met else None, "empty": met and c.n_nodes == 0,
          "edges": c.edges.get("total") if met and c.edges else None,
          "loss_circuit": _rounded(c.loss_after) if met else None,  # calibrated, as scored
          "jaccard_next": (jaccard(c.nodes, nxt.nodes)
                           if met and nxt is not None and is_met(nxt) else None),
          "jaccard_final": (jaccard(c.nodes, fin.nodes)
                            if met and fin is not None and is_met(fin) else None)})
    first = next((r["step"] for r in rows if r["met"]), None)
    target = next(c.target for _, cs in by_step if task in cs for c in [cs[task]])
    out[task] = {"target": target, "first_step_met": first, "final_step": final_step,
                 "checkpoints": rows}
  return out


def plot_dynamics(series: Mapping[str, Mapping[str, Any]], path: str, *, title: str) -> None:
  """One row per task: full-model loss; circuit nodes and edges; Jaccard overlaps (log x)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  n = len(series)
  fig, axes = plt.subplots(n, 3, figsize=(13, 3.2 * n), squeeze=False)
  for row, (task, s) in enumerate(series.items()):
    pts = s["checkpoints"]
    steps = [p["step"] for p in pts]
    met = [p for p in pts if p["met"]]
    ax = axes[row, 0]
    ax.plot(steps, [p["loss_full"] for p in pts], "o-", label="full model")
    ax.plot([p["step"] for p in met], [p["loss_circuit"] for p in met], "s--",
            label="circuit only, calibrated (others mean-ablated)")
    ax.axhline(s["target"], color="grey", ls=":", label=f"target {s['target']}")
    ax.set_ylabel("held-out task loss (nats)")
    ax.set_title(f"{task}: task loss", fontsize=10)
    ax = axes[row, 1]
    ax.plot([p["step"] for p in met], [p["n_nodes"] for p in met], "o-", label="nodes")
    ax.plot([p["step"] for p in met], [p["edges"] for p in met], "s-", label="edges")
    if met:
      ax.set_yscale("log")
    ax.set_title(f"{task}: circuit size (points only where the target is met)", fontsize=10)
    ax = axes[row, 2]
    nxt = [p for p in met if p["jaccard_next"] is not None]
    fin = [p for p in met if p["jaccard_final"] is not None]
    ax.plot([p["step"] for p in nxt], [p["jaccard_next"] for p in nxt], "o-",
            label="with next checkpoint")
    ax.plot([p["step"] for p in fin], [p["jaccard_final"] for p in fin], "s-",
            label="with final checkpoint")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{task}: node overlap (Jaccard)", fontsize=10)
    for ax in axes[row]:
      ax.set_xscale("log")
      ax.set_xlim(min(steps) / 1.5, max(steps) * 1.5)
      if s["first_step_met"] is not None:
        ax.axvline(s["first_step_met"], color="green", alpha=0.4, lw=3)
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=7)
    axes[row, 1].set_xlabel("training step (log); green: first step whose circuit meets the target")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# --- across seeds ---


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _capture(params, tokens_BxL: jax.Array, *, cfg: ModelConfig, sites: tuple[str, ...]):
  _, acts = model_lib.forward(params, tokens_BxL, cfg, capture=sites)
  return acts


def node_activations(params, cfg: ModelConfig, arrays: TaskArrays,
                     nodes: Mapping[str, Sequence[int]], max_seqs: int = 256
                     ) -> tuple[list[tuple[str, int]], np.ndarray]:
  """Unablated activations of a circuit's nodes on one task's pairs.

  Returns ([(site, channel)] in a fixed order, acts_SxN) over every real token position
  (position <= the sequence's last real token) of both sides of every pair.
  """
  keys = sorted(node_set(nodes), key=lambda k: (list(model_lib.node_sites(cfg)).index(k[0]), k[1]))
  P, _, L = arrays.tokens_Px2xL.shape
  tokens_BxL = np.asarray(arrays.tokens_Px2xL).reshape(P * 2, L)
  real_BxL = np.arange(L)[None, :] <= np.asarray(arrays.last_Px2).reshape(-1)[:, None]
  sites = tuple(sorted({s for s, _ in keys}))
  chunks = []
  for i in range(0, len(tokens_BxL), max_seqs):
    acts = jax.device_get(_capture(params, jnp.asarray(tokens_BxL[i:i + max_seqs]), cfg=cfg,
                                   sites=sites))
    cols = [np.asarray(acts[s], np.float64)[..., ch] for s, ch in keys]  # each BxL
    real = real_BxL[i:i + max_seqs]
    chunks.append(np.stack(cols, -1)[real] if cols else np.zeros((int(real.sum()), 0)))
  return keys, np.concatenate(chunks, 0)


def activation_similarity(acts_a_SxN: np.ndarray, acts_b_SxM: np.ndarray) -> dict[str, Any]:
  """Best |Pearson r| per node of A among B's nodes, and of B among A's, on the same inputs.

  |r| because a channel's sign is arbitrary across seeds (a residual direction or a
  neuron that encodes the negation is the same computation). Nodes constant on these
  inputs have no correlation; they are counted and left out of the means.

  Returns {"a_to_b": mean best |r| of A's nodes, "b_to_a": the same of B's, "mean": the
  average of the two, "best_a": per-node values (None for constant nodes), "best_b",
  "constant_a", "constant_b"}.
  """
  if acts_a_SxN.shape[0] != acts_b_SxM.shape[0]:
    raise ValueError(f"activation_similarity: {acts_a_SxN.shape[0]} vs {acts_b_SxM.shape[0]} "
                     "samples; the runs must see the same task inputs")

  def standardise(x):
    x = x - x.mean(0)
    sd = np.sqrt((x**2).mean(0))
    const = sd <= 1e-12 * (1.0 + np.abs(x).max(0, initial=0.0))
    return np.where(const, 0.0, x / np.where(const, 1.0, sd)), const

  za, const_a = standardise(acts_a_SxN)
  zb, const_b = standardise(acts_b_SxM)
  r_NxM = np.clip(np.abs(za.T @ zb) / max(za.shape[0], 1), 0.0, 1.0)
  r_NxM[const_a] = np.nan
  r_NxM[:, const_b] = np.nan

  def best(r, const):
    ok = ~np.all(np.isnan(r), axis=1) if r.shape[1] else np.zeros(r.shape[0], bool)
    vals = np.full(r.shape[0], np.nan)
    vals[ok] = np.nanmax(r[ok], axis=1)
    return vals, int(const.sum())

  best_a, n_const_a = best(r_NxM, const_a)
  best_b, n_const_b = best(r_NxM.T, const_b)
  mean = lambda v: None if np.all(np.isnan(v)) else float(np.nanmean(v))
  a_to_b, b_to_a = mean(best_a), mean(best_b)
  both = [v for v in (a_to_b, b_to_a) if v is not None]
  as_list = lambda v: [None if np.isnan(x) else round(float(x), 6) for x in v]
  return {"a_to_b": a_to_b, "b_to_a": b_to_a, "mean": float(np.mean(both)) if both else None,
          "best_a": as_list(best_a), "best_b": as_list(best_b),
          "constant_a": n_const_a, "constant_b": n_const_b}


def size_spread(circuits: Sequence[Circuit]) -> dict[str, Any]:
  """Nodes and edges of the runs whose circuit meets the target: values, mean, std, min, max."""
  met = [c for c in circuits if is_met(c)]

  def stats(values):
    if not values:
      return {"values": [], "mean": None, "std": None, "min": None, "max": None}
    v = np.asarray(values, float)
    return {"values": [int(x) for x in values], "mean": float(v.mean()), "std": float(v.std()),
            "min": int(v.min()), "max": int(v.max())}

  return {"n_runs": len(circuits), "n_met": len(met),
          "nodes": stats([c.n_nodes for c in met]),
          "edges": stats([c.edges.get("total", 0) for c in met])}
