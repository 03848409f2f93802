"""An imported model goes through every tool (tasks, prune, circuit_table, the sweep's
aggregation with --add), and the aggregation refuses an added run it cannot compare."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import circuit_table, import_model, scale_sweep
from experiments import prune as prune_cli
from experiments import tasks as tasks_cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import interop
from sparse_jax import model as model_lib
from sparse_jax import torch_format
from tests.authors_format import FIXTURES

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
