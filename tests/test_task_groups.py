"""Circuit search in length groups (`task_groups`, `scoring.Evaluator(n_groups=...)`): pairs
sorted and cut by length keep every real token, and candidates scored group by group give
the same logit differences as the plain forward over all columns."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import masks, scoring, task_groups
from sparse_jax import model as model_lib
from sparse_jax.tasks import TaskArrays, pair_logit_diff


def ragged_tasks(cfg, T=3, P=10, L=24, seed=0) -> TaskArrays:
  """T tasks of P random pairs, each sequence 3..L tokens long and right-padded to L; every
  third pair is an "X vs not-X" pair."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.vocab_size, (T, P, 2, L)).astype(np.int32)
  last = rng.integers(2, L, (T, P, 2)).astype(np.int32)
  tokens[np.arange(L) > last[..., None]] = 0
  tok, alt = rng.integers(0, cfg.vocab_size, (2, T, P)).astype(np.int32)
  vs_rest = np.arange(P)[None].repeat(T, 0) % 3 == 0
  return TaskArrays(jnp.asarray(tokens), jnp.asarray(last), jnp.asarray(tok),
                    jnp.asarray(np.where(vs_rest, tok, alt)), jnp.asarray(vs_rest))


def test_length_groups_drop_only_padding(tiny_model_cfg):
  arrays = ragged_tasks(tiny_model_cfg)
  groups, order_TxP = task_groups.length_groups(arrays, 4)
  assert [g.tok_P.shape for g in groups] == [(3, 2), (3, 3), (3, 3), (3, 2)]
  longest = np.asarray(arrays.last_Px2).max(-1)  # T x P
  for t in range(3):  # each task's pairs sorted by length; every pair in exactly one group
    assert sorted(order_TxP[t]) == list(range(10))
    assert np.all(np.diff(longest[t, order_TxP[t]]) >= 0)
  lengths = [g.tokens_Px2xL.shape[-1] for g in groups]
  assert lengths == [int(np.asarray(g.last_Px2).max()) + 1 for g in groups]
  assert lengths == sorted(lengths) and lengths[0] < 24
  # Regrouped pairs hold the same tokens (up to their group's length) as the originals.
  for g, lo, L in zip(groups, (0, 2, 5, 8), lengths):
    for t in range(3):
      for j in range(g.tok_P.shape[1]):
        p = order_TxP[t, lo + j]
        np.testing.assert_array_equal(g.tokens_Px2xL[t, j], arrays.tokens_Px2xL[t, p, :, :L])
        np.testing.assert_array_equal(g.last_Px2[t, j], arrays.last_Px2[t, p])
        assert (g.tok_P[t, j], g.alt_P[t, j], g.vs_rest_P[t, j]) == (
            arrays.tok_P[t, p], arrays.alt_P[t, p], arrays.vs_rest_P[t, p])
  d = np.arange(30.0).reshape(1, 10, 3)
  np.testing.assert_array_equal(
      task_groups.ungroup(d[:, order_TxP[1]], order_TxP[1][None]), d)


def test_evaluator_by_length_groups_matches_the_plain_forward(tiny_model_cfg):
  """Candidates scored in length groups give each pair's d, in the split's order, as the
  unablated forward over all columns does."""
  cfg = dataclasses.replace(tiny_model_cfg, afrac=0.25)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  arrays = ragged_tasks(cfg)
  means = {site: jax.random.normal(jax.random.PRNGKey(1), (w,))
           for site, w in model_lib.node_sites(cfg).items()}
  N = masks.n_nodes(cfg)
  rank_UxN = np.stack([np.random.default_rng(u).permutation(N) for u in range(4)])
  task_U = np.array([0, 1, 2, 1])
  unit_C, k_C, invert_C = np.array([0, 1, 2, 3, 3, 2]), np.array([N, 5, 40, 0, 17, N // 2]), \
      np.array([False, False, True, False, True, False])
  # One compiled reference for all candidates (every task has the same shapes); called
  # eagerly, each candidate recompiled the AbsTopK forward (~7 s apiece).
  plain = jax.jit(lambda keep_N, one: pair_logit_diff(
      params, cfg, one, ablation=masks.node_ablation(keep_N, means, cfg)))
  want = []
  for u, k, inv in zip(unit_C, k_C, invert_C):
    keep_N = (rank_UxN[u] < k) != inv
    one = jax.tree.map(lambda x: x[task_U[u]], arrays)
    want.append(plain(jnp.asarray(keep_N, jnp.float32), one))
  for n_groups in (1, 4):
    ev = scoring.Evaluator(params, cfg, {"s": arrays}, means, max_seqs=40, lbfgs_steps=4,
                           n_groups=n_groups)
    ev.set_ranks(rank_UxN, task_U)
    np.testing.assert_allclose(ev.d("s", unit_C, k_C, invert_C), np.stack(want), rtol=1e-5,
                               atol=1e-5)


def test_evaluator_rank_tables_up_to_max_units_share_one_program(tiny_model_cfg):
  """Rank tables of different unit counts, padded to max_units, give the unpadded scores and
  compile the evaluation once; more units than max_units is an error."""
  cfg = tiny_model_cfg
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  arrays = ragged_tasks(cfg, T=2, P=6)
  means = {site: jax.random.normal(jax.random.PRNGKey(1), (w,))
           for site, w in model_lib.node_sites(cfg).items()}
  N = masks.n_nodes(cfg)
  rank_UxN = np.stack([np.random.default_rng(u).permutation(N) for u in range(4)])
  unit_C, k_C = np.array([0, 1, 1, 0]), np.array([3, N // 2, 7, N])
  plain = scoring.Evaluator(params, cfg, {"s": arrays}, means, max_seqs=24, lbfgs_steps=4)
  padded = scoring.Evaluator(params, cfg, {"s": arrays}, means, max_seqs=24, lbfgs_steps=4,
                             max_units=4)
  tables = ((rank_UxN[:2], np.array([0, 1])), (rank_UxN, np.array([1, 0, 0, 1])))
  got, new_programs = [], []
  for rank, task_U in tables:
    before = scoring._circuit_d._cache_size()
    padded.set_ranks(rank, task_U)
    got.append(padded.d("s", unit_C, k_C))
    new_programs.append(scoring._circuit_d._cache_size() - before)
  assert new_programs[1] == 0  # 4 rows after 2: the same program (unpadded, it recompiles)
  for (rank, task_U), d in zip(tables, got):
    plain.set_ranks(rank, task_U)
    np.testing.assert_array_equal(d, plain.d("s", unit_C, k_C))
  with np.testing.assert_raises_regex(ValueError, "5 units, over max_units=4"):
    padded.set_ranks(np.zeros((5, N)), np.zeros(5))
