"""Task pairs regrouped by length, so short pairs are not padded to the longest (circuit search).

`tasks.build_taskset` pads every pair of every task to the longest sequence of all of them;
on the 20 tasks only ~38% of those positions are real tokens. `length_groups` sorts each
task's pairs by length and cuts them into groups that each keep only the columns they need
(`scoring.Evaluator` scores candidates over such groups, `masks.train_masks` draws its
minibatches from them as strata); `ungroup` puts per-pair results back in the pairs' order.
"""

from __future__ import annotations

import jax
import numpy as np

from sparse_jax.tasks import TaskArrays


def length_groups(arrays: TaskArrays, n: int) -> tuple[tuple[TaskArrays, ...], np.ndarray]:
  """Stacked tasks' pairs regrouped by length, so short pairs are not padded to the longest.

  Each task's pairs are sorted by their longer side (stable), then cut into n contiguous
  groups of (near-)equal size, the same cut for every task; group g keeps only the columns up
  to its longest sequence over all tasks. Exact: pairs are right-padded and attention is
  causal, so the logits at a sequence's last real token never see the columns dropped.

  Args:
    arrays: T stacked tasks (leading axes T, P).
    n: number of groups (at most P are made).

  Returns:
    (groups, order_TxP): groups[g] has leading axes (T, P_g), the P_g summing to P;
    order_TxP[t, j] is the original index of task t's j-th pair in group order.
  """
  host = jax.tree.map(np.asarray, arrays)
  T, P = host.tok_P.shape
  order_TxP = np.argsort(host.last_Px2.max(axis=-1), axis=1, kind="stable")
  ordered = jax.tree.map(
      lambda x: np.take_along_axis(x, order_TxP.reshape(T, P, *[1] * (x.ndim - 2)), axis=1),
      host)
  bounds = np.unique(np.linspace(0, P, min(n, P) + 1).round().astype(int))
  groups = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    group = jax.tree.map(lambda x, lo=lo, hi=hi: x[:, lo:hi], ordered)
    L = int(group.last_Px2.max()) + 1
    groups.append(group.replace(tokens_Px2xL=group.tokens_Px2xL[..., :L]))
  return tuple(groups), order_TxP


def pad_columns(arrays: TaskArrays, L: int) -> TaskArrays:
  """Right-pads the sequences to L columns with 0 (exact, as the padding of `_stack`)."""
  tokens = np.asarray(arrays.tokens_Px2xL)
  pad = [(0, 0)] * (tokens.ndim - 1) + [(0, L - tokens.shape[-1])]
  return arrays.replace(tokens_Px2xL=np.pad(tokens, pad))


def ungroup(d_CxPxK: np.ndarray, order_CxP: np.ndarray) -> np.ndarray:
  """Per-pair results in group order (axis 1) back in the pairs' original order."""
  out = np.empty_like(d_CxPxK)
  np.put_along_axis(out, order_CxP.reshape(*order_CxP.shape, *[1] * (d_CxPxK.ndim - 2)),
                    d_CxPxK, axis=1)
  return out
