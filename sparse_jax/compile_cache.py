"""A persistent XLA compilation cache for the CLIs, one directory per kind of host CPU.

Every command compiles the same large programs again when it is run again: on the project's
2-core CPU, 25-35 s each for the cpu preset's circuit search (the mask-training step and the
candidate evaluation, both vmapped over tasks), so a rerun of `experiments.prune` on the same
run spent a third of its time compiling. JAX can keep compiled programs on disk
(`jax_compilation_cache_dir`) and load them on the next run instead.

JAX's cache key covers the program, jaxlib, the backend and the XLA flags, but not the host
CPU's instruction set: an XLA:CPU program compiled on a machine with AVX-512 or AMX, found on
a shared home directory by a machine without them, would be loaded anyway. So the cache lives
in a subdirectory named by a hash of the CPU's model name and feature flags (`host_id`).

`cli.run` calls `enable()` before any command's main. Where it goes:
- `SPARSE_JAX_XLA_CACHE=DIR`: DIR/<host_id>; `SPARSE_JAX_XLA_CACHE=0` turns it off.
- otherwise `$XDG_CACHE_HOME` (default ~/.cache) /sparse_jax/xla/<host_id>.
- `JAX_COMPILATION_CACHE_DIR` set in the environment is the user's own choice, and JAX reads
  it itself: `enable()` then changes nothing (the test suite sets it, for its own cache).
JAX caches only programs that took at least `jax_persistent_cache_min_compile_time_secs`
(1 s by default) to compile, and evicts the least recently used ones past `MAX_BYTES`.
The directory is the user's own (mode 0700): JAX trusts what it loads from it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "SPARSE_JAX_XLA_CACHE"
MAX_BYTES = 4 * 2**30  # the cpu preset's sweep writes well under 1 GiB


def host_id(cpuinfo: str | None = None) -> str:
  """12 hex digits naming the host CPU kind: its model name and feature flags.

  Args:
    cpuinfo: the text of /proc/cpuinfo; read from the host when None. Where there is none
      (not Linux), the platform's machine and processor names stand in.
  """
  if cpuinfo is None:
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
  wanted = ("model name", "flags", "features", "cpu model", "isa")  # x86, arm, s390, riscv
  lines = set()  # one per distinct value: every core repeats them
  for line in cpuinfo.splitlines():
    key, colon, value = line.partition(":")
    if colon and key.strip().lower() in wanted:
      lines.add(f"{key.strip()}:{' '.join(value.split())}")
  described = "\n".join(sorted(lines)) or f"{platform.machine()} {platform.processor()}"
  return hashlib.sha256(described.encode()).hexdigest()[:12]


def cache_dir() -> Path | None:
  """This host's cache directory, or None when `SPARSE_JAX_XLA_CACHE=0`."""
  value = os.environ.get(ENV, "")
  if value == "0":
    return None
  if value:
    base = Path(value).expanduser()
  else:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparse_jax" / "xla"
  return base / host_id()


def enable() -> Path | None:
  """Points JAX's persistent compilation cache at `cache_dir()`; returns it, or None where
  nothing changed (turned off, JAX_COMPILATION_CACHE_DIR set, or the directory cannot be
  made: then a warning, and the command runs without the cache). Call it before the first
  compile."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return None
  path = cache_dir()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
  except OSError as e:
    log.warning("no XLA compilation cache (%s=DIR chooses another directory): %s", ENV, e)
    return None
  import jax  # after the host's malloc settings (`hostmem`), which must come first

  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
