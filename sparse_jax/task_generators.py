"""Seeded generators for the paper's 20 binary next-token tasks, plus an induction control.

Each task is a `TaskSpec(name, description, generate)`; `generate(rng) -> Pair` returns one
minimally different pair of Python snippets: `prompt_a` should continue with `tok`,
`prompt_b` with `alt`. Both sides share every context line, name and literal; they differ
only in the one thing the task is about (PAPER.md §3, Table 1). The authors' generators were
never released, so these are written from the table's definitions. Names, literals, lengths
and surrounding code (module, function or method scope, a few context statements) are drawn
at random so that a model cannot pass by memorising a template.

Candidates are strings; `sparse_jax.tasks` tokenises them with the model's own tokenizer and
predicts the first token where `prompt + tok` and `prompt + alt` differ. The tinypython
pre-tokenizer glues runs of punctuation together with any trailing newline (`")\n`, `):\n`),
so prompts end in a letter, digit, space-free quote or newline, and candidates carry what
follows the decision point (`":\n"`, not `":"`): the token asked for is then the one the model
sees in real code.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Pair(NamedTuple):
  """One minimally different pair: prompt_a -> tok, prompt_b -> alt.

  alt None makes an "X vs not-X" pair: prompt_b should continue with anything but tok.
  """

  prompt_a: str
  prompt_b: str
  tok: str
  alt: str | None


class TaskSpec(NamedTuple):
  name: str
  description: str
  generate: Callable[[np.random.Generator], Pair]


NAMES = (
    "name value data key path size count result items index text line node parent child "
    "args config buf mode level start end offset length width height total prefix suffix "
    "message source target timeout callback handler default options context state stream "
    "encoding errors entry record row column token word chunk block frame request response "
    "header body payload query params user group item element obj module func method attr "
    "field label tag kind flag status code version number limit step delta ratio weight "
    "score depth queue stack cache table registry store buffer reader writer parser loader "
    "server client address host port url filename dirname lines words values keys names "
    "results parts fields rows nodes pending seen visited counter base root tree graph edges "
    "pattern match spec info meta extra flags factor scale mapping lookup handlers events "
    "event task tasks job worker pool timer retries attempt sample batch points point grid "
    "cells shape").split()
VERBS = ("get set load save read write parse build make create update process handle check "
         "validate compute render format convert run start stop reset apply send fetch find "
         "collect merge split clean add remove sort filter").split()
WORDS = ("hello world error failed to load file not found invalid value for missing key in "
         "config processing done starting server on port connection closed retrying request "
         "timed out unexpected token at line cannot open the input output saved results "
         "skipping empty record user name is required expected a list got unknown option "
         "please try again finished writing data reading bad header size too large ignoring "
         "duplicate entry all tests passed").split()
IMPORTS = ("import os", "import sys", "import re", "import json", "import logging",
           "from collections import defaultdict", "from typing import Optional",
           "import itertools", "from pathlib import Path", "import time")


def _pick(rng: np.random.Generator, seq):
  return seq[int(rng.integers(len(seq)))]


def _names(rng: np.random.Generator, k: int, pool=NAMES, avoid=()) -> list[str]:
  """k distinct names, none a prefix of another (so their first tokens tend to differ)."""
  out: list[str] = []
  while len(out) < k:
    n = _pick(rng, pool)
    if n not in avoid and not any(n.startswith(o) or o.startswith(n) for o in out):
      out.append(n)
  return out


def _func_name(rng: np.random.Generator) -> str:
  return f"{_pick(rng, VERBS)}_{_pick(rng, NAMES)}"


def _class_name(rng: np.random.Generator) -> str:
  return "".join(w.capitalize() for w in _names(rng, int(rng.integers(1, 3))))


def _text(rng: np.random.Generator, lo: int = 1, hi: int = 6) -> str:
  """String-literal contents: a few words, ending in a letter."""
  words = [_pick(rng, WORDS) for _ in range(int(rng.integers(lo, hi + 1)))]
  return " ".join(words).capitalize() if rng.random() < 0.5 else " ".join(words)


def _string(rng: np.random.Generator) -> str:
  q = _pick(rng, "'\"")
  return f"{q}{_text(rng, 1, 4)}{q}"


def _literal(rng: np.random.Generator) -> str:
  k = int(rng.integers(8))
  return [str(int(rng.integers(100))), "None", "True", "False", _string(rng), "[]", "{}",
          f"{int(rng.integers(10))}.{int(rng.integers(1, 10))}"][k]


def _condition(rng: np.random.Generator, x: str, y: str) -> str:
  """A condition on x that ends in a letter or digit (a `)` would glue to `:`)."""
  n = int(rng.integers(100))
  return _pick(rng, [f"{x} > {n}", f"{x} is None", f"not {x}", f"{x} in {y}", f"{x} >= {y}",
                     f"{x}", f"{x} is not None", f"len({x}) > {n}", f"{x} == {y}",
                     f"{x} < {y}"])


def _statement(rng: np.random.Generator, ind: str, avoid=()) -> str:
  """One or two lines of everyday Python at indentation `ind`."""
  a, b, c = _names(rng, 3, avoid=avoid)
  k, n = int(rng.integers(12)), int(rng.integers(1, 10))
  text = [f"{a} = {_func_name(rng)}({b})", f"{a} = {b}.{c}", f"{a} = {_literal(rng)}",
          f"{a}.append({b})", f"{a} += {n}", f"if {a} is None:\n{ind}    {a} = {_literal(rng)}",
          f"{a} = len({b})", f"{a} = {b}[{n}]", f"{a} = {b}.get({_string(rng)}, {_literal(rng)})",
          f"{a} = {_func_name(rng)}({b}, {c})", f"logger.debug({_string(rng)}, {a})",
          f"assert {a} is not None, {_string(rng)}"][k]
  return f"{ind}{text}\n"


def _context(rng: np.random.Generator, ind: str, lo: int = 0, hi: int = 3, avoid=()) -> str:
  return "".join(_statement(rng, ind, avoid) for _ in range(int(rng.integers(lo, hi + 1))))


def _imports(rng: np.random.Generator) -> str:
  imports = [_pick(rng, IMPORTS) for _ in range(int(rng.integers(0, 3)))]
  return "".join(f"{i}\n" for i in dict.fromkeys(imports))


def _scope(rng: np.random.Generator, args=None, avoid=()) -> tuple[str, str]:
  """(header text, body indentation): module level, a function, or a method."""
  if args is None:
    args = _names(rng, int(rng.integers(0, 3)), avoid=avoid)
  doc = lambda ind: f'{ind}"""{_text(rng, 2, 6)}."""\n' if rng.random() < 0.3 else ""
  kind = rng.random()
  if kind < 0.25:
    return _imports(rng), ""
  if kind < 0.7:
    return f"def {_func_name(rng)}({', '.join(args)}):\n{doc('    ')}", "    "
  head = f"class {_class_name(rng)}:\n{doc('    ')}"
  return head + f"    def {_func_name(rng)}({', '.join(['self', *args])}):\n{doc('        ')}", \
      "        "


def _preamble(rng: np.random.Generator, avoid=(), hi: int = 3) -> tuple[str, str]:
  """A scope plus 0-hi context statements; returns (text, indentation)."""
  head, ind = _scope(rng, avoid=avoid)
  return head + _context(rng, ind, 0, hi, avoid=avoid), ind


# --- the tasks, in the order of the paper's Table 1 ---

_CALLS = ("print(", "print(", "logger.info(", "raise ValueError(", "raise RuntimeError(",
          "warnings.warn(", "sys.stderr.write(", "lines.append(", "self.fail(", "parser.error(")


def single_double_quote(rng):
  pre, ind = _preamble(rng)
  pre += ind + _pick(rng, _CALLS)
  text = _text(rng)
  return Pair(f'{pre}"{text}', f"{pre}'{text}", '")\n', "')\n")


_DEFAULTS = ("None", "None", "0", "1", "True", "False", "''", '""', "()", "10", "'utf-8'", "-1")


def final_kwarg(rng):
  args = _names(rng, int(rng.integers(2, 6)))
  head = _imports(rng)
  head += "\n\n" if head else ""
  if rng.random() < 0.5:
    head += f"class {_class_name(rng)}:\n{_context(rng, '    ', 0, 2)}\n    def "
    first = ["self"]
  else:
    head += "def "
    first = []
  head += f"{_func_name(rng)}("
  kw = [f"{a}={_pick(rng, _DEFAULTS)}" for a in args[:-1]]
  return Pair(head + ", ".join([*first, *kw, args[-1]]),
              head + ", ".join([*first, *args]), "=None", "):\n")


def _set_or_string(rng, var):
  pre, ind = _preamble(rng, avoid={var}, hi=1)  # the loop below adds more context
  item, coll = _names(rng, 2, avoid={var})
  inner = ind + "    "
  loop = f"{ind}for {item} in {coll}:\n"
  if rng.random() < 0.5:
    loop += f"{inner}if {_condition(rng, item, _pick(rng, NAMES))}:\n"
    inner += "    "
  loop += _context(rng, inner, 0, 1, avoid={var, item})
  empty = _pick(rng, ["''", '""'])
  tail = loop + inner + var
  return Pair(f"{pre}{ind}{var} = set()\n{tail}", f"{pre}{ind}{var} = {empty}\n{tail}",
              f".add({item})\n", f" += {item}\n")


def set_or_string(rng):
  return _set_or_string(rng, _pick(rng, NAMES))


def set_or_string_fixedvarname(rng):
  return _set_or_string(rng, "current")


def class_init(rng):
  params = _names(rng, int(rng.integers(3, 7)))
  done = int(rng.integers(0, len(params) - 1))  # leave >= 2 names to choose between
  n_kw = int(rng.integers(0, 3))  # defaults must come last
  sig = ", ".join(p if i < len(params) - n_kw else f"{p}={_pick(rng, _DEFAULTS)}"
                  for i, p in enumerate(params))
  head = f"class {_class_name(rng)}:\n"
  if rng.random() < 0.4:
    head += f'    """{_text(rng, 2, 6)}."""\n\n'
  head += f"    def __init__(self, {sig}):\n"
  if rng.random() < 0.3:
    head += "        super().__init__()\n"
  for p in params[:done]:
    head += f"        self.{p} = {p}\n"
  a, b = params[done], _pick(rng, params[done + 1:])
  return Pair(f"{head}        self.{a} =", f"{head}        self.{b} =", f" {a}\n", f" {b}\n")


_OPENERS = ("open({p}", "open({p}, encoding={e}", "open({p}, mode", "gzip.open({p}",
            "zipfile.ZipFile({p}", "tarfile.open({p}", "sqlite3.connect({p}",
            "tempfile.TemporaryDirectory(dir={p}", "socket.create_connection({p}",
            "urllib.request.urlopen({p}", "os.scandir({p}")


def with_as(rng):
  pre, ind = _preamble(rng)
  var = _pick(rng, ["f", "fh", "fp", "stream", "src", "out", "handle", "archive", "conn", "tmp"])
  p, e = _names(rng, 2)
  expr = _pick(rng, _OPENERS).format(p=p, e=e)
  return Pair(f"{pre}{ind}with {expr}", f"{pre}{ind}{var} = {expr}", f") as {var}:\n", ")\n")


def bracket_brace(rng):
  pre, ind = _preamble(rng)
  var = _pick(rng, NAMES)
  sep = "\n" + ind + "    " if rng.random() < 0.5 else ""
  if rng.random() < 0.7:
    q = _pick(rng, "'\"")
    key, tok, alt = f"{q}{_pick(rng, NAMES)}", f"{q}: {_literal(rng)},", f"{q}, {_string(rng)},"
  else:
    key = _pick(rng, [_pick(rng, NAMES), _pick(rng, NAMES).upper()])
    tok, alt = f": {_literal(rng)},", f", {_pick(rng, NAMES)},"
  return Pair(f"{pre}{ind}{var} = {{{sep}{key}", f"{pre}{ind}{var} = [{sep}{key}", tok, alt)


_IN_OUT = (("input", "output"), ("in", "out"), ("src", "dst"), ("source", "dest"),
           ("read", "write"), ("load", "save"), ("orig", "new"), ("template", "report"))


def with_open(rng):
  src, dst = _pick(rng, _IN_OUT)
  suffix = _pick(rng, ["_path", "_file", "_name", "file", "path", "_filename", "_fn"])
  src, dst = src + suffix, dst + suffix
  args = [src, dst] if rng.random() < 0.7 else [dst, src]
  head, ind = _scope(rng, args=args, avoid={src, dst})
  pre = head + _context(rng, ind, 0, 2, avoid={src, dst})
  q = _pick(rng, "'\"")
  call = _pick(rng, ["open({}, " + q, "open({}, mode=" + q])
  tail = f"{q}) as {_pick(rng, ['f', 'fh', 'fp', 'src', 'dst'])}:\n"
  return Pair(f"{pre}{ind}with {call.format(src)}", f"{pre}{ind}with {call.format(dst)}",
              "r" + tail, "w" + tail)


def bracket_counting(rng):
  pre, ind = _preamble(rng, hi=1)
  lhs = _pick(rng, [f"{_pick(rng, NAMES)} = "] * 2 + ["return "] * bool(ind))
  n = int(rng.integers(1, 13))
  if rng.random() < 0.8:
    items = [str(int(rng.integers(100))) for _ in range(n)]
  else:
    items = _names(rng, min(n, 6))
  body = ", ".join(items)
  return Pair(f"{pre}{ind}{lhs}[[{body}", f"{pre}{ind}{lhs}[{body}", "]]\n", "]\n")


_LOOP_VARS = ("node", "queue", "stack", "line", "chunk", "item", "pending", "todo", "frame",
              "block", "token", "entry", "task", "data", "buf", "remaining", "parts", "match")


def for_while(rng):
  var = _pick(rng, _LOOP_VARS)
  pre, ind = _preamble(rng, avoid={var})
  coll = _pick(rng, NAMES)
  return Pair(f"{pre}{ind}for {var}", f"{pre}{ind}while {var}", f" in {coll}:\n", ":\n")


def else_elif(rng):
  pre, ind = _preamble(rng, hi=1)
  x, y = _names(rng, 2)
  pre += f"{ind}if {_condition(rng, x, y)}:\n" + _context(rng, ind + "    ", 1, 2)
  if rng.random() < 0.3:
    pre += f"{ind}elif {_condition(rng, x, y)}:\n" + _context(rng, ind + "    ", 1, 1)
  # The paper's task is `:` vs not-`:` (PAPER.md §3): B is scored on p(not `:`) over the whole
  # vocabulary, not against one sampled first token of a condition.
  return Pair(f"{pre}{ind}else", f"{pre}{ind}elif", ":\n", None)


_PRINTS = ("print(", "print(", "print(", "log(", "self.log(", "echo(", "trace(", "emit(")


def fstring_brace(rng):
  pre, ind = _preamble(rng)
  var = _pick(rng, NAMES)
  call, q, text = _pick(rng, _PRINTS), _pick(rng, "'\""), _text(rng)
  return Pair(f"{pre}{ind}{call}f{q}{text}", f"{pre}{ind}{call}{q}{text}",
              f" {{{var}}}{q})\n", f"{q}, {var})\n")


def if_ternary(rng):
  pre, ind = _preamble(rng)
  x, y, z = _names(rng, 3)
  cond = _condition(rng, x, y)
  return Pair(f"{pre}{ind}if {cond}", f"{pre}{ind}{z} = {_literal(rng)} if {cond}",
              ":\n", f" else {_literal(rng)}\n")


_SWAPS = (("a", "b"), ("x", "y"), ("lo", "hi"), ("left", "right"), ("first", "second"),
          ("src", "dst"), ("old", "new"), ("prev", "curr"), ("i", "j"), ("low", "high"),
          ("start", "end"), ("u", "v"), ("p", "q"), ("m", "n"), ("head", "tail"))


def var_swap(rng):
  a, b = _pick(rng, _SWAPS) if rng.random() < 0.6 else _names(rng, 2)
  pre, ind = _preamble(rng, avoid={a, b})
  if rng.random() < 0.6:
    pre += f"{ind}if {a} > {b}:\n"
    ind += "    "
  return Pair(f"{pre}{ind}{a}, {b} = {b},", f"{pre}{ind}{b}, {a} = {a},", f" {a}\n", f" {b}\n")


def indent_for(rng):
  var, coll, acc, other = _names(rng, 4)
  head, base = _scope(rng, args=[coll])
  if not base:  # module level: make it a function so both indentations are legal
    head, base = head + ("\n\n" if head else "") + f"def {_func_name(rng)}({coll}):\n", "    "
  # A block the A-side loop sits inside and the B-side loop follows.
  block = _pick(rng, [f"if {_condition(rng, coll, acc)}:", f"for {other} in {coll}:",
                      f"with {_pick(rng, NAMES)}:", f"while {_pick(rng, NAMES)}:"])
  pre = (head + _context(rng, base, 0, 2, avoid={var}) + f"{base}{block}\n"
         + _context(rng, base + "    ", 1, 2, avoid={var}))
  loop = f"for {var} in {coll}:\n"
  body = _pick(rng, [f" {acc}.append({var})\n", f" {acc} += {var}\n", f" print({var})\n",
                     f" if {var} is None:\n"])
  # The pre-tokenizer splits an indent as (n-1 spaces, " word"): the body starts with a space.
  return Pair(f"{pre}{base}    {loop}", f"{pre}{base}{loop}",
              " " * (len(base) + 7) + body, " " * (len(base) + 3) + body)


_LAMBDA_ARGS = ("item", "key", "x", "row", "node", "value", "func", "callback", "handler", "f",
                "fn", "s", "text", "name", "pair", "entry")


def lambda_func(rng):
  arg = _pick(rng, _LAMBDA_ARGS)
  pre, ind = _preamble(rng, avoid={arg})
  var = _pick(rng, ["key", "fn", "func", "sort_key", "handler", "check", "transform",
                    "callback", "getter"])
  params = ", ".join(_names(rng, int(rng.integers(0, 3))))
  return Pair(f"{pre}{ind}{var} = lambda {arg}", f"{pre}{ind}def {arg}",
              f": {arg}[{int(rng.integers(3))}]\n", f"({params}):\n")


def _compare_value(rng) -> str:
  return _pick(rng, ["True", "False", "None", str(int(rng.integers(100))), "-1",
                     _pick(rng, NAMES).upper(), _pick(rng, NAMES)])


def if_equals(rng):
  x = _pick(rng, NAMES)
  pre, ind = _preamble(rng, avoid={x})
  v = _compare_value(rng)
  return Pair(f"{pre}{ind}if {x}", f"{pre}{ind}{x}", f" == {v}:\n", f" = {v}\n")


_PLURALS = (("items", "item"), ("lines", "line"), ("rows", "row"), ("nodes", "node"),
            ("names", "name"), ("values", "value"), ("words", "word"), ("files", "path"),
            ("args", "arg"), ("fields", "field"), ("entries", "entry"), ("tokens", "token"),
            ("parts", "part"), ("records", "record"), ("children", "child"), ("keys", "key"),
            ("points", "point"), ("chunks", "chunk"), ("tasks", "task"), ("events", "event"))


def enumerate_range(rng):
  coll, item = _pick(rng, _PLURALS)
  i = _pick(rng, ["i", "idx", "index", "n", "pos", "k", "j", "lineno", "num"])
  pre, ind = _preamble(rng, avoid={coll, item, i})
  return Pair(f"{pre}{ind}for {i}, {item} in", f"{pre}{ind}for {i} in",
              f" enumerate({coll}):\n", f" range(len({coll})):\n")


def var_if(rng):
  x = _pick(rng, NAMES)
  pre, ind = _preamble(rng, avoid={x})
  v = _pick(rng, ["True", "True", "False", "None", str(int(rng.integers(100)))])
  return Pair(f"{pre}{ind}if {x} == {v}", f"{pre}{ind}{x} = {v}", ":\n", "\n")


def while_return_true(rng):
  head, ind = _scope(rng)
  if not ind:  # `return` needs a function
    head, ind = head + ("\n\n" if head else "") + f"def {_func_name(rng)}():\n", "    "
  pre = head + _context(rng, ind, 0, 3)
  return Pair(f"{pre}{ind}while True", f"{pre}{ind}return True", ":\n", "\n")


def induction(rng):
  x, y, z, *filler = _names(rng, int(rng.integers(10, 30)), pool=NAMES + WORDS + VERBS)
  cut = int(rng.integers(0, len(filler) // 2 + 1))
  side = lambda second: " ".join([*filler[:cut], x, second, *filler[cut:], x])
  return Pair(side(y), side(z), f" {y}", f" {z}")


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("single_double_quote", "close a string with \") vs ') matching its opening quote",
             single_double_quote),
    TaskSpec("final_kwarg", "def arg after keyword args gets a default: =None vs ):",
             final_kwarg),
    TaskSpec("set_or_string", "variable initialised as set() vs '': .add vs +=", set_or_string),
    TaskSpec("set_or_string_fixedvarname", "set_or_string with the variable always `current`",
             set_or_string_fixedvarname),
    TaskSpec("class_init", "in __init__, copy the attribute name after `self.x =`", class_init),
    TaskSpec("with_as", "`with open(...)` -> ` as` vs `f = open(...)` -> newline", with_as),
    TaskSpec("bracket_brace", "first element of a dict vs a list: `:` vs `,`", bracket_brace),
    TaskSpec("with_open", "open mode from the file variable's name: 'r' vs 'w'", with_open),
    TaskSpec("bracket_counting", "close a nested vs flat list: ]] vs ]", bracket_counting),
    TaskSpec("for_while", "`for x` -> ` in` vs `while x` -> `:`", for_while),
    TaskSpec("else_elif", "`else` -> `:` vs `elif` -> not `:` (full-vocabulary loss)",
             else_elif),
    TaskSpec("fstring_brace", "in an f-string open ` {` vs close a plain string `\",`",
             fstring_brace),
    TaskSpec("if_ternary", "`if cond` -> `:` vs `x = a if cond` -> ` else`", if_ternary),
    TaskSpec("var_swap", "complete `x, y = y, x` with the first name", var_swap),
    TaskSpec("indent_for", "indentation of a for-loop body depends on the for's depth",
             indent_for),
    TaskSpec("lambda_func", "`x = lambda f` -> `:` vs `def f` -> `(`", lambda_func),
    TaskSpec("if_equals", "`if x` -> ` ==` vs `x` -> ` =`", if_equals),
    TaskSpec("enumerate_range", "`for i, x in` -> enumerate vs `for i in` -> range",
             enumerate_range),
    TaskSpec("var_if", "`if x == True` -> `:` vs `x = True` -> newline", var_if),
    TaskSpec("while_return_true", "`while True` -> `:` vs `return True` -> newline",
             while_return_true),
    TaskSpec("induction", "control: random words `A B ... A` -> B", induction),
)}
