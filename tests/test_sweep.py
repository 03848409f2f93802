"""Scale sweep tests: grid validation, L0 -> densities, aggregation, and the tiny sweep end to
end (files, fields, resuming without redoing finished points)."""

import csv
import dataclasses
import json
import math

import pytest

from experiments import presets
from experiments import scale_sweep
from experiments import sweep_report
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import sweep as sweep_lib


def test_bad_grids_are_refused():
  base = presets.get_sweep("tiny").base
  with pytest.raises(ValueError, match="grid is empty"):
    sweep_lib.SweepConfig(base=base, widths=(), l0_targets=(100,))
  with pytest.raises(ValueError, match="grid is empty"):
    sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(), dense_baseline=False)
  with pytest.raises(ValueError, match=r"sweep.widths: duplicate points \[32\]"):
    sweep_lib.SweepConfig(base=base, widths=(32, 48, 32), l0_targets=(100,))
  with pytest.raises(ValueError, match=r"sweep.l0_targets: duplicate points \[100\]"):
    sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(100, 100))
  with pytest.raises(ValueError, match="not multiples of model.d_head"):
    sweep_lib.SweepConfig(base=base, widths=(40,), l0_targets=(100,))
  too_big = sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(10**7,))
  with pytest.raises(ValueError, match="L0 10000000 is not smaller than the model's"):
    sweep_lib.grid(too_big)
  with pytest.raises(ValueError, match=r"sweep.dense_widths: must be a non-empty subset"):
    sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(100,), dense_widths=(48,))
  with pytest.raises(ValueError, match=r"sweep.dense_widths: must be a non-empty subset"):
    sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(100,), dense_widths=())
  assert scale_sweep.main(["--preset", "tiny", "--only", "9", "--out", "/nonexistent"]) == 2


def test_dense_widths_pick_which_widths_get_a_dense_baseline():
  sweep = dataclasses.replace(presets.get_sweep("tiny"), dense_widths=(48,))
  assert [p.name for p in sweep_lib.grid(sweep)] == ["d32_l0_6000", "d48_dense", "d48_l0_6000"]
  cpu = presets.get_sweep("cpu")
  assert cpu.dense_widths == (128,)
  # A cut of the grid keeps the preset's dense widths it still has, or (with none left) a
  # dense model at every width it has: its sparse points need one to be matched with.
  assert scale_sweep.make_sweep("cpu", widths=(64, 128)).dense_widths == (128,)
  names = [p.name for p in sweep_lib.grid(scale_sweep.make_sweep("cpu", widths=(64,)))]
  assert names == ["d64_dense", "d64_l0_120000"]


def test_l0_targets_become_densities_with_the_papers_split():
  sweep = presets.get_sweep("tiny")
  points = sweep_lib.grid(sweep)
  assert [p.name for p in points] == ["d32_dense", "d32_l0_6000", "d48_dense", "d48_l0_6000"]
  for p in points:
    n_mat, n_emb = sweep_lib.param_groups(p.config)
    s = p.config.sparsity
    if p.l0_target is None:
      assert not s.enabled
      continue
    e = p.width / 32
    assert s.embed_density == pytest.approx(min(1.0, e * s.weight_density))
    l0 = s.weight_density * n_mat + s.embed_density * n_emb
    assert l0 == pytest.approx(p.l0_target, rel=1e-6)
    assert p.config.model.d_mlp == 4 * p.width and p.config.model.n_head == p.width // 16


def _row(name, l0, val, edges_by_target, failing_test=()):
  curves = {}
  for target, edges in edges_by_target.items():
    for task, e in edges.items():
      curves.setdefault(task, []).append({"target": target, "edges": e,
                                          "meets_target_test": task not in failing_test})
  return {"name": name, "l0_target": l0, "val_loss": val, "size_vs_target": curves}


A, B, C = "else_elif", "var_if", "for_while"  # three of the paper's 20 tasks


def test_a_circuit_missing_the_selection_margin_is_not_solved():
  row = _row("s1", 10, 2.9, {0.15: {A: 10, B: 40}})
  row["size_vs_target"][B][0]["meets_target_select"] = False  # passes on test, not selection
  assert sweep_lib.edges_at(row, 0.15) == {A: 10}
  row["size_vs_target"][B][0]["meets_target_select"] = True
  assert sweep_lib.edges_at(row, 0.15) == {A: 10, B: 40}


def test_against_the_paper_section_is_computed_from_the_sweep():
  base = presets.get_sweep("tiny").base
  sweep = sweep_lib.SweepConfig(base=base, widths=(32,), l0_targets=(100,), sparse_steps=30)
  rows = [_row("dA", None, 3.0, {0.15: {A: 100, B: 400, C: 9}}),
          _row("s1", 10, 2.9, {0.15: {A: 10, B: 0}})]
  best = sweep_lib.matched_pairs(rows, 0.15)[0]
  text = "\n".join(sweep_report.against_paper(sweep, rows, [], best, 0.15))
  assert "The models solve 2-3 of the 20 at 0.15 (dA 3, s1 2)" in text
  # per task: 100/10 and 400/max(0, 1); the geometric mean of the two is the headline 63.2x
  assert best["ratio_dense_over_sparse"] == pytest.approx(4000 ** 0.5)
  assert ("headline 63.2x rests on 2 task(s): else_elif 10.0x (10 vs 100 edges), var_if "
          "400.0x (0 vs 400 edges). Fewer than 8 shared tasks") in text
  assert "dA is a final dense model, 0.100 nats from s1" in text
  tokens = 30 * base.train.batch_size * base.train.seq_len
  assert f"{tokens / 1e6:.1f}M tokens per sparse model" in text
  assert f"{32e9 / tokens:,.0f}x fewer than the paper's" in text
  assert "by 2 standard errors" in text
  exact = dataclasses.replace(sweep, base=dataclasses.replace(
      base, circuit=dataclasses.replace(base.circuit, select_margin_se=0.0)))
  assert "standard errors" not in "\n".join(
      sweep_report.against_paper(exact, rows, [], best, 0.15))


def test_frontier_and_matched_pairs():
  rows = [_row("dA", None, 3.0, {0.15: {A: 100, B: 400}, 0.3: {A: 50, B: 100}}),
          _row("dB", None, 2.5, {0.15: {A: 50, B: 200}}),
          _row("s1", 10, 2.9, {0.15: {A: 10, B: 40, C: 7}, 0.3: {A: 0, C: 1}})]
  assert sweep_lib.targets_of(rows) == [0.15, 0.3]
  shared, geo = sweep_lib.frontier(rows, 0.15)
  assert shared == [A, B]
  assert geo["dA"] == pytest.approx(200.0) and geo["s1"] == pytest.approx(20.0)
  assert sweep_lib.frontier(rows, 0.3)[0] == []  # dB meets nothing at 0.3
  pair, = sweep_lib.matched_pairs(rows, 0.15)
  assert pair["dense"] == "dA" and pair["loss_gap"] == pytest.approx(0.1)
  assert pair["ratio_dense_over_sparse"] == pytest.approx(10.0) and pair["n_shared"] == 2
  assert (pair["n_failed_sparse"], pair["n_failed_dense"]) == (17, 18)
  pair, = sweep_lib.matched_pairs(rows, 0.3)
  assert pair["shared_tasks"] == [A]  # an empty circuit counts as one edge
  assert pair["ratio_dense_over_sparse"] == pytest.approx(50.0)
  assert math.isnan(sweep_lib.geomean([]))


def test_headline_excludes_induction_and_counts_failures():
  """The geometric mean runs over the paper's 20 tasks a model solves; induction (a control)
  and user task files stay out, a circuit failing its test pairs counts as a failure."""
  assert len(sweep_lib.PAPER_TASKS) == 20 and "induction" not in sweep_lib.PAPER_TASKS
  row = _row("s", 10, 3.0, {0.15: {A: 10, B: 1000, C: 5, "induction": 100_000,
                                   "file:mine.jsonl": 3}}, failing_test=(C,))
  summary = sweep_lib.model_summary(row, 0.15)
  assert summary["geomean_edges_solved"] == pytest.approx(100.0)  # A and B only
  assert (summary["n_solved"], summary["n_failed"]) == (2, 18)
  assert summary["controls"] == {"induction": 100_000}
  assert sweep_lib.frontier([row], 0.15) == ([A, B], {"s": pytest.approx(100.0)})
  dense = _row("d", None, 3.0, {0.15: {A: 40, C: 50, "induction": 1}})
  pair, = sweep_lib.matched_pairs([dense, row], 0.15)
  assert pair["shared_tasks"] == [A] and pair["ratio_dense_over_sparse"] == pytest.approx(4.0)
  assert sweep_lib.model_summary(row, 0.3)["n_failed"] == 20  # no circuit at 0.3


def test_bracketing_steps():
  curve = [(250, 3.5), (500, 3.2), (750, 3.0), (1000, 2.9)]
  assert sweep_lib.bracketing_steps(curve, 3.1) == (500, 750)
  assert sweep_lib.bracketing_steps(curve, 3.0) == (500, 750)  # equal counts as below
  assert sweep_lib.bracketing_steps(curve, 2.5) == (1000,)  # the run never gets that low
  assert sweep_lib.bracketing_steps(curve, 4.0) == (250,)
  assert sweep_lib.bracketing_steps([], 3.0) == ()


def test_matched_pairs_use_dense_checkpoints_and_interpolate():
  """A sparse model between two checkpoints of a dense run: matched with the nearer one, and
  the run's edges interpolated to its loss (log edges linear in loss) over the tasks all
  three solve."""
  final = dict(_row("d", None, 2.8, {0.15: {A: 900, B: 900}}), run="d")
  early = dict(_row("d@500", None, 3.2, {0.15: {A: 100, B: 400}}), run="d")
  mid = dict(_row("d@1000", None, 3.0, {0.15: {A: 400, B: 1600, C: 10}}), run="d")
  sparse = _row("s", 10, 3.05, {0.15: {A: 10, B: 40}})
  pair, = sweep_lib.matched_pairs([final, early, mid, sparse], 0.15)
  assert pair["dense"] == "d@1000" and pair["loss_gap"] == pytest.approx(0.05)
  assert pair["ratio_dense_over_sparse"] == pytest.approx(40.0)
  interp = pair["interpolated"]
  assert (interp["below"], interp["above"], interp["shared_tasks"]) == ("d@1000", "d@500",
                                                                        [A, B])
  assert interp["weight_above"] == pytest.approx(0.25)
  # geomeans 800 (below) and 200 (above); a quarter of the way up in loss, in log space:
  assert interp["geomean_edges_dense"] == pytest.approx(800 * 0.25 ** 0.25)
  assert interp["ratio_dense_over_sparse"] == pytest.approx(800 * 0.25 ** 0.25 / 20)
  # No checkpoint of the run lies above the sparse loss: no interpolation.
  pair, = sweep_lib.matched_pairs([final, mid, _row("s", 10, 3.5, {0.15: {A: 1}})], 0.15)
  assert pair["interpolated"] is None


def test_frontier_checkpoint_points_use_the_panels_shared_tasks():
  """A dense checkpoint is drawn on a frontier panel only if it solves every shared task
  there, at the geometric mean over those tasks (not over all it solves)."""
  ckpts = [dict(_row("d@500", None, 3.2, {0.15: {A: 100, B: 400}, 0.3: {A: 9}}), width=128,
                step=500),
           dict(_row("d@750", None, 3.1, {0.15: {A: 50}}, failing_test=(A,)), width=128,
                step=750)]
  assert sweep_report.checkpoint_points(ckpts, [A, B], 0.15) == [
      (3.2, pytest.approx(200.0), "d128@500")]
  assert sweep_report.checkpoint_points(ckpts, [A], 0.3) == [(3.2, pytest.approx(9.0),
                                                             "d128@500")]
  assert sweep_report.checkpoint_points(ckpts, [A, B], 0.3) == []  # B unsolved at 0.3
  assert sweep_report.checkpoint_points(ckpts, [], 0.15) == []  # an empty panel stays empty


def test_dense_ckpt_every_sets_the_dense_cadence_only():
  sweep = dataclasses.replace(presets.get_sweep("tiny"), dense_ckpt_every=20)
  for p in sweep_lib.grid(sweep):
    tc = p.config.train
    if p.l0_target is None:
      assert (tc.ckpt_every, tc.eval_every, tc.max_to_keep) == (20, 20, 4)
    else:
      assert (tc.ckpt_every, tc.eval_every) == (60, 60)
  for bad in (0, 60, 2.5):
    with pytest.raises(ValueError, match="sweep.dense_ckpt_every"):
      dataclasses.replace(sweep, dense_ckpt_every=bad)


def test_sparse_lr_sets_the_sparse_points_rate_only():
  # The cpu preset: dense at the base rate, sparse at 4x (docs/ablations.md).
  lrs = {p.name: p.config.optim.lr for p in sweep_lib.grid(scale_sweep.make_sweep("cpu"))}
  assert lrs == {"d64_l0_120000": 0.04, "d128_dense": 0.01, "d128_l0_120000": 0.04}
  sweep = scale_sweep.make_sweep("cpu", ["sweep.sparse_lr=0.02", "optim.lr=1/200"])
  lrs = {p.name: p.config.optim.lr for p in sweep_lib.grid(sweep)}
  assert lrs == {"d64_l0_120000": 0.02, "d128_dense": 0.005, "d128_l0_120000": 0.02}
  one_rate = scale_sweep.make_sweep("cpu", ["sweep.sparse_lr=None"])
  assert {p.config.optim.lr for p in sweep_lib.grid(one_rate)} == {0.01}
  plain = {p.name: p.config for p in sweep_lib.grid(one_rate)}
  for p in sweep_lib.grid(sweep):  # nothing else moves
    assert dataclasses.replace(p.config.optim, lr=0.01) == plain[p.name].optim
    assert p.config.sparsity == plain[p.name].sparsity
  with pytest.raises(ValueError, match="sweep.sparse_lr: must be None or a positive"):
    scale_sweep.make_sweep("cpu", ["sweep.sparse_lr=0"])
  with pytest.raises(ValueError, match="sweep.lr: unknown field; known: .*sparse_lr"):
    scale_sweep.make_sweep("cpu", ["sweep.lr=0.04"])


def test_sparse_steps_set_the_sparse_points_steps_only():
  # The cpu preset: the sparse points train 2.1x longer than the dense one.
  steps = {p.name: p.config.train.steps for p in sweep_lib.grid(scale_sweep.make_sweep("cpu"))}
  assert steps == {"d64_l0_120000": 4200, "d128_dense": 2000, "d128_l0_120000": 4200}
  base = {p.name: p.config for p in sweep_lib.grid(scale_sweep.make_sweep("cpu", [
      "sweep.sparse_steps=None"]))}
  sweep = scale_sweep.make_sweep("cpu", ["sweep.sparse_steps=3500"])
  steps = {p.name: p.config.train.steps for p in sweep_lib.grid(sweep)}
  dense_steps = base["d128_dense"].train.steps
  assert steps == {"d64_l0_120000": 3500, "d128_dense": dense_steps, "d128_l0_120000": 3500}
  for p in sweep_lib.grid(sweep):  # nothing else moves
    assert dataclasses.replace(p.config.train, steps=base[p.name].train.steps) == (
        base[p.name].train)
    assert dataclasses.replace(p.config, train=base[p.name].train) == base[p.name]
  for bad in (0, -5, 2.5, True):
    with pytest.raises(ValueError, match="sweep.sparse_steps: must be None or a positive"):
      dataclasses.replace(sweep, sparse_steps=bad)


def _mtimes(path):
  return {str(p): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.ci
def test_tiny_sweep_end_to_end_and_resume(tmp_path, monkeypatch):
  monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))
  out = tmp_path / "sweep"
  args = ["--preset", "tiny", "--out", str(out), "--no-progress"]
  # An interrupted sweep: only point 1 ran before the "crash".
  assert scale_sweep.main(args + ["--only", "1"]) == 0
  first = _mtimes(out / "points" / "d32_l0_6000")
  assert scale_sweep.main(args) == 0
  # Point 1 was not redone: none of its files changed.
  assert _mtimes(out / "points" / "d32_l0_6000") == first

  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results["rows"]] == ["d32_dense", "d32_l0_6000", "d48_dense",
                                                  "d48_l0_6000"]
  assert results["missing_points"] == []
  for r in results["rows"]:
    assert r["n_layer"] == 1 and r["tasks_available"] == 21 and math.isfinite(r["val_loss"])
    assert r["timing"]["train_s"] > 0 and r["timing"]["prune_s"] > 0
    assert r["tasks_solved"] == sum(bool(v) and r["task_meets_target_select"][t]
                                    for t, v in r["task_meets_target_test"].items())
    if r["l0_target"] is None:
      assert r["l0"] == r["sparsifiable_params"]
    else:
      assert abs(r["l0"] - r["l0_target"]) < 50  # exact per matrix, rounded down per matrix
  with open(out / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4
  assert {"val_loss", "geomean_edges", "l0", "edges/else_elif", "geomean_edges@1.0"} <= set(
      table[0])
  assert results["targets"] == [0.8, 1.0, 1.5]
  report = (out / "report.md").read_text()
  assert "dense/sparse circuit size" in report and "frontier.png" in report
  assert "per model, peak lr 0.01\n" in report  # one rate: no sparse_lr
  assert (out / "frontier.png").stat().st_size > 10_000
  assert (out / "circuit_size_vs_task_loss.png").stat().st_size > 10_000
  assert (out / "points" / "d48_dense" / "circuits" / "summary.json").exists()
  # Loss matching: the dense points kept checkpoints every 20 steps; the sparse models (60
  # steps) are still worse than the dense ones at step 20, so that checkpoint was pruned, for
  # the tasks the sparse models solve, and it is what they are matched with.
  assert ckpt_lib.checkpoint_steps(out / "points" / "d32_dense") == [20, 40, 60]
  ckpt_rows = results["checkpoint_rows"]
  assert [r["name"] for r in ckpt_rows] == ["d32_dense@20", "d48_dense@20"]
  for r in ckpt_rows:
    assert r["l0_target"] is None and r["step"] == 20 and math.isfinite(r["val_loss"])
  assert {p["dense"] for p in results["matched_pairs"]["1.0"]} <= {"d32_dense@20",
                                                                   "d48_dense@20"}
  assert "Loss-matched dense checkpoints: d32_dense@20" in report

  # A point whose pruning was lost is re-pruned, not retrained; the others are untouched.
  (out / "points" / "d48_dense" / "circuits" / "summary.json").unlink()
  ckpts = _mtimes(out / "points" / "d48_dense" / "checkpoints")
  others = _mtimes(out / "points" / "d32_dense")
  assert scale_sweep.main(args) == 0
  assert _mtimes(out / "points" / "d48_dense" / "checkpoints") == ckpts
  assert _mtimes(out / "points" / "d32_dense") == others
  assert (out / "points" / "d48_dense" / "circuits" / "summary.json").exists()
  # --collect only aggregates.
  (out / "report.md").unlink()
  assert scale_sweep.main(args + ["--collect"]) == 0 and (out / "report.md").exists()


def test_make_sweep_subset_keeps_each_points_config(tmp_path):
  full = {p.name: p.config for p in sweep_lib.grid(scale_sweep.make_sweep("tpu"))}
  part = scale_sweep.make_sweep("tpu", ["train.steps=10"], widths=[256], l0_targets=[100_000])
  points = sweep_lib.grid(part)
  assert [p.name for p in points] == ["d256_dense", "d256_l0_100000"]
  for p in points:  # the base width stays 128: the densities are the full grid's
    assert p.config.sparsity == full[p.name].sparsity and p.config.train.steps == 10
  assert "  1  d256_l0_100000" in scale_sweep.describe_grid(part)
  with pytest.raises(ValueError, match="sweep.widths: duplicate points"):
    scale_sweep.make_sweep("tiny", widths=[32, 32])

  # Circuits found for some tasks do not count as done for another task list.
  ccfg = points[0].config.circuit
  (tmp_path / "circuits").mkdir()
  summary = {"circuit_config": dataclasses.asdict(ccfg), "requested_tasks": ["else_elif"]}
  (tmp_path / "circuits" / "summary.json").write_text(json.dumps(summary))
  assert scale_sweep._pruning_done(tmp_path / "circuits", ccfg, ["else_elif"])
  assert not scale_sweep._pruning_done(tmp_path / "circuits", ccfg, None)
  del summary["requested_tasks"]  # written before task lists existed: all tasks
  (tmp_path / "circuits" / "summary.json").write_text(json.dumps(summary))
  assert scale_sweep._pruning_done(tmp_path / "circuits", ccfg, None)
  assert not scale_sweep._pruning_done(tmp_path / "circuits", ccfg, ["else_elif"])


def test_tasks_solved_counts_only_circuits_that_meet_the_target_on_test_pairs():
  tasks = {"a": {"solvable": True, "meets_target_test": True},
           "b": {"solvable": True, "meets_target_test": False},  # found, misses on test
           "c": {"solvable": False, "meets_target_test": None},
           "d": {"solvable": True, "meets_target_test": True},
           # no k met the selection margin (the full model was kept); passes on test anyway
           "e": {"solvable": True, "meets_target_select": False, "meets_target_test": True}}
  assert scale_sweep.tasks_solved(tasks) == 2
  assert scale_sweep.tasks_solved({}) == 0
