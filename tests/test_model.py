"""Model tests: shapes, causality, AbsTopK, ablation and capture, config validation."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax import config as config_lib
from sparse_jax import model as model_lib


def _full_cfg(tiny_model_cfg):
  return dataclasses.replace(tiny_model_cfg, afrac=0.25, sink=True, learned_pos_emb=True)


def test_shapes_and_param_paths(tiny_model_cfg):
  cfg = _full_cfg(tiny_model_cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens_BxL = jnp.zeros((3, 7), jnp.int32)
  capture = tuple(model_lib.node_sites(cfg))
  logits, acts = jax.jit(lambda p, t: model_lib.forward(p, t, cfg, capture=capture))(
      params, tokens_BxL)
  chex.assert_shape(logits, (3, 7, cfg.vocab_size))
  for site, width in model_lib.node_sites(cfg).items():
    chex.assert_shape(acts[site], (3, 7, width))
  chex.assert_shape(params["blocks"]["1"]["attn"]["c_attn"]["w"], (32, 3 * 32))
  chex.assert_shape(params["blocks"]["0"]["attn"]["sink"], (2,))
  chex.assert_shape(params["bigram"], (64, 64))
  assert len(model_lib.node_sites(cfg)) == 8 * cfg.n_layer


def test_init_statistics():
  cfg = config_lib.ModelConfig(n_layer=4, d_model=128, n_head=8, d_mlp=512, vocab_size=256)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  assert abs(float(jnp.std(params["blocks"]["0"]["mlp"]["c_fc"]["w"])) - 0.02) < 1e-3
  proj_std = 0.02 / np.sqrt(2 * cfg.n_layer)
  assert abs(float(jnp.std(params["blocks"]["0"]["mlp"]["c_proj"]["w"])) - proj_std) < 1e-3
  assert float(jnp.abs(params["blocks"]["0"]["attn"]["c_attn"]["b"]).max()) == 0.0


@pytest.mark.parametrize("sink,rope,smear", [(False, False, False), (True, False, False),
                                              (False, True, False), (False, True, True)])
def test_causality(tiny_model_cfg, sink, rope, smear):
  """Changing a later token never changes an earlier logit (and does change its own)."""
  cfg = dataclasses.replace(_full_cfg(tiny_model_cfg), sink=sink, rope=rope, smear_keys=smear)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  fwd = jax.jit(lambda t: model_lib.forward(params, t, cfg))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
  for pos in (0, 5, 11):
    changed = tokens.at[:, pos].set((tokens[:, pos] + 1) % cfg.vocab_size)
    a, b = fwd(tokens), fwd(changed)
    np.testing.assert_array_equal(a[:, :pos], b[:, :pos])
    assert np.abs(np.asarray(a[:, pos] - b[:, pos])).max() > 0


@pytest.mark.parametrize("sink", [False, True])
def test_every_prefix_gives_the_same_logits(tiny_model_cfg, sink):
  """Attention runs in two causal halves split at L // 2, so each prefix length splits the
  queries elsewhere: the logits must not depend on where (nor on the length at all)."""
  cfg = dataclasses.replace(_full_cfg(tiny_model_cfg), sink=sink, rope=True)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(4))
  for block in params["blocks"].values():
    if sink:
      block["attn"]["sink"] = jnp.array([1.5, -0.5])
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 11), 0, cfg.vocab_size)
  fwd = jax.jit(lambda t: model_lib.forward(params, t, cfg))
  full = fwd(tokens)
  for length in (1, 3, 6):  # split at none, 1 and 3; the full 11 at 5
    np.testing.assert_allclose(fwd(tokens[:, :length]), full[:, :length], rtol=1e-5, atol=1e-6)


def test_causality_by_gradient(tiny_model_cfg):
  """d logit[t] / d input embedding[s] is zero for every s > t (and nonzero at s = t)."""
  cfg = _full_cfg(tiny_model_cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  tokens = jnp.arange(8)[None] + 3  # distinct tokens: row t of x_LxD is position t's input

  def logit_sums_L(x_LxD):
    p = dict(params, wte=params["wte"].at[tokens[0]].set(x_LxD))
    return model_lib.forward(p, tokens, cfg)[0].sum(-1)

  jac_LxLxD = jax.jit(jax.jacrev(logit_sums_L))(params["wte"][tokens[0]])
  upper_LxL = np.triu(np.ones((8, 8), bool), k=1)
  assert float(np.abs(np.asarray(jac_LxLxD)[upper_LxL]).max()) == 0.0
  assert (np.abs(np.asarray(jac_LxLxD)[np.eye(8, dtype=bool)]).max(-1) > 0).all()


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 40), frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_abs_topk_keeps_exactly_k(rows, width, frac, seed, ties):
  k = max(1, int(frac * width))
  x = np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)
  if ties:  # many equal magnitudes, including exact zeros
    x = np.round(x).astype(np.float32)
  out = np.asarray(model_lib.abs_topk(jnp.asarray(x), k))
  kept = out != 0
  expect = np.minimum(k, (x != 0).sum(-1))
  np.testing.assert_array_equal(kept.sum(-1), expect)
  np.testing.assert_array_equal(out[kept], x[kept])
  # Every kept |x| is >= every dropped |x| in its row.
  for r in range(rows):
    if kept[r].any() and (~kept[r]).any():
      assert np.abs(x[r][kept[r]]).min() >= np.abs(x[r][~kept[r]]).max()


def test_abs_topk_gradient_flows_to_kept_only():
  x = jnp.array([[3.0, -1.0, 0.5, -4.0]])
  g = jax.grad(lambda x: jnp.sum(model_lib.abs_topk(x, 2) * jnp.arange(1.0, 5.0)))(x)
  np.testing.assert_array_equal(g, [[1.0, 0.0, 0.0, 4.0]])


@pytest.mark.parametrize("block_elems", [None, 3 * 40, 40])
def test_abs_topk_blocked_keeps_k_largest_ties_to_lowest_index(monkeypatch, block_elems):
  """The CPU's row-blocked bisection (rows not a multiple of the block) and the all-rows one
  both keep exactly the first k of a stable sort by -|x|."""
  if block_elems is None:
    monkeypatch.setattr(model_lib, "rows_per_block", lambda width: None)
  else:
    monkeypatch.setattr(model_lib, "_CPU_BLOCK_ELEMS", block_elems)
    monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "cpu")
  rng = np.random.default_rng(0)
  x_BxLxC = np.round(2 * rng.normal(size=(7, 1, 40))).astype(np.float32)  # many ties, zeros
  x_BxLxC[0, 0, :] = np.float32(1.5)  # a row of equal magnitudes: keeps indices 0..k-1
  k = 10
  out = np.asarray(jax.jit(model_lib.abs_topk, static_argnums=1)(jnp.asarray(x_BxLxC), k))
  order = np.argsort(-np.abs(x_BxLxC), axis=-1, kind="stable")[..., :k]
  expect = np.zeros_like(x_BxLxC)
  np.put_along_axis(expect, order, np.take_along_axis(x_BxLxC, order, -1), -1)
  np.testing.assert_array_equal(out, expect)


@pytest.mark.parametrize("block_elems", [3 * 40, 2**14])
def test_abs_topk_under_nested_vmap_and_grad_matches_each_row(monkeypatch, block_elems):
  """vmap folds its batch into the blocked rows (custom_vmap): the same masks as one call per
  example, blocks split across examples included, and gradients still reach the kept entries."""
  monkeypatch.setattr(model_lib, "_CPU_BLOCK_ELEMS", block_elems)
  monkeypatch.setattr(model_lib.jax, "default_backend", lambda: "cpu")
  rng = np.random.default_rng(1)
  x_AxBxLxC = np.round(2 * rng.normal(size=(3, 2, 7, 40))).astype(np.float32)  # ties, zeros
  k = 10
  one = jax.jit(lambda x: model_lib.abs_topk(x, k))
  expect = np.stack([np.stack([np.asarray(one(jnp.asarray(x_AxBxLxC[a, b]))) for b in range(2)])
                     for a in range(3)])
  out = jax.jit(jax.vmap(jax.vmap(lambda x: model_lib.abs_topk(x, k))))(jnp.asarray(x_AxBxLxC))
  np.testing.assert_array_equal(np.asarray(out), expect)
  grad = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(model_lib.abs_topk(x, k) ** 2))))(
      jnp.asarray(x_AxBxLxC))
  np.testing.assert_array_equal(np.asarray(grad), 2 * expect)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_kth_largest_bits_stop_at_k_selects_the_same_set(rows, width, frac, seed, ties):
  """Stopping once count == k may return a smaller threshold, never a different top-k set;
  rows tied at their k-th value (never exactly k) get the full bisection's threshold."""
  k = int(frac * width)
  x = np.abs(np.random.default_rng(seed).normal(size=(rows, width))).astype(np.float32)
  if ties:  # many equal magnitudes, including exact zeros
    x = np.round(2 * x).astype(np.float32)
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x), jnp.int32)
  full = model_lib.kth_largest_bits(bits, k, jnp.float32)
  early = model_lib.kth_largest_bits(bits, k, jnp.float32, stop_at_k=True)
  np.testing.assert_array_equal(bits >= early, bits >= full)
  exact = np.sum(np.asarray(bits >= full), -1, keepdims=True) == k
  np.testing.assert_array_equal(np.where(exact, 0, early), np.where(exact, 0, full))
  assert np.all(np.asarray(early) <= np.asarray(full))


def test_next_token_loss_is_mean_cross_entropy(tiny_model_cfg):
  cfg = _full_cfg(tiny_model_cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(8))
  tokens = jax.random.randint(jax.random.PRNGKey(9), (3, 11), 0, cfg.vocab_size)
  # jitted: called eagerly, the AbsTopK blocks' lax.map compiles anew on every call
  logits = np.asarray(jax.jit(lambda t: model_lib.forward(params, t, cfg))(tokens[:, :-1]),
                      np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  expect = -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1).mean()
  loss = jax.jit(lambda p, t: model_lib.next_token_loss(p, t, cfg))(params, tokens)
  np.testing.assert_allclose(float(loss), expect, rtol=1e-6)


def test_all_ones_masks_reproduce_plain_forward_exactly(tiny_model_cfg):
  cfg = _full_cfg(tiny_model_cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(5))
  tokens = jax.random.randint(jax.random.PRNGKey(6), (3, 10), 0, cfg.vocab_size)
  key = jax.random.PRNGKey(7)
  ablation = {s: (jnp.ones(c), 10.0 * jax.random.normal(jax.random.fold_in(key, i), (c,)))
              for i, (s, c) in enumerate(model_lib.node_sites(cfg).items())}
  plain = jax.jit(lambda t: model_lib.forward(params, t, cfg))(tokens)
  masked = jax.jit(lambda t, a: model_lib.forward(params, t, cfg, ablation=a))(tokens, ablation)
  np.testing.assert_array_equal(plain, masked)


def test_zero_mask_sets_site_to_mean(tiny_model_cfg):
  cfg = tiny_model_cfg
  params = model_lib.init_params(cfg, jax.random.PRNGKey(8))
  tokens = jax.random.randint(jax.random.PRNGKey(9), (2, 6), 0, cfg.vocab_size)
  mean = jnp.arange(cfg.d_mlp, dtype=jnp.float32)
  mask = jnp.zeros(cfg.d_mlp).at[3].set(1.0)
  _, acts = model_lib.forward(params, tokens, cfg, ablation={"1.mlp.post_act": (mask, mean)},
                              capture=("1.mlp.post_act",))
  _, clean = model_lib.forward(params, tokens, cfg, capture=("1.mlp.post_act",))
  got = np.asarray(acts["1.mlp.post_act"])
  np.testing.assert_array_equal(got[..., 4:], np.broadcast_to(mean[4:], got[..., 4:].shape))
  np.testing.assert_array_equal(got[..., 3], np.asarray(clean["1.mlp.post_act"])[..., 3])


def test_positions_unembed_only_the_requested_positions(tiny_model_cfg):
  cfg = _full_cfg(tiny_model_cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(10))
  tokens = jax.random.randint(jax.random.PRNGKey(11), (3, 9), 0, cfg.vocab_size)
  positions_B = jnp.array([8, 0, 4])
  full = jax.jit(lambda t: model_lib.forward(params, t, cfg))(tokens)
  picked = jax.jit(lambda t, p: model_lib.forward(params, t, cfg, positions_B=p))(
      tokens, positions_B)
  chex.assert_shape(picked, (3, cfg.vocab_size))
  np.testing.assert_allclose(picked, full[jnp.arange(3), positions_B], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_layer,rope,smear", [(1, False, False), (2, False, False),
                                                (2, True, False), (2, True, True)])
def test_positions_with_ablation_match_the_full_forward(tiny_model_cfg, n_layer, rope, smear):
  """The last layer runs only at the read positions: logits and ablation as the full model's."""
  cfg = dataclasses.replace(_full_cfg(tiny_model_cfg), n_layer=n_layer, rope=rope,
                            smear_keys=smear)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(12))
  tokens = jax.random.randint(jax.random.PRNGKey(13), (4, 11), 0, cfg.vocab_size)
  positions_B = jnp.array([10, 0, 5, 7])
  keys = iter(jax.random.split(jax.random.PRNGKey(14), 32))
  ablation = {site: (jax.random.bernoulli(next(keys), 0.6, (c,)).astype(jnp.float32),
                     jax.random.normal(next(keys), (c,)))
              for site, c in model_lib.node_sites(cfg).items()}
  full = jax.jit(lambda t, a: model_lib.forward(params, t, cfg, ablation=a))(tokens, ablation)
  picked = jax.jit(lambda t, a, p: model_lib.forward(params, t, cfg, ablation=a, positions_B=p))(
      tokens, ablation, positions_B)
  want = full[jnp.arange(4), positions_B]
  assert float(jnp.max(jnp.abs(want - full[:, 3]))) > 1e-2  # the positions read do differ
  np.testing.assert_allclose(picked, want, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_the_offset():
  """q_t . k_s after rotation is a function of t - s; position 0 is no rotation."""
  q_1x1x2x8, k_1x1x2x8 = jax.random.normal(jax.random.PRNGKey(20), (2, 1, 1, 2, 8))
  rot = lambda x, pos: model_lib.rotary(x, jnp.array([[pos]]))
  score = lambda t, s: np.asarray(jnp.sum(rot(q_1x1x2x8, t) * rot(k_1x1x2x8, s), -1))
  np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
  np.testing.assert_allclose(score(5, 2), score(3, 0), rtol=1e-4)
  assert np.abs(score(5, 2) - score(5, 3)).max() > 1e-3  # the offset does matter
  np.testing.assert_array_equal(rot(q_1x1x2x8, 0), q_1x1x2x8)
  np.testing.assert_allclose(jnp.linalg.norm(rot(q_1x1x2x8, 7), axis=-1),
                             jnp.linalg.norm(q_1x1x2x8, axis=-1), rtol=1e-5)


def test_rotary_model_sees_order_that_a_plain_one_cannot(tiny_model_cfg):
  """Without positions a 1-layer model's last logit ignores the order of earlier tokens (its
  keys and values are per token, its softmax is over a set); with rope it does not."""
  tokens = jnp.array([[3, 7, 9, 5]])
  swapped = jnp.array([[7, 3, 9, 5]])
  for rope, differs in ((False, False), (True, True)):
    cfg = dataclasses.replace(tiny_model_cfg, n_layer=1, rope=rope)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(21))
    params = jax.tree.map(lambda x: 20 * x if x.ndim == 2 else x, params)  # sharper attention
    gap = jnp.abs(model_lib.forward(params, tokens, cfg)[0, -1]
                  - model_lib.forward(params, swapped, cfg)[0, -1]).max()
    assert (float(gap) > 1e-3) == differs, (rope, float(gap))


def test_fully_smeared_keys_are_the_previous_positions_keys(tiny_model_cfg):
  """With a = 1 a query at t scores the key computed at t - 1: a 1-layer model's last logit
  then depends on the token before each value, and at a = 0 it is the plain model's."""
  cfg = dataclasses.replace(tiny_model_cfg, n_layer=1, smear_keys=True)
  plain = dataclasses.replace(cfg, smear_keys=False)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(22))
  params = jax.tree.map(lambda x: 20 * x if x.ndim == 2 else x, params)
  set_smear = lambda logit: {**params, "blocks": {"0": {**params["blocks"]["0"], "attn": {
      **params["blocks"]["0"]["attn"], "smear": jnp.full(cfg.n_head, logit)}}}}
  tokens = jnp.array([[3, 7, 9, 5]])
  off = model_lib.forward(set_smear(-1e4), tokens, cfg)
  no_smear = {**params, "blocks": {"0": {**params["blocks"]["0"], "attn": {
      k: v for k, v in params["blocks"]["0"]["attn"].items() if k != "smear"}}}}
  np.testing.assert_allclose(off, model_lib.forward(no_smear, tokens, plain), atol=1e-6)
  # Keys at a = 1 are those of the previous tokens [3, 3, 7, 9]; values stay [3, 7, 9, 5].
  # Order now matters to the last logit, which a plain 1-layer model cannot see (above).
  full = lambda t: model_lib.forward(set_smear(1e4), t, cfg)[0, -1]
  assert float(jnp.abs(full(tokens) - full(jnp.array([[7, 3, 9, 5]]))).max()) > 1e-3


def test_unknown_site_is_an_error(tiny_model_cfg):
  params = model_lib.init_params(tiny_model_cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="unknown node site"):
    model_lib.forward(params, jnp.zeros((1, 3), jnp.int32), tiny_model_cfg, capture=("0.attn.y",))


def test_bigram_table_adds_row_of_current_token(tiny_model_cfg):
  cfg = tiny_model_cfg
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.array([[5, 9, 2]])
  bumped = dict(params, bigram=params["bigram"].at[9, 11].add(3.0))
  diff = model_lib.forward(bumped, tokens, cfg) - model_lib.forward(params, tokens, cfg)
  np.testing.assert_allclose(diff[0, 1, 11], 3.0, rtol=1e-5)
  assert float(jnp.abs(diff.at[0, 1, 11].set(0.0)).max()) < 1e-5


@pytest.mark.parametrize("field,value,match", [
    ("n_layer", 0, "model.n_layer"),
    ("d_model", -8, "model.d_model"),
    ("d_model", 31, "not a multiple of n_head"),
    ("afrac", 1.5, "model.afrac"),
    ("afrac", 0.0, "model.afrac"),
    ("afrac_loctypes", ("attn_in", "resid"), "unknown loctype 'resid'"),
    ("activation_type", "swish", "model.activation_type"),
    ("matmul_dtype", "float16", "model.matmul_dtype: must be 'float32' or 'bfloat16'"),
])
def test_invalid_model_configs(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.ModelConfig(n_head=2, **{field: value})


def test_rope_needs_an_even_head_width():
  with pytest.raises(ValueError, match="model.rope: needs an even d_head"):
    config_lib.ModelConfig(n_head=2, d_head=7, rope=True)


@pytest.mark.parametrize("section,kwargs,match", [
    (config_lib.SparsityConfig, {"weight_density": 0.0}, "sparsity.weight_density"),
    (config_lib.SparsityConfig, {"embed_density": 1.2}, "sparsity.embed_density"),
    (config_lib.SparsityConfig, {"anneal_start_frac": 0.6, "anneal_end_frac": 0.5},
     "sparsity.anneal_end_frac"),
    (config_lib.OptimConfig, {"lr": -1.0}, "optim.lr"),
    (config_lib.TrainConfig, {"batch_size": 0}, "train.batch_size"),
    (config_lib.CircuitConfig, {"target_loss": 0.0}, "circuit.target_loss"),
    (config_lib.CircuitConfig, {"n_select_pairs": 0}, "circuit.n_select_pairs"),
    (config_lib.CircuitConfig, {"calibrate": "yes"}, "circuit.calibrate"),
    (config_lib.CircuitConfig, {"select_margin_se": -1.0}, "circuit.select_margin_se"),
    (config_lib.CircuitConfig, {"select_margin_se": math.inf}, "circuit.select_margin_se"),
    (config_lib.CircuitConfig, {"eval_length_groups": 0}, "circuit.eval_length_groups"),
    (config_lib.CircuitConfig, {"train_length_strata": 3},
     "circuit.train_length_strata.*must divide circuit.batch_size=32"),
    (config_lib.CircuitConfig, {"train_length_strata": 4, "n_train_pairs": 30},
     "circuit.train_length_strata.*must divide circuit.n_train_pairs=30"),
])
def test_invalid_section_configs(section, kwargs, match):
  with pytest.raises(ValueError, match=match):
    section(**kwargs)


def test_config_json_round_trip_and_overrides():
  cfg = config_lib.apply_overrides(config_lib.Config(), [
      "model.d_model=128", "model.afrac=1/8", "model.afrac_loctypes=attn_in,mlp_in",
      "sparsity.enabled=false", "circuit.k_coef_grid=1e-4,1e-3"])
  assert cfg.model.d_model == 128 and cfg.model.afrac == 0.125
  assert cfg.model.afrac_loctypes == ("attn_in", "mlp_in") and not cfg.sparsity.enabled
  assert config_lib.Config.from_json(cfg.to_json()) == cfg
  hash(cfg)  # usable as a static jit argument
  assert config_lib.diff_configs(config_lib.Config(), cfg)[0].startswith("model.d_model: 64 -> 128")
  with pytest.raises(ValueError, match="model.nope"):
    config_lib.apply_overrides(cfg, ["model.nope=1"])
  with pytest.raises(ValueError, match="train.seq_len"):
    config_lib.apply_overrides(cfg, ["train.seq_len=4096"])
  with pytest.raises(ValueError, match="unknown config section"):
    config_lib.Config.from_dict({"modle": {}})
