"""Atomic file writes: readers see no file or the whole file, never half of one.

Every file the package writes that a later run reads (configs, tokenizers, token caches,
means, circuit records, metrics rewrites, sweep results) goes through `atomic_write`, so a
process killed mid-write leaves the previous version (or nothing) in place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


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
