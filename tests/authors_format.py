"""Shared by the tests of the authors' format: the fixture directory, a bitwise tree
comparison, random params of a config's shapes, and a tiktoken-format file with tiktoken's
encoding algorithm written out (to check that our tokenizer reads their files as tiktoken
would)."""

import base64
from pathlib import Path

import jax
import numpy as np

from sparse_jax import data as data_lib
from sparse_jax import interop
from sparse_jax import model as model_lib
from sparse_jax.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "authors_format"


def assert_trees_bitwise_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def random_params(cfg: ModelConfig, seed: int = 0):
  """init_params' tree with random values, without running init (slow eagerly on 2 cores)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def make_tiktoken_file(tmp_path: Path) -> tuple[Path, dict[bytes, int]]:
  """A tiktoken-format file whose ranks are a BPE trained here (bytes first, then merges).
  conftest's `tiktoken_file` fixture makes one per test module."""
  n_merges = 120
  texts = ["def add(x, y):\n    return x + y\n", "print('hello world')\n",
           'values = [[1, 2], [3, 4]]\nfor v in values:\n    print(v)\n'] * 20
  hf = data_lib.train_tokenizer(texts, 257 + n_merges)
  u2b = {u: b for b, u in interop._byte_to_unicode().items()}  # pylint: disable=protected-access
  by_id = sorted((i, t) for t, i in hf.get_vocab().items() if t != data_lib.EOT)
  singles = [bytes([b]) for b in range(256)]
  merged = [bytes(u2b[c] for c in t) for _, t in by_id]
  ranks = {tok: r for r, tok in enumerate(dict.fromkeys(singles + merged))}
  path = tmp_path / "tinypython_test.tiktoken"
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  return path, ranks


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
  """tiktoken's algorithm, written out: per pre-token, merge the lowest-rank adjacent pair."""
  ids = []
  pre = data_lib.new_tokenizer().pre_tokenizer
  u2b = {u: b for b, u in interop._byte_to_unicode().items()}  # pylint: disable=protected-access
  for piece, _ in pre.pre_tokenize_str(text):
    parts = [bytes([u2b[c]]) for c in piece]
    whole = b"".join(parts)
    if whole in ranks:
      ids.append(ranks[whole])
      continue
    while len(parts) > 1:
      pair_ranks = [ranks.get(parts[i] + parts[i + 1], np.inf) for i in range(len(parts) - 1)]
      i = int(np.argmin(pair_ranks))
      if pair_ranks[i] == np.inf:
        break
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids += [ranks[p] for p in parts]
  return ids
