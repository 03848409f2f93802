"""CLI: validation loss of trained runs per byte of named corpora, comparable across tokenizers.

`python -m experiments.val_bytes RUN [RUN ...] --corpus stdlib [--corpus simple@FILE.jsonl]
[--task-pairs N --task-seed S]`

Runs trained on different data (an A/B of the training mixture) have different tokenizers and
validation mixtures, so their `val/loss` (nats per token of their own mixture) cannot be
compared. This scores every run on the same documents: each corpus's validation split (the
split training used, by document name), the first documents up to `--max-bytes`, tokenized with
each run's own tokenizer and scored in windows of the run's `train.seq_len` (each token but the
first predicted once; the context restarts every window). It prints nats per byte (total nats
over the documents' UTF-8 bytes) and nats per token, one row per run and corpus. With
`--task-pairs N` it also scores every task on N held-out pairs drawn with `--task-seed` (more,
and other, pairs than the training-time evaluation's `train.task_eval_pairs` at seed 0).

Corpus specs are those of `DataConfig.corpus`; `LABEL@FILE.jsonl` reads a jsonl file but names
its documents `LABEL:LINE` as the corpus LABEL does, e.g. `simple@~/.cache/sparse_jax/simple-
<key>.jsonl` for the generated corpus of an older generator, split the way its run split it.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from sparse_jax import checkpoint as ckpt_lib
from sparse_jax import data as data_lib
from sparse_jax import model as model_lib
from sparse_jax import tasks as tasks_lib
from sparse_jax.config import ModelConfig
from sparse_jax.corpus import Document, load_corpus, split_documents
from sparse_jax.fileio import atomic_write_text



def load_val_docs(spec: str, val_frac: float, max_bytes: int) -> list[Document]:
  """The validation documents of a corpus spec (see the module docstring), up to max_bytes."""
  label, _, path = spec.rpartition("@")
  docs, _ = load_corpus(path)
  if label:  # name the documents as the corpus `label` names them, so the split matches
    docs = [Document(f"{label}:{d.name.rsplit(':', 1)[1]}", d.text) for d in docs]
  _, val = split_documents(docs, val_frac)
  out, total = [], 0
  for doc in val:
    if out and total + len(doc.text.encode()) > max_bytes:
      break
    out.append(doc)
    total += len(doc.text.encode())
  return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll_sum(params, tokens_BxL1: jax.Array, mask_BxL: jax.Array, cfg: ModelConfig):
  logits_BxLxV = model_lib.forward(params, tokens_BxL1[:, :-1], cfg).astype(jnp.float32)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, tokens_BxL1[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll_BxL * mask_BxL)


def score(params, cfg: ModelConfig, tokens_N: np.ndarray, seq_len: int,
          batch_size: int = 16) -> tuple[float, int]:
  """(total nats, tokens predicted) over a token stream, windows of seq_len + 1 overlapping
  by one token so that every token after the first is predicted exactly once."""
  n_pred = len(tokens_N) - 1
  n_win = -(-n_pred // seq_len)
  n_win += -n_win % batch_size  # whole batches: one compiled shape (padding is masked)
  padded_M = np.zeros(n_win * seq_len + 1, np.int32)
  padded_M[:len(tokens_N)] = tokens_N
  mask_M = (np.arange(n_win * seq_len) < n_pred).astype(np.float32)
  idx_WxL1 = np.arange(n_win)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  windows_WxL1, mask_WxL = padded_M[idx_WxL1], mask_M.reshape(n_win, seq_len)
  total = 0.0
  for i in range(0, n_win, batch_size):
    total += float(_window_nll_sum(params, windows_WxL1[i:i + batch_size],
                                   mask_WxL[i:i + batch_size], cfg))
  return total, n_pred


@cli.command
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="run directories (experiments.train workdirs)")
  parser.add_argument("--corpus", action="append", required=True,
                      help="corpus spec, or LABEL@FILE.jsonl (repeatable)")
  parser.add_argument("--max-bytes", type=int, default=400_000,
                      help="validation bytes scored per corpus (default 400000)")
  parser.add_argument("--task-pairs", type=int, default=0,
                      help="also score every task on this many held-out pairs (default 0: off)")
  parser.add_argument("--task-seed", type=int, default=1, help="seed of those pairs (default 1)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args(argv)
  if args.max_bytes < 1 or args.task_pairs < 0:
    raise ValueError(f"--max-bytes must be >= 1 and --task-pairs >= 0, got {args.max_bytes}, "
                     f"{args.task_pairs}")
  rows = []
  for run in args.runs:
    cfg, params, step = ckpt_lib.load_params(run)
    tok = data_lib.load_tokenizer(run)
    for spec in args.corpus:
      docs = load_val_docs(spec, cfg.data.val_frac, args.max_bytes)
      n_bytes = sum(len(d.text.encode()) for d in docs)
      nats, n_tok = score(params, cfg.model, data_lib.tokenize_documents(tok, docs,
                                                                         progress=False),
                          cfg.train.seq_len)
      rows.append({"run": run, "step": step, "corpus": spec, "docs": len(docs),
                   "bytes": n_bytes, "tokens": n_tok, "nats_per_token": nats / n_tok,
                   "nats_per_byte": nats / n_bytes})
      print(f"{run} step {step} | {spec} | {len(docs)} docs, {n_bytes} bytes, {n_tok} tokens"
            f" | {nats / n_tok:.4f} nats/token | {nats / n_bytes:.4f} nats/byte", flush=True)
    if args.task_pairs:
      taskset = tasks_lib.build_taskset(tok, n_train=1, n_heldout=args.task_pairs,
                                        seed=args.task_seed,
                                        max_len=min(128, cfg.model.block_size))
      results = tasks_lib.evaluate_tasks(params, cfg.model, taskset)
      rows.append({"run": run, "step": step, "task_pairs": args.task_pairs,
                   "task_seed": args.task_seed, "tasks": results})
      for name, m in results.items():
        print(f"{run} step {step} | task {name} | loss {m['loss']:.3f} | acc {m['acc']:.2f}",
              flush=True)
  if args.json:
    atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  cli.run(main)
