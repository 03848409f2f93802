"""Host memory: freed blocks kept for reuse instead of handed back to the OS (glibc malloc).

XLA:CPU allocates each call's temporaries as one block (182 MB for the cpu preset's train
step) and frees it when the call returns. glibc serves a block that size from one of its
worker-thread arenas with a fresh `mmap`, and `munmap`s it on free, so every step the kernel
faults in each of its 44k pages again: on the project's 2-core CPU that was a quarter of the
step's CPU time, spent in the kernel (docs/throughput.md, "Page faults"). With one arena,
no `mmap` and no trimming, the block comes from the main heap, stays there when freed, and
the next step reuses it without a fault.

The settings are process-wide and must be made before JAX starts its backend: a thread keeps
the arena it was given at its first allocation. `cli.run` applies them before any command's
main; code that drives the package from its own process (a notebook) can call
`reuse_freed_memory()` first thing. The cost is that a process holds on to its peak heap
until it exits. On accelerators XLA's temporaries live in device memory and do not pass
through here. `SPARSE_JAX_KEEP_FREED_MEMORY=0` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
ENV = "SPARSE_JAX_KEEP_FREED_MEMORY"


def enabled() -> bool:
  """Whether `reuse_freed_memory` applies here: Linux with glibc, not turned off by ENV."""
  return (os.environ.get(ENV, "1") != "0" and platform.system() == "Linux"
          and platform.libc_ver()[0] == "glibc")


def reuse_freed_memory() -> bool:
  """Sets glibc malloc to one arena, no mmap and no trimming. Returns whether it applied.

  Does nothing (and returns False) unless `enabled()`.
  """
  if not enabled():
    return False
  mallopt = ctypes.CDLL("libc.so.6").mallopt
  # mallopt returns 1 on success. Arenas first: a thread that allocates between these calls
  # must already find the limit in place.
  ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1)
  if not ok:
    log.warning("glibc mallopt refused a setting; host memory is handled as by default")
  return ok
