"""Multi-statement idioms of the generated `simple` corpus: the shapes everyday code repeats.

Each idiom writes a few related lines, as people do, instead of one random statement:
swaps and tuple unpacking, an accumulator initialised empty and filled in a loop (`set()` and
`.add`, `""` and `+=`, `[]` and `.append`, `{}` and `d[k] = ...`), lambdas bound to names and
passed as keys, ternaries, nested and multi-line literals and calls, and files and other
context managers in their many forms (`with open(...) as f`, two files at once, `f = open`,
`Path.read_text`). `corpus_writer.Writer.statement` picks among them by weight; every idiom is
a function `(w, scope, depth, loop, ret) -> lines` that binds its new names into `scope`.
"""

from __future__ import annotations

from sparse_jax.corpus_words import NOUNS, WORDS, plural, singular

# Natural pairs of names that get swapped or unpacked together.
PAIRS = (("a", "b"), ("x", "y"), ("lo", "hi"), ("low", "high"), ("left", "right"),
         ("first", "second"), ("old", "new"), ("prev", "curr"), ("src", "dst"),
         ("head", "tail"), ("i", "j"), ("min_val", "max_val"), ("width", "height"),
         ("top", "bottom"), ("row", "col"), ("key", "value"), ("begin", "finish"),
         ("this", "other"), ("p", "q"), ("m", "n"))
# (name of a path to read, name of a path to write) and handle names, varied as in real code.
READ_PATHS = ("path", "filename", "in_path", "input_path", "src_path", "config_path",
              "data_file", "infile", "source", "{n}_path", "{n}_file", "{p}_csv")
WRITE_PATHS = ("out_path", "output_path", "dst_path", "report_path", "outfile", "target",
               "dest", "{n}_out", "out_file", "save_path")
HANDLES = ("f", "f", "f", "fh", "fp", "handle", "stream", "fin", "infile", "reader")
OUT_HANDLES = ("f", "f", "out", "fh", "fout", "outfile", "writer", "dst")


def _fresh(w, scope, base: str) -> str:
  """base, or base_2, base_3 ... when base is already bound."""
  name, k = base, 2
  while name in scope:
    name, k = f"{base}_{k}", k + 1
  return name


def swap(w, scope, depth, loop, ret):
  """`a, b = b, a` and its relatives: element swaps, Fibonacci steps, rotations."""
  same = [(t, [n for n, nt in scope.items() if nt == t and n not in w.consts])
          for t in ("int", "str", "float", "ints", "strs")]
  same = [(t, names) for t, names in same if len(names) >= 2]
  r = w.rng.random()
  if same and r < 0.35:
    t, names = w.pick(same)
    a, b = w.rng.sample(names, 2)
    return [f"{a}, {b} = {b}, {a}"]
  items = w.var("ints", scope, True) or w.var("strs", scope, True)
  if items and r < 0.5:
    i, j = w.pick((("i", "j"), ("i", "i + 1"), ("0", "-1"), ("j", "j - 1"), ("lo", "hi")))
    lines = []
    for name in sorted({i, j} & {"i", "j", "lo", "hi"}):
      if scope.get(name) != "int":  # bind the index names the swap uses
        lines.append(f"{name} = {w.int_lit()}")
        scope[name] = "int"
    return lines + [f"{items}[{i}], {items}[{j}] = {items}[{j}], {items}[{i}]"]
  a, b = w.pick(PAIRS)
  if scope.get(a, "int") != "int" or scope.get(b, "int") != "int":
    a, b = _fresh(w, scope, a), _fresh(w, scope, b)
  scope[a] = scope[b] = "int"
  lines = [f"{a}, {b} = {w.int_lit()}, {w.int_lit()}"]
  lines += [w.pick((f"{a}, {b} = {b}, {a}", f"{a}, {b} = {b}, {a} + {b}",
                    f"{a}, {b} = {b}, {a} % {b}" if w.chance(0.3) else f"{b}, {a} = {a}, {b}",
                    f"{a}, {b} = {b}, {a}", f"{a}, {b} = max({a}, {b}), min({a}, {b})"))]
  if w.chance(0.4):
    lines.append(f"print({a}, {b})")
  return lines


def unpack(w, scope, depth, loop, ret):
  """Tuple unpacking: pairs, starred targets, divmod, split, min/max, enumerate results."""
  ints, strs, text = w.var("ints", scope), w.var("strs", scope), w.var("str", scope)
  a, b = w.pick(PAIRS)
  a, b = (a, b) if a not in scope and b not in scope else (_fresh(w, scope, a),
                                                           _fresh(w, scope, b))
  options = [(f"{a}, {b} = divmod({w.expr('int', scope, 1)}, {w.int_lit() or 7})",
              "int", "int"),
             (f"{a}, {b} = {w.int_lit()}, {w.int_lit()}", "int", "int"),
             (f"{a}, {b} = ({w.int_lit()}, {w.str_lit()})", "int", "str")]
  if ints:
    options += [(f"{a}, {b} = min({ints}), max({ints})", "int", "int"),
                (f"{a}, *{b} = {ints}", "int", "ints"), (f"*{a}, {b} = {ints}", "ints", "int"),
                (f"{a}, {b} = {ints}[0], {ints}[-1]", "int", "int")]
  if strs:
    options += [(f"{a}, {b} = {strs}[:2]", "str", "str"),
                (f"{a}, *{b} = {strs}", "str", "strs")]
  if text:
    sep = w.str_lit(w.pick(("=", ":", ",", " ", "/", "-")))
    options += [(f"{a}, {b} = {text}.split({sep}, 1)", "str", "str"),
                (f"{a}, _, {b} = {text}.partition({sep})", "str", "str")]
  line, ta, tb = w.pick(options)
  scope[a], scope[b] = ta, tb
  return [line]


# Accumulators: (type, empty value, how one loop step adds `x` of the element type).
ACCUMULATORS = {
    "set": ("set()", ("{acc}.add({x})", "if {x} not in {acc}:\n{t}{acc}.add({x})")),
    "str": ('""', ("{acc} += {x}", "{acc} += {x} + {sep}", "{acc} = {acc} + {x}")),
    "strs": ("[]", ("{acc}.append({x})", "{acc}.append({x}.strip())", "{acc} += [{x}]")),
    "ints": ("[]", ("{acc}.append(len({x}))", "{acc}.append({i})")),
    "int": ("0", ("{acc} += 1", "{acc} += len({x})", "{acc} = {acc} + 1")),
    "dict": ("{{}}", ("{acc}[{x}] = {acc}.get({x}, 0) + 1", "{acc}[{x}] = len({x})",
                      "if {x} not in {acc}:\n{t}{acc}[{x}] = 0\n{acc}[{x}] += 1")),
}


def accumulate(w, scope, depth, loop, ret):
  """An accumulator initialised empty, filled in a loop over strings, then used."""
  t = w.pick(tuple(ACCUMULATORS))
  empty, steps = ACCUMULATORS[t]
  acc = w.new_name(t, scope)
  if acc in w.consts or scope.get(acc, t) != t:
    acc = _fresh(w, scope, acc)
  if t == "str" and w.chance(0.5):
    empty = w.quote * 2
  source = w.var("strs", scope) or w.expr("strs", scope, 1)
  x = singular(source) if source.isidentifier() or source.startswith("self.") else "word"
  x = "item" if x in ("x", acc) or x in scope else x
  enum = t == "ints" and w.chance(0.7)
  head = f"for i, {x} in enumerate({source}):" if enum else f"for {x} in {source}:"
  if t == "ints" and not enum:
    steps = steps[:1]
  step = w.pick(steps).format(acc=acc, x=x, i="i", t=w.tab, sep=w.str_lit(w.pick((" ", ", "))))
  body = step.split("\n")
  if w.chance(0.3):
    body = [f"if not {x}:", w.tab + "continue"] + body
  scope[acc] = t
  lines = [f"{acc} = {empty.format()}", head] + w.indent(body)
  if w.chance(0.5):
    lines.append(w.pick((f"print({acc})", f"print(len({acc}))" if t != "int" else
                         f"print({acc})")))
  return lines


LAMBDAS = {  # name template, lambda, argument type -> result type
    "int": (("square", "lambda n: n * n"), ("double", "lambda x: x * 2"),
            ("inc", "lambda x: x + 1"), ("clamp", "lambda v: max(0, min(v, 100))"),
            ("add", "lambda a, b: a + b"), ("scale", "lambda x, k=2: x * k")),
    "bool": (("is_even", "lambda n: n % 2 == 0"), ("is_positive", "lambda x: x > 0"),
             ("is_blank", "lambda s: not s.strip()"), ("is_short", "lambda s: len(s) < 5")),
    "str": (("clean", "lambda s: s.strip().lower()"), ("shout", "lambda s: s.upper() + \"!\""),
            ("label", "lambda k, v: f\"{k}={v}\"")),
    "key": (("by_len", "lambda s: len(s)"), ("by_second", "lambda pair: pair[1]"),
            ("key_fn", "lambda x: -x"), ("sort_key", "lambda item: (item[0], item[1])")),
}


def lambda_assign(w, scope, depth, loop, ret):
  """A lambda bound to a name, then called or passed as `key=`."""
  kind = w.pick(tuple(LAMBDAS))
  name, fn = w.pick(LAMBDAS[kind])
  name = name if scope.get(name, "fn") == "fn" else _fresh(w, scope, name)
  if '"' in fn and w.quote == "'":
    fn = fn.replace('"', "'")
  lines = [f"{name} = {fn}"]
  scope[name] = "fn"
  ints, strs = w.var("ints", scope), w.var("strs", scope)
  if kind == "key" and (ints or strs) and "pair" not in fn and "item[" not in fn:
    seq = strs if "len" in fn and strs else ints or strs
    if ("len" in fn) == (seq == strs):
      lines.append(f"{w.new_name('ints' if seq == ints else 'strs', {})} = "
                   f"sorted({seq}, key={name})")
  elif kind == "bool" and ints and "n" in fn.split(":")[0]:
    lines.append(f"print([x for x in {ints} if {name}(x)])")
  elif kind == "int" and "a, b" not in fn:
    lines.append(f"print({name}({w.int_lit()}))")
  return lines


def ternary(w, scope, depth, loop, ret):
  """`x = a if cond else b` with the branches of one type."""
  t = w.pick(("int", "str", "str", "bool", "ints"))
  name = w.new_name(t, scope)
  if name in w.consts:
    name = _fresh(w, scope, name)
  if t == "str":
    yes, no = w.rng.sample(("yes", "no", "on", "off", "even", "odd", "ok", "error", "big",
                            "small", "done", "pending"), 2)
    a, b = w.str_lit(yes), w.str_lit(no)
  elif t == "bool":
    a, b = w.pick((("True", "False"), ("False", "True")))
  else:
    a, b = w.expr(t, scope, 1), w.literal(t)
  cond = w.cond(scope)  # before binding name: the condition must not read it
  scope[name] = t
  a, cond = (f"({x})" if " if " in x else x for x in (a, cond))  # a ternary inside
  return [f"{name} = {a} if {cond} else {b}"]


def nested_literal(w, depth: int = 0) -> str:
  """A literal of lists, tuples and dicts nested up to three deep."""
  r = w.rng.random()
  if depth >= 2 or r < 0.3:
    return w.literal(w.pick(("int", "int", "str", "float", "bool")))
  k = w.rng.randint(1, 3)
  if r < 0.55:
    return "[" + ", ".join(nested_literal(w, depth + 1) for _ in range(k)) + "]"
  if r < 0.7:
    return "(" + ", ".join(nested_literal(w, depth + 1) for _ in range(max(k, 2))) + ")"
  keys = w.rng.sample(WORDS, k)
  return "{" + ", ".join(f"{w.str_lit(key)}: {nested_literal(w, depth + 1)}"
                         for key in keys) + "}"


def multiline(w, scope, depth, loop, ret):
  """A nested or multi-line literal (one element per line, maybe a trailing comma)."""
  noun = w.pick(NOUNS)
  name = w.pick((f"{noun}_data", f"{plural(noun)}", "DEFAULTS" if depth == 0 else "defaults",
                 "settings", "rows", "records", "table", "layout", "spec"))
  name = _fresh(w, scope, name)
  kind = w.pick(("list", "dict", "dict", "grid", "records"))
  if kind == "list":
    items = [nested_literal(w, 1) for _ in range(w.rng.randint(2, 5))]
    opening, closing = "[", "]"
  elif kind == "grid":
    items = ["[" + ", ".join(w.int_lit() for _ in range(3)) + "]"
             for _ in range(w.rng.randint(2, 4))]
    opening, closing = "[", "]"
  elif kind == "records":
    keys = w.rng.sample(("name", "id", "size", "tags", "score", "label", "active"), 2)
    items = ["{" + ", ".join(f"{w.str_lit(k)}: {nested_literal(w, 1)}" for k in keys) + "}"
             for _ in range(w.rng.randint(2, 3))]
    opening, closing = "[", "]"
  else:
    keys = w.rng.sample(WORDS, w.rng.randint(2, 5))
    items = [f"{w.str_lit(k)}: {nested_literal(w, 1)}" for k in keys]
    opening, closing = "{", "}"
  scope[name] = "nested"
  if w.chance(0.35):
    return [f"{name} = {opening}{', '.join(items)}{closing}"]
  trailing = "," if w.chance(0.7) else ""
  body = [item + "," for item in items[:-1]] + [items[-1] + trailing]
  return [f"{name} = {opening}"] + w.indent(body) + [closing]


def multiline_call(w, scope, depth, loop, ret):
  """A call of a function defined above (or print) with keyword arguments, maybe one
  argument per line."""
  if w.funcs and w.chance(0.7):
    fn, arg_types, _, kws = w.pick(w.funcs)
    args = [w.expr(t, scope, 1) for t in arg_types]
    args += [f"{k}={w.expr(t, scope, 1)}" for k, t in kws if w.chance(0.6)]
  else:
    fn = "print"
    args = [w.expr(w.pick(("int", "str", "strs")), scope, 1) for _ in range(w.rng.randint(1, 3))]
    args += [f"{k}={w.str_lit(v)}" for k, v in (("sep", w.pick((", ", " ", "", "\\t"))),
                                                ("end", w.pick(("", " ", "\\n\\n"))))
             if w.chance(0.3)]
  if not args or w.chance(0.4):
    return [f"{fn}({', '.join(args)})"]
  trailing = "," if w.chance(0.6) else ""
  return [f"{fn}("] + w.indent([a + "," for a in args[:-1]] + [args[-1] + trailing]) + [")"]


WRITERS = {"swap": swap, "unpack": unpack, "accumulate": accumulate,
           "lambda_assign": lambda_assign, "ternary": ternary, "multiline": multiline,
           "multiline_call": multiline_call}
# Relative to corpus_writer's assignment (4) and simple statement (4); the ones that open a
# block scale with the nesting allowance like if/for do.
WEIGHTS = {"swap": 0.6, "unpack": 0.6, "accumulate": 1.0, "lambda_assign": 0.5,
           "ternary": 0.8, "multiline": 0.4, "multiline_call": 0.6}
