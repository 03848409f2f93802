"""Bridges: identity bridges cost nothing, every loss term against a hand computation, steering
at strength 0 is the plain dense model bit for bit, a resumed bridge run is bitwise the
uninterrupted one, and steer's default channel comes from the pruned circuit (or steer says
in one line what it needs)."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from experiments import bridges as bridges_cli
from experiments import prune as prune_cli
from sparse_jax import bridges
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import masks
from sparse_jax import model as model_lib
from sparse_jax import tasks as tasks_lib
from sparse_jax import train as train_lib
from sparse_jax.circuits import Circuit
from sparse_jax.config import ModelConfig
from tests.test_train import tiny_config

# 1 layer: sublayer 0 is its attention, 1 its MLP. Different widths on the two sides.
DENSE = ModelConfig(n_layer=1, d_model=32, n_head=2, d_head=16, d_mlp=64, vocab_size=40,
                    block_size=16)
SPARSE = dataclasses.replace(DENSE, d_model=16, n_head=1, d_mlp=32)


def _batch(seed=0, B=3, L1=9):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, L1), 0, DENSE.vocab_size)


def _with_bigram_noise(params, key):
  # Freshly initialised models are nearly uniform; a random bigram table makes the KLs large.
  params["bigram"] = jax.random.normal(key, params["bigram"].shape)
  return params


def test_identity_bridges_give_zero_nmse_and_kl():
  cfg = dataclasses.replace(DENSE, n_layer=2)
  params = _with_bigram_noise(model_lib.init_params(cfg, jax.random.PRNGKey(0)),
                              jax.random.PRNGKey(1))
  S, D = 4, cfg.d_model
  eye = jnp.broadcast_to(jnp.eye(D), (S, D, D))
  rho = jnp.full((S,), 2.5)  # equal scales on both sides cancel
  params["bridges"] = {"enc": {"w": eye, "b": jnp.zeros((S, D))},
                       "dec": {"w": eye, "b": jnp.zeros((S, D))},
                       "rms": {"dense": rho, "sparse": rho}}
  bcfg = bridges.BridgeConfig(enc_afrac=1.0)
  _, m = bridges.bridge_loss(params, params, _batch(), cfg, cfg, bcfg)
  assert m["ce_sparse"] == m["ce_dense"] and m["kl_full"] == 0.0
  for j in range(S):
    site = bridges.site_name(j)
    for term in ("nmse_enc", "nmse_dec", "kl_ds", "kl_sd"):
      assert abs(float(m[f"bridge/{site}/{term}"])) < 1e-6, (site, term)
    np.testing.assert_allclose(m[f"bridge/{site}/ce_ds"], m["ce_dense"], rtol=1e-6)
  # A top-k encoder is no longer the identity: the reconstruction error shows.
  _, m = bridges.bridge_loss(params, params, _batch(), cfg, cfg, bridges.BridgeConfig())
  assert float(m["bridge/1.attn/nmse_enc"]) > 0.05


# --- numpy by hand ---


def _rms(x, scale):
  return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + np.finfo(np.float32).eps) * scale


def _topk(x, k):
  out = np.zeros_like(x)
  idx = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
  np.put_along_axis(out, idx, np.take_along_axis(x, idx, -1), -1)
  return out


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(ref_logits, logits):
  p, q = _log_softmax(ref_logits), _log_softmax(logits)
  return np.mean(np.sum(np.exp(p) * (p - q), -1))


def _mlp_then_unembed(p, h, tokens):
  b = p["blocks"]["0"]["mlp"]
  pre = _rms(h, p["blocks"]["0"]["ln_2"]["scale"]) @ b["c_fc"]["w"] + b["c_fc"]["b"]
  act = 0.5 * pre * (1 + erf(pre / np.sqrt(2)))
  h = h + act @ b["c_proj"]["w"] + b["c_proj"]["b"]
  return _rms(h, p["ln_f"]["scale"]) @ p["lm_head"]["w"] + p["bigram"][tokens]


@pytest.mark.parametrize("norm", ["token", "batch"])
def test_loss_terms_match_hand_computation(norm):
  dense = _with_bigram_noise(model_lib.init_params(DENSE, jax.random.PRNGKey(0)),
                             jax.random.PRNGKey(1))
  sparse = _with_bigram_noise(model_lib.init_params(SPARSE, jax.random.PRNGKey(2)),
                              jax.random.PRNGKey(3))
  bcfg = bridges.BridgeConfig(ce_coef=0.5, nmse_coef=2.0, kl_ds_coef=3.0, kl_sd_coef=0.25,
                              kl_full_coef=1.5, nmse_norm=norm, enc_afrac=0.5)
  rho_d, rho_s = np.array([3.0, 0.5], np.float32), np.array([0.25, 2.0], np.float32)
  sparse["bridges"] = bridges.init_bridges(DENSE, SPARSE, bcfg, jax.random.PRNGKey(4),
                                           rho_d, rho_s)
  batch = _batch()
  loss, m = bridges.bridge_loss(sparse, dense, batch, SPARSE, DENSE, bcfg)

  np_ = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
  d, s, br = np_(dense), np_(sparse), np_(sparse["bridges"])
  tokens, targets = np.asarray(batch[:, :-1]), np.asarray(batch[:, 1:])
  enc = lambda j, h: rho_s[j] * _topk(  # noqa: E731
      h / rho_d[j] @ br["enc"]["w"][j] + br["enc"]["b"][j], 8)
  dec = lambda j, h: rho_d[j] * (h / rho_s[j] @ br["dec"]["w"][j] + br["dec"]["b"][j])  # noqa: E731

  def nmse(pred, t):
    err = np.sum((pred - t) ** 2, -1)
    return np.mean(err / np.sum(t**2, -1)) if norm == "token" else \
        np.mean(err) / np.sum(np.var(t, axis=(0, 1)))

  # Residuals: sublayer 0 reads the embeddings, sublayer 1 adds the attention's write.
  logits_d, acts_d = model_lib.forward(dense, tokens, DENSE, capture=("0.attn.resid_delta",))
  logits_s, acts_s = model_lib.forward(sparse, tokens, SPARSE, capture=("0.attn.resid_delta",))
  hd = [d["wte"][tokens], d["wte"][tokens] + np.asarray(acts_d["0.attn.resid_delta"])]
  hs = [s["wte"][tokens], s["wte"][tokens] + np.asarray(acts_s["0.attn.resid_delta"])]
  logits_d, logits_s = np.asarray(logits_d), np.asarray(logits_s)
  # Hybrids at sublayer 0 are the other model with its embedding table mapped by the bridge
  # (the bridge acts token by token); at sublayer 1, the last MLP and unembedding by hand.
  ds0 = np.asarray(model_lib.forward({**sparse, "wte": enc(0, d["wte"])}, tokens, SPARSE))
  sd0 = np.asarray(model_lib.forward({**dense, "wte": dec(0, s["wte"])}, tokens, DENSE))
  ds1 = _mlp_then_unembed(s, enc(1, hd[1]), tokens)
  sd1 = _mlp_then_unembed(d, dec(1, hs[1]), tokens)

  def ce(logits):
    return -np.mean(np.take_along_axis(_log_softmax(logits), targets[..., None], -1))

  want = {"ce_sparse": ce(logits_s), "ce_dense": ce(logits_d), "kl_full": _kl(logits_d, logits_s),
          "bridge/0.attn/nmse_enc": nmse(enc(0, hd[0]), hs[0]),
          "bridge/0.attn/nmse_dec": nmse(dec(0, hs[0]), hd[0]),
          "bridge/0.mlp/nmse_enc": nmse(enc(1, hd[1]), hs[1]),
          "bridge/0.mlp/nmse_dec": nmse(dec(1, hs[1]), hd[1]),
          "bridge/0.attn/kl_ds": _kl(logits_d, ds0), "bridge/0.attn/kl_sd": _kl(logits_d, sd0),
          "bridge/0.mlp/kl_ds": _kl(logits_d, ds1), "bridge/0.mlp/kl_sd": _kl(logits_d, sd1),
          "bridge/0.attn/ce_ds": ce(ds0), "bridge/0.attn/ce_sd": ce(sd0),
          "bridge/0.mlp/ce_ds": ce(ds1), "bridge/0.mlp/ce_sd": ce(sd1)}
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
  assert min(want[f"bridge/{s}/{t}"] for s in ("0.attn", "0.mlp") for t in ("kl_ds", "kl_sd")) \
      > 1e-3  # the terms checked are not trivially zero
  total = (0.5 * want["ce_sparse"] + 1.5 * want["kl_full"]
           + 2.0 * sum(v for k, v in want.items() if "nmse" in k)
           + 3.0 * (want["bridge/0.attn/kl_ds"] + want["bridge/0.mlp/kl_ds"])
           + 0.25 * (want["bridge/0.attn/kl_sd"] + want["bridge/0.mlp/kl_sd"]))
  np.testing.assert_allclose(float(loss), total, rtol=2e-5)
  # The dense model is frozen (no gradient reaches it), and so are the bridges' scales.
  g = jax.grad(lambda dp: bridges.bridge_loss(sparse, dp, batch, SPARSE, DENSE, bcfg)[0])(dense)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g))
  g = jax.grad(lambda sp: bridges.bridge_loss(sp, dense, batch, SPARSE, DENSE, bcfg)[0])(sparse)
  assert float(jnp.max(jnp.abs(g["bridges"]["rms"]["dense"]))) == 0.0
  assert float(jnp.max(jnp.abs(g["bridges"]["rms"]["sparse"]))) == 0.0
  assert float(jnp.max(jnp.abs(g["bridges"]["dec"]["w"]))) > 0.0


def test_steering_at_strength_zero_is_the_dense_model_bitwise():
  dense = model_lib.init_params(DENSE, jax.random.PRNGKey(0))
  sparse = model_lib.init_params(SPARSE, jax.random.PRNGKey(2))
  sparse["bridges"] = bridges.init_bridges(DENSE, SPARSE, bridges.BridgeConfig(),
                                           jax.random.PRNGKey(4), [3.0, 0.5], [0.25, 2.0])
  tokens = _batch(B=4, L1=10)
  presented, counterfactual = tokens[:, :-1], tokens[:, 1:]
  pos = jnp.array([8, 5, 8, 0])
  # Op by op (as `steer` runs it): separately jitted programs may fuse differently and
  # differ in the last bit, which would hide whether the edit itself changes anything.
  # The full forward, read at pos: forward(positions_B=...) runs its last layer at those
  # positions only, equal to this up to float rounding, not bitwise.
  plain = model_lib.forward(dense, presented, DENSE)[jnp.arange(4), pos]
  for j in range(2):
    # The edit is the decoder's image of the channels' change, rho ratio included.
    h_p, h_c = (bridges.residuals(sparse, t, SPARSE)[0][j] for t in (presented, counterfactual))
    for channels in ((3,), (3, 7, 12)):
      edited = h_p.at[..., channels].set(h_c[..., channels])
      want = bridges.decode(sparse["bridges"], j, edited) - bridges.decode(sparse["bridges"], j,
                                                                          h_p)
      got = bridges.steering_direction(sparse, SPARSE, presented, counterfactual, j, channels)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
      assert float(jnp.max(jnp.abs(got))) > 1e-3
    add = bridges.steering_direction(sparse, SPARSE, presented, counterfactual, j, (3,))
    steered = lambda s, add=add, j=j: bridges.steered_logits(  # noqa: E731
        dense, DENSE, presented, j, add, s, pos)
    np.testing.assert_array_equal(np.asarray(steered(jnp.float32(0.0))), np.asarray(plain))
    assert float(jnp.max(jnp.abs(steered(jnp.float32(1.0)) - plain))) > 1e-4
  assert bridges.parse_channel("0.mlp.15", SPARSE) == (1, (15,))
  assert bridges.parse_channel("0.attn.15+2", SPARSE) == (0, (15, 2))
  assert bridges.parse_channel("0.attn.all", SPARSE) == (0, tuple(range(16)))
  nodes = {"0.mlp.act_in": [4, 9], "0.attn.act_in": []}
  assert bridges.parse_channel("0.mlp.circuit", SPARSE, nodes) == (1, (4, 9))
  for bad, msg in (("0.q.1", "LAYER.SITE.CHANNELS"), ("0.mlp.1+x", "LAYER.SITE.CHANNELS"),
                   ("0.mlp.16", "16 residual channels"), ("0.attn.circuit", "needs the task")):
    with pytest.raises(ValueError, match=msg):
      bridges.parse_channel(bad, SPARSE)
  with pytest.raises(ValueError, match="reads no channel at 0.attn.act_in"):
    bridges.parse_channel("0.attn.circuit", SPARSE, nodes)


@pytest.mark.slow  # trains three small runs (dense, bridged, resumed)
def test_resumed_bridge_run_is_bitwise_identical(tmp_path):
  cache = tmp_path / "cache"
  dense_cfg = tiny_config(cache, "sparsity.enabled=false", "train.steps=4",
                          "train.ckpt_every=4")
  train_lib.train(dense_cfg, tmp_path / "dense", progress=False)
  # As if the corpus's BPE had changed since the dense run: the bridged run must still read
  # the dense run's own token ids.
  data_lib.save_tokenizer(data_lib.train_tokenizer(["def f(x):\n    return 'a' + \"b\"\n"] * 4,
                                                   300), tmp_path / "dense")
  over = ["train.steps=12", "train.ckpt_every=6", "train.log_every=3", "train.eval_every=12",
          "bridge.kl_full_coef=0.5"]
  ref = bridges_cli.train_bridges(tmp_path / "dense", tmp_path / "ref", overrides=over,
                                  progress=False)
  shutil.copytree(tmp_path / "ref", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")  # as if killed after step 6
  resumed = bridges_cli.train_bridges(tmp_path / "dense", tmp_path / "resumed", overrides=over,
                                      progress=False)
  assert ref == {**resumed}  # identical validation metrics, all terms
  cfg, dense_cfg_m, dense_params, _, objective = bridges_cli._load(
      tmp_path / "ref", json.loads((tmp_path / "ref" / "bridge.json").read_text()))
  a = bridges_cli._restore(tmp_path / "ref", cfg, objective)
  b = bridges_cli._restore(tmp_path / "resumed", cfg, objective)
  assert int(a.step) == int(b.step) == 12 and "bridges" in a.params
  tok = data_lib.load_tokenizer(tmp_path / "dense")
  assert data_lib.tokenizer_hash(data_lib.load_tokenizer(tmp_path / "ref")) == \
      data_lib.tokenizer_hash(tok) and tok.get_vocab_size() < 300
  # The dense scales are the dense model's residual RMS on the reference batch, unmoved by
  # training (no gradient, no decay); the sparse ones are the fresh sparse model's.
  ref_BxL = jnp.asarray(bridges_cli._val_batches(cfg, tok)[0, :, :-1])
  np.testing.assert_allclose(a.params["bridges"]["rms"]["dense"],
                             bridges.mean_rms_S(dense_params, ref_BxL, dense_cfg_m.model),
                             rtol=1e-5)
  fresh = model_lib.init_params(cfg.model, jax.random.PRNGKey(cfg.train.seed))
  np.testing.assert_allclose(a.params["bridges"]["rms"]["sparse"],
                             bridges.mean_rms_S(fresh, ref_BxL, cfg.model), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The sparse model is exactly sparse; the bridges are dense.
  assert int(jnp.count_nonzero(a.params["blocks"]["0"]["mlp"]["c_fc"]["w"])) == 32 * 64 // 4
  assert int(jnp.count_nonzero(a.params["bridges"]["enc"]["w"])) == 2 * 32 * 32
  rows = train_lib.read_metrics(tmp_path / "resumed")
  assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]
  assert "train/bridge/0.mlp/kl_sd" in rows[-2] or "train/bridge/0.mlp/kl_sd" in rows[-1]
  # Settings that differ from the saved run are refused, naming the field.
  with pytest.raises(ValueError, match="bridge"):
    bridges_cli.train_bridges(tmp_path / "dense", tmp_path / "ref",
                              overrides=over[:-1] + ["bridge.kl_full_coef=1"], progress=False)
  with pytest.raises(ValueError, match="bridge.nmse_norm"):
    bridges_cli.train_bridges(tmp_path / "dense", tmp_path / "x",
                              overrides=["bridge.nmse_norm=l2"], progress=False)


@pytest.mark.slow  # trains a tiny dense run and a bridged one, and searches one circuit
def test_steer_defaults_to_the_circuits_most_needed_channel(tmp_path, capsys):
  task = "single_double_quote"
  cache = tmp_path / "cache"
  dense_cfg = tiny_config(cache, "sparsity.enabled=false", "train.steps=4",
                          "train.ckpt_every=4", "model.block_size=128",  # the task's length
                          "circuit.steps=10", "circuit.batch_size=8",
                          "circuit.n_train_pairs=16", "circuit.n_select_pairs=8",
                          "circuit.n_heldout_pairs=8", "circuit.mean_batches=1")
  train_lib.train(dense_cfg, tmp_path / "dense", progress=False)
  run = tmp_path / "bridged"
  bridges_cli.train_bridges(tmp_path / "dense", run, progress=False,
                            overrides=["train.steps=4", "train.ckpt_every=4"])
  steer = ["steer", "--workdir", str(run), "--task", task, "--pairs", "8", "--strengths", "3"]
  # No circuit yet: one line that says which command makes one.
  assert bridges_cli.main(steer) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"python -m experiments.prune --workdir {run}" in err
  # The real search on the untrained tiny model: every node can go (its loss is ln 2 either
  # way), so the circuit is empty and steer still says, in one line, what it needs.
  assert prune_cli.main(["--workdir", str(run), "--tasks", task, "--target-loss", "5",
                         "--no-progress"]) == 0
  path = run / "circuits" / f"{task}.json"
  circuit = Circuit.from_json(path.read_text())
  assert circuit.solvable and circuit.n_nodes == 0
  capsys.readouterr()
  assert bridges_cli.main(steer) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "has none" in err and "experiments.prune" in err
  # The same search result with a circuit in it: every node of the model but the residual
  # reads, of which it keeps four channels per sublayer.
  cfg, params, step = ckpt_lib.load_params(run)
  slices = masks.site_slices(cfg.model)
  nodes = {site: list(range(sl.stop - sl.start)) for site, sl in slices.items()}
  for site in ("0.attn.act_in", "0.mlp.act_in"):
    nodes[site] = [1, 5, 9, 13]
  path.write_text(dataclasses.replace(circuit, nodes=nodes,
                                      n_nodes=sum(map(len, nodes.values()))).to_json())
  assert bridges_cli.main(steer) == 0
  out = json.loads(capsys.readouterr().out.splitlines()[0])
  saved = json.loads((run / f"steer_{task}_{out['channel']}.json").read_text())
  scores = saved["choice"]["loss_without_channel"]
  assert sorted(scores) == sorted(f"{s}.{c}" for s in ("0.attn.act_in", "0.mlp.act_in")
                                  for c in (1, 5, 9, 13))
  best = max(scores, key=scores.get)  # "LAYER.SITE.act_in.CHANNEL"
  layer, kind, _, c = best.split(".")
  assert out["channel"] == f"{layer}.{kind}.{c}"
  # Its score is the task loss of the circuit without that channel, the rest mean-ablated
  # with the means experiments.prune cached.
  keep = np.zeros(masks.n_nodes(cfg.model), np.float32)
  for site, ids in nodes.items():
    keep[slices[site].start + np.asarray(ids)] = 1.0
  keep[slices[f"{layer}.{kind}.act_in"].start + int(c)] = 0.0
  means = masks.load_means(str(next(run.glob(f"means_{step}_*.npz"))), cfg.model)
  arrays = jax.tree.map(lambda x: x[0], tasks_lib.build_taskset(
      data_lib.load_tokenizer(run), [task], n_train=1, n_heldout=8, seed=cfg.circuit.seed,
      max_len=128).heldout)
  loss, _ = tasks_lib.task_metrics(params, cfg.model, arrays,
                                   ablation=masks.node_ablation(jnp.asarray(keep), means,
                                                                cfg.model))
  np.testing.assert_allclose(scores[best], float(loss), rtol=1e-5)
  assert len(set(scores.values())) > 1  # removing a channel does change the loss
  # The same channel given by hand steers identically.
  assert bridges_cli.main(steer + ["--channel", out["channel"]]) == 0
  given = json.loads((run / f"steer_{task}_{out['channel']}.json").read_text())
  assert given["curve"] == saved["curve"] and given["choice"] == {"how": "given"}
  assert saved["curve"][0]["strength"] == 0.0 and len(saved["curve"]) == 3
  # A circuit of another checkpoint is refused, naming both steps.
  summary = run / "circuits" / "summary.json"
  summary.write_text(json.dumps({**json.loads(summary.read_text()), "step": step + 1}))
  assert bridges_cli.main(steer) == 2
  assert f"found at step {step + 1}" in capsys.readouterr().err
