"""Lists and shows the binary next-token tasks, tokenised, so they can be checked by eye.

  python -m experiments.tasks --list [--tokenizer tokenizer.json | --workdir RUN]
  python -m experiments.tasks --show single_double_quote [-n 3]
  python -m experiments.tasks --show file:my_task.jsonl

Without --tokenizer or --workdir the tokenizer of the default corpus is used: a 2048-token BPE
of the running interpreter's standard library (trained once, about 20 s, then cached). Availability depends on the
tokenizer: a task is unavailable when its candidates cannot be resolved to distinct tokens.
"""

from __future__ import annotations

import argparse
import sys

from tokenizers import Tokenizer

from experiments import cli
from sparse_jax import data
from sparse_jax import tasks
from sparse_jax.config import DataConfig
from sparse_jax.task_generators import TASKS


def default_tokenizer(vocab_size: int = 2048) -> Tokenizer:
  """The tokenizer a default run would train: BPE on the stdlib's training split (cached)."""
  print(f"no --tokenizer/--workdir: using the {vocab_size}-token BPE of the default stdlib "
        "corpus (trained once, then cached)", file=sys.stderr)
  docs, _ = data.load_corpus("stdlib")
  train_docs, _ = data.split_documents(docs, DataConfig().val_frac)
  return data.get_tokenizer(train_docs, vocab_size, data.resolve_cache_dir(None))


def get_tokenizer(tokenizer_path: str | None, workdir: str | None) -> Tokenizer:
  path = workdir if workdir is not None else tokenizer_path
  if path is None:
    return default_tokenizer()
  return data.load_tokenizer(path)


def _quoted(text: str) -> str:
  return "\n".join("    | " + line for line in text.split("\n"))


def _pieces(tokenizer, ids) -> str:
  return "[" + ", ".join(repr(tokenizer.decode([i])) for i in ids) + "]"


def _alt_text(tokenizer, alt: int | None) -> str:
  """How a candidate id reads; None is "X vs not-X" (anything but tok)."""
  return "not tok" if alt is None else repr(tokenizer.decode([alt]))


def list_tasks(tokenizer, *, seed: int = 0, n: int = 32, max_len: int = 128) -> str:
  """One line per built-in task: availability for this tokenizer, candidates, description."""
  lines = []
  for name, spec in TASKS.items():
    try:
      samples, stats = tasks.sample_task(tokenizer, name, n, seed=seed, max_len=max_len)
    except tasks.TaskUnavailable as e:
      lines.append(f"{name:28s} UNAVAILABLE  {e}")
      continue
    cands = dict.fromkeys((repr(tokenizer.decode([e.tok])), _alt_text(tokenizer, e.alt))
                          for _, e in samples)
    shown = ", ".join(f"{t}/{a}" for t, a in list(cands)[:2])
    more = f" (+{len(cands) - 2} more)" if len(cands) > 2 else ""
    rejected = sum(stats["rejected"].values())
    lines.append(f"{name:28s} ok  {shown}{more}; {rejected} of {stats['attempts']} samples "
                 f"rejected\n{'':30s}{spec.description}")
  return "\n".join(lines)


def show_task(tokenizer, name: str, *, n: int = 3, seed: int = 0, max_len: int = 128) -> str:
  """n examples of a task (or file:PATH): both prompts, their last tokens and the candidates."""
  if name.startswith("file:"):
    samples = tasks.load_task_file(name[len("file:"):], tokenizer, max_len=max_len)[:n]
    header = f"{name}: user task file"
  elif name in TASKS:
    samples, _ = tasks.sample_task(tokenizer, name, n, seed=seed, max_len=max_len)
    header = f"{name}: {TASKS[name].description}"
  else:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} or file:PATH")
  out = [header]
  for k, (pair, enc) in enumerate(samples, 1):
    out.append(f"\n[{k}] A (should continue with tok):")
    out.append(_quoted(pair.prompt_a))
    out.append("    B (should continue with alt):")
    out.append(_quoted(pair.prompt_b))
    out.append(f"    A last tokens: {_pieces(tokenizer, enc.seq_a[-8:])}")
    out.append(f"    B last tokens: {_pieces(tokenizer, enc.seq_b[-8:])}")
    out.append(f"    tok {pair.tok!r} -> {tokenizer.decode([enc.tok])!r} (id {enc.tok});  "
               f"alt {pair.alt!r} -> {_alt_text(tokenizer, enc.alt)} (id {enc.alt})")
  return "\n".join(out)


@cli.command
def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--list", action="store_true", help="list tasks and their availability")
  what.add_argument("--show", metavar="NAME", help="show examples of a task or file:PATH")
  parser.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-len", type=int, default=128, help="longest sequence in tokens")
  where = parser.add_mutually_exclusive_group()
  where.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json file")
  where.add_argument("--workdir", metavar="RUN", help="a training run dir with tokenizer.json")
  args = parser.parse_args(argv)
  if args.n <= 0:
    raise ValueError(f"-n: must be a positive number of examples, got {args.n}")
  if args.max_len < 2:
    raise ValueError(f"--max-len: must be at least 2 tokens, got {args.max_len}")
  tokenizer = get_tokenizer(args.tokenizer, args.workdir)
  if args.list:
    print(list_tasks(tokenizer, seed=args.seed, max_len=args.max_len))
  else:  # TaskFileError and TaskUnavailable are ValueErrors: one line via cli.command
    print(show_task(tokenizer, args.show, n=args.n, seed=args.seed, max_len=args.max_len))
  return 0


if __name__ == "__main__":
  cli.run(main)
