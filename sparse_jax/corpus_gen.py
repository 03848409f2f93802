"""Seeded generator of simple, everyday Python modules: the `simple` data source.

The paper trained on mostly simple, repetitive, idiomatic Python (PAPER.md, Dataset [P A.6]);
the standard library is large and unusual code. `generate_corpus(n_docs, seed)` writes small
modules (imports, constants, functions, classes, script code) with everyday idioms: default
and keyword arguments, `self.x = x`, loops over range/enumerate/zip, if/elif/else, ternaries,
container literals, both quote styles, f-strings, `with open(...)`, lambdas, comprehensions,
try/except, augmented assignment, comments. Names carry a coarse type (int, str, list of int,
...) so the code reads plausibly (`names.append(name)`). Expressions and simple statements come
from the template tables of `corpus_words`; control flow is code in `corpus_writer`, and the
definitions (functions, classes) and the module layout are code here. Every module parses.
It is a general generator: nothing in it targets a particular probe task.
"""

from __future__ import annotations

import random
from pathlib import Path

from sparse_jax import corpus_words, corpus_writer
from sparse_jax.corpus_words import ANNOTATION, EMPTY, NOUNS, TYPES, VERBS, plural
from sparse_jax.corpus_writer import Writer

# Every file whose code or tables shape the output: `corpus` keys its cache on their contents.
SOURCE_FILES = tuple(Path(m.__file__) for m in (corpus_words, corpus_writer)) + (Path(__file__),)


def generate_corpus(n_docs: int, seed: int) -> list[str]:
  """Generates n_docs small Python modules, deterministically from seed.

  Args:
    n_docs: number of modules.
    seed: any int; the same (n_docs, seed) always gives the same modules, and module i does
      not depend on n_docs.

  Returns:
    The module sources, each ending in a newline.
  """
  return [generate_module(random.Random(f"{seed}:{i}")) for i in range(n_docs)]


def generate_module(rng: random.Random) -> str:
  """One module: docstring, imports, constants, functions and classes, maybe a main."""
  return _module(Writer(rng))


# Definitions -----------------------------------------------------------------------------------


def _function(w: Writer, gscope: dict[str, str], method: bool = False, name: str | None = None,
              ret: str | None = "?", max_args: int = 3) -> tuple[list[str], tuple]:
  """A def with positional, default and keyword-only arguments, a body and a return.

  Returns its lines and its signature: (name, types of the required arguments, return type).
  """
  scope, params, arg_types, body = dict(gscope), ["self"] if method else [], [], []
  annotate, defaults = w.chance(0.3), False
  for _ in range(w.rng.randint(0, max_args)):
    t = w.pick(TYPES)
    pname = w.new_name(t, scope)
    if pname in scope and pname not in gscope:  # already an argument
      continue
    scope[pname] = t
    ann = f": {ANNOTATION[t]}" if annotate else ""
    # Python wants every argument after the first default to have one too.
    defaults = defaults or (bool(arg_types) and w.chance(0.3))
    if defaults and t in ("ints", "strs", "dict", "set") and w.chance(0.5):
      ann = f": Optional[{ANNOTATION[t]}]" if "from typing import Optional" in w.imports \
          and annotate else ann
      params.append(f"{pname}{ann}{' = ' if ann else '='}None")
      body += [f"if {pname} is None:", w.tab + f"{pname} = {EMPTY[t]}"]
    elif defaults:
      params.append(f"{pname}{ann}{' = ' if ann else '='}{w.literal(t)}")
    else:
      params.append(pname + ann)
      arg_types.append(t)
  if max_args and w.chance(0.2) and "verbose" not in scope:
    params += ["*", f"verbose{': bool = ' if annotate else '='}False"]
    scope["verbose"] = "bool"
  ret = w.pick(TYPES + (None, None)) if ret == "?" else ret
  noun = w.pick(NOUNS)
  name = name or f"{w.pick(VERBS)}_{w.pick((noun, plural(noun)))}"
  arrow = f" -> {ANNOTATION[ret] if ret else 'None'}" if annotate else ""
  lines = [f"def {name}({', '.join(params)}){arrow}:"]
  if w.chance(0.4):
    verb, *rest = name.split("_")
    lines.append(w.tab + f'"""{verb.capitalize()} the {" ".join(rest) or "data"}."""')
  # The body binds into the function's scope, so that the return can use its names.
  lines += w.indent(body) + w.block(scope, 1, False, ret, w.rng.randint(1, 5), False)
  if ret:
    lines.append(w.tab + f"return {w.expr(ret, scope)}")
  return lines, (name, arg_types, ret)


def _klass(w: Writer, gscope: dict[str, str]) -> list[str]:
  """A class whose __init__ stores its arguments as attributes, plus a few methods."""
  noun = w.pick(NOUNS)
  if w.chance(0.15):
    return [f"class {noun.capitalize()}Error({w.pick(('Exception', 'ValueError'))}):",
            w.tab + w.pick(("pass", f'"""Raised when a {noun} is invalid."""'))]
  name = noun.capitalize() + w.pick(("", "Manager", "Store", "Parser", "Counter",
                                        "Tracker", "Report", "Cache", "Queue", "Config"))
  name += "Base" if any(c[0] == name for c in w.classes) else ""
  lines = [f"class {name}{w.pick(('', '', '(object)'))}:"]
  if w.chance(0.4):
    lines.append(w.tab + f'"""A {noun} {w.pick(("and its data", "store", "helper"))}."""')
  attrs, args, arg_types, init = {}, [], [], []
  for _ in range(w.rng.randint(1, 3)):
    t = w.pick(TYPES)
    attr = w.new_name(t, attrs)
    if attr in attrs:
      continue
    attrs[attr] = t
    if arg_types and (len(args) > len(arg_types) or w.chance(0.4)):
      args.append(f"{attr}={w.literal(t)}")
    else:
      args.append(attr)
      arg_types.append(t)
    init.append(f"self.{attr} = {attr}")
  for t, empty in (("ints", "[]"), ("dict", "{}"), ("int", "0")):
    attr = w.new_name(t, attrs)
    if attr not in attrs and w.chance(0.5):
      attrs[attr] = t
      init.append(f"self.{attr} = {empty}")
  methods = [[f"def __init__(self, {', '.join(args)}):"] + w.indent(init)]
  mscope = {**gscope, **{f"self.{a}": t for a, t in attrs.items()}}
  signatures = []
  for _ in range(w.rng.randint(1, 3)):
    method, sig = _function(w, mscope, method=True)
    if all(s[0] != sig[0] for s in signatures):
      methods.append(method)
      signatures.append(sig)
  if w.chance(0.3):
    first = next(iter(attrs))
    methods.append(["def __repr__(self):", w.tab + "return f" + w.str_lit(
        f"{name}({first}={{self.{first}!r}})")])
  for m in methods:
    lines += [""] + w.indent(m)
  w.classes.append((name, arg_types, signatures))
  return lines


def _module(w: Writer) -> str:
  """Docstring, imports, constants, functions and classes, then maybe a main or a script."""
  scope: dict[str, str] = {}
  consts = []
  for _ in range(w.rng.randint(0, 3)):
    t = w.pick(("int", "int", "str", "float", "strs", "ints", "dict"))
    const = w.new_name(t, {}).upper()
    scope[const] = t
    w.consts.add(const)
    consts.append(f"{const} = {w.literal(t)}")
  parts = [consts] if consts else []
  for _ in range(w.rng.randint(1, 4)):
    if w.chance(0.3):
      parts.append(_klass(w, scope))
    else:
      lines, sig = _function(w, scope)
      w.funcs.append(sig)
      parts.append(lines)
  r = w.rng.random()
  if r < 0.35:
    parts.append(_function(w, scope, name="main", ret=None, max_args=0)[0])
    q = w.quote if w.chance(0.9) else "'"
    parts.append([f"if __name__ == {q}__main__{q}:", w.tab + "main()"])
  elif r < 0.6:
    parts.append(sum((w.statement(scope, 0, False, None) for _ in range(3)), []))
  head = [[f'"""{w.sentence()}."""']] if w.chance(0.3) else []
  if w.imports:
    head.append(sorted(w.imports, key=lambda s: (s.startswith("from"), s)))
  # PEP 8's two blank lines between top-level definitions; one in 2-space-indented files.
  sep = "\n\n\n" if len(w.tab) == 4 else "\n\n"
  return sep.join("\n".join(p) for p in head + parts) + "\n"
