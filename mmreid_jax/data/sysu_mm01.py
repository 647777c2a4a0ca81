"""SYSU-MM01's test protocol: which images are queries and which form each trial's gallery.

This reproduces the reference loader used by the published cross-modal results
(`process_query_sysu` / `process_gallery_sysu` of the AGW / DDAG code, mangye16/
Cross-Modal-Re-ID-baseline, `data_manager.py`):

- queries: for each test identity in sorted order, cameras 3 then 6, every image (sorted by name);
- gallery of trial t (0..9): Python's `random.seed(t)`, then for each test identity in sorted
  order and each gallery camera in order (`all`: 1, 2, 4, 5; `indoor`: 1, 2), skipping cameras
  where the identity has no folder, `random.choice(sorted(files))` (single-shot). Multi-shot draws
  `random.sample(sorted(files), 10)` in the same loop (the reproducible variant found in public
  code; the reference code has no multi-shot, the dataset's MATLAB code draws from a stored
  permutation); an identity with fewer than 10 images in a camera gives all of them, where
  `random.sample` would fail (SYSU-MM01 has at least 10 per RGB camera).
  A `random.Random(trial)` instance gives the same draws as seeding the global generator,
  without touching it.

Paths are relative to the download's root ("cam1/0001/0004.jpg"); lists come in the reference's
order (which decides ties). Only image files count (see `datasets.manual.IMAGE_SUFFIXES`): a
stray non-image file in a folder would be drawn by the reference loader but not here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mmreid_jax.data.datasets.manual import list_images
from mmreid_jax.data.datasets.sysu_mm01 import (
    ID_FILES,
    IR_CAMERAS,
    identity_folder,
    parse_path,
    read_ids,
)

GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
MULTI_SHOT = 10
NUM_TRIALS = 10

__all__ = ["GALLERY_CAMERAS", "MULTI_SHOT", "NUM_TRIALS", "draw_split", "split_from_paths",
           "test_split"]


def _check(mode: str, shot: int) -> None:
  if mode not in GALLERY_CAMERAS:
    raise ValueError(f"SYSU-MM01 search mode {mode!r}; expected one of {sorted(GALLERY_CAMERAS)}.")
  if shot < 1:
    raise ValueError(f"SYSU-MM01 shot={shot}; expected 1 (single-shot) or {MULTI_SHOT} "
                     "(multi-shot).")


def draw_split(files: Mapping[tuple[int, int], Sequence[str]], ids: Iterable[int], mode: str,
               trial: int, shot: int = 1) -> tuple[list[str], list[str]]:
  """Query paths and trial `trial`'s gallery paths, drawn like the reference loader.

  Args:
    files: the image paths of each (pid, camera) that has a folder.
    ids: the test identities (the draw visits them in sorted order).
    mode: "all" or "indoor" search.
    trial: the trial, the seed of the draw.
    shot: images per (identity, camera) in the gallery: 1 or 10.

  Returns:
    (query paths, gallery paths), in the reference loader's order.
  """
  _check(mode, shot)
  ids = sorted(ids)
  query = [path for pid in ids for camera in IR_CAMERAS
           for path in sorted(files.get((pid, camera), ()))]
  rng = random.Random(trial)
  gallery = []
  for pid in ids:
    for camera in GALLERY_CAMERAS[mode]:
      candidates = sorted(files.get((pid, camera), ()))
      if not candidates:
        continue
      if shot == 1:
        gallery.append(rng.choice(candidates))
      else:
        gallery.extend(rng.sample(candidates, min(shot, len(candidates))))
  return query, gallery


def split_from_paths(paths: Iterable[str], mode: str, trial: int, shot: int = 1
                     ) -> tuple[list[str], list[str]]:
  """`draw_split` over the test images `paths` ("cam<c>/<pid>/<file>"); the test identities are
  those the paths hold."""
  files: dict[tuple[int, int], list[str]] = {}
  for path in paths:
    camera, pid = parse_path(path)
    files.setdefault((pid, camera), []).append(path)
  return draw_split(files, {pid for pid, _ in files}, mode, trial, shot)


def test_split(root: str | os.PathLike, mode: str, trial: int, shot: int = 1
               ) -> tuple[list[str], list[str]]:
  """The query and gallery paths (relative to `root`) of a trial, read from a SYSU-MM01 download.

  Args:
    root: the download's root (holding cam1 .. cam6 and exp/).
    mode: "all" or "indoor" search.
    trial: 0..9 in the published protocol.
    shot: 1 (single-shot) or 10 (multi-shot).

  Returns:
    (query paths, gallery paths), in the reference loader's order.
  """
  _check(mode, shot)
  root = Path(root)
  ids = read_ids(root / ID_FILES["test"])
  files = {}
  for pid in ids:
    for camera in IR_CAMERAS + GALLERY_CAMERAS[mode]:
      folder = identity_folder(camera, pid)
      if (root / folder).is_dir():
        files[(pid, camera)] = [f"{folder}/{name}" for name in list_images(root / folder)]
  return draw_split(files, ids, mode, trial, shot)


test_split.__test__ = False  # A library function, not a pytest test, wherever it is imported.
