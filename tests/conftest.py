"""Shared pytest fixtures: tiny configs that run in seconds on a 2-core CPU, and a
tiktoken-format tokenizer file (tests of the authors' format)."""

from pathlib import Path

import pytest

from sparse_jax.config import ModelConfig
from tests.authors_format import make_tiktoken_file


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
  return ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, vocab_size=64,
                     block_size=32)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
  return make_tiktoken_file(tmp_path_factory.mktemp("tiktoken"))
