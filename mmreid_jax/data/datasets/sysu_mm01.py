"""`sysu_mm01`: SYSU-MM01 (Wu et al., ICCV 2017), RGB and infrared, read from the user's download.

Official layout: `cam1` .. `cam6`, each holding one folder per identity (`<pid:04d>/`) of images
`<nnnn>.jpg`; cameras 1, 2, 4 and 5 are RGB, 3 and 6 near-infrared. `exp/train_id.txt`,
`exp/val_id.txt` and `exp/test_id.txt` hold the identities of each split as one comma-separated
line (only the first line is read, as by the reference loader).

Splits: `train` (train + val identities, 395, every camera), `query` (the 96 test identities,
infrared cameras 3 and 6: every image, as in the official protocol) and `gallery` (the test
identities, RGB cameras 1, 2, 4 and 5: every image; each evaluation trial draws its gallery from
these, see `mmreid_jax.data.sysu_mm01`). `camid` is the camera number (1..6), `pid` the identity
number, `modality` 0 for RGB and 1 for infrared; images are unpaired (`tuple_id` -1).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets.manual import ManualBuilder, Record, list_images, summarize

MODALITIES = ("rgb", "ir")
RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
CAMERAS = (1, 2, 3, 4, 5, 6)
ID_FILES = {"train": "exp/train_id.txt", "val": "exp/val_id.txt", "test": "exp/test_id.txt"}


def camera_folder(camera: int) -> str:
  """The folder of `camera` ("cam3")."""
  return f"cam{camera}"


def identity_folder(camera: int, pid: int) -> str:
  """The folder of identity `pid` in `camera`, relative to the root ("cam3/0007")."""
  return f"{camera_folder(camera)}/{pid:04d}"


def parse_path(path: str) -> tuple[int, int]:
  """(camera, pid) of a relative image path "cam<c>/<pid>/<file>"."""
  camera, pid, _ = path.split("/")
  return int(camera[len("cam"):]), int(pid)


def read_ids(path: Path) -> list[int]:
  """The identities of an `exp/*_id.txt` file: its first line, comma-separated.

  Raises:
    ValueError: naming the file and the entry that is not an integer.
  """
  lines = path.read_text().splitlines()
  entries = [entry.strip() for entry in lines[0].split(",")] if lines else []
  ids = []
  for entry in entries:
    if not entry:
      continue
    try:
      ids.append(int(entry))
    except ValueError:
      raise ValueError(f"{path}: identity {entry!r} is not an integer; expected one line of "
                       "comma-separated identity numbers, e.g. 1,2,3") from None
  return ids


def identity_images(root: Path, cameras: tuple[int, ...], ids: list[int]) -> list[Record]:
  """Every image of identities `ids` in `cameras`, as records."""
  records = []
  for camera in cameras:
    modality = 0 if camera in RGB_CAMERAS else 1
    for pid in ids:
      folder = identity_folder(camera, pid)
      records += [Record(f"{folder}/{name}", pid, camera, modality)
                  for name in list_images(root / folder)]
  return records


class SysuMm01(ManualBuilder):
  """SYSU-MM01: 491 identities, 4 RGB and 2 infrared cameras."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Unreadable images skipped and counted in a warning."}
  MODALITIES = MODALITIES
  DOWNLOAD = ("SYSU-MM01 is distributed by its authors on request "
              "(https://github.com/wuancong/SYSU-MM01).")
  LAYOUT = "\n".join([
      "  cam1/ .. cam6/          one folder per identity, <pid:04d>/<nnnn>.jpg",
      "                          (cameras 1, 2, 4, 5 RGB; 3, 6 infrared)",
      "  exp/train_id.txt        comma-separated identities, one line",
      "  exp/val_id.txt",
      "  exp/test_id.txt",
  ])

  def required_paths(self) -> list[str]:
    return [f"{camera_folder(c)}/" for c in CAMERAS] + list(ID_FILES.values())

  def read_records(self, root: Path) -> tuple[dict[str, list[Record]], list[str]]:
    problems = []
    ids = {}
    for split, relative in ID_FILES.items():
      try:
        ids[split] = read_ids(root / relative)
      except ValueError as error:
        problems.append(str(error))
        ids[split] = []
    train_ids = sorted(set(ids["train"]) | set(ids["val"]))
    test_ids = sorted(set(ids["test"]))
    return {
        "train": identity_images(root, CAMERAS, train_ids),
        "query": identity_images(root, IR_CAMERAS, test_ids),
        "gallery": identity_images(root, RGB_CAMERAS, test_ids),
    }, problems

  def layout_notes(self, root: Path) -> list[str]:
    """Identity folders without images, and listed identities without any image (both are
    skipped: an identity is read from whichever cameras hold its images)."""
    empty, absent = [], []
    for relative in ID_FILES.values():
      try:
        ids = read_ids(root / relative)
      except ValueError:  # reported by read_records
        continue
      for pid in ids:
        folders = [identity_folder(camera, pid) for camera in CAMERAS]
        empty += [f"{folder}/" for folder in folders
                  if (root / folder).is_dir() and not list_images(root / folder)]
        if not any(list_images(root / folder) for folder in folders):
          absent.append(f"{pid} ({relative})")
    notes = []
    if empty:
      notes.append(f"{len(empty)} identity folders hold no image: "
                   + ", ".join(summarize(sorted(set(empty)))))
    if absent:
      notes.append(f"{len(absent)} listed identities have no image in any camera: "
                   + ", ".join(summarize(absent)))
    return notes
