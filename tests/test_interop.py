"""The authors' format: their models reproduce their outputs here, round trips are bitwise,
unsupported options and unsafe pickles are refused, their tokenizer format tokenises as theirs.

The fixtures (tests/fixtures/authors_format/) were made with the authors' own code; see the
README there. Torch is not needed: the fixtures carry the outputs their forward computed.
"""

import base64
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import circuit_table, export_model, import_model, scale_sweep
from experiments import prune as prune_cli
from experiments import tasks as tasks_cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import interop
from sparse_jax import model as model_lib
from sparse_jax import tasks as tasks_lib
from sparse_jax import torch_format
from sparse_jax.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures" / "authors_format"
MODELS = ("csp_like", "dense_like")


def _assert_trees_bitwise_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _their_hook_sites(cfg: ModelConfig) -> list[str]:
  """Their hooks that are not node sites here: the residual stream and the attention op's
  output before c_proj (PAPER.md §1, "Hooks")."""
  return [s for i in range(cfg.n_layer) for s in (f"{i}.resid_in", f"{i}.attn.y",
                                                  f"{i}.resid_mid")] + ["final_resid"]


def _forward_with_every_hook(params, tokens_BxL, cfg: ModelConfig):
  """(logits, {site: act}) for all their hook sites, computed by `model.forward` and its
  pieces (`embed`, `run_sublayers`). attn.y is read by running the attention sublayer with
  c_proj = identity, zero bias and no AbsTopK after it (needs n_head * d_head == d_model):
  its residual write is then y itself, added to the residual and taken off again."""
  logits_BxLxV, acts = model_lib.forward(params, tokens_BxL, cfg,
                                         capture=tuple(model_lib.node_sites(cfg)))
  assert cfg.d_attn == cfg.d_model
  cfg_y = ModelConfig(**{**cfg.__dict__, "afrac_loctypes": tuple(
      t for t in cfg.afrac_loctypes if t != "attn_out")})
  x_BxLxD = model_lib.embed(params, tokens_BxL, cfg)
  for j in range(model_lib.n_sublayers(cfg)):
    i = j // 2
    if j % 2 == 0:
      acts[f"{i}.resid_in"] = x_BxLxD
      blocks = dict(params["blocks"])
      blocks[str(i)] = {**blocks[str(i)], "attn": {**blocks[str(i)]["attn"], "c_proj": {
          "w": np.eye(cfg.d_attn, dtype=np.float32), "b": np.zeros(cfg.d_model, np.float32)}}}
      acts[f"{i}.attn.y"] = model_lib.run_sublayers(
          {**params, "blocks": blocks}, x_BxLxD, cfg_y, j, j + 1) - x_BxLxD
    else:
      acts[f"{i}.resid_mid"] = x_BxLxD
    x_BxLxD = model_lib.run_sublayers(params, x_BxLxD, cfg, j, j + 1)
  acts["final_resid"] = x_BxLxD
  return logits_BxLxV, acts


@pytest.mark.parametrize("name", MODELS)
def test_forward_reproduces_their_logits_and_every_hook_site(name):
  cfg, params, _ = interop.read_model(FIXTURES / name)
  tokens_BxL = np.load(FIXTURES / name / "tokens.npy")
  expected = np.load(FIXTURES / name / "expected.npz")
  sites = [*model_lib.node_sites(cfg), *_their_hook_sites(cfg)]
  assert sorted(expected.files) == sorted(["logits", *sites])  # every hook their model has
  logits_BxLxV, acts = jax.jit(lambda p, t: _forward_with_every_hook(p, t, cfg))(
      params, tokens_BxL)
  np.testing.assert_allclose(logits_BxLxV, expected["logits"], rtol=0, atol=1e-5)
  for site in sites:
    np.testing.assert_allclose(acts[site], expected[site], rtol=0, atol=1e-5, err_msg=site)


def test_fixture_configs_map_as_described():
  csp, csp_params, _ = interop.read_model(FIXTURES / "csp_like")
  dense, dense_params, beeg = interop.read_model(FIXTURES / "dense_like")
  assert (csp.sink, csp.afrac, csp.afrac_loctypes) == (
      True, 0.125, ("attn_in", "attn_out", "mlp_in", "mlp_out", "mlp_neuron", "attn_v"))
  assert not csp.learned_pos_emb and not csp.final_logits_bias  # zero wpe and bias: off
  assert (dense.sink, dense.afrac, beeg["tied_unembed"]) == (False, None, True)
  np.testing.assert_array_equal(dense_params["lm_head"]["w"], dense_params["wte"].T)
  assert not np.array_equal(csp_params["lm_head"]["w"], csp_params["wte"].T)


@pytest.mark.parametrize("name", MODELS)
def test_write_then_read_is_bitwise_identical(name, tmp_path):
  cfg, params, beeg = interop.read_model(FIXTURES / name)
  interop.write_model(tmp_path, cfg, params, beeg)
  cfg2, params2, beeg2 = interop.read_model(tmp_path)
  assert cfg2 == cfg and beeg2 == beeg
  _assert_trees_bitwise_equal(params, params2)
  # Their state dict itself survives: same names, order, shapes and bytes.
  ours = torch_format.read_state_dict(tmp_path / interop.WEIGHTS_FILE)
  theirs = torch_format.read_state_dict(FIXTURES / name / interop.WEIGHTS_FILE)
  assert list(ours) == list(theirs)
  for key in theirs:
    assert ours[key].tobytes() == theirs[key].tobytes() and ours[key].shape == theirs[key].shape
  # Tied weights are written as one shared storage, as torch does.
  with zipfile.ZipFile(tmp_path / interop.WEIGHTS_FILE) as zf:
    n_storages = sum("/data/" in n for n in zf.namelist())
  assert n_storages == len(ours) - int(beeg["tied_unembed"])


def test_nonzero_positions_and_logit_bias_are_loaded_and_exported(tmp_path):
  _, _, beeg = interop.read_model(FIXTURES / "csp_like")
  sd = torch_format.read_state_dict(FIXTURES / "csp_like" / interop.WEIGHTS_FILE)
  rng = np.random.default_rng(0)
  sd["transformer.wpe.weight"] = rng.normal(size=sd["transformer.wpe.weight"].shape).astype(
      np.float32)
  sd["final_logits_bias"] = np.zeros_like(sd["final_logits_bias"])
  sd["final_logits_bias"][3] = -0.0  # a signed zero is not "all zero": it must round-trip
  torch_format.write_state_dict(tmp_path / interop.WEIGHTS_FILE, sd)
  shutil.copy(FIXTURES / "csp_like" / interop.CONFIG_FILE, tmp_path)
  cfg2, params2, _ = interop.read_model(tmp_path)
  assert cfg2.learned_pos_emb and cfg2.final_logits_bias
  np.testing.assert_array_equal(params2["wpe"], sd["transformer.wpe.weight"])
  interop.write_model(tmp_path / "again", cfg2, params2, beeg)
  _assert_trees_bitwise_equal(interop.read_model(tmp_path / "again")[1], params2)


def _random_params(cfg: ModelConfig, seed: int = 0):
  """init_params' tree with random values, without running init (slow eagerly on 2 cores)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def test_final_logits_bias_off_by_default_and_added_when_on():
  cfg, params, _ = interop.read_model(FIXTURES / "dense_like")
  assert not ModelConfig().final_logits_bias and not cfg.final_logits_bias
  assert "final_logits_bias" not in jax.eval_shape(
      lambda: model_lib.init_params(ModelConfig(), jax.random.PRNGKey(0)))
  on = ModelConfig(**{**cfg.__dict__, "final_logits_bias": True})
  assert "final_logits_bias" in jax.eval_shape(
      lambda: model_lib.init_params(on, jax.random.PRNGKey(0)))
  tokens = np.load(FIXTURES / "dense_like" / "tokens.npy")
  base = jax.jit(lambda p, t: model_lib.forward(p, t, cfg))(params, tokens)
  np.testing.assert_allclose(base, np.load(FIXTURES / "dense_like" / "expected.npz")["logits"],
                             rtol=0, atol=1e-5)  # the default forward is theirs, unchanged
  bias = np.linspace(-1, 1, cfg.vocab_size).astype(np.float32)
  with_bias = jax.jit(lambda p, t: model_lib.forward(p, t, on))(
      {**params, "final_logits_bias": bias}, tokens)
  np.testing.assert_allclose(with_bias, base + bias, rtol=0, atol=1e-5)


REFUSED = [("rms_norm", False), ("bias", False), ("residual_activation_type", "relu"),
           ("d_pos_emb", 16), ("sinusoidal_cat_pos_emb", True), ("dropout_cat_pos_emb", True),
           ("activation_type", "swiglu"), ("afrac_loctypes", "attn_in,resid_post_attn"),
           ("some_new_option", 1)]


@pytest.mark.parametrize("field,value", REFUSED)
def test_unsupported_option_is_refused_naming_the_field(field, value, tmp_path):
  beeg = json.loads((FIXTURES / "csp_like" / interop.CONFIG_FILE).read_text())
  beeg[field] = value
  (tmp_path / interop.CONFIG_FILE).write_text(json.dumps(beeg))
  shutil.copy(FIXTURES / "csp_like" / interop.WEIGHTS_FILE, tmp_path)
  with pytest.raises(ValueError, match=f"{interop.CONFIG_FILE}: {field}:"):
    interop.read_model(tmp_path)


def test_state_dict_mismatches_name_the_key(tmp_path):
  shutil.copy(FIXTURES / "csp_like" / interop.CONFIG_FILE, tmp_path)
  sd = torch_format.read_state_dict(FIXTURES / "csp_like" / interop.WEIGHTS_FILE)
  sd["transformer.h.0.ln_1.bias"] = np.zeros(64, np.float32)  # a LayerNorm bias
  torch_format.write_state_dict(tmp_path / interop.WEIGHTS_FILE, sd)
  with pytest.raises(ValueError, match="unexpected transformer.h.0.ln_1.bias"):
    interop.read_model(tmp_path)
  del sd["transformer.h.0.ln_1.bias"], sd["transformer.h.1.attn.attn_imp.sink_logit"]
  torch_format.write_state_dict(tmp_path / interop.WEIGHTS_FILE, sd)
  with pytest.raises(ValueError, match="missing transformer.h.1.attn.attn_imp.sink_logit"):
    interop.read_model(tmp_path)


class _Payload:
  """Unpickling this would run a shell command (the classic pickle attack)."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    import os  # pylint: disable=import-outside-toplevel
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "in_state_dict"])
def test_pickle_with_foreign_global_is_refused(where, tmp_path):
  marker = tmp_path / "pwned"
  payload = _Payload(marker)
  obj = payload if where == "top" else {"transformer.wte.weight": payload}
  src = FIXTURES / "csp_like" / interop.WEIGHTS_FILE
  crafted = tmp_path / interop.WEIGHTS_FILE
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(crafted, "w") as zout:
    for info in zin.infolist():  # everything as torch wrote it, but a malicious data.pkl
      data = pickle.dumps(obj, protocol=2) if info.filename.endswith("data.pkl") \
          else zin.read(info)
      zout.writestr(info, data)
  with pytest.raises(torch_format.UnsafePickleError, match=r"refusing to unpickle the global "
                     r"(os|posix)\.system"):
    torch_format.read_state_dict(crafted)
  assert not marker.exists()
  shutil.copy(FIXTURES / "csp_like" / interop.CONFIG_FILE, tmp_path)
  with pytest.raises(ValueError, match="refusing"):
    interop.read_model(tmp_path)
  assert not marker.exists()


def test_tensor_reading_past_its_storage_is_refused(tmp_path):
  entries = [("w", "0", "FloatStorage", (4, 4))]  # claims 16 floats; the storage holds 4
  with zipfile.ZipFile(tmp_path / "m.pt", "w") as zf:
    zf.writestr("m/data.pkl", torch_format._pickle(entries))  # pylint: disable=protected-access
    zf.writestr("m/data/0", np.zeros(4, np.float32).tobytes())
  with pytest.raises(ValueError, match="storage 0 holds 16 bytes"):
    torch_format.read_state_dict(tmp_path / "m.pt")


def test_import_export_cli_round_trip(tmp_path, capsys):
  src = FIXTURES / "dense_like"
  run = tmp_path / "run"
  assert import_model.main(["--from", str(src), "--workdir", str(run)]) == 0
  cfg, params, step = ckpt_lib.load_params(run)
  assert step == import_model.IMPORT_STEP
  cfg0, params0, _ = interop.read_model(src)
  assert cfg.model == cfg0
  _assert_trees_bitwise_equal(jax.tree.map(np.asarray, params), params0)
  assert export_model.main(["--workdir", str(run), "--out", str(tmp_path / "out")]) == 0
  assert (tmp_path / "out" / interop.CONFIG_FILE).read_bytes() == \
      (src / interop.CONFIG_FILE).read_bytes()
  ours = torch_format.read_state_dict(tmp_path / "out" / interop.WEIGHTS_FILE)
  theirs = torch_format.read_state_dict(src / interop.WEIGHTS_FILE)
  assert all(ours[k].tobytes() == theirs[k].tobytes() for k in theirs) and ours.keys() == \
      theirs.keys()
  # No tokenizer was given: a tool that needs text says so in one line.
  capsys.readouterr()
  assert tasks_cli.main(["--list", "--workdir", str(run)]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "cannot load tokenizer: no such file" in err and "--tokenizer" in err
  assert prune_cli.main(["--workdir", str(run), "--tasks", "single_double_quote"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "cannot load tokenizer: no such file" in err and "--tokenizer" in err
  # A second import into the same run is refused rather than mixed in.
  assert import_model.main(["--from", str(src), "--workdir", str(run)]) == 2
  # --set takes the run's data, train and circuit settings; the model is the files'.
  assert import_model.main(["--from", str(src), "--workdir", str(tmp_path / "run2"),
                            "--set", "model.d_model=32"]) == 2
  assert "--set 'model.d_model=32': only data.*, train.*, circuit.* can be set" in \
      capsys.readouterr().err
  assert import_model.main(["--from", str(src), "--workdir", str(tmp_path / "run2"),
                            "--set", "data.corpus=simple", "--set", "circuit.steps=7"]) == 0
  cfg2 = ckpt_lib.load_config(tmp_path / "run2")
  assert (cfg2.data.corpus, cfg2.circuit.steps, cfg2.model) == ("simple", 7, cfg.model)


# Tokenizer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
  """A tiktoken-format file whose ranks are a BPE trained here (bytes first, then merges)."""
  tmp_path, n_merges = tmp_path_factory.mktemp("tiktoken"), 120
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


def _tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
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


def test_tiktoken_file_tokenises_as_tiktoken(tiktoken_file):
  path, ranks = tiktoken_file
  tok = interop.tokenizer_from_tiktoken(path)
  assert tok.token_to_id(data_lib.EOT) == len(ranks)
  assert tok.get_vocab_size() == len(ranks) + 1
  texts = ["def add(a, b):\n    return a + b\n", "print(\"hello\")  # x\n\n\tvalues[[0]]",
           "héllo wörld 12345 ✓ <|endoftext|>", "    for v in values:\n        print(v)\n"]
  for text in texts:
    ids = tok.encode(text).ids
    assert ids == _tiktoken_encode(text, ranks), text
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
    assert tok.encode(text).ids == _tiktoken_encode(text, ranks)
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
  params = _random_params(cfg)
  interop.write_model(tmp_path / "theirs", cfg, params)
  # A model trained here exports with exactly the fields of their released configs.
  beeg = json.loads((tmp_path / "theirs" / interop.CONFIG_FILE).read_text())
  released = json.loads((FIXTURES / "csp_like" / interop.CONFIG_FILE).read_text())
  assert list(beeg) == list(released) and beeg["d_head"] == 16 and not beeg["tied_unembed"]
  cfg2, params2, _ = interop.read_model(tmp_path / "theirs")
  assert cfg2 == cfg
  _assert_trees_bitwise_equal(params2, params)
  run = tmp_path / "run"
  import_model.import_model(tmp_path / "theirs", run, tokenizer=path)
  tok = data_lib.load_tokenizer(run)
  text = "print('hello world')\n"
  assert tok.encode(text).ids == _tiktoken_encode(text, ranks)
  samples, _ = tasks_lib.sample_task(tok, "single_double_quote", 2, seed=0, max_len=128)
  for pair, enc in samples:  # the task generators tokenise exactly as tiktoken would
    for prompt, seq in ((pair.prompt_a, enc.seq_a), (pair.prompt_b, enc.seq_b)):
      assert tuple(_tiktoken_encode(prompt, ranks)[-len(seq):]) == tuple(seq)
  small_cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": 256})
  interop.write_model(tmp_path / "small", small_cfg, _random_params(small_cfg))
  with pytest.raises(ValueError, match="do not fit the model's vocab_size"):
    import_model.import_model(tmp_path / "small", tmp_path / "run2", tokenizer=path)


# An imported model through every tool ---------------------------------------------------------


def _csp_like_with_vocab(directory: Path, vocab_size: int, seed: int = 0) -> None:
  """csp_like in their format, its vocabulary grown to `vocab_size` (new rows random, 25%
  nonzero as the rest), so that a byte-level tokenizer (>= 257 tokens) fits it."""
  beeg = json.loads((FIXTURES / "csp_like" / interop.CONFIG_FILE).read_text())
  sd = torch_format.read_state_dict(FIXTURES / "csp_like" / interop.WEIGHTS_FILE)
  rng, extra = np.random.default_rng(seed), vocab_size - beeg["vocab_size"]
  sparse = lambda *shape: (rng.normal(0, 0.5, shape) * (rng.random(shape) < 0.25)).astype(
      np.float32)
  for key in ("transformer.wte.weight", "lm_head.weight"):
    sd[key] = np.concatenate([sd[key], sparse(extra, sd[key].shape[1])])
  table = sd["bigram_table"]
  sd["bigram_table"] = np.block([[table, sparse(table.shape[0], extra)],
                                 [sparse(extra, vocab_size)]])
  sd["final_logits_bias"] = np.zeros(vocab_size, np.float32)
  beeg["vocab_size"] = vocab_size
  directory.mkdir()
  torch_format.write_state_dict(directory / interop.WEIGHTS_FILE, sd)
  (directory / interop.CONFIG_FILE).write_text(json.dumps(beeg))


# One prune of a tiny model is about 30 s on an idle 2-core CPU (compiles), minutes when shared.
@pytest.mark.slow
def test_imported_model_goes_through_tasks_prune_and_the_sweeps_aggregation(
    tiktoken_file, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))
  path, ranks = tiktoken_file
  _csp_like_with_vocab(tmp_path / "theirs", len(ranks) + 1)
  run = tmp_path / "runs" / "csp_like"
  data_args = ["--set", "data.max_files=120", "--set", "train.batch_size=4",
               "--set", "train.eval_batches=2"]
  assert import_model.main(["--from", str(tmp_path / "theirs"), "--tokenizer", str(path),
                            "--workdir", str(run)] + data_args) == 0
  assert tasks_cli.main(["--show", "single_double_quote", "-n", "1", "--workdir", str(run)]) == 0
  tasks = "single_double_quote,bracket_counting"
  circuit_args = ["--target-loss", "1.0", "--no-progress", "--tasks", tasks] + [
      a for o in ("steps=10", "batch_size=8", "mean_batches=1", "n_train_pairs=16",
                  "n_select_pairs=16", "n_heldout_pairs=16", "bisect_candidates=4",
                  "eval_max_seqs=160", "lbfgs_steps=4")
      for a in ("--set", f"circuit.{o}")]
  assert prune_cli.main(["--workdir", str(run)] + circuit_args) == 0
  summary = json.loads((run / "circuits" / "summary.json").read_text())
  assert summary["step"] == import_model.IMPORT_STEP and set(summary["tasks"]) == set(
      tasks.split(","))
  capsys.readouterr()
  assert circuit_table.main([str(run / "circuits"), "--targets", "1.0"]) == 0
  n_solved = sum(s["solvable"] and s["meets_target_test"] for s in summary["tasks"].values())
  assert f"| circuits | 1.0 | {n_solved}/20 |" in capsys.readouterr().out

  # The sweep's aggregation takes it as a row beside (here: without) the grid's points.
  out = tmp_path / "sweep"
  sweep_args = ["--preset", "tiny", "--out", str(out), "--collect",
                "--set", "circuit.target_loss=1.0"]
  capsys.readouterr()
  assert scale_sweep.main(sweep_args + ["--add", str(run)]) == 0
  results = json.loads((out / "results.json").read_text())
  assert results["added"] == ["csp_like"] and len(results["rows"]) == 1
  row = results["rows"][0]
  cfg, params, _ = interop.read_model(tmp_path / "theirs")
  counted = [params["wte"], params["lm_head"]["w"]] + [
      x for b in params["blocks"].values() for sub in (b["attn"], b["mlp"])
      for name in ("c_attn", "c_proj", "c_fc") if name in sub for x in sub[name].values()]
  assert row["l0"] == sum(int(np.count_nonzero(x)) for x in counted)
  assert row["sparsifiable_params"] == sum(x.size for x in counted)
  assert row["l0_target"] == row["l0"]  # about a quarter nonzero: a sparse model
  assert (row["width"], row["n_layer"]) == (cfg.d_model, cfg.n_layer)
  assert 0.2 < row["weight_density"] < 0.3 and row["weight_density"] != 1 / 16
  # Its validation loss: the same batches training would evaluate, in its own tokens.
  run_cfg = ckpt_lib.load_config(run)
  dataset = data_lib.prepare_data(run_cfg, tokenizer=data_lib.load_tokenizer(run))
  batches = dataset.val_batches(2, 4, run_cfg.train.seq_len)
  assert batches.max() < len(ranks) and batches.shape == (2, 4, 65)
  expected_loss = np.mean([float(model_lib.next_token_loss(params, b, cfg)) for b in batches])
  assert row["val_loss"] == pytest.approx(expected_loss, abs=1e-5)
  assert row["task_loss_full"].keys() == summary["tasks"].keys()
  assert row["task_edges"] == {t: s["edges"] for t, s in summary["tasks"].items()
                               if s["solvable"]}
  assert "Runs added to the grid (`--add`):** csp_like" in (out / "report.md").read_text()


def test_sweep_aggregation_refuses_an_added_run_it_cannot_compare(tmp_path, capsys):
  run = tmp_path / "dense_like"
  assert import_model.main(["--from", str(FIXTURES / "dense_like"), "--workdir", str(run)]) == 0
  args = ["--preset", "tiny", "--out", str(tmp_path / "sweep"), "--collect"]
  capsys.readouterr()
  assert scale_sweep.main(args + ["--add", str(run)]) == 2  # not pruned yet
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no circuits/summary.json" in err and \
      f"python -m experiments.prune --workdir {run} --target-loss 1.0" in err
  (run / "circuits").mkdir()
  (run / "circuits" / "summary.json").write_text(json.dumps({"target_loss": 0.15}))
  assert scale_sweep.main(args + ["--add", str(run)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "searched at target 0.15, the sweep's is 1.0" in err
  (tmp_path / "d32_dense").symlink_to(run)  # named like a grid point of the tiny sweep
  assert scale_sweep.main(args + ["--add", str(tmp_path / "d32_dense")]) == 2
  assert "['d32_dense'] already taken by a grid point" in capsys.readouterr().err
  assert not (tmp_path / "sweep" / "results.json").exists()
