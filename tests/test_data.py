"""Tests for the corpus, tokenizer, token cache, batches and the generated `simple` corpus."""

import json
import os
import re
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_jax import corpus, corpus_gen, data
from sparse_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from sparse_jax.task_generators import TASKS

CODE = [
    "def add(a, b=2):\n    return a + b\n",
    "class Point:\n\tdef __init__(self, x):\n\t\tself.x = x\r\n",
    "# café → 日本 ✓ 🐍\nname = 'naïve'\nprint(f\"{name!r}\")\n",
    "for i, x in enumerate([1, 2, 3]):\n    if x > 1:\n        print(i)\n",
]


@pytest.fixture(scope="module")
def tok():
  return data.train_tokenizer(CODE * 3, 300)


def write_tree(root, files):
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
  return root


def make_cfg(tmp_path, corpus, **data_kw):
  return Config(model=ModelConfig(vocab_size=data_kw.pop("vocab_size", 300)),
                train=TrainConfig(seq_len=data_kw.pop("seq_len", 16)),
                data=DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **data_kw))


def py_corpus(tmp_path, n=12):
  return write_tree(tmp_path / "corpus", {f"pkg/mod_{i:02d}.py": CODE[i % 4] * (i + 2)
                                          for i in range(n)})


# Tokenizer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CODE + ["a\r\nb\rc\n", "\t\t  x = 1  \n\n\n", "", "<|endoftext|>",
                                         "x = '\\u00e9' # é ü 中文 \U0001f600\x0b\x0c"])
def test_tokenizer_round_trips_code_exactly(tok, text):
  assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_any_text(tok, text):
  assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_eot_text_in_a_document_is_not_the_separator(tok):
  assert tok.token_to_id(data.EOT) == 0
  assert 0 not in tok.encode("x = '<|endoftext|>'").ids


def test_save_and_load_tokenizer(tmp_path, tok):
  data.save_tokenizer(tok, tmp_path / "ckpt")
  loaded = data.load_tokenizer(tmp_path / "ckpt")
  assert data.tokenizer_hash(loaded) == data.tokenizer_hash(tok)
  assert loaded.encode(CODE[2]).ids == tok.encode(CODE[2]).ids
  assert 0 not in loaded.encode(data.EOT).ids
  with pytest.raises(ValueError, match="cannot load tokenizer"):
    data.load_tokenizer(tmp_path / "nowhere")


# Corpus -------------------------------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no_such_dir.*no such file"):
    data.load_corpus(str(tmp_path / "no_such_dir"))


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no usable documents.*none found"):
    data.load_corpus(str(tmp_path / "empty"))
  write_tree(tmp_path / "bad", {"a.py": b"\x00\x01", "b.py": "  \n"})
  with pytest.raises(ValueError, match="1 binary, 1 empty"):
    data.load_corpus(str(tmp_path / "bad"))


def test_skips_and_counts_unusable_files(tmp_path):
  root = write_tree(tmp_path / "c", {
      "good.py": "x = 1\n", "sub/also.py": "y = 2\n", "notes.txt": "not python",
      "bin.py": b"abc\x00def", "latin.py": "caf\xe9 = 1\n".encode("latin-1"), "empty.py": "",
      "__pycache__/cached.py": "z = 3\n", ".venv/hidden.py": "z = 3\n",
      "lib/site-packages/dep.py": "z = 3\n"})
  (root / "dangling.py").symlink_to(root / "missing_target.py")
  docs, skipped = data.load_corpus(str(root))
  assert [d.name for d in docs] == ["good.py", "sub/also.py"]
  assert skipped == {"binary": 1, "non-utf8": 1, "empty": 1, "unreadable": 1}


def test_max_files_keeps_the_first_sorted_documents(tmp_path):
  docs, _ = data.load_corpus(str(py_corpus(tmp_path)), max_files=3)
  assert [d.name for d in docs] == ["pkg/mod_00.py", "pkg/mod_01.py", "pkg/mod_02.py"]


def test_jsonl_corpus_and_its_errors(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"code": "a = 1"}\n\n{"code": "b = 2", "x": 0}\n{"code": ""}\n')
  docs, skipped = data.load_corpus(str(path), text_field="code")
  assert [(d.name, d.text) for d in docs] == [("c.jsonl:1", "a = 1"), ("c.jsonl:3", "b = 2")]
  assert skipped == {"empty": 1}
  for bad, msg in [('{"code": "a"}\n{oops\n', r"c\.jsonl:2: not valid JSON"),
                   ('{"code": "a"}\n{"text": "b"}\n', r"c\.jsonl:2: .*string field 'code'"),
                   ('[1, 2]\n', r"c\.jsonl:1: "), ('{"code": 3}\n', r"c\.jsonl:1: ")]:
    path.write_text(bad)
    with pytest.raises(ValueError, match=msg):
      data.load_corpus(str(path), text_field="code")


def test_single_text_file_is_cut_into_train_and_val(tmp_path):
  path = tmp_path / "book.txt"
  text = "".join(f"line {i}\n" for i in range(100))
  path.write_text(text)
  docs, _ = data.load_corpus(str(path))
  train, val = data.split_documents(docs, 0.1)
  assert len(train) == len(val) == 1 and train[0].text + val[0].text == text
  assert val[0].text.startswith("line ") and 5 <= val[0].text.count("\n") <= 15
  with pytest.raises(ValueError, match="single document"):
    data.split_documents([data.Document("x", "a")], 0.1)


def test_stdlib_is_found_without_site_packages():
  docs, _ = data.load_corpus("stdlib", max_files=5)
  assert len(docs) == 5 and all(d.name.endswith(".py") for d in docs)
  assert docs == sorted(docs, key=lambda d: d.name)


# Split and fingerprint ----------------------------------------------------------------------


def names_split(names, val_frac):
  train, val = data.split_documents([data.Document(n, n) for n in names], val_frac)
  return [d.name for d in train], [d.name for d in val]


def test_split_is_stable_disjoint_and_never_empty():
  names = [f"dir/file_{i}.py" for i in range(400)]
  train, val = names_split(names, 0.1)
  assert set(train).isdisjoint(val) and sorted(train + val) == sorted(names)
  assert 20 <= len(val) <= 60
  # Growing the corpus does not move existing documents.
  train2, val2 = names_split(names + [f"new_{i}.py" for i in range(100)], 0.1)
  assert set(val) == set(val2) & set(names)
  # Never empty on either side.
  assert len(names_split(names[:3], 1e-6)[1]) == 1
  assert len(names_split(names[:2], 0.999)[0]) == 1


def test_split_is_the_same_in_another_process():
  names = [f"m{i}.py" for i in range(50)]
  code = ("from sparse_jax import data; print(sorted(d.name for d in data.split_documents("
          f"[data.Document(n, '') for n in {names!r}], 0.2)[1]))")
  env = {**os.environ, "PYTHONHASHSEED": "123"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True).stdout
  assert out.strip() == str(sorted(names_split(names, 0.2)[1]))


def test_fingerprint_depends_on_names_and_contents():
  a = [data.Document("a.py", "x"), data.Document("b.py", "y")]
  assert data.fingerprint(a) == data.fingerprint(list(a))
  assert data.fingerprint(a) != data.fingerprint([a[0], data.Document("b.py", "z")])
  assert data.fingerprint(a) != data.fingerprint([a[0], data.Document("c.py", "y")])


# Batches ------------------------------------------------------------------------------------


def test_get_batch_is_a_pure_function_of_seed_and_step():
  tokens_N = np.arange(1000, dtype=np.uint16)
  batch = data.get_batch(tokens_N, 7, 3, 8, 16)
  assert batch.shape == (8, 17) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, data.get_batch(tokens_N, 7, 3, 8, 16))
  assert not np.array_equal(batch, data.get_batch(tokens_N, 7, 4, 8, 16))
  assert not np.array_equal(batch, data.get_batch(tokens_N, 8, 3, 8, 16))
  # Rows are contiguous windows of the stream.
  np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
  assert data.get_batch(tokens_N, -1, 0, 2, 4).shape == (2, 5)
  with pytest.raises(ValueError, match="shorter than seq_len"):
    data.get_batch(tokens_N[:10], 0, 0, 2, 16)


def synthetic(weights):
  sources = [data.Source(f"s{i}", w, np.full(500, i + 1, np.uint16),
                         np.full(100, 10 + i, np.uint16), {}) for i, w in enumerate(weights)]
  return data.Dataset(tokenizer=None, sources=sources, stats={})


def test_mixture_weights_are_respected():
  ds = synthetic([0.7, 0.2, 0.1])
  rows = np.concatenate([ds.train_batch(0, step, 32, 8)[:, 0] for step in range(300)])
  frac = np.bincount(rows, minlength=4)[1:] / len(rows)
  np.testing.assert_allclose(frac, [0.7, 0.2, 0.1], atol=0.02)
  np.testing.assert_array_equal(ds.train_batch(3, 5, 32, 8), ds.train_batch(3, 5, 32, 8))
  val = ds.val_batches(4, 32, 8)
  assert val.shape == (4, 32, 9) and set(np.unique(val)) <= {10, 11, 12}
  np.testing.assert_array_equal(val, ds.val_batches(4, 32, 8))
  assert set(np.unique(ds.val_batches(2, 16, 8, source="s1"))) == {11}


@pytest.mark.parametrize("mixture, msg", [
    (("simple",), "expected 'source:weight'"), (("simple:lots",), "is not a number"),
    (("simple:0",), r"in \(0, 1\)"), (("simple:1.5",), r"in \(0, 1\)"),
    (("nowhere/at/all:0.2",), "unknown source"), (("simple:0.2", "simple:0.1"), "already"),
    (("simple:0.6", "stdlib:0.5"), "sum to 1.1")])
def test_malformed_mixtures_are_clear_errors(tmp_path, mixture, msg):
  with pytest.raises(ValueError, match=msg) as e:
    data.prepare_data(make_cfg(tmp_path, py_corpus(tmp_path), mixture=mixture))
  assert "data.mixture" in str(e.value)


# Cache and prepare_data ---------------------------------------------------------------------


def cache_state(cache):
  return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(cache.iterdir())}


def test_prepare_data_caches_tokenizer_and_tokens(tmp_path):
  cfg = make_cfg(tmp_path, py_corpus(tmp_path), val_frac=0.2)
  ds = data.prepare_data(cfg)
  cache = tmp_path / "cache"
  before = cache_state(cache)
  assert sorted(n.split("-")[0] for n in before) == ["tokenizer", "tokens", "tokens"]
  json.dumps(ds.stats)  # the training loop writes it to the workdir
  (st,) = ds.stats["sources"]
  assert st["train_docs"] + st["val_docs"] == 12 and st["val_docs"] >= 1
  assert st["train_tokens"] == len(ds.sources[0].train_N) > 0
  assert ds.sources[0].train_N.dtype == np.uint16 and ds.sources[0].train_N[0] == 0
  batch = ds.train_batch(0, 0, 4, 16)
  assert batch.shape == (4, 17) and batch.max() < 300
  ds2 = data.prepare_data(cfg)
  assert cache_state(cache) == before  # nothing retrained, retokenized or rewritten
  np.testing.assert_array_equal(ds2.train_batch(0, 0, 4, 16), batch)
  data.prepare_data(make_cfg(tmp_path, py_corpus(tmp_path), val_frac=0.2, vocab_size=320))
  after = cache_state(cache)
  assert len([n for n in after if n.startswith("tokenizer")]) == 2
  assert not [n for n in after if n.endswith(".tmp")]


def test_token_stream_decodes_to_the_documents(tmp_path):
  root = py_corpus(tmp_path, n=4)
  ds = data.prepare_data(make_cfg(tmp_path, root, val_frac=0.3, seq_len=4))
  docs, _ = data.load_corpus(str(root))
  train, _ = data.split_documents(docs, 0.3)
  text = ds.tokenizer.decode(ds.sources[0].train_N.tolist(), skip_special_tokens=False)
  assert text == "".join(data.EOT + d.text for d in train)


def test_prepare_data_rejects_bad_sizes(tmp_path):
  root = py_corpus(tmp_path)
  with pytest.raises(ValueError, match="model.vocab_size"):
    data.prepare_data(make_cfg(tmp_path, root, vocab_size=100))
  tiny = write_tree(tmp_path / "tiny", {f"m{i}.py": f"x = {i}\n" for i in range(5)})
  with pytest.raises(ValueError, match="data.corpus: .*split .*has .* fewer than"):
    data.prepare_data(make_cfg(tmp_path, tiny, seq_len=64))
  with pytest.raises(ValueError, match="data.corpus: corpus .*no such file"):
    data.prepare_data(make_cfg(tmp_path, tmp_path / "missing"))


def test_prepare_data_mixes_in_the_simple_corpus(tmp_path):
  cfg = make_cfg(tmp_path, py_corpus(tmp_path), mixture=("simple:0.5",), max_files=30)
  ds = data.prepare_data(cfg)
  assert [s.spec for s in ds.sources] == [str(tmp_path / "corpus"), "simple"]
  assert [s.weight for s in ds.sources] == [0.5, 0.5]
  simple = ds.stats["sources"][1]
  assert simple["train_docs"] + simple["val_docs"] == 30 and simple["skipped"] == {}
  assert ds.train_batch(1, 2, 8, 16).shape == (8, 17)
  cached = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("simple-")]
  assert len(cached) == 1
  lines = cached[0].read_text().splitlines()
  assert [json.loads(line)["text"] for line in lines] == corpus_gen.generate_corpus(30, 0)


def test_cache_dir_resolution(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "env"))
  assert data.resolve_cache_dir(None) == tmp_path / "env" and (tmp_path / "env").is_dir()
  assert data.resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_cached_write_is_atomic(tmp_path):
  def fail(tmp):
    tmp.write_text("half a file")
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    corpus.cached(tmp_path / "x.json", fail, "test")
  assert list(tmp_path.iterdir()) == []


# Generated corpus ---------------------------------------------------------------------------


def test_generated_corpus_is_valid_varied_and_deterministic():
  docs = corpus_gen.generate_corpus(300, seed=1)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. invalid escapes would warn
    for doc in docs:
      compile(doc, "<generated>", "exec")  # compile also catches duplicate arguments etc.
  assert docs == corpus_gen.generate_corpus(300, seed=1)
  assert docs[:10] == corpus_gen.generate_corpus(10, seed=1)
  assert docs[:10] != corpus_gen.generate_corpus(10, seed=2)
  assert len(set(docs)) == len(docs)
  text = "".join(docs)
  for idiom in ("def __init__(self", "self.", "for i, ", "enumerate(", "zip(", "range(",
                "while ", "elif ", " if ", "else:", "lambda ", "with open(", "try:", "except ",
                "f\"", "f'", "+= ", "return ", "import ", "# ", "class ", "[[", "{", "'", '"',
                "= set()", ".add(", "yield ", "@property", "@dataclass", "super().__init__(",
                "*args", "**kwargs", "finally:", " as fh:", "open(", ".close()", "[\n",
                "{\n", ":.2f}", "=True", "any(", "return True", "return False"):
    assert idiom in text, idiom
  assert re.search(r"\b(\w+), (\w+) = \2, \1\b", text)  # a swap
  assert re.search(r"with open\(\w+, [\"']w[\"']\) as \w+:", text)


# The stream `tasks.sample_task` draws each task's pairs from is keyed by (seed, task name);
# training-time evaluation and circuit search use seed 0 (train.seed, circuit.seed).
RAW_PAIRS = 300  # > the 256 pairs per task of the cpu preset's circuit search, plus rejects
MIN_PROMPT_CHARS = 20


def test_generated_corpus_never_contains_a_task_prompt():
  """No task prompt (any pair the train or test split can hold, of the 20 paper tasks and the
  induction control) occurs verbatim in a sample of the corpus. Prompts shorter than
  MIN_PROMPT_CHARS are fragments every Python file has (`for i in`, `if path`, `a, b = b,`)
  and are not checked; they are 2% of prompts or fewer in every task."""
  text = "\0".join(corpus_gen.generate_corpus(300, corpus.SIMPLE_SEED))
  # Every window of MIN_PROMPT_CHARS: a prompt can only occur where its start does.
  starts = {text[i:i + MIN_PROMPT_CHARS] for i in range(len(text) - MIN_PROMPT_CHARS + 1)}
  for name, spec in TASKS.items():
    rng = np.random.default_rng([0, zlib.crc32(name.encode())])  # as sample_task draws
    checked, leaked = 0, []
    for _ in range(RAW_PAIRS):
      pair = spec.generate(rng)
      for prompt in (pair.prompt_a.rstrip(), pair.prompt_b.rstrip()):
        if len(prompt) >= MIN_PROMPT_CHARS:
          checked += 1
          if prompt[:MIN_PROMPT_CHARS] in starts and prompt in text:
            leaked.append(prompt)
    assert checked >= 0.95 * 2 * RAW_PAIRS, (name, checked)
    assert not leaked, (name, leaked[:3])
