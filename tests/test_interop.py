"""The authors' format: their models reproduce their outputs here, round trips are bitwise,
unsupported options and unsafe pickles are refused. (Their tokenizer: test_authors_tokenizer;
an imported run through the project's tools: test_imported_runs.)

The fixtures (tests/fixtures/authors_format/) were made with the authors' own code; see the
README there. Torch is not needed: the fixtures carry the outputs their forward computed.
"""

import dataclasses
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import export_model, import_model
from experiments import prune as prune_cli
from experiments import tasks as tasks_cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import interop
from sparse_jax import model as model_lib
from sparse_jax import torch_format
from sparse_jax.config import ModelConfig

from tests.authors_format import FIXTURES, assert_trees_bitwise_equal

MODELS = ("csp_like", "dense_like")


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
  assert_trees_bitwise_equal(params, params2)
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
  assert_trees_bitwise_equal(interop.read_model(tmp_path / "again")[1], params2)


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


@pytest.mark.parametrize("field,match", [("rope", "no rotary positions"),
                                         ("smear_keys", "no smeared keys")])
def test_options_their_format_lacks_are_refused_on_export(field, match, tmp_path):
  cfg, params, beeg = interop.read_model(FIXTURES / "csp_like")
  ours = dataclasses.replace(cfg, **{field: True})
  with pytest.raises(ValueError, match=f"model.{field}: the authors' GPT has {match}"):
    interop.write_model(tmp_path / "out", ours, params, beeg)
  assert not (tmp_path / "out").exists()  # refused before anything is written


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
  assert_trees_bitwise_equal(jax.tree.map(np.asarray, params), params0)
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
