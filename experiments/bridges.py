"""CLI: train a weight-sparse model bridged to a trained dense run, then steer the dense one.

  python -m experiments.bridges --dense RUN --workdir OUT [--preset P] [--dense-step N]
                                [--set section.field=value | bridge.field=value ...]
  python -m experiments.bridges steer --workdir OUT --task single_double_quote
                                [--channel LAYER.SITE.CHANNELS] [--pairs 64] [--strengths 11]

Training: the sparse model's config is the dense run's with sparsity on (or --preset P),
plus the --set overrides; `bridge.*` overrides set `bridges.BridgeConfig`. It must train on
the dense run's data and vocabulary. OUT is an ordinary run directory (config.json,
checkpoints, metrics.jsonl; the per-sublayer terms are logged as train/bridge/SITE/...) plus
bridge.json (the dense run, its step and the BridgeConfig). Rerunning resumes. At the end
every loss term is evaluated on validation batches into OUT/bridges_eval.json and printed as a
table. `python -m experiments.prune --workdir OUT` finds circuits in the bridged sparse model.

Steering (Fig 9): adds strength x (the channel's counterfactual-minus-presented residual,
mapped through the channel's decoder row and the dense/sparse residual RMS ratio) to the
dense model's residual and plots its probability of each candidate token against strength,
into OUT/steer_TASK_CHANNEL.{json,png}. The default channel is the residual-read channel of
OUT/circuits/TASK.json whose removal from the circuit raises the task loss most; a set of
channels at one read (1.attn.37+52, 0.mlp.circuit: those the circuit reads there, 0.mlp.all)
steers with the sum of their edits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments import presets
from experiments import prune as prune_lib
from sparse_jax import bridges
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import circuits as circuits_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import masks
from sparse_jax import model as model_lib
from sparse_jax import tasks as tasks_lib
from sparse_jax import train as train_lib
from sparse_jax.config import Config, apply_overrides

BRIDGE_FILE = "bridge.json"
EVAL_FILE = "bridges_eval.json"


def _meta(workdir: Path) -> dict | None:
  path = workdir / BRIDGE_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _check_or_write_meta(workdir: Path, meta: dict) -> None:
  saved = _meta(workdir)
  if saved is None:
    workdir.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(workdir / BRIDGE_FILE, json.dumps(meta, indent=2, sort_keys=True))
  elif saved != meta:
    diffs = [f"{k}: {saved.get(k)!r} -> {meta[k]!r}" for k in meta if saved.get(k) != meta[k]]
    raise ValueError(f"{workdir} holds a bridge run with different settings (saved -> "
                     "requested):\n  " + "\n  ".join(diffs))


def _load(workdir: Path, meta: dict):
  """(cfg, dense cfg, dense params, bcfg, objective) of a bridge run."""
  dense_cfg, dense_params, _ = ckpt_lib.load_params(meta["dense_run"], meta["dense_step"])
  bcfg = bridges.BridgeConfig.from_dict(meta["bridge"])
  cfg = ckpt_lib.load_config(workdir)
  return cfg, dense_cfg, dense_params, bcfg, bridges.objective(cfg, dense_cfg.model,
                                                               dense_params, bcfg)


def _restore(workdir: Path, cfg: Config, objective: train_lib.Objective):
  """The latest good train state (sparse model + bridges) of a bridge run."""
  mesh = train_lib.make_mesh()
  opt = train_lib.make_optimizer(cfg, objective)
  manager = ckpt_lib.make_manager(workdir, cfg)
  state = ckpt_lib.restore_latest(manager, train_lib.abstract_state(cfg, opt, mesh, objective))
  manager.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}: no readable checkpoint; train the bridges first")
  return state


def sparse_config(dense_cfg: Config, preset: str | None, overrides: list[str]) -> Config:
  base = presets.get_config(preset) if preset else dataclasses.replace(
      dense_cfg, sparsity=dataclasses.replace(dense_cfg.sparsity, enabled=True))
  cfg = apply_overrides(base, [o for o in overrides if not o.startswith("bridge.")])
  if cfg.data != dense_cfg.data:
    raise ValueError("data: the sparse model must train on the dense run's data (its tokenizer "
                     f"and token stream); the dense run has {dense_cfg.data}")
  bridges.check_pair(dense_cfg.model, cfg.model)
  return cfg


def train_bridges(dense: str | Path, workdir: str | Path, *, preset: str | None = None,
                  overrides: list[str] = (), dense_step: int | None = None,
                  progress: bool = True) -> dict:
  """Trains (or resumes) a bridge run; returns the validation metrics written to EVAL_FILE."""
  workdir = Path(workdir)
  saved = _meta(workdir)
  if dense_step is None and saved is not None:
    dense_step = saved["dense_step"]  # resume against the dense checkpoint trained with
  dense_cfg, dense_params, dense_step = ckpt_lib.load_params(dense, dense_step)
  cfg = sparse_config(dense_cfg, preset, list(overrides))
  bcfg = bridges.apply_overrides(bridges.BridgeConfig(),
                                 [o for o in overrides if o.startswith("bridge.")])
  _check_or_write_meta(workdir, {"dense_run": str(Path(dense).absolute()),
                                 "dense_step": dense_step, "bridge": dataclasses.asdict(bcfg)})
  # Both models must read the same token ids: the sparse one uses the dense run's tokenizer
  # (the corpus's BPE may since have changed with the corpus).
  tokenizer = data_lib.load_tokenizer(dense)
  val_NxBxL1 = _val_batches(cfg, tokenizer)
  # The bridges' rho constants come from the first validation batch (data the run never trains on).
  objective = bridges.objective(cfg, dense_cfg.model, dense_params, bcfg,
                                jnp.asarray(val_NxBxL1[0, :, :-1]))
  state = train_lib.train(cfg, workdir, progress=progress, objective=objective,
                          tokenizer=tokenizer)
  return evaluate_run(workdir, cfg, dense_cfg, dense_params, bcfg, state, val_NxBxL1)


def _val_batches(cfg: Config, tokenizer) -> np.ndarray:
  dataset = data_lib.prepare_data(cfg, progress=False, tokenizer=tokenizer)
  return dataset.val_batches(cfg.train.eval_batches, cfg.train.batch_size, cfg.train.seq_len)


def evaluate_run(workdir: Path, cfg: Config, dense_cfg: Config, dense_params, bcfg, state,
                 val_NxBxL1: np.ndarray) -> dict:
  metrics = bridges.evaluate(state.params, dense_params, val_NxBxL1, cfg.model,
                             dense_cfg.model, bcfg)
  out = {"step": int(state.step), "metrics": metrics}
  fileio.atomic_write_text(workdir / EVAL_FILE, json.dumps(out, indent=2))
  return out


def format_table(metrics: dict, n_layer: int) -> str:
  """Markdown: one row per bridged sublayer, with the whole-model losses above."""
  lines = [f"CE sparse {metrics['ce_sparse']:.3f}, CE dense {metrics['ce_dense']:.3f}, "
           f"KL(dense || sparse) {metrics['kl_full']:.3f}, total loss {metrics['loss']:.3f}",
           "", "| sublayer | NMSE enc (d->s) | NMSE dec (s->d) | KL d->s | KL s->d | "
           "CE dense-then-sparse | CE sparse-then-dense |", "|---|---|---|---|---|---|---|"]
  for j in range(2 * n_layer):
    m = {k.split("/")[-1]: v for k, v in metrics.items()
         if k.startswith(f"bridge/{bridges.site_name(j)}/")}
    lines.append(f"| {bridges.site_name(j)} | {m['nmse_enc']:.3f} | {m['nmse_dec']:.3f} | "
                 f"{m['kl_ds']:.3f} | {m['kl_sd']:.3f} | {m['ce_ds']:.3f} | {m['ce_sd']:.3f} |")
  return "\n".join(lines)


# --- steering ---


def _circuit_path(workdir: Path, task: str) -> Path:
  """Where experiments.prune writes the task's circuit in a run."""
  return workdir / "circuits" / f"{circuits_lib.file_stem(task)}.json"


def circuit_channel(workdir: Path, task: str, params, step: int, cfg: Config, arrays,
                    tokenizer) -> tuple[str, dict]:
  """The residual-read channel of the task's circuit whose removal hurts the task most.

  Each candidate is scored by the task loss (on `arrays`) of the circuit without it, the rest
  of the model mean-ablated as in the search (the same means cache as experiments.prune).
  """
  path = _circuit_path(workdir, task)
  prune = f"`python -m experiments.prune --workdir {workdir} --tasks {task}`"
  hint = f"run {prune} first, or pass --channel LAYER.SITE.CHANNEL"
  if not path.exists():
    raise ValueError(f"steer needs a circuit for {task} (none at {path}): {hint}")
  circuit = circuits_lib.Circuit.from_json(path.read_text())
  if not circuit.solvable or not circuit.nodes:
    why = circuit.reason or "the empty circuit already meets the target"
    raise ValueError(f"steer needs a circuit for {task}, and {path} has none ({why}): pass "
                     f"--channel LAYER.SITE.CHANNEL, or rerun {prune} with another --target-loss")
  summary = path.parent / "summary.json"
  found_at = json.loads(summary.read_text()).get("step") if summary.exists() else None
  if found_at is not None and found_at != step:
    raise ValueError(f"{path} was found at step {found_at} but the run's latest checkpoint is "
                     f"step {step}: {hint}")
  candidates = [(site, c) for site, ids in circuit.nodes.items() if site.endswith(".act_in")
                for c in ids]
  if not candidates:
    raise ValueError(f"{path}: the circuit reads no residual channel; {hint}")
  slices = masks.site_slices(cfg.model)
  keep_N = np.zeros(masks.n_nodes(cfg.model), np.float32)
  for site, ids in circuit.nodes.items():
    keep_N[slices[site].start + np.asarray(ids, int)] = 1.0
  m_CxN = np.repeat(keep_N[None], len(candidates), axis=0)
  for i, (site, c) in enumerate(candidates):
    m_CxN[i, slices[site].start + c] = 0.0
  ccfg = dataclasses.replace(cfg.circuit, mean_batches=circuit.settings.get(
      "mean_batches", cfg.circuit.mean_batches))
  means = prune_lib.circuit_means(workdir, step, params, cfg, ccfg, tokenizer)
  loss_C = np.asarray(jax.jit(jax.vmap(lambda m: tasks_lib.task_metrics(
      params, cfg.model, arrays, ablation=masks.node_ablation(m, means, cfg.model))[0]))(
          jnp.asarray(m_CxN)))
  site, c = candidates[int(np.argmax(loss_C))]
  layer, kind = site.split(".")[:2]
  scores = {f"{s}.{ch}": float(l) for (s, ch), l in zip(candidates, loss_C)}
  return f"{layer}.{kind}.{c}", {"circuit": str(path), "loss_without_channel": scores}


def steer(workdir: str | Path, task: str, channel: str | None = None, *, n_pairs: int = 64,
          n_strengths: int = 11) -> dict:
  """Steers the dense model with sparse channel(s) at one read; writes and returns the curve."""
  workdir = Path(workdir)
  meta = _meta(workdir)
  if meta is None:
    raise FileNotFoundError(f"{workdir}: no {BRIDGE_FILE}; is this a bridge run directory?")
  cfg, dense_cfg, dense_params, _, objective = _load(workdir, meta)
  state = _restore(workdir, cfg, objective)
  params = state.params
  tokenizer = data_lib.load_tokenizer(workdir)
  taskset = tasks_lib.build_taskset(tokenizer, [task], n_train=1, n_heldout=n_pairs,
                                    seed=cfg.circuit.seed,
                                    max_len=min(128, cfg.model.block_size))
  arrays = jax.tree.map(lambda x: x[0], taskset.heldout)
  choice = {"how": "given"}
  if channel is None:
    channel, choice = circuit_channel(workdir, task, params, int(state.step), cfg, arrays,
                                      tokenizer)
    choice["how"] = "the circuit's residual-read channel whose removal raises the loss most"
  circuit_path = _circuit_path(workdir, task)
  nodes = (circuits_lib.Circuit.from_json(circuit_path.read_text()).nodes
           if circuit_path.exists() else None)
  j, channels = bridges.parse_channel(channel, cfg.model, nodes)
  # Delta is taken token by token, so both sides of a pair must line up (same length).
  last_Px2 = np.asarray(arrays.last_Px2)
  aligned_P = last_Px2[:, 0] == last_Px2[:, 1]
  if not aligned_P.any():
    raise ValueError(f"{task}: no pair has presented and counterfactual of equal length")
  tokens_Px2xL = jnp.asarray(np.asarray(arrays.tokens_Px2xL)[aligned_P])
  pos_P = jnp.asarray(last_Px2[aligned_P, 0])
  tok_P, alt_P = (jnp.asarray(np.asarray(a)[aligned_P]) for a in (arrays.tok_P, arrays.alt_P))
  # The scale is the bridge's own (its rho constants); today's RMS is reported beside it.
  ref = jnp.asarray(_val_batches(cfg, tokenizer)[:, :, :-1])
  rms_d = float(np.mean([bridges.mean_rms_S(dense_params, b, dense_cfg.model)[j] for b in ref]))
  rms_s = float(np.mean([bridges.mean_rms_S(params, b, cfg.model)[j] for b in ref]))
  add_PxLxD = bridges.steering_direction(params, cfg.model, tokens_Px2xL[:, 0],
                                         tokens_Px2xL[:, 1], j, channels)
  # Op by op, not jitted: strength 0 then gives the plain dense model's logits bit for bit.
  steered = lambda s: jax.nn.softmax(bridges.steered_logits(  # noqa: E731
      dense_params, dense_cfg.model, tokens_Px2xL[:, 0], j, add_PxLxD, s, pos_P), axis=-1)
  rows_P = jnp.arange(pos_P.shape[0])
  curve = []
  for s in np.linspace(0.0, 1.0, n_strengths):
    p_PxV = steered(jnp.float32(s))
    curve.append({"strength": float(s), "p_tok": float(jnp.mean(p_PxV[rows_P, tok_P])),
                  "p_alt": float(jnp.mean(p_PxV[rows_P, alt_P]))})
  cf_PxV = jax.nn.softmax(model_lib.forward(dense_params, tokens_Px2xL[:, 1], dense_cfg.model,
                                            positions_B=pos_P), axis=-1)
  out = {"task": task, "channel": channel, "sublayer": bridges.site_name(j),
         "channels": list(channels), "choice": choice,
         "pairs": int(aligned_P.sum()), "pairs_dropped_unaligned": int((~aligned_P).sum()),
         "rho_dense": float(params["bridges"]["rms"]["dense"][j]),
         "rho_sparse": float(params["bridges"]["rms"]["sparse"][j]),
         "rms_dense_now": rms_d, "rms_sparse_now": rms_s,
         "tok": tokenizer.decode([int(tok_P[0])]), "alt": tokenizer.decode([int(alt_P[0])]),
         "dense_on_counterfactual": {"p_tok": float(jnp.mean(cf_PxV[rows_P, tok_P])),
                                     "p_alt": float(jnp.mean(cf_PxV[rows_P, alt_P]))},
         "curve": curve}
  base = f"steer_{circuits_lib.file_stem(task)}_{channel}"  # the channel has dots: no suffix
  fileio.atomic_write_text(workdir / f"{base}.json", json.dumps(out, indent=2))
  _plot(out, workdir / f"{base}.png")
  return out


def _plot(out: dict, path: Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  s = [r["strength"] for r in out["curve"]]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, color in (("alt", "C0"), ("tok", "C1")):
    ax.plot(s, [r[f"p_{key}"] for r in out["curve"]], "o-", color=color,
            label=f"P({out[key]!r}), steered")
    ax.axhline(out["dense_on_counterfactual"][f"p_{key}"], color=color, ls=":", lw=1,
               label=f"P({out[key]!r}) on the counterfactual prompt")
  ax.set_xlabel("steering strength")
  ax.set_ylabel("dense model probability (mean over pairs)")
  n = len(out["channels"])
  what = f"sparse channel {out['channel']}" if n == 1 else \
      f"sparse channels {out['channel']} ({n} channels)"
  ax.set_title(f"{out['task']}: {what}", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
  plt.close(fig)


@cli.command
def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="bridge run directory")
  if argv[:1] == ["steer"]:
    parser.add_argument("--task", default="single_double_quote")
    parser.add_argument("--channel", default=None,
                        help="LAYER.SITE.CHANNELS: 1.attn.37, 1.attn.37+52, 0.mlp.all or "
                             "0.mlp.circuit (the channels the task's circuit reads there)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--strengths", type=int, default=11)
    args = parser.parse_args(argv[1:])
    out = steer(args.workdir, args.task, args.channel, n_pairs=args.pairs,
                n_strengths=args.strengths)
    print(json.dumps({k: out[k] for k in ("channel", "pairs", "tok", "alt")}))
    for r in out["curve"]:
      print(f"strength {r['strength']:.2f}  P(tok) {r['p_tok']:.4f}  P(alt) {r['p_alt']:.4f}")
    return 0
  parser.add_argument("--dense", required=True, help="the trained dense run directory")
  parser.add_argument("--preset", default=None, choices=presets.PRESETS,
                      help="sparse model config (default: the dense run's, sparsity on)")
  parser.add_argument("--dense-step", type=int, default=None)
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.FIELD=VALUE")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  out = train_bridges(args.dense, args.workdir, preset=args.preset, overrides=args.overrides,
                      dense_step=args.dense_step, progress=not args.no_progress)
  print(format_table(out["metrics"], ckpt_lib.load_config(args.workdir).model.n_layer))
  return 0


if __name__ == "__main__":
  cli.run(main)
