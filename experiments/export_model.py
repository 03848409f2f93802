"""CLI: write a run's params in the authors' release format (what their code loads).

  python -m experiments.export_model --workdir RUN --out DIR [--step N]

DIR gets `beeg_config.json` + `final_model.pt` (a torch zip state dict, written without
torch), and the run's tokenizer.json if it has one. A run made by `experiments.import_model`
exports to the files it came from: the same config and bitwise the same tensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments import cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import interop


def export_model(workdir: str | Path, out: str | Path, *, step: int | None = None) -> Path:
  """Writes RUN's checkpoint (latest good, or `step`) to out; returns out."""
  workdir = Path(workdir)
  cfg, params, _ = ckpt_lib.load_params(workdir, step)
  beeg_path = workdir / interop.CONFIG_FILE  # present for imported runs
  beeg = json.loads(beeg_path.read_text()) if beeg_path.exists() else None
  out = interop.write_model(out, cfg.model, params, beeg)
  if (workdir / "tokenizer.json").exists():  # the ids the model was trained on travel with it
    data_lib.save_tokenizer(data_lib.load_tokenizer(workdir), out)
  return out


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a run directory")
  parser.add_argument("--out", required=True, help="directory to write the model into")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  args = parser.parse_args(argv)
  out = export_model(args.workdir, args.out, step=args.step)
  print(f"wrote {out / interop.CONFIG_FILE} and {out / interop.WEIGHTS_FILE}")
  return 0


if __name__ == "__main__":
  cli.run(main)
