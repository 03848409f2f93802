"""Statements and expressions of the generated `simple` corpus, written from templates.

`Writer` holds one module being written (its rng, quote and indent style, and what it has
defined so far) and writes literals, expressions (by filling the templates of
`corpus_words`), and statements: assignments, simple statements, if/elif/else, for, while,
with and try. `corpus_gen` writes the definitions and modules around them.
"""

from __future__ import annotations

import random
import re

from sparse_jax import corpus_files, corpus_idioms
from sparse_jax.corpus_words import (ADJS, EXPRS, FOR_TYPES, HOLE, IMPORTS, NAMES, NEEDS, NOUNS,
                                     SIMPLE, TYPES, UNICODE_WORDS, WORDS, plural, singular)


# The idioms that hold a loop or a block, and the idioms' share of all statements (about a third).
BLOCK_IDIOMS = {"accumulate", "with_open", "copy_files", "other_context"}
IDIOM_SHARE = 1.0


class Writer:
  """One module being written: the rng, its quote and indent style, and what it defined."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    # Real files mostly keep one quote style and indent width; a few mix or differ.
    self.quote = '"' if rng.random() < 0.65 else "'"
    self.tab = " " * rng.choice((4, 4, 4, 4, 4, 2))
    self.imports = set(rng.sample(IMPORTS, rng.randint(0, 3)))
    self.consts: set[str] = set()
    # name, arg types, return type, keyword arguments with defaults (name, type)
    self.funcs: list[tuple[str, list[str], str | None, list[tuple[str, str]]]] = []
    self.classes: list[tuple[str, list[str], list[tuple]]] = []  # name, arg types, methods

  def chance(self, p: float) -> bool:
    return self.rng.random() < p

  def pick(self, seq):
    return self.rng.choice(seq)

  def indent(self, lines: list[str]) -> list[str]:
    return [self.tab + line if line else line for line in lines]

  def phrase(self) -> str:
    words = [self.pick(WORDS) for _ in range(self.rng.randint(1, 4))]
    if self.chance(0.03):
      words[0] = self.pick(UNICODE_WORDS)
    r = self.rng.random()
    if r < 0.3:
      return words[0]
    if r < 0.45:
      return f"{words[0]}.{self.pick(('txt', 'csv', 'json', 'log'))}"
    if r < 0.55:
      return self.pick(("", " ", ", ", ",", "-", ":", "\\n", "\\t"))
    return f"{' '.join(words).capitalize()}:" if r < 0.65 else " ".join(words)

  def sentence(self) -> str:
    return " ".join(self.pick(WORDS) for _ in range(self.rng.randint(2, 6))).capitalize()

  def str_lit(self, text: str | None = None) -> str:
    text = self.phrase() if text is None else text
    q = self.quote if self.chance(0.85) else ("'" if self.quote == '"' else '"')
    if q in text:
      q = "'" if q == '"' else '"'
    return q + text + q

  def int_lit(self) -> str:
    r = self.rng.random()
    if r < 0.6:
      return str(self.pick((0, 1, 1, 2, 3, 4, 5, 10)))
    return str(self.rng.randint(6, 100) if r < 0.95 else self.rng.randint(100, 9999))

  def literal(self, t: str) -> str:
    k = self.rng.randint(0, 5)
    if t in ("int", "float", "str", "bool"):
      return {"int": self.int_lit, "str": self.str_lit,
              "float": lambda: f"{self.rng.uniform(0, 100):.{self.pick((1, 2))}f}",
              "bool": lambda: self.pick(("True", "False"))}[t]()
    if t == "ints":
      return "[" + ", ".join(self.int_lit() for _ in range(k)) + "]"
    if t == "strs":
      return "[" + ", ".join(self.str_lit(self.pick(WORDS)) for _ in range(k)) + "]"
    if t == "dict":
      pairs = (f"{self.str_lit(w)}: {self.int_lit()}" for w in self.rng.sample(WORDS, k))
      return "{" + ", ".join(pairs) + "}" if k else self.pick(("{}", "dict()"))
    if t == "set":
      words = self.rng.sample(WORDS, k)
      return "{" + ", ".join(map(self.str_lit, words)) + "}" if k else "set()"
    rows = [", ".join(self.int_lit() for _ in range(k or 2)) for _ in range(self.rng.randint(1, 3))]
    return "[" + ", ".join(f"[{row}]" for row in rows) + "]"

  def fstring(self, scope: dict[str, str]) -> str:
    """An f-string with one or two fields: names with format specs and conversions, len(),
    arithmetic, method calls, indexing (with the other quote inside), or a ternary."""
    names = [n for n, t in scope.items() if t in ("int", "float", "str", "bool")]
    sized = [n for n, t in scope.items() if t in ("ints", "strs", "dict", "set")]
    q = self.quote
    other = "'" if q == '"' else '"'
    q, other = (other, q) if self.chance(0.1) else (q, other)  # some files mix quote styles
    parts = []
    for _ in range(self.rng.randint(1, 2)):
      field = self._fstring_field(scope, names, sized, other)
      word = self.pick(WORDS)
      parts.append(self.pick(("", f"{word} ", f"{word.capitalize()}: ", f"{word}=")) +
                   "{" + field + "}")
    text = self.pick((" ", ", ", " - ", "/", " | ")).join(parts)
    return "f" + q + text + q

  def _fstring_field(self, scope, names, sized, other) -> str:
    r = self.rng.random()
    if sized and r < 0.2:
      return f"len({self.pick(sized)})"
    if not names:
      return self.int_lit()
    name = self.pick(names)
    t = scope[name]
    if r < 0.3 and t in ("int", "float"):
      return f"{name} {self.pick(('+', '-', '*'))} {self.int_lit()}"
    if r < 0.38 and t == "str":
      return f"{name}.{self.pick(('upper', 'lower', 'title', 'strip'))}()"
    if r < 0.45:
      dicts = [n for n, nt in scope.items() if nt == "dict"]
      if dicts:
        return f"{self.pick(dicts)}[{other}{self.pick(WORDS)}{other}]"
    if r < 0.5 and t == "bool":
      return f"{other}yes{other} if {name} else {other}no{other}"
    spec = {"float": (":.2f", ":.1f", ":.3f", ":.1%"), "int": (":d", ":>5", ":03d", ":,"),
            "str": ("!r", ":>10", ":<8", "!s"), "bool": ("!r",)}[t]
    return name + (self.pick(spec) if self.chance(0.35) else "")

  # Templates --------------------------------------------------------------------------------

  def var(self, t: str, scope: dict[str, str], assignable: bool = False) -> str | None:
    names = [n for n, nt in scope.items()
             if nt == t and not (assignable and n in self.consts)]
    return self.pick(names) if names else None

  def usable(self, templates, scope) -> list[str]:
    """The templates whose holes can all be filled here."""
    have = {f"{t}?" for t in scope.values()} | ({"call"} if self.funcs else set())
    have |= {f"{t}*" for n, t in scope.items() if n not in self.consts}
    have |= {f"call {f[2]}" for f in self.funcs} | {f"mod {i.split()[-1]}" for i in self.imports}
    return [t for t in templates if NEEDS[t] <= have]

  def expand(self, template: str, scope: dict[str, str], depth: int) -> str:
    memo = {}

    def fill(hole):
      kind, _, arg = hole.partition(" ")
      if hole in memo:
        return memo[hole]
      if kind == "one":
        return singular(fill(arg))
      if hole[-1] in "?*":
        value = memo[hole] = self.var(hole[:-1], scope, hole[-1] == "*")
      elif hole[-1] == "!":
        value = memo[hole] = self.expr(hole[:-1], scope, depth + 1)
      elif kind in ("lit", "call", "mod"):
        value = {"lit": self.literal, "mod": str,
                 "call": lambda t: self.call(t or None, scope, depth)}[kind](arg)
      else:
        value = {"s": self.str_lit, "idx": lambda: self.index(scope),
                 "fstr": lambda: self.fstring(scope), "cond": lambda: self.cond(scope),
                 "any": lambda: self.expr(self.pick(TYPES), scope, depth + 1)}.get(
                     hole, lambda: self.expr(hole, scope, depth + 1))()
      return value
    return HOLE.sub(lambda m: fill(m.group(1)), template)

  def expr(self, t: str, scope: dict[str, str], depth: int = 0) -> str:
    """An expression of coarse type t, from the names in scope (name -> type)."""
    name = self.var(t, scope)
    if name and self.chance(0.5):
      return name
    if depth >= 2 or self.chance(0.3):
      return self.literal(t)
    return self.expand(self.pick(self.usable(EXPRS[t], scope)), scope, depth)

  def cond(self, scope: dict[str, str]) -> str:
    """A condition that depends on some name (not `True`, not `1 < 49`)."""
    for _ in range(4):
      c = self.expr("bool", scope)
      if not re.fullmatch(r"[\d\s<>=!+*/%()-]+|True|False", c):
        return c
    return f"{self.expr('int', scope, 1)} > 0"

  def index(self, scope: dict[str, str]) -> str:
    return self.pick(("0", "1", "-1") + (("i",) if scope.get("i") == "int" else ()))

  def call(self, t: str | None, scope: dict[str, str], depth: int = 0) -> str:
    """A call of a function defined above that returns t (any function if t is None)."""
    name, arg_types, _, kws = self.pick([f for f in self.funcs if t is None or f[2] == t])
    args = [self.expr(a, scope, depth + 1) for a in arg_types]
    # Arguments with defaults are passed by keyword, when at all.
    args += [f"{k}={self.expr(kt, scope, depth + 1)}" for k, kt in kws if self.chance(0.3)]
    return f"{name}({', '.join(args)})"

  # Statements -------------------------------------------------------------------------------

  def block(self, scope: dict[str, str], depth: int, loop: bool, ret: str | None,
            n: int | None = None, copy: bool = True) -> list[str]:
    """Indented statements; names bound in nested blocks stay in a copy of the scope."""
    scope, lines = dict(scope) if copy else scope, []
    for i in range(n or self.rng.randint(1, 3)):
      if i and depth == 1 and self.chance(0.1):
        lines.append("")  # a blank line between steps of a function body
      lines += self.statement(scope, depth, loop, ret)
    return self.indent(lines)

  def statement(self, scope, depth, loop, ret) -> list[str]:
    nest = (1.0, 1.0, 0.5)[depth] if depth < 3 else 0.0  # keep most code shallow
    kinds = {"assign": 4, "simple": 4, "obj": 0.4 if self.classes else 0, "if": 2 * nest,
             "for": 2 * nest, "while": 0.5 * nest, "try": 0.5 * nest}
    # Multi-statement idioms (corpus_idioms) and files (corpus_files); those with a loop or
    # block inside thin out with depth like the compound statements above.
    idioms = {**corpus_idioms.WRITERS, **corpus_files.WRITERS}
    for name, weight in {**corpus_idioms.WEIGHTS, **corpus_files.WEIGHTS}.items():
      kinds[name] = weight * (nest if name in BLOCK_IDIOMS else 1.0) * IDIOM_SHARE
    kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
    if kind == "simple":
      lines = [self.expand(self.pick(self.usable(SIMPLE, scope)), scope, 0)]
    elif kind in idioms:
      lines = idioms[kind](self, scope, depth, loop, ret)
    else:
      lines = getattr(self, f"_{kind}")(scope, depth, loop, ret)
    if self.chance(0.08):
      lines.insert(0, f"# {self.sentence()}")
    return lines

  def new_name(self, t: str, scope: dict[str, str]) -> str:
    """A name for a value of type t that does not clash with a name of another type."""
    n, a = self.pick(NOUNS), self.pick(ADJS)
    options = NAMES[t].format(n=n, a=a, p=plural(n)).split()
    for _ in range(4):
      name = self.pick(options)
      if scope.get(name, t) == t:
        return name
    return f"{name}_{self.rng.randint(2, 9)}"

  def _assign(self, scope, depth, loop, ret):
    t = self.pick(TYPES)
    value, name = self.expr(t, scope), self.new_name(t, scope)
    value = self.literal(t) if value == name else value  # not `x = x`
    scope[name] = t
    self.consts.discard(name)
    return [f"{name} = {value}"]

  def _obj(self, scope, depth, loop, ret):
    cls, arg_types, methods = self.pick(self.classes)
    obj = re.sub(r"(?<!^)([A-Z])", r"_\1", cls).lower()  # ItemStore -> item_store
    obj = obj if scope.get(obj, "obj") == "obj" else f"my_{obj}"
    lines = [f"{obj} = {cls}({', '.join(self.expr(t, scope, 1) for t in arg_types)})"]
    if methods:
      name, meth_args = self.pick(methods)[:2]
      lines.append(f"{obj}.{name}({', '.join(self.expr(t, scope, 1) for t in meth_args)})")
    scope[obj] = "obj"
    return lines

  def _if(self, scope, depth, loop, ret):
    lines = [f"if {self.cond(scope)}:"] + self.guard_or_block(scope, depth, loop, ret)
    for _ in range(self.pick((0, 0, 1, 2))):
      lines += [f"elif {self.cond(scope)}:"] + self.block(scope, depth + 1, loop, ret)
    if self.chance(0.4):
      lines += ["else:"] + self.block(scope, depth + 1, loop, ret)
    return lines

  def guard_or_block(self, scope, depth, loop, ret) -> list[str]:
    """The body of an if: often a guard (return, break, continue, raise), else a block."""
    exits = ([f"return {self.expr(ret, scope, 1)}"] if ret else []) + (
        ["break", "continue"] if loop else [])
    if exits and self.chance(0.35):
      return self.indent([self.pick(exits)])
    if self.chance(0.1):
      error = self.pick(("ValueError", "KeyError", "RuntimeError", "TypeError"))
      return self.indent([f"raise {error}({self.fstring(scope)})"])
    return self.block(scope, depth + 1, loop, ret)

  def _for(self, scope, depth, loop, ret):
    template = self.pick(self.usable(list(FOR_TYPES), scope))
    head = self.expand(template, scope, 1)
    binds = dict(zip(head[4:head.index(" in ")].split(", "), FOR_TYPES[template]))
    return [head] + self.block({**scope, **binds}, depth + 1, True, ret)

  def _while(self, scope, depth, loop, ret):
    count, items = self.var("int", scope, True), self.var("ints", scope, True)
    if count and self.chance(0.5):
      return [f"while {count} > 0:"] + self.block(scope, depth + 1, True, ret) + \
          self.indent([f"{count} -= 1"])
    if items and self.chance(0.5):
      return [f"while {items}:", self.tab + f"{singular(items)} = {items}.pop()"] + \
          self.block({**scope, singular(items): "int"}, depth + 1, True, ret)
    return ["while True:"] + self.block(scope, depth + 1, True, ret) + \
        self.indent([f"if {self.cond(scope)}:", self.tab + "break"])

  def _try(self, scope, depth, loop, ret):
    lines = ["try:"] + self.block(scope, depth + 1, loop, ret)
    exc = self.pick(("ValueError", "KeyError", "(KeyError, IndexError)", "Exception",
                     "FileNotFoundError", "ZeroDivisionError", "(TypeError, ValueError)"))
    if self.chance(0.5):
      handler = self.pick(("print(e)", "print(f" + self.str_lit("error: {e}") + ")", "raise"))
      lines += [f"except {exc} as e:", self.tab + handler]
    else:
      lines += [f"except {exc}:"] + self.block(scope, depth + 1, loop, ret)
    if self.chance(0.15):
      lines += ["finally:"] + self.block(scope, depth + 1, loop, ret, n=1)
    return lines
