"""Files and context managers in the generated `simple` corpus, in the forms real code uses.

Reading and writing through `with open(path[, mode][, encoding=...]) as handle:` with a mode
that fits what the code does with the file (and names that say so: `in_path` is read,
`out_path` written, a log appended to), two files in one `with`, `open` without `with` and an
explicit `close()`, `pathlib.Path` reads and writes, json and csv through a handle, and other
context managers (`suppress`, a lock, a temporary directory, `open` inside try/finally).
Each writer is `(w, scope, depth, loop, ret) -> lines`, like those of `corpus_idioms`.
"""

from __future__ import annotations

from sparse_jax.corpus_idioms import HANDLES, OUT_HANDLES, READ_PATHS, WRITE_PATHS
from sparse_jax.corpus_words import NOUNS, WORDS, plural

EXTENSIONS = ("txt", "csv", "json", "log", "md", "dat", "tsv", "cfg")


def _path(w, scope, templates) -> tuple[list[str], str]:
  """(lines that bind a path name, the path expression): an existing str name, a new one
  bound to a literal file name, or the literal itself."""
  noun = w.pick(NOUNS)
  literal = w.str_lit(f"{w.pick((noun, plural(noun), w.pick(WORDS)))}.{w.pick(EXTENSIONS)}")
  r = w.rng.random()
  if r < 0.3:
    return [], literal
  name = w.pick(templates).format(n=noun, p=plural(noun))
  if r < 0.5 and scope.get(name) in ("str", "path"):
    return [], name
  if scope.get(name, "str") != "str":
    return [], literal
  if w.chance(0.2) and "from pathlib import Path" in w.imports:
    scope[name] = "path"
    return [f"{name} = Path({literal})"], name
  scope[name] = "str"
  return [f"{name} = {literal}"], name


def _encoding(w) -> str:
  return f", encoding={w.str_lit(w.pick(('utf-8', 'utf-8', 'latin-1', 'ascii')))}" \
      if w.chance(0.25) else ""


def _read_body(w, scope, depth, loop, ret, handle) -> list[str]:
  """What is done with a file opened for reading."""
  lines_name = w.pick(("lines", "rows", "entries", "content"))
  r = w.rng.random()
  if r < 0.25:
    scope["text"] = "str"
    return [f"text = {handle}.read()"]
  if r < 0.45:
    scope[lines_name] = "strs"
    return [f"{lines_name} = {handle}.read().splitlines()" if w.chance(0.5)
            else f"{lines_name} = {handle}.readlines()"]
  if r < 0.55 and "import json" in w.imports:
    scope["data"] = "dict"
    return ["data = json.load(" + handle + ")"]
  if r < 0.62:
    w.imports.add("import csv")
    return [f"for row in csv.reader({handle}):", w.tab + "print(row)"]
  inner = {**scope, "line": "str"}
  body = ["line = line.strip()" if w.chance(0.6) else "line = line.rstrip()"]
  if w.chance(0.4):
    body += ["if not line:", w.tab + "continue"]
  if w.chance(0.3):
    return [f"for i, line in enumerate({handle}):"] + w.indent(body) + \
        w.block({**inner, "i": "int"}, depth + 1, True, ret, n=1)
  return [f"for line in {handle}:"] + w.indent(body) + w.block(inner, depth + 1, True, ret, n=1)


def _write_body(w, scope, handle, mode) -> list[str]:
  """What is written to a file opened with mode w or a."""
  strs, counts = w.var("strs", scope), w.var("dict", scope)
  newline = w.str_lit("\\n")
  r = w.rng.random()
  if strs and r < 0.3:
    line = w.pick((f"{handle}.write(line + {newline})", f"print(line, file={handle})",
                   f"{handle}.write(f{w.str_lit('{line}' + chr(92) + 'n')})"))
    return [f"for line in {strs}:", w.tab + line]
  if counts and r < 0.5 and "import json" in w.imports and mode == "w":
    return [f"json.dump({counts}, {handle}" + w.pick(("", ", indent=2", ", indent=4")) + ")"]
  if counts and r < 0.6:
    return [f"for key, value in {counts}.items():",
            w.tab + f"{handle}.write(f{w.str_lit('{key}: {value}' + chr(92) + 'n')})"]
  if strs and r < 0.7:
    return [f"{handle}.write({newline}.join({strs}))"]
  return [f"{handle}.write({w.expr('str', scope, 1)})"]


def with_open(w, scope, depth, loop, ret):
  """`with open(...) as handle:` reading or writing, in its usual variations."""
  writing = w.chance(0.45)
  pre, path = _path(w, scope, WRITE_PATHS if writing else READ_PATHS)
  if writing:
    mode = w.pick(("w", "w", "w", "a")) if "log" not in path else "a"
    handle = w.pick(OUT_HANDLES)
  else:
    mode = w.pick(("", "", "r", "rt")) if w.chance(0.9) else "rb"
    handle = w.pick(HANDLES)
  mode_arg = "" if not mode else (f", mode={w.str_lit(mode)}" if w.chance(0.15)
                                  else f", {w.str_lit(mode)}")
  enc = "" if "b" in mode else _encoding(w)
  head = f"with open({path}{mode_arg}{enc}) as {handle}:"
  if mode == "rb":
    scope["raw"] = "bytes"
    return pre + [head, w.tab + f"raw = {handle}.read()", "print(len(raw))"]
  inner = dict(scope)
  inner[handle] = "file"
  body = _write_body(w, inner, handle, mode) if writing else \
      _read_body(w, inner, depth + 1, loop, ret, handle)
  scope.update({k: v for k, v in inner.items() if k not in scope and v != "file"})
  return pre + [head] + w.indent(body)


def copy_files(w, scope, depth, loop, ret):
  """Two files in one `with`: read one, write the other."""
  pre_in, src = _path(w, scope, READ_PATHS)
  pre_out, dst = _path(w, scope, WRITE_PATHS)
  fin, fout = w.pick((("fin", "fout"), ("src", "dst"), ("infile", "outfile"), ("f", "out"),
                      ("reader", "writer")))
  line = w.pick(("line", "row", "text"))
  transform = w.pick((line, f"{line}.upper()", f"{line}.lower()", f"{line}.replace(" +
                      f"{w.str_lit(chr(92) + 't')}, {w.str_lit(',')})"))
  body = [f"for {line} in {fin}:"]
  if w.chance(0.4):
    body += [w.tab + f"if {line}.startswith({w.str_lit('#')}):", w.tab * 2 + "continue"]
  body += [w.tab + f"{fout}.write({transform})"]
  return pre_in + pre_out + [f"with open({src}) as {fin}, open({dst}, {w.str_lit('w')}) as "
                             f"{fout}:"] + w.indent(body)


def plain_open(w, scope, depth, loop, ret):
  """`handle = open(path)` without `with`: read, then close (or try/finally)."""
  pre, path = _path(w, scope, READ_PATHS)
  handle = w.pick(("f", "fh", "fp", "handle"))
  if handle in scope:
    handle = "infile"
  name = w.pick(("data", "content", "text", "body"))
  if scope.get(name, "str") != "str":
    name = "raw_text"
  scope[name] = "str"
  if w.chance(0.35):
    return pre + [f"{handle} = open({path}{_encoding(w)})", "try:",
                  w.tab + f"{name} = {handle}.read()", "finally:", w.tab + f"{handle}.close()"]
  return pre + [f"{handle} = open({path})", f"{name} = {handle}.read()", f"{handle}.close()"]


def pathlib_io(w, scope, depth, loop, ret):
  """Reading or writing through `pathlib.Path` (adds the import)."""
  w.imports.add("from pathlib import Path")
  pre, path = _path(w, scope, READ_PATHS)
  if w.chance(0.5):
    scope["text"] = "str"
    return pre + [f"text = Path({path}).read_text({_encoding(w)[2:]})"]
  if w.chance(0.5):
    handle = w.pick(("f", "fh"))
    return pre + [f"with Path({path}).open() as {handle}:",
                  w.tab + f"first = {handle}.readline()", f"print(first)"]
  return pre + [f"Path({path}).write_text({w.expr('str', scope, 1)})"]


def other_context(w, scope, depth, loop, ret):
  """Context managers that are not files: suppress, a lock, a temporary directory."""
  r = w.rng.random()
  if r < 0.4:
    w.imports.add("from contextlib import suppress")
    exc = w.pick(("KeyError", "ValueError", "FileNotFoundError", "IndexError"))
    return [f"with suppress({exc}):"] + w.block(scope, depth + 1, loop, ret, n=1)
  if r < 0.7:
    w.imports.add("import threading")
    return ["lock = threading.Lock()", "with lock:"] + w.block(scope, depth + 1, loop, ret, n=2)
  w.imports.add("import tempfile")
  w.imports.add("import os")
  tmp = w.pick(("tmp", "tmpdir", "tmp_dir", "workdir"))
  name = w.pick(("tmp_path", "scratch", "out_path"))
  return [f"with tempfile.TemporaryDirectory() as {tmp}:",
          w.tab + f"{name} = os.path.join({tmp}, {w.str_lit('out.txt')})",
          w.tab + f"with open({name}, {w.str_lit('w')}) as f:",
          w.tab * 2 + f"f.write({w.expr('str', scope, 1)})"]


WRITERS = {"with_open": with_open, "copy_files": copy_files, "plain_open": plain_open,
           "pathlib_io": pathlib_io, "other_context": other_context}
WEIGHTS = {"with_open": 0.6, "copy_files": 0.1, "plain_open": 0.15, "pathlib_io": 0.1,
           "other_context": 0.2}
