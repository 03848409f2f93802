"""What notebooks/colab_tpu.ipynb shows besides the sweep itself: the devices found, the
report's tables and the one circuit worth drawing inline.

The notebook holds no logic of its own: it calls these functions and `experiments.scale_sweep`
(`make_sweep`, `run_sweep`, `collect`), so the same steps are tested here and run on the CLI.
"""

from __future__ import annotations

from pathlib import Path

import jax

from sparse_jax.circuits import file_stem

MULTI_HOST_NOTE = ("several hosts (a TPU pod slice): a notebook drives one host only; run "
                   "`python -m experiments.scale_sweep --distributed ...` on every host instead "
                   "(README, 'Scaling up')")


def describe_devices(batch_size: int) -> str:
  """What JAX found, and how a global batch of `batch_size` sequences splits over it."""
  devices = jax.devices()
  n = len(devices)
  kinds = ", ".join(sorted({d.device_kind for d in devices}))
  platform = devices[0].platform
  lines = [f"found {n} {platform.upper()} device{'s' if n > 1 else ''} ({kinds}) on "
           f"{jax.process_count()} host{'s' if jax.process_count() > 1 else ''}"]
  if platform == "cpu":
    lines.append("no accelerator: this runs on the CPU (fine for the tiny preset only). On "
                 "Colab choose Runtime > Change runtime type > TPU, then run all cells again.")
  if jax.process_count() > 1:
    lines.append(MULTI_HOST_NOTE)
  if batch_size % n:
    lines.append(f"train.batch_size={batch_size} does not divide over the {n} devices: add "
                 f"'train.batch_size=N' with N a multiple of {n} to OVERRIDES")
  else:
    lines.append(f"training is data-parallel over all {n}: {batch_size // n} of the "
                 f"{batch_size} sequences of each step on each device")
  return "\n".join(lines)


def report_sections(out: str | Path, headings: tuple[str, ...] = (
    "Models", "Dense vs sparse at matched pretraining loss")) -> str:
  """The named `## ` sections of OUT/report.md, as Markdown (the figures are shown apart)."""
  text = (Path(out) / "report.md").read_text()
  chunks = {c.split("\n", 1)[0].strip(): c for c in text.split("\n## ")[1:]}
  missing = [h for h in headings if h not in chunks]
  if missing:
    raise ValueError(f"{out}/report.md has no section {missing[0]!r}; it has {list(chunks)}")
  return "\n\n".join("## " + chunks[h].strip() for h in headings)


def circuit_to_show(results: dict, out: str | Path) -> tuple[Path, str] | None:
  """(PNG, caption) of the smallest circuit at the sweep's target, from a sparse model if any
  solved a task (the paper's point: those are the readable ones); None if none was found."""
  target = results["target"]
  found = []
  for row in results["rows"]:
    for task, curve in row["size_vs_target"].items():
      for p in curve:
        if p["target"] == target:
          # sparse first, then an empty circuit (nothing to draw) last, then fewest edges
          found.append((row["l0_target"] is None, p["edges"] == 0, p["edges"], row["name"],
                        task))
  if not found:
    return None
  dense, _, edges, name, task = min(found)
  png = Path(out) / "points" / name / "circuits" / f"{file_stem(task)}.png"
  kind = "dense" if dense else "sparse"
  return png, f"{task} in {name} ({kind}): {edges} edges at task loss {target}"
