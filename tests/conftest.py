"""Shared pytest setup: one XLA compilation cache per session (below), tiny configs that run
in seconds on a 2-core CPU, and a tiktoken-format tokenizer file (tests of the authors'
format)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole session, its subprocesses included (they
# inherit the environment): many tests, and every CLI test's fresh interpreter, compile the
# same tiny programs. The cache starts empty every session, so no program compiled by other
# code is ever reused.
_XLA_CACHE = tempfile.mkdtemp(prefix="sparse_jax_test_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402  (after the environment above, which jax reads at import)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

from sparse_jax.config import ModelConfig
from tests.authors_format import make_tiktoken_file


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
  return ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, vocab_size=64,
                     block_size=32)


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
  return make_tiktoken_file(tmp_path_factory.mktemp("tiktoken"))
