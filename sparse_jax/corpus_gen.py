"""Seeded generator of simple, everyday Python modules: the `simple` data source.

The paper trained on mostly simple, repetitive, idiomatic Python (PAPER.md, Dataset [P A.6]);
the standard library is large and unusual code. `generate_corpus(n_docs, seed)` writes small
modules (imports, constants, functions, classes, script code) with everyday idioms: default
and keyword arguments (passed by keyword too), `self.x = x`, `super().__init__`, dataclasses,
properties and staticmethods, predicates that return True early, generators, `*args/**kwargs`,
`lru_cache`, loops over range/enumerate/zip, if/elif/else, while, try/except/finally,
ternaries, flat, nested and multi-line container literals, both quote styles, f-strings with
format specs, files and other context managers in many forms, lambdas, comprehensions, swaps
and tuple unpacking, accumulators (`set()` + `.add`, `""` + `+=`), comments. Names carry a
coarse type (int, str, list of int, ...) so the code reads plausibly (`names.append(name)`).
Expressions and simple statements come from the template tables of `corpus_words`; control
flow is code in `corpus_writer`, multi-statement idioms in `corpus_idioms` and files in
`corpus_files`; the definitions (functions, classes) and the module layout are code here.
Every module parses. It is a general generator: nothing in it targets, copies or filters by a
probe task (tests/test_data.py checks that no task prompt occurs in it).
"""

from __future__ import annotations

import random
from pathlib import Path

from sparse_jax import corpus_files, corpus_idioms, corpus_words, corpus_writer
from sparse_jax.corpus_words import ANNOTATION, EMPTY, NOUNS, TYPES, VERBS, plural, singular
from sparse_jax.corpus_writer import Writer

# Every file whose code or tables shape the output: `corpus` keys its cache on their contents.
SOURCE_FILES = tuple(Path(m.__file__) for m in (corpus_words, corpus_writer, corpus_idioms,
                                                 corpus_files)) + (Path(__file__),)


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

  Returns its lines and its signature: (name, types of the required arguments, return type,
  [(name, type) of the arguments with defaults]).
  """
  scope, params, arg_types, body = dict(gscope), ["self"] if method else [], [], []
  kws = []
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
      kws.append((pname, t))
    elif defaults:
      params.append(f"{pname}{ann}{' = ' if ann else '='}{w.literal(t)}")
      kws.append((pname, t))
    else:
      params.append(pname + ann)
      arg_types.append(t)
  if max_args and w.chance(0.2) and "verbose" not in scope:
    params += ["*", f"verbose{': bool = ' if annotate else '='}False"]
    scope["verbose"] = "bool"
    kws.append(("verbose", "bool"))
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
  return lines, (name, arg_types, ret, kws)


def _klass(w: Writer, gscope: dict[str, str]) -> list[str]:
  """A class whose __init__ stores its arguments as attributes, plus a few methods."""
  noun = w.pick(NOUNS)
  if w.chance(0.15):
    return [f"class {noun.capitalize()}Error({w.pick(('Exception', 'ValueError'))}):",
            w.tab + w.pick(("pass", f'"""Raised when a {noun} is invalid."""'))]
  name = noun.capitalize() + w.pick(("", "Manager", "Store", "Parser", "Counter",
                                        "Tracker", "Report", "Cache", "Queue", "Config"))
  name += "Base" if any(c[0] == name for c in w.classes) else ""
  parent = w.pick(w.classes) if w.classes and w.chance(0.3) else None
  base = f"({parent[0]})" if parent else w.pick(("", "", "(object)"))
  dataclass = not parent and w.chance(0.2)
  lines = ["@dataclass"] if dataclass else []
  lines += [f"class {name}{'' if dataclass else base}:"]
  if w.chance(0.4):
    lines.append(w.tab + f'"""A {noun} {w.pick(("and its data", "store", "helper"))}."""')
  if w.chance(0.2):
    const = w.new_name("int", {}).upper()
    lines.append(w.tab + f"{const} = {w.int_lit()}")
  if dataclass:
    return lines + _dataclass_body(w, gscope, name)
  attrs, args, arg_types, init = {}, [], [], []
  if parent:  # the subclass takes its parent's arguments first and passes them up
    for t in parent[1]:
      arg = w.new_name(t, attrs)
      arg = arg if arg not in attrs else f"{arg}_{len(attrs)}"
      attrs[arg] = "?"
      args.append(arg)
    arg_types = list(parent[1])
    init = [f"super().__init__({', '.join(args)})"]
  for attr, t in _attributes(w, attrs, 3):
    if arg_types and (len(args) > len(arg_types) or w.chance(0.4)):
      args.append(f"{attr}={w.literal(t)}")
    else:
      args.append(attr)
      arg_types.append(t)
    init.append(f"self.{attr} = {attr}")
  for t, empty in (("ints", "[]"), ("dict", "{}"), ("int", "0"), ("set", "set()"),
                   ("str", w.quote * 2)):
    attr = w.new_name(t, attrs)
    if attr not in attrs and w.chance(0.3):
      attrs[attr] = t
      init.append(f"self.{attr} = {empty}")
  attrs = {a: t for a, t in attrs.items() if t != "?"}
  methods = [[f"def __init__(self, {', '.join(args)}):"] + w.indent(init)]
  mscope = {**gscope, **{f"self.{a}": t for a, t in attrs.items()}}
  methods += _special_methods(w, mscope, attrs)
  signatures = []
  for _ in range(w.rng.randint(1, 3)):
    method, sig = _function(w, mscope, method=True)
    if all(s[0] != sig[0] for s in signatures):
      methods.append(method)
      signatures.append(sig)
  if w.chance(0.3) and attrs:
    first = next(iter(attrs))
    methods.append(["def __repr__(self):", w.tab + "return f" + w.str_lit(
        f"{name}({first}={{self.{first}!r}})")])
  for m in methods:
    lines += [""] + w.indent(m)
  w.classes.append((name, arg_types, signatures))
  return lines


def _attributes(w: Writer, attrs: dict[str, str], most: int) -> list[tuple[str, str]]:
  """1 to `most` new attribute names with their types (fewer on a name clash), added to attrs."""
  out = []
  for _ in range(w.rng.randint(1, most)):
    t = w.pick(TYPES)
    attr = w.new_name(t, attrs)
    if attr not in attrs:
      attrs[attr] = t
      out.append((attr, t))
  return out


def _dataclass_body(w: Writer, gscope: dict[str, str], name: str) -> list[str]:
  """Annotated fields (mutable defaults through field(default_factory=...)) and a method."""
  w.imports.add("from dataclasses import dataclass, field")
  fields, arg_types, attrs, defaults = [], [], {}, False
  for attr, t in _attributes(w, attrs, 4):
    defaults = defaults or w.chance(0.4)
    if not defaults:
      fields.append(f"{attr}: {ANNOTATION[t]}")
      arg_types.append(t)
    elif t in EMPTY:
      factory = {"ints": "list", "strs": "list", "dict": "dict", "set": "set"}[t]
      fields.append(f"{attr}: {ANNOTATION[t]} = field(default_factory={factory})")
    else:
      fields.append(f"{attr}: {ANNOTATION[t]} = {w.literal(t)}")
  mscope = {**gscope, **{f"self.{a}": t for a, t in attrs.items()}}
  method, sig = _function(w, mscope, method=True)
  w.classes.append((name, arg_types, [sig]))
  return w.indent(fields) + [""] + w.indent(method)


def _special_methods(w: Writer, mscope: dict[str, str], attrs: dict[str, str]) -> list:
  """Maybe a property, a staticmethod, __len__ or __contains__ over the attributes."""
  out = []
  sized = [a for a, t in attrs.items() if t in ("ints", "strs", "dict", "set")]
  if sized and w.chance(0.25):
    a = w.pick(sized)
    out.append(["def __len__(self):", w.tab + f"return len(self.{a})"])
  if sized and w.chance(0.15):
    a = w.pick(sized)
    out.append(["def __contains__(self, item):", w.tab + f"return item in self.{a}"])
  if w.chance(0.25):
    ret = w.pick(("int", "str", "bool", "float"))
    lines, _ = _function(w, mscope, method=True, ret=ret, max_args=0)
    out.append(["@property"] + lines)
  if w.chance(0.15):
    lines, _ = _function(w, {}, ret=w.pick(("int", "str", "bool")), max_args=2)
    out.append(["@staticmethod"] + lines)
  return out


def _predicate(w: Writer, gscope: dict[str, str]) -> tuple[list[str], tuple]:
  """A bool function that loops and returns True early, else False (or any/all)."""
  t = w.pick(("ints", "strs"))
  items = w.new_name(t, {})
  item = singular(items) if singular(items) != "x" else "item"
  scope = {**gscope, items: t, item: "int" if t == "ints" else "str"}
  verb = w.pick(("has", "contains", "is", "all", "any"))
  noun = w.pick(NOUNS)
  name = f"{verb}_{w.pick((noun, plural(noun), 'valid_' + plural(noun), 'empty'))}"
  cond = w.cond(scope)
  lines = [f"def {name}({items}):"]
  if w.chance(0.3):
    return lines + [w.tab + f"return {w.pick(('any', 'all'))}({cond} for {item} in {items})"], \
        (name, [t], "bool", [])
  first, last = w.pick((("True", "False"), ("False", "True")))
  body = [f"for {item} in {items}:", w.tab + f"if {cond}:", w.tab * 2 + f"return {first}",
          f"return {last}"]
  return lines + w.indent(body), (name, [t], "bool", [])


def _generator(w: Writer, gscope: dict[str, str]) -> tuple[list[str], tuple]:
  """A generator function: filter and yield, or yield running values, or yield from."""
  t = w.pick(("ints", "strs"))
  items = w.new_name(t, {})
  item = singular(items) if singular(items) != "x" else "item"
  scope = {**gscope, items: t, item: "int" if t == "ints" else "str"}
  name = f"iter_{w.pick((plural(w.pick(NOUNS)), 'chunks', 'pairs', 'lines', 'values'))}"
  r = w.rng.random()
  if r < 0.5:
    body = [f"for {item} in {items}:", w.tab + f"if {w.cond(scope)}:", w.tab * 2 + f"yield {item}"]
  elif r < 0.8:
    body = [f"for i in range(0, len({items}), size):", w.tab + f"yield {items}[i:i + size]"]
    return [f"def {name}({items}, size={w.pick(('2', '10', '100'))}):"] + w.indent(body), \
        (name, [t], None, [("size", "int")])
  else:
    body = [f"yield from sorted({items})"]
  return [f"def {name}({items}):"] + w.indent(body), (name, [t], None, [])


def _varargs(w: Writer, gscope: dict[str, str]) -> tuple[list[str], tuple]:
  """A function taking *args and **kwargs, maybe behind functools.lru_cache or wraps."""
  name = f"{w.pick(('log', 'report', 'emit', 'call', 'notify', 'debug'))}_{w.pick(NOUNS)}"
  body = w.pick(([f"print(message.format(*args), **kwargs)"],
                 ["for arg in args:", w.tab + "print(message, arg)",
                  "for key, value in kwargs.items():",
                  w.tab + "print(f" + w.str_lit("{key}={value}") + ")"],
                 ["parts = [message] + [str(a) for a in args]",
                  "print(" + w.str_lit(" ") + ".join(parts), **kwargs)"]))
  return [f"def {name}(message, *args, **kwargs):"] + w.indent(body), (name, ["str"], None, [])


def _cached(w: Writer, gscope: dict[str, str]) -> tuple[list[str], tuple]:
  """A recursive integer function behind @functools.lru_cache."""
  w.imports.add("import functools")
  name = w.pick(("fib", "count_paths", "ways", "steps_needed", "tri"))
  n = w.pick(("n", "k", "size"))
  a, b = w.pick((("1", "2"), ("1", "1"), ("2", "3")))
  body = [f"if {n} < {a}:", w.tab + f"return {n}",
          f"return {name}({n} - 1) + {name}({n} - {b})"]
  deco = w.pick(("@functools.lru_cache(maxsize=None)", "@functools.lru_cache()",
                 "@functools.cache"))
  return [deco, f"def {name}({n}):"] + w.indent(body), (name, ["int"], "int", [])


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
    r = w.rng.random()
    if r < 0.3:
      parts.append(_klass(w, scope))
      continue
    kind = _function if r < 0.8 else w.pick((_predicate, _generator, _varargs, _cached))
    lines, sig = kind(w, scope)
    if all(f[0] != sig[0] for f in w.funcs):
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
