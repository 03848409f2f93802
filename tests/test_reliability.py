"""Damaged run directories and CLI failures (issue 11): one test per "must hold" item.

Most tests copy one tiny finished run (20 steps, checkpoints 10 and 20, trained once per
module through the CLI) and damage the copy. The SIGKILL campaign is `slow`.
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import bench as bench_cli
from experiments import cli
from experiments import prune as prune_cli
from experiments import scale_sweep
from experiments import tasks as tasks_cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import fileio
from sparse_jax import masks
from sparse_jax import model as model_lib
from sparse_jax import tasks as tasks_lib
from sparse_jax import train as train_lib
from sparse_jax.config import CircuitConfig, apply_overrides
from tests.test_train import cli as train_cmd
from tests.test_train import final_state

ROOT = Path(__file__).parent.parent


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(args, capture_output=True, text=True, env=env, **kw)


def error_line(result) -> str:
  """The CLI's last stderr line, which must be its one `error:` line."""
  lines = result.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert result.returncode != 0 and len(errors) == 1 and lines[-1] == errors[0], result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  return errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(workdir, cache) of a finished 20-step tiny run with checkpoints 10 and 20."""
  root = tmp_path_factory.mktemp("base")
  cache = root / "cache"
  run_cli(train_cmd(root / "run", cache, "train.steps=20"), check=True)
  return root / "run", cache


@pytest.fixture
def run(base, tmp_path):
  """A private copy of the base run."""
  shutil.copytree(base[0], tmp_path / "run")
  return tmp_path / "run"


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def truncate(step_dir: Path) -> None:
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"")


# 1. No history is ever destroyed.
def test_unreadable_checkpoints_or_missing_config_are_refused(run):
  cfg = ckpt_lib.load_config(run)
  metrics = (run / "metrics.jsonl").read_text()
  for step in (10, 20):
    truncate(run / "checkpoints" / str(step))
  with pytest.raises(ValueError, match=r"none of the checkpoints can be read.*step 20.*step 10"):
    train_lib.train(cfg, run, progress=False)
  assert ckpt_lib.checkpoint_steps(run) == [10, 20]  # nothing moved aside
  assert (run / "metrics.jsonl").read_text() == metrics
  (run / "config.json").unlink()
  with pytest.raises(ValueError, match=r"checkpoints \(steps \[10, 20\]\) but no config.json"):
    train_lib.train(cfg, run, progress=False)
  assert not (run / "config.json").exists()
  assert (run / "metrics.jsonl").read_text() == metrics


# 2. A corrupt newest checkpoint is moved aside and does not lock the run.
def test_corrupt_newest_checkpoint_is_moved_aside(run, base, caplog):
  cfg = ckpt_lib.load_config(run)
  truncate(run / "checkpoints" / "20")
  with caplog.at_level(logging.WARNING):
    train_lib.train(cfg, run, progress=False)
  assert "moved unreadable checkpoint 20 aside" in caplog.text
  assert (run / "checkpoints" / "20.corrupt").is_dir()
  assert ckpt_lib.checkpoint_steps(run) == [10, 20]  # step 20 retrained and saved again
  train_lib.train(cfg, run, progress=False)  # and a rerun does not collide with it
  assert leaves_equal(final_state(run), final_state(base[0]))


# 3. A run that failed before its first checkpoint can be rerun with a fixed config.
def test_run_failed_before_first_checkpoint_takes_a_fixed_config(base, tmp_path):
  cfg = ckpt_lib.load_config(base[0])
  bad = apply_overrides(cfg, ["optim.lr=1e30", "optim.warmup_frac=0", "train.steps=3"])
  with pytest.raises(FloatingPointError, match="Lower optim.lr"):
    train_lib.train(bad, tmp_path / "run", progress=False)
  assert ckpt_lib.checkpoint_steps(tmp_path / "run") == []
  fixed = apply_overrides(cfg, ["train.steps=3"])
  train_lib.train(fixed, tmp_path / "run", progress=False)
  assert ckpt_lib.load_config(tmp_path / "run") == fixed
  assert ckpt_lib.checkpoint_steps(tmp_path / "run") == [3]
  # Once a checkpoint exists the config binds again.
  with pytest.raises(ValueError, match=r"different config.*optim.lr"):
    train_lib.train(bad, tmp_path / "run", progress=False)


# 4. Partial last lines are dropped; other damage is reported with file and line.
def test_partial_metrics_line_dropped_and_bad_lines_named(run, caplog):
  path = run / "metrics.jsonl"
  rows = train_lib.read_metrics(run)
  path.write_text(path.read_text() + '{"step": 21, "train/lo')  # killed mid-write
  with caplog.at_level(logging.WARNING):
    assert train_lib.read_metrics(run) == rows
  assert "partial last line" in caplog.text
  train_lib.train(ckpt_lib.load_config(run), run, progress=False)  # resume rewrites the log
  assert path.read_text().endswith("}\n") and train_lib.read_metrics(run) == rows
  lines = path.read_text().splitlines()
  path.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: not valid JSON"):
    train_lib.read_metrics(run)
  path.write_text("\n".join(lines[:3] + ["[1, 2]"]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl:4: expected a JSON object"):
    train_lib.read_metrics(run)


def test_every_json_read_back_names_file_and_line(run, tmp_path):
  (run / "config.json").write_text('{\n  "model": {\n    "n_layer": 1,,\n')
  with pytest.raises(ValueError, match=r"config.json:3: not valid JSON"):
    ckpt_lib.load_config(run)
  # A sweep point's summary and circuit records (read by --collect).
  summary = tmp_path / "points" / "p" / "circuits" / "summary.json"
  summary.parent.mkdir(parents=True)
  summary.write_text('{"circuit_config": {"steps": 1}')
  with pytest.raises(ValueError, match=r"summary.json:1: not valid JSON.*delete it to redo"):
    scale_sweep._pruning_done(summary.parent, CircuitConfig())
  with pytest.raises(ValueError, match=r"task.json:2: not valid JSON"):
    fileio.read_json(_write(tmp_path / "task.json", '{"task": "x",\n "nodes": [1, }'))


def _write(path: Path, text: str) -> Path:
  path.write_text(text)
  return path


# 5. I/O faults are one line and fast; SIGINT stops with one line and resumes exactly.
def test_io_faults_are_one_line_before_any_work(tmp_path, base):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  cache = base[1]
  cases = {
      "workdir under a file": (train_cmd(blocker / "run", cache), "workdir"),
      "workdir is a file": (train_cmd(blocker, cache), "is a file, not a directory"),
      "cache dir is a file": (train_cmd(tmp_path / "r", blocker), "data cache dir"),
      "prune --out is a file": ([sys.executable, "-m", "experiments.prune", "--workdir",
                                 str(base[0]), "--out", str(blocker)], "--out"),
      "sweep --out under a file": ([sys.executable, "-m", "experiments.scale_sweep", "--preset",
                                    "tiny", "--out", str(blocker / "sweep")], "--out"),
  }
  for name, (args, expected) in cases.items():
    line = error_line(run_cli(args, timeout=600))
    assert expected in line, (name, line)
  # Failed up front: no tokenizer, checkpoint, means cache or sweep point was made.
  assert not (tmp_path / "r" / "tokenizer.json").exists()
  assert not list((tmp_path / "r").rglob("checkpoints/*"))
  assert not list(base[0].glob("means_*"))


def test_sigint_stops_with_one_line_and_resumes_exactly(base, tmp_path):
  workdir, cache = tmp_path / "run", base[1]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(train_cmd(workdir, cache, "train.steps=20"), env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not (workdir / "checkpoints" / "10").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=600)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
  if proc.returncode == 0:
    pytest.skip("the run finished before the interrupt arrived (machine too fast)")
  assert proc.returncode == 130 and "interrupted" in error_line(result)
  run_cli(train_cmd(workdir, cache, "train.steps=20"), check=True)
  assert leaves_equal(final_state(workdir), final_state(base[0]))
  assert train_lib.read_metrics(workdir) == _without_speed(train_lib.read_metrics(base[0]),
                                                           train_lib.read_metrics(workdir))


def _without_speed(ref: list[dict], got: list[dict]) -> list[dict]:
  """ref with tokens/s (a timing, never reproducible) taken from got row by row."""
  assert len(ref) == len(got)
  return [{**r, **{k: v for k, v in g.items() if k == "train/tokens_per_s"}}
          for r, g in zip(ref, got)]


# 6. Caches are keyed by what they depend on; a truncated cache is recomputed.
def test_means_cache_keyed_by_settings_and_truncated_cache_recomputed(tmp_path, tiny_model_cfg,
                                                                       caplog):
  cfg = apply_overrides(ckpt_lib.Config(), ["circuit.mean_batches=2"])
  key = prune_cli.means_path(tmp_path, 5, cfg, cfg.circuit)
  assert key == prune_cli.means_path(tmp_path, 5, cfg, cfg.circuit)
  for other in (["circuit.mean_batches=3"], ["train.batch_size=4"], ["data.val_frac=0.2"],
                ["data.mixture=simple:0.5"]):
    c = apply_overrides(cfg, other)
    assert prune_cli.means_path(tmp_path, 5, c, c.circuit) != key, other
  c = apply_overrides(cfg, ["data.cache_dir=/elsewhere", "circuit.k_coef=0.5"])
  assert prune_cli.means_path(tmp_path, 5, c, c.circuit) == key  # do not shape the means
  assert prune_cli.means_path(tmp_path, 6, cfg, cfg.circuit) != key

  params = model_lib.init_params(tiny_model_cfg, jax.random.PRNGKey(0))
  batches = np.random.default_rng(0).integers(0, 64, (2, 2, 16)).astype(np.int32)
  calls = []

  def get_batches():
    calls.append(1)
    return batches

  means = masks.cached_means(str(key), params, tiny_model_cfg, get_batches)
  data = key.read_bytes()
  key.write_bytes(data[:len(data) // 2])  # truncated (a disk fault; writes are atomic)
  with caplog.at_level(logging.WARNING):
    again = masks.cached_means(str(key), params, tiny_model_cfg, get_batches)
  assert len(calls) == 2 and "unreadable means cache" in caplog.text
  assert all(np.array_equal(means[k], again[k]) for k in means)
  with zipfile.ZipFile(key) as z:  # rewritten whole
    assert z.testzip() is None


def test_truncated_token_and_tokenizer_caches_are_rebuilt(base, tmp_path, caplog):
  cache = tmp_path / "cache"
  shutil.copytree(base[1], cache)
  cfg = apply_overrides(ckpt_lib.load_config(base[0]), [f"data.cache_dir={cache}"])
  ref = data_lib.prepare_data(cfg).train_batch(0, 3, 2, 8)
  damaged = sorted(cache.glob("tokens-*.npy")) + sorted(cache.glob("tokenizer-*.json"))
  assert len(damaged) >= 2
  for f in damaged:  # a new file: the dataset above still maps the old one
    data = f.read_bytes()[:100]
    f.unlink()
    f.write_bytes(data)
  with caplog.at_level(logging.WARNING):
    again = data_lib.prepare_data(cfg)
  assert caplog.text.count("rebuilding it") == len(damaged)
  np.testing.assert_array_equal(again.train_batch(0, 3, 2, 8), ref)


# 7. Checkpoint integrity: a flipped byte is a checksum mismatch, treated as item 2.
def test_flipped_byte_in_checkpoint_is_detected(run, base, caplog):
  sums = json.loads((run / "checkpoints" / "20.checksum.json").read_text())
  assert "params/wte" in sums and any(k.startswith("opt_state/") for k in sums)
  # The largest file of the checkpoint holds the arrays; flip one byte in its middle.
  biggest = max((f for f in (run / "checkpoints" / "20").rglob("*") if f.is_file()),
                key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0x10
  biggest.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    state = final_state(run)
  assert int(state.step) == 10 and "checkpoint 20" in caplog.text
  assert (run / "checkpoints" / "20.corrupt").is_dir()
  # A value changed after saving (not only a damaged file) fails the same check.
  params = ckpt_lib.load_params(run, 10)[1]
  params["wte"] = params["wte"].at[0, 0].add(1.0)
  with pytest.raises(ValueError, match=r"checksum mismatch in params/wte at step 10"):
    ckpt_lib.verify(run / "checkpoints", 10, {"params": params})
  del base


# 8. Every argument and config value is validated before any compute, the field named.
@pytest.mark.parametrize("main,argv,field", [
    (prune_cli.main, ["--workdir", "/nonexistent", "--tasks", ","], "--tasks"),
    (prune_cli.main, ["--workdir", "/nonexistent", "--target-loss", "nan"], "--target-loss"),
    (prune_cli.main, ["--workdir", "/nonexistent", "--target-loss", "inf"], "--target-loss"),
    (prune_cli.main, ["--workdir", "/nonexistent", "--step", "-1"], "--step"),
    (tasks_cli.main, ["--list", "-n", "0"], "-n"),
    (tasks_cli.main, ["--list", "--max-len", "1"], "--max-len"),
    (bench_cli.main, ["--preset", "tiny", "--only", "nope"], "--only"),
    (bench_cli.main, ["--preset", "tiny", "--repeats", "0"], "--repeats"),
    (scale_sweep.main, ["--preset", "tiny", "--set", "circuit.target_loss=inf"],
     "circuit.target_loss"),
    (scale_sweep.main, ["--preset", "tiny", "--set", "circuit.extra_targets=0.1,nan"],
     "circuit.extra_targets"),
])
def test_arguments_validated_before_compute(main, argv, field, capsys):
  # prune's --workdir does not exist: naming the argument shows it was checked first.
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and field in err, err


def test_empty_task_list_is_named():
  with pytest.raises(ValueError, match="task list is empty"):
    tasks_lib.build_taskset(None, [])


# 9. The project's own log lines are visible (the root logger belongs to absl).
def test_resume_message_is_shown(run, base):
  result = run_cli(train_cmd(run, base[1], "train.steps=20"), check=True)
  assert f"INFO resuming {run} from step 20" in result.stderr


def test_one_line_joins_multiline_messages():
  assert cli.one_line(ValueError("a\n  b\n")) == "a; b"


# 10. A second training of the same workdir is refused; a stale lock is taken over.
def test_second_training_is_refused_and_stale_lock_taken_over(run, caplog):
  cfg = ckpt_lib.load_config(run)
  with ckpt_lib.locked(run):
    assert (run / ".lock").read_text() == str(os.getpid())
    with pytest.raises(BlockingIOError, match=rf"being trained by PID {os.getpid()}"):
      train_lib.train(cfg, run, progress=False)
  assert (run / ".lock").read_text() == ""  # released
  (run / ".lock").write_text("999999999")  # left by a process that died holding it
  with caplog.at_level(logging.WARNING):
    with ckpt_lib.locked(run):
      pass
  assert "stale lock of PID 999999999" in caplog.text


def test_second_training_cli_is_one_line(run, base):
  with ckpt_lib.locked(run):
    line = error_line(run_cli(train_cmd(run, base[1], "train.steps=20"), timeout=120))
  assert f"being trained by PID {os.getpid()}" in line


# The SIGKILL campaign (docs/reliability.md): kills at random points, then the end state.
@pytest.mark.slow
def test_sigkill_campaign_ends_bitwise_identical(base, tmp_path):
  n_kills, rng = 6, random.Random(11)
  workdir, cache, steps = tmp_path / "run", base[1], "train.steps=40"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run_cli(train_cmd(tmp_path / "ref", cache, steps), check=True)
  kills = 0
  while kills < n_kills:
    # A random point measured in training progress (not seconds, which a loaded machine
    # spends on startup): past a random step beyond the last checkpoint, plus a random
    # fraction of a second, which lands in steps, evaluations and checkpoint writes.
    done = max(ckpt_lib.checkpoint_steps(workdir), default=0)
    target = rng.randrange(done + 1, 40)
    started = time.time()
    proc = subprocess.Popen(train_cmd(workdir, cache, steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and _last_logged_step(workdir, started) < target:
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    if proc.poll() is not None:
      break  # finished before this kill: the campaign ends early
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  run_cli(train_cmd(workdir, cache, steps), check=True)
  assert kills >= 3, f"only {kills} kills landed before the run finished"
  ref, got = final_state(tmp_path / "ref"), final_state(workdir)
  assert int(got.step) == 40 and leaves_equal(ref, got)
  ref_rows, got_rows = train_lib.read_metrics(tmp_path / "ref"), train_lib.read_metrics(workdir)
  assert got_rows == _without_speed(ref_rows, got_rows)
  assert not list((workdir / "checkpoints").glob("*.corrupt*"))


def _last_logged_step(workdir: Path, since: float) -> int:
  """The last step in metrics.jsonl, once the process started at `since` has written it (on
  resume it first rewrites the file without the rows past its checkpoint)."""
  path = workdir / "metrics.jsonl"
  try:
    if path.stat().st_mtime < since:
      return 0
    rows = fileio.read_jsonl(path)
  except (OSError, ValueError):
    return 0
  return max((r.get("step", 0) for r in rows), default=0)
