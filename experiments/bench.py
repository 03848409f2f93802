"""Speed figures as JSON, each a ratio against a baseline measured in the same run.

  python -m experiments.bench [--preset cpu] [--only optimizer,train_step,circuits]
  python -m experiments.bench --only peer_config   # issue 12's config, not in the default

- optimizer: one full optimiser update (grad RMS norm, Adam, decay, LR) with and without the
  exact-L0 projection on the same model and gradients (goal: projection does not dominate).
- train_step: the whole jitted train step (forward, backward, update) of the sparse model vs
  the same model trained dense (goal: sparse/dense <= 1.10), with tokens/s for both.
- circuits: mask training for 20 tasks as one vmapped program vs a Python loop over tasks
  (goal: >= 5x).
- peer_config: issue 12's model (4 layers, d_model 128, 8 heads of 16, d_mlp 512, vocab 2048,
  context 128, batch 32, bigram on, density 1/16; `--preset`/`--set` are ignored), sparse
  with and without AbsTopK 1/4 at all eight sites and dense: tokens/s, achieved GFLOP/s and
  the fraction of a matmul bound measured in the same run (plain matmuls of the step's
  shapes), plus the AbsTopK/no-AbsTopK and sparse/dense step ratios. Each with the weight
  matmuls in bf16 (the cpu preset's; unsuffixed keys) and in f32 (keys ending `_f32`); the
  fractions are of the f32 bound (issue 12's) and of the bf16 one.
- topk (`--only topk`): the exact top-k bisections with the stop once every row counts
  exactly k against all 31 passes (the same masks, checked): AbsTopK on random activations of
  the config's two widths ([batch x seq, d_model] and [batch x seq, d_mlp]), and the L0
  projection's masks of every sparsified weight at a mid-anneal k.
- length_groups (`--only length_groups`): circuit search with task pairs grouped by length
  against every pair padded to the longest (a random model, synthetic ragged pairs;
  `--preset`/`--set` are ignored): evaluation in 8 groups vs 1 (exact), mask training with 4
  length strata vs uniform draws.
- host_memory (`--only host_memory`): the config's train step with host malloc keeping freed
  blocks for reuse (`sparse_jax.hostmem`, what every CLI does) against the glibc default, in
  alternating child processes (the setting is process-wide): median step and minor page
  faults per step of each, and their ratio.
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
from sparse_jax import matmul as matmul_lib
from sparse_jax import model as model_lib
from sparse_jax import sparsity
from sparse_jax import train as train_lib
from sparse_jax.config import Config, apply_overrides


SECTIONS = ("optimizer", "train_step", "circuits", "peer_config", "topk", "length_groups",
            "host_memory")


def time_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int):
  """Median seconds of fn_a and fn_b, interleaved; each fn must block until done."""
  return tuple(time_interleaved([fn_a, fn_b], repeats))


def time_interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
  """Median seconds of each fn, run in turn `repeats` times; each fn must block until done."""
  for fn in fns:
    fn()  # compile / warm up
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


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


def _step_runner(c: Config, batch: jax.Array, mesh) -> Callable[[], None]:
  """One jitted train step of config c, its state carried from call to call."""
  opt = train_lib.make_optimizer(c)
  step = train_lib.make_train_step(c, opt, mesh)
  holder = [train_lib.init_state(c, opt, mesh)]

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics["loss"])

  return run


def _random_batch(cfg: Config, mesh) -> jax.Array:
  tc = cfg.train
  rng = np.random.default_rng(0)
  return train_lib.shard_batch(
      rng.integers(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len + 1), dtype=np.int32),
      mesh)


def _dense(cfg: Config) -> Config:
  return dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, enabled=False))


def bench_train_step(cfg: Config, repeats: int) -> dict:
  mesh = train_lib.make_mesh()
  tc = cfg.train
  batch = _random_batch(cfg, mesh)
  t_sparse, t_dense = time_pair(_step_runner(cfg, batch, mesh),
                                _step_runner(_dense(cfg), batch, mesh), repeats)
  tokens = tc.batch_size * tc.seq_len
  return {"tokens_per_step": tokens, "sparse_step_ms": 1e3 * t_sparse,
          "dense_step_ms": 1e3 * t_dense, "sparse_tokens_per_s": tokens / t_sparse,
          "dense_tokens_per_s": tokens / t_dense, "ratio_sparse_over_dense": t_sparse / t_dense}


def _stop_vs_all_31(fn: Callable[[bool], Callable[[], object]], repeats: int) -> dict:
  """Times fn(stop_at_k=True)() against fn(False)() after checking they return the same."""
  stop, all_31 = fn(True), fn(False)
  if not all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(stop()),
                                                    jax.tree.leaves(all_31()))):
    raise AssertionError("the bisection's stop at k changed a top-k mask")
  t_stop, t_all = time_pair(stop, all_31, repeats)
  return {"stop_ms": 1e3 * t_stop, "all_31_ms": 1e3 * t_all,
          "ratio_all_31_over_stop": t_all / t_stop}


def bench_topk(cfg: Config, repeats: int) -> dict:
  """AbsTopK's and the projection's bisection: stopping at exactly k vs all 31 passes."""
  mc, tc, sc = cfg.model, cfg.train, cfg.sparsity
  rows = tc.batch_size * tc.seq_len
  afrac = mc.afrac if mc.afrac is not None else 0.25
  out = {}
  for name, width in (("abs_topk_d_model", mc.d_model), ("abs_topk_d_mlp", mc.d_mlp)):
    x_RxC = jax.random.normal(jax.random.PRNGKey(0), (rows, width))
    k = max(1, int(afrac * width))

    def site(stop_at_k, x_RxC=x_RxC, k=k):
      f = jax.jit(lambda x: model_lib.abs_topk(x, k, stop_at_k))
      return lambda: jax.block_until_ready(f(x_RxC))

    out[name] = {"shape": [rows, width], "k": k, **_stop_vs_all_31(site, repeats)}
  params = model_lib.init_params(mc, jax.random.PRNGKey(0))
  specs = sparsity.leaf_specs(params, sc)
  count = jnp.int32(tc.steps // 4)  # mid-anneal, as in the optimizer section
  by_path = {sparsity.path_str(p): w for p, w in jax.tree_util.tree_flatten_with_path(params)[0]}
  sparse = [spec for spec in specs.values() if spec.sparsified]
  ws = [by_path[spec.path] for spec in sparse]

  def projection(stop_at_k):
    f = jax.jit(lambda ws: [
        sparsity.topk_keep_mask(w, sparsity.scheduled_k(spec, count, tc.steps, sc),
                                spec.neuron_axis, sc.min_per_neuron, stop_at_k)
        for spec, w in zip(sparse, ws)])
    return lambda: jax.block_until_ready(f(ws))

  out["projection_masks"] = {"leaves": len(sparse), **_stop_vs_all_31(projection, repeats)}
  return out


# Issue 12's side-by-side config against the authors' PyTorch trainer, on top of `cpu`.
PEER_OVERRIDES = ("model.n_layer=4", "model.d_model=128", "model.n_head=8", "model.d_head=16",
                  "model.d_mlp=512", "model.vocab_size=2048", "model.block_size=128",
                  "model.enable_bigram_table=true", "model.afrac=none",
                  "model.learned_pos_emb=false", "model.rope=false", "model.smear_keys=false",
                  "sparsity.weight_density=0.0625", "train.batch_size=32", "train.seq_len=128")


def step_matmul_flops(cfg: Config) -> tuple[int, int]:
  """(weight-matmul FLOPs, attention-matmul FLOPs) of one train step: forward + backward.

  Weight matmuls: 2 FLOPs per multiply-add, 3 matmuls per weight (forward, input grad,
  weight grad) = 6 x params x tokens, over c_attn, c_proj, c_fc, c_proj and lm_head.
  Attention: q k^T and p v, each 2 x B x H x L^2 x K, times 3 for the backward.
  """
  m, tc = cfg.model, cfg.train
  tokens = tc.batch_size * tc.seq_len
  weights = m.n_layer * (m.d_model * 3 * m.d_attn + m.d_attn * m.d_model
                         + 2 * m.d_model * m.d_mlp) + m.d_model * m.vocab_size
  attention = m.n_layer * 3 * 2 * (2 * tc.batch_size * m.n_head * tc.seq_len**2 * m.d_head)
  return 6 * weights * tokens, attention


def _matmul_bound_runner(cfg: Config, dtype: str = "float32") -> Callable[[], None]:
  """Plain matmuls of one step's shapes (forward, input grad, weight grad of every weight;
  both attention products and their grads), nothing else. With dtype "bfloat16" the weight
  matmuls take bf16 operands and sum in f32, as `model.matmul_dtype` does; attention's
  products are f32 either way, as in the model."""
  m, tc = cfg.model, cfg.train
  N, B, L, H, K = tc.batch_size * tc.seq_len, tc.batch_size, tc.seq_len, m.n_head, m.d_head
  shapes = [(m.d_model, 3 * m.d_attn), (m.d_attn, m.d_model), (m.d_model, m.d_mlp),
            (m.d_mlp, m.d_model)] * m.n_layer + [(m.d_model, m.vocab_size)]
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 3 * len(shapes) + 6 * m.n_layer))
  operands = [(jax.random.normal(next(keys), (N, i)), jax.random.normal(next(keys), (i, o)),
               jax.random.normal(next(keys), (N, o))) for i, o in shapes]
  # Two (q, k, p) sets per layer: each attention product runs 3 times (forward and two
  # grads) per layer on distinct operands, so that XLA cannot merge them.
  attention = [tuple(jax.random.normal(next(keys), shape)
                     for shape in ((B, H, L, K), (B, H, L, K), (B, H, L, L)))
               for _ in range(2 * m.n_layer)]

  @jax.jit
  def matmuls(operands, attention):
    out = []
    for x_NxI, w_IxO, g_NxO in operands:
      # The model's own matmul and its VJP: in bf16, the forms that reach the bf16 kernel.
      y_NxO, vjp = jax.vjp(lambda x, w: matmul_lib.matmul(x, w, dtype), x_NxI, w_IxO)
      out += [y_NxO, *vjp(g_NxO)]
    for q_BxHxLxK, k_BxHxLxK, p_BxHxLxL in attention:
      out += [jnp.einsum("bhlk,bhmk->bhlm", q_BxHxLxK, k_BxHxLxK),
              jnp.einsum("bhlm,bhmk->bhlk", p_BxHxLxL, k_BxHxLxK),
              jnp.einsum("bhlm,bhlk->bhmk", p_BxHxLxL, q_BxHxLxK)]
    return out

  return lambda: jax.block_until_ready(matmuls(operands, attention))


def bench_peer_config(repeats: int) -> dict:
  """Issue 12's config: sparse with and without AbsTopK, dense, and the matmul bound, with
  the weight matmuls in bf16 (the cpu preset's `model.matmul_dtype`) and in f32."""
  base = apply_overrides(presets.get_config("cpu"), list(PEER_OVERRIDES))
  with_model = lambda c, **kw: dataclasses.replace(c, model=dataclasses.replace(c.model, **kw))
  mesh = train_lib.make_mesh()
  batch = _random_batch(base, mesh)
  runners, names = [], []
  for dtype in ("bfloat16", "float32"):
    c = with_model(base, matmul_dtype=dtype)
    runners += [_step_runner(c, batch, mesh), _step_runner(with_model(c, afrac=0.25), batch, mesh),
                _step_runner(_dense(c), batch, mesh), _matmul_bound_runner(c, dtype)]
    names += [f"sparse_{dtype}", f"sparse_abstopk_{dtype}", f"dense_{dtype}", f"bound_{dtype}"]
  t = dict(zip(names, time_interleaved(runners, repeats)))
  weight_flops, attention_flops = step_matmul_flops(base)
  flops = weight_flops + attention_flops
  tokens = base.train.batch_size * base.train.seq_len
  bound = {dtype: flops / t[f"bound_{dtype}"] for dtype in ("float32", "bfloat16")}

  def figures(step_s):
    return {"step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
            "gflop_per_s": flops / step_s / 1e9,
            # issue 12's bound is the f32 one; the bf16 one is what the same matmuls reach in
            # the step's own precision
            "fraction_of_matmul_bound": flops / step_s / bound["float32"],
            "fraction_of_bf16_matmul_bound": flops / step_s / bound["bfloat16"]}

  out = {"overrides": list(PEER_OVERRIDES), "tokens_per_step": tokens,
         "step_gflop": flops / 1e9, "attention_gflop": attention_flops / 1e9,
         "matmul_bound_gflop_per_s": bound["float32"] / 1e9,
         "matmul_bound_step_ms": 1e3 * t["bound_float32"],
         "matmul_bound_bf16_gflop_per_s": bound["bfloat16"] / 1e9,
         "matmul_bound_bf16_step_ms": 1e3 * t["bound_bfloat16"]}
  for dtype, suffix in (("bfloat16", ""), ("float32", "_f32")):
    out.update({f"sparse{suffix}": figures(t[f"sparse_{dtype}"]),
                f"sparse_abstopk{suffix}": figures(t[f"sparse_abstopk_{dtype}"]),
                f"dense{suffix}": figures(t[f"dense_{dtype}"]),
                f"ratio_abstopk_over_no_abstopk{suffix}":
                    t[f"sparse_abstopk_{dtype}"] / t[f"sparse_{dtype}"],
                f"ratio_sparse_over_dense{suffix}": t[f"sparse_{dtype}"] / t[f"dense_{dtype}"]})
  return out


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
  if "peer_config" in sections:
    out["peer_config"] = bench_peer_config(args.repeats)
  if "topk" in sections:
    out["topk"] = bench_topk(cfg, args.repeats)
  if "length_groups" in sections:
    from experiments import bench_circuits  # pylint: disable=import-outside-toplevel
    out["length_groups"] = bench_circuits.bench_length_groups()
  if "host_memory" in sections:
    from experiments import bench_hostmem  # pylint: disable=import-outside-toplevel
    out["host_memory"] = bench_hostmem.bench_host_memory(args.preset, args.overrides)
  json.dump(out, sys.stdout, indent=2)
  print()
  return 0


if __name__ == "__main__":
  cli.run(main)
