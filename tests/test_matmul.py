"""bf16 weight matmuls: rounded operands, float32 accumulation, forward and backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import model as model_lib
from sparse_jax.matmul import matmul


def _rounded64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _operands(lead=(2, 3)):
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(kx, (*lead, 40)), jax.random.normal(kw, (40, 24)),
          jax.random.normal(kg, (*lead, 24)))


def test_float32_is_the_plain_product():
  x, w, _ = _operands()
  np.testing.assert_array_equal(matmul(x, w), x @ w)


# 6 rows take the weight gradient's two-block form, 3 rows the plain one (matmul._bwd).
@pytest.mark.parametrize("lead", [(2, 3), (3,)])
def test_bfloat16_forward_and_both_grads_are_f32_sums_of_rounded_operands(lead):
  x, w, g = _operands(lead)
  y, vjp = jax.vjp(lambda x, w: matmul(x, w, "bfloat16"), x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.float32
  x64, w64, g64 = _rounded64(x), _rounded64(w), _rounded64(g)
  # Products of bf16 values are exact in f32, so only the f32 summation order differs.
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, x64.reshape(-1, 40).T @ g64.reshape(-1, 24),
                             rtol=1e-5, atol=1e-5)
  # ... and the rounding did happen: the plain f32 product is ~2^-9 relative away.
  err = np.abs(np.asarray(y) - np.asarray(x @ w)).max() / np.abs(np.asarray(x @ w)).max()
  assert 1e-4 < err < 2e-2


def test_bfloat16_under_vmap_matches_each_row():
  x, w, _ = _operands()
  rows = jax.vmap(lambda x: matmul(x, w, "bfloat16"))(x)
  np.testing.assert_allclose(rows, _rounded64(x) @ _rounded64(w), rtol=1e-5, atol=1e-5)


def test_unknown_matmul_dtype_is_an_error():
  x, w, _ = _operands()
  with pytest.raises(ValueError, match="matmul dtype must be one of"):
    matmul(x, w, "float16")


def test_bfloat16_model_tracks_the_float32_model(tiny_model_cfg):
  # Without AbsTopK: its top-k choice is discontinuous, and bf16 rounding flips which
  # near-threshold activations are kept (gradient cosine ~0.99 at init with afrac=0.25).
  cfg32 = dataclasses.replace(tiny_model_cfg, rope=True)
  cfg16 = dataclasses.replace(cfg32, matmul_dtype="bfloat16")
  params = model_lib.init_params(cfg32, jax.random.PRNGKey(1))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 17), 0, cfg32.vocab_size)
  loss_and_grad = {c.matmul_dtype: jax.jit(jax.value_and_grad(
      lambda p, c=c: model_lib.next_token_loss(p, tokens, c)))(params) for c in (cfg32, cfg16)}
  (l32, g32), (l16, g16) = loss_and_grad["float32"], loss_and_grad["bfloat16"]
  assert 0 < abs(float(l16) - float(l32)) < 1e-3
  flat32, flat16 = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(g)]) for g in (g32, g16))
  cos = float(flat32 @ flat16 / jnp.linalg.norm(flat32) / jnp.linalg.norm(flat16))
  assert cos > 0.9999
