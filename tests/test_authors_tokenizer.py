"""Their tokenizer formats (tiktoken files, vocab.bpe + encoder.json) tokenise as tiktoken
does, with the authors' own pre-tokenizer spec, and an import with their tokenizer serves the
task generators."""

import base64
import json
import pickle
import zipfile
from pathlib import Path

import pytest

from experiments import import_model
from sparse_jax import data as data_lib
from sparse_jax import interop
from sparse_jax import tasks as tasks_lib
from sparse_jax.config import ModelConfig
from tests.authors_format import (FIXTURES, assert_trees_bitwise_equal, random_params,
                                  tiktoken_encode)


def test_tiktoken_file_tokenises_as_tiktoken(tiktoken_file):
  path, ranks = tiktoken_file
  tok = interop.tokenizer_from_tiktoken(path)
  assert tok.token_to_id(data_lib.EOT) == len(ranks)
  assert tok.get_vocab_size() == len(ranks) + 1
  texts = ["def add(a, b):\n    return a + b\n", "print(\"hello\")  # x\n\n\tvalues[[0]]",
           "héllo wörld 12345 ✓ <|endoftext|>", "    for v in values:\n        print(v)\n"]
  for text in texts:
    ids = tok.encode(text).ids
    assert ids == tiktoken_encode(text, ranks), text
    assert tok.decode(ids) == text
  assert len(tok.encode(texts[0]).ids) < len(texts[0].encode())  # merges are used


def test_authors_vocab_bpe_and_encoder_json_give_tiktoken_ids(tmp_path):
  """Their published pair (tinypython/vocab.bpe + encoder.json), ranked as tiktoken's loader
  ranks it: printable bytes first, then the other bytes, then merges in file order."""
  texts = ["def add(x, y):\n    return x + y\n", "print('hello world')\n"] * 20
  hf = data_lib.train_tokenizer(texts, 257 + 60)
  merges = json.loads(hf.to_str())["model"]["merges"]
  merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
  b2u = interop._byte_to_unicode()  # pylint: disable=protected-access
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  order = printable + [b for b in range(256) if b not in printable]
  encoder = {b2u[b]: i for i, b in enumerate(order)}
  for left, right in merges:
    encoder.setdefault(left + right, len(encoder))
  ranks = {bytes(next(k for k, v in b2u.items() if v == c) for c in text): i
           for text, i in encoder.items()}
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{l} {r}\n"
                                                                  for l, r in merges))
  (tmp_path / "encoder.json").write_text(json.dumps({**encoder, data_lib.EOT: len(encoder)}))
  tok = interop.load_authors_tokenizer(tmp_path)
  assert tok.token_to_id(data_lib.EOT) == len(ranks)
  for text in ["def add(a, b):\n    return a + b\n", "print('x') ~ \x7f é"]:
    assert tok.encode(text).ids == tiktoken_encode(text, ranks)
  encoder["!"] = 5
  (tmp_path / "encoder.json").write_text(json.dumps(encoder))
  with pytest.raises(ValueError, match="encoder.json: '!' has id 5, but vocab.bpe gives it 0"):
    interop.load_authors_tokenizer(tmp_path)


# The authors' tinypython_2k spec (their tiktoken_ext/tinypython.py; PAPER.md §1), written out
# here rather than imported from sparse_jax.data, so that the test checks the project's copy.
AUTHORS_PAT_STR = (r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"""
                   r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def test_tokenizer_matches_tiktoken_itself_with_the_authors_spec(tmp_path, monkeypatch):
  """tiktoken (a test-only dependency) built exactly as their tinypython_2k plugin builds it,
  from both file formats, gives the ids of the converted tokenizer on real Python source."""
  tiktoken = pytest.importorskip("tiktoken")
  from tiktoken import load as tiktoken_load  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
  assert data_lib.TINYPYTHON_PATTERN == AUTHORS_PAT_STR
  sources = [Path(json.__file__), Path(pickle.__file__), Path(zipfile.__file__)]
  texts = [p.read_text() for p in sources]
  hf = data_lib.train_tokenizer(texts[:2], 257 + 400)
  # Their published pair: vocab.bpe (merges, GPT-2 byte characters) + encoder.json (ids).
  merges = json.loads(hf.to_str())["model"]["merges"]
  merges = [m if isinstance(m, list) else m.split(" ") for m in merges]
  b2u = interop._byte_to_unicode()  # pylint: disable=protected-access
  printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
  encoder = {b2u[b]: i for i, b in enumerate(printable + [b for b in range(256)
                                                          if b not in printable])}
  for left, right in merges:
    encoder.setdefault(left + right, len(encoder))
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{l} {r}\n"
                                                                  for l, r in merges))
  (tmp_path / "encoder.json").write_text(json.dumps({**encoder, data_lib.EOT: len(encoder)}))
  ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(tmp_path / "vocab.bpe"),
                                                        str(tmp_path / "encoder.json"))
  # The same ranks as a tiktoken-format file.
  (tmp_path / "t.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                               for t, r in ranks.items()))
  assert tiktoken_load.load_tiktoken_bpe(str(tmp_path / "t.tiktoken")) == ranks
  theirs = tiktoken.Encoding(name="tinypython_test", pat_str=AUTHORS_PAT_STR,
                             mergeable_ranks=ranks, special_tokens={data_lib.EOT: len(ranks)})
  texts += ["héllo wörld 12345 ✓ \r\n\t  x\u00a0y  \n\n", "<|endoftext|> is text here"]
  for tok in (interop.load_authors_tokenizer(tmp_path),
              interop.load_authors_tokenizer(tmp_path / "t.tiktoken")):
    assert tok.token_to_id(data_lib.EOT) == theirs.eot_token == len(ranks)
    for text in texts:  # texts[2] was not seen by the BPE trainer
      assert tok.encode(text).ids == theirs.encode_ordinary(text)


def test_tiktoken_file_errors_name_the_line(tmp_path):
  path = tmp_path / "bad.tiktoken"
  path.write_text("IQ== 0\nnot-base64!! 1\n")
  with pytest.raises(ValueError, match=r"bad.tiktoken:2: not a tiktoken line"):
    interop.tokenizer_from_tiktoken(path)
  path.write_text("IQ== 0\n")
  with pytest.raises(ValueError, match="not a byte-level BPE"):
    interop.tokenizer_from_tiktoken(path)


def test_import_with_tiktoken_tokenizer_serves_the_tasks(tiktoken_file, tmp_path):
  path, ranks = tiktoken_file
  cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, d_head=16, d_mlp=64,
                    vocab_size=len(ranks) + 1, block_size=64)
  params = random_params(cfg)
  interop.write_model(tmp_path / "theirs", cfg, params)
  # A model trained here exports with exactly the fields of their released configs.
  beeg = json.loads((tmp_path / "theirs" / interop.CONFIG_FILE).read_text())
  released = json.loads((FIXTURES / "csp_like" / interop.CONFIG_FILE).read_text())
  assert list(beeg) == list(released) and beeg["d_head"] == 16 and not beeg["tied_unembed"]
  cfg2, params2, _ = interop.read_model(tmp_path / "theirs")
  assert cfg2 == cfg
  assert_trees_bitwise_equal(params2, params)
  run = tmp_path / "run"
  import_model.import_model(tmp_path / "theirs", run, tokenizer=path)
  tok = data_lib.load_tokenizer(run)
  text = "print('hello world')\n"
  assert tok.encode(text).ids == tiktoken_encode(text, ranks)
  samples, _ = tasks_lib.sample_task(tok, "single_double_quote", 2, seed=0, max_len=128)
  for pair, enc in samples:  # the task generators tokenise exactly as tiktoken would
    for prompt, seq in ((pair.prompt_a, enc.seq_a), (pair.prompt_b, enc.seq_b)):
      assert tuple(tiktoken_encode(prompt, ranks)[-len(seq):]) == tuple(seq)
  small_cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 256})
  interop.write_model(tmp_path / "small", small_cfg, random_params(small_cfg))
  with pytest.raises(ValueError, match="do not fit the model's vocab_size"):
    import_model.import_model(tmp_path / "small", tmp_path / "run2", tokenizer=path)
