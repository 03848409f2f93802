"""CLI: `python -m experiments.train --preset {tiny,cpu,tpu,paper} --workdir DIR [--set k=v ...]`.

Rerunning the same command resumes from the latest good checkpoint in DIR.
"""

from __future__ import annotations

import argparse
import logging
import sys

import jax

from experiments import presets
from sparse_jax import train as train_lib
from sparse_jax.config import apply_overrides


def build_config(preset: str, overrides: list[str]):
  return apply_overrides(presets.get_config(preset), overrides)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--preset", default="cpu", choices=presets.PRESETS)
  parser.add_argument("--workdir", required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.FIELD=VALUE", help="override a config field")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (multi-host: TPU pods, "
                           "SLURM or explicit coordinator env vars); run on every host")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  if args.distributed:
    jax.distributed.initialize()
  try:
    cfg = build_config(args.preset, args.overrides)
    train_lib.train(cfg, args.workdir, progress=not args.no_progress)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
