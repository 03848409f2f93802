"""Resumable, data-parallel training of (weight-sparse) GPTs: `train(cfg, workdir)`.

One jitted train step (forward -> loss -> grad -> the sparsity optax chain), data-parallel over
every device with a 1-D ("data",) mesh: the batch is sharded over the mesh, the state is
replicated, and XLA inserts the gradient all-reduce. The same code runs on one CPU, on
simulated CPU devices, a GPU, or a TPU slice (with `jax.distributed.initialize()` first on
several hosts: each process feeds its slice of the global batch).

Nothing is lost: each batch is a pure function of (seed, step), checkpoints are atomic, and
rerunning the same command resumes from the latest good checkpoint to the bitwise-same
params as a run never interrupted. A non-finite loss stops the run before anything is saved
after it, so the last good checkpoint stays intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import model as model_lib
from sparse_jax import sparsity
from sparse_jax import tasks as tasks_lib
from sparse_jax.config import Config

METRICS_FILE = "metrics.jsonl"

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps completed
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """What `train` optimises; `lm_objective(cfg)`, the plain language model, by default.

  Other objectives (bridges.py) train more than the model's params, against inputs that stay
  fixed; the loop, checkpoints, metrics and evaluation stay the same.
  """

  init_params: Callable[[jax.Array], Any]  # key -> trainable params (the model's at the top)
  loss_fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]  # (params, frozen, batch)
  # -> (loss, aux): aux scalars are logged as "train/<name>" with the loss.
  frozen: Any = None  # inputs never trained (e.g. a dense model), replicated over the mesh


def lm_objective(cfg: Config) -> Objective:
  def loss_fn(params, frozen, batch_BxL1):
    del frozen
    return model_lib.next_token_loss(params, batch_BxL1, cfg.model), {}

  return Objective(lambda key: model_lib.init_params(cfg.model, key), loss_fn)


def make_mesh() -> Mesh:
  """A 1-D ("data",) mesh over every device (all hosts' devices under jax.distributed)."""
  return Mesh(np.array(jax.devices()), ("data",))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"train.batch_size={batch_size} does not divide over the {n} devices of "
                     f"the mesh; use a multiple of {n}")


def make_optimizer(cfg: Config, objective: Objective | None = None
                   ) -> optax.GradientTransformation:
  objective = objective or lm_objective(cfg)
  abstract = jax.eval_shape(lambda: objective.init_params(jax.random.PRNGKey(0)))
  return sparsity.make_optimizer(cfg, abstract, cfg.train.steps)


def init_state(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh,
               objective: Objective | None = None) -> TrainState:
  """Fresh state from cfg.train.seed, replicated over the mesh."""
  objective = objective or lm_objective(cfg)

  def init():
    params = objective.init_params(jax.random.PRNGKey(cfg.train.seed))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=opt.init(params))

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))()


def abstract_state(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh,
                   objective: Objective | None = None) -> TrainState:
  objective = objective or lm_objective(cfg)
  replicated = NamedSharding(mesh, P())
  shapes = jax.eval_shape(lambda: TrainState(
      step=jnp.zeros([], jnp.int32),
      params=(p := objective.init_params(jax.random.PRNGKey(0))),
      opt_state=opt.init(p)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                      shapes)


def make_train_step(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh,
                    objective: Objective | None = None):
  """The jitted step: (state, batch_Bx(L+1), frozen=None) -> (state, metrics), state donated.

  frozen is the objective's untrained input (None for the plain language model).
  """
  objective = objective or lm_objective(cfg)
  replicated = NamedSharding(mesh, P())

  def step(state: TrainState, batch_BxL1: jax.Array, frozen):
    (loss, aux), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(
        state.params, frozen, batch_BxL1)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"loss": loss, **aux}

  jitted = jax.jit(step, in_shardings=(replicated, NamedSharding(mesh, P("data")), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  return lambda state, batch_BxL1, frozen=None: jitted(state, batch_BxL1, frozen)


def shard_batch(batch_BxL1: np.ndarray, mesh: Mesh) -> jax.Array:
  """Puts this process's rows of the global batch onto its devices."""
  sharding = NamedSharding(mesh, P("data"))
  rows = batch_BxL1.shape[0] // jax.process_count()
  local = batch_BxL1[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  return jax.make_array_from_process_local_data(sharding, local, batch_BxL1.shape)


class MetricsLog:
  """Appends JSON lines to workdir/metrics.jsonl; on resume drops lines past the restart step.

  Only process 0 writes (under jax.distributed every host runs the same loop).
  """

  def __init__(self, workdir: Path, resume_step: int):
    self.path = workdir / METRICS_FILE
    self._file = None
    if jax.process_index() != 0:
      return
    if self.path.exists():
      # Also drops a partial last line (a kill mid-write), so appending starts on a new line.
      kept = [row for row in fileio.read_jsonl(self.path) if row.get("step", 0) <= resume_step]
      fileio.atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if self._file is not None:
      self._file.write(json.dumps({"step": step, **metrics}) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  """The rows of a run's metrics.jsonl (a partial last line dropped with a warning)."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return fileio.read_jsonl(path)


@jax.jit
def _params_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))


def _check_finite(loss: float, step: int, workdir: Path, last_saved: int | None,
                  what: str = "training loss") -> None:
  if not math.isfinite(loss):
    where = (f"the last good checkpoint (step {last_saved}) is intact in {workdir}"
             if last_saved is not None else "no checkpoint was written")
    raise FloatingPointError(f"{what} is {loss} at step {step}; stopping. {where}. "
                             "Lower optim.lr or check the data.")


def train(cfg: Config, workdir: str | Path, *, progress: bool = True,
          objective: Objective | None = None, tokenizer=None) -> TrainState:
  """Trains (or resumes) the run in `workdir` to cfg.train.steps; returns the final state.

  Args:
    cfg: the experiment; must equal the config saved in workdir if the run exists.
    workdir: run directory (created if missing).
    progress: show a tqdm bar.
    objective: what to train; default `lm_objective(cfg)`. Evaluation always reads the
      model's params (the top level of the params tree).
    tokenizer: tokenize the corpus with this one instead of the BPE trained on it (a bridge
      run uses its dense model's, so that both read the same token ids).
  """
  workdir = Path(workdir)
  # Fail in a second, not after data preparation or at the first checkpoint.
  fileio.check_writable_dir(workdir, "workdir")
  fileio.check_writable_dir(workdir / ckpt_lib.CKPT_DIR, "checkpoint directory")
  with ckpt_lib.locked(workdir):
    return _train(cfg, workdir, progress, objective or lm_objective(cfg), tokenizer)


def _train(cfg: Config, workdir: Path, progress: bool, objective: Objective,
           tokenizer) -> TrainState:
  ckpt_lib.check_or_write_config(workdir, cfg)
  tc = cfg.train
  mesh = make_mesh()
  check_batch_divides(tc.batch_size, mesh)
  dataset = data_lib.prepare_data(cfg, tokenizer=tokenizer)
  data_lib.save_tokenizer(dataset.tokenizer, workdir)
  if dataset.tokenizer.get_vocab_size() > cfg.model.vocab_size:
    raise ValueError(f"tokenizer has {dataset.tokenizer.get_vocab_size()} tokens but "
                     f"model.vocab_size={cfg.model.vocab_size}")

  opt = make_optimizer(cfg, objective)
  manager = ckpt_lib.make_manager(workdir, cfg)
  state = ckpt_lib.restore_latest(manager, abstract_state(cfg, opt, mesh, objective))
  if state is None:
    state = init_state(cfg, opt, mesh, objective)
  start = int(state.step)
  last_saved = start if start > 0 else None
  if start:
    logger.info("resuming %s from step %d", workdir, start)
  log = MetricsLog(workdir, start)
  specs = sparsity.leaf_specs(state.params, cfg.sparsity)
  lr_fn = sparsity.learning_rate_fn(cfg.optim, cfg.sparsity, specs, tc.steps)
  step_fn = make_train_step(cfg, opt, mesh, objective)
  frozen = jax.device_put(objective.frozen, NamedSharding(mesh, P()))
  evaluator = _Evaluator(cfg, dataset, mesh)
  save_steps = set(ckpt_lib.log_spaced_steps(tc.steps, tc.n_log_ckpts))

  bar = tqdm(total=tc.steps, initial=start, desc=str(workdir.name), dynamic_ncols=True,
             disable=not progress or jax.process_index() != 0)
  pending = None  # (step, metrics on device): pulled one step late, so dispatch never waits
  t_last, tokens_since = time.perf_counter(), 0
  interrupted, restore_sigint = _defer_sigint()
  try:
    for s in range(start + 1, tc.steps + 1):
      if interrupted.is_set():
        raise KeyboardInterrupt
      batch = shard_batch(dataset.train_batch(tc.seed, s, tc.batch_size, tc.seq_len), mesh)
      state, metrics = step_fn(state, batch, frozen)
      tokens_since += tc.batch_size * tc.seq_len
      if pending is not None:
        _check_finite(float(pending[1]["loss"]), pending[0], workdir, last_saved)
      pending = (s, metrics)
      if s % tc.log_every == 0 or s == tc.steps:
        loss = float(metrics["loss"])
        _check_finite(loss, s, workdir, last_saved)
        now = time.perf_counter()
        row = {"train/loss": loss, "train/lr": float(lr_fn(s - 1)),
               "train/tokens_per_s": tokens_since / (now - t_last)}
        row.update({f"train/{k}": float(v) for k, v in metrics.items() if k != "loss"})
        row.update(sparsity.l0_stats(state.params, specs))
        log.write(s, row)
        bar.set_postfix(loss=f"{loss:.3f}")
        t_last, tokens_since = now, 0
      if s % tc.eval_every == 0 or s == tc.steps:
        t_eval = time.perf_counter()
        log.write(s, evaluator(state.params))
        t_last += time.perf_counter() - t_eval  # evaluation time is not training throughput
      if s % tc.ckpt_every == 0 or s in save_steps or s == tc.steps:
        # Never save a state that is not finite: a good checkpoint is never replaced by one.
        _check_finite(float(metrics["loss"]), s, workdir, last_saved)
        _check_finite(0.0 if _params_finite(state.params) else math.nan, s, workdir, last_saved,
                      what="a parameter")
        ckpt_lib.save(manager, s, state)
        last_saved = s
      bar.update(1)
  finally:
    bar.close()
    try:
      manager.wait_until_finished()  # raises a failed background save (e.g. disk full)
    finally:
      manager.close()
      log.close()
      restore_sigint()
  if interrupted.is_set():  # Ctrl-C during the last step or the final save: it is finished
    raise KeyboardInterrupt
  return state


def _defer_sigint() -> tuple[threading.Event, Callable[[], None]]:
  """(flag, restore): Ctrl-C only sets the flag, which the loop turns into KeyboardInterrupt
  between steps. Raised anywhere else, it could land inside orbax's background save or its
  asyncio loop and exit with a traceback (or status 1) instead of the one error line."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    return flag, lambda: None
  previous = signal.signal(signal.SIGINT, lambda *_: flag.set())
  return flag, lambda: signal.signal(signal.SIGINT, previous)


def validation_loss(params, cfg: Config, dataset) -> float:
  """The `val/loss` the training loop logs (the same fixed batches), for params it did not
  train: an imported model, whose run has no metrics.jsonl."""
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task_eval_pairs=0))
  return _Evaluator(cfg, dataset, make_mesh())(params)["val/loss"]


class _Evaluator:
  """Validation loss over fixed batches, plus held-out loss/accuracy of every task (so a user
  can watch each task being learned)."""

  def __init__(self, cfg: Config, dataset, mesh: Mesh):
    tc = cfg.train
    self.cfg = cfg
    self.batches = [shard_batch(b, mesh) for b in
                    dataset.val_batches(tc.eval_batches, tc.batch_size, tc.seq_len)]
    self.loss_fn = jax.jit(lambda p, b: model_lib.next_token_loss(p, b, cfg.model))
    self.taskset = None
    if tc.task_eval_pairs:
      self.taskset = tasks_lib.build_taskset(
          dataset.tokenizer, n_train=1, n_heldout=tc.task_eval_pairs, seed=tc.seed,
          max_len=min(128, cfg.model.block_size))

  def __call__(self, params) -> dict[str, float]:
    losses = [float(self.loss_fn(params, b)) for b in self.batches]
    out = {"val/loss": float(np.mean(losses))}
    if self.taskset is not None:
      out.update(tasks_lib.flatten_metrics(
          tasks_lib.evaluate_tasks(params, self.cfg.model, self.taskset)))
    return out
