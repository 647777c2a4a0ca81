"""The base of the builders that read a benchmark the user downloaded (TFDS `manual_dir`).

Real re-identification sets cannot be downloaded by code. Their builders read the folder the user
unpacked, in the dataset's official layout, and never download anything. Before reading, the
tree is checked, and everything missing (every folder and list file, then every listed image or
unpaired capture) is reported in one error that shows the expected layout and where the README
explains the download.

A builder subclass only says where files are and how identities and cameras are read: the folders
and list files it needs (`required_paths`) and the records of each split (`read_records`). The
features are the same for every dataset: `image` (the original encoded file, JPEG, PNG or BMP,
stored byte for byte), `pid`, `camid`, `modality` (index into `MODALITIES`), `tuple_id` (the
capture shared by pixel-aligned images of several modalities, or -1) and `path` (relative to the
download's root, "/"-separated).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets import schema

README_SECTION = "README.md, section \"Real benchmarks\""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# How many missing images or malformed lines one error lists before summarising the rest.
_MAX_LISTED_PROBLEMS = 20


class LayoutError(FileNotFoundError):
  """A downloaded dataset's folder is missing parts of its official layout."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a split.

  Attributes:
    path: relative to the download's root, "/"-separated.
    pid: identity.
    camid: camera.
    modality: index into the builder's MODALITIES.
    tuple_id: capture shared by aligned images of several modalities, or -1.
  """

  path: str
  pid: int
  camid: int
  modality: int
  tuple_id: int = -1


def list_images(folder: Path) -> list[str]:
  """Sorted names of the image files (by suffix, case-insensitive) directly in `folder`."""
  if not folder.is_dir():
    return []
  return sorted(entry.name for entry in folder.iterdir()
                if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES)


def summarize(problems: Sequence[str], limit: int = _MAX_LISTED_PROBLEMS) -> list[str]:
  """The first `limit` problems, then a line counting the rest."""
  shown = list(problems[:limit])
  if len(problems) > limit:
    shown.append(f"... and {len(problems) - limit} more")
  return shown


class ManualBuilder(tfds.core.GeneratorBasedBuilder):
  """A dataset read from the user's download in its official layout (abstract).

  Class attributes of a subclass:
    MODALITIES: the ordered modality names.
    LAYOUT: the expected tree, as text (shown in every error and in the download instructions).
    DOWNLOAD: where the dataset is obtained (shown with the instructions).
    EVAL_SPLITS: the (query, gallery) split names evaluation reads; both may name one split.
  """

  MODALITIES: tuple[str, ...] = ()
  LAYOUT: str = ""
  DOWNLOAD: str = ""
  EVAL_SPLITS: tuple[str, str] = ("query", "gallery")

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if cls.LAYOUT:
      cls.MANUAL_DOWNLOAD_INSTRUCTIONS = (
          f"{cls.DOWNLOAD}\nUnpack it so that the manual directory holds:\n{cls.LAYOUT}\n"
          f"Step-by-step instructions: {README_SECTION}.")

  @abc.abstractmethod
  def required_paths(self) -> list[str]:
    """Folders (ending in "/") and files, relative to the root, that the layout must contain."""

  @abc.abstractmethod
  def read_records(self, root: Path) -> tuple[dict[str, list[Record]], list[str]]:
    """Each split's records, and the problems found in the files (missing listed images,
    malformed lines, unpaired captures); called once `required_paths` all exist."""

  def _error(self, root: Path, heading: str, problems: Sequence[str]) -> LayoutError:
    lines = [f"{self.name}: {heading} {root}", *(f"  {p}" for p in summarize(problems)),
             "Expected layout:", self.LAYOUT,
             f"{self.DOWNLOAD} Download and unpacking: {README_SECTION}."]
    return LayoutError("\n".join(lines))

  def check_layout(self, root: str | os.PathLike) -> None:
    """Raises LayoutError naming every required folder or list file missing under `root`."""
    root = Path(root)
    if not root.is_dir():
      raise self._error(root, "the manual directory does not exist:",
                        [f"missing: {p}" for p in self.required_paths()])
    missing = []
    for relative in self.required_paths():
      path = root / relative
      if relative.endswith("/") and not path.is_dir():
        missing.append(f"missing folder: {relative}")
      elif not relative.endswith("/") and not path.is_file():
        missing.append(f"missing file: {relative}")
    if missing:
      raise self._error(root, f"{len(missing)} missing parts of the official layout in", missing)

  def scan(self, root: str | os.PathLike) -> dict[str, list[Record]]:
    """Checks the tree at `root` and returns each split's records (sorted by path).

    Raises:
      LayoutError: listing every missing folder or list file; or, when those are all there,
        every missing listed image, malformed line or unpaired capture.
    """
    root = Path(root)
    self.check_layout(root)
    records, problems = self.read_records(root)
    if problems:
      raise self._error(root, f"{len(problems)} problems in the files of", problems)
    empty = [split for split, split_records in records.items() if not split_records]
    if empty:
      raise self._error(root, "no images found for the splits", [", ".join(empty)])
    return {split: sorted(split_records, key=lambda r: r.path)
            for split, split_records in records.items()}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__,
        # The image is stored as the original bytes (never re-encoded); decoded by the pipeline.
        features=schema.reid_features("jpeg"),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(root, records)
            for split, records in self.scan(root).items()}

  def _generate_examples(self, root: Path, records: list[Record]
                         ) -> Iterator[tuple[str, dict]]:
    for record in records:
      yield record.path, {
          "image": (root / record.path).read_bytes(),
          "pid": record.pid,
          "camid": record.camid,
          "modality": record.modality,
          "tuple_id": record.tuple_id,
          "path": record.path,
      }
