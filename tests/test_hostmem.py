"""Host malloc reusing freed blocks (sparse_jax.hostmem), checked by page faults in a child."""

import json
import platform
import subprocess
import sys

import pytest

from experiments import bench_hostmem
from sparse_jax import hostmem

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's; elsewhere it is a no-op")

# A worker thread allocates, touches and frees a 64 MiB block five times, as XLA:CPU does
# with a call's temporaries; the child prints the minor faults of the last four rounds.
# (Through libc itself: numpy would ask for huge pages, which hides the faults.)
_CHILD = """
import ctypes, json, resource, sys, threading
from sparse_jax import hostmem
applied = hostmem.reuse_freed_memory() if sys.argv[1] == "on" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
  for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)  # every page touched
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=rounds); t.start(); t.join()
print(json.dumps({"applied": applied, "faults": faults[1:]}))
"""


def _faults(arm: str) -> dict:
  done = subprocess.run([sys.executable, "-c", _CHILD, arm], capture_output=True, text=True,
                        check=True)
  return json.loads(done.stdout)


def test_freed_blocks_are_reused_without_faulting_pages_in_again():
  pages = 64 * 2**20 // 4096
  off, on = _faults("off"), _faults("on")
  assert not off["applied"] and on["applied"]
  # By default each round maps a fresh block and faults in all of its pages; kept, the block
  # is reused from the second round on.
  assert min(off["faults"]) > 0.9 * pages
  assert max(on["faults"]) < 0.05 * pages


def test_env_turns_it_off(monkeypatch):
  monkeypatch.setenv(hostmem.ENV, "0")
  assert not hostmem.enabled()
  assert not hostmem.reuse_freed_memory()


def test_bench_section_runs_both_arms_in_children():
  tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_head=16",
          "model.d_mlp=64", "model.vocab_size=64", "model.enable_bigram_table=false",
          "sparsity.enabled=false",
          "train.batch_size=2", "train.seq_len=16"]
  out = bench_hostmem.bench_host_memory("cpu", tiny, rounds=1, steps=2)
  assert out["applied_on"] and not out["applied_off"]
  assert out["step_ms_on"] > 0 and out["step_ms_off"] > 0
  assert out["ratio_off_over_on"] == pytest.approx(out["step_ms_off"] / out["step_ms_on"])
