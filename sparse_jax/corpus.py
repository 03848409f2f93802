"""Corpus discovery: a corpus spec -> documents, their train/validation split, and the cache.

Corpus specs (`DataConfig.corpus`, and the sources of `DataConfig.mixture`):
  "stdlib"     the running interpreter's standard library (.py files, no site-packages)
  "simple"     the generated everyday-Python corpus (`corpus_gen`, SIMPLE_DOCS modules)
  a directory  every .py file below it (hidden, __pycache__ and *-packages dirs skipped)
  a .jsonl     one document per line, its text in `DataConfig.text_field`
  other file   one document
Names win over paths (write ./simple for a directory called simple). `DataConfig.max_files`
caps the documents of every source. Unusable files are skipped and counted by reason.

Documents go to training or validation by a stable hash of their names; a corpus of a single
document is cut at a line boundary into a training and a validation part.

Cache (`DataConfig.cache_dir`, else $SPARSE_JAX_CACHE, else ~/.cache/sparse_jax), every file
written atomically (`fileio.atomic_write`, via `cached`; `data` caches its tokenizer and tokens the same way):
`simple-<key>.jsonl` keyed by the generator's source files, the number of documents and the seed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from sparse_jax import corpus_gen
from sparse_jax.fileio import atomic_write, check_writable_dir

SIMPLE_DOCS = 5000  # modules in the `simple` source: about 3.2M tokens at vocab 2048
SIMPLE_SEED = 0
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # path relative to the corpus root, "file.jsonl:LINE", or the file name
  text: str = dataclasses.field(repr=False)


def load_corpus(spec: str, *, text_field: str = "text", max_files: int | None = None,
                cache_dir: Path | None = None) -> tuple[list[Document], dict[str, int]]:
  """Reads the documents of a corpus spec (see the module docstring).

  Args:
    spec: "stdlib", "simple", a directory, a .jsonl file or a text file.
    text_field: the field holding the text in each .jsonl line.
    max_files: keep only the first documents (sorted paths; jsonl line order).
    cache_dir: where the `simple` corpus is cached (default: `resolve_cache_dir(None)`).

  Returns:
    The documents, and the number of skipped files by reason ("unreadable", "binary",
    "non-utf8", "empty").

  Raises:
    ValueError: a missing path, a malformed jsonl line (with its line number), or no
      usable document.
  """
  skipped: collections.Counter[str] = collections.Counter()
  if spec == "stdlib":
    docs = _read_py_tree(Path(sysconfig.get_paths()["stdlib"]), max_files, skipped)
  elif spec == "simple":
    path = _simple_corpus(cache_dir or resolve_cache_dir(None), max_files)
    docs = _read_jsonl(path, "text", None, skipped, label="simple")
  else:
    path = Path(spec).expanduser()
    if not path.exists():
      raise ValueError(f"corpus {spec!r}: no such file or directory (expected 'stdlib', "
                       "'simple', a directory of .py files, a .jsonl file or a text file)")
    if path.is_dir():
      docs = _read_py_tree(path, max_files, skipped)
    elif path.suffix == ".jsonl":
      docs = _read_jsonl(path, text_field, max_files, skipped, label=path.name)
    else:
      text, reason = _read_text(path)
      docs = [Document(path.name, text)] if text else []
      skipped.update([reason] if reason else [])
  if not docs:
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none found"
    raise ValueError(f"corpus {spec!r}: no usable documents (skipped: {why})")
  return docs, dict(skipped)


def _read_text(path: Path) -> tuple[str | None, str | None]:
  """(the file's UTF-8 text, None), or (None, why it is skipped)."""
  try:
    raw = path.read_bytes()
  except OSError:
    return None, "unreadable"
  if b"\0" in raw:
    return None, "binary"
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None, "non-utf8"  # PEP 263 declares other encodings; they are rare, so skipped
  return (text, None) if text.strip() else (None, "empty")


def _read_py_tree(root: Path, max_files: int | None, skipped: collections.Counter) -> list:
  paths = []
  for dirpath, dirnames, filenames in os.walk(root, onerror=lambda _: skipped.update(
      ["unreadable"])):
    dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
    paths += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames
              if f.endswith(".py")]
  docs = []
  for rel in sorted(paths):
    if max_files is not None and len(docs) >= max_files:
      break
    text, reason = _read_text(root / rel)
    docs += [Document(rel, text)] if text else []
    skipped.update([reason] if reason else [])
  return docs


def _read_jsonl(path: Path, field: str, max_files: int | None, skipped: collections.Counter, *,
                label: str) -> list[Document]:
  docs = []
  try:
    lines = open(path, "rb")
  except OSError as e:
    raise ValueError(f"{path}: cannot read ({e.strerror})") from None
  with lines:
    for lineno, raw in enumerate(lines, 1):
      if max_files is not None and len(docs) >= max_files:
        break
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ValueError(f"{path}:{lineno}: expected an object with a string field {field!r} "
                         "(see data.text_field)")
      text = record[field]
      if "\0" in text or not text.strip():
        skipped.update(["binary" if "\0" in text else "empty"])
      else:
        docs.append(Document(f"{label}:{lineno}", text))
  return docs


def _simple_corpus(cache_dir: Path, max_files: int | None) -> Path:
  """The generated corpus as a cached jsonl file, keyed by the generator's own source files."""
  n = SIMPLE_DOCS if max_files is None else min(max_files, SIMPLE_DOCS)
  source = b"\0".join(path.read_bytes() for path in corpus_gen.SOURCE_FILES)
  key = hashlib.sha256(source + f":{n}:{SIMPLE_SEED}".encode()).hexdigest()[:16]

  def write(tmp: Path):
    with open(tmp, "w", encoding="utf-8") as f:
      for text in corpus_gen.generate_corpus(n, SIMPLE_SEED):
        f.write(json.dumps({"text": text}) + "\n")
  return cached(cache_dir / f"simple-{key}.jsonl", write, "generated corpus")


def split_documents(docs: Sequence[Document],
                    val_frac: float) -> tuple[list[Document], list[Document]]:
  """Splits documents into (train, val) by a stable hash of their names.

  A document goes to validation when sha1(name), read as a fraction of 2**64, is below
  val_frac: stable across machines, Python runs and corpus growth. Neither side is ever
  empty: the document of smallest (largest) hash moves over if needed, and a single document
  is cut at a line boundary.

  Raises:
    ValueError: a single document too short to cut in two.
  """
  if len(docs) == 1:
    return _cut_document(docs[0], val_frac)
  u = {d.name: int.from_bytes(hashlib.sha1(d.name.encode()).digest()[:8], "big") / 2**64
       for d in docs}
  n_val = min(max(sum(x < val_frac for x in u.values()), 1), len(docs) - 1)
  val = set(sorted(u, key=u.get)[:n_val])
  return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


def _cut_document(doc: Document, val_frac: float) -> tuple[list[Document], list[Document]]:
  text, limit = doc.text, int(len(doc.text) * (1 - val_frac))
  cut = text.rfind("\n", 0, limit) + 1
  cut = cut if cut > limit // 2 else limit  # no line break near the target: cut mid-line
  if not 0 < cut < len(text):
    raise ValueError(f"corpus has a single document ({doc.name!r}, {len(text)} chars), too "
                     "short to split into training and validation parts")
  return [Document(doc.name + "#train", text[:cut])], [Document(doc.name + "#val", text[cut:])]


def fingerprint(docs: Iterable[Document]) -> str:
  """sha256 over the documents' names and contents, in order: the cache key of a corpus."""
  h = hashlib.sha256()
  for doc in docs:
    h.update(doc.name.encode() + b"\0" + hashlib.sha256(doc.text.encode()).digest())
  return h.hexdigest()


# Cache -----------------------------------------------------------------------------------------


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
  """`cache_dir` if given, else $SPARSE_JAX_CACHE, else ~/.cache/sparse_jax (created, and
  checked writable up front)."""
  path = Path(cache_dir or os.environ.get("SPARSE_JAX_CACHE") or "~/.cache/sparse_jax")
  return check_writable_dir(path.expanduser(), "data cache dir")


def cached(path: Path, write: Callable[[Path], None], what: str,
           load: Callable[[Path], Any] | None = None) -> Any:
  """Builds path with `atomic_write` if it is missing; returns load(path) (or path).

  A cached file that `load` cannot read (truncated or damaged on disk) is rebuilt, with a
  warning: it is a cache, so the fix is always to compute it again.
  """
  hit = path.exists()
  if hit and load is not None:
    try:
      out = load(path)
      log.info("%s: cached %s", what, path)
      return out
    except Exception as e:  # pylint: disable=broad-except
      # Each loader has its own error type (tokenizers raises a bare Exception).
      log.warning("%s: unreadable cache file %s (%s); rebuilding it", what, path,
                  str(e)[:200])
      hit = False
  if not hit:
    atomic_write(path, write)
  log.info("%s: %s %s", what, "cached" if hit else "wrote", path)
  return path if load is None else load(path)
