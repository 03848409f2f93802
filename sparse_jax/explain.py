"""Explains a circuit node offline: explain, simulate, score (automated interpretability).

The automated-interpretability recipe (explain a unit from its top activations, simulate its
activations from the explanation alone, score the simulation by correlation with the real
activations on held-out text) usually needs a large language model. Here the explanation is
a short rule from a fixed library of features of the token stream, which fits a code model's
units and needs no network:

  token is X / token in {X, Y, ...}, previous token (1 or 2 back) in a set, 1-4 tokens after
  X, inside a string (any, ' or ", triple-quoted), inside a comment, bracket depth and the
  innermost bracket's kind, indentation level, first token of a line, a keyword earlier on
  the line, and conjunctions (AND) of two binary features.

1. `TokenStream`: rows of token ids (held-out pretraining text, task prompts) with each
   position's syntax state after its token, computed by scanning the decoded characters.
2. `Explainer`: anything with `name` and `propose(stream, acts_RxL, select_RxL) -> Rule`. The
   default `FeatureExplainer` picks the feature whose Pearson correlation with the
   activations is largest on the *selection* rows only (short rules win near-ties). Plug in
   another (a language model, say) by passing any object with the same two members.
3. `explain_node`: asks the explainer for a rule, **simulates** (activation ~ scale * rule +
   offset; scale and offset fitted by least squares on the selection rows, nothing else is
   fitted) and **scores** the simulation by Pearson correlation on the held-out rows, which
   the explainer never saw. A score under `min_score` marks the node "unexplained".

Shapes: R rows (sequences), L positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Protocol, Sequence

import numpy as np

KEYWORDS = ("def", "class", "return", "if", "elif", "else", "for", "while", "in", "not", "and",
            "or", "import", "from", "with", "as", "lambda", "try", "except", "finally", "is",
            "assert", "yield", "raise", "pass", "break", "continue", "None", "True", "False",
            "self", "print", "async", "await", "global", "del")
_OPEN, _CLOSE = "([{", ")]}"
_QUOTES = "'\""


@dataclasses.dataclass
class TokenStream:
  """Token rows with each position's syntax state after its token (all arrays [R, L])."""

  tokens_RxL: np.ndarray  # int token ids
  valid_RxL: np.ndarray  # bool: a real token (False for padding)
  pieces: Sequence[str]  # decoded text of each token id
  quote_RxL: np.ndarray = None  # 0 outside strings, else ord of the open string's quote
  triple_RxL: np.ndarray = None  # inside a triple-quoted string
  comment_RxL: np.ndarray = None  # inside a # comment
  depth_RxL: np.ndarray = None  # bracket depth (outside strings and comments)
  bracket_RxL: np.ndarray = None  # innermost open bracket: 0 none, 1 (, 2 [, 3 {
  indent_RxL: np.ndarray = None  # leading spaces of the current line
  line_start_RxL: np.ndarray = None  # first non-blank token of its line
  keyword_RxL: np.ndarray = None  # index in KEYWORDS of the last keyword on the line, or -1

  def __post_init__(self):
    self.tokens_RxL = np.asarray(self.tokens_RxL, np.int64)
    self.valid_RxL = np.asarray(self.valid_RxL, bool)
    if self.tokens_RxL.shape != self.valid_RxL.shape or self.tokens_RxL.ndim != 2:
      raise ValueError(f"tokens {self.tokens_RxL.shape} and valid {self.valid_RxL.shape} must "
                       "be equal [rows, positions] shapes")
    if self.tokens_RxL.size and int(self.tokens_RxL.max()) >= len(self.pieces):
      raise ValueError(f"token id {int(self.tokens_RxL.max())} has no text: the vocabulary "
                       f"has {len(self.pieces)} pieces")
    if self.quote_RxL is None:
      self._scan()

  def _scan(self) -> None:
    """Fills the syntax state by walking each row's characters once (Python's lexer rules,
    simplified: escapes, triple quotes, comments, brackets; an unclosed one-line string
    ends at the newline)."""
    shape = self.tokens_RxL.shape
    state = {name: np.zeros(shape, np.int32) for name in
             ("quote", "triple", "comment", "depth", "bracket", "indent", "line_start")}
    keyword = np.full(shape, -1, np.int32)
    kw_index = {k: i for i, k in enumerate(KEYWORDS)}
    for r in range(shape[0]):
      cols = np.flatnonzero(self.valid_RxL[r])
      row_pieces = [self.pieces[i] for i in self.tokens_RxL[r, cols]]
      text = "".join(row_pieces)  # quotes and escapes may span tokens: scan the whole row
      quote, triple, comment, escape = "", False, False, False
      stack, indent, at_line_start, line_blank, kw = [], 0, True, True, -1
      i = end = 0  # i may run past a token's end (a triple quote spread over tokens)
      for t, piece in zip(cols, row_pieces):
        starts_line = line_blank and piece.strip() != ""
        end += len(piece)
        while i < end:
          ch = text[i]
          if ch == "\n":
            if quote and not triple:
              quote = ""
            comment, at_line_start, line_blank, indent, kw = False, True, True, 0, -1
          elif at_line_start and ch in " \t":
            indent += 4 if ch == "\t" else 1
          else:
            at_line_start = False
            line_blank = line_blank and ch.isspace()
            if escape:
              escape = False
            elif quote:
              if ch == "\\":
                escape = True
              elif ch == quote and (not triple or text[i:i + 3] == quote * 3):
                i += 2 if triple else 0
                quote, triple = "", False
            elif comment:
              pass
            elif ch == "#":
              comment = True
            elif ch in _QUOTES:
              quote, triple = ch, text[i:i + 3] == ch * 3
              i += 2 if triple else 0
            elif ch in _OPEN:
              stack.append(_OPEN.index(ch) + 1)
            elif ch in _CLOSE and stack:
              stack.pop()
          i += 1
        word = piece.strip()
        if word in kw_index and not quote and not comment:
          kw = kw_index[word]
        values = {"quote": ord(quote) if quote else 0, "triple": triple, "comment": comment,
                  "depth": len(stack), "bracket": stack[-1] if stack else 0, "indent": indent,
                  "line_start": starts_line}
        for name, v in values.items():
          state[name][r, t] = v
        keyword[r, t] = kw
    for name, arr in state.items():
      setattr(self, f"{name}_RxL", arr)
    self.keyword_RxL = keyword


def vocab_pieces(tokenizer) -> list[str]:
  """The decoded text of every token id of an HF tokenizer."""
  return [tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size())]


@dataclasses.dataclass(frozen=True)
class Rule:
  """An explanation: its text and how to compute it on any stream (values [R, L])."""

  text: str
  values: Callable[[TokenStream], np.ndarray]
  complexity: int = 1  # rule length; used to prefer short rules on near-ties
  family: str = "syntax"  # "syntax" or "token": conjunctions draw their parts from both


class Explainer(Protocol):
  """Proposes a rule for one node from the selection rows only (`select_RxL` True)."""

  name: str

  def propose(self, stream: TokenStream, acts_RxL: np.ndarray, select_RxL: np.ndarray) -> Rule:
    ...


@dataclasses.dataclass
class Explanation:
  """A node's rule, its simulation fit, and its held-out score."""

  text: str
  score: float  # Pearson r of the simulation on held-out rows (nan: constant there)
  scale: float
  offset: float
  select_r: float  # Pearson r on the selection rows
  explained: bool  # score >= min_score
  explainer: str
  n_select: int  # positions used to choose the rule and fit the simulation
  n_heldout: int  # positions it is scored on

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def pearson(x_N: np.ndarray, y_N: np.ndarray) -> float:
  """Pearson correlation; 0.0 when either side is constant."""
  x_N, y_N = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
  if np.ptp(x_N) == 0 or np.ptp(y_N) == 0:  # exactly: centring a constant leaves rounding
    return 0.0
  x_N, y_N = x_N - x_N.mean(), y_N - y_N.mean()
  den = np.sqrt((x_N**2).sum() * (y_N**2).sum())
  return float((x_N * y_N).sum() / den) if den > 0 else 0.0


def _quoted(piece: str) -> str:
  return repr(piece)


def _shift(a_RxL: np.ndarray, k: int, fill) -> np.ndarray:
  """a shifted right by k along positions (position t holds a[t - k])."""
  out = np.full_like(a_RxL, fill)
  out[:, k:] = a_RxL[:, :a_RxL.shape[1] - k]
  return out


def _token_rule(pieces, ids: Sequence[int], back: int) -> Rule:
  names = ", ".join(_quoted(pieces[i]) for i in ids)
  where = ("token" if back == 0 else "previous token" if back == 1
           else f"token {back} back")
  text = f"{where} is {names}" if len(ids) == 1 else f"{where} in {{{names}}}"
  id_set = np.asarray(sorted(ids))
  return Rule(text, lambda s: np.isin(_shift(s.tokens_RxL, back, -1), id_set).astype(np.float32),
              complexity=len(ids), family="token")


def _after_rule(pieces, tok: int, window: int) -> Rule:
  def values(s: TokenStream):
    hit = np.zeros(s.tokens_RxL.shape, bool)
    for k in range(1, window + 1):
      hit |= _shift(s.tokens_RxL, k, -1) == tok
    return hit.astype(np.float32)
  return Rule(f"1-{window} tokens after {_quoted(pieces[tok])}", values, complexity=2,
              family="token")


def _syntax_rules(stream: TokenStream) -> list[Rule]:
  """Features of the syntax state (no token identities)."""
  f32 = lambda a: a.astype(np.float32)
  rules = [
      Rule("inside a string", lambda s: f32(s.quote_RxL > 0)),
      Rule("inside a '-quoted string", lambda s: f32(s.quote_RxL == ord("'"))),
      Rule('inside a "-quoted string', lambda s: f32(s.quote_RxL == ord('"'))),
      Rule("inside a triple-quoted string", lambda s: f32(s.triple_RxL > 0)),
      Rule("inside a comment", lambda s: f32(s.comment_RxL > 0)),
      Rule("bracket depth", lambda s: f32(s.depth_RxL)),
      Rule("indentation level", lambda s: f32(s.indent_RxL) / 4),
      Rule("first token of a line", lambda s: f32(s.line_start_RxL > 0)),
  ]
  for kind, name in enumerate("([{", start=1):
    rules.append(Rule(f"inside {name}...", lambda s, k=kind: f32(s.bracket_RxL == k)))
  for d in (1, 2, 3):
    rules.append(Rule(f"bracket depth >= {d}", lambda s, d=d: f32(s.depth_RxL >= d)))
  for n in (1, 2, 3):
    rules.append(Rule(f"indentation level >= {n}", lambda s, n=n: f32(s.indent_RxL >= 4 * n)))
  for k in sorted(set(np.unique(stream.keyword_RxL).tolist()) - {-1}):
    rules.append(Rule(f"after {KEYWORDS[k]!r} on the same line",
                      lambda s, k=k: f32(s.keyword_RxL == k)))
  return rules


@dataclasses.dataclass
class FeatureExplainer:
  """The default explainer: the best rule of the feature library (module docstring).

  Token candidates are ranked by their mean activation on the selection rows (tokens seen
  at least `min_count` times), from the top (a unit firing on them) and from the bottom (a
  unit silenced by them); sets are their top 1, 2, 3, 5 and 8.
  """

  name: str = "features"
  min_count: int = 2
  set_sizes: tuple[int, ...] = (1, 2, 3, 5, 8)
  n_conjunction: int = 6  # AND pairs of the best binary features, this many per family
  tie_margin: float = 0.01  # |r| a rule must gain per extra unit of length to be preferred

  def candidates(self, stream: TokenStream, acts_RxL, select_RxL) -> list[Rule]:
    """Single-feature rules, with token sets chosen from the selection rows."""
    rules = _syntax_rules(stream)
    sel = select_RxL & stream.valid_RxL
    y = acts_RxL[sel].astype(np.float64)
    V = len(stream.pieces)
    for back in (0, 1, 2):
      ids = _shift(stream.tokens_RxL, back, 0)[sel] if back else stream.tokens_RxL[sel]
      keep = np.ones(len(y), bool) if not back else _shift(stream.valid_RxL, back, False)[sel]
      count = np.bincount(ids[keep], minlength=V)
      mean = np.bincount(ids[keep], weights=y[keep], minlength=V) / np.maximum(count, 1)
      seen = np.flatnonzero(count >= self.min_count)
      if not seen.size:
        continue
      order = seen[np.argsort(-mean[seen], kind="stable")]
      for ranked in (order, order[::-1]):
        for n in self.set_sizes:
          if n <= len(ranked):
            rules.append(_token_rule(stream.pieces, ranked[:n].tolist(), back))
      if back == 1:  # "1-4 tokens after X" for the best previous tokens
        rules.extend(_after_rule(stream.pieces, int(t), 4) for t in order[:3])
    return rules

  def propose(self, stream: TokenStream, acts_RxL, select_RxL) -> Rule:
    sel = select_RxL & stream.valid_RxL
    y = acts_RxL[sel]
    singles = self.candidates(stream, acts_RxL, select_RxL)
    vals = [r.values(stream) for r in singles]
    r_abs = np.array([abs(pearson(v[sel], y)) for v in vals])
    binary = []
    for family in ("syntax", "token"):  # token sets alone would crowd out syntax features
      binary += [i for i in np.argsort(-r_abs, kind="stable") if singles[i].family == family
                 and np.isin(vals[i][sel], (0.0, 1.0)).all()][:self.n_conjunction]
    rules, scores = list(singles), list(r_abs)
    for i, j in itertools.combinations(binary, 2):
      both = vals[i] * vals[j]
      rules.append(Rule(f"{singles[i].text} AND {singles[j].text}",
                        lambda s, a=singles[i], b=singles[j]: a.values(s) * b.values(s),
                        complexity=singles[i].complexity + singles[j].complexity,
                        family="conjunction"))
      scores.append(abs(pearson(both[sel], y)))
    adjusted = [s - self.tie_margin * (r.complexity - 1) for r, s in zip(rules, scores)]
    return rules[int(np.argmax(adjusted))]


def explain_node(stream: TokenStream, acts_RxL: np.ndarray, select_RxL: np.ndarray,
                 explainer: Explainer | None = None, *, min_score: float = 0.5) -> Explanation:
  """Explains one node, simulates it from the rule alone and scores it on held-out rows.

  Args:
    stream: the token rows.
    acts_RxL: the node's activation at every position.
    select_RxL: True on the rows the explainer may look at (rule choice and the fit);
      the other valid positions are held out and only used for the score.
    explainer: default `FeatureExplainer()`.
    min_score: held-out Pearson r below which the node counts as unexplained.

  Returns:
    The `Explanation`.
  """
  explainer = explainer or FeatureExplainer()
  acts_RxL = np.asarray(acts_RxL, np.float64)
  if acts_RxL.shape != stream.tokens_RxL.shape:
    raise ValueError(f"acts {acts_RxL.shape} do not match the stream {stream.tokens_RxL.shape}")
  sel = np.asarray(select_RxL, bool) & stream.valid_RxL
  held = ~np.asarray(select_RxL, bool) & stream.valid_RxL
  if not sel.any() or not held.any():
    raise ValueError("explain_node needs valid positions both in and out of select_RxL")
  rule = explainer.propose(stream, acts_RxL, sel)
  x_RxL = np.asarray(rule.values(stream), np.float64)
  scale, offset = simulate_fit(x_RxL[sel], acts_RxL[sel])
  score = pearson(scale * x_RxL[held] + offset, acts_RxL[held])
  return Explanation(rule.text, score, scale, offset, pearson(x_RxL[sel], acts_RxL[sel]),
                     bool(score >= min_score), explainer.name, int(sel.sum()), int(held.sum()))


def simulate_fit(x_N: np.ndarray, y_N: np.ndarray) -> tuple[float, float]:
  """Least-squares (scale, offset) of y ~ scale * x + offset; a constant x gives scale 0."""
  x_N, y_N = np.asarray(x_N, np.float64), np.asarray(y_N, np.float64)
  var = x_N.var()
  scale = float(((x_N - x_N.mean()) * (y_N - y_N.mean())).mean() / var) if var > 0 else 0.0
  return scale, float(y_N.mean() - scale * x_N.mean())


def alternate_rows(stream: TokenStream) -> np.ndarray:
  """select_RxL: even rows select, odd rows are held out (rows are independent samples)."""
  return np.broadcast_to((np.arange(stream.tokens_RxL.shape[0]) % 2 == 0)[:, None],
                         stream.tokens_RxL.shape).copy()


def top_snippets(stream: TokenStream, acts_RxL: np.ndarray, *, k: int = 8, before: int = 12,
                 after: int = 3) -> list[dict]:
  """The k positions of largest |activation| (at most one per row), with context.

  Returns:
    [{"tokens": [[text, activation], ...], "at": index of the top token, "act": value}].
  """
  acts_RxL = np.where(stream.valid_RxL, np.asarray(acts_RxL, np.float64), np.nan)
  mag_RxL = np.nan_to_num(np.abs(acts_RxL), nan=-1.0)
  best_L = np.argmax(mag_RxL, axis=1)
  rows = np.argsort(-mag_RxL[np.arange(len(best_L)), best_L], kind="stable")[:k]
  out = []
  for r in rows:
    t = int(best_L[r])
    lo, hi = max(0, t - before), min(stream.tokens_RxL.shape[1], t + after + 1)
    toks = [[stream.pieces[stream.tokens_RxL[r, j]], float(acts_RxL[r, j])]
            for j in range(lo, hi) if stream.valid_RxL[r, j]]
    out.append({"tokens": toks, "at": t - lo - int((~stream.valid_RxL[r, lo:t]).sum()),
                "act": float(acts_RxL[r, t])})
  return out
