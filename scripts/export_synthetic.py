r"""Writes the synthetic set as JPEG files in the official layout of a real benchmark.

  python scripts/export_synthetic.py --layout sysu_mm01 --output /tmp/synthetic_sysu
  python scripts/export_synthetic.py --layout regdb --output /tmp/synthetic_regdb --config tiny
  python scripts/export_synthetic.py --layout rgbnt201 --output /tmp/synthetic_rgbnt201

The images are those of `synthetic_mm/<config>` (the same renderer, seed and identities; JPEG
adds its compression), so the real builders (`--config.data.manual_dir=DIR`) and any other
framework can be trained and evaluated on identical data. Per layout:

- sysu_mm01: identities numbered from 1; the synthetic training identities go to
  exp/train_id.txt (the last quarter of them to exp/val_id.txt), the test identities to
  exp/test_id.txt. Synthetic camera c's RGB images go to RGB camera (1, 2, 4, 5)[c % 4], its
  infrared images to infrared camera (3, 6)[c % 2]; depth is not part of SYSU-MM01.
- regdb: Visible/<id>/ and Thermal/<id>/ (depth is left out) and ten splits idx/*_<t>.txt: split t
  shuffles all identities with seed t and gives the set's training-identity count to training,
  the rest to test; labels are numbered from 0 within each split, as in RegDB's lists.
- rgbnt201: train_171/ (the training identities) and test/, with the RGB, infrared and depth
  images of each capture in RGB/, TI/ and NI/ under one name, <id:06d>_cam<c>_0_<nn>.jpg.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mmreid_jax.data.datasets import SyntheticMm, regdb, rgbnt201, synthetic_render, sysu_mm01

LAYOUTS = ("sysu_mm01", "regdb", "rgbnt201")
RGB, IR, DEPTH = (synthetic_render.MODALITIES.index(m) for m in ("rgb", "ir", "depth"))
RGBNT201_FOLDER = {RGB: "RGB", IR: "TI", DEPTH: "NI"}


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  """(H, W, 3) uint8 as JPEG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def records(config) -> Iterator[tuple[bool, synthetic_render.SyntheticRecord]]:
  """(is a training identity, record) of every image of a `SyntheticMmConfig`, as the builder
  renders them."""
  pids = range(config.num_train_ids + config.num_test_ids)
  for record in synthetic_render.generate_split(pids, config.num_cameras,
                                                config.tuples_per_camera, config.height,
                                                config.width, config.seed, config.difficulty):
    yield record.pid < config.num_train_ids, record


def write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def export_sysu_mm01(config, output: Path, quality: int) -> int:
  counts: dict[str, int] = {}
  train_ids, test_ids = [], []
  for camera in sysu_mm01.CAMERAS:  # All six, even those no synthetic camera maps to.
    (output / sysu_mm01.camera_folder(camera)).mkdir(parents=True, exist_ok=True)
  for is_train, record in records(config):
    if record.modality == DEPTH:
      continue
    pid = record.pid + 1
    cameras = sysu_mm01.RGB_CAMERAS if record.modality == RGB else sysu_mm01.IR_CAMERAS
    folder = sysu_mm01.identity_folder(cameras[record.camid % len(cameras)], pid)
    counts[folder] = counts.get(folder, 0) + 1
    write(output / folder / f"{counts[folder]:04d}.jpg", encode_jpeg(record.image, quality))
    ids = train_ids if is_train else test_ids
    if pid not in ids:
      ids.append(pid)
  num_val = len(train_ids) // 4
  splits = {"train": train_ids[:len(train_ids) - num_val],
            "val": train_ids[len(train_ids) - num_val:], "test": test_ids}
  for split, relative in sysu_mm01.ID_FILES.items():
    write(output / relative, (",".join(str(i) for i in splits[split]) + "\n").encode())
  return sum(counts.values())


def export_regdb(config, output: Path, quality: int) -> int:
  paths: dict[tuple[int, int], list[str]] = {}  # (pid, modality) -> relative paths
  for _, record in records(config):
    if record.modality == DEPTH:
      continue
    modality = 0 if record.modality == RGB else 1
    name = (f"{regdb.LIST_NAMES[modality][0]}_{record.pid + 1:04d}_c{record.camid}_"
            f"t{record.tuple_id:06d}.jpg")
    relative = f"{regdb.FOLDERS[modality]}/{record.pid + 1}/{name}"
    write(output / relative, encode_jpeg(record.image, quality))
    paths.setdefault((record.pid, modality), []).append(relative)
  pids = sorted({pid for pid, _ in paths})
  for trial in range(1, regdb.NUM_TRIALS + 1):
    shuffled = np.random.default_rng(trial).permutation(pids)
    split_pids = {"train": sorted(shuffled[:config.num_train_ids]),
                  "test": sorted(shuffled[config.num_train_ids:])}
    for split, members in split_pids.items():
      for modality in range(len(regdb.MODALITIES)):
        lines = [f"{path} {label}" for label, pid in enumerate(members)
                 for path in paths.get((int(pid), modality), [])]
        write(output / regdb.list_file(split, modality, trial), ("\n".join(lines) + "\n").encode())
  return sum(len(v) for v in paths.values())


def export_rgbnt201(config, output: Path, quality: int) -> int:
  count = 0
  for is_train, record in records(config):
    split = rgbnt201.SPLITS["train" if is_train else "test"]
    tuple_index = record.tuple_id % config.tuples_per_camera
    name = f"{record.pid + 1:06d}_cam{record.camid + 1}_0_{tuple_index:02d}.jpg"
    write(output / split / RGBNT201_FOLDER[record.modality] / name,
          encode_jpeg(record.image, quality))
    count += 1
  return count


EXPORTERS = {"sysu_mm01": export_sysu_mm01, "regdb": export_regdb, "rgbnt201": export_rgbnt201}


def main(argv: list[str] | None = None) -> int:
  configs = {config.name: config for config in SyntheticMm.BUILDER_CONFIGS}
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layout", required=True, choices=LAYOUTS)
  parser.add_argument("--output", required=True, type=Path,
                      help="Folder to write (it must not hold files yet).")
  parser.add_argument("--config", default="demo", choices=sorted(configs),
                      help="The synthetic_mm config to render (default: demo).")
  parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95).")
  args = parser.parse_args(argv)
  if args.output.exists() and any(args.output.iterdir()):
    parser.error(f"--output {args.output} is not empty; choose a new folder.")
  count = EXPORTERS[args.layout](configs[args.config], args.output, args.quality)
  print(f"Wrote {count} images of synthetic_mm/{args.config} in the {args.layout} layout to "
        f"{args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
