"""The CLIs' persistent compilation cache (`sparse_jax.compile_cache`): one directory per kind
of host CPU, chosen by the environment, and a second process loads what the first compiled."""

import os
import subprocess
import sys
from pathlib import Path

from sparse_jax import compile_cache

CPUINFO = """processor\t: {n}
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
cpu MHz\t\t: {mhz}
flags\t\t: fpu sse2 avx2 fma{extra}
"""


def cpuinfo(extra: str = "", mhz: str = "2994.3", n_cpus: int = 2) -> str:
  return "\n".join(CPUINFO.format(n=n, mhz=mhz, extra=extra) for n in range(n_cpus))


def test_host_id_names_the_cpu_model_and_features_only():
  base = compile_cache.host_id(cpuinfo())
  assert len(base) == 12 and int(base, 16) >= 0
  # Clock speed and the number of cores do not change what a compiled program may run on.
  assert compile_cache.host_id(cpuinfo(mhz="1500.0", n_cpus=8)) == base
  # One more instruction-set flag (AVX-512, AMX) is another kind of host.
  assert compile_cache.host_id(cpuinfo(extra=" avx512f")) != base
  assert compile_cache.host_id(cpuinfo().replace("AMD EPYC", "Intel Xeon")) != base


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  host = compile_cache.host_id()
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.cache_dir() == tmp_path / "xdg" / "sparse_jax" / "xla" / host
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  assert compile_cache.cache_dir() == tmp_path / "mine" / host
  monkeypatch.setenv(compile_cache.ENV, "0")
  assert compile_cache.cache_dir() is None and compile_cache.enable() is None
  # A directory that cannot be made: a warning, and the command runs without the cache.
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  (tmp_path / "a_file").write_text("")
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "a_file"))
  assert compile_cache.enable() is None
  # The user's own JAX_COMPILATION_CACHE_DIR (the test session sets one) is left alone.
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
  assert compile_cache.enable() is None and not (tmp_path / "mine").exists()


# A fresh interpreter: enable(), then one jitted program (and the eager ops making its input),
# reporting where the cache is and how many programs were loaded from it and compiled.
PROGRAM = """
import jax, jax.numpy as jnp
from sparse_jax import compile_cache
path = compile_cache.enable()
events = []
jax.monitoring.register_event_listener(lambda event, **_: events.append(event))
x = jnp.arange(64.0).reshape(8, 8)
jax.jit(lambda a: jnp.tanh(a) @ a.T + 1.0)(x).block_until_ready()
print(path, sum(e.endswith("/cache_hits") for e in events),
      sum(e.endswith("/cache_misses") for e in events))
"""


def test_a_second_process_loads_the_first_ones_program(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update({compile_cache.ENV: str(tmp_path / "xla"), "JAX_PLATFORMS": "cpu",
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})  # cache even tiny programs
  root = Path(__file__).resolve().parents[1]

  def run() -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0], int(out[1]), int(out[2])

  path, hits, compiled = run()
  assert Path(path) == tmp_path / "xla" / compile_cache.host_id()
  assert hits == 0 and compiled >= 1  # nothing to load yet
  written = sorted(Path(path).iterdir())
  assert len(written) >= compiled
  assert oct(Path(path).stat().st_mode & 0o777) == "0o700"
  assert run() == (path, compiled, 0)  # every program loaded, none compiled
  assert sorted(Path(path).iterdir()) == written
  # Turned off: nothing is looked up.
  env[compile_cache.ENV] = "0"
  assert run() == ("None", 0, 0)
