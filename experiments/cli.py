"""What every CLI shares: the project's log lines made visible, and failures as one line.

`@cli.command` wraps a `main(argv) -> int`: an expected failure (bad input: ValueError; file
system: OSError, including a workdir that is a file, a read-only disk or a busy lock; a
non-finite loss: FloatingPointError) prints one `error: ...` line to stderr and returns 2;
Ctrl-C prints one line and returns 130. Anything else is a bug and keeps its traceback.
`cli.run(main)` is what `python -m experiments.X` calls: host memory set to reuse freed
blocks (`sparse_jax.hostmem`), the log setup, the persistent compilation cache
(`sparse_jax.compile_cache`), then main. (Calling main(argv) in-process, as the tests do,
leaves the host's malloc, logging and JAX's cache settings alone.)
"""

from __future__ import annotations

import functools
import os
import logging
import sys
from typing import Callable

from sparse_jax import compile_cache, hostmem

EXPECTED = (ValueError, OSError, FloatingPointError)
# Dependencies (absl, via orbax) configure the root logger before main runs, which makes
# logging.basicConfig a no-op; the project's own loggers get their own handler instead.
PROJECT_LOGGERS = ("sparse_jax", "experiments")


def setup_logging(level: int = logging.INFO) -> None:
  """Shows the project's log lines (`sparse_jax.*`, `experiments.*`) on stderr."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
  for name in PROJECT_LOGGERS:
    logger = logging.getLogger(name)
    logger.handlers = [handler]  # idempotent
    logger.setLevel(level)
    logger.propagate = False
  # orbax logs a failed background save as tracebacks from each of its threads; the same
  # failure reaches main as an exception, printed as one `error:` line.
  logging.getLogger("absl").setLevel(logging.CRITICAL)


def one_line(e: BaseException) -> str:
  """str(e) on one line: multi-line messages are joined with "; "."""
  return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or repr(e)


def command(main: Callable[..., int]) -> Callable[..., int]:
  """Decorates a CLI's main(argv) with logging setup and one-line error handling."""

  @functools.wraps(main)
  def wrapped(argv: list[str] | None = None) -> int:
    try:
      return main(argv)
    except KeyboardInterrupt:
      print("error: interrupted; rerun the same command to resume", file=sys.stderr)
      return 130
    except EXPECTED as e:
      print(f"error: {one_line(e)}", file=sys.stderr)
      return 2

  return wrapped


def run(main: Callable[..., int]) -> None:
  """The `__main__` entry point of a CLI: shows the project's logs, runs main, exits.

  Host malloc is set to reuse freed blocks first, before anything starts JAX's backend
  (`sparse_jax.hostmem`: XLA:CPU's per-step temporaries no longer fault in afresh). Programs
  compiled by an earlier run of any command on this kind of CPU are loaded, not compiled
  again (`sparse_jax.compile_cache`).
  """
  hostmem.reuse_freed_memory()
  setup_logging()
  compile_cache.enable()
  code = main()
  if code == 130:
    # Interrupted: the run already stopped cleanly (checkpoints closed, nothing half-written).
    # Skip the interpreter's teardown, where an interrupted library thread (orbax's asyncio
    # loop) can print "Event loop is closed" tracebacks after the one error line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)
