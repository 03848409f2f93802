"""`bench --only host_memory`: the train step with host malloc reusing freed blocks, or not.

The setting (`sparse_jax.hostmem`) is process-wide and must precede JAX's backend, so the
two arms cannot share a process: each run is a child process (`python -m
experiments.bench_hostmem --child ...`) that times the preset's jitted train step and counts
the minor page faults it takes, with `SPARSE_JAX_KEEP_FREED_MEMORY` set to 1 or 0. The arms
alternate, child by child, and each reports the median step; the figure is their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from experiments import cli
from sparse_jax import hostmem


def bench_host_memory(preset: str, overrides: list[str], rounds: int = 2,
                      steps: int = 20) -> dict:
  """Median train-step ms and page faults per step with freed blocks kept (on) or not (off)."""
  runs = {"on": [], "off": []}
  for _ in range(rounds):
    for arm in ("off", "on"):
      runs[arm].append(_child(arm, preset, overrides, steps))
  out = {}
  for arm, results in runs.items():
    out[f"step_ms_{arm}"] = statistics.median(r["step_ms"] for r in results)
    out[f"minor_faults_per_step_{arm}"] = statistics.median(r["minor_faults_per_step"]
                                                            for r in results)
    out[f"applied_{arm}"] = all(r["applied"] for r in results)
  out["ratio_off_over_on"] = out["step_ms_off"] / out["step_ms_on"]
  out["rounds"], out["steps"] = rounds, steps
  return out


def _child(arm: str, preset: str, overrides: list[str], steps: int) -> dict:
  cmd = [sys.executable, "-m", "experiments.bench_hostmem", "--child", "--preset", preset,
         "--steps", str(steps)] + [a for o in overrides for a in ("--set", o)]
  env = dict(os.environ, **{hostmem.ENV: "1" if arm == "on" else "0"})
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"host_memory child ({arm}) failed: {done.stderr.strip()[-2000:]}")
  return json.loads(done.stdout)


def time_steps(preset: str, overrides: list[str], steps: int) -> dict:
  """In this process: median ms of `steps` train steps (after 3 warm-up) and faults per step."""
  # Imported here: the parent process never starts JAX.
  from experiments import bench, presets  # pylint: disable=import-outside-toplevel
  from sparse_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from sparse_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel
  cfg = apply_overrides(presets.get_config(preset), overrides)
  mesh = train_lib.make_mesh()
  run = bench._step_runner(cfg, bench._random_batch(cfg, mesh), mesh)  # pylint: disable=protected-access
  for _ in range(3):
    run()
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
  return {"step_ms": 1e3 * statistics.median(times), "minor_faults_per_step": faults / steps}


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--child", action="store_true", help="time this process's steps")
  parser.add_argument("--preset", default="cpu")
  parser.add_argument("--set", dest="overrides", action="append", default=[])
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  if args.child:
    out = time_steps(args.preset, args.overrides, args.steps)
    # cli.run applied the setting (where enabled) before JAX started.
    out["applied"] = hostmem.enabled()
  else:
    out = bench_host_memory(args.preset, args.overrides, steps=args.steps)
  json.dump(out, sys.stdout)
  print()
  return 0


if __name__ == "__main__":
  cli.run(main)
