"""Tests for the offline node explainer: planted units are found, random units score low."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import explain
from sparse_jax import model as model_lib

# A toy vocabulary of code-like pieces (ids 0..63); id 0 plays <|endoftext|>.
PIECES = (["<|endoftext|>", "\n", "    ", " ", "'", '"', "(", ")", "[", "]", "{", "}", ":", ",",
           "=", ".", " if", " else", "elif", " for", " in", " return", "def", " x", " y", "0",
           "1", "2", "+", "-", "*", "#"] + [f" v{i}" for i in range(32)])
TARGET = PIECES.index(" else")


def _planted_model(cfg, seed=0):
  """A random model whose attention is switched off and whose neuron 5 of layer 0 reads one
  embedding direction that only token TARGET has: it fires exactly on TARGET."""
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  blk = params["blocks"]["0"]
  blk["attn"]["c_attn"]["w"] = jnp.zeros_like(blk["attn"]["c_attn"]["w"])
  blk["attn"]["c_proj"]["w"] = jnp.zeros_like(blk["attn"]["c_proj"]["w"])
  wte = np.array(params["wte"])
  wte[:, 0] = 0.0
  wte[TARGET] = 0.0
  wte[TARGET, 0] = 1.0
  params["wte"] = jnp.asarray(wte)
  w = np.zeros(blk["mlp"]["c_fc"]["w"].shape, np.float32)
  w[0, 5] = 1.0
  blk["mlp"]["c_fc"]["w"] = jnp.asarray(w)
  blk["mlp"]["c_fc"]["b"] = jnp.full_like(blk["mlp"]["c_fc"]["b"], -1.0)
  return params


def _random_stream(R=64, L=32, seed=0):
  tokens = np.random.default_rng(seed).integers(1, len(PIECES), size=(R, L))
  return explain.TokenStream(tokens, np.ones_like(tokens, bool), PIECES)


def _acts(params, cfg, stream, site="0.mlp.post_act"):
  _, acts = model_lib.forward(params, jnp.asarray(stream.tokens_RxL), cfg, capture=(site,))
  return np.asarray(acts[site])


def test_planted_token_unit_is_found(tiny_model_cfg):
  stream = _random_stream()
  acts = _acts(_planted_model(tiny_model_cfg), tiny_model_cfg, stream)[..., 5]
  e = explain.explain_node(stream, acts, explain.alternate_rows(stream))
  assert e.text == "token is ' else'"
  assert e.score > 0.95 and e.explained
  assert e.scale > 0
  assert e.n_select + e.n_heldout == stream.tokens_RxL.size


def test_random_unit_scores_low(tiny_model_cfg):
  # Random init, many distinct tokens: a unit is a random function of the token and its
  # context. The best token set still catches its extreme tokens (held-out r 0.33 to 0.43
  # for these four), but stays under the "explained" threshold 0.5.
  cfg = dataclasses.replace(tiny_model_cfg, vocab_size=512)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(1))
  pieces = [f" t{i}" for i in range(512)]
  tokens = np.random.default_rng(1).integers(0, 512, size=(64, 32))
  stream = explain.TokenStream(tokens, np.ones_like(tokens, bool), pieces)
  acts = _acts(params, cfg, stream)
  scores = [explain.explain_node(stream, acts[..., c], explain.alternate_rows(stream)).score
            for c in range(4)]
  assert max(scores) < 0.5, scores


CODE = [
    "def f(x):\n    if x:\n        return 'a(b'\n    else:\n        return [x, (1)]\n",
    "y = \"q'q\"  # c 'x'\nz = {1: [2, (3)]}\n",
    's = """doc\nmore"""\nt = 1\n',
]


def _char_stream(texts):
  """One token per character, so the syntax state can be checked by hand."""
  pieces = sorted({ch for t in texts for ch in t})
  L = max(len(t) for t in texts)
  tokens = np.zeros((len(texts), L), np.int64)
  valid = np.zeros((len(texts), L), bool)
  for r, t in enumerate(texts):
    tokens[r, :len(t)] = [pieces.index(ch) for ch in t]
    valid[r, :len(t)] = True
  return explain.TokenStream(tokens, valid, pieces)


def test_syntax_state_by_hand():
  s = _char_stream(CODE)
  row0 = CODE[0]
  at = lambda text, sub, k=0: text.index(sub) + k
  # Inside 'a(b': the '(' there is not a bracket; the string's quote is '.
  i = at(row0, "a(b", 1)
  assert s.quote_RxL[0, i] == ord("'") and s.depth_RxL[0, i] == 0
  assert s.indent_RxL[0, i] == 8
  j = at(row0, "(1)", 1)  # inside [ then (
  assert s.depth_RxL[0, j] == 2 and s.bracket_RxL[0, j] == 1 and s.quote_RxL[0, j] == 0
  assert s.line_start_RxL[0, at(row0, "if")] == 1 and s.line_start_RxL[0, at(row0, "f(")] == 0
  row1 = CODE[1]
  assert s.quote_RxL[1, at(row1, "q'q", 1)] == ord('"')  # a ' inside a "-string
  assert s.comment_RxL[1, at(row1, "'x'", 1)] == 1 and s.quote_RxL[1, at(row1, "'x'", 1)] == 0
  assert s.depth_RxL[1, at(row1, "(3", 1)] == 3 and s.bracket_RxL[1, at(row1, "{1", 1)] == 3
  row2 = CODE[2]
  k = at(row2, "more")  # a triple-quoted string spans the newline
  assert s.quote_RxL[2, k] == ord('"') and s.triple_RxL[2, k] == 1
  assert s.quote_RxL[2, at(row2, "t =")] == 0
  # Keywords are whole tokens; the line's last one holds until the newline.
  w = explain.TokenStream([[0, 1, 2, 3, 4, 1]], np.ones((1, 6), bool),
                          ["if", " x", ":", "\n", "return"])
  assert w.keyword_RxL.tolist() == [[explain.KEYWORDS.index("if")] * 3 + [-1]
                                    + [explain.KEYWORDS.index("return")] * 2]


def test_string_unit_is_explained_as_inside_a_string():
  texts = [f"a{i} = '{'x' * (i % 7)}' + b({i})\n" for i in range(40)]
  s = _char_stream(texts)
  acts = 2.0 * (s.quote_RxL > 0) + 0.1
  e = explain.explain_node(s, acts, explain.alternate_rows(s))
  assert e.text == "inside a string" and e.score > 0.99
  assert e.scale == pytest.approx(2.0) and e.offset == pytest.approx(0.1)


def test_conjunction_and_custom_explainer():
  # Strings both inside and outside brackets; the unit fires on the ones inside.
  texts = [f"x = '{'ab' * (i % 4)}' + f(1, '{'cd' * (i % 5)}', [{i}])\n" for i in range(60)]
  s = _char_stream(texts)
  acts = ((s.depth_RxL >= 1) & (s.quote_RxL > 0)).astype(float)
  e = explain.explain_node(s, acts, explain.alternate_rows(s))
  assert " AND " in e.text and e.score > 0.95, e

  class Constant:  # a plugged-in explainer whose rule says nothing scores 0
    name = "constant"

    def propose(self, stream, acts_RxL, select_RxL):
      return explain.Rule("always", lambda st: np.ones(st.tokens_RxL.shape))

  e = explain.explain_node(s, acts, explain.alternate_rows(s), Constant())
  assert e.explainer == "constant" and e.score == 0.0 and not e.explained


def test_top_snippets_and_errors():
  s = _random_stream(R=6, L=20)
  acts = np.zeros((6, 20))
  acts[3, 10], acts[1, 2] = 5.0, -4.0
  snips = explain.top_snippets(s, acts, k=2, before=3, after=1)
  assert [sn["act"] for sn in snips] == [5.0, -4.0]
  assert snips[0]["tokens"][snips[0]["at"]][1] == 5.0 and len(snips[0]["tokens"]) == 5
  assert snips[1]["at"] == 2
  with pytest.raises(ValueError, match="do not match"):
    explain.explain_node(s, acts[:, :5], explain.alternate_rows(s))
  with pytest.raises(ValueError, match="has no text"):
    explain.TokenStream(np.array([[99]]), np.array([[True]]), PIECES)
