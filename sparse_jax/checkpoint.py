"""Run directories: orbax checkpoints plus the config and tokenizer saved beside them.

Layout of a workdir:
  config.json       the run's `Config` (a restart with a different config is refused)
  tokenizer.json    the HF tokenizer the run was trained with (`data.save_tokenizer`)
  metrics.jsonl     one JSON object per logged step (train.py)
  .lock             held (flock) by the training process, holds its PID
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state}
  checkpoints/<step>.checksum.json  a CRC-32 of every leaf of that checkpoint's state
  checkpoints/<step>.corrupt/  a checkpoint that could not be read, moved aside

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
killed process never leaves a half-written checkpoint that looks finished. Periodic
checkpoints keep the latest `max_to_keep`; log-spaced ones (training-dynamics studies) and
the final one are never deleted. Each checkpoint's checksums are written before it (so no
finished checkpoint lacks them) and verified on restore: a flipped bit reads as corrupt. If
the latest checkpoint cannot be read (disk fault, truncated file, checksum mismatch),
`restore_latest` warns, moves it aside (so retraining that step does not collide with it) and
falls back to the previous one; if none can be read it refuses rather than start again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparse_jax import fileio
from sparse_jax.config import Config, diff_configs
from sparse_jax.fileio import atomic_write_text

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
LOCK_FILE = ".lock"
CHECKSUM_SUFFIX = ".checksum.json"


def log_spaced_steps(total_steps: int, n: int) -> tuple[int, ...]:
  """n (or fewer, after rounding) distinct steps spaced log-uniformly in [1, total_steps]."""
  if n <= 0:
    return ()
  return tuple(int(s) for s in np.unique(np.geomspace(1, total_steps, n).round().astype(int)))


def checkpoint_steps(workdir: str | Path) -> list[int]:
  """The finished checkpoint steps in workdir (orbax's own temporary directories excluded)."""
  ckpts = Path(workdir) / CKPT_DIR
  if not ckpts.is_dir():
    return []
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit() and p.is_dir())


def check_or_write_config(workdir: Path, cfg: Config) -> None:
  """Writes config.json, or refuses a config whose training differs from the saved one.

  The saved config binds only a run that has a checkpoint: one that failed before its first
  checkpoint (a bad learning rate, say) can be rerun with a fixed config. Checkpoints without
  a config.json are of unknown config, and are never given the new one.
  The `circuit` section is not compared: circuit search settings do not change what was
  trained, and a run can be pruned again with other settings.
  """
  workdir = Path(workdir)
  path = workdir / CONFIG_FILE
  steps = checkpoint_steps(workdir)
  if steps and not path.exists():
    raise ValueError(f"{workdir} holds checkpoints (steps {steps}) but no {CONFIG_FILE}, so "
                     "their config is unknown; restore config.json or use a new --workdir")
  if steps:
    saved = _read_config(path)
    diffs = [d for d in diff_configs(saved, cfg) if not d.startswith("circuit.")]
    if diffs:
      raise ValueError(f"{workdir} holds a run with a different config; use a new --workdir or "
                       "the same settings. Differences (saved -> requested): "
                       + "; ".join(diffs))
  elif not path.exists() or _read_config(path, strict=False) != cfg:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, cfg.to_json())


def _read_config(path: Path, strict: bool = True) -> Config | None:
  """The Config in path; a damaged file raises ValueError (or gives None unless strict)."""
  try:
    return Config.from_dict(fileio.read_json(path))
  except (ValueError, TypeError, OSError) as e:
    if not strict:
      return None
    raise ValueError(f"{path}: unreadable saved config ({e})") from None


def load_config(workdir: str | Path) -> Config:
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{workdir}: no {CONFIG_FILE}; is this a training run directory?")
  return _read_config(path)


@contextlib.contextmanager
def locked(workdir: str | Path) -> Iterator[None]:
  """Holds workdir/.lock (flock, with this PID inside) for the duration of a training.

  A second training of the same workdir is refused with BlockingIOError naming the holder.
  The kernel drops the lock when its process dies, even by SIGKILL, so a lock left by a dead
  process is stale by construction: it is taken over with a warning. Only process 0 of a
  multi-host run takes it.
  """
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir) / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
      raise BlockingIOError(f"{workdir} is being trained by PID {holder} (lock {path}); wait "
                            "for it to finish or stop it, then rerun") from None
    stale = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if stale and stale != str(os.getpid()):
      log.warning("%s: taking over the stale lock of PID %s (no longer running)", path, stale)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
  finally:
    os.close(fd)  # releases the flock


def make_manager(workdir: str | Path, cfg: Config) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the latest `max_to_keep` plus the log-spaced steps."""
  keep = [ocp.checkpoint_managers.LatestN(cfg.train.max_to_keep),
          ocp.checkpoint_managers.CustomSteps(
              log_spaced_steps(cfg.train.steps, cfg.train.n_log_ckpts) + (cfg.train.steps,))]
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
      # A step directory that cannot be created (read-only or full disk) then fails in
      # save() itself, at once; created in orbax's background thread, the failure left other
      # threads waiting on it for minutes before the process could exit.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / CKPT_DIR, options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves state at step (asynchronously), its checksums first."""
  directory = Path(manager.directory)
  if jax.process_index() == 0:
    atomic_write_text(directory / f"{step}{CHECKSUM_SUFFIX}",
                      json.dumps(checksums(state), indent=0))
    _drop_orphan_checksums(directory, manager.all_steps())
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def checksums(tree: Any) -> dict[str, str]:
  """{leaf path: CRC-32 of its dtype, shape and bytes} of a pytree of arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{x.dtype.str}{x.shape}".encode())
    out[_path_name(path)] = f"{zlib.crc32(x.data, crc):08x}"
  return out


def _path_name(path) -> str:
  """"params/blocks/0/attn/w" for a key path, the same for a TrainState and a plain dict."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))))
  return "/".join(parts)


def _drop_orphan_checksums(directory: Path, steps) -> None:
  """Deletes checksums of checkpoints orbax has rotated out (not of ones still being written)."""
  steps = set(steps)
  for p in directory.glob(f"*{CHECKSUM_SUFFIX}"):
    stem = p.name[:-len(CHECKSUM_SUFFIX)]
    if stem.isdigit() and steps and int(stem) < max(steps) and int(stem) not in steps:
      p.unlink(missing_ok=True)


def verify(directory: Path, step: int, tree: Any) -> None:
  """Raises ValueError if a leaf of tree differs from the checksum saved with its step.

  Checkpoints saved before checksums existed have none and pass. Leaves of tree that the
  checksum file does not list (a partial restore lists fewer) are compared; others are not.
  """
  path = Path(directory) / f"{step}{CHECKSUM_SUFFIX}"
  if not path.exists():
    log.debug("%s: no checksums (an older checkpoint); not verified", path)
    return
  saved = fileio.read_json(path)
  for name, crc in checksums(tree).items():
    if name not in saved:
      raise ValueError(f"{path}: no checksum for {name}")
    if saved[name] != crc:
      raise ValueError(f"checksum mismatch in {name} at step {step} (saved {saved[name]}, "
                       f"read {crc}): the checkpoint was altered after it was written")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  verify(manager.directory, step, restored["state"])
  return restored["state"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
  """The newest readable checkpoint, or None if there is none.

  Unreadable newer checkpoints are moved aside to `<step>.corrupt` with a warning. If
  checkpoints exist but none can be read, raises ValueError and moves nothing: starting again
  from step 0 would overwrite the run's history.
  """
  found = _newest_readable(manager, lambda step: restore(manager, step, abstract_state),
                           move_aside=True)
  return None if found is None else found[0]


def _newest_readable(manager: ocp.CheckpointManager, read, *,
                     move_aside: bool = False) -> tuple[Any, int] | None:
  """(read(step), step) for the newest step that reads back finite, warning past the others."""
  steps = sorted(manager.all_steps(), reverse=True)
  bad = []
  for step in steps:
    try:
      out = read(step)
      _check_finite(out, step)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read one checkpoint (missing/truncated files, bad metadata, a checksum
      # mismatch, NaNs) is survivable as long as an older one is good.
      log.warning("checkpoint %d in %s is unreadable (%s: %s); trying the previous one",
                  step, manager.directory, type(e).__name__, str(e)[:200])
      bad.append((step, f"{type(e).__name__}: {str(e)[:120]}"))
      continue
    if move_aside and bad and jax.process_index() == 0:
      for s, _ in bad:
        _move_aside(Path(manager.directory), s)
      manager.reload()
    return out, step
  if bad:
    raise ValueError(f"{manager.directory}: none of the checkpoints can be read ("
                     + "; ".join(f"step {s}: {why}" for s, why in bad)
                     + "); nothing was changed. Repair or restore them, or move the directory "
                     "away to start again")
  return None


def _move_aside(directory: Path, step: int) -> Path:
  """Renames checkpoint `step` (and its checksums) to `<step>.corrupt[.N]`."""
  target = directory / f"{step}.corrupt"
  n = 0
  while target.exists():
    n += 1
    target = directory / f"{step}.corrupt.{n}"
  os.rename(directory / str(step), target)
  checksum = directory / f"{step}{CHECKSUM_SUFFIX}"
  if checksum.exists():
    shutil.move(checksum, target / checksum.name)
  log.warning("moved unreadable checkpoint %d aside to %s; training continues from an older "
              "one", step, target)
  return target


def _check_finite(state: Any, step: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.isfinite(leaf).all():
      raise ValueError(f"non-finite values in {jax.tree_util.keystr(path)} at step {step}")


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
    params = restored["state"]["params"]
    verify(manager.directory, s, {"params": params})
    return params

  if step is not None:
    try:
      params = read(step)
      _check_finite(params, step)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{workdir}: checkpoint {step} is unreadable: {e}") from e
    return cfg, params, step
  return cfg, *_newest_readable(manager, read)
