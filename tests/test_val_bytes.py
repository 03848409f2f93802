"""Tests for experiments.val_bytes: per-byte validation loss comparable across tokenizers."""

import json

import jax
import numpy as np
import pytest

from experiments import presets, val_bytes
from sparse_jax import model as model_lib
from sparse_jax import train as train_lib
from sparse_jax.config import ModelConfig, apply_overrides
from sparse_jax.corpus import load_corpus, split_documents


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


def test_cli_scores_a_trained_run_per_byte(tmp_path):
  corpus_dir = tmp_path / "corpus"
  corpus_dir.mkdir()
  for i in range(40):
    (corpus_dir / f"m{i:02d}.py").write_text(f"def f_{i}(x):\n    return x + {i}\n" * 3)
  cfg = apply_overrides(presets.get_config("tiny"), [
      f"data.corpus={corpus_dir}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_frac=0.2",
      "model.vocab_size=300", "train.steps=2", "train.ckpt_every=2", "train.eval_every=2",
      "train.task_eval_pairs=0", "sparsity.enabled=false"])
  train_lib.train(cfg, tmp_path / "run", progress=False)
  out = tmp_path / "rows.json"
  assert val_bytes.main([str(tmp_path / "run"), "--corpus", str(corpus_dir),
                         "--json", str(out)]) == 0
  (row,) = json.loads(out.read_text())
  val = split_documents(load_corpus(str(corpus_dir))[0], 0.2)[1]
  assert row["docs"] == len(val) and row["bytes"] == sum(len(d.text.encode()) for d in val)
  assert row["step"] == 2 and 0 < row["nats_per_byte"] < row["nats_per_token"]
  assert row["nats_per_byte"] == pytest.approx(
      row["nats_per_token"] * row["tokens"] / row["bytes"])
  assert val_bytes.main([str(tmp_path / "run"), "--corpus", "x", "--max-bytes", "0"]) == 2
