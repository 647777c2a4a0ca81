"""`manifest`: your own images, listed in a CSV or JSON-lines file (`config.data.manifest`).

One row per image, with the columns

  path      the image file, relative to the manifest's folder ("/" or "\\" separated)
  pid       the identity (integers, or any strings: then numbered in sorted order)
  camid     the camera (integers, or any strings: then numbered in sorted order)
  modality  any name ("rgb", "ir", "thermal", "depth", ...); the modalities are numbered in the
            order they first appear in the file (an "rgb" modality gets the RGB augmentations)
  tuple_id  optional: rows sharing one were captured together, pixel-aligned (integers or
            strings; blank or -1: unpaired). Training tuples are captures when every row has one,
            otherwise each modality's image of an identity is drawn independently.
  split     optional: "train" (the default when the column is absent), "test", or "query" and
            "gallery".

Evaluation follows Market-1501: with a `test` split every test image queries all the others
(query = gallery = test); with `query` and `gallery` splits the queries search the gallery. In
both a gallery image of the query's identity and camera is ignored, and the protocols are
"A->B" for every ordered pair of modalities and "all" (`evaluate.modality_protocols`).

Extra columns are ignored. CSV files need a header line; JSON-lines files (`.jsonl`,
`.ndjson`) hold one object per line. Everything wrong in the file (a missing column, a blank or
malformed value, an unknown split, a listed image that does not exist, a path listed twice in a
split) is reported in one `LayoutError`, with line numbers. The images are stored byte for byte
(JPEG, PNG, BMP, GIF) as by the downloaded benchmarks' builders, and decoded by the pipeline.

The prepared TFDS files live under DATA_DIR/manifest/<hash>/, the hash of the manifest's path and
contents: editing the manifest prepares it again; replacing an image file under an unchanged
manifest does not (delete that folder, or inspect with `python -m mmreid_jax.data.inspect`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets.manual import LayoutError, ManualBuilder, Record

REQUIRED_COLUMNS = ("path", "pid", "camid", "modality")
OPTIONAL_COLUMNS = ("tuple_id", "split")
SPLITS = ("train", "test", "query", "gallery")
_INTEGER = re.compile(r"[+-]?\d+")


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
  with open(path, newline="", encoding="utf-8-sig") as handle:
    reader = csv.DictReader(handle)
    if reader.fieldnames is None:
      return
    for row in reader:
      yield reader.line_num, {(k or "").strip(): v for k, v in row.items()}


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
  with open(path, encoding="utf-8-sig") as handle:
    for number, line in enumerate(handle, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as error:
        raise LayoutError(f"manifest {path}: line {number} is not JSON ({error.msg}); expected "
                          "one object per line, e.g. {\"path\": \"rgb/0001.jpg\", \"pid\": 1, "
                          "\"camid\": 1, \"modality\": \"rgb\"}") from None
      if not isinstance(row, dict):
        raise LayoutError(f"manifest {path}: line {number} holds a {type(row).__name__}; "
                          "expected one JSON object per line.")
      yield number, {str(k).strip(): ("" if v is None else v) for k, v in row.items()}


# Manifest readers by file suffix: path -> (line number, {column: value}) per row.
FORMATS: dict[str, Callable[[Path], Iterator[tuple[int, dict[str, str]]]]] = {
    ".csv": _csv_rows,
    ".jsonl": _jsonl_rows,
    ".ndjson": _jsonl_rows,
}


def _numbering(values: list[str]) -> dict[str, int]:
  """Integers as themselves when every value is an integer literal; otherwise the distinct
  values numbered in sorted order."""
  if all(_INTEGER.fullmatch(v) for v in values):
    return {v: int(v) for v in values}
  return {v: i for i, v in enumerate(sorted(set(values)))}


@dataclasses.dataclass(frozen=True)
class ManifestTable:
  """A parsed manifest.

  Attributes:
    modalities: the modality names, in order of first appearance.
    records: each split's records (paths relative to the manifest's folder).
    problems: what is wrong in the file, with line numbers (the rows concerned are left out).
  """

  modalities: tuple[str, ...]
  records: dict[str, list[Record]]
  problems: list[str]


def read_manifest(path: str | os.PathLike, check_files: bool = False) -> ManifestTable:
  """Parses a manifest.

  Args:
    path: the CSV or JSON-lines file.
    check_files: also report listed images that are not files.

  Raises:
    LayoutError: the file is missing, of an unknown type, or lacks a required column.
  """
  path = Path(path)
  if path.suffix.lower() not in FORMATS:
    raise LayoutError(f"manifest {path}: unknown file type {path.suffix!r}; expected one of "
                      f"{sorted(FORMATS)} (CSV with a header line, or JSON lines).")
  if not path.is_file():
    raise LayoutError(f"manifest {path} does not exist; expected a CSV or JSON-lines file with "
                      f"the columns {', '.join(REQUIRED_COLUMNS)} (and optionally "
                      f"{', '.join(OPTIONAL_COLUMNS)}); see mmreid_jax/data/datasets/manifest.py.")
  rows = list(FORMATS[path.suffix.lower()](path))
  columns = set().union(*(row.keys() for _, row in rows)) if rows else set()
  if path.suffix.lower() == ".csv":
    with open(path, newline="", encoding="utf-8-sig") as handle:
      header = next(csv.reader(handle), [])
    columns = {c.strip() for c in header}
  missing = [c for c in REQUIRED_COLUMNS if c not in columns]
  if missing:
    raise LayoutError(f"manifest {path}: missing columns {missing}; it has {sorted(columns)}. "
                      f"Expected {', '.join(REQUIRED_COLUMNS)} (and optionally "
                      f"{', '.join(OPTIONAL_COLUMNS)}).")
  root = path.parent
  problems: list[str] = []
  parsed = []
  modalities: list[str] = []
  for number, row in rows:
    values = {k: str(v).strip() for k, v in row.items()}
    blank = [c for c in REQUIRED_COLUMNS if not values.get(c)]
    if blank:
      problems.append(f"line {number}: blank {', '.join(blank)}")
      continue
    relative = values["path"].replace("\\", "/")
    if relative.startswith("/") or re.match(r"^[A-Za-z]:/", relative):
      problems.append(f"line {number}: path {values['path']!r} is absolute; expected a path "
                      "relative to the manifest's folder")
      continue
    relative = posixpath.normpath(relative)
    split = values.get("split", "train").lower() if "split" in columns else "train"
    if split not in SPLITS:
      problems.append(f"line {number}: split {values.get('split')!r}; expected one of {SPLITS}")
      continue
    if values["modality"] not in modalities:
      modalities.append(values["modality"])
    if check_files and not (root / relative).is_file():
      problems.append(f"line {number}: missing image {relative}")
      continue
    tuple_id = values.get("tuple_id", "")
    parsed.append((number, split, relative, values["pid"], values["camid"], values["modality"],
                   "" if tuple_id in ("", "-1") else tuple_id))
  pids = _numbering([p[3] for p in parsed])
  camids = _numbering([p[4] for p in parsed])
  tuple_ids = _numbering([p[6] for p in parsed if p[6]])
  records: dict[str, list[Record]] = {}
  seen: dict[tuple[str, str], int] = {}
  for number, split, relative, pid, camid, modality, tuple_id in parsed:
    if (split, relative) in seen:
      problems.append(f"line {number}: {relative} is listed again in split {split!r} (first on "
                      f"line {seen[(split, relative)]})")
      continue
    seen[(split, relative)] = number
    records.setdefault(split, []).append(Record(
        relative, pids[pid], camids[camid], modalities.index(modality),
        tuple_ids[tuple_id] if tuple_id else -1))
  if "test" in records and ("query" in records or "gallery" in records):
    problems.append("splits 'test' and 'query'/'gallery' together; expected either a 'test' "
                    "split (query = gallery = test) or 'query' and 'gallery' splits")
  if ("query" in records) != ("gallery" in records):
    problems.append(f"a {'query' if 'query' in records else 'gallery'} split without a "
                    f"{'gallery' if 'query' in records else 'query'} split")
  if not parsed and not problems:
    problems.append("no rows")
  return ManifestTable(tuple(modalities), records, problems)


def manifest_id(path: str | os.PathLike) -> str:
  """The builder config name of a manifest: a hash of its absolute path and its contents."""
  path = Path(path).resolve()
  digest = hashlib.sha256(str(path).encode() + b"\0" + path.read_bytes())
  return "m" + digest.hexdigest()[:16]


class Manifest(ManualBuilder):
  """Images listed in a manifest file (CSV or JSON lines); see the module docstring.

  Args:
    manifest: the manifest's path (`config.data.manifest`).
    **kwargs: `data_dir` and other `tfds.core.DatasetBuilder` arguments.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  # `config.data` keys that `datasets.builder_from_config` passes to the constructor.
  BUILDER_OPTIONS = ("manifest",)
  DOWNLOAD = ("Your own data: a CSV or JSON-lines manifest (config.data.manifest), see "
              "mmreid_jax/data/datasets/manifest.py.")
  LAYOUT = "\n".join([
      "  <manifest>.csv | .jsonl   columns path, pid, camid, modality [, tuple_id, split]",
      "  <paths in the manifest>   image files, relative to the manifest's folder",
  ])

  def __init__(self, *, manifest: str | os.PathLike | None = None, config=None, **kwargs):
    if not manifest:
      raise LayoutError("The manifest dataset needs config.data.manifest, the path of a CSV or "
                        "JSON-lines file (configs/manifest.py:/path/to/manifest.csv).")
    if config:
      raise ValueError(f"The manifest dataset takes no config name (got {config!r}); set "
                       "config.data.name='manifest' and config.data.manifest=PATH.")
    self.manifest = Path(manifest).expanduser().resolve()
    table = read_manifest(self.manifest)  # raises on a missing file or column
    self.MODALITIES = table.modalities
    self._splits = tuple(table.records)
    builder_config = tfds.core.BuilderConfig(
        name=manifest_id(self.manifest), description=f"Manifest {self.manifest}.")
    super().__init__(config=builder_config, **kwargs)

  @property
  def EVAL_SPLITS(self) -> tuple[str, str]:  # noqa: N802 (the attribute name of ManualBuilder)
    """("query", "gallery") or ("test", "test"), by the manifest's splits.

    Raises:
      LayoutError: the manifest has neither.
    """
    if "query" in self._splits:
      return ("query", "gallery")
    if "test" in self._splits:
      return ("test", "test")
    raise LayoutError(f"manifest {self.manifest} has no evaluation split (splits: "
                      f"{list(self._splits)}); give rows the split 'test', or 'query' and "
                      "'gallery'.")

  def manual_root(self, manual_dir: str | os.PathLike | None) -> Path:
    """The manifest's folder (the paths are relative to it); `manual_dir` is not used."""
    del manual_dir
    return self.manifest.parent

  def required_paths(self) -> list[str]:
    return [self.manifest.name]

  def read_records(self, root: Path) -> tuple[dict[str, list[Record]], list[str]]:
    table = read_manifest(root / self.manifest.name, check_files=True)
    return table.records, [f"{self.manifest.name} {p}" for p in table.problems]
