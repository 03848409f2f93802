"""Shared pytest fixtures: tiny configs that run in seconds on a 2-core CPU."""

import pytest

from sparse_jax.config import ModelConfig


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
  return ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, vocab_size=64,
                     block_size=32)
