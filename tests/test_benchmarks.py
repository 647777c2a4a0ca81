"""The real benchmarks on tiny trees in their official layouts (issue 3).

Each tree is written here, independently of the code under test: a few identities, a few noise
images per camera (infrared and thermal ones single-channel, RegDB's as BMP files like the
originals). They go through the layout checks, the builders, the training pipeline, a few
training steps of the `tiny` presets and the evaluation protocols; `scripts/export_synthetic.py`
is checked against the builders, and `scripts/run_regdb_trials.sh` runs from the command line.

The SYSU-MM01 and RegDB trees both train 8 identities of two modalities, and RGBNT201's 8 of
three, like `synthetic_mm/tiny`: their programs equal each other's or test_train.py's, and the
persistent compilation cache shares them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmreid_jax import config_lib, run
from mmreid_jax.data import datasets, pipeline
from mmreid_jax.data.datasets import SyntheticMm, synthetic_render
from mmreid_jax.data.sampling import TupleSampler
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")
RATES = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")

SYSU_IDS = {"train": [1, 2, 3, 4, 5, 6], "val": [7, 8], "test": [9, 10, 11]}
# Test identity 11 has RGB images in cameras 2 and 5 only: in indoor search its camera-3 queries
# have no gallery match once camera 2 is ignored, and are skipped.
SYSU_TEST_RGB = {9: (1, 2, 4, 5), 10: (1, 2, 4, 5), 11: (2, 5)}
REGDB_IDS = range(1, 17)
RGBNT201_IDS = {"train_171": range(1, 9), "test": range(9, 12)}


# ---------------------------------------------------------------- tiny trees


def write_image(path: Path, rng: np.random.Generator, grey: bool = False, size=(40, 20)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = rng.integers(0, 256, size if grey else size + (3,), dtype=np.uint8)
  image = Image.fromarray(pixels)
  image.save(path, format="BMP" if path.suffix == ".bmp" else "JPEG", quality=90)


def write_sysu(root: Path, seed: int = 0) -> Path:
  """cam1..cam6/<pid>/<nnnn>.jpg and exp/*_id.txt; 2 images per training identity and camera,
  2 per test identity in cameras 3 and 6, 3 in its RGB cameras; plus an unlisted identity and a
  stray non-image file, which must not be read."""
  rng = np.random.default_rng(seed)
  for pid in SYSU_IDS["train"] + SYSU_IDS["val"] + [99]:
    for cam in range(1, 7):
      for n in range(1, 3):
        write_image(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", rng, grey=cam in (3, 6))
  for pid in SYSU_IDS["test"]:
    for cam in (3, 6):
      for n in range(1, 3):
        write_image(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", rng, grey=True)
    for cam in SYSU_TEST_RGB[pid]:
      for n in range(1, 4):
        write_image(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", rng)
  (root / "cam1" / "0009" / "Thumbs.db").write_bytes(b"not an image")
  (root / "exp").mkdir(parents=True, exist_ok=True)
  for split, ids in SYSU_IDS.items():
    (root / "exp" / f"{split}_id.txt").write_text(",".join(map(str, ids)) + "\n")
  return root


def regdb_split(trial: int) -> dict[str, list[int]]:
  """The tree's trial `trial`: 8 training and 8 test identities."""
  shuffled = [int(p) for p in np.random.default_rng(trial).permutation(list(REGDB_IDS))]
  return {"train": sorted(shuffled[:8]), "test": sorted(shuffled[8:])}


def write_regdb(root: Path, seed: int = 0) -> Path:
  """Visible/<id>/ and Thermal/<id>/ (3 BMP images each) and idx lists for trials 1..10."""
  rng = np.random.default_rng(seed)
  for pid in REGDB_IDS:
    for folder, letter in (("Visible", "v"), ("Thermal", "t")):
      for n in range(3):
        write_image(root / folder / str(pid) / f"person_{letter}_{pid:05d}_{n}.bmp", rng,
                    grey=folder == "Thermal")
  (root / "idx").mkdir(parents=True, exist_ok=True)
  for trial in range(1, 11):
    for split, ids in regdb_split(trial).items():
      for folder, letter, name in (("Visible", "v", "visible"), ("Thermal", "t", "thermal")):
        lines = [f"{folder}/{pid}/person_{letter}_{pid:05d}_{n}.bmp {label}"
                 for label, pid in enumerate(ids) for n in range(3)]
        (root / "idx" / f"{split}_{name}_{trial}.txt").write_text("\n".join(lines) + "\n")
  return root


def write_rgbnt201(root: Path, seed: int = 0) -> Path:
  """train_171/ and test/ with RGB/, NI/, TI/: 2 captures per identity in cameras 1 and 2."""
  rng = np.random.default_rng(seed)
  for split, ids in RGBNT201_IDS.items():
    for pid in ids:
      for cam in (1, 2):
        for n in range(2):
          name = f"{pid:06d}_cam{cam}_0_{n:02d}.jpg"
          for folder in ("RGB", "NI", "TI"):
            write_image(root / split / folder / name, rng, grey=folder != "RGB")
  return root


WRITERS = {"sysu_mm01": write_sysu, "regdb/3": write_regdb, "rgbnt201": write_rgbnt201}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
  """One tree per dataset, written once."""
  return {name: writer(tmp_path_factory.mktemp(name.split("/")[0]))
          for name, writer in WRITERS.items()}


def prepared(name: str, tree: Path, data_dir: Path) -> datasets.ManualBuilder:
  builder = datasets.get_builder(name, data_dir=str(data_dir))
  datasets.prepare(builder, str(tree))
  return builder


# ---------------------------------------------------------------- layout checks


REMOVALS = {
    "sysu_mm01": (["cam4", "cam6", "exp/val_id.txt", "exp/test_id.txt"],
                  ["missing folder: cam4/", "missing folder: cam6/", "missing file: exp/val_id.txt",
                   "missing file: exp/test_id.txt"]),
    "regdb/3": (["Thermal", "idx/train_visible_3.txt", "idx/test_thermal_3.txt"],
                ["missing folder: Thermal/", "missing file: idx/train_visible_3.txt",
                 "missing file: idx/test_thermal_3.txt"]),
    "rgbnt201": (["train_171/NI", "test"],
                 ["missing folder: train_171/NI/", "missing folder: test/RGB/",
                  "missing folder: test/NI/", "missing folder: test/TI/"]),
}


@pytest.mark.parametrize("name", list(REMOVALS))
def test_layout_error_names_everything_missing(name, trees, tmp_path):
  """One error lists every missing folder and list file, the expected layout and where the
  README explains the download; nothing is prepared."""
  tree = shutil.copytree(trees[name], tmp_path / "tree")
  removed, expected = REMOVALS[name]
  for relative in removed:
    path = tree / relative
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  builder = datasets.get_builder(name, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(datasets.LayoutError) as error:
    datasets.prepare(builder, str(tree))
  message = str(error.value)
  for line in expected:
    assert line in message, message
  assert message.count("\n  missing ") == len(expected), message
  assert f"{len(expected)} missing parts" in message
  assert str(tree) in message and "Expected layout:" in message
  assert builder.LAYOUT in message
  assert 'README.md, section "Real benchmarks"' in message
  assert not builder.is_prepared()


def test_missing_manual_dir(tmp_path):
  builder = datasets.get_builder("rgbnt201", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(datasets.LayoutError) as error:
    datasets.prepare(builder, str(tmp_path / "nowhere"))
  message = str(error.value)
  assert "does not exist" in message and str(tmp_path / "nowhere") in message
  for part in builder.required_paths():
    assert part in message
  # Without --config.data.manual_dir, TFDS's default manual directory is checked.
  with pytest.raises(datasets.LayoutError, match="downloads/manual"):
    datasets.prepare(builder)


def test_file_problems_are_reported_together(trees, tmp_path):
  regdb = shutil.copytree(trees["regdb/3"], tmp_path / "regdb")
  listing = regdb / "idx" / "test_visible_3.txt"
  lines = listing.read_text().splitlines()
  lines[1] = "Visible/1/nowhere.bmp 0"
  lines[4] = "no-label-here"
  listing.write_text("\n".join(lines) + "\n")
  with pytest.raises(datasets.LayoutError) as error:
    datasets.get_builder("regdb/3").scan(regdb)
  message = str(error.value)
  assert "2 problems" in message
  assert "idx/test_visible_3.txt:2: listed image Visible/1/nowhere.bmp does not exist" in message
  assert "idx/test_visible_3.txt:5: 'no-label-here' is not '<relative path> <label>'" in message

  rgbnt = shutil.copytree(trees["rgbnt201"], tmp_path / "rgbnt201")
  (rgbnt / "test" / "TI" / "000009_cam1_0_00.jpg").unlink()
  (rgbnt / "train_171" / "RGB" / "junk.jpg").write_bytes(b"")
  for folder in ("NI", "TI"):
    (rgbnt / "train_171" / folder / "junk.jpg").write_bytes(b"")
  with pytest.raises(datasets.LayoutError) as error:
    datasets.get_builder("rgbnt201").scan(rgbnt)
  message = str(error.value)
  assert "test: 000009_cam1_0_00.jpg has no counterpart in TI" in message
  assert "'junk.jpg' does not look like '<pid>_cam<c>_<...>.jpg'" in message

  sysu = shutil.copytree(trees["sysu_mm01"], tmp_path / "sysu")
  (sysu / "exp" / "test_id.txt").write_text("9,ten,11\n")
  with pytest.raises(datasets.LayoutError, match="identity 'ten' is not an integer"):
    datasets.get_builder("sysu_mm01").scan(sysu)


# ---------------------------------------------------------------- builders


def file_bytes(tree: Path, image_set: datasets.ImageSet) -> None:
  """Every stored image is the original file, byte for byte."""
  for path, image in zip(image_set.paths, image_set.images):
    assert (tree / str(path)).read_bytes() == image, path


def test_sysu_builder(trees, tmp_path):
  builder = prepared("sysu_mm01", trees["sysu_mm01"], tmp_path)
  assert builder.MODALITIES == ("rgb", "ir") and datasets.eval_splits(builder) == (
      "query", "gallery")
  splits = {s: datasets.load_split(builder, s) for s in ("train", "query", "gallery")}
  train, query, gallery = splits["train"], splits["query"], splits["gallery"]
  assert set(train.pids.tolist()) == set(SYSU_IDS["train"] + SYSU_IDS["val"])
  assert len(train) == 8 * 6 * 2
  assert set(query.pids.tolist()) == set(gallery.pids.tolist()) == set(SYSU_IDS["test"])
  assert set(query.camids.tolist()) == {3, 6} and set(gallery.camids.tolist()) == {1, 2, 4, 5}
  assert len(query) == 3 * 2 * 2 and len(gallery) == (4 + 4 + 2) * 3
  for image_set in splits.values():
    np.testing.assert_array_equal(image_set.modalities, np.isin(image_set.camids, (3, 6)))
    assert np.all(image_set.tuple_ids == -1)
    for path, pid, camid in zip(image_set.paths, image_set.pids, image_set.camids):
      assert str(path).startswith(f"cam{camid}/{pid:04d}/"), path
    file_bytes(trees["sysu_mm01"], image_set)
  assert not any("Thumbs" in str(p) for p in gallery.paths)


def test_regdb_builder_reads_the_trial_lists(trees, tmp_path):
  builder = prepared("regdb/3", trees["regdb/3"], tmp_path)
  assert builder.builder_config.trial == 3 and datasets.eval_splits(builder) == ("test", "test")
  expected = regdb_split(3)
  for split in ("train", "test"):
    image_set = datasets.load_split(builder, split)
    assert len(image_set) == 8 * 3 * 2
    np.testing.assert_array_equal(image_set.camids, image_set.modalities + 1)
    for path, pid, modality in zip(image_set.paths, image_set.pids, image_set.modalities):
      folder, person = str(path).split("/")[:2]
      assert folder == ("Visible", "Thermal")[modality]
      assert int(person) == expected[split][pid], path  # the list's label of that person
    file_bytes(trees["regdb/3"], image_set)
  other = datasets.load_split(prepared("regdb/4", trees["regdb/3"], tmp_path), "test")
  assert set(other.paths.tolist()) != set(image_set.paths.tolist())


def test_rgbnt201_builder_aligns_triplets(trees, tmp_path):
  builder = prepared("rgbnt201", trees["rgbnt201"], tmp_path)
  assert builder.MODALITIES == ("rgb", "nir", "tir")
  folders = ("RGB", "NI", "TI")
  for split, folder in (("train", "train_171"), ("test", "test")):
    image_set = datasets.load_split(builder, split)
    assert set(image_set.pids.tolist()) == set(RGBNT201_IDS[folder])
    assert len(image_set) == 3 * 2 * 2 * len(RGBNT201_IDS[folder])
    for tuple_id in np.unique(image_set.tuple_ids):
      rows = np.flatnonzero(image_set.tuple_ids == tuple_id)
      assert sorted(image_set.modalities[rows].tolist()) == [0, 1, 2]
      names = {str(p).split("/")[-1] for p in image_set.paths[rows]}
      assert len(names) == 1
      (name,) = names
      assert {str(p) for p in image_set.paths[rows]} == {
          f"{folder}/{f}/{name}" for f in folders}
      for row in rows:
        assert str(image_set.paths[row]).split("/")[1] == folders[image_set.modalities[row]]
      assert set(image_set.pids[rows].tolist()) == {int(name[:6])}
      assert set(image_set.camids[rows].tolist()) == {int(name.split("_")[1][3:])}
    file_bytes(trees["rgbnt201"], image_set)


def test_pipeline_batches_of_real_layouts(trees, tmp_path):
  """Unpaired SYSU-MM01 tuples draw each modality of the identity; RGBNT201's are captures."""
  config = config_lib.load_config_file(ROOT / "configs" / "sysu_mm01.py", "tiny")
  for name, paired in (("sysu_mm01", False), ("rgbnt201", True)):
    train = datasets.load_split(prepared(name, trees[name], tmp_path / name), "train")
    sampler = TupleSampler(train, 4, 2, 0.0, seed=0)
    (batch,) = pipeline.train_batches(train, sampler, config, 0, 1).as_numpy_iterator()
    slots = len(train.modality_names)
    assert batch["images"].shape == (8, slots, 32, 16, 3)
    assert batch["present"].all()
    rows = sampler(0).rows
    for i in range(8):
      assert len(set(train.pids[rows[i]].tolist())) == 1
      np.testing.assert_array_equal(train.modalities[rows[i]], range(slots))
      if paired:  # one capture
        assert len(set(train.tuple_ids[rows[i]].tolist())) == 1 and train.tuple_ids[rows[i]][0] >= 0
      else:  # independent images: an RGB camera's and an infrared camera's
        assert np.all(train.tuple_ids[rows[i]] == -1)
        assert train.camids[rows[i][0]] in (1, 2, 4, 5) and train.camids[rows[i][1]] in (3, 6)


# ---------------------------------------------------------------- end to end


def tiny_config(config_file: str, tree: Path, data_dir: Path, arg: str = "tiny"):
  config = config_lib.load_config_file(ROOT / "configs" / config_file, arg)
  config.data.data_dir = str(data_dir)
  config.data.manual_dir = str(tree)
  return config


def check_report(report: dict, path: Path, protocols: set[str], trials: int,
                 baseline: bool = True) -> None:
  """The JSON of DESIGN.md section 8: rates in [0, 1], `trials` and `std` per protocol."""
  assert json.loads(path.read_text()) == report
  assert set(report["protocols"]) == protocols
  for name, entry in report["protocols"].items():
    assert set(entry) == set(RATES) | {"trials", "std"}, name
    assert entry["trials"] == trials
    assert set(entry["std"]) == {"rank1", "mAP", "mINP"}
    assert all(0.0 <= entry[rate] <= 1.0 for rate in RATES), name
    assert all(0.0 <= value <= 0.5 for value in entry["std"].values()), name
    assert entry["rank1"] <= entry["rank5"] <= entry["rank10"] <= entry["rank20"], name
  if baseline:
    assert set(report["baselines"]["raw_pixel"]) == protocols


def test_sysu_mm01_trains_and_evaluates(trees, tmp_path, compile_lock):
  config = tiny_config("sysu_mm01.py", trees["sysu_mm01"], tmp_path / "tfds")
  with compile_lock():  # The RegDB run of this module loads the same programs.
    report = run.train_and_evaluate(config, str(tmp_path / "work"))
  assert report["dataset"] == "sysu_mm01" and report["step"] == 6
  check_report(report, tmp_path / "work" / "eval" / "sysu_mm01.json",
               {f"sysu/{mode}-search/{shot}-shot" for mode in ("all", "indoor")
                for shot in ("single", "multi")}, trials=10)
  # Single-shot galleries differ between trials (3 images per identity and camera).
  assert report["protocols"]["sysu/all-search/single-shot"]["std"]["mAP"] > 0
  # Multi-shot takes every image of this tree, so all its trials rank the same gallery.
  # (np.std of ten equal float64 values can be 1 ulp of the mean rather than exactly 0.)
  assert report["protocols"]["sysu/all-search/multi-shot"]["std"]["mAP"] < 1e-12


def test_rgbnt201_trains_and_evaluates(trees, tmp_path, compile_lock):
  config = tiny_config("rgbnt201.py", trees["rgbnt201"], tmp_path / "tfds")
  with compile_lock():  # test_train.py compiles the same initialiser and train step.
    report = run.train_and_evaluate(config, str(tmp_path / "work"))
  settings = ["all", "missing-rgb", "missing-nir", "missing-tir", "missing-rgb+nir",
              "missing-rgb+tir", "missing-nir+tir"]
  names = {f"rgbnt201/{q}" if q == g else f"rgbnt201/{q}->{g}" for q in settings
           for g in settings}
  check_report(report, tmp_path / "work" / "eval" / "rgbnt201.json", names, trials=1)


def test_regdb_trials_script(trees, tmp_path, jax_cache_dir):
  """scripts/run_regdb_trials.sh from the command line: configs/regdb.py:tiny,<t> trains and
  evaluates each listed trial in ROOT/trial_<t>, then the reports are aggregated."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TRIALS": "2", "PYTHON": sys.executable,
         "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  result = subprocess.run(
      ["bash", str(ROOT / "scripts" / "run_regdb_trials.sh"), str(tmp_path / "regdb"), "tiny",
       f"--config.data.manual_dir={trees['regdb/3']}",
       f"--config.data.data_dir={tmp_path / 'tfds'}"],
      check=False, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  protocols = {"regdb/visible->thermal", "regdb/thermal->visible"}
  trial = json.loads((tmp_path / "regdb" / "trial_2" / "eval" / "regdb.json").read_text())
  check_report(trial, tmp_path / "regdb" / "trial_2" / "eval" / "regdb.json", protocols, 1)
  aggregated_path = tmp_path / "regdb" / "eval" / "regdb.json"
  aggregated = json.loads(aggregated_path.read_text())
  check_report(aggregated, aggregated_path, protocols, trials=1)
  for name in protocols:
    assert aggregated["protocols"][name]["mAP"] == pytest.approx(trial["protocols"][name]["mAP"])
  assert "regdb/visible->thermal" in result.stdout and "reports of 1 run(s)" in result.stdout
  assert (tmp_path / "tfds" / "regdb" / "2").is_dir()  # trial 2's own builder config


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("config_file, arg, name, size, steps_per_epoch", [
    ("sysu_mm01.py", None, "sysu_mm01", (288, 144), 695),
    ("regdb.py", "7", "regdb/7", (288, 144), 64),
    ("regdb.py", "paper,10", "regdb/10", (288, 144), 64),
    ("rgbnt201.py", None, "rgbnt201", (256, 128), 123),
])
def test_paper_presets(config_file, arg, name, size, steps_per_epoch):
  config = config_lib.load_config_file(ROOT / "configs" / config_file, arg)
  assert config.data.name == name and (config.data.height, config.data.width) == size
  assert (config.model.depth, config.model.width, config.model.embed_dim) == (50, 64, 512)
  assert (config.data.num_identities, config.data.tuples_per_identity) == (8, 4)
  assert config.optim.name == "sgd" and config.optim.base_learning_rate == 0.1
  assert config.optim.warmup_steps == 10 * steps_per_epoch
  assert config.num_train_steps == 80 * steps_per_epoch
  assert config.optim.schedule == "step" and config.optim.decay_boundaries == (0.25, 0.625)
  assert config.data.manual_dir is None and not config.eval.rerank
  assert not config.eval.raw_pixel_baseline


def test_tiny_presets_share_the_synthetic_tiny_network():
  synthetic = config_lib.load_config_file(ROOT / "configs" / "synthetic.py", "tiny")
  for config_file, arg, name in (("sysu_mm01.py", "tiny", "sysu_mm01"),
                                 ("regdb.py", "tiny,5", "regdb/5"),
                                 ("rgbnt201.py", "tiny", "rgbnt201")):
    config = config_lib.load_config_file(ROOT / "configs" / config_file, arg)
    assert config.data.name == name
    for key in ("model", "optim", "loss", "num_train_steps"):
      assert config[key] == synthetic[key], (config_file, key)


def test_config_arguments_are_checked():
  with pytest.raises(ValueError, match="trial 11 is not in 1..10"):
    config_lib.load_config_file(ROOT / "configs" / "regdb.py", "paper,11")
  with pytest.raises(ValueError, match="Unknown preset 'huge'"):
    config_lib.load_config_file(ROOT / "configs" / "sysu_mm01.py", "huge")


# ---------------------------------------------------------------- export_synthetic.py


@pytest.fixture(scope="module")
def export_script():
  return load_script("export_synthetic")


def decode(path: Path) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"), np.float32)


@pytest.mark.parametrize("layout, name", [("sysu_mm01", "sysu_mm01"), ("regdb", "regdb/4"),
                                          ("rgbnt201", "rgbnt201")])
def test_export_synthetic_reads_back(export_script, layout, name, tmp_path):
  """The exported tree passes the builder's checks and holds the synthetic identities."""
  config = next(c for c in SyntheticMm.BUILDER_CONFIGS if c.name == "tiny")
  assert export_script.main(["--layout", layout, "--output", str(tmp_path / "out"),
                             "--config", "tiny"]) == 0
  records = datasets.get_builder(name).scan(tmp_path / "out")
  per_modality = config.num_cameras * config.tuples_per_camera
  train = config.num_train_ids
  test = config.num_test_ids
  if layout == "sysu_mm01":
    assert {r.pid for r in records["train"]} == set(range(1, train + 1))
    assert {r.pid for r in records["query"]} == set(range(train + 1, train + test + 1))
    assert len(records["train"]) == train * per_modality * 2
    assert len(records["query"]) == len(records["gallery"]) == test * per_modality
  elif layout == "regdb":
    assert len({r.pid for r in records["train"]}) == train
    assert len(records["train"]) == train * per_modality * 2
    assert len(records["test"]) == test * per_modality * 2
  else:
    assert len(records["train"]) == train * per_modality * 3
    assert len(records["test"]) == test * per_modality * 3
    # RGB/, TI/ and NI/ hold the synthetic rgb, ir and depth renderings of one capture.
    first = {r.modality: r for r in synthetic_render.generate_split(
        range(1), config.num_cameras, config.tuples_per_camera, config.height, config.width,
        config.seed, config.difficulty) if r.tuple_id == 0}
    for folder, modality in (("RGB", "rgb"), ("TI", "ir"), ("NI", "depth")):
      exported = decode(tmp_path / "out" / "train_171" / folder / "000001_cam1_0_00.jpg")
      errors = {m: np.abs(exported - first[synthetic_render.MODALITIES.index(m)].image).mean()
                for m in synthetic_render.MODALITIES}
      others = [e for m, e in errors.items() if m != modality]
      assert errors[modality] < 0.5 * min(others), (folder, errors)  # JPEG's loss aside
  with pytest.raises(SystemExit):
    export_script.main(["--layout", layout, "--output", str(tmp_path / "out")])  # not empty
