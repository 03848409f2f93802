"""Run directories: orbax checkpoints plus the config and tokenizer saved beside them.

Layout of a workdir:
  config.json       the run's `Config` (a restart with a different config is refused)
  tokenizer.json    the HF tokenizer the run was trained with (`data.save_tokenizer`)
  metrics.jsonl     one JSON object per logged step (train.py)
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state}

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
killed process never leaves a half-written checkpoint that looks finished. Periodic
checkpoints keep the latest `max_to_keep`; log-spaced ones (training-dynamics studies) and
the final one are never deleted. If the latest checkpoint cannot be read (disk fault,
truncated file), `restore_latest` warns and falls back to the previous one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_jax.config import Config, diff_configs
from sparse_jax.fileio import atomic_write_text

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"


def log_spaced_steps(total_steps: int, n: int) -> tuple[int, ...]:
  """n (or fewer, after rounding) distinct steps spaced log-uniformly in [1, total_steps]."""
  if n <= 0:
    return ()
  return tuple(int(s) for s in np.unique(np.geomspace(1, total_steps, n).round().astype(int)))


def check_or_write_config(workdir: Path, cfg: Config) -> None:
  """Writes config.json, or refuses a config whose training differs from the saved one.

  The `circuit` section is not compared: circuit search settings do not change what was
  trained, and a run can be pruned again with other settings.
  """
  path = workdir / CONFIG_FILE
  if path.exists():
    try:
      saved = Config.from_json(path.read_text())
    except (ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: unreadable saved config ({e})") from None
    diffs = [d for d in diff_configs(saved, cfg) if not d.startswith("circuit.")]
    if diffs:
      raise ValueError(f"{workdir} holds a run with a different config; use a new --workdir or "
                       "the same settings. Differences (saved -> requested):\n  "
                       + "\n  ".join(diffs))
  else:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.to_json())


def load_config(workdir: str | Path) -> Config:
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE}; is this a training run directory?")
  return Config.from_json(path.read_text())


def make_manager(workdir: str | Path, cfg: Config) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `max_to_keep` plus the log-spaced steps."""
  keep = [ocp.checkpoint_managers.LatestN(cfg.train.max_to_keep),
          ocp.checkpoint_managers.CustomSteps(
              log_spaced_steps(cfg.train.steps, cfg.train.n_log_ckpts) + (cfg.train.steps,))]
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
      create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest readable checkpoint (falling back past corrupt ones), or None if there is none."""
  found = _newest_readable(manager, lambda step: restore(manager, step, abstract_state))
  return None if found is None else found[0]


def _newest_readable(manager: ocp.CheckpointManager, read) -> tuple[Any, int] | None:
  """(read(step), step) for the newest step that reads back finite, warning past the others."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      out = read(step)
      _check_finite(out, step)
      return out, step
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read one checkpoint (missing/truncated files, bad metadata, NaNs) is
      # survivable as long as an older one is good.
      logging.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                      step, manager.directory, type(e).__name__, str(e)[:200])
  return None


def _check_finite(state: Any, step: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.isfinite(leaf).all():
      raise ValueError(f"non-finite values in {jax.tree_util.keystr(path)} at step {step}")


def checkpoint_steps(workdir: str | Path) -> list[int]:
  """The steps of a run's finished checkpoints, ascending (orbax skips unfinished ones)."""
  if not (Path(workdir) / CKPT_DIR).is_dir():
    raise FileNotFoundError(f"{workdir}: no {CKPT_DIR}/ directory; is this a training run?")
  return sorted(ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR).all_steps())


def load_params(workdir: str | Path, step: int | None = None) -> tuple[Config, Any, int]:
  """(config, params, step) of a run's latest good (or given) checkpoint, without optimiser."""
  from sparse_jax import model as model_lib  # local: keeps this module light to import

  cfg = load_config(workdir)
  manager = ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR)
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoints under {CKPT_DIR}/")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
      jax.eval_shape(lambda: model_lib.init_params(cfg.model, jax.random.PRNGKey(0))))

  def read(s: int):
    restored = manager.restore(s, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={"params": abstract}, partial_restore=True,
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract)})))
    return restored["state"]["params"]

  if step is not None:
    try:
      params = read(step)
      _check_finite(params, step)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{workdir}: checkpoint {step} is unreadable: {e}") from e
    return cfg, params, step
  found = _newest_readable(manager, read)
  if found is None:
    raise ValueError(f"{workdir}: no readable checkpoint among steps {steps}")
  return cfg, *found
