"""Circuits across checkpoints and seeds: overlaps, series, similarity, and tiny runs end to
end (per-checkpoint JSON, an unmet checkpoint, resuming, --compare of two same-seed runs)."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import dynamics as dyn_cli
from experiments import presets
from experiments import prune as prune_lib
from experiments import train as train_cli
from sparse_jax import dynamics as dyn
from sparse_jax import train as train_lib
from sparse_jax.circuits import Circuit
from sparse_jax.config import apply_overrides

# A 1-layer model trained for 12 steps with 3 log-spaced checkpoints (1, 3, 12) on the tiny
# preset's data (shared token cache), and a circuit search small enough for seconds.
TINY_RUN = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_mlp=64",
            "train.steps=12", "train.n_log_ckpts=3", "train.eval_every=12",
            "train.ckpt_every=12", "train.task_eval_pairs=0", "train.log_every=6",
            "circuit.steps=10", "circuit.batch_size=8", "circuit.n_train_pairs=16",
            "circuit.n_heldout_pairs=8", "circuit.mean_batches=1"]


def _circuit(task, nodes, solvable=True, loss_full=0.1, target=0.15):
  met = solvable and nodes is not None
  return Circuit(task, target, solvable, "" if solvable else "above the target", loss_full, 0.7,
                 n_nodes=sum(map(len, (nodes or {}).values())), nodes=nodes or {},
                 edges={"total": 3} if met else {}, loss_before=0.1 if met else None)


def _rec(step, circuits):
  return dyn.record(step, "run", [], {}, circuits, {})


def test_jaccard_and_composition():
  a = {"0.attn.q": [1, 2], "0.mlp.post_act": [5]}
  b = {"0.attn.q": [2], "0.mlp.post_act": [5, 6], "1.attn.k": [0]}
  assert dyn.jaccard(a, a) == 1.0
  assert dyn.jaccard(a, b) == pytest.approx(2 / 5)
  assert dyn.jaccard(a, {"1.attn.q": [1, 2]}) == 0.0  # same channel ids, other site
  assert dyn.jaccard({}, {}) == 1.0
  comp = dyn.composition(b, n_layer=2)
  assert comp["0"]["attn.q"] == 1 and comp["0"]["mlp.post_act"] == 2
  assert comp["1"]["attn.k"] == 1 and sum(comp["1"].values()) == 1
  assert len(comp["0"]) == 8
  with pytest.raises(ValueError, match="not a site of a 1-layer model"):
    dyn.composition(b, n_layer=1)


def test_task_series_reports_unmet_checkpoints_and_overlaps():
  a = {"0.attn.q": [1, 2]}
  b = {"0.attn.q": [1, 2, 3], "0.mlp.post_act": [0]}
  recs = [_rec(10, [_circuit("t", a), _circuit("u", None, solvable=False, loss_full=0.6)]),
          _rec(1, [_circuit("t", None, solvable=False, loss_full=0.7),
                   _circuit("u", None, solvable=False, loss_full=0.7)]),
          _rec(100, [_circuit("t", b), _circuit("u", None, solvable=False, loss_full=0.5)])]
  s = dyn.task_series(recs)
  t = s["t"]
  assert t["first_step_met"] == 10 and t["final_step"] == 100
  steps = [p["step"] for p in t["checkpoints"]]
  assert steps == [1, 10, 100]
  first, mid, last = t["checkpoints"]
  assert not first["met"] and "above the target" in first["reason"]
  assert first["n_nodes"] is None and first["jaccard_next"] is None
  assert mid["met"] and mid["n_nodes"] == 2 and mid["edges"] == 3
  assert mid["jaccard_next"] == mid["jaccard_final"] == pytest.approx(2 / 4)
  assert last["jaccard_final"] == 1.0 and last["jaccard_next"] is None
  assert s["u"]["first_step_met"] is None
  assert all(not p["met"] for p in s["u"]["checkpoints"])


def test_activation_similarity_is_matching_free():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 5))
  # The same features, permuted and sign-flipped, plus one extra: every node of A is found.
  y = np.concatenate([-x[:, [3, 0, 4, 1, 2]], rng.normal(size=(200, 1))], axis=1)
  sim = dyn.activation_similarity(x, y)
  assert sim["a_to_b"] == pytest.approx(1.0)
  assert sim["b_to_a"] < 1.0 and sim["best_b"][:5] == pytest.approx([1.0] * 5)
  indep = dyn.activation_similarity(x, rng.normal(size=(200, 5)))
  assert indep["mean"] < 0.4
  const = dyn.activation_similarity(np.concatenate([x, np.ones((200, 1))], 1), x)
  assert const["constant_a"] == 1 and const["best_a"][-1] is None
  assert const["a_to_b"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="same task inputs"):
    dyn.activation_similarity(x, x[:10])


def test_seed_runs_are_siblings():
  runs = train_cli.seed_runs("runs/x/", ["optim.lr=0.1"], 2)
  assert runs == [("runs/x_seed0", ["optim.lr=0.1", "train.seed=0"]),
                  ("runs/x_seed1", ["optim.lr=0.1", "train.seed=1"])]
  assert train_cli.seed_runs("runs/x", [], None) == [("runs/x", [])]
  with pytest.raises(ValueError, match="sets train.seed itself"):
    train_cli.seed_runs("runs/x", ["train.seed=3"], 2)


def _train(workdir):
  cfg = apply_overrides(presets.get_config("tiny"), TINY_RUN)
  train_lib.train(cfg, workdir, progress=False)
  return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(workdir, cfg, unmet summary, task, target): a target between the final checkpoint's
  full and fully ablated loss of one task, so its circuit there is not empty."""
  workdir = tmp_path_factory.mktemp("dyn") / "run"
  cfg = _train(workdir)
  out = tmp_path_factory.mktemp("unmet")
  # Every task, at a target nothing meets: only the full and fully ablated losses are computed.
  unmet = dyn_cli.run_dynamics(workdir, task_names=None, out=out, progress=False,
                               circuit_cfg=dataclasses.replace(cfg.circuit, target_loss=1e-4))
  rec = json.loads((out / "checkpoints" / "step_12.json").read_text())
  # The target must sit between the full and the fully ablated loss on both the selection
  # pairs (which choose the circuit) and the test pairs (which report it).
  gap = {c["task"]: (min(c["loss_empty"], c["search"]["loss_empty_select"]),
                     max(c["loss_full"], c["search"]["loss_full_select"]))
         for c in rec["circuits"]}
  task = max(gap, key=lambda t: gap[t][0] - gap[t][1])
  assert gap[task][0] > gap[task][1]
  return workdir, cfg, unmet, task, sum(gap[task]) / 2


@pytest.mark.slow  # ~1 minute of CPU with the fixture's training
def test_dynamics_over_checkpoints_and_resume(tiny_run, tmp_path, monkeypatch):
  workdir, cfg, unmet, task, target = tiny_run
  assert dyn_cli.choose_steps(workdir, "all") == [1, 3, 12]
  with pytest.raises(ValueError, match=r"no checkpoint at step\(s\) \[5\]"):
    dyn_cli.choose_steps(workdir, "1,5")
  assert dyn_cli.main(["--workdir", str(workdir), "--steps", "x"]) == 2
  assert dyn_cli.main(["--workdir", str(workdir), "--set", "model.d_model=8"]) == 2
  assert dyn_cli.main(["--workdir", str(tmp_path / "none")]) == 2
  # A target nothing meets: every checkpoint is reported unmet, with the full-model loss.
  assert len(unmet["tasks"]) > 10
  for s in unmet["tasks"].values():
    assert s["first_step_met"] is None and [p["step"] for p in s["checkpoints"]] == [1, 3, 12]
    assert all(not p["met"] and "above the target" in p["reason"] for p in s["checkpoints"])
  # The final checkpoint has a non-empty circuit; checkpoints whose full model misses the
  # target are reported unmet.
  # Raw scoring: the target was chosen between the raw full and fully ablated losses (a
  # calibrated empty circuit can already meet it).
  ccfg = dataclasses.replace(cfg.circuit, target_loss=target, calibrate=False)
  out = tmp_path / "met"
  summary = dyn_cli.run_dynamics(workdir, task_names=[task], circuit_cfg=ccfg, out=out,
                                 progress=False)
  s = summary["tasks"][task]
  last = s["checkpoints"][-1]
  assert last["met"] and last["n_nodes"] > 0 and last["jaccard_final"] == 1.0
  for p in s["checkpoints"]:
    assert p["met"] == (p["loss_full"] <= target)
    if not p["met"]:
      assert "above the target" in p["reason"] and p["jaccard_final"] is None
  assert s["first_step_met"] == min(p["step"] for p in s["checkpoints"] if p["met"])
  assert "not comparable across seeds" in summary["note"]
  assert (out / "dynamics.png").stat().st_size > 0
  for step in (1, 3, 12):  # every per-checkpoint record complete, with each Circuit field
    rec = json.loads((out / "checkpoints" / f"step_{step}.json").read_text())
    assert rec["complete"] and rec["step"] == step
    (c,) = rec["circuits"]
    for field in ("task", "target", "solvable", "loss_full", "loss_empty", "n_nodes", "nodes",
                  "edges", "loss_before", "sufficiency"):
      assert field in c
    assert c["task"] == task and c["target"] == target
  # Resume: a finished checkpoint is not searched again; a missing or half-written one is.
  (out / "checkpoints" / "step_3.json").unlink()
  (out / "checkpoints" / "step_1.json").write_text('{"complete": fal')
  searched = []
  real = prune_lib.find_at_step
  monkeypatch.setattr(prune_lib, "find_at_step",
                      lambda *a, **k: searched.append(k["step"]) or real(*a, **k))
  again = dyn_cli.run_dynamics(workdir, task_names=[task], circuit_cfg=ccfg, out=out,
                               progress=False)
  assert sorted(searched) == [1, 3]
  assert again["tasks"] == summary["tasks"]


@pytest.mark.slow  # trains a second run
def test_compare_two_runs_of_one_seed_is_identical(tiny_run, tmp_path):
  workdir, cfg, _, task, target = tiny_run
  twin = tmp_path / "twin"
  _train(twin)
  # Raw scoring: the target was chosen between the raw full and fully ablated losses (a
  # calibrated empty circuit can already meet it).
  ccfg = dataclasses.replace(cfg.circuit, target_loss=target, calibrate=False)
  out = dyn_cli.run_compare([workdir, twin], task_names=[task], circuit_cfg=ccfg,
                            out=tmp_path / "cmp", progress=False)
  t = out["tasks"][task]
  assert t["met"] == [True, True] and t["identical_circuits"]
  spread = t["size_spread"]["nodes"]
  assert spread["min"] == spread["max"] > 0 and spread["std"] == 0.0
  assert t["composition"][0] == t["composition"][1]
  assert sum(sum(layer.values()) for layer in t["composition"][0].values()) == spread["max"]
  (pair,) = t["pairs"]
  assert pair["same_ids_jaccard"] == 1.0
  assert pair["similarity"]["mean"] == pytest.approx(1.0)
  assert (tmp_path / "cmp" / "compare.json").exists()
  with pytest.raises(ValueError, match="at least two"):
    dyn_cli.run_compare([workdir], task_names=[task])
