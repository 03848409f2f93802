"""Binary next-token tasks as stacked arrays, and the paper's contrast loss (PAPER.md §3).

A task is many minimally different pairs (A, B): A should continue with `tok`, B with `alt`.
Loss, exactly as the authors' `last_token_contrast_loss_fn` (two-sided): at each sequence's
last real position take a softmax over only {tok, alt}; a pair costs
-[log p(tok | A) + log p(alt | B)]. We report the per-*sequence* mean (half the pair sum,
the authors' stored numbers are the sum), so 0.15 means each side has p(correct) ~ 0.86.

Arrays (one task): tokens_Px2xL (P pairs, side 0 = A, side 1 = B, right-padded with 0),
last_Px2 (index of each sequence's last real token), tok_P and alt_P (candidate ids).
Causal attention never sees the right padding, so reading logits at `last` is exact.
A `TaskSet` stacks T tasks with a leading task axis, ready for `jax.vmap`.

(Being filled in: candidate resolution, building a TaskSet from generators, user task files.)
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from sparse_jax import model as model_lib
from sparse_jax.config import ModelConfig


@flax.struct.dataclass
class TaskArrays:
  """Pairs of one task (leading axes P...), or of T stacked tasks (leading axes T, P...)."""

  tokens_Px2xL: jax.Array  # int32
  last_Px2: jax.Array  # int32, position of the last real token of each sequence
  tok_P: jax.Array  # int32, the token side A should predict
  alt_P: jax.Array  # int32, the token side B should predict


@dataclasses.dataclass(frozen=True)
class TaskSet:
  """T tasks stacked for vmap, with train and held-out pairs."""

  names: tuple[str, ...]
  train: TaskArrays  # arrays with a leading T axis
  heldout: TaskArrays
  unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> reason


def logit_diff(logits_SxLxV: jax.Array, last_S: jax.Array, tok_S: jax.Array,
               alt_S: jax.Array) -> jax.Array:
  """logit[tok] - logit[alt] at each sequence's last real position: d_S."""
  at_last_SxV = jnp.take_along_axis(logits_SxLxV, last_S[:, None, None], axis=1)[:, 0]
  pick = lambda ids_S: jnp.take_along_axis(at_last_SxV, ids_S[:, None], axis=1)[:, 0]
  return pick(tok_S) - pick(alt_S)


def contrast_loss(d_Px2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, accuracy), both per-sequence means, from tok-minus-alt logit differences.

  Side A wants tok (d > 0), side B wants alt (d < 0); in the two-way softmax
  log p(tok | A) = log_sigmoid(d_A) and log p(alt | B) = log_sigmoid(-d_B).
  """
  signed_Px2 = d_Px2 * jnp.array([1.0, -1.0])
  loss = -jnp.mean(jax.nn.log_sigmoid(signed_Px2))
  acc = jnp.mean((signed_Px2 > 0).astype(jnp.float32))
  return loss, acc


def pair_logit_diff(params, cfg: ModelConfig, arrays: TaskArrays, *, ablation=None):
  """d_Px2 for one task's pairs (optionally with node ablation)."""
  P, _, L = arrays.tokens_Px2xL.shape
  logits_SxLxV = model_lib.forward(params, arrays.tokens_Px2xL.reshape(P * 2, L), cfg,
                                   ablation=ablation)
  tok_S = jnp.repeat(arrays.tok_P, 2)
  alt_S = jnp.repeat(arrays.alt_P, 2)
  return logit_diff(logits_SxLxV, arrays.last_Px2.reshape(-1), tok_S, alt_S).reshape(P, 2)


def task_metrics(params, cfg: ModelConfig, arrays: TaskArrays, *, ablation=None):
  """(loss, accuracy) of one task."""
  return contrast_loss(pair_logit_diff(params, cfg, arrays, ablation=ablation))
