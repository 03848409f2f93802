"""Tests for the binary next-token tasks: generators, tokenisation, TaskSets, loss, task files."""

import codeop
import dataclasses
import json
import math
import pathlib
import re
import sysconfig
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tasks as tasks_cli
from sparse_jax import model as model_lib
from sparse_jax import tasks
from sparse_jax.config import ModelConfig
from sparse_jax.data import train_tokenizer
from sparse_jax.task_generators import TASKS

PAPER_TASKS = (
    "single_double_quote final_kwarg set_or_string set_or_string_fixedvarname class_init "
    "with_as bracket_brace with_open bracket_counting for_while else_elif fstring_brace "
    "if_ternary var_swap indent_for lambda_func if_equals enumerate_range var_if "
    "while_return_true").split()


@pytest.fixture(scope="module")
def tokenizer():
  """A small BPE trained on task snippets plus two stdlib files (about a second)."""
  texts = []
  for spec in TASKS.values():
    rng = np.random.default_rng(123)
    for _ in range(30):
      p = spec.generate(rng)
      texts += [p.prompt_a + p.tok, p.prompt_b + (p.alt or "")]
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  texts += [(stdlib / f).read_text(encoding="utf-8") for f in ("textwrap.py", "bisect.py")]
  return train_tokenizer(texts, 800)


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tokenizer.save(str(path))
  return str(path)


def test_registry_has_the_papers_tasks_and_induction():
  assert list(TASKS) == PAPER_TASKS + ["induction"]
  for name, spec in TASKS.items():
    assert spec.name == name and spec.description


@pytest.mark.parametrize("name", list(TASKS))
def test_generator_is_deterministic_and_varied(name):
  def gen(seed):
    rng = np.random.default_rng(seed)
    return [TASKS[name].generate(rng) for _ in range(20)]
  pairs = gen(0)
  assert pairs == gen(0)
  assert pairs != gen(1)
  assert len({p.prompt_a for p in pairs}) >= 18  # names, literals and context vary
  for p in pairs:
    assert p.prompt_a != p.prompt_b and p.tok != p.alt


def _diff_region(a: str, b: str) -> tuple[str, str]:
  """The differing middles of a and b, widened to whole words where the cut splits one."""
  word = lambda c: c.isalnum() or c == "_"
  i = 0
  while i < min(len(a), len(b)) and a[i] == b[i]:
    i += 1
  j = 0
  while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
    j += 1
  while i > 0 and word(a[i - 1]) and any(word(s[i]) for s in (a, b) if i < len(s) - j):
    i -= 1
  while j > 0 and word(a[-j]) and any(word(s[-j - 1]) for s in (a, b) if len(s) - j > i):
    j -= 1
  return a[i:len(a) - j], b[i:len(b) - j]


def _last_lines(p):
  head_a, tail_a = p.prompt_a.rsplit("\n", 1)
  head_b, tail_b = p.prompt_b.rsplit("\n", 1)
  assert head_a == head_b
  return tail_a, tail_b


def _swapped(text: str, x: str, y: str) -> str:
  return re.sub(rf"\b({re.escape(x)}|{re.escape(y)})\b", lambda m: y if m[0] == x else x, text)


# What each task's pair may differ in: checks on the differing region (ma, mb) or the last line.
DIFFERS = {
    "single_double_quote": lambda ma, mb, p: (ma, mb) == ('"', "'"),
    "final_kwarg": lambda ma, mb, p: re.sub(r"=[^,]+", "", ma) == mb and "=" in ma,
    "set_or_string": lambda ma, mb, p: ma == "set()" and mb in ("''", '""'),
    "set_or_string_fixedvarname": lambda ma, mb, p: ma == "set()" and mb in ("''", '""'),
    "class_init": lambda ma, mb, p: (ma, mb) == (p.tok.strip(), p.alt.strip()),
    "with_as": lambda ma, mb, p: ma == "with" and re.fullmatch(r"\w+ =", mb),
    "bracket_brace": lambda ma, mb, p: (ma, mb) == ("{", "["),
    "with_open": lambda ma, mb, p: re.fullmatch(r"\w+", ma) and re.fullmatch(r"\w+", mb),
    "bracket_counting": lambda ma, mb, p: (ma, mb) == ("[", ""),
    "for_while": lambda ma, mb, p: (ma, mb) == ("for", "while"),
    "else_elif": lambda ma, mb, p: (ma, mb) == ("else", "elif"),
    "fstring_brace": lambda ma, mb, p: (ma, mb) == ("f", ""),
    "if_ternary": lambda ma, mb, p: re.sub(r"^( *)\w+ = .+? (if )", r"\1\2",
                                           _last_lines(p)[1]) == _last_lines(p)[0],
    "var_swap": lambda ma, mb, p: _swapped(_last_lines(p)[0], p.tok.strip(), p.alt.strip())
    == _last_lines(p)[1],
    "indent_for": lambda ma, mb, p: (ma, mb) == ("    ", ""),
    "lambda_func": lambda ma, mb, p: re.fullmatch(r"\w+ = lambda", ma) and mb == "def",
    "if_equals": lambda ma, mb, p: ma == "if " + mb,
    "enumerate_range": lambda ma, mb, p: re.fullmatch(r", \w+", ma) and mb == "",
    "var_if": lambda ma, mb, p: re.fullmatch(r"( *)if (\w+) == (\S+)", _last_lines(p)[0])
    and re.sub(r"if (\w+) ==", r"\1 =", _last_lines(p)[0]) == _last_lines(p)[1],
    "while_return_true": lambda ma, mb, p: (ma, mb) == ("while", "return"),
    "induction": lambda ma, mb, p: (ma, mb) == (p.tok.strip(), p.alt.strip()),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_pairs_differ_only_where_the_task_says(name):
  rng = np.random.default_rng(7)
  for _ in range(40):
    p = TASKS[name].generate(rng)
    ma, mb = _diff_region(p.prompt_a, p.prompt_b)
    assert DIFFERS[name](ma, mb, p), (ma, mb, p)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_prompt_plus_candidate_is_valid_python(name):
  rng = np.random.default_rng(3)
  for _ in range(40):
    p = TASKS[name].generate(rng)
    # A not-X side B ("elif") has no continuation of its own to compile.
    for text in (p.prompt_a + p.tok,) + ((p.prompt_b + p.alt,) if p.alt else ()):
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        codeop.compile_command(text, symbol="exec")  # None (incomplete) is fine; raises if bad


@pytest.mark.parametrize("name", list(TASKS))
def test_candidates_tokenise_as_declared(tokenizer, name):
  samples, stats = tasks.sample_task(tokenizer, name, 24, seed=0)
  assert stats["valid"] == 24
  seqs = [s for _, e in samples for s in (e.seq_a, e.seq_b)]
  assert len(set(seqs)) == len(seqs)  # distinct
  dec = lambda ids: tokenizer.decode(list(ids))
  for pair, enc in samples:
    assert enc.tok != enc.alt
    assert (enc.alt is None) == (name == "else_elif")  # the one "X vs not-X" task
    for prompt, seq in ((pair.prompt_a, enc.seq_a), (pair.prompt_b, enc.seq_b)):
      # The model reads a token prefix of prompt + tok, and the predicted tokens continue it.
      assert list(seq) == tokenizer.encode(prompt + pair.tok).ids[:len(seq)]
      assert (prompt + pair.tok).startswith(dec(seq) + dec([enc.tok]))
      assert len(dec(seq) + dec([enc.tok])) > len(prompt) or enc.alt is not None
      if enc.alt is not None:
        assert (prompt + pair.alt).startswith(dec(seq) + dec([enc.alt]))


def test_encode_pair_regroups_boundary_merges_and_rejects_ambiguity(tokenizer):
  dec = lambda ids: tokenizer.decode(list(ids))
  # `)` + `:\n` merge: the model reads `def f(a, b` and is asked `):\n` vs `)`.
  enc = tasks.encode_pair(tokenizer, tasks.Pair("def f(a, b)", "def g(x)", ":\n", " ->"), 128)
  assert dec(enc.seq_a) + dec([enc.tok]) == "def f(a, b):\n"
  assert (dec(enc.seq_b), dec([enc.alt])) == ("def g(x", ")")
  assert len(enc.seq_a) == len(tokenizer.encode("def f(a, b)").ids) - 1
  # BPE splits `x = (` two ways before `)` and `]`, at ` ` vs ` (`: nothing to predict.
  with pytest.raises(tasks.PairRejected, match="splits the end of the prompt two ways"):
    tasks.encode_pair(tokenizer, tasks.Pair("x = (", "y = (", ")\n", "]\n"), 128)
  same = tasks.Pair("x = 1", "y = 2", "\n", "\n")
  with pytest.raises(tasks.PairRejected, match="same tokens"):
    tasks.encode_pair(tokenizer, same, 128)
  # Indentation splits two ways ("   " + " return" vs "    " + "\n"): nothing to predict.
  indent = tasks.Pair("def f():\n    ", "def g():\n    ", "return", "\n")
  with pytest.raises(tasks.PairRejected, match="splits the end of the prompt two ways"):
    tasks.encode_pair(tokenizer, indent, 128)


def test_build_taskset_shapes_determinism_and_disjoint_splits(tokenizer):
  names = ["single_double_quote", "class_init", "induction"]
  ts = tasks.build_taskset(tokenizer, names, n_train=6, n_heldout=4, seed=0)
  assert ts.names == tuple(names) and ts.unavailable == {}
  T, L = 3, ts.train.tokens_Px2xL.shape[-1]
  chex.assert_shape(ts.train.tokens_Px2xL, (T, 6, 2, L))
  chex.assert_shape(ts.heldout.tokens_Px2xL, (T, 4, 2, L))
  chex.assert_shape([ts.train.tok_P, ts.train.alt_P], (T, 6))
  chex.assert_shape(ts.train.last_Px2, (T, 6, 2))
  for arrays in (ts.train, ts.heldout):
    assert arrays.tokens_Px2xL.dtype == jnp.int32 and arrays.last_Px2.dtype == jnp.int32
    tokens, last = np.asarray(arrays.tokens_Px2xL), np.asarray(arrays.last_Px2)
    pos = np.arange(L)
    assert np.all(tokens[pos > last[..., None]] == 0)  # right padding only after `last`
  assert L == int(max(ts.train.last_Px2.max(), ts.heldout.last_Px2.max())) + 1
  again = tasks.build_taskset(tokenizer, names, n_train=6, n_heldout=4, seed=0)
  chex.assert_trees_all_equal(ts.train, again.train)
  chex.assert_trees_all_equal(ts.heldout, again.heldout)
  other = tasks.build_taskset(tokenizer, names, n_train=6, n_heldout=4, seed=1)
  assert not np.array_equal(ts.train.tokens_Px2xL[..., :8], other.train.tokens_Px2xL[..., :8])
  def seqs(a, t):
    tokens, last = np.asarray(a.tokens_Px2xL[t]), np.asarray(a.last_Px2[t])
    return {tuple(tokens[p, s, :last[p, s] + 1]) for p in range(len(last)) for s in range(2)}
  for t in range(T):
    assert not seqs(ts.train, t) & seqs(ts.heldout, t)


def test_build_taskset_reports_unavailable_tasks_and_unknown_names(tokenizer, tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"prompt": "x = 1", "alt_prompt": "while x", "target": "\n",
                              "alt": ":\n"}) + "\n" +
                  json.dumps({"prompt": "y = 2", "alt_prompt": "while y", "target": "\n",
                              "alt": ":\n"}) + "\n")
  ts = tasks.build_taskset(tokenizer, ["class_init", f"file:{path}"], n_train=2, n_heldout=2,
                           max_len=12)
  assert ts.names == (f"file:{path}",)
  assert "max_len=12" in ts.unavailable["class_init"]
  with pytest.raises(ValueError, match="unknown task"):
    tasks.build_taskset(tokenizer, ["no_such_task"])
  with pytest.raises(ValueError, match="no task is available"):
    tasks.build_taskset(tokenizer, ["class_init"], max_len=12)


def test_contrast_loss_matches_a_hand_computation():
  d_Px2 = jnp.array([[2.0, -1.0], [0.5, 3.0]])
  log_sig = lambda x: -math.log1p(math.exp(-x))
  want = -(log_sig(2.0) + log_sig(1.0) + log_sig(0.5) + log_sig(-3.0)) / 4  # per sequence
  loss, acc = tasks.contrast_loss(d_Px2)
  chex.assert_trees_all_close(loss, want, rtol=1e-6)
  chex.assert_trees_all_close(acc, 0.75)


def test_contrast_loss_se_is_over_pairs():
  """The pair is the unit: per-pair mean of its two sequence losses, sample std / sqrt(P)."""
  d_Px2 = jnp.array([[2.0, -1.0], [0.5, 3.0], [-1.0, 1.0]])
  nll = lambda x: math.log1p(math.exp(-x))  # -log_sigmoid
  pair = [(nll(2.0) + nll(1.0)) / 2, (nll(0.5) + nll(-3.0)) / 2, (nll(-1.0) + nll(-1.0)) / 2]
  want = np.std(pair, ddof=1) / math.sqrt(3)
  chex.assert_trees_all_close(tasks.contrast_loss_se(d_Px2), want, rtol=1e-5)
  assert float(tasks.contrast_loss_se(d_Px2[:1])) == 0.0  # one pair: no spread to measure


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
  cfg = ModelConfig(n_layer=1, d_model=16, n_head=1, d_head=16, d_mlp=16,
                    vocab_size=tokenizer.get_vocab_size(), block_size=128)
  return jax.jit(model_lib.init_params, static_argnums=0)(cfg, jax.random.key(0)), cfg


def _tok_preferring_params(tiny_model, ts, delta):
  """A model whose logits are exactly the bigram row of the current token: tok + delta."""
  params, cfg = tiny_model
  params = {**params, "lm_head": {"w": jnp.zeros_like(params["lm_head"]["w"])}}
  tok_ids = np.unique(np.concatenate([ts.train.tok_P.ravel(), ts.heldout.tok_P.ravel()]))
  alt_ids = np.unique(np.concatenate([ts.train.alt_P.ravel(), ts.heldout.alt_P.ravel()]))
  assert not set(tok_ids) & set(alt_ids)
  bigram = jnp.zeros((cfg.vocab_size, cfg.vocab_size)).at[:, tok_ids].set(delta)
  # Row 0 is the padding token: reading logits at a pad position would flip the sign.
  params["bigram"] = bigram.at[0].set(0.0).at[0, alt_ids].set(100.0)
  return params, cfg


def test_model_that_always_prefers_tok_gets_the_expected_loss(tokenizer, tiny_model):
  ts = tasks.build_taskset(tokenizer, ["while_return_true", "if_equals", "enumerate_range"],
                           n_train=4, n_heldout=4)  # same shapes: one compile
  delta = 1.5
  params, cfg = _tok_preferring_params(tiny_model, ts, delta)
  softplus = lambda x: math.log1p(math.exp(x))
  want = (softplus(-delta) + softplus(delta)) / 2  # side A right, side B wrong, per sequence
  for split in ("train", "heldout"):
    results = tasks.evaluate_tasks(params, cfg, ts, split)
    assert list(results) == list(ts.names)
    for m in results.values():
      assert m["loss"] == pytest.approx(want, rel=1e-5)
      assert m["acc"] == pytest.approx(0.5)
  metrics = jax.jit(tasks.task_metrics, static_argnames="cfg")
  loss, acc = metrics(params, cfg, jax.tree.map(lambda x: x[0], ts.heldout))
  assert float(loss) == pytest.approx(want, rel=1e-5) and float(acc) == pytest.approx(0.5)


def test_evaluate_tasks_chunking_matches_and_metrics_flatten(tokenizer, tiny_model):
  ts = tasks.build_taskset(tokenizer, ["var_swap", "with_open"], n_train=3, n_heldout=5)
  params, cfg = tiny_model
  whole = tasks.evaluate_tasks(params, cfg, ts)
  chunked = tasks.evaluate_tasks(params, cfg, ts, max_seqs=8)  # 2 pairs per call, last padded
  for name in ts.names:
    assert chunked[name]["loss"] == pytest.approx(whole[name]["loss"], rel=1e-5)
    assert chunked[name]["acc"] == pytest.approx(whole[name]["acc"])
    assert math.isfinite(whole[name]["loss"])
  flat = tasks.flatten_metrics(whole)
  assert flat["task/var_swap/loss"] == whole["var_swap"]["loss"]
  small = dataclasses.replace(cfg, vocab_size=64)
  with pytest.raises(ValueError, match="vocab_size"):
    tasks.evaluate_tasks(params, small, ts)  # checked before any compute


def _write(tmp_path, lines, name="task.jsonl"):
  path = tmp_path / name
  path.write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))
  return str(path)


def test_user_task_file_pairs_and_mixes_into_a_taskset(tokenizer, tmp_path):
  path = _write(tmp_path, [
      {"prompt": "    while True", "target": ":\n", "alt": "\n"},
      {"prompt": "    return True", "target": "\n", "alt": ":\n"},
      {"prompt": "        while True", "target": ":\n", "alt": "\n"},
      "\n",  # blank lines are skipped
      {"prompt": "if x", "alt_prompt": "x", "target": " ==", "alt": " ="},
  ])
  pairs = tasks.load_task_file(path, tokenizer)
  assert len(pairs) == 3  # one explicit pair, two one-sided lines cycled onto the single B
  pair, enc = pairs[0]
  assert (pair.prompt_a, pair.prompt_b) == ("if x", "x")
  assert [p.prompt_b for p, _ in pairs[1:]] == ["    return True"] * 2
  colon = tokenizer.encode(":\n").ids
  assert len(colon) == 1 and all(e.tok == colon[0] for _, e in pairs[1:])
  ts = tasks.build_taskset(tokenizer, ["for_while", f"file:{path}"], n_train=4, n_heldout=2)
  assert ts.names == ("for_while", f"file:{path}")
  chex.assert_shape(ts.heldout.tok_P, (2, 2))


@pytest.mark.parametrize("lines, match", [
    ([{"prompt": "a", "target": " b", "alt": " c"}, '{"prompt": "x", "target": \n'],
     r":2: not valid JSON"),
    ([{"prompt": "a", "alt": " c"}], r":1: missing key 'target'"),
    ([{"prompt": "a", "target": " b", "alt": " c", "alt_promt": "x"}], r":1: unknown key"),
    ([{"prompt": "a", "target": 3, "alt": " c"}], r":1: 'target' must be a non-empty string"),
    (["[1, 2]\n"], r":1: expected a JSON object"),
    ([], r": empty task file"),
    (["\n", "  \n"], r": empty task file"),
    ([{"prompt": "def f():\n    ", "target": "return", "alt": "\n"}],
     r":1: BPE splits the end of the prompt two ways .* \(target 'return', alt '\\n'\)"),
    ([{"prompt": "x = 1", "target": "\n", "alt": "\n"}], r":1: tok and alt tokenise to the same"),
    ([{"prompt": "x", "target": ":\n", "alt": None}], r":1: 'alt': null .* needs 'alt_prompt'"),
    ([{"prompt": "x = 1", "target": "\n", "alt": ":\n"}], r":1: no line with target"),
    ([{"prompt": "x = 1", "alt_prompt": "x = 1", "target": "\n", "alt": ":\n"}],
     r":1: prompts A and B tokenise identically"),
    ([{"prompt": "x = 1", "target": "\n", "alt": ":\n"},
      {"prompt": "x = 1", "target": ":\n", "alt": "\n"}], r":1: same prompt as line 2"),
])
def test_malformed_task_files_name_the_file_and_line(tokenizer, tmp_path, lines, match):
  path = _write(tmp_path, lines)
  with pytest.raises(tasks.TaskFileError, match=re.escape(path) + match):
    tasks.load_task_file(path, tokenizer)


def test_natural_prompts_load_as_the_generators_tokenise_them(tokenizer, tmp_path):
  """`def f(a, b)` + `:\n` merges `)` and `:\n` (the project's 2048-token BPE merges `):` too);
  a prompt ending in indentation loses a space to ` return`. Both are read as the generators
  read them, not refused."""
  dec = lambda ids: tokenizer.decode(list(ids))
  path = _write(tmp_path, [
      {"prompt": "def f(a, b)", "target": ":\n", "alt": " ->"},
      {"prompt": "def g(x)", "target": " ->", "alt": ":\n"},
      {"prompt": "def f():\n    ", "alt_prompt": "while x:\n    ", "target": "return",
       "alt": "pass"},
  ])
  (p1, e1), (p2, e2) = tasks.load_task_file(path, tokenizer)
  assert (p1.prompt_a, p1.prompt_b) == ("def f():\n    ", "while x:\n    ")
  assert dec([e1.tok]) == " return" and " pass".startswith(dec([e1.alt]))
  assert dec(e1.seq_a) + dec([e1.tok]) == "def f():\n    return"
  assert (p2.prompt_a, p2.prompt_b) == ("def f(a, b)", "def g(x)")
  assert dec(e2.seq_a) + dec([e2.tok]) == "def f(a, b):\n"  # `):\n` vs `)` after `def f(a, b`
  assert dec(e2.seq_b) == "def g(x" and dec([e2.alt]) == ")"
  assert [e2.tok] == tokenizer.encode("):\n").ids
  ts = tasks.build_taskset(tokenizer, [f"file:{path}"], n_train=2, n_heldout=1)
  assert not np.asarray(ts.train.vs_rest_P).any()


def _hand_loss(logits_Sx2xV, tok_P, alt_P, vs_rest):
  """The authors' two-sided loss, per-sequence mean, from full logits (float64 numpy)."""
  logp = logits_Sx2xV - np.log(np.exp(logits_Sx2xV).sum(-1, keepdims=True))
  out = []
  for (la, lb), t, a in zip(logp, tok_P, alt_P):
    if vs_rest:  # -log p(tok | A) - log(1 - p(tok | B)), full vocabulary
      out += [-la[t], -np.log1p(-np.exp(lb[t]))]
    else:  # softmax over {tok, alt} only
      out += [-(la[t] - np.logaddexp(la[t], la[a])), -(lb[a] - np.logaddexp(lb[t], lb[a]))]
  return np.mean(out)


def test_not_x_loss_matches_a_hand_computation_on_a_tiny_model():
  cfg = ModelConfig(n_layer=1, d_model=16, n_head=1, d_head=16, d_mlp=16, vocab_size=12,
                    block_size=8)
  params = model_lib.init_params(cfg, jax.random.key(1))
  params["bigram"] = jax.random.normal(jax.random.key(2), params["bigram"].shape)  # spread p
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 12, (3, 2, 8)).astype(np.int32)
  last = np.array([[7, 5], [3, 6], [4, 4]], np.int32)
  tok, alt = np.array([2, 5, 9], np.int32), np.array([3, 1, 4], np.int32)
  logits = np.stack([np.asarray(model_lib.forward(params, jnp.asarray(tokens[:, s]), cfg),
                                np.float64)[np.arange(3), last[:, s]] for s in range(2)], 1)
  for vs_rest in (True, False):
    arrays = tasks.TaskArrays(jnp.asarray(tokens), jnp.asarray(last), jnp.asarray(tok),
                              jnp.asarray(tok if vs_rest else alt), jnp.full(3, vs_rest))
    loss, acc = tasks.task_metrics(params, cfg, arrays)
    want = _hand_loss(logits, tok, np.asarray(arrays.alt_P), vs_rest)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    if vs_rest:  # right on B when p(tok | B) < 1/2
      p_tok = np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[np.arange(3), :, tok]
      np.testing.assert_allclose(float(acc), np.mean([p_tok[:, 0] > 0.5, p_tok[:, 1] < 0.5]))
  # Pairs without the flag (vs_rest_P None) are two-way, as before.
  two_way = tasks.TaskArrays(jnp.asarray(tokens), jnp.asarray(last), jnp.asarray(tok),
                             jnp.asarray(alt))
  np.testing.assert_allclose(float(tasks.task_metrics(params, cfg, two_way)[0]),
                             _hand_loss(logits, tok, alt, False), rtol=1e-5)


def test_else_elif_is_x_vs_not_x_in_tasksets_and_files(tokenizer, tmp_path):
  ts = tasks.build_taskset(tokenizer, ["else_elif", "for_while"], n_train=3, n_heldout=2)
  flags = np.asarray(ts.heldout.vs_rest_P)
  assert flags[0].all() and not flags[1].any()
  np.testing.assert_array_equal(ts.heldout.alt_P[0], ts.heldout.tok_P[0])
  colon = tokenizer.encode(":\n").ids
  assert len(colon) == 1 and (np.asarray(ts.heldout.tok_P[0]) == colon[0]).all()
  path = _write(tmp_path, [
      {"prompt": f"if {x}:\n    pass\nelse", "alt_prompt": f"if {x}:\n    pass\nelif",
       "target": ":\n", "alt": None} for x in ("a", "b", "c")])
  pairs = tasks.load_task_file(path, tokenizer)
  assert [e.alt for _, e in pairs] == [None] * 3 and pairs[0][0].alt is None
  ts = tasks.build_taskset(tokenizer, [f"file:{path}"], n_train=2, n_heldout=1)
  assert np.asarray(ts.train.vs_rest_P).all()


def test_missing_task_file_and_too_few_pairs(tokenizer, tmp_path):
  with pytest.raises(tasks.TaskFileError, match="cannot read"):
    tasks.load_task_file(str(tmp_path / "nope.jsonl"), tokenizer)
  path = _write(tmp_path, [{"prompt": "if x", "alt_prompt": "x", "target": " ==", "alt": " ="}])
  with pytest.raises(tasks.TaskFileError, match="at least 2 distinct pairs"):
    tasks.build_taskset(tokenizer, [f"file:{path}"])


def test_cli_list_and_show(tokenizer_file, tmp_path, capsys):
  assert tasks_cli.main(["--list", "--tokenizer", tokenizer_file]) == 0
  out = capsys.readouterr().out
  for name in TASKS:
    assert re.search(rf"^{name} +ok", out, re.M), name
  assert tasks_cli.main(["--show", "var_if", "-n", "2", "--tokenizer", tokenizer_file]) == 0
  out = capsys.readouterr().out
  assert out.count("A last tokens:") == 2 and "(id " in out
  (tmp_path / "run").mkdir()
  assert tasks_cli.main(["--show", "var_if", "--workdir", str(tmp_path / "run")]) == 2
  assert "run/tokenizer.json: cannot load tokenizer" in capsys.readouterr().err
  assert tasks_cli.main(["--show", "nope", "--tokenizer", tokenizer_file]) == 2
