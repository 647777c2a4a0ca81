"""The base of the builders that read a benchmark the user downloaded (TFDS `manual_dir`).

Real re-identification sets cannot be downloaded by code. Their builders read the folder the user
unpacked, in the dataset's official layout, and never download anything. Before reading, the
tree is checked, and everything missing (every folder and list file, then every listed image or
unpaired capture) is reported in one error that shows the expected layout and where the README
explains the download. Then every image is decoded once, as training decodes it: an unreadable
one is skipped (with its capture), and one warning counts those, the images decoding converts
(grayscale, alpha, 16 bits) and the identities lacking a modality (`ManualBuilder.check_images`).

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
from absl import logging

from mmreid_jax import faults
from mmreid_jax.data import augment
from mmreid_jax.data.datasets import schema

README_SECTION = "README.md, section \"Real benchmarks\""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
# How many missing images or malformed lines one error lists before summarising the rest.
_MAX_LISTED_PROBLEMS = 20


class LayoutError(faults.RunError, FileNotFoundError):
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


def identity_notes(records: dict[str, list[Record]], modalities: Sequence[str]) -> list[str]:
  """For each split and each of its modalities, the identities with no image of it (they train
  with that modality absent; as queries or gallery they simply have fewer images)."""
  notes = []
  for split, split_records in records.items():
    by_pid: dict[int, set[int]] = {}
    for record in split_records:
      by_pid.setdefault(record.pid, set()).add(record.modality)
    for modality in sorted(set().union(*by_pid.values()) if by_pid else ()):
      lacking = sorted(pid for pid, present in by_pid.items() if modality not in present)
      if lacking:
        notes.append(f"{split}: {len(lacking)} of {len(by_pid)} identities have no "
                     f"{modalities[modality]} image: "
                     + ", ".join(summarize([str(pid) for pid in lacking])))
  return notes


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

  def manual_root(self, manual_dir: str | os.PathLike | None) -> Path:
    """The folder the download is read from: `manual_dir` (`config.data.manual_dir`), or TFDS's
    DATA_DIR/downloads/manual when it is None."""
    if manual_dir:
      return Path(manual_dir)
    return Path(os.fspath(self.data_dir_root)) / "downloads" / "manual"

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

  def layout_notes(self, root: Path) -> list[str]:
    """What the tree holds that is read without error but worth a warning (e.g. empty identity
    folders); `check_images` logs them. None by default."""
    del root
    return []

  def check_images(self, root: str | os.PathLike, records: dict[str, list[Record]]
                   ) -> dict[str, list[Record]]:
    """Each split's records without the images that `augment.decode` cannot read.

    An unreadable image (truncated, corrupt, not an image) is skipped, with the other images of
    its capture on sets of aligned captures. One warning counts everything skipped or worth
    knowing: the unreadable images, the images that decoding converts (grayscale in the "rgb"
    modality, alpha, 16 bits, palettes: `augment.CONVERSIONS`), the identities of a split that
    have no image of one of its modalities, and `layout_notes`.

    Raises:
      LayoutError: a split has no readable image left.
    """
    root = Path(root)
    unreadable, bad_paths, bad_captures = [], set(), set()
    converted: dict[str, list[str]] = {}
    for split_records in records.values():
      for record in split_records:
        try:
          note = augment.check_image((root / record.path).read_bytes(), record.path)
        except augment.ImageError as error:
          unreadable.append(str(error))
          bad_paths.add(record.path)
          if record.tuple_id >= 0:
            bad_captures.add(record.tuple_id)
          continue
        modality = self.MODALITIES[record.modality]
        if note and (modality == "rgb" or not note.startswith(("grayscale,", "1-bit,"))):
          converted.setdefault(f"{modality} images, {note}", []).append(record.path)
    kept = {split: [r for r in split_records if r.path not in bad_paths
                    and (r.tuple_id < 0 or r.tuple_id not in bad_captures)]
            for split, split_records in records.items()}
    empty = [split for split, split_records in kept.items() if not split_records]
    if empty:
      raise self._error(root, "no readable images left for the splits "
                        f"{', '.join(empty)}:", unreadable)
    notes = []
    if unreadable:
      dropped = sum(len(rs) for rs in records.values()) - sum(len(rs) for rs in kept.values())
      notes.append(f"{len(unreadable)} unreadable images skipped ({dropped} images with the "
                   "rest of their captures):")
      notes += [f"  {line}" for line in summarize(unreadable)]
    for what, paths in sorted(converted.items()):
      notes.append(f"{len(paths)} {what}: " + ", ".join(summarize(paths, 3)))
    notes += identity_notes(kept, self.MODALITIES)
    notes += self.layout_notes(root)
    if notes:
      logging.warning("%s", "\n".join([f"{self.name}: reading {root}:",
                                         *(f"  {note}" for note in notes)]))
    return kept

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(root, records)
            for split, records in self.check_images(root, self.scan(root)).items()}

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
