"""Bench helpers: the peer config's FLOP count and the interleaved timer (no timings asserted)."""

import numpy as np
import pytest

from experiments import bench
from experiments import bench_circuits
from experiments import presets
from sparse_jax.config import apply_overrides


def test_peer_config_step_flops_match_issue_12():
  cfg = apply_overrides(presets.get_config("cpu"), list(bench.PEER_OVERRIDES))
  weights, attention = bench.step_matmul_flops(cfg)
  # 1.05M matmul params: 4 x (128*384 + 128*128 + 2*128*512) + 128*2048 = 1,048,576.
  assert weights == 6 * 1_048_576 * 4096
  # 4 layers x 3 (forward + 2 grads) x 2 products x 2 x B*H*L^2*K.
  assert attention == 4 * 3 * 2 * 2 * 32 * 8 * 128 * 128 * 16
  assert (cfg.model.n_layer, cfg.train.batch_size, cfg.model.afrac) == (4, 32, None)
  # The authors' trainer's default (no positions), whatever cpu uses.
  assert not (cfg.model.learned_pos_emb or cfg.model.rope)


def test_time_interleaved_runs_each_fn_warmup_plus_repeats_in_turn():
  calls = []
  medians = bench.time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 3)
  assert calls == ["a", "b"] * 4
  assert len(medians) == 2 and all(m >= 0 for m in medians)


def test_topk_section_checks_masks_and_reports_each_bisection():
  cfg = presets.get_config("tiny")
  out = bench.bench_topk(cfg, repeats=1)
  assert out["abs_topk_d_model"]["shape"] == [cfg.train.batch_size * cfg.train.seq_len,
                                              cfg.model.d_model]
  assert out["abs_topk_d_mlp"]["k"] == int(0.25 * cfg.model.d_mlp)  # tiny has no afrac
  assert out["projection_masks"]["leaves"] > 0
  assert all(v["ratio_all_31_over_stop"] > 0 for v in out.values())
  # A timed pair that disagrees is refused rather than timed.
  with pytest.raises(AssertionError, match="changed a top-k mask"):
    bench._stop_vs_all_31(lambda stop: lambda: np.array([stop]), 1)


def test_ragged_bench_tasks_are_right_padded_and_mostly_short():
  arrays = bench_circuits.ragged_tasks(bench_circuits.BENCH_MODEL, 3, 16, 32, seed=0)
  last_TxPx2 = np.asarray(arrays.last_Px2)
  tokens = np.asarray(arrays.tokens_Px2xL)
  assert (last_TxPx2[:, 0] == 31).all() and ((last_TxPx2 + 1).mean() / 32) < 0.6
  past_end = np.arange(32) > last_TxPx2[..., None]
  assert (tokens[past_end] == 0).all()
