"""CLI: `python -m experiments.train --preset {tiny,cpu,tpu,paper} --workdir DIR [--set k=v ...]`.

Rerunning the same command resumes from the latest good checkpoint in DIR. `--seeds N` trains
the same config with train.seed = 0..N-1 into sibling directories DIR_seed0 .. DIR_seed{N-1},
one after another (each resumable the same way), for `experiments.dynamics --compare`.
"""

from __future__ import annotations

import argparse

import jax

from experiments import cli
from experiments import presets
from sparse_jax import train as train_lib
from sparse_jax.config import apply_overrides


def build_config(preset: str, overrides: list[str]):
  return apply_overrides(presets.get_config(preset), overrides)


def seed_runs(workdir: str, overrides: list[str], seeds: int | None) -> list[tuple[str, list[str]]]:
  """[(workdir, overrides)] of each run: the one run, or one per seed with train.seed set."""
  if seeds is None:
    return [(workdir, overrides)]
  if seeds < 1:
    raise ValueError(f"--seeds must be >= 1, got {seeds}")
  if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides):
    raise ValueError("--seeds sets train.seed itself; drop --set train.seed=...")
  return [(f"{workdir.rstrip('/')}_seed{i}", overrides + [f"train.seed={i}"])
          for i in range(seeds)]


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="cpu", choices=presets.PRESETS)
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.FIELD=VALUE", help="override a config field")
  parser.add_argument("--seeds", type=int, default=None, metavar="N",
                      help="train seeds 0..N-1 into DIR_seed0 .. DIR_seed{N-1}")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host: TPU pods, "
                           "SLURM or explicit coordinator env vars); run on every host")
  args = parser.parse_args(argv)
  # Every run's config is validated before anything starts.
  runs = [(workdir, build_config(args.preset, overrides))
          for workdir, overrides in seed_runs(args.workdir, args.overrides, args.seeds)]
  if args.distributed:
    jax.distributed.initialize()
  for workdir, cfg in runs:
    train_lib.train(cfg, workdir, progress=not args.no_progress)
  return 0


if __name__ == "__main__":
  cli.run(main)
