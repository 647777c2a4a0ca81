"""Tests for the evaluation pictures (mmreid_jax.visualize, evaluate.write_pictures): unit tests
of the frame colours, the CMC data, the ranked galleries, the grids' pixels and index.html
against plain NumPy; then one tiny training run (`configs/synthetic.py:tiny`, a subprocess
sharing the session's compilation cache) whose `--mode=evaluate` must write every picture, grids
whose frames follow the ranking that the report's metrics come from, an index.html with the
report's numbers, the pictures in TensorBoard, and nothing with `config.eval.pictures=False`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmreid_jax import config_lib, evaluate, metrics, visualize
from mmreid_jax.data import datasets

ROOT = Path(__file__).resolve().parents[1]
# With test_main.py and test_train.py: the training fixture compiles the same programs.
pytestmark = pytest.mark.xdist_group("training")
DIRECTIONS = ("rgb->ir", "rgb->depth", "ir->rgb", "ir->depth", "depth->rgb", "depth->ir")
PICTURES = (["cmc.png", "modal_weights.png", "embedding_map.png"]
            + [f"grid_{visualize.file_stem(d)}.png" for d in DIRECTIONS])
# What an evaluation of the synthetic set adds: the fused protocol's grid and the modalities per
# scene condition.
SYNTHETIC_PICTURES = PICTURES + ["grid_fused_all.png", "modal_weights_by_condition.png"]


def load_config(preset: str, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """configs/synthetic.py:`preset`, reading data from `data_dir`."""
  config = config_lib.load_config_file(ROOT / "configs" / "synthetic.py", preset)
  if data_dir is not None:
    config.data.data_dir = data_dir
  return config


def close_to(pixel: np.ndarray, color: tuple[int, int, int], tolerance: int = 12) -> bool:
  return bool(np.abs(pixel.astype(int) - np.asarray(color)).max() <= tolerance)


def frame_pixels(pixels: np.ndarray, box: list[int], border: int, tile_width: int
                 ) -> list[np.ndarray]:
  """Pixels in the middle of the left and the top strip of a tile's frame."""
  left, top, right, bottom = box
  inset = max(1, int(border * (right - left) / tile_width / 2))
  return [pixels[(top + bottom) // 2, left + inset], pixels[top + inset, (left + right) // 2]]


# ------------------------------------------------------------------------------ frame colours


def test_frame_colors_follow_the_identity():
  colors = visualize.frame_colors(7, np.array([7, 3, 7, 1]))
  assert colors.dtype == np.uint8 and colors.shape == (4, 3)
  expected = [visualize.CORRECT_COLOR, visualize.WRONG_COLOR, visualize.CORRECT_COLOR,
              visualize.WRONG_COLOR]
  np.testing.assert_array_equal(colors, np.array(expected, np.uint8))
  assert visualize.frame_color(True) == visualize.CORRECT_COLOR
  assert visualize.frame_color(False) == visualize.WRONG_COLOR
  assert visualize.frame_color(None) == visualize.QUERY_COLOR
  assert len({visualize.CORRECT_COLOR, visualize.WRONG_COLOR, visualize.QUERY_COLOR}) == 3


def test_framed_puts_the_image_inside_a_frame():
  image = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
  out = visualize.framed(image, (1, 2, 3), 2)
  assert out.shape == (10, 8, 3)
  np.testing.assert_array_equal(out[2:8, 2:6], image)
  ring = np.ones((10, 8), bool)
  ring[2:8, 2:6] = False
  assert np.all(out[ring] == np.array([1, 2, 3], np.uint8))
  assert visualize.border_width(32, 16) == 2 and visualize.border_width(288, 144) == 12


# ------------------------------------------------------------------------------------- CMC


def numpy_cmc(distmat, q_pids, g_pids, q_cams, g_cams, max_rank):
  """CMC under the Market rule, one query at a time."""
  first_hits = []
  for i in range(len(q_pids)):
    order = np.argsort(distmat[i], kind="stable")
    kept = [g for g in order if not (g_pids[g] == q_pids[i] and g_cams[g] == q_cams[i])]
    hits = [k for k, g in enumerate(kept, start=1) if g_pids[g] == q_pids[i]]
    if hits:
      first_hits.append(hits[0])
  first_hits = np.array(first_hits)
  return np.array([(first_hits <= k).mean() for k in range(1, max_rank + 1)])


def test_cmc_curves_and_plot_match_numpy():
  rng = np.random.default_rng(1)
  q_pids, q_cams = rng.integers(0, 6, 30), rng.integers(0, 3, 30)
  trials = []
  expected = []
  for _ in range(3):
    g_pids, g_cams = rng.integers(0, 6, 40), rng.integers(0, 3, 40)
    distmat = rng.random((30, 40))
    trials.append(metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, 25))
    expected.append(numpy_cmc(distmat, q_pids, g_pids, q_cams, g_cams, 20))
  curves = visualize.cmc_curves({"a->b": trials, "one": trials[:1]}, max_rank=20)
  np.testing.assert_allclose(curves["a->b"], np.mean(expected, axis=0), atol=1e-12)
  np.testing.assert_allclose(curves["one"], expected[0], atol=1e-12)
  fig = visualize.cmc_figure(curves, "title")
  lines = fig.axes[0].get_lines()
  assert [line.get_label().split(" ")[0] for line in lines] == ["a->b", "one"]
  for line, name in zip(lines, ("a->b", "one")):
    np.testing.assert_array_equal(line.get_xdata(), np.arange(1, 21))
    np.testing.assert_allclose(line.get_ydata(), 100 * curves[name])


@pytest.mark.parametrize("rule", metrics.PROTOCOLS)
def test_ranked_gallery_matches_numpy(rule: str):
  rng = np.random.default_rng(2)
  q_pids, q_cams = rng.integers(0, 5, 12), rng.integers(1, 5, 12)
  g_pids, g_cams = rng.integers(0, 5, 15), rng.integers(1, 5, 15)
  distmat = rng.integers(0, 6, (12, 15)).astype(np.float32)  # ties: the lower index first
  top = metrics.ranked_gallery(distmat, q_pids, g_pids, q_cams, g_cams, 10, rule)
  for i in range(12):
    order = sorted(range(15), key=lambda g: (distmat[i, g], g))
    if rule == "market":
      kept = [g for g in order if not (g_pids[g] == q_pids[i] and g_cams[g] == q_cams[i])]
    elif rule == "sysu":
      kept = [g for g in order if not (q_cams[i] == 3 and g_cams[g] == 2)]
    else:
      kept = order
    expected = (kept + [-1] * 10)[:10]
    assert top[i].tolist() == expected, (rule, i)


# ------------------------------------------------------------------------------------- grids


def test_grid_frames_are_drawn_where_the_boxes_say():
  rng = np.random.default_rng(3)
  correct = [[True, False, False, True], [False, False, True, None]]
  rows = []
  for flags in correct:
    tiles = [visualize.GridTile(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8), "ir",
                                "query", None)]
    tiles += [None if flag is None else visualize.GridTile(
        rng.integers(0, 256, (32, 16, 3), dtype=np.uint8), "rgb", f"{k}.", flag)
              for k, flag in enumerate(flags, start=1)]
    rows.append(tiles)
  fig, boxes = visualize.grid_figure(rows, "title")
  pixels = visualize.figure_pixels(fig)
  border = visualize.border_width(32, 16)
  assert boxes[1][4] is None
  for flags, box_row in zip(correct, boxes):
    for flag, box in zip([None] + flags, box_row):
      if box is None:
        continue
      left, top, right, bottom = box
      assert 0 <= left < right <= pixels.shape[1] and 0 <= top < bottom <= pixels.shape[0]
      assert abs((bottom - top) / (right - left) - 36 / 20) < 0.05  # the framed image's aspect
      for pixel in frame_pixels(pixels, box, border, 16 + 2 * border):
        assert close_to(pixel, visualize.frame_color(flag)), (flag, box, pixel)


# ------------------------------------------------------------------------------- index.html


def test_index_html_has_the_numbers_and_no_external_resources():
  report = {"dataset": "toy", "step": 7,
            "protocols": {"a->b": {"rank1": 0.123456, "rank5": 0.5, "rank10": 0.75,
                                   "rank20": 1.0, "mAP": 0.3333333, "mINP": 0.25, "trials": 2,
                                   "std": {"rank1": 0.01, "mAP": 0.02, "mINP": 0.03}}},
            "baselines": {"raw_pixel": {"a->b": {"rank1": 0.05, "mAP": 0.04, "mINP": 0.03}}}}
  page = visualize.index_html(report, [("cmc.png", "CMC <curves>")], "toy.json")
  for value in (0.123456, 0.5, 0.75, 1.0, 0.3333333, 0.25, 0.05, 0.04, 0.03):
    assert f'title="{value!r}"' in page
  assert "12.3 &plusmn; 1.0" in page and "33.3 &plusmn; 2.0" in page
  assert 'src="cmc.png"' in page and "CMC &lt;curves&gt;" in page and 'href="toy.json"' in page
  assert "<script" not in page and "http" not in page and "<link" not in page


# -------------------------------------------------------------------------------- embedding


def test_embedding_map_samples_identities_and_projects():
  pids = np.repeat(np.arange(30), 3)
  chosen = visualize.sample_identities(pids, 20, seed=4)
  assert len(chosen) == 20 and np.all(np.diff(chosen) > 0)
  np.testing.assert_array_equal(chosen, visualize.sample_identities(pids, 20, seed=4))
  assert not np.array_equal(chosen, visualize.sample_identities(pids, 20, seed=5))
  np.testing.assert_array_equal(visualize.sample_identities(pids[:9], 20, 0), [0, 1, 2])
  features = np.random.default_rng(0).normal(size=(40, 8))
  pca = visualize.project_2d(features, "pca", 0)
  centered = features - features.mean(axis=0)
  _, _, vt = np.linalg.svd(centered, full_matrices=False)
  np.testing.assert_allclose(np.abs(pca), np.abs(centered @ vt[:2].T), atol=1e-8)
  assert visualize.project_2d(features, "tsne", 0).shape == (40, 2)
  with pytest.raises(ValueError, match="umap"):
    visualize.project_2d(features, "umap", 0)


# ------------------------------------------------------------------- modality weight tuples


def image_set(pids, modalities, tuple_ids) -> datasets.ImageSet:
  n = len(pids)
  return datasets.ImageSet(np.array([b""] * n, object), np.asarray(pids), np.zeros(n, np.int64),
                           np.asarray(modalities), np.asarray(tuple_ids),
                           np.array([f"{i}.png" for i in range(n)], object), ("rgb", "ir"))


def test_modality_tuples_and_row_weights():
  aligned = image_set([0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [5, 5, 6, 6, 7])
  np.testing.assert_array_equal(evaluate.modality_tuples(aligned),
                                [[0, 1], [2, 3], [4, -1]])
  unpaired = image_set([0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [-1] * 5)
  table = evaluate.modality_tuples(unpaired, seed=0)
  assert table.shape == (4, 2)
  assert sorted(table[:2, 0].tolist()) == [0, 1] and table[:2, 1].tolist() == [2, 2]
  assert sorted(table[2:, 0].tolist()) == [3, 4] and table[2:, 1].tolist() == [-1, -1]
  weights = np.array([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0], [1.0, 0.0]])
  per_row = evaluate.row_modal_weights(table, weights, 6)
  np.testing.assert_allclose(per_row[2], 0.6)  # the mean over the two tuples holding row 2
  assert np.isnan(per_row[5])


# ------------------------------------------------------------ pictures without the attention


def test_write_pictures_without_attention(tiny_synthetic, tmp_path: Path):
  """A model without the attention (modal_weights None) gets every picture but the histogram;
  `embedding_map="tsne"` maps with t-SNE. No network: random features of the tiny test set."""
  query_split, gallery_split = datasets.eval_splits(tiny_synthetic)
  query = datasets.load_split(tiny_synthetic, query_split)
  gallery = datasets.load_split(tiny_synthetic, gallery_split)
  protocols = evaluate.modality_protocols(query, gallery)
  rng = np.random.default_rng(0)
  features = {("query", None): evaluate.l2_normalize(rng.normal(size=(len(query), 8))),
              ("gallery", None): evaluate.l2_normalize(rng.normal(size=(len(gallery), 8)))}
  ranked = evaluate.rank_protocols(protocols, query, gallery, features, "cosine", 20)
  report = {"dataset": "synthetic_mm", "step": 3,
            "protocols": {n: evaluate.protocol_entry(r) for n, r in ranked.items()}}
  config = load_config("tiny")
  config.eval.embedding_map = "tsne"
  written = evaluate.write_pictures(config, report, protocols, query, gallery, features, ranked,
                                    None, str(tmp_path))
  names = sorted(os.path.basename(p) for p in written)
  pngs = [n for n in names if n.endswith(".png")]
  assert sorted(pngs) == sorted(p for p in PICTURES if p != "modal_weights.png")
  page = (tmp_path / "eval" / "index.html").read_text()
  assert "modal_weights" not in page and "t-SNE" in page
  grid = json.loads((tmp_path / "eval" / "grid_ir_to_rgb.json").read_text())
  assert all(q["modal_weight"] is None for q in grid["queries"])
  config.eval.embedding_map = "umap"
  with pytest.raises(ValueError, match="embedding_map"):
    evaluate.picture_options(config.eval)


# ------------------------------------------------------------------------ a tiny trained run


def run_main(workdir: Path, data_dir: str, cache_dir: str, *flags: str
             ) -> subprocess.CompletedProcess:
  """`python -m mmreid_jax.main --config configs/synthetic.py:tiny` with `flags`."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  command = [sys.executable, "-m", "mmreid_jax.main", "--config", "configs/synthetic.py:tiny",
             "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


@pytest.fixture(scope="module")
def evaluated(tfds_data_dir: str, jax_cache_dir: str, tmp_path_factory: pytest.TempPathFactory,
              compile_lock) -> SimpleNamespace:
  """The tiny preset trained (its evaluation writes the pictures too), then its eval/ folder
  removed and `--mode=evaluate` run again."""
  workdir = tmp_path_factory.mktemp("visualize") / "run"
  with compile_lock():  # test_main.py and test_train.py compile the same programs
    trained = run_main(workdir, tfds_data_dir, jax_cache_dir)
  assert trained.returncode == 0, trained.stderr[-5000:]
  assert (workdir / "eval" / "index.html").is_file()  # the evaluation at the end of training
  shutil.rmtree(workdir / "eval")
  result = run_main(workdir, tfds_data_dir, jax_cache_dir, "--mode=evaluate")
  assert result.returncode == 0, result.stderr[-5000:]
  eval_dir = workdir / "eval"
  return SimpleNamespace(workdir=workdir, eval_dir=eval_dir, result=result,
                         report=json.loads((eval_dir / "synthetic_mm.json").read_text()))


def test_evaluate_writes_every_picture(evaluated):
  assert set(evaluated.report) == {"dataset", "step", "protocols", "baselines", "conditions",
                                   "modal_weights_by_condition", "modality_share_by_condition"}
  assert evaluated.report["step"] == 6
  for name in SYNTHETIC_PICTURES:
    with Image.open(evaluated.eval_dir / name) as image:
      assert image.format == "PNG" and image.mode == "RGB"
      assert image.width > 200 and image.height > 200, name
      pixels = np.asarray(image)
    assert pixels.std() > 5, name  # not a blank canvas
  for direction in DIRECTIONS:
    assert (evaluated.eval_dir / f"grid_{visualize.file_stem(direction)}.json").is_file()


def test_grids_show_the_ranking_the_metrics_count(evaluated, tiny_synthetic):
  """Each grid's frames are green exactly on the query's identity; and on the tiny set every
  query is drawn and its whole kept gallery shown, so the report's Rank-1, Rank-5, mAP and mINP
  follow from the grid's ranking."""
  query = datasets.load_split(tiny_synthetic, "query")
  gallery = datasets.load_split(tiny_synthetic, "gallery")
  for direction in DIRECTIONS:
    stem = visualize.file_stem(direction)
    grid = json.loads((evaluated.eval_dir / f"grid_{stem}.json").read_text())
    with Image.open(evaluated.eval_dir / f"grid_{stem}.png") as image:
      pixels = np.asarray(image)
    q_name, g_name = direction.split("->")
    q_rows = np.flatnonzero(query.modalities == query.modality_names.index(q_name))
    g_rows = np.flatnonzero(gallery.modalities == gallery.modality_names.index(g_name))
    assert grid["protocol"] == direction and grid["step"] == 6
    assert sorted(q["row"] for q in grid["queries"]) == q_rows.tolist()  # 8 <= num_grid_queries
    border = grid["border"]
    tile_width = 16 + 2 * border
    first_hits, aps, inps = [], [], []
    for entry in grid["queries"]:
      q = entry["row"]
      assert entry["pid"] == query.pids[q] and entry["modality"] == q_name
      assert 0.0 <= entry["modal_weight"] <= 1.0  # the tiny model has the attention
      for pixel in frame_pixels(pixels, entry["box"], border, tile_width):
        assert close_to(pixel, visualize.QUERY_COLOR)
      shown = [g["row"] for g in entry["gallery"]]
      kept = [g for g in g_rows.tolist()
              if not (gallery.pids[g] == query.pids[q] and gallery.camids[g] == query.camids[q])]
      assert sorted(shown) == sorted(kept) and len(kept) <= grid["top_k"]
      correct = []
      for item in entry["gallery"]:
        assert item["correct"] == (gallery.pids[item["row"]] == query.pids[q])
        assert item["modality"] == g_name
        color = visualize.frame_color(item["correct"])
        for pixel in frame_pixels(pixels, item["box"], border, tile_width):
          assert close_to(pixel, color), (direction, q, item, pixel)
        correct.append(item["correct"])
      hits = np.flatnonzero(correct) + 1
      first_hits.append(hits[0])
      aps.append(np.mean(np.arange(1, len(hits) + 1) / hits))
      inps.append(len(hits) / hits[-1])
    entry = evaluated.report["protocols"][direction]
    first_hits = np.array(first_hits)
    assert entry["rank1"] == pytest.approx(np.mean(first_hits <= 1), abs=1e-12)
    assert entry["rank5"] == pytest.approx(np.mean(first_hits <= 5), abs=1e-12)
    assert entry["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert entry["mINP"] == pytest.approx(np.mean(inps), abs=1e-9)


def test_fused_grid_shows_captures_ranked_as_the_metrics_count(evaluated, tiny_synthetic):
  """grid_fused_all: every query capture of the tiny set (its three modalities side by side)
  with its whole kept gallery of captures; frames green exactly on the query's identity, and the
  report's fused/all Rank-1 and mAP follow from the grid's ranking."""
  query = datasets.load_split(tiny_synthetic, "query")
  gallery = datasets.load_split(tiny_synthetic, "gallery")
  grid = json.loads((evaluated.eval_dir / "grid_fused_all.json").read_text())
  with Image.open(evaluated.eval_dir / "grid_fused_all.png") as image:
    pixels = np.asarray(image)
  captures = lambda image_set: {int(t): np.flatnonzero(image_set.tuple_ids == t)[0]
                                for t in np.unique(image_set.tuple_ids)}
  q_rows, g_rows = captures(query), captures(gallery)
  assert grid["protocol"] == "fused/all"
  assert sorted(q["row"] for q in grid["queries"]) == sorted(q_rows.values())
  border = grid["border"]
  tile_width = 3 * 16 + 2 * border
  first_hits, aps = [], []
  for entry in grid["queries"]:
    q = entry["row"]
    assert entry["modality"] == "rgb+ir+depth" and entry["condition"] == "clear"
    assert sum(entry["modal_weight"].values()) == pytest.approx(1.0, abs=1e-5)
    kept = [g for g in g_rows.values()
            if not (gallery.pids[g] == query.pids[q] and gallery.camids[g] == query.camids[q])]
    assert sorted(item["row"] for item in entry["gallery"]) == sorted(kept)
    correct = []
    for item in entry["gallery"]:
      assert item["correct"] == (gallery.pids[item["row"]] == query.pids[q])
      for pixel in frame_pixels(pixels, item["box"], border, tile_width):
        assert close_to(pixel, visualize.frame_color(item["correct"])), (q, item, pixel)
      correct.append(item["correct"])
    hits = np.flatnonzero(correct) + 1
    first_hits.append(hits[0])
    aps.append(np.mean(np.arange(1, len(hits) + 1) / hits))
  entry = evaluated.report["protocols"]["fused/all"]
  assert entry["rank1"] == pytest.approx(np.mean(np.array(first_hits) <= 1), abs=1e-12)
  assert entry["mAP"] == pytest.approx(np.mean(aps), abs=1e-9)
  # Every capture of the tiny set is clear: the per-condition entry is the whole protocol.
  assert evaluated.report["conditions"]["clear"]["fused/all"] == entry


def test_index_html_shows_every_picture_and_the_report(evaluated):
  page = (evaluated.eval_dir / "index.html").read_text()
  sources = set(re.findall(r'<img src="([^"]+)"', page))
  pngs = {p.name for p in evaluated.eval_dir.glob("*.png")}
  assert sources == pngs == set(SYNTHETIC_PICTURES)
  assert "http" not in page and "<script" not in page
  for name, entry in evaluated.report["protocols"].items():
    assert f"<th>{name.replace('>', '&gt;')}</th>" in page
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP"):
      assert f'<td title="{entry[key]!r}">{100 * entry[key]:.1f}</td>' in page, (name, key)
  for name, entry in evaluated.report["baselines"]["raw_pixel"].items():
    for key, value in entry.items():
      assert f'title="{value!r}"' in page, (name, key)


def test_pictures_go_to_tensorboard(evaluated):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel

  tags = set()
  for path in evaluated.eval_dir.glob("events.out.tfevents.*"):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      tags.update(value.tag for value in event.summary.value)
  expected = {"pictures/" + name[:-len(".png")] for name in SYNTHETIC_PICTURES}
  assert expected <= tags, sorted(tags)


def find_browser() -> str | None:
  for name in ("chromium", "chromium-browser"):
    if shutil.which(name):
      return shutil.which(name)
  return None


def test_index_html_renders_in_a_headless_browser(evaluated, tmp_path: Path):
  browser = find_browser()
  if browser is None:
    pytest.skip("Neither chromium nor chromium-browser is on PATH: index.html is not rendered "
                "(install chromium to run this test).")
  screenshot = tmp_path / "index.png"
  result = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
       "--window-size=1280,2400", f"--screenshot={screenshot}",
       (evaluated.eval_dir / "index.html").as_uri()],
      check=False, capture_output=True, text=True, timeout=180)
  assert screenshot.is_file(), result.stderr[-3000:]
  with Image.open(screenshot) as image:
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.shape[:2] == (2400, 1280)
  assert pixels.std() > 10 and np.mean(pixels.min(axis=-1) < 200) > 0.02  # not blank
  # The pictures loaded from their relative paths: the first grids' frames are on screen.
  red = np.all(np.abs(pixels.astype(int) - visualize.WRONG_COLOR) <= 12, axis=-1)
  green = np.all(np.abs(pixels.astype(int) - visualize.CORRECT_COLOR) <= 12, axis=-1)
  assert red.sum() > 100 and green.sum() > 100


def test_pictures_off(evaluated, tfds_data_dir: str, persistent_compilation_cache,
                      tmp_path: Path):
  """`config.eval.pictures=False`: the report (the same numbers) and nothing else, here through
  `run.evaluate_checkpoint` in this process."""
  from mmreid_jax import run  # pylint: disable=import-outside-toplevel

  workdir = tmp_path / "run"
  shutil.copytree(evaluated.workdir, workdir, ignore=shutil.ignore_patterns("eval"))
  config = load_config("tiny", tfds_data_dir)
  config.eval.pictures = False
  report = run.evaluate_checkpoint(config, str(workdir))
  written = {p.name for p in (workdir / "eval").iterdir()}
  assert {n for n in written if not n.startswith("events.out.tfevents.")} == {"synthetic_mm.json"}
  assert report["step"] == evaluated.report["step"]
  for name, entry in evaluated.report["protocols"].items():
    for key, value in entry.items():
      if isinstance(value, float):
        assert report["protocols"][name][key] == pytest.approx(value, abs=1e-6), (name, key)
