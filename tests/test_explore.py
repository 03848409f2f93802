"""Tests for the circuit explorer's data (activations, ablations) and its HTML pages; the
pages are also driven in a real headless browser when one is installed."""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax import edges as edges_lib
from sparse_jax import explain, explore, explore_html, masks
from sparse_jax import model as model_lib
from sparse_jax.tasks import TaskArrays, contrast_loss, pair_logit_diff

PIECES = ["<|endoftext|>", "\n", "    ", "'", '"', "(", ")", ":", "=", " if", " else", "x"] + [
    f" v{i}" for i in range(52)]
NODES = {"0.attn.q": [3], "0.attn.k": [3], "0.mlp.act_in": [2], "0.mlp.post_act": [1, 5],
         "1.mlp.resid_delta": [0]}


def _page(cfg):
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  text_tok = rng.integers(1, cfg.vocab_size, size=(12, 24))
  text = explain.TokenStream(text_tok, np.ones_like(text_tok, bool), PIECES)
  means = masks.compute_means(params, cfg, [text_tok])
  P, L = 4, 10
  tokens = rng.integers(1, cfg.vocab_size, size=(P, 2, L))
  last = np.array([[9, 8], [7, 9], [9, 9], [6, 5]])
  arrays = TaskArrays(jnp.asarray(tokens, jnp.int32), jnp.asarray(last, jnp.int32),
                      jnp.asarray([10] * P, jnp.int32), jnp.asarray([11] * P, jnp.int32))
  np_params = jax.device_get(params)
  circuit = {"task": "toy<task>", "target": 0.15, "solvable": True, "n_nodes": 6, "reason": "",
             "loss_full": 0.1, "loss_empty": 0.7, "loss_before": 0.12, "loss_after": 0.11,
             "nodes": NODES, "edges": edges_lib.count_edges(NODES, np_params, cfg),
             "edge_list": [list(e) for e in edges_lib.list_edges(NODES, np_params, cfg)],
             "search": {"d_head": cfg.d_head}, "a_field_from_the_future": [1, 2]}
  page = explore.circuit_page_data(circuit, params, cfg, means, text, arrays, n_snippets=5)
  return page, params, means, arrays


@pytest.fixture(scope="module")
def page_and_model():
  from sparse_jax.config import ModelConfig
  cfg = ModelConfig(n_layer=2, d_model=32, n_head=2, d_head=16, d_mlp=64, vocab_size=64,
                    block_size=32)
  return (*_page(cfg), cfg)


def test_page_data(page_and_model):
  page, params, means, arrays, cfg = page_and_model
  assert [(n["site"], n["ch"]) for n in page["nodes"]] == [
      ("0.attn.q", 3), ("0.attn.k", 3), ("0.mlp.act_in", 2), ("0.mlp.post_act", 1),
      ("0.mlp.post_act", 5), ("1.mlp.resid_delta", 0)]
  # Ablating 0.mlp.post_act[5] alone from the full model, computed directly.
  m_N = np.ones(masks.n_nodes(cfg), np.float32)
  m_N[masks.site_slices(cfg)["0.mlp.post_act"].start + 5] = 0
  loss = jax.jit(lambda ab: contrast_loss(pair_logit_diff(params, cfg, arrays, ablation=ab))[0])
  ablated = loss(masks.node_ablation(jnp.asarray(m_N), means, cfg))
  assert page["nodes"][4]["loss_without_in_full"] == pytest.approx(float(ablated), rel=1e-5)
  full = loss(masks.node_ablation(jnp.ones_like(m_N), means, cfg))
  assert page["loss_full_model"] == pytest.approx(float(full), rel=1e-5)
  node = page["nodes"][3]
  # The prompts show every real token of pair 0, and the activation is the captured one.
  assert [len(p) for p in node["prompts"]] == [10, 9]
  acts = jax.jit(lambda t: model_lib.forward(params, t, cfg, capture=("0.mlp.post_act",))[1])(
      arrays.tokens_Px2xL[0])["0.mlp.post_act"]
  assert node["prompts"][1][-1][1] == pytest.approx(float(acts[1, 8, 1]), abs=1e-5)
  assert len(node["snippets"]) == 5 and 0 <= page["explained_fraction"] <= 1
  json.dumps(page)  # serialisable as is


def test_html_is_self_contained(page_and_model):
  page = page_and_model[0]
  html = explore_html.render_circuit(page)
  assert html.count('class="node') == len(page["nodes"])
  assert "<script src" not in html and "<link" not in html and "http://" not in html.replace(
      'xmlns="http://www.w3.org/2000/svg"', "")
  assert "toy&lt;task&gt;" in html and "toy<task>" not in html.split('id="page-data"')[0]
  blob = html.split('type="application/json">')[1].split("</script>")[0]
  assert len(json.loads(blob)["nodes"]) == len(page["nodes"])
  index = explore_html.render_index("t", [{"task": "a", "href": "a.html", "n_nodes": 3,
                                          "edges": 4, "loss": 0.1, "explained": 0.5,
                                          "mean_score": 0.4}, {"task": "b", "note": "unsolvable"}])
  assert 'href="a.html"' in index and "50%" in index and "unsolvable" in index


def test_png_with_explanations(page_and_model, tmp_path):
  from sparse_jax import circuits as circuits_lib
  from sparse_jax import viz
  page = page_and_model[0]
  circuit = circuits_lib.Circuit.from_json(json.dumps(page["circuit"]))
  short = {(n["site"], n["ch"]): explore_html.short_explanation(n["explanation"])
           for n in page["nodes"]}
  viz.plot_circuit(circuit, str(tmp_path / "a.png"), explanations=short)
  viz.plot_circuit(circuit, str(tmp_path / "b.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000 and (tmp_path / "b.png").stat().st_size > 1000


def test_cli_reports_bad_input(tmp_path, capsys):
  from experiments import explore as explore_cli
  (tmp_path / "c").mkdir()
  assert explore_cli.main(["--workdir", str(tmp_path), "--circuits", str(tmp_path / "c")]) == 2
  assert "no circuit JSON files" in capsys.readouterr().err
  (tmp_path / "c" / "x.json").write_text("{not json")
  assert explore_cli.main(["--workdir", str(tmp_path), "--circuits", str(tmp_path / "c")]) == 2
  assert "x.json: not valid JSON" in capsys.readouterr().err


# --- a real headless browser ---

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def start_browser(user_dir):
  """Headless Debian chromium through selenium, with no network-using background services."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  opts = webdriver.ChromeOptions()
  opts.binary_location = BROWSER
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-dev-shm-usage", f"--user-data-dir={user_dir}",
               "--window-size=1600,1000"):
    opts.add_argument(flag)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  return webdriver.Chrome(service=Service(DRIVER), options=opts)


def hover(driver, index: int):
  """Moves the mouse onto node `index` and returns the snippet boxes the panel shows."""
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  node = driver.find_element(By.ID, f"node-{index}")
  ActionChains(driver).move_to_element(node).perform()
  return driver.find_elements(By.CSS_SELECTOR, "#snippets .snip")


def test_page_in_headless_browser(page_and_model, tmp_path):
  if not (BROWSER and DRIVER):
    pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                "(apt-get install -y chromium chromium-driver) to run this test")
  pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")
  from selenium.webdriver.common.by import By
  page = page_and_model[0]
  path = tmp_path / "page.html"
  path.write_text(explore_html.render_circuit(page))
  driver = start_browser(tmp_path / "profile")
  try:
    driver.get(path.as_uri())
    drawn = driver.find_elements(By.CSS_SELECTOR, "g.node")
    expected = [(s, c) for s, ids in page["circuit"]["nodes"].items() for c in ids]
    assert len(drawn) == len(expected) == len(page["nodes"])
    assert driver.find_elements(By.CSS_SELECTOR, "#snippets") == []
    for i in (0, len(drawn) - 1):
      snips = hover(driver, i)
      assert len(snips) == len(page["nodes"][i]["snippets"]) and snips[0].is_displayed()
      assert page["nodes"][i]["site"] in driver.find_element(By.ID, "panel").text
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
  finally:
    driver.quit()


if __name__ == "__main__":
  # python tests/test_explore.py PAGE.html OUT.png [NODE]: a screenshot of a page with one
  # node hovered (how the screenshots in docs/ were taken).
  import pathlib
  import tempfile
  from selenium.webdriver.common.by import By
  page_path, out_png = pathlib.Path(sys.argv[1]).absolute(), sys.argv[2]
  with tempfile.TemporaryDirectory() as profile:
    drv = start_browser(profile)
    try:
      drv.get(page_path.as_uri())
      hover(drv, int(sys.argv[3]) if len(sys.argv) > 3 else 0)
      drv.find_element(By.TAG_NAME, "body").screenshot(out_png)
    finally:
      drv.quit()


@pytest.mark.slow  # trains and prunes a tiny model: ~1 minute of CPU
def test_explore_run_uses_the_means_prune_ablated_with(tmp_path, monkeypatch):
  """The explorer scores nodes against the very mean activations the circuit search used:
  prune's cache (keyed by the data and circuit.mean_batches), never a stale or other file."""
  import dataclasses
  from experiments import explore as explore_cli
  from experiments import presets
  from experiments import prune as prune_lib
  from sparse_jax import train as train_lib
  from sparse_jax.config import apply_overrides
  cfg = apply_overrides(presets.get_config("tiny"), ["train.steps=12", "train.eval_every=12",
                                                     "train.ckpt_every=12",
                                                     "train.task_eval_pairs=0"])
  workdir = tmp_path / "run"
  train_lib.train(cfg, workdir, progress=False)
  ccfg = dataclasses.replace(cfg.circuit, steps=5, mean_batches=3, target_loss=10.0)
  prune_lib.prune(workdir, task_names=["single_double_quote"], circuit_cfg=ccfg,
                  out=tmp_path / "circuits", progress=False)
  cached = list(workdir.glob("means_12_*.npz"))
  assert len(cached) == 1 and cached[0] == prune_lib.means_path(workdir, 12, cfg, ccfg)

  def no_recompute(*args, **kwargs):
    raise AssertionError("the explorer recomputed means that prune had cached")
  monkeypatch.setattr(masks, "compute_means", no_recompute)
  rows = explore_cli.explore_run(workdir, circuits_dir=tmp_path / "circuits",
                                 out=tmp_path / "explore", text_rows=8)
  assert set(rows) == {"single_double_quote"}
