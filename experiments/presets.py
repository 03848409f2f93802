"""Named experiment configs: `tiny` (tests, < 1 min), `cpu` (laptop default), `paper` (accelerators).

`get_config(name)` returns a validated `Config`; the CLIs apply `--set section.field=value`
overrides on top. Sizes for `paper` follow the authors' training script (PAPER.md §2): 8
layers, d_model 256*e with e=4, d_head 16, 1/64 of each weight matrix and 1/16 of the
embeddings nonzero, AbsTopK keeping 1/4 at all eight locations, 32B tokens.
"""

from __future__ import annotations

from sparse_jax.config import (CircuitConfig, Config, DataConfig, ModelConfig, OptimConfig,
                               SparsityConfig, TrainConfig)

PRESETS = ("tiny", "cpu", "paper")


def get_config(name: str) -> Config:
  if name == "tiny":
    return Config(
        model=ModelConfig(n_layer=2, d_model=64, n_head=4, d_head=16, d_mlp=256,
                          vocab_size=512, block_size=64),
        sparsity=SparsityConfig(weight_density=1 / 8, embed_density=1 / 4),
        optim=OptimConfig(lr=1e-2),
        data=DataConfig(max_files=120),
        train=TrainConfig(steps=150, batch_size=8, seq_len=64, eval_every=50, eval_batches=2,
                          log_every=10, ckpt_every=50),
        circuit=CircuitConfig(steps=100, batch_size=16, mean_batches=2))
  if name == "cpu":
    return Config(
        model=ModelConfig(n_layer=4, d_model=128, n_head=8, d_head=16, d_mlp=512,
                          vocab_size=2048, block_size=128),
        sparsity=SparsityConfig(weight_density=1 / 16, embed_density=1 / 4),
        optim=OptimConfig(lr=1e-2),
        data=DataConfig(),
        train=TrainConfig(steps=2000, batch_size=32, seq_len=128, eval_every=250,
                          eval_batches=8, log_every=25, ckpt_every=250, n_log_ckpts=8),
        circuit=CircuitConfig(steps=400, batch_size=32))
  if name == "paper":
    e = 4
    return Config(
        model=ModelConfig(n_layer=8, d_model=256 * e, n_head=16 * e, d_head=16,
                          d_mlp=1024 * e, vocab_size=2048, block_size=256, afrac=0.25),
        sparsity=SparsityConfig(weight_density=1 / 64, embed_density=1 / 16),
        optim=OptimConfig(lr=1.28e-2),
        data=DataConfig(),
        train=TrainConfig(steps=244_140, batch_size=512, seq_len=256, eval_every=1000,
                          eval_batches=16, log_every=50, ckpt_every=5000, n_log_ckpts=16),
        circuit=CircuitConfig(steps=2000, batch_size=64))
  raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
