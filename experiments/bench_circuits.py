"""Benchmark: mask training for many tasks as one vmapped program vs a Python loop over tasks.

  python -m experiments.bench_circuits [--n-tasks 20] [--steps 20]

Both sides run the same `masks.mask_step` for the same steps on the same small random model
and synthetic task arrays: one side is `masks.train_masks`, the jitted program vmapped over
the task axis that `circuits.find_circuits` runs; the other jits the step for one task and
loops over tasks and steps in Python. Both are compiled and warmed up before timing.
`experiments/bench.py` calls `bench_circuit_search` and prints its dict as JSON; the goal is
a ratio >= 5.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import masks
from sparse_jax import model as model_lib
from sparse_jax.config import CircuitConfig, ModelConfig
from sparse_jax.tasks import TaskArrays

BENCH_MODEL = ModelConfig(n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256, vocab_size=512,
                          block_size=64, afrac=0.25)


def _synthetic_tasks(cfg: ModelConfig, n_tasks: int, n_pairs: int, seq_len: int,
                     seed: int) -> TaskArrays:
  """Random pairs differing in one token, with random lengths and candidates."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (n_tasks, n_pairs, 2, seq_len))
  tokens[:, :, 1] = tokens[:, :, 0]
  tokens[:, :, 1, 0] = (tokens[:, :, 0, 0] + 1) % cfg.vocab_size
  last = rng.integers(seq_len // 2, seq_len, (n_tasks, n_pairs, 1)).repeat(2, axis=2)
  tok = rng.integers(0, cfg.vocab_size, (n_tasks, n_pairs))
  alt = (tok + rng.integers(1, cfg.vocab_size, tok.shape)) % cfg.vocab_size  # never tok
  return TaskArrays(*(jnp.asarray(x, jnp.int32) for x in (tokens, last, tok, alt)))


def bench_circuit_search(n_tasks: int = 20, steps: int = 20, *, cfg: ModelConfig = BENCH_MODEL,
                         batch_size: int = 16, seq_len: int = 32, repeats: int = 2,
                         seed: int = 0) -> dict:
  """Times `steps` mask-training steps for n_tasks tasks: vmapped vs a loop over tasks.

  Args:
    n_tasks: tasks trained.
    steps: mask-training steps on each side.
    cfg: the model (random init).
    batch_size: task pairs per step.
    seq_len: tokens per task sequence.
    repeats: timing repeats, the two sides alternating (fair under a shared, busy CPU);
      the best of each is kept.
    seed: model and data seed.

  Returns:
    {"vmapped_s": `masks.train_masks` on all tasks at once (one program),
     "loop_s": a Python loop over tasks and steps calling a jitted single-task step,
     "ratio": loop_s / vmapped_s (goal >= 5),
     "per_task_program_s": `train_masks` called once per task (the same program without
       the task batching: isolates what vmap itself gives), "max_tau_diff" between the
       vmapped and looped masks, and the sizes}.
  """
  ccfg = CircuitConfig(steps=steps, batch_size=batch_size, seed=seed)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  means = {site: jnp.zeros(w) for site, w in model_lib.node_sites(cfg).items()}
  arrays = _synthetic_tasks(cfg, n_tasks, 4 * batch_size, seq_len, seed)
  n = masks.n_nodes(cfg)
  one = jax.jit(functools.partial(masks.mask_step, cfg=cfg, ccfg=ccfg))
  per_task = [jax.tree.map(lambda x, t=t: x[t], arrays) for t in range(n_tasks)]
  scalars = [(jnp.float32(ccfg.k_coef), jnp.int32(t)) for t in range(n_tasks)]

  def run_vmapped():
    return masks.train_masks(params, cfg, arrays, means, ccfg)[0][:, 0]

  def run_loop():
    taus = []
    for t in range(n_tasks):
      state = masks.init_mask_state(ccfg, n, scalars[t][1])
      for _ in range(steps):
        state, _ = one(params, means, state, per_task[t], *scalars[t])
      taus.append(state.tau_N)
    return np.stack(jax.device_get(taus))

  def run_per_task_program():
    return [masks.train_masks(params, cfg, jax.tree.map(lambda x: x[None], a), means, ccfg)
            for a in per_task]

  # Warm up (compile) every side; the vmapped and looped masks must agree.
  max_diff = float(np.max(np.abs(run_vmapped() - run_loop())))
  run_per_task_program()
  times = {"vmapped_s": [], "loop_s": [], "per_task_program_s": []}
  for _ in range(repeats):
    for key, fn in (("vmapped_s", run_vmapped), ("loop_s", run_loop),
                    ("per_task_program_s", run_per_task_program)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - t0)
  best = {key: min(ts) for key, ts in times.items()}
  return {"n_tasks": n_tasks, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
          "n_nodes": n, "model": f"{cfg.n_layer}L d{cfg.d_model} V{cfg.vocab_size} afrac "
                                 f"{cfg.afrac}",
          "devices": f"{jax.device_count()}x {jax.devices()[0].platform}", **best,
          "ratio": best["loop_s"] / best["vmapped_s"], "max_tau_diff": max_diff}


def ragged_tasks(cfg: ModelConfig, n_tasks: int, n_pairs: int, seq_len: int,
                 seed: int) -> TaskArrays:
  """`_synthetic_tasks` with lengths shaped like the 20 tasks': most pairs near 40% of the
  longest, a few long ones (every task has one pair at seq_len)."""
  arrays = _synthetic_tasks(cfg, n_tasks, n_pairs, seq_len, seed)
  rng = np.random.default_rng(seed + 1)
  last_TxP = np.clip(rng.normal(0.4 * seq_len, 0.15 * seq_len, (n_tasks, n_pairs)), 4,
                     seq_len - 1).astype(np.int32)
  last_TxP[:, 0] = seq_len - 1
  tokens = np.where(np.arange(seq_len) > last_TxP[:, :, None, None], 0,
                    np.asarray(arrays.tokens_Px2xL))
  return arrays.replace(tokens_Px2xL=jnp.asarray(tokens, jnp.int32),
                        last_Px2=jnp.asarray(np.repeat(last_TxP[..., None], 2, -1)))


def bench_length_groups(n_tasks: int = 20, *, cfg: ModelConfig = BENCH_MODEL, seq_len: int = 64,
                        n_pairs: int = 64, steps: int = 10, n_candidates: int = 64,
                        repeats: int = 3, seed: int = 0) -> dict:
  """Circuit search with pairs grouped by length against every pair padded to the longest.

  Evaluation: `scoring.Evaluator.d` for n_candidates random circuits, 8 length groups vs 1
  (`max_d_diff`: the largest difference of the logit differences; exact up to float rounding,
  except that with AbsTopK a rounding-level near-tie can flip one channel: 1 of 4,096 values
  moved by 0.012 on this model, none beyond 2e-7 without AbsTopK). Mask training:
  `masks.train_masks` with 4 length strata vs uniform draws over all pairs (same expected
  minibatch loss, other draws). Both sides compiled first, timed interleaved, best kept.
  """
  from sparse_jax import scoring  # pylint: disable=import-outside-toplevel

  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  means = {site: jnp.zeros(w) for site, w in model_lib.node_sites(cfg).items()}
  arrays = ragged_tasks(cfg, n_tasks, n_pairs, seq_len, seed)
  n = masks.n_nodes(cfg)
  rng = np.random.default_rng(seed)
  rank_TxN = np.stack([rng.permutation(n) for _ in range(n_tasks)])
  unit_C, k_C = rng.integers(0, n_tasks, n_candidates), rng.integers(0, n, n_candidates)
  evs = []
  for groups in (1, 8):
    ev = scoring.Evaluator(params, cfg, {"s": arrays}, means, 1024, 16, groups)
    ev.set_ranks(rank_TxN, np.arange(n_tasks))
    evs.append(ev)
  ccfgs = [CircuitConfig(steps=steps, batch_size=16, n_train_pairs=n_pairs,
                         train_length_strata=s, seed=seed) for s in (1, 4)]
  fns = {"eval_1_group_s": lambda: evs[0].d("s", unit_C, k_C),
         "eval_8_groups_s": lambda: evs[1].d("s", unit_C, k_C),
         "masks_uniform_s": lambda: masks.train_masks(params, cfg, arrays, means, ccfgs[0]),
         "masks_4_strata_s": lambda: masks.train_masks(params, cfg, arrays, means, ccfgs[1])}
  max_diff = float(np.max(np.abs(fns["eval_1_group_s"]() - fns["eval_8_groups_s"]())))
  for key in ("masks_uniform_s", "masks_4_strata_s"):
    fns[key]()
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[key].append(time.perf_counter() - t0)
  best = {key: min(ts) for key, ts in times.items()}
  real = float((np.asarray(arrays.last_Px2) + 1).mean() / seq_len)
  return {"n_tasks": n_tasks, "n_pairs": n_pairs, "seq_len": seq_len,
          "real_token_fraction": real, "n_candidates": n_candidates, "mask_steps": steps, **best,
          "eval_ratio": best["eval_1_group_s"] / best["eval_8_groups_s"],
          "masks_ratio": best["masks_uniform_s"] / best["masks_4_strata_s"],
          "max_d_diff": max_diff}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n-tasks", type=int, default=20)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  print(json.dumps(bench_circuit_search(args.n_tasks, args.steps), indent=2))


if __name__ == "__main__":
  main()
