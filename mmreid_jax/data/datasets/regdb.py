"""`regdb`: RegDB (Nguyen et al., Sensors 2017), visible and thermal, read from the user's download.

Official layout: `Visible/` and `Thermal/` image folders, and `idx/` with the ten random splits
used by every published result: `idx/{train,test}_{visible,thermal}_{1..10}.txt`, one image per
line, `<path relative to the root> <label>`. The trial (1..10) is the builder config
(`regdb/3`); each trial trains its own model, as in every published RegDB result.

Splits: `train` (the trial's train lists, both modalities) and `test` (its test lists), which
evaluation uses as both query and gallery (visible->thermal and thermal->visible, no camera
filter). `pid` is the list's label, `modality` 0 for visible (rgb) and 1 for thermal (ir),
`camid` 1 for visible and 2 for thermal (as the RegDB evaluation code sets them); images are
unpaired (`tuple_id` -1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets.manual import ManualBuilder, Record

MODALITIES = ("rgb", "ir")
FOLDERS = ("Visible", "Thermal")  # per modality
LIST_NAMES = ("visible", "thermal")  # per modality
CAMERAS = (1, 2)  # per modality
NUM_TRIALS = 10


def list_file(split: str, modality: int, trial: int) -> str:
  """The list of `split` ("train" or "test") for a modality and trial, relative to the root."""
  return f"idx/{split}_{LIST_NAMES[modality]}_{trial}.txt"


def read_list(root: Path, relative: str, modality: int
              ) -> tuple[list[Record], list[str]]:
  """The records of one list file and its problems (malformed lines, missing images)."""
  records, problems = [], []
  for number, line in enumerate((root / relative).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError
      path, pid = parts[0], int(parts[1])
    except ValueError:
      problems.append(f"{relative}:{number}: {line!r} is not '<relative path> <label>'")
      continue
    if not (root / path).is_file():
      problems.append(f"{relative}:{number}: listed image {path} does not exist")
      continue
    records.append(Record(path, pid, CAMERAS[modality], modality))
  return records, problems


@dataclasses.dataclass(eq=False)
class RegdbConfig(tfds.core.BuilderConfig):
  """One of RegDB's ten splits.

  Attributes:
    trial: 1..10, the number in the idx/ list names.
  """

  trial: int = 1


class Regdb(ManualBuilder):
  """RegDB: 412 identities, 10 visible and 10 thermal images each, ten train/test splits."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Unreadable images skipped and counted in a warning."}
  MODALITIES = MODALITIES
  EVAL_SPLITS = ("test", "test")
  BUILDER_CONFIGS = [RegdbConfig(name=str(t), description=f"Split (trial) {t} of 10.", trial=t)
                     for t in range(1, NUM_TRIALS + 1)]
  DEFAULT_CONFIG_NAME = "1"
  DOWNLOAD = ("RegDB (\"Dongguk Body-based Person Recognition Database (DBPerson-Recog-DB1)\") is "
              "distributed by Dongguk University on request (http://dm.dongguk.edu/link.html); "
              "the idx/ lists come with the AGW code (mangye16/Cross-Modal-Re-ID-baseline).")
  LAYOUT = "\n".join([
      "  Visible/                          visible images, e.g. Visible/<id>/<file>.bmp",
      "  Thermal/                          thermal images",
      "  idx/train_visible_<t>.txt         '<path relative to the root> <label>' per line,",
      "  idx/train_thermal_<t>.txt         t = 1..10",
      "  idx/test_visible_<t>.txt",
      "  idx/test_thermal_<t>.txt",
  ])

  def required_paths(self) -> list[str]:
    trial = self.builder_config.trial
    return ([f"{folder}/" for folder in FOLDERS]
            + [list_file(split, modality, trial) for split in ("train", "test")
               for modality in range(len(MODALITIES))])

  def read_records(self, root: Path) -> tuple[dict[str, list[Record]], list[str]]:
    records: dict[str, list[Record]] = {"train": [], "test": []}
    problems: list[str] = []
    for split in records:
      for modality in range(len(MODALITIES)):
        split_records, split_problems = read_list(
            root, list_file(split, modality, self.builder_config.trial), modality)
        records[split] += split_records
        problems += split_problems
    return records, problems
