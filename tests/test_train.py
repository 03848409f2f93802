"""Training loop tests: resume after SIGKILL, corrupt/mismatched checkpoints, NaN guard,
log-spaced checkpoints, and 4 simulated devices against 1."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import train as train_lib
from sparse_jax.config import Config, apply_overrides

# A tiny run on 60 generated documents; every test gets its own cache dir.
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_mlp=64",
        "model.vocab_size=300", "model.block_size=32", "data.corpus=simple",
        "data.max_files=60", "train.batch_size=4", "train.seq_len=32", "train.eval_every=10",
        "train.eval_batches=1", "train.log_every=5", "train.ckpt_every=10",
        "train.task_eval_pairs=0", "sparsity.weight_density=0.25", "sparsity.embed_density=0.5"]


def tiny_config(cache: Path, *extra: str) -> Config:
  return apply_overrides(Config(), TINY + [f"data.cache_dir={cache}", "train.steps=20", *extra])


def cli(workdir: Path, cache: Path, *extra: str) -> list[str]:
  args = [sys.executable, "-m", "experiments.train", "--preset", "tiny", "--workdir",
          str(workdir), "--no-progress"]
  for item in TINY + [f"data.cache_dir={cache}", *extra]:
    args += ["--set", item]
  return args


def final_state(workdir: Path):
  cfg = ckpt_lib.load_config(workdir)
  opt = train_lib.make_optimizer(cfg)
  mesh = train_lib.make_mesh()
  manager = ckpt_lib.make_manager(workdir, cfg)
  state = ckpt_lib.restore_latest(manager, train_lib.abstract_state(cfg, opt, mesh))
  manager.close()
  return state


@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_and_restart_is_bitwise_identical(tmp_path):
  cache = tmp_path / "cache"
  steps = ["train.steps=60"]
  subprocess.run(cli(tmp_path / "ref", cache, *steps), check=True, capture_output=True)
  proc = subprocess.Popen(cli(tmp_path / "killed", cache, *steps), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 120
  while not (ckpts / "20").exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (ckpts / "20").exists() and not (ckpts / "60").exists(), "kill came too late"
  subprocess.run(cli(tmp_path / "killed", cache, *steps), check=True, capture_output=True)
  ref, resumed = final_state(tmp_path / "ref"), final_state(tmp_path / "killed")
  assert int(resumed.step) == 60
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The resumed metrics log has each step once.
  steps_logged = [r["step"] for r in train_lib.read_metrics(tmp_path / "killed")
                  if "train/loss" in r]
  assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 60


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  cfg = tiny_config(tmp_path / "cache")
  train_lib.train(cfg, tmp_path / "run", progress=False)
  ckpts = tmp_path / "run" / "checkpoints"
  assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [10, 20]
  for f in (ckpts / "20").rglob("*"):  # truncate every file of the latest checkpoint
    if f.is_file():
      f.write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    state = final_state(tmp_path / "run")
  assert int(state.step) == 10
  assert "checkpoint 20" in caplog.text and "trying the previous one" in caplog.text
  _, params, step = ckpt_lib.load_params(tmp_path / "run")
  assert step == 10 and "wte" in params


def test_mismatched_config_is_refused(tmp_path):
  cache = tmp_path / "cache"
  train_lib.train(tiny_config(cache, "train.steps=5"), tmp_path / "run", progress=False)
  with pytest.raises(ValueError, match=r"(?s)different config.*optim\.lr: 0\.01 -> 0\.02"):
    train_lib.train(tiny_config(cache, "train.steps=5", "optim.lr=0.02"), tmp_path / "run",
                    progress=False)
  result = subprocess.run(cli(tmp_path / "run", cache, "train.steps=5", "model.d_mlp=128"),
                          capture_output=True, text=True)
  assert result.returncode == 2 and "model.d_mlp: 64 -> 128" in result.stderr
  # Circuit-search settings do not change what was trained: accepted.
  ckpt_lib.check_or_write_config(tmp_path / "run",
                                 tiny_config(cache, "train.steps=5", "circuit.k_coef=0.01"))


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A learning rate of 1e30 makes the params explode after the first update, so the loss of
  # step 2 is NaN. Checkpointing every step, only step 1 (finite loss) may be saved.
  cfg = tiny_config(tmp_path / "cache", "optim.lr=1e30", "optim.warmup_frac=0",
                    "train.ckpt_every=1", "train.log_every=1")
  with pytest.raises(FloatingPointError, match=r"loss is nan at step 2.*checkpoint \(step 1\)"):
    train_lib.train(cfg, tmp_path / "run", progress=False)
  ckpts = tmp_path / "run" / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["1"]
  assert int(final_state(tmp_path / "run").step) == 1
  losses = [r["train/loss"] for r in train_lib.read_metrics(tmp_path / "run") if "train/loss" in r]
  assert all(np.isfinite(losses))


def test_log_spaced_checkpoints_are_kept(tmp_path):
  cfg = tiny_config(tmp_path / "cache", "train.steps=40", "train.n_log_ckpts=4",
                    "train.max_to_keep=1", "train.eval_every=40")
  train_lib.train(cfg, tmp_path / "run", progress=False)
  kept = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert ckpt_lib.log_spaced_steps(40, 4) == (1, 3, 12, 40)
  assert kept == [1, 3, 12, 40]  # periodic 10, 20, 30 were rotated out
  rows = train_lib.read_metrics(tmp_path / "run")
  assert rows[-1]["step"] == 40 and "val/loss" in rows[-1]
  l0 = [r for r in rows if "sparsity/l0_total" in r]
  assert l0[-1]["sparsity/l0_total"] < l0[0]["sparsity/l0_total"]  # annealed
  assert (tmp_path / "run" / "tokenizer.json").exists()
  assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 40


_MULTI_DEVICE = """
import json, sys
from pathlib import Path
import jax
from sparse_jax import train as train_lib
from tests.test_train import tiny_config
assert jax.device_count() == 4
cache, workdir = Path(sys.argv[1]), Path(sys.argv[2])
try:
  train_lib.train(tiny_config(cache, "train.batch_size=6"), workdir / "bad", progress=False)
except ValueError as e:
  print("BATCH_ERROR", e)
train_lib.train(tiny_config(cache, "train.batch_size=8"), workdir / "four", progress=False)
"""


@pytest.mark.slow
@pytest.mark.ci
def test_four_devices_match_one(tmp_path):
  cache = tmp_path / "cache"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(Path(__file__).parent.parent))
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, str(cache), str(tmp_path)],
                          env=env, capture_output=True, text=True, check=True)
  assert "BATCH_ERROR train.batch_size=6 does not divide over the 4 devices" in result.stdout
  train_lib.train(tiny_config(cache, "train.batch_size=8"), tmp_path / "one", progress=False)
  four = [r for r in train_lib.read_metrics(tmp_path / "four") if "train/loss" in r]
  one = [r for r in train_lib.read_metrics(tmp_path / "one") if "train/loss" in r]
  assert [r["step"] for r in four] == [r["step"] for r in one] == [5, 10, 15, 20]
  np.testing.assert_allclose([r["train/loss"] for r in four], [r["train/loss"] for r in one],
                             rtol=2e-5)
