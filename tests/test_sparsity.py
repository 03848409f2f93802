"""Optimiser tests: exact L0 after every step, per-neuron minimum, regrowth, schedules."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax import config as config_lib
from sparse_jax import model as model_lib
from sparse_jax import sparsity


def _tree(rng, d, f, v):
  """A params-like tree exercising every sparsity group."""
  n = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32) * 0.02)
  return {"wte": n(v, d), "blocks": {"0": {
      "ln_1": {"scale": jnp.ones(d)},
      "mlp": {"c_fc": {"w": n(d, f), "b": jnp.zeros(f)}, "c_proj": {"w": n(f, d), "b": n(d)}},
      "attn": {"c_attn": {"w": n(d, 3 * f), "b": n(3 * f)}, "sink": jnp.zeros(2)}}},
      "bigram": n(v, v)}


def _nonzeros(params):
  return {sparsity.path_str(p): int(jnp.count_nonzero(x))
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@settings(max_examples=6, deadline=None)
@given(d=st.integers(6, 24), f=st.integers(4, 40), v=st.integers(5, 30),
       wd=st.floats(0.05, 1.0), ed=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_exact_scheduled_l0_after_every_step(d, f, v, wd, ed, seed):
  rng = np.random.default_rng(seed)
  params = _tree(rng, d, f, v)
  total = 12
  cfg = config_lib.Config(sparsity=config_lib.SparsityConfig(
      weight_density=wd, embed_density=ed, anneal_start_frac=0.1, anneal_end_frac=0.6))
  try:
    opt = sparsity.make_optimizer(cfg, params, total)
  except ValueError as e:  # this density cannot keep 4 weights in every neuron
    assert str(e).startswith("sparsity.min_per_neuron: blocks/0/")
    cfg = dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, min_per_neuron=0))
    opt = sparsity.make_optimizer(cfg, params, total)
  specs = sparsity.leaf_specs(params, cfg.sparsity)
  state = opt.init(params)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(
      *opt.update(g, s, p)))
  for i in range(total):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    params, state = step(params, state, grads)
    counts = _nonzeros(params)
    for name, spec in specs.items():
      if spec.sparsified:
        assert counts[name] == int(sparsity.scheduled_k(spec, i, total, cfg.sparsity)), (i, name)
      else:
        assert spec.path in ("blocks/0/ln_1/scale", "blocks/0/attn/sink", "bigram")
    # Per-neuron minimum, wherever the budget allows it.
    for name, axis in (("blocks/0/mlp/c_fc/w", 0), ("blocks/0/mlp/c_proj/w", 1),
                       ("blocks/0/attn/c_attn/w", 0)):
      w = np.asarray(_get(params, name))
      k = int(sparsity.scheduled_k(specs[name], i, total, cfg.sparsity))
      need = min(cfg.sparsity.min_per_neuron, w.shape[axis])
      if need:
        assert k >= need * w.shape[1 - axis]  # feasible wherever it is configured
        assert ((w != 0).sum(axis) >= need).all(), (i, name)
  assert step._cache_size() == 1  # annealing k is traced: no recompilation
  # The schedule ends at the configured target.
  for name, spec in specs.items():
    if spec.sparsified:
      assert counts[name] == spec.final_k


def _get(tree, name):
  for key in name.split("/"):
    tree = tree[key]
  return tree


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 30), cols=st.integers(1, 30), frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 1000), ties=st.booleans(), axis=st.sampled_from([None, 0, 1]))
def test_topk_keep_mask(rows, cols, frac, seed, ties, axis):
  w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
  if ties:
    w = np.round(w * 2).astype(np.float32)  # many equal magnitudes and exact zeros
  k = max(1, int(frac * w.size))
  keep = np.asarray(sparsity.topk_keep_mask(jnp.asarray(w), jnp.int32(k), axis, 4))
  assert keep.sum() == k
  if axis is None:
    assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max(initial=0.0)
    # Ties go to the lowest flat index.
    t = np.abs(w[keep]).min()
    tied = np.flatnonzero(np.abs(w).ravel() == t)
    n_tied_kept = keep.ravel()[tied].sum()
    assert keep.ravel()[tied[:n_tied_kept]].all()
  elif k >= min(4, w.shape[1 - axis]) * w.shape[axis]:
    assert (keep.sum(1 - axis) >= min(4, w.shape[1 - axis])).all()


def test_pruned_weights_regrow():
  """Adam moments stay dense, so a pruned weight whose gradient keeps asking comes back."""
  params = {"wte": jnp.array([[1.0, 0.9, 0.0, 0.0]])}
  target = jnp.array([[0.0, 0.0, 1.0, 1.0]])  # loss 0.5 * |w - target|^2
  cfg = config_lib.Config(
      sparsity=config_lib.SparsityConfig(embed_density=0.5, anneal_start_frac=0.0,
                                         anneal_end_frac=0.0),
      optim=config_lib.OptimConfig(lr=0.1, weight_decay=0.0, warmup_frac=0.0, sharkfin=False,
                                   grad_rms_normalize=False))
  opt = sparsity.make_optimizer(cfg, params, 100)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update({"wte": params["wte"] - target}, state, params)
    return optax.apply_updates(params, updates), state

  history = []
  for _ in range(40):
    params, state = step(params, state)
    history.append(np.asarray(params["wte"][0]) != 0)
  np.testing.assert_array_equal(history[0], [True] * 4)  # the first step is still dense
  np.testing.assert_array_equal(history[1], [True, True, False, False])
  np.testing.assert_array_equal(history[-1], [False, False, True, True])
  assert all(h.sum() == 2 for h in history[1:])


def test_learning_rate_schedule_and_sharkfin():
  params = {"wte": jnp.zeros((10, 10))}
  total = 200
  scfg = config_lib.SparsityConfig(embed_density=0.25, anneal_start_frac=0.01,
                                   anneal_end_frac=0.5)
  ocfg = config_lib.OptimConfig(lr=1.0, warmup_frac=0.01, sharkfin_l0="all")
  specs = sparsity.leaf_specs(params, scfg)
  lr = sparsity.learning_rate_fn(ocfg, scfg, specs, total)
  # Warmup over 2 steps, sharkfin sqrt(25/100) = 0.5 while still dense.
  np.testing.assert_allclose(lr(0), 0.5 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(lr(1), 1.0 * 0.5, rtol=1e-6)
  # At the end of the anneal (step 100): L0 final, multiplier 1, linear decay.
  np.testing.assert_allclose(lr(100), 1.0 - (100 - 2) / (200 - 2), rtol=1e-5)
  assert float(lr(total)) == 0.0
  dense = sparsity.learning_rate_fn(ocfg, dataclasses.replace(scfg, enabled=False),
                                    sparsity.leaf_specs(params, dataclasses.replace(
                                        scfg, enabled=False)), total)
  np.testing.assert_allclose(dense(1), 1.0, rtol=1e-6)


def test_grad_rms_normalised_to_one():
  t = sparsity.normalize_grad_rms()
  g = {"a": 7.0 * jnp.ones((3, 4)), "b": jnp.arange(5.0)}
  out, _ = t.update(g, t.init(g))
  leaves = jax.tree.leaves(out)
  rms = np.sqrt(sum(float(jnp.sum(x**2)) for x in leaves) / sum(x.size for x in leaves))
  np.testing.assert_allclose(rms, 1.0, rtol=1e-4)


def test_sharkfin_counts_weight_matrices_only_by_default():
  """The authors' factor is sqrt(pfrac / this_pfrac): weight-matrix L0 only."""
  params = {"wte": jnp.zeros((10, 10)), "blocks": {"0": {"mlp": {"c_fc": {"w": jnp.zeros((8, 20))}}}}}
  total = 200
  scfg = config_lib.SparsityConfig(weight_density=0.5, embed_density=0.25)
  specs = sparsity.leaf_specs(params, scfg)
  base = lambda step: 1.0 - (step - 2) / (200 - 2)  # warmup 2 steps, then linear decay
  matrix = sparsity.learning_rate_fn(config_lib.OptimConfig(lr=1.0), scfg, specs, total)
  every = sparsity.learning_rate_fn(config_lib.OptimConfig(lr=1.0, sharkfin_l0="all"), scfg,
                                    specs, total)
  # Step 51 is half-way through the anneal (steps 2..100): c_fc holds 160 - 40 = 120 of its
  # final 80, wte 100 - floor(37.5) = 63 of its final 25.
  np.testing.assert_allclose(matrix(51), base(51) * np.sqrt(80 / 120), rtol=1e-6)
  np.testing.assert_allclose(every(51), base(51) * np.sqrt((80 + 25) / (120 + 63)), rtol=1e-6)
  np.testing.assert_allclose(matrix(2), base(2) * np.sqrt(80 / 160), rtol=1e-6)
  np.testing.assert_allclose(matrix(100), base(100), rtol=1e-6)
  with pytest.raises(ValueError, match="optim.sharkfin_l0: must be 'matrix' or 'all'"):
    config_lib.OptimConfig(sharkfin_l0="embed")


def test_weight_decay_on_matrices_and_embeddings_not_biases():
  rng = np.random.default_rng(0)
  params = _tree(rng, 8, 8, 6)
  for decay_biases in (False, True):
    cfg = config_lib.Config(sparsity=config_lib.SparsityConfig(enabled=False),
                            optim=config_lib.OptimConfig(warmup_frac=0.0,
                                                         decay_biases=decay_biases))
    opt = sparsity.make_optimizer(cfg, params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("blocks/0/ln_1/scale", "bigram", "blocks/0/attn/sink"):
      np.testing.assert_array_equal(_get(new, name), _get(params, name))
    for name in ("wte", "blocks/0/mlp/c_fc/w", "blocks/0/mlp/c_proj/b"):
      shrunk = np.asarray(_get(new, name)) / np.asarray(_get(params, name))
      factor = 1.0 if name.endswith("/b") and not decay_biases else 1.0 - 0.1 * cfg.optim.lr
      np.testing.assert_allclose(shrunk, factor, rtol=1e-5, err_msg=name)
    assert all(v == _nonzeros(params)[k] for k, v in _nonzeros(new).items())  # no pruning


def test_infeasible_neuron_minimum_is_an_error_naming_the_matrix():
  params = {"blocks": {"0": {"mlp": {"c_fc": {"w": jnp.zeros((16, 32))}}}}}
  # 4 of each column's 16 inputs, for 32 neurons: at least 128 of 512 nonzeros (1/4).
  assert sparsity.leaf_specs(params, config_lib.SparsityConfig(weight_density=0.25))
  with pytest.raises(ValueError, match=r"sparsity.min_per_neuron: blocks/0/mlp/c_fc/w "
                     r"\(16, 32\) keeps 127 nonzeros .* min_per_neuron=4 x 32 neurons = 128"):
    sparsity.leaf_specs(params, config_lib.SparsityConfig(weight_density=127 / 512))
  assert sparsity.leaf_specs(params, config_lib.SparsityConfig(weight_density=127 / 512,
                                                               min_per_neuron=3))
  # Dense runs and disabled minimums are never refused.
  assert sparsity.leaf_specs(params, config_lib.SparsityConfig(weight_density=0.01,
                                                               enabled=False))


def test_every_model_param_matches_a_rule():
  cfg = config_lib.ModelConfig(n_layer=2, n_head=2, sink=True, learned_pos_emb=True,
                               smear_keys=True, vocab_size=32, block_size=16)
  params = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  specs = sparsity.leaf_specs(params, config_lib.SparsityConfig())
  groups = {n: s.sparsified for n, s in specs.items()}
  assert groups["wpe"] and groups["lm_head/w"] and groups["blocks/1/mlp/c_fc/b"]
  assert not groups["bigram"] and not groups["ln_f/scale"] and not groups["blocks/0/attn/sink"]
  assert not groups["blocks/1/attn/smear"]
  assert specs["blocks/0/attn/c_proj/w"].neuron_axis == 0
  no_bias = sparsity.leaf_specs(params, config_lib.SparsityConfig(sparsify_biases=False))
  assert not no_bias["blocks/1/mlp/c_fc/b"].sparsified
  with pytest.raises(ValueError, match="matches no sparsity rule"):
    sparsity.leaf_specs({"mystery": jnp.zeros(3)}, config_lib.SparsityConfig())


def test_l0_stats():
  params = {"wte": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "bigram": jnp.ones((2, 2)),
            "blocks": {"0": {"mlp": {"c_fc": {"b": jnp.array([0.0, 3.0, 0.0])}}}}}
  specs = sparsity.leaf_specs(params, config_lib.SparsityConfig(embed_density=0.5))
  stats = sparsity.l0_stats(params, specs)
  chex.assert_trees_all_equal(stats, {
      "sparsity/l0/wte": 2, "sparsity/l0/blocks/0/mlp/c_fc/b": 1,
      "sparsity/l0_group/embed": 2, "sparsity/l0_group/bias": 1,
      "sparsity/l0_group/dense": 4, "sparsity/l0_total": 7, "sparsity/params_total": 11})
