"""Speed figures as JSON, each a ratio against a baseline measured in the same run.

  python -m experiments.bench [--preset cpu] [--only optimizer,train_step,circuits]

- optimizer: one full optimiser update (grad RMS norm, Adam, decay, LR) with and without the
  exact-L0 projection on the same model and gradients (goal: projection does not dominate).
- train_step: the whole jitted train step (forward, backward, update) of the sparse model vs
  the same model trained dense (goal: sparse/dense <= 1.10), with tokens/s for both.
- circuits: mask training for 20 tasks as one vmapped program vs a Python loop over tasks
  (goal: >= 5x).
Timings alternate between the two variants and report medians, since the machine is shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import cli
from experiments import presets
from sparse_jax import model as model_lib
from sparse_jax import sparsity
from sparse_jax import train as train_lib
from sparse_jax.config import Config, apply_overrides


SECTIONS = ("optimizer", "train_step", "circuits")


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int):
  """Median seconds of fn_a and fn_b, interleaved; each fn must block until done."""
  fn_a(), fn_b()  # compile / warm up
  times_a, times_b = [], []
  for _ in range(repeats):
    for fn, times in ((fn_a, times_a), (fn_b, times_b)):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  return statistics.median(times_a), statistics.median(times_b)


def bench_optimizer(cfg: Config, repeats: int) -> dict:
  params = model_lib.init_params(cfg.model, jax.random.PRNGKey(0))
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  dense_cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, enabled=False))
  # The same chain, with the projection appended or not; sharkfin off in both so that the
  # only difference is the projection.
  no_fin = dataclasses.replace(cfg.optim, sharkfin=False)
  sparse_opt = sparsity.make_optimizer(dataclasses.replace(cfg, optim=no_fin), params,
                                       cfg.train.steps)
  plain_opt = sparsity.make_optimizer(dataclasses.replace(dense_cfg, optim=no_fin), params,
                                      cfg.train.steps)

  def runner(opt):
    # A mid-anneal step count, so k lies strictly between dense and final.
    state = optax.tree_utils.tree_set(opt.init(params), count=jnp.int32(cfg.train.steps // 4))
    update = jax.jit(lambda g, s, p: opt.update(g, s, p))
    return lambda: jax.block_until_ready(update(grads, state, params))

  t_proj, t_plain = time_pair(runner(sparse_opt), runner(plain_opt), repeats)
  n = model_lib.count_params(params)
  return {"params": n, "update_with_projection_ms": 1e3 * t_proj,
          "update_without_projection_ms": 1e3 * t_plain,
          "ratio_with_over_without": t_proj / t_plain}


def bench_train_step(cfg: Config, repeats: int) -> dict:
  mesh = train_lib.make_mesh()
  tc = cfg.train
  rng = np.random.default_rng(0)
  batch = train_lib.shard_batch(
      rng.integers(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len + 1), dtype=np.int32),
      mesh)
  dense_cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, enabled=False))

  def runner(c: Config):
    opt = train_lib.make_optimizer(c)
    step = train_lib.make_train_step(c, opt, mesh)
    holder = [train_lib.init_state(c, opt, mesh)]

    def run():
      holder[0], metrics = step(holder[0], batch)
      jax.block_until_ready(metrics["loss"])

    return run

  t_sparse, t_dense = time_pair(runner(cfg), runner(dense_cfg), repeats)
  tokens = tc.batch_size * tc.seq_len
  return {"tokens_per_step": tokens, "sparse_step_ms": 1e3 * t_sparse,
          "dense_step_ms": 1e3 * t_dense, "sparse_tokens_per_s": tokens / t_sparse,
          "dense_tokens_per_s": tokens / t_dense, "ratio_sparse_over_dense": t_sparse / t_dense}


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="cpu", choices=presets.PRESETS)
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  parser.add_argument("--only", default="optimizer,train_step,circuits")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  cfg = apply_overrides(presets.get_config(args.preset), args.overrides)
  sections = [s for s in args.only.split(",") if s]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown or not sections:
    raise ValueError(f"--only {args.only!r}: unknown or no sections {unknown}; choose from "
                     + ",".join(SECTIONS))
  if args.repeats <= 0:
    raise ValueError(f"--repeats: must be a positive integer, got {args.repeats}")
  out = {"preset": args.preset, "overrides": args.overrides, "devices": jax.device_count(),
         "backend": jax.default_backend(),
         "model": dataclasses.asdict(cfg.model), "sparsity": dataclasses.asdict(cfg.sparsity)}
  if "optimizer" in sections:
    out["optimizer"] = bench_optimizer(cfg, args.repeats)
  if "train_step" in sections:
    out["train_step"] = bench_train_step(cfg, args.repeats)
  if "circuits" in sections:
    from experiments import bench_circuits  # pylint: disable=import-outside-toplevel
    out["circuits"] = bench_circuits.bench_circuit_search(n_tasks=20, steps=10)
  json.dump(out, sys.stdout, indent=2)
  print()
  return 0


if __name__ == "__main__":
  cli.run(main)
