"""`rgbnt201`: RGBNT201 (Zheng et al., AAAI 2021), aligned RGB, near- and thermal-infrared
triplets, read from the user's download.

Official layout: `train_171/` and `test/`, each with `RGB/`, `NI/` and `TI/`; a file name present
in all three folders is one pixel-aligned capture, and names such as `000028_cam1_0_02.jpg` give
the identity (`000028`) and the camera (`cam1`). Other folders (e.g. `val_25/`) are not read.

Splits: `train` (train_171) and `test`, which evaluation uses as both query and gallery. Modalities
`("rgb", "nir", "tir")` from `RGB/`, `NI/`, `TI/`; `camid` is the camera number, `tuple_id` numbers
the captures (train first, then test, each by file name).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets.manual import ManualBuilder, Record, list_images

MODALITIES = ("rgb", "nir", "tir")
FOLDERS = ("RGB", "NI", "TI")  # per modality
SPLITS = {"train": "train_171", "test": "test"}


def parse_name(name: str) -> tuple[int, int]:
  """(pid, camera) of a file name "<pid>_cam<c>_<...>.jpg".

  Raises:
    ValueError: when the name does not follow that pattern.
  """
  parts = name.split("_")
  if (len(parts) < 2 or not parts[1].startswith("cam") or not parts[0].isdigit()
      or not parts[1][len("cam"):].isdigit()):
    raise ValueError(f"{name!r} does not look like '<pid>_cam<c>_<...>.jpg' (pid and camera "
                     "numbers)")
  return int(parts[0]), int(parts[1][len("cam"):])


class Rgbnt201(ManualBuilder):
  """RGBNT201: 201 identities in aligned RGB / NIR / TIR triplets from four cameras."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Unreadable images skipped and counted in a warning."}
  MODALITIES = MODALITIES
  EVAL_SPLITS = ("test", "test")
  DOWNLOAD = ("RGBNT201 is distributed by the authors of PFNet (Zheng et al., \"Robust "
              "Multi-Modality Person Re-identification\", AAAI 2021) on request.")
  LAYOUT = "\n".join([
      "  train_171/RGB/ train_171/NI/ train_171/TI/   <pid>_cam<c>_<...>.jpg, the same name in all",
      "  test/RGB/      test/NI/      test/TI/        three folders = one aligned capture",
  ])

  def required_paths(self) -> list[str]:
    return [f"{split}/{folder}/" for split in SPLITS.values() for folder in FOLDERS]

  def read_records(self, root: Path) -> tuple[dict[str, list[Record]], list[str]]:
    records: dict[str, list[Record]] = {}
    problems: list[str] = []
    next_tuple = 0
    for split, split_folder in SPLITS.items():
      names = [set(list_images(root / split_folder / folder)) for folder in FOLDERS]
      records[split] = []
      for name in sorted(set().union(*names)):
        absent = [folder for folder, present in zip(FOLDERS, names) if name not in present]
        if absent:
          problems.append(f"{split_folder}: {name} has no counterpart in {', '.join(absent)}")
          continue
        try:
          pid, camera = parse_name(name)
        except ValueError as error:
          problems.append(f"{split_folder}: {error}")
          continue
        records[split] += [Record(f"{split_folder}/{folder}/{name}", pid, camera, modality,
                                  next_tuple) for modality, folder in enumerate(FOLDERS)]
        next_tuple += 1
    return records, problems
