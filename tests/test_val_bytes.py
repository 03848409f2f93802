"""Tests for experiments.val_bytes: per-byte validation loss comparable across tokenizers."""

import json

import jax
import numpy as np
import pytest

from experiments import val_bytes
from sparse_jax import model as model_lib
from sparse_jax.config import ModelConfig
from sparse_jax.corpus import split_documents


@pytest.mark.parametrize("n_tokens", [2, 13])
def test_score_predicts_every_token_once(n_tokens):
  cfg = ModelConfig(n_layer=1, d_model=16, n_head=2, d_head=8, d_mlp=32, vocab_size=32,
                    block_size=8)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens_N = np.random.default_rng(0).integers(0, 32, n_tokens)
  total, n_pred = val_bytes.score(params, cfg, tokens_N, seq_len=4, batch_size=2)
  # The same windows scored one at a time, unpadded: mean loss times the tokens predicted.
  expected = sum(
      float(model_lib.next_token_loss(params, tokens_N[None, i:i + 5], cfg)) * (len(w) - 1)
      for i in range(0, n_tokens - 1, 4) for w in [tokens_N[i:i + 5]])
  assert n_pred == n_tokens - 1
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_labelled_jsonl_splits_as_its_corpus_does(tmp_path):
  path = tmp_path / "simple-abc.jsonl"
  texts = [f"x_{i} = {i}\n" for i in range(200)]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  docs = val_bytes.load_val_docs(f"simple@{path}", 0.1, 10**6)
  named = [type(d)(f"simple:{i + 1}", t) for i, t in enumerate(texts) for d in docs[:1]]
  assert [d.name for d in docs] == [d.name for d in split_documents(named, 0.1)[1]]
  assert all(d.text == texts[int(d.name.split(":")[1]) - 1] for d in docs)
  assert len(val_bytes.load_val_docs(f"simple@{path}", 0.1, 1)) == 1  # at least one doc
  with pytest.raises(ValueError, match="no such file"):
    val_bytes.load_val_docs(f"simple@{tmp_path / 'missing.jsonl'}", 0.1, 100)
