"""Atomic file writes: readers see no file or the whole file, never half of one.

Every file the package writes that a later run reads (configs, tokenizers, token caches,
means, circuit records, metrics rewrites, sweep results) goes through `atomic_write`, so a
process killed mid-write leaves the previous version (or nothing) in place. Reading back
(`read_json`, `read_jsonl`) names the file and line of any damage, and `check_writable_dir`
proves a directory is writable before long work starts.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
  """Calls write(tmp) on a temporary file beside path, then renames it to path.

  The temporary name ends in ".tmp": a writer that appends a suffix to names it is given
  (np.save, np.savez) should be handed an open file object instead.
  """
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(Path(tmp))
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches may be shared
    os.replace(tmp, path)  # atomic within one file system
  finally:
    Path(tmp).unlink(missing_ok=True)
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- reading back what was written, and checking where it will be written ---


def read_json(path: str | os.PathLike, what: str = "") -> Any:
  """The JSON value in path; a bad file raises ValueError naming it and the line.

  Args:
    path: the file.
    what: how to fix it, appended to the message (e.g. "delete it to recompute").
  """
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason}){_hint(what)}") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})"
                     f"{_hint(what)}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The JSON objects of a JSON-lines file written by appending (metrics.jsonl).

  A last line without its newline that does not parse is what a process killed mid-write
  leaves: it is dropped with a warning. Any other bad line raises ValueError as `path:N`.
  """
  path = Path(path)
  text = path.read_text(encoding="utf-8", errors="replace")
  lines = text.split("\n")  # a complete file ends in "\n", so the last piece is ""
  rows = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines):  # the unterminated last line
        log.warning("%s:%d: dropping a partial last line (a write was interrupted): %.80r",
                    path, n, line)
        continue
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
    rows.append(row)
  return rows


def _hint(what: str) -> str:
  return f"; {what}" if what else ""


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
  """Creates directory path if needed and proves a file can be written there.

  Raises a one-line OSError naming `what` (e.g. "--workdir") before any long work starts, so a
  read-only disk, a file in the way or a missing mount fails at once instead of at the end.
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"{what} {path} is a file, not a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise type(e)(f"{what} {path} is not writable ({e.strerror or e})") from None
  return path
