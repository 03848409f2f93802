"""Binary next-token tasks as stacked arrays, and the paper's contrast loss (PAPER.md §3).

A task is many minimally different pairs (A, B): A should continue with `tok`, B with `alt`.
Loss, exactly as the authors' `last_token_contrast_loss_fn` (two-sided): at each sequence's
last real position take a softmax over only {tok, alt}; a pair costs
-[log p(tok | A) + log p(alt | B)]. We report the per-*sequence* mean (half the pair sum,
the authors' stored numbers are the sum), so 0.15 means each side has p(correct) ~ 0.86.

"X vs not-X" pairs (`alt` is None: B should continue with anything but `tok`, as in the
paper's else_elif) use the authors' full-vocabulary form -[log p(tok | A) + log(1 - p(tok | B))].
Both forms are one function of a per-sequence logit difference d: tok minus alt, or, for
not-X pairs, the full-softmax log-odds of tok, logit_tok - logsumexp(other logits), so that
p(tok) = sigmoid(d). `contrast_loss`, the circuit search and its scale+shift calibration
therefore treat every task alike; a not-X side B counts as correct when p(tok | B) < 1/2.

Arrays (one task): tokens_Px2xL (P pairs, side 0 = A, side 1 = B, right-padded with 0),
last_Px2 (index of each sequence's last real token), tok_P and alt_P (candidate ids).
Causal attention never sees the right padding, so reading logits at `last` is exact.
A `TaskSet` stacks T tasks with a leading task axis, ready for `jax.vmap`.

Candidates are strings, tokenised with the model's own tokenizer at load time. `prompt + tok`
and `prompt + alt` are tokenised whole and the predicted token is the first one where the two
differ; the tokens they share before it form the sequence the model reads (the prompt, plus
any shared start of the candidates, minus any end of the prompt that BPE merges with them: for
`def f(a, b)` + `:` vs ` ->` the model reads `def f(a, b` and is asked `):` vs `)`). For a
not-X pair the predicted token is the first token of `prompt + tok` that reaches past the
prompt. Refused as ambiguous: candidates with no differing token (one a token-prefix of the
other), and a first difference that lies inside the prompt on both sides (BPE splitting the
prompt's end two ways, e.g. indentation). Sides A and B must agree on (tok, alt). Generator
pairs that break this, run past `max_len` or repeat an earlier sequence are resampled and
counted; a task that cannot fill its pairs is *unavailable* for that tokenizer and listed,
with the reason, in `TaskSet.unavailable`.

User task files (`file:PATH` in a task list) hold JSON lines
`{"prompt": ..., "target": ..., "alt": ...}`, optionally with `"alt_prompt"`, the paired
prompt that should continue with `alt`. A line without `alt_prompt` is one side only; it is
paired with a line whose target and alt are swapped (in file order, cycling the shorter
group). `"alt": null` makes an "X vs not-X" pair (alt_prompt should continue with anything but
target) and needs `alt_prompt`. Candidates tokenise by the generators' rule above. Any
malformed line, an empty file or an ambiguous candidate raises `TaskFileError` naming the file
and line. Pairs are
split into train and held-out by a seeded shuffle and cycled to fill `n_train`/`n_heldout`
(the splits share no pair; they share sequences only where the file reuses a prompt).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import zlib
from typing import Any, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax import model as model_lib
from sparse_jax.config import ModelConfig
from sparse_jax.task_generators import TASKS, Pair

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TaskArrays:
  """Pairs of one task (leading axes P...), or of T stacked tasks (leading axes T, P...)."""

  tokens_Px2xL: jax.Array  # int32
  last_Px2: jax.Array  # int32, position of the last real token of each sequence
  tok_P: jax.Array  # int32, the token side A should predict
  alt_P: jax.Array  # int32, the token side B should predict (== tok_P where vs_rest_P)
  # bool, "X vs not-X" pairs: side B should predict anything but tok (full-vocab loss);
  # None means no such pair.
  vs_rest_P: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class TaskSet:
  """T tasks stacked for vmap, with train and held-out pairs."""

  names: tuple[str, ...]
  train: TaskArrays  # arrays with a leading T axis
  heldout: TaskArrays
  unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> reason


def _signed(d_Px2: jax.Array) -> jax.Array:
  """d with side B's sign flipped: positive where each side prefers its own answer."""
  return d_Px2 * jnp.array([1.0, -1.0])


def contrast_loss(d_Px2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, accuracy), both per-sequence means, from tok-minus-alt logit differences.

  Side A wants tok (d > 0), side B wants alt (d < 0); in the two-way softmax
  log p(tok | A) = log_sigmoid(d_A) and log p(alt | B) = log_sigmoid(-d_B).
  """
  signed_Px2 = _signed(d_Px2)
  loss = -jnp.mean(jax.nn.log_sigmoid(signed_Px2))
  acc = jnp.mean((signed_Px2 > 0).astype(jnp.float32))
  return loss, acc


def contrast_loss_se(d_Px2: jax.Array) -> jax.Array:
  """Standard error of `contrast_loss`'s loss over the P pairs (0 for one pair).

  The pair is the sampling unit: its two sequences share everything but the cue token."""
  P = d_Px2.shape[0]
  if P < 2:
    return jnp.zeros((), jnp.float32)
  loss_P = -jnp.mean(jax.nn.log_sigmoid(_signed(d_Px2)), axis=1)
  return jnp.std(loss_P, ddof=1) / np.sqrt(P)


def pair_logit_diff(params, cfg: ModelConfig, arrays: TaskArrays, *, ablation=None):
  """d_Px2 for one task's pairs (optionally with node ablation): tok minus alt logit, or for
  "X vs not-X" pairs the full-softmax log-odds of tok (see the module docstring)."""
  P, _, L = arrays.tokens_Px2xL.shape
  # Unembed only each sequence's last real position: the rest of the logits are never read.
  logits_SxV = model_lib.forward(params, arrays.tokens_Px2xL.reshape(P * 2, L), cfg,
                                 ablation=ablation, positions_B=arrays.last_Px2.reshape(-1))
  tok_S, alt_S = jnp.repeat(arrays.tok_P, 2)[:, None], jnp.repeat(arrays.alt_P, 2)[:, None]
  tok_logit_S = jnp.take_along_axis(logits_SxV, tok_S, axis=1)[:, 0]
  d_S = tok_logit_S - jnp.take_along_axis(logits_SxV, alt_S, axis=1)[:, 0]
  if arrays.vs_rest_P is not None:
    is_tok_SxV = jnp.arange(logits_SxV.shape[1]) == tok_S
    rest_S = jax.nn.logsumexp(jnp.where(is_tok_SxV, -jnp.inf, logits_SxV), axis=1)
    d_S = jnp.where(jnp.repeat(arrays.vs_rest_P, 2), tok_logit_S - rest_S, d_S)
  return d_S.reshape(P, 2)


def task_metrics(params, cfg: ModelConfig, arrays: TaskArrays, *, ablation=None):
  """(loss, accuracy) of one task."""
  return contrast_loss(pair_logit_diff(params, cfg, arrays, ablation=ablation))


# --- candidate resolution and task sampling ---


class TaskUnavailable(ValueError):
  """A task cannot be built for this tokenizer; str(e) is the reason."""


class TaskFileError(ValueError):
  """A user task file is malformed; the message names the file and line."""


class Encoded(NamedTuple):
  """One pair in token ids: seq_a -> tok, seq_b -> alt (None: anything but tok)."""

  seq_a: tuple[int, ...]
  seq_b: tuple[int, ...]
  tok: int
  alt: int | None


class PairRejected(ValueError):
  """A pair that does not tokenise cleanly with this tokenizer; str(e) is the reason."""


def _ids_and_ends(tokenizer, text: str) -> tuple[list[int], list[int]]:
  """Token ids of text, and the character offset at which each token ends."""
  enc = tokenizer.encode(text)
  return enc.ids, [end for _, end in enc.offsets]


def _resolve_side(tokenizer, prompt: str, tok: str, alt: str | None):
  """(sequence the model reads, tok id, alt id or None) for one side of a pair."""
  n = len(prompt)
  t, t_end = _ids_and_ends(tokenizer, prompt + tok)
  if alt is None:  # not-X: the first token that reaches past the prompt
    i = next(i for i, end in enumerate(t_end) if end > n)
    a_i = None
  else:
    a, a_end = _ids_and_ends(tokenizer, prompt + alt)
    i = next((i for i, (x, y) in enumerate(zip(t, a)) if x != y), None)
    if i is None:
      raise PairRejected("tok and alt tokenise to the same tokens (one is a prefix of the "
                         "other)")
    if t_end[i] <= n and a_end[i] <= n:
      raise PairRejected(f"BPE splits the end of the prompt two ways ("
                         f"{tokenizer.decode([t[i]])!r} vs {tokenizer.decode([a[i]])!r}) before "
                         f"tok and alt, so neither predicted token holds a candidate")
    a_i = a[i]
  if i == 0:
    raise PairRejected("BPE merges the whole prompt into the predicted token")
  return tuple(t[:i]), t[i], a_i


def encode_pair(tokenizer, pair: Pair, max_len: int) -> Encoded:
  """Tokenises a pair and resolves its candidates (see the module docstring).

  Raises:
    PairRejected: with the reason, if the pair cannot be used with this tokenizer.
  """
  seq_a, tok_a, alt_a = _resolve_side(tokenizer, pair.prompt_a, pair.tok, pair.alt)
  seq_b, tok_b, alt_b = _resolve_side(tokenizer, pair.prompt_b, pair.tok, pair.alt)
  if (tok_a, alt_a) != (tok_b, alt_b):
    raise PairRejected("the candidates tokenise differently after prompt A and prompt B")
  if max(len(seq_a), len(seq_b)) > max_len:
    raise PairRejected(f"longer than max_len={max_len} tokens")
  if seq_a == seq_b:
    raise PairRejected("prompts A and B tokenise identically")
  return Encoded(seq_a, seq_b, tok_a, alt_a)


def sample_task(tokenizer, name: str, n: int, *, seed: int = 0, max_len: int = 128):
  """Draws n distinct, cleanly tokenising pairs of a generator task.

  Args:
    tokenizer: a `tokenizers.Tokenizer` (anything with `.encode(text).ids`).
    name: a key of `task_generators.TASKS`.
    n: number of pairs; no sequence (A or B) appears in two pairs.
    seed: the task's random stream is keyed by (seed, name), so adding tasks changes nothing.
    max_len: longest allowed sequence, in tokens.

  Returns:
    (list of (Pair, Encoded), stats) where stats counts attempts and rejections by reason.

  Raises:
    TaskUnavailable: if fewer than n valid pairs turn up in 10 n + 100 attempts.
  """
  spec = TASKS[name]
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  out, seen, rejected = [], set(), collections.Counter()
  attempts = 0
  while len(out) < n and attempts < 10 * n + 100:
    attempts += 1
    pair = spec.generate(rng)
    try:
      enc = encode_pair(tokenizer, pair, max_len)
    except PairRejected as e:
      rejected[str(e)] += 1
      continue
    if enc.seq_a in seen or enc.seq_b in seen:
      rejected["repeats an earlier sequence"] += 1
      continue
    seen.update((enc.seq_a, enc.seq_b))
    out.append((pair, enc))
  stats = {"attempts": attempts, "valid": len(out), "rejected": dict(rejected)}
  if len(out) < n:
    why = "; ".join(f"{r} ({c}x)" for r, c in rejected.most_common(2))
    raise TaskUnavailable(f"only {len(out)}/{n} valid distinct pairs in {attempts} attempts: "
                          f"{why}")
  return out, stats


# --- user task files ---


_FILE_KEYS = ("prompt", "target", "alt", "alt_prompt")


def _parse_task_file(path: str) -> list[tuple[int, dict[str, str]]]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise TaskFileError(f"{path}: cannot read task file: {e}") from None
  rows = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise TaskFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise TaskFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in _FILE_KEYS[:3]:
      if key not in obj:
        raise TaskFileError(f"{where}: missing key {key!r} (need prompt, target, alt)")
    for key, value in obj.items():
      if key not in _FILE_KEYS:
        raise TaskFileError(f"{where}: unknown key {key!r}; allowed: {', '.join(_FILE_KEYS)}")
      if key == "alt" and value is None:
        continue  # "X vs not-X"
      if not isinstance(value, str) or not value:
        raise TaskFileError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if obj["alt"] is None and "alt_prompt" not in obj:
      raise TaskFileError(f"{where}: 'alt': null (target vs anything else) needs 'alt_prompt', "
                          f"the prompt that should not continue with target")
    rows.append((lineno, obj))
  if not rows:
    raise TaskFileError(f"{path}: empty task file (expected JSON lines with "
                        f"prompt, target, alt)")
  return rows


def load_task_file(path: str, tokenizer, *, max_len: int | None = None):
  """Reads a JSONL task file into pairs (format in the module docstring).

  Returns:
    list of (Pair, Encoded), in file order.

  Raises:
    TaskFileError: naming the file and line, for anything malformed or ambiguous.
  """
  limit = max_len if max_len is not None else float("inf")
  sides = []  # (lineno, obj, seq, tok id, alt id) of every line without alt_prompt
  out = []
  for lineno, obj in _parse_task_file(path):
    where = f"{path}:{lineno}"
    pair = Pair(obj["prompt"], obj.get("alt_prompt"), obj["target"], obj["alt"])
    try:
      if pair.prompt_b is not None:
        out.append((pair, encode_pair(tokenizer, pair, limit)))
        continue
      seq, t, a = _resolve_side(tokenizer, pair.prompt_a, pair.tok, pair.alt)
    except PairRejected as e:
      raise TaskFileError(f"{where}: {e} (target {pair.tok!r}, alt {pair.alt!r})") from None
    if len(seq) > limit:
      raise TaskFileError(f"{where}: prompt is {len(seq)} tokens, over max_len={max_len}")
    sides.append((lineno, obj, seq, t, a))
  # One-sided lines: those preferring t over a are paired with those preferring a over t.
  groups = collections.defaultdict(list)
  for side in sides:
    groups[side[3:]].append(side)
  done = set()
  for (t, a), group in groups.items():
    if (t, a) in done:
      continue
    other = groups.get((a, t))
    if not other:
      lineno, obj = group[0][:2]
      raise TaskFileError(f"{path}:{lineno}: no line with target {obj['alt']!r} and alt "
                          f"{obj['target']!r} to pair with; add one or give 'alt_prompt'")
    done.update({(t, a), (a, t)})
    for i in range(max(len(group), len(other))):
      (line_x, x, seq_a, *_), (line_y, y, seq_b, *_) = group[i % len(group)], \
          other[i % len(other)]
      if seq_a == seq_b:
        raise TaskFileError(f"{path}:{line_x}: same prompt as line {line_y} but with target "
                            f"and alt swapped")
      out.append((Pair(x["prompt"], y["prompt"], x["target"], x["alt"]),
                  Encoded(seq_a, seq_b, t, a)))
  return out


def _split_file_pairs(encs: list[Encoded], n_train: int, n_heldout: int, seed: int, path: str):
  """Disjoint train/held-out lists from a file's pairs, each cycled to its size."""
  encs = list(dict.fromkeys(encs))  # duplicate lines would leak between the splits
  if len(encs) < 2:
    raise TaskFileError(f"{path}: needs at least 2 distinct pairs (train and held-out), "
                        f"found {len(encs)}")
  order = np.random.default_rng([seed, zlib.crc32(path.encode())]).permutation(len(encs))
  encs = [encs[i] for i in order]
  n_h = min(max(1, round(len(encs) * n_heldout / (n_train + n_heldout))), len(encs) - 1)
  cycle = lambda xs, n: [xs[i % len(xs)] for i in range(n)]
  return cycle(encs[n_h:n_h + n_train], n_train), cycle(encs[:min(n_h, n_heldout)], n_heldout)


# --- TaskSet building and evaluation ---


def _stack(per_task: Sequence[list[Encoded]], L: int) -> TaskArrays:
  T, P = len(per_task), len(per_task[0])
  tokens = np.zeros((T, P, 2, L), np.int32)  # 0 (<|endoftext|>) pads on the right
  last = np.zeros((T, P, 2), np.int32)
  for ti, encs in enumerate(per_task):
    for pi, e in enumerate(encs):
      for side, seq in enumerate((e.seq_a, e.seq_b)):
        tokens[ti, pi, side, :len(seq)] = seq
        last[ti, pi, side] = len(seq) - 1
  tok = np.array([[e.tok for e in encs] for encs in per_task], np.int32)
  vs_rest = np.array([[e.alt is None for e in encs] for encs in per_task], bool)
  alt = np.where(vs_rest, tok, [[e.tok if e.alt is None else e.alt for e in encs]
                                for encs in per_task]).astype(np.int32)
  return TaskArrays(jnp.asarray(tokens), jnp.asarray(last), jnp.asarray(tok), jnp.asarray(alt),
                    jnp.asarray(vs_rest))


def build_taskset(tokenizer, names: Sequence[str] | None = None, *, n_train: int = 64,
                  n_heldout: int = 64, seed: int = 0, max_len: int = 128) -> TaskSet:
  """Builds stacked train and held-out arrays for many tasks.

  Args:
    tokenizer: the model's tokenizer.
    names: task names (`task_generators.TASKS` keys) and/or `file:PATH` user files;
      None means every built-in task.
    n_train, n_heldout: pairs per task in each split (disjoint token sequences).
    seed: base seed; each task's stream is keyed by (seed, name).
    max_len: longest allowed sequence; arrays are padded to the longest actual one.

  Returns:
    A TaskSet over the available tasks; the others are in `unavailable` with a reason.

  Raises:
    ValueError: unknown task name, or no task available. TaskFileError: bad user file.
  """
  names = list(TASKS) if names is None else list(names)
  if not names:
    raise ValueError("tasks: the task list is empty; name at least one task (or all)")
  unknown = [n for n in names if not n.startswith("file:") and n not in TASKS]
  if unknown:
    raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)} or file:PATH")
  if n_train < 1 or n_heldout < 1:
    raise ValueError(f"n_train and n_heldout must be >= 1, got {n_train}, {n_heldout}")
  splits, unavailable = {}, {}
  for name in dict.fromkeys(names):
    if name.startswith("file:"):
      path = name[len("file:"):]
      encs = [e for _, e in load_task_file(path, tokenizer, max_len=max_len)]
      splits[name] = _split_file_pairs(encs, n_train, n_heldout, seed, path)
      continue
    try:
      samples, stats = sample_task(tokenizer, name, n_train + n_heldout, seed=seed,
                                   max_len=max_len)
    except TaskUnavailable as e:
      log.warning("task %s unavailable: %s", name, e)
      unavailable[name] = str(e)
      continue
    log.debug("task %s: %s", name, stats)
    encs = [e for _, e in samples]
    splits[name] = (encs[:n_train], encs[n_train:])
  if not splits:
    raise ValueError(f"no task is available with this tokenizer: {unavailable}")
  L = max(len(s) for tr, he in splits.values() for e in tr + he for s in (e.seq_a, e.seq_b))
  return TaskSet(names=tuple(splits), train=_stack([tr for tr, _ in splits.values()], L),
                 heldout=_stack([he for _, he in splits.values()], L), unavailable=unavailable)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _taskset_logit_diff(params, cfg: ModelConfig, arrays: TaskArrays) -> jax.Array:
  """d_TxPx2 for stacked tasks: one program, vmapped over the task axis."""
  return jax.vmap(lambda a: pair_logit_diff(params, cfg, a))(arrays)


def evaluate_tasks(params, cfg: ModelConfig, taskset: TaskSet, split: str = "heldout", *,
                   max_seqs: int | None = None) -> dict[str, dict[str, float]]:
  """Per-task contrast loss (per-sequence mean, nats) and accuracy.

  Args:
    params: model params.
    cfg: the model config.
    taskset: from `build_taskset`.
    split: "heldout" or "train".
    max_seqs: at most this many sequences (T * pairs * 2) per forward; default: as many as
      keep the logits under 256 MB. Pairs go in equal chunks (the last padded by wrapping),
      so memory stays bounded and every chunk reuses one compiled program.

  Returns:
    {task name: {"loss": float, "acc": float}}.
  """
  if split not in ("heldout", "train"):
    raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
  arrays = getattr(taskset, split)
  T, P, _, L = arrays.tokens_Px2xL.shape
  if L > cfg.block_size:
    raise ValueError(f"task sequences are {L} tokens, over model.block_size={cfg.block_size}")
  top = int(max(jnp.max(arrays.tokens_Px2xL), jnp.max(arrays.tok_P), jnp.max(arrays.alt_P)))
  if top >= cfg.vocab_size:
    raise ValueError(f"task token ids reach {top}, outside model.vocab_size={cfg.vocab_size}: "
                     f"was the taskset built with the model's tokenizer?")
  if max_seqs is None:
    max_seqs = 2**28 // (4 * L * cfg.vocab_size)  # float32 logits_SxLxV
  chunk = max(1, min(P, max_seqs // (2 * T)))
  n_chunks = -(-P // chunk)
  idx = np.arange(n_chunks * chunk) % P  # pad by wrapping; the extra pairs are cut below
  ds = [_taskset_logit_diff(params, cfg, jax.tree.map(lambda x: x[:, idx[i:i + chunk]],
                                                      arrays))
        for i in range(0, len(idx), chunk)]
  d_TxPx2 = jnp.concatenate(ds, axis=1)[:, :P]
  loss_T, acc_T = jax.vmap(contrast_loss)(d_TxPx2)
  return {name: {"loss": float(loss_T[i]), "acc": float(acc_T[i])}
          for i, name in enumerate(taskset.names)}


def flatten_metrics(results: dict[str, dict[str, float]], prefix: str = "task") -> dict[str, Any]:
  """{"task/NAME/loss": ..., "task/NAME/acc": ...} for a metrics log line."""
  return {f"{prefix}/{name}/{k}": v for name, m in results.items() for k, v in m.items()}
