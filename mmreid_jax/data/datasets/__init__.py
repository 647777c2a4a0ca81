"""Datasets by name: one TFDS builder per dataset, looked up here, never by if/else chains."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from mmreid_jax.data.datasets.manifest import Manifest
from mmreid_jax.data.datasets.manual import LayoutError, ManualBuilder
from mmreid_jax.data.datasets.regdb import Regdb
from mmreid_jax.data.datasets.rgbnt201 import Rgbnt201
from mmreid_jax.data.datasets.synthetic_mm import SyntheticMm, SyntheticMmConfig
from mmreid_jax.data.datasets.sysu_mm01 import SysuMm01

__all__ = ["DATASETS", "ImageSet", "LayoutError", "Manifest", "ManualBuilder", "Regdb",
           "Rgbnt201", "SyntheticMm", "SyntheticMmConfig", "SysuMm01", "builder_from_config",
           "eval_splits", "get_builder", "load_split", "prepare"]

DATASETS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "synthetic_mm": SyntheticMm,
    "sysu_mm01": SysuMm01,
    "regdb": Regdb,
    "rgbnt201": Rgbnt201,
    "manifest": Manifest,
}


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """One split held in memory as encoded images and labels, N rows.

  Attributes:
    images: (N,) object array of encoded PNG/JPEG bytes.
    pids: (N,) int64 identities.
    camids: (N,) int64 cameras.
    modalities: (N,) int64 indices into `modality_names`.
    tuple_ids: (N,) int64 capture ids (rows sharing one were captured together), or -1.
    paths: (N,) object array of original relative paths (str).
    modality_names: the dataset's ordered modality list.
    conditions: (N,) object array of each capture's scene condition (str, the synthetic set's
      `condition` feature), or None for a dataset without one.
  """

  images: np.ndarray
  pids: np.ndarray
  camids: np.ndarray
  modalities: np.ndarray
  tuple_ids: np.ndarray
  paths: np.ndarray
  modality_names: tuple[str, ...]
  conditions: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.pids)

  def subset(self, rows: np.ndarray) -> "ImageSet":
    """The rows `rows` (indices or a boolean mask) as a new ImageSet."""
    return ImageSet(self.images[rows], self.pids[rows], self.camids[rows],
                    self.modalities[rows], self.tuple_ids[rows], self.paths[rows],
                    self.modality_names,
                    None if self.conditions is None else self.conditions[rows])


def get_builder(name: str, data_dir: str | None = None, **options) -> tfds.core.DatasetBuilder:
  """The builder for `name` ("dataset" or "dataset/config", e.g. "synthetic_mm/demo").

  `options` go to the builder's constructor: the `config.data` keys a builder class lists in
  `BUILDER_OPTIONS` (the manifest dataset's `manifest`; see `builder_from_config`).
  """
  dataset, _, config = name.partition("/")
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r} in config.data.name={name!r}; "
                     f"known datasets: {sorted(DATASETS)}.")
  builder_cls = DATASETS[dataset]
  known = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if config and config not in known:
    raise ValueError(f"Unknown config {config!r} of dataset {dataset!r} in "
                     f"config.data.name={name!r}; known configs: {known}.")
  return builder_cls(config=config or None, data_dir=data_dir, **options)


def builder_from_config(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of `config.data`: `name`, `data_dir`, and the keys the builder class lists in
  `BUILDER_OPTIONS` (e.g. `manifest`)."""
  builder_cls = DATASETS.get(data.name.partition("/")[0])
  keys = getattr(builder_cls, "BUILDER_OPTIONS", ())
  return get_builder(data.name, data.get("data_dir"),
                     **{key: data[key] for key in keys if data.get(key) is not None})


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None = None) -> None:
  """Prepares `builder`'s data (a no-op once prepared).

  Builders of real benchmarks read the user's download from `manual_dir` (default: TFDS's
  DATA_DIR/downloads/manual) and check its layout first, so that everything missing is reported
  in one LayoutError before anything is read. Processes preparing one builder in one data folder
  at once take turns (`_preparation_lock`): every one ends with the same prepared set.
  """
  if builder.is_prepared():
    return
  with _preparation_lock(builder):
    if builder.is_prepared():  # another process prepared it while this one waited
      builder.info.read_from_directory(builder.data_dir)
      return
    if isinstance(builder, ManualBuilder):
      root = builder.manual_root(manual_dir)
      builder.check_layout(root)
      manual_dir = str(root)
    download_config = (tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir
                       else None)
    builder.download_and_prepare(download_config=download_config)


@contextlib.contextmanager
def _preparation_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an flock beside the builder's version folder (`.VERSION.prepare.lock` in
  DATA_DIR/name/config) so that processes preparing one dataset in one folder take turns: the
  first prepares, the others wait and then read what it wrote. A folder on a remote filesystem
  (a URL) gets no lock."""
  folder = os.path.dirname(os.fspath(builder.data_dir))
  if "://" in folder:
    yield
    return
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f".{builder.version}.prepare.lock")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("Waiting for another process preparing %s (%s).", builder.info.full_name,
                   path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def eval_splits(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The (query, gallery) splits evaluation reads; one split may serve as both."""
  return getattr(builder, "EVAL_SPLITS", ("query", "gallery"))


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> ImageSet:
  """Reads split `split` of a prepared builder into memory, images left encoded."""
  if split not in builder.info.splits:
    raise ValueError(f"Dataset {builder.info.full_name} has no split {split!r}; "
                     f"splits: {sorted(builder.info.splits)}.")
  dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()},
                               shuffle_files=False)
  keys = ["image", "pid", "camid", "modality", "tuple_id", "path"]
  has_conditions = "condition" in builder.info.features
  if has_conditions:
    keys.append("condition")
  columns: dict[str, list] = {k: [] for k in keys}
  for example in dataset.as_numpy_iterator():
    for key, values in columns.items():
      values.append(example.get(key, -1))
  for key in ("path", "condition"):
    if key in columns:
      columns[key] = [v.decode() if isinstance(v, bytes) else str(v) for v in columns[key]]
  order = np.argsort(np.array(columns["path"], dtype=object).astype(str), kind="stable")

  def column(key: str, dtype) -> np.ndarray:
    array = np.empty(len(columns[key]), dtype=object) if dtype is object else None
    if array is not None:
      array[:] = columns[key]
      return array[order]
    return np.asarray(columns[key], dtype=dtype)[order]

  return ImageSet(images=column("image", object), pids=column("pid", np.int64),
                  camids=column("camid", np.int64), modalities=column("modality", np.int64),
                  tuple_ids=column("tuple_id", np.int64), paths=column("path", object),
                  modality_names=tuple(builder.MODALITIES),
                  conditions=column("condition", object) if has_conditions else None)
