"""Vocabulary and template tables of the generated `simple` corpus (`corpus_gen`).

Word lists, the names given to values of each coarse type (int, str, list of int, ...), the
expression, statement and for-loop templates with their holes, and what each template needs
from its surroundings. `corpus_writer` fills the templates; nothing here draws randomness.
"""

from __future__ import annotations

import re

NOUNS = tuple("""item user order price record line word file node task event account book city
  color student score product message point row key token page player animal car ticket song
  movie grade step job host image box card team fruit country course batch match sample entry
  field label tag""".split())
VERBS = tuple("""get load save parse compute update find process build check count format read
  write clean filter merge sort validate render collect normalize summarize group apply show make
  add remove split convert handle scale print""".split())
ADJS = tuple("""max min new old first last total raw valid current next best default active empty
  short long big small final""".split())
WORDS = NOUNS + tuple("""hello world done error warning ok yes no name value data result total
  missing found invalid start end red green blue apple banana cherry alice bob""".split())
UNICODE_WORDS = ("café", "naïve", "über", "señor", "日本", "→", "✓", "Zürich", "ß", "π")
TYPES = ("int", "float", "str", "bool", "ints", "strs", "dict", "set", "grid")
ANNOTATION = {"int": "int", "float": "float", "str": "str", "bool": "bool", "ints": "list[int]",
              "strs": "list[str]", "dict": "dict[str, int]", "set": "set[str]",
              "grid": "list[list[int]]"}
EMPTY = {"ints": "[]", "strs": "[]", "dict": "{}", "set": "set()"}
IMPORTS = ("import os", "import sys", "import math", "import random", "import re",
           "import json", "import time", "from collections import defaultdict",
           "from collections import Counter", "from pathlib import Path", "import itertools",
           "from typing import Optional", "import string")

# Holes in templates: `T` is a fresh expression of type T; `T?` an existing name of type T and
# `T*` one that may be assigned (not a module constant); `T!` one expression reused at every
# occurrence; `lit T` a literal; `call T` a call of a function defined above returning T;
# `mod M` the module M if imported; `s` a string literal, `idx` an index, `fstr` an f-string,
# `any` an expression of any type. A template whose `?`/`*`/`call`/`mod` hole cannot be filled
# is not used. Each type keeps at least one template with only fresh holes.
EXPRS = {
    "int": ("`int` + `lit int`", "`int` - `lit int`", "`int` * `lit int`", "`int` // 2",
            "abs(`int`)", "len(`ints?`)", "sum(`ints?`)", "max(`ints?`)", "min(`ints?`)",
            "`ints?`[`idx`]", "`dict?`.get(`str`, 0)", "len(`dict?`)", "int(`str?`)",
            "len(`str?`)", "`int` if `bool?` else `lit int`", "round(`float?`)", "`call int`"),
    "float": ("`int` / `lit int`", "round(`float`, 2)", "`float` * `lit float`",
              "sum(`ints?`) / len(`ints?`)", "float(`str?`)", "`call float`"),
    "str": ("`fstr`", "str(`int`)", "`str` + `s`", "`str?`.strip()", "`str?`.lower()",
            "`str?`.upper()", "`str?`.replace(`s`, `s`)", "`str?`[:`lit int`]",
            "`s`.join(`strs?`)", "`strs?`[`idx`]", "`s` if `bool?` else `s`", "`call str`",
            "\"{} {}\".format(`str`, `int`)", "`mod os`.path.join(`str`, `s`)"),
    "bool": ("`int?` > `int`", "`int` < `lit int`", "`int?` == `int`", "`int?` != `lit int`",
             "not `bool?`", "`int?` % 2 == 0", "`bool?` and `bool`", "`bool?` or `bool`",
             "`str` in `strs?`", "`str` not in `set?`", "`str` in `dict?`",
             "`str?`.startswith(`s`)", "`str?`.endswith(`s`)", "`str?`.isdigit()",
             "len(`ints?`) > `lit int`", "not `ints?`", "isinstance(`str?`, str)",
             "`call bool`"),
    "ints": ("list(range(`int`))", "sorted(`ints`)", "[x * `lit int` for x in `ints`]",
             "[x for x in `ints` if x > `lit int`]", "list(map(lambda x: x + 1, `ints`))",
             "`ints`[`lit int`:]", "`ints` + [`int`]", "list(`dict?`.values())",
             "[len(w) for w in `strs?`]", "`call ints`", "sorted(`ints?`, reverse=True)"),
    "strs": ("`str`.split()", "`str`.split(\",\")", "[s.strip() for s in `strs`]",
             "sorted(`strs`, key=len)", "[str(x) for x in `ints`]", "sorted(`set?`)",
             "list(`dict?`.keys())", "[w.lower() for w in `strs` if w]", "`call strs`",
             "list(filter(lambda s: s.startswith(`s`), `strs`))"),
    "dict": ("dict(zip(`strs`, `ints`))", "{name: len(name) for name in `strs`}",
             "{k: v for k, v in `dict`.items() if v > `lit int`}", "`dict?`.copy()",
             "`call dict`", "dict(`mod Counter`(`strs`))"),
    "set": ("set(`strs`)", "{w.lower() for w in `strs`}", "`set?` | `set`", "`set?` & `set`",
            "`set?` - `set`", "`call set`"),
    "grid": ("[[0] * `int` for _ in range(`int`)]", "[row[:] for row in `grid`]",
             "`call grid`"),
}
SIMPLE = ("`int*` += `int`", "`int*` += 1", "`int*` -= 1", "`int*` *= `lit int`",
          "`float*` += `float`", "`float*` /= `lit int`", "`str*` += `str`",
          "`ints*` += [`int`]", "`ints*`.append(`int`)", "`ints*`.extend(`ints`)",
          "`ints*`.sort()", "`ints*`.sort(reverse=True)", "`ints*`.pop()",
          "`ints*`.insert(0, `int`)", "`ints*`.sort(key=lambda x: -x)", "`strs*`.append(`str`)",
          "`strs*`.extend(`strs`)", "`strs*`.sort(key=lambda s: s.lower())",
          "`strs*`.remove(`str`)", "`dict*`[`str!`] = `int`", "`dict*`[`str!`] += 1",
          "`dict*`[`str!`] = `dict*`.get(`str!`, 0) + 1", "`dict*`.update(`dict`)",
          "`dict*`.pop(`str`, None)", "`set*`.add(`str`)", "`set*`.discard(`str`)",
          "`set*`.update(`strs`)", "`grid*`[`idx`][`idx`] = `int`",
          "`grid*`.append([`int`, `int`])", "print(`fstr`)", "print(`any`)",
          "print(`str`, `int`)", "print(`fstr`, file=`mod sys`.stderr)", "assert `cond`",
          "assert `cond`, `s`", "`call`", "`mod time`.sleep(`lit float`)", "pass")
# For loops: (target, the types it binds, iterable); `one T?` is the singular of the `T?` name.
FORS = (("i", "int", "range(`int`)"), ("i", "int", "range(`lit int`, `int`)"),
        ("i", "int", "range(`lit int`, `int`, 2)"), ("i", "int", "range(`int`, 0, -1)"),
        ("_", "", "range(`lit int`)"), ("i", "int", "range(len(`ints?`))"),
        ("`one ints?`", "int", "`ints?`"), ("`one strs?`", "str", "`strs?`"),
        ("`one set?`", "str", "sorted(`set?`)"), ("`one strs?`", "str", "reversed(`strs?`)"),
        ("i, `one strs?`", "int str", "enumerate(`strs?`)"),
        ("i, `one ints?`", "int int", "enumerate(`ints?`, start=1)"),
        ("`one strs?`, n", "str int", "zip(`strs?`, `ints`)"),
        ("key, value", "str int", "`dict?`.items()"), ("key", "str", "`dict?`"),
        ("name, count", "str int", "sorted(`dict?`.items(), key=lambda kv: kv[1], reverse=True)"),
        ("row", "ints", "`grid?`"), ("word", "str", "`str?`.split()"),
        ("a, b", "int int", "zip(`ints?`, `ints?`[1:])"),
        ("idx, `one strs?`", "int str", "enumerate(`strs?`)"),
        ("pos, `one ints?`", "int int", "enumerate(`ints?`)"),
        ("n, `one strs?`", "int str", "enumerate(sorted(`strs?`), 1)"),
        ("i", "int", "range(1, len(`strs?`))"), ("step", "int", "range(`int`, -1, -1)"))
# Names for values of each type; {n} is a noun, {p} its plural, {a} an adjective.
NAMES = {"int": "count total index size n limit offset {n}_count num_{p} {a}_{n}_id width start",
         "float": "ratio average rate weight threshold {n}_price avg_{n} {a}_score",
         "str": "name text line label message prefix title path {n}_name {a}_{n} sep status",
         "bool": "found done ok verbose is_{a} has_{p}",
         "ints": "values numbers scores sizes {n}_ids {a}_{n}_counts",
         "strs": "names lines words labels parts tags {n}_names {p}",
         "dict": "counts config mapping {p}_by_name {n}_counts {n}_map",
         "set": "seen visited unique_{p} seen_{p} keys_seen",
         "grid": "grid matrix board table {n}_rows"}
FOR_TYPES = {f"for {target} in {it}:": types.split() for target, types, it in FORS}
HOLE = re.compile(r"`([^`]+)`")
# What each template needs from its surroundings: names (`T?`, `T*`), functions, modules.
NEEDS = {t: frozenset(h.removeprefix("one ") for h in HOLE.findall(t)
                      if h[-1] in "?*" or h.startswith(("call", "mod")))
         for t in [*SIMPLE, *(t for ts in EXPRS.values() for t in ts),
                   *FOR_TYPES]}


def plural(noun: str) -> str:
  """The plural of a noun: item -> items, city -> cities, box -> boxes."""
  if noun.endswith("y") and noun[-2] not in "aeiou":
    return noun[:-1] + "ies"
  return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def singular(name: str) -> str:
  """The loop variable for a collection: items -> item, cities -> city, self.tags -> tag."""
  last = name.split(".")[-1].lower()
  if last.endswith("ies"):
    return last[:-3] + "y"
  if last.endswith(("xes", "ches", "shes", "sses")):
    return last[:-2]
  return last[:-1] if last.endswith("s") and not last.endswith("ss") else "x"
