"""Weight matmuls at a chosen input precision, always accumulated and returned in float32.

`matmul(x, w, dtype)` is `x @ w` when dtype is "float32". With "bfloat16" both operands are
rounded to bfloat16 and the products summed in float32, in the forward *and* in both backward
matmuls (a custom VJP: JAX's own transpose of a bf16 product returns bf16 gradients).
Weights, everything between the matmuls, gradients and the optimiser stay float32: the usual
mixed-precision recipe. On CPUs with AMX (and on GPUs and TPUs) bf16 x bf16 -> f32 matmuls
run several times faster than f32 ones (docs/throughput.md). The rounding is deterministic,
so runs stay bitwise reproducible on resume.

The leading axes are flattened and each product is written in a form XLA:CPU hands to its
bf16 kernel (`_bwd`); it runs some batched bf16 x bf16 -> f32 dot layouts not at all
("Unsupported element type for DotThunk"), which is also why attention's own products stay
float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.config import MATMUL_DTYPES


def matmul(x_NxI: jax.Array, w_IxO: jax.Array, dtype: str = "float32") -> jax.Array:
  """x @ w over the last axis of x (any leading shape), with inputs rounded to `dtype`."""
  if dtype == "float32":
    return x_NxI @ w_IxO
  if dtype == "bfloat16":
    return _matmul_bf16(x_NxI, w_IxO)
  raise ValueError(f"matmul dtype must be one of {MATMUL_DTYPES}, got {dtype!r}")


def _dot_f32(a_MxK: jax.Array, b_KxN: jax.Array) -> jax.Array:
  return jnp.matmul(a_MxK, b_KxN, preferred_element_type=jnp.float32)


def _flat(x_NxI: jax.Array) -> jax.Array:
  return x_NxI.reshape(-1, x_NxI.shape[-1])


@jax.custom_vjp
def _matmul_bf16(x_NxI, w_IxO):
  return _fwd(x_NxI, w_IxO)[0]


def _fwd(x_NxI, w_IxO):
  x16_NxI, w16_IxO = x_NxI.astype(jnp.bfloat16), w_IxO.astype(jnp.bfloat16)
  y_NxO = _dot_f32(_flat(x16_NxI), w16_IxO).reshape(*x_NxI.shape[:-1], w_IxO.shape[-1])
  # The rounded operands are what the backward pass needs, at half the memory of f32 ones.
  return y_NxO, (x16_NxI, w16_IxO)


def _bwd(res, g_NxO):
  x16_NxI, w16_IxO = res
  g16_NxO = _flat(g_NxO.astype(jnp.bfloat16))
  x16_NxI_flat = _flat(x16_NxI)
  f32 = jnp.float32
  # Both written in the forms XLA:CPU hands to its bf16 (AMX) matmul kernel; the plain
  # `g @ w.T` and `x.T @ g` are silently upcast to f32 and run at or below the f32 rate
  # (docs/throughput.md, "bf16 matmuls": 110-145 against 500-1000 GFLOP/s).
  dx_NxI = jnp.einsum("no,io->ni", g16_NxO, w16_IxO, preferred_element_type=f32)
  N = x16_NxI_flat.shape[0]
  if N % 2:
    dw_IxO = jnp.einsum("ni,no->io", x16_NxI_flat, g16_NxO, preferred_element_type=f32)
  else:
    # Contracting over two axes (2 x N/2) makes XLA transpose x into a fresh buffer and run
    # a canonical bf16 matmul, instead of an upcast one with x transposed in place.
    dw_IxO = jnp.einsum("bni,bno->io", x16_NxI_flat.reshape(2, N // 2, -1),
                        g16_NxO.reshape(2, N // 2, -1), preferred_element_type=f32)
  return dx_NxI.reshape(x16_NxI.shape), dw_IxO


_matmul_bf16.defvjp(_fwd, _bwd)
