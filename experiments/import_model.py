"""CLI: make a run directory from a model released in the authors' format.

  python -m experiments.import_model --from DIR [--tokenizer FILE] --workdir RUN
                                     [--set data.F=V | train.F=V | circuit.F=V ...]

DIR holds `beeg_config.json` + `final_model.pt` (the authors' `models/<name>/`). RUN gets what
a training run leaves: config.json, the params as an orbax checkpoint (step 0), the authors'
config (beeg_config.json, kept so that an export writes it back unchanged) and, with
--tokenizer, tokenizer.json. FILE is the authors' tokenizer, converted to an HF one with the
same ids: their `tinypython/` directory (vocab.bpe + encoder.json, as tinypython_2k reads it)
or a tiktoken-format file (`base64token rank` lines); an HF tokenizer.json is taken as is.
Without it the run has no tokenizer and the tools that need text (prune, tasks) say so.
`--set` chooses the run's data (the validation text the mean activations and the validation
loss are taken over: by default this project's default corpus), batch shape and circuit
search defaults; the model section comes from DIR only. No torch is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import interop
from sparse_jax.config import Config, TrainConfig, apply_overrides

IMPORT_STEP = 0  # imported params are saved as the checkpoint of step 0


def load_any_tokenizer(path: str | Path):
  """An HF tokenizer.json as is; a directory with the authors' vocab.bpe + encoder.json, or
  a tiktoken-format BPE file, converted."""
  path = Path(path)
  if not path.exists():
    raise ValueError(f"--tokenizer {path}: no such file or directory")
  if path.suffix == ".json":
    return data_lib.load_tokenizer(path)
  return interop.load_authors_tokenizer(path)


OVERRIDABLE = ("data", "train", "circuit")  # the model section is DIR's


def import_model(src: str | Path, workdir: str | Path, *, tokenizer: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Config:
  """Writes RUN from an authors'-format model directory; returns the run's Config.

  Args:
    overrides: `section.field=value` for the data, train and circuit sections of the run's
      config (e.g. data.corpus, the text its means and validation loss are taken over).
  """
  workdir = Path(workdir)
  bad = [o for o in overrides if o.split(".", 1)[0] not in OVERRIDABLE]
  if bad:
    raise ValueError(f"--set {bad[0]!r}: only {', '.join(s + '.*' for s in OVERRIDABLE)} can "
                     "be set; the model section comes from the imported files")
  if workdir.exists() and any(workdir.iterdir()):
    raise ValueError(f"--workdir {workdir} exists and is not empty; import into a new one")
  model_cfg, params, beeg = interop.read_model(src)
  tok = load_any_tokenizer(tokenizer) if tokenizer is not None else None
  if tok is not None and tok.get_vocab_size() > model_cfg.vocab_size:
    raise ValueError(f"--tokenizer {tokenizer}: {tok.get_vocab_size()} tokens do not fit the "
                     f"model's vocab_size {model_cfg.vocab_size}")
  cfg = apply_overrides(
      Config(model=model_cfg, train=TrainConfig(seq_len=min(128, model_cfg.block_size))),
      overrides)
  ckpt_lib.check_or_write_config(workdir, cfg)
  fileio.atomic_write_text(workdir / interop.CONFIG_FILE, (Path(src) / interop.CONFIG_FILE)
                           .read_text())
  if tok is not None:
    data_lib.save_tokenizer(tok, workdir)
  manager = ckpt_lib.make_manager(workdir, cfg)
  ckpt_lib.save(manager, IMPORT_STEP, {"params": params})
  manager.wait_until_finished()
  return cfg


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="src", required=True,
                      help="the authors' model directory (beeg_config.json + final_model.pt)")
  parser.add_argument("--tokenizer", default=None,
                      help="the authors' tinypython/ dir (vocab.bpe + encoder.json), a tiktoken "
                           "file, or an HF tokenizer.json")
  parser.add_argument("--workdir", required=True, help="new run directory to create")
  parser.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.FIELD=VALUE", help="data.*, train.* or circuit.*")
  args = parser.parse_args(argv)
  cfg = import_model(args.src, args.workdir, tokenizer=args.tokenizer,
                     overrides=args.overrides)
  m = cfg.model
  print(f"imported {args.src} -> {args.workdir}: {m.n_layer} layers, d_model {m.d_model}, "
        f"vocab {m.vocab_size}, afrac {m.afrac}, sink {m.sink}"
        + ("" if args.tokenizer else "; no tokenizer (pass --tokenizer for prune/tasks)"))
  return 0


if __name__ == "__main__":
  cli.run(main)
