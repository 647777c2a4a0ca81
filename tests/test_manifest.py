"""Your own data (issue 8): the `manifest` dataset and the dataset inspector.

The manifests here are made from `synthetic_mm/tiny`: its images written to files, listed in a
CSV or JSON-lines file. One such manifest trains the tiny preset and evaluates (the programs equal
test_train.py's, so the persistent compilation cache shares them); the others check the parsing,
the errors and the evaluation splits, and the inspector's report and contact sheet, on the
manifest, on a broken one and on the synthetic set in SYSU-MM01's layout.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmreid_jax import config_lib, evaluate, run
from mmreid_jax.data import datasets
from mmreid_jax.data import inspect as inspector
from mmreid_jax.data.datasets import manifest as manifest_lib
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")
COLUMNS = ("path", "pid", "camid", "modality", "tuple_id", "split")


def synthetic_rows(tiny_synthetic, folder: Path, test_split: bool) -> list[dict[str, str]]:
  """The rows of a manifest of `synthetic_mm/tiny`, its images written under `folder`.

  Identities become strings ("person_003"), to be numbered back; query and gallery become one
  `test` split when `test_split`.
  """
  rows = []
  for split in ("train", "query", "gallery"):
    image_set = datasets.load_split(tiny_synthetic, split)
    for i in np.argsort(image_set.modalities, kind="stable"):  # rgb rows first: (rgb, ir, depth)
      modality = image_set.modality_names[image_set.modalities[i]]
      relative = f"images/{split}/{i:04d}_{modality}.png"
      (folder / relative).parent.mkdir(parents=True, exist_ok=True)
      (folder / relative).write_bytes(image_set.images[i])
      rows.append({"path": relative, "pid": f"person_{image_set.pids[i]:03d}",
                   "camid": str(image_set.camids[i]), "modality": modality,
                   "tuple_id": str(image_set.tuple_ids[i]),
                   "split": "test" if test_split and split != "train" else split})
  return rows


def write_csv(path: Path, rows: list[dict[str, str]], columns=COLUMNS) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


@pytest.fixture(scope="module")
def market_manifest(tiny_synthetic, tmp_path_factory) -> Path:
  """A CSV manifest of `synthetic_mm/tiny` with train and test splits."""
  folder = tmp_path_factory.mktemp("manifest")
  return write_csv(folder / "manifest.csv", synthetic_rows(tiny_synthetic, folder, True))


def manifest_config(path: Path, data_dir: Path, preset: str = "tiny"):
  config = config_lib.load_config_file(ROOT / "configs" / "manifest.py", f"{preset},{path}")
  config.data.data_dir = str(data_dir)
  return config


# ---------------------------------------------------------------- parsing


def test_csv_and_jsonl_manifests_read_the_same(tiny_synthetic, tmp_path):
  rows = synthetic_rows(tiny_synthetic, tmp_path, test_split=True)
  from_csv = manifest_lib.read_manifest(write_csv(tmp_path / "m.csv", rows), check_files=True)
  from_jsonl = manifest_lib.read_manifest(write_jsonl(tmp_path / "m.jsonl", [
      {**row, "pid": row["pid"], "camid": int(row["camid"]), "tuple_id": int(row["tuple_id"])}
      for row in rows]), check_files=True)
  assert from_csv == from_jsonl and not from_csv.problems
  assert from_csv.modalities == ("rgb", "ir", "depth")
  train = datasets.load_split(tiny_synthetic, "train")
  records = sorted(from_csv.records["train"], key=lambda r: r.path)
  assert len(records) == len(train)
  # "person_003" etc. are numbered in sorted order: the synthetic identities back.
  assert sorted({r.pid for r in records}) == sorted(set(train.pids.tolist()))
  assert set(from_csv.records) == {"train", "test"}


def test_manifest_problems_are_reported_together(tmp_path):
  (tmp_path / "a.jpg").write_bytes(b"x")
  rows = [
      {"path": "a.jpg", "pid": "1", "camid": "1", "modality": "rgb", "split": "train"},
      {"path": "a.jpg", "pid": "1", "camid": "1", "modality": "rgb", "split": "train"},
      {"path": "b.jpg", "pid": "1", "camid": "2", "modality": "ir", "split": "train"},
      {"path": "/abs/c.jpg", "pid": "2", "camid": "1", "modality": "rgb", "split": "train"},
      {"path": "a.jpg", "pid": "", "camid": "1", "modality": "rgb", "split": "test"},
      {"path": "a.jpg", "pid": "3", "camid": "1", "modality": "rgb", "split": "validation"},
      {"path": "a.jpg", "pid": "3", "camid": "1", "modality": "rgb", "split": "query"},
      {"path": "a.jpg", "pid": "3", "camid": "1", "modality": "rgb", "split": "test"},
  ]
  path = write_csv(tmp_path / "bad.csv", rows)
  with pytest.raises(datasets.LayoutError) as error:
    datasets.prepare(datasets.get_builder("manifest", str(tmp_path / "tfds"), manifest=path))
  message = str(error.value)
  for expected in ("line 3: a.jpg is listed again in split 'train' (first on line 2)",
                   "line 4: missing image b.jpg",
                   "line 5: path '/abs/c.jpg' is absolute",
                   "line 6: blank pid",
                   "line 7: split 'validation'; expected one of",
                   "splits 'test' and 'query'/'gallery' together",
                   "a query split without a gallery split"):
    assert expected in message, (expected, message)
  write_csv(tmp_path / "columns.csv", rows, columns=("path", "pid", "split"))
  with pytest.raises(datasets.LayoutError, match=r"missing columns \['camid', 'modality'\]"):
    datasets.get_builder("manifest", manifest=tmp_path / "columns.csv")
  with pytest.raises(datasets.LayoutError, match="unknown file type '.txt'"):
    datasets.get_builder("manifest", manifest=tmp_path / "m.txt")
  with pytest.raises(datasets.LayoutError, match="needs config.data.manifest"):
    datasets.get_builder("manifest")


def test_explicit_query_and_gallery_splits(tiny_synthetic, tmp_path):
  """A JSON-lines manifest with query and gallery splits evaluates them as given; without an
  evaluation split the builder says what to add."""
  rows = synthetic_rows(tiny_synthetic, tmp_path, test_split=False)
  path = write_jsonl(tmp_path / "m.jsonl", rows)
  config = manifest_config(path, tmp_path / "tfds")
  builder = datasets.builder_from_config(config.data)
  datasets.prepare(builder)
  assert builder.name == "manifest" and datasets.eval_splits(builder) == ("query", "gallery")
  query, gallery = (datasets.load_split(builder, s) for s in ("query", "gallery"))
  synthetic = datasets.load_split(tiny_synthetic, "query")
  assert len(query) == len(synthetic) and query.modality_names == ("rgb", "ir", "depth")
  protocols = {p.name: p for p in evaluate.PROTOCOLS["manifest"](query, gallery)}
  assert set(protocols) == {"rgb->ir", "rgb->depth", "ir->rgb", "ir->depth", "depth->rgb",
                            "depth->ir", "all"}
  assert all(p.rule == "market" for p in protocols.values())
  assert len(protocols["ir->rgb"].query_rows) == int(np.sum(synthetic.modalities == 1))
  train_only = write_jsonl(tmp_path / "train_only.jsonl",
                           [r for r in rows if r["split"] == "train"])
  with pytest.raises(datasets.LayoutError, match="no evaluation split"):
    datasets.eval_splits(datasets.get_builder("manifest", manifest=train_only))


def test_manifest_config_argument():
  parse = config_lib.load_config_module(ROOT / "configs" / "manifest.py").parse_arg
  assert parse("/data/m.csv") == ("paper", "/data/m.csv")
  assert parse("tiny,/data/m.csv") == ("tiny", "/data/m.csv")
  assert parse("/data/a,b.csv") == ("paper", "/data/a,b.csv")
  with pytest.raises(ValueError, match="needs the manifest's path"):
    config_lib.load_config_file(ROOT / "configs" / "manifest.py", "tiny,")


# ---------------------------------------------------------------- training


def test_manifest_of_the_synthetic_set_trains_and_evaluates(market_manifest, tmp_path,
                                                            compile_lock):
  """The tiny preset on a manifest of `synthetic_mm/tiny`: the same pipeline, sampler (paired
  captures, from `tuple_id`) and evaluation (Market rule on the test split)."""
  config = manifest_config(market_manifest, tmp_path / "tfds")
  with compile_lock():  # test_train.py compiles the same initialiser and train step.
    report = run.train_and_evaluate(config, str(tmp_path / "work"))
  assert report["dataset"] == "manifest" and report["step"] == config.num_train_steps
  written = json.loads((tmp_path / "work" / "eval" / "manifest.json").read_text())
  assert written == report
  assert set(report["protocols"]) == {"rgb->ir", "rgb->depth", "ir->rgb", "ir->depth",
                                      "depth->rgb", "depth->ir", "all"}
  for name, entry in report["protocols"].items():
    assert 0.0 <= entry["mAP"] <= 1.0 and entry["trials"] == 1, name
  assert set(report["baselines"]["raw_pixel"]) == set(report["protocols"])
  saved = json.loads((tmp_path / "work" / "config.json").read_text())
  assert saved["data"]["manifest"] == str(market_manifest)


# ---------------------------------------------------------------- inspector


def test_inspector_report_and_contact_sheet(market_manifest, tmp_path):
  config = manifest_config(market_manifest, tmp_path / "tfds")
  lines, sheet = inspector.inspect(config, str(tmp_path / "sheet.png"), samples=5)
  text = "\n".join(lines)
  for expected in ("modalities rgb, ir, depth; splits train, test.",
                   "Images per split, modality and camera:", "Identities per split:",
                   "train: none (every identity has rgb, ir, depth)",
                   "test/ir: sizes 16x32 (16); modes RGB (16); formats PNG (16)",
                   "0 problems flagged"):
    assert expected in text, (expected, text)
  protocol_rows = [line.split() for line in lines if line.startswith("  ir->rgb")]
  assert protocol_rows == [["ir->rgb", "16", "16", "1", "0"]]
  image = Image.open(sheet)
  assert image.size[0] >= 5 * inspector.CELL[0] and image.size[1] >= 3 * inspector.CELL[1]


def test_inspector_flags_problems(tmp_path):
  """An unreadable file, a grey image in the RGB modality, an identity without infrared and a
  test identity also in training are each flagged."""
  rng = np.random.default_rng(0)
  rows = []
  for pid in range(3):
    for modality in ("rgb", "ir"):
      if pid == 2 and modality == "ir":
        continue
      pixels = rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)
      if pid == 1 and modality == "rgb":
        pixels[...] = pixels[..., :1]  # three equal channels
      Image.fromarray(pixels).save(tmp_path / f"{pid}_{modality}.png")
      rows.append({"path": f"{pid}_{modality}.png", "pid": pid, "camid": 1,
                   "modality": modality, "split": "train"})
  (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
  rows.append({"path": "broken.jpg", "pid": 0, "camid": 2, "modality": "ir", "split": "test"})
  rows.append({"path": "0_rgb.png", "pid": 0, "camid": 2, "modality": "rgb", "split": "test"})
  path = write_jsonl(tmp_path / "m.jsonl", rows)
  lines, _ = inspector.inspect(manifest_config(path, tmp_path / "tfds"),
                               str(tmp_path / "sheet.png"))
  flagged = [line for line in lines if line.startswith(inspector.WARNING)]
  text = "\n".join(flagged)
  assert "1 identities are in both train and test" in text
  assert ("!! test: 1 listed images were not read (unreadable, skipped when the set was "
          "prepared): broken.jpg (UnidentifiedImageError") in text
  assert "train/rgb: 1 of 3 colour images have three equal channels" in text
  assert "train: 1 of 3 lack ir (e.g. [2])" in "\n".join(lines)
  assert lines[-1] == f"{len(flagged)} problems flagged (!!)."


def test_inspector_checks_the_official_protocol_sizes(tmp_path):
  """The synthetic set in SYSU-MM01's layout is read by the real builder, and its sizes are
  flagged against SYSU-MM01's published 3,803 queries and 301 gallery images."""
  module = load_script("export_synthetic")
  assert module.main(["--layout", "sysu_mm01", "--output", str(tmp_path / "tree"),
                      "--config", "tiny"]) == 0
  config = config_lib.load_config_file(ROOT / "configs" / "sysu_mm01.py", "tiny")
  config.data.manual_dir = str(tmp_path / "tree")
  config.data.data_dir = str(tmp_path / "tfds")
  lines, _ = inspector.inspect(config, str(tmp_path / "sheet.png"))
  text = "\n".join(lines)
  assert ("!! sysu/all-search/single-shot: 16 queries and 8 gallery images per trial; the "
          "official protocol has 3803 and 301.") in text
  assert "!! sysu/indoor-search/single-shot:" in text
  assert "!! train: 8 identities; the official sysu_mm01 has 395." in text
  assert "!! query: 16 ir images; the official sysu_mm01 has 3803." in text
  row = next(line.split() for line in lines if line.startswith("  sysu/all-search/single-shot"))
  assert row[1:5] == ["16", "8", "10", "0"] and row[5:] == ["3803;", "301"]


def test_inspector_command_line(market_manifest, tmp_path):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run(
      [sys.executable, "-m", "mmreid_jax.data.inspect",
       f"--config={ROOT / 'configs' / 'manifest.py'}:tiny,{market_manifest}",
       f"--config.data.data_dir={tmp_path / 'tfds'}", f"--output={tmp_path / 'sheet.png'}"],
      check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Identities lacking a modality:" in result.stdout
  assert (tmp_path / "sheet.png").is_file()
  missing = subprocess.run(
      [sys.executable, "-m", "mmreid_jax.data.inspect",
       f"--config={ROOT / 'configs' / 'sysu_mm01.py'}:tiny",
       f"--config.data.manual_dir={tmp_path / 'nowhere'}",
       f"--config.data.data_dir={tmp_path / 'tfds'}"],
      check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert missing.returncode == 1 and "the manual directory does not exist" in missing.stderr
