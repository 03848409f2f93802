"""The Colab notebook and the `tpu` preset: the notebook is committed without outputs and runs
top to bottom on a CPU with the tiny preset; the `tpu` preset validates and its train step
shards over 8 simulated devices; the notebook's helpers pick what to show."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import colab
from experiments import presets
from sparse_jax import sweep as sweep_lib

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"


def _notebook() -> dict:
  return json.loads(NOTEBOOK.read_text())


def test_committed_notebook_has_no_outputs():
  nb = _notebook()
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, "the notebook has no code cells"
  for c in code:
    assert c["outputs"] == [] and c["execution_count"] is None, "".join(c["source"])[:80]
  assert "parameters" in code[0]["metadata"].get("tags", []), "first code cell: parameters"
  assert nb["metadata"]["accelerator"] == "TPU"  # Colab opens it on a TPU runtime


# The test's parameters, injected after the notebook's own parameters cell (papermill style).
_TINY_PARAMS = """PRESET = "tiny"
OUT = {out!r}
TASKS = "else_elif,while_return_true"
OVERRIDES = ["train.steps=30", "circuit.steps=10"]
WIDTHS = [32]
USE_DRIVE = False"""


@pytest.mark.slow
@pytest.mark.ci
def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("SPARSE_JAX_CACHE", str(tmp_path / "cache"))  # the kernel inherits env
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  out = tmp_path / "sweep"
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(_TINY_PARAMS.format(out=str(out))))
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT)}}).execute()

  def text(i):  # everything a cell printed or displayed as text
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   + o.get("data", {}).get("text/markdown", "") for o in nb.cells[i].outputs)

  code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
  joined = "\n".join(text(i) for i in code)
  assert "not on Colab" in joined
  assert "found 1 CPU device" in joined and "no accelerator" in joined
  assert "d32_dense" in joined and "d32_l0_6000" in joined and "d48" not in joined  # grid
  assert "2 models finished; unfinished: none" in joined
  assert "| model | width | params | L0 | val loss |" in joined  # the report table
  images = [o for i in code for o in nb.cells[i].outputs if "image/png" in o.get("data", {})]
  results = json.loads((out / "results.json").read_text())
  assert [r["name"] for r in results["rows"]] == ["d32_dense", "d32_l0_6000"]
  for r in results["rows"]:
    assert r["tasks_available"] == 2 and set(r["task_loss_full"]) == {"else_elif",
                                                                     "while_return_true"}
  shown = colab.circuit_to_show(results, out)
  # the frontier, plus the circuit if any model met the target
  assert len(images) == (1 if shown is None else 2)
  if shown is not None:
    assert shown[1] in joined and shown[0].exists()


_EIGHT_DEVICES = """
import jax, numpy as np
from experiments import colab, presets
from sparse_jax import sweep as sweep_lib, train as train_lib
assert jax.device_count() == 8, jax.devices()
cfg = presets.get_config("tpu")
mesh = train_lib.make_mesh()
for p in sweep_lib.grid(presets.get_sweep("tpu")):
  train_lib.check_batch_divides(p.config.train.batch_size, mesh)
print(colab.describe_devices(cfg.train.batch_size))
print(colab.describe_devices(12))
opt = train_lib.make_optimizer(cfg)
state = train_lib.init_state(cfg, opt, mesh)
tc = cfg.train
batch = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                          (tc.batch_size, tc.seq_len + 1), dtype=np.int32)
sharded = train_lib.shard_batch(batch, mesh)
print("SHARDS", sorted({s.data.shape for s in sharded.addressable_shards}),
      len(sharded.addressable_shards))
state, metrics = train_lib.make_train_step(cfg, opt, mesh)(state, sharded)  # frozen: None
print("STEP", int(state.step), float(metrics["loss"]))
"""


@pytest.mark.slow
@pytest.mark.ci
def test_tpu_preset_shards_over_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "found 8 CPU devices" in out
  assert "data-parallel over all 8: 4 of the 32 sequences of each step on each device" in out
  assert "train.batch_size=12 does not divide over the 8 devices" in out
  assert "SHARDS [(4, 257)] 8" in out  # 32 x (256 + 1) tokens, 4 rows on each device
  step_line = next(line for line in out.splitlines() if line.startswith("STEP"))
  _, step, loss = step_line.split()
  # one step on uniform random tokens: the loss is near ln(vocab) = ln(2048) = 7.62
  assert int(step) == 1 and 7.0 < float(loss) < 8.5


def test_tpu_preset_sits_between_cpu_and_paper():
  assert presets.PRESETS == ("tiny", "cpu", "tpu", "paper")
  cpu, tpu, paper = (presets.get_config(n) for n in ("cpu", "tpu", "paper"))
  for field in ("n_layer", "d_model"):
    assert (getattr(cpu.model, field) < getattr(tpu.model, field)
            < getattr(paper.model, field)), field
  assert tpu.model.block_size == paper.model.block_size == 256  # the paper's context
  tokens = lambda c: c.train.steps * c.train.batch_size * c.train.seq_len
  assert tokens(cpu) < tokens(tpu) < tokens(paper)
  assert tpu.train.batch_size % 8 == 0 and tpu.train.seq_len <= tpu.model.block_size
  points = sweep_lib.grid(presets.get_sweep("tpu"))
  assert [p.name for p in points] == ["d128_dense", "d128_l0_100000", "d128_l0_200000",
                                      "d256_dense", "d256_l0_100000", "d256_l0_200000"]
  for p in points:
    if p.l0_target is not None:
      assert 0 < p.config.sparsity.weight_density <= p.config.sparsity.embed_density <= 1
  with pytest.raises(ValueError, match="unknown preset 'tpu8'; choose from tiny, cpu, tpu"):
    presets.get_config("tpu8")


def test_describe_devices_on_this_host():
  text = colab.describe_devices(8)
  assert text.startswith("found 1 CPU device (")
  assert "no accelerator" in text and "data-parallel over all 1: 8 of the 8" in text


def _result_row(name, l0, curves):
  return {"name": name, "l0_target": l0,
          "size_vs_target": {t: [{"target": tg, "edges": e} for tg, e in c]
                             for t, c in curves.items()}}


def test_circuit_to_show_prefers_the_smallest_sparse_nonempty_circuit(tmp_path):
  rows = [_result_row("d64_dense", None, {"a": [(0.15, 5)]}),
          _result_row("d64_l0_1", 1, {"a": [(0.15, 0)], "b": [(0.3, 3), (0.15, 40)],
                                      "c": [(0.15, 25)]}),
          _result_row("d128_l0_1", 1, {"a": [(0.15, 30)]})]
  png, caption = colab.circuit_to_show({"target": 0.15, "rows": rows}, tmp_path)
  assert png == tmp_path / "points" / "d64_l0_1" / "circuits" / "c.png"
  assert caption == "c in d64_l0_1 (sparse): 25 edges at task loss 0.15"
  dense_only = {"target": 0.15, "rows": rows[:1]}
  assert colab.circuit_to_show(dense_only, tmp_path)[1].startswith("a in d64_dense (dense): 5")
  assert colab.circuit_to_show({"target": 0.05, "rows": rows}, tmp_path) is None


def test_report_sections(tmp_path):
  (tmp_path / "report.md").write_text("# R\n\nintro\n\n## Models\n\n| a |\n\n## Figures\n\nx\n")
  assert colab.report_sections(tmp_path, ("Models",)) == "## Models\n\n| a |"
  with pytest.raises(ValueError, match="report.md has no section 'Headline'"):
    colab.report_sections(tmp_path, ("Models", "Headline"))
