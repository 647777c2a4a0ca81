r"""Checks how a dataset is read before anyone trains on it.

  python -m mmreid_jax.data.inspect --config configs/sysu_mm01.py \
      --config.data.manual_dir=/data/SYSU-MM01
  python -m mmreid_jax.data.inspect --config configs/manifest.py:/data/mine/manifest.csv
  python -m mmreid_jax.data.inspect --config configs/synthetic.py --output /tmp/sheet.png

prepares the config's dataset as training would (checking a download's layout first), then prints

- images per split, modality and camera, and identities per split (with identities shared
  between training and test splits, and query identities the gallery lacks, flagged);
- per split, the identities lacking a modality;
- per split and modality the image sizes, modes (PIL's: RGB, L, P, ...) and formats, the images
  that cannot be decoded, and RGB images whose three channels are equal (a grey image where a
  colour one is expected); for downloaded sets and manifests, the listed images that preparation
  skipped as unreadable (with the decoder's reason);
- each evaluation protocol's queries and gallery images per trial, and for the official sets
  the published sizes (`EXPECTED`: SYSU-MM01 all-search 3,803 queries and 301 gallery images per
  trial, indoor-search 112; RegDB 2,060 each way; their training splits), flagging every
  mismatch;

and writes a contact sheet (PNG) of random samples, one row per modality: the columns are
captures for paired sets and identities for unpaired ones, so a glance shows whether the
modalities are paired, labelled and oriented correctly. Lines that need attention start with
"!!"; the last line counts them.
"""

from __future__ import annotations

import collections
import io
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run as a program only, so that importing this
  module beside `mmreid_jax.main` defines no second --config)."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:preset]).",
                                  lock_config=True)
  flags.DEFINE_string("output", None, "Contact sheet PNG to write (default: "
                      "<dataset>_contact_sheet.png in the current folder).")
  flags.DEFINE_integer("samples", 8, "Columns of the contact sheet.")
  flags.DEFINE_integer("seed", 0, "Seed of the contact sheet's samples.")
  flags.DEFINE_integer("max_images", 0, "Decode at most this many images per split and "
                       "modality (a seeded random subset; 0: all).")
  flags.mark_flags_as_required(["config"])

WARNING = "!!"
# Splits in the order they are reported; others follow in name order.
SPLIT_ORDER = ("train", "query", "gallery", "test")
# Published sizes of the official sets: per dataset, {protocol: (queries, gallery per trial)}
# and {split: {"identities": n, modality name: images}}.
EXPECTED: dict[str, dict[str, dict[str, Any]]] = {
    "sysu_mm01": {
        "protocols": {"sysu/all-search/single-shot": (3803, 301),
                      "sysu/indoor-search/single-shot": (3803, 112)},
        "splits": {"train": {"identities": 395, "rgb": 22258, "ir": 11909},
                   "query": {"identities": 96, "ir": 3803}},
    },
    "regdb": {
        "protocols": {"regdb/visible->thermal": (2060, 2060),
                      "regdb/thermal->visible": (2060, 2060)},
        "splits": {"train": {"identities": 206, "rgb": 2060, "ir": 2060},
                   "test": {"identities": 206, "rgb": 2060, "ir": 2060}},
    },
}
CELL = (64, 128)  # contact-sheet cell (width, height)
LABEL = 14  # pixels of a text line


def ordered_splits(names: Iterable[str]) -> list[str]:
  """`names` with train, query, gallery and test first."""
  names = list(names)
  return [s for s in SPLIT_ORDER if s in names] + sorted(s for s in names if s not in SPLIT_ORDER)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  """A fixed-width text table, first column left-aligned, the others right-aligned."""
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for n, row in enumerate(cells):
    lines.append(("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths)))).rstrip())
    if n == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
  return lines


def count_lines(splits: dict[str, Any]) -> list[str]:
  """Images per split, modality and camera; identities per split and their overlaps."""
  lines = ["Images per split, modality and camera:"]
  cameras = sorted({int(c) for s in splits.values() for c in np.unique(s.camids)})
  rows = []
  for name, image_set in splits.items():
    for m, modality in enumerate(image_set.modality_names):
      rows_m = image_set.modalities == m
      if not rows_m.any():
        continue
      per_camera = [int(np.sum(rows_m & (image_set.camids == c))) for c in cameras]
      rows.append([name, modality] + [n or "." for n in per_camera] + [int(rows_m.sum())])
  lines += table(["split", "modality"] + [f"cam {c}" for c in cameras] + ["images"], rows)
  lines.append("Identities per split:")
  ids = {name: set(np.unique(s.pids).tolist()) for name, s in splits.items()}
  lines += table(["split", "identities", "images", "captures"],
                 [[name, len(ids[name]), len(s),
                   len(np.unique(s.tuple_ids[s.tuple_ids >= 0])) if np.any(s.tuple_ids >= 0)
                   else "unpaired"] for name, s in splits.items()])
  for other in [s for s in splits if s != "train"]:
    shared = ids.get("train", set()) & ids[other]
    if shared:
      lines.append(f"{WARNING} {len(shared)} identities are in both train and {other} "
                   f"(e.g. {sorted(shared)[:10]}): test identities should be unseen.")
  if "query" in ids and "gallery" in ids and ids["query"] - ids["gallery"]:
    lacking = sorted(ids["query"] - ids["gallery"])
    lines.append(f"{WARNING} {len(lacking)} query identities have no gallery image "
                 f"(e.g. {lacking[:10]}).")
  return lines


def missing_modality_lines(splits: dict[str, Any]) -> list[str]:
  """Per split, the identities without an image of some modality."""
  lines = ["Identities lacking a modality:"]
  for name, image_set in splits.items():
    names = image_set.modality_names
    present = {m: set(np.unique(image_set.pids[image_set.modalities == m]).tolist())
               for m in range(len(names))}
    everyone = set(np.unique(image_set.pids).tolist())
    problems = []
    for m, modality in enumerate(names):
      lacking = sorted(everyone - present[m])
      if lacking and present[m]:
        problems.append(f"{len(lacking)} of {len(everyone)} lack {modality} "
                        f"(e.g. {lacking[:10]})")
    held = [names[m] for m in range(len(names)) if present[m]]
    lines.append(f"  {name}: " + ("; ".join(problems) if problems else
                                  f"none (every identity has {', '.join(held)})"))
  return lines


def image_stats(images: Sequence[bytes]) -> dict[str, Any]:
  """Decodes every image with PIL: sizes (w x h), modes, formats, unreadable indices and how
  many colour images have three equal channels."""
  sizes, modes, formats = collections.Counter(), collections.Counter(), collections.Counter()
  unreadable, grey_rgb = [], 0
  for index, data in enumerate(images):
    try:
      with Image.open(io.BytesIO(data)) as image:
        image.load()
        sizes[f"{image.width}x{image.height}"] += 1
        modes[image.mode] += 1
        formats[image.format or "?"] += 1
        if image.mode == "RGB":
          pixels = np.asarray(image)
          grey_rgb += bool(np.array_equal(pixels[..., 0], pixels[..., 1])
                           and np.array_equal(pixels[..., 1], pixels[..., 2]))
    except Exception:  # noqa: BLE001 (any decoding failure is what is reported)
      unreadable.append(index)
  return {"sizes": sizes, "modes": modes, "formats": formats, "unreadable": unreadable,
          "grey_rgb": grey_rgb}


def _top(counter: collections.Counter, limit: int = 4) -> str:
  items = [f"{key} ({count})" for key, count in counter.most_common(limit)]
  if len(counter) > limit:
    items.append(f"... {len(counter) - limit} more")
  return ", ".join(items) or "-"


def image_lines(splits: dict[str, Any], max_images: int, seed: int) -> list[str]:
  """Sizes, modes, formats, unreadable and grey-looking colour images per split and modality."""
  lines = ["Image sizes (w x h), modes and formats" + (
      f" (a random {max_images} per split and modality)" if max_images else "") + ":"]
  rng = np.random.default_rng(seed)
  for name, image_set in splits.items():
    for m, modality in enumerate(image_set.modality_names):
      rows = np.flatnonzero(image_set.modalities == m)
      if not len(rows):
        continue
      if max_images and len(rows) > max_images:
        rows = np.sort(rng.choice(rows, max_images, replace=False))
      stats = image_stats(image_set.images[rows])
      lines.append(f"  {name}/{modality}: sizes {_top(stats['sizes'])}; modes "
                   f"{_top(stats['modes'])}; formats {_top(stats['formats'])}")
      if stats["unreadable"]:
        paths = [str(image_set.paths[rows[i]]) for i in stats["unreadable"][:10]]
        lines.append(f"{WARNING} {name}/{modality}: {len(stats['unreadable'])} unreadable "
                     f"images, e.g. {paths}")
      if modality == "rgb" and stats["grey_rgb"]:
        lines.append(f"{WARNING} {name}/{modality}: {stats['grey_rgb']} of {len(rows)} colour "
                     "images have three equal channels (grey images in the RGB modality?)")
  return lines


def skipped_lines(builder, manual_dir: str | None, splits: dict[str, Any]) -> list[str]:
  """The images a downloaded set's layout (or a manifest) lists that the prepared splits lack:
  preparation skips unreadable ones (`ManualBuilder.check_images`)."""
  from mmreid_jax.data import datasets  # pylint: disable=import-outside-toplevel

  root = builder.manual_root(manual_dir)
  try:
    listed = builder.scan(root)
  except datasets.LayoutError as error:
    return [f"Listed images: not checked, {root} cannot be read again "
            f"({str(error).splitlines()[0]})."]
  lines = []
  for split, records in listed.items():
    read = set(splits[split].paths.tolist()) if split in splits else set()
    skipped = [r.path for r in records if r.path not in read]
    if not skipped:
      continue
    reasons = []
    for path in skipped[:10]:
      try:
        with Image.open(root / path) as image:
          image.load()
        reasons.append(f"{path} (skipped with its capture)")
      except Exception as error:  # noqa: BLE001 (the decoder's reason is the report)
        reasons.append(f"{path} ({type(error).__name__}: {error})")
    lines.append(f"{WARNING} {split}: {len(skipped)} listed images were not read (unreadable, "
                 f"skipped when the set was prepared): {'; '.join(reasons)}")
  return lines or [f"Listed images: all {sum(len(r) for r in listed.values())} were read."]


def protocol_lines(dataset: str, query, gallery) -> list[str]:
  """Each evaluation protocol's size, and the published sizes of the official sets."""
  from mmreid_jax import evaluate  # pylint: disable=import-outside-toplevel

  if dataset not in evaluate.PROTOCOLS:
    return [f"Evaluation protocols: none for {dataset!r}."]
  lines = ["Evaluation protocols (queries; gallery images per trial; queries whose identity is "
           "not in the trial's gallery):"]
  rows = []
  expected = EXPECTED.get(dataset, {}).get("protocols", {})
  mismatches = []
  for protocol in evaluate.PROTOCOLS[dataset](query, gallery):
    sizes = sorted({len(g) for g in protocol.gallery_trials})
    q_pids = query.pids[protocol.query_rows]
    unmatched = max(int(np.sum(~np.isin(q_pids, gallery.pids[g])))
                    for g in protocol.gallery_trials)
    gallery_text = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}..{sizes[-1]}"
    want = expected.get(protocol.name)
    rows.append([protocol.name, len(protocol.query_rows), gallery_text,
                 len(protocol.gallery_trials), unmatched]
                + ([f"{want[0]}; {want[1]}" if want else "-"] if expected else []))
    if want and (len(protocol.query_rows), sizes) != (want[0], [want[1]]):
      mismatches.append(f"{WARNING} {protocol.name}: {len(protocol.query_rows)} queries and "
                        f"{gallery_text} gallery images per trial; the official protocol has "
                        f"{want[0]} and {want[1]}.")
  lines += table(["protocol", "queries", "gallery", "trials", "no match"]
                 + (["published"] if expected else []), rows)
  return lines + mismatches


def expected_split_lines(dataset: str, splits: dict[str, Any]) -> list[str]:
  """The official sets' published split sizes against the ones read."""
  expected = EXPECTED.get(dataset, {}).get("splits", {})
  lines = []
  for split, counts in expected.items():
    if split not in splits:
      lines.append(f"{WARNING} the official {dataset} has a {split} split; none was read.")
      continue
    image_set = splits[split]
    for key, want in counts.items():
      if key == "identities":
        got = len(np.unique(image_set.pids))
      else:
        names = image_set.modality_names
        got = int(np.sum(image_set.modalities == names.index(key))) if key in names else 0
      if got != want:
        lines.append(f"{WARNING} {split}: {got} {key if key == 'identities' else key + ' images'}"
                     f"; the official {dataset} has {want}.")
  if expected and not lines:
    lines.append(f"Split sizes: as published for {dataset}.")
  return lines


def _cell(data: bytes | None, caption: str) -> Image.Image:
  """One contact-sheet cell: the image scaled to CELL (grey with "missing" when None), with a
  caption line under it."""
  width, height = CELL
  cell = Image.new("RGB", (width, height + LABEL), (255, 255, 255))
  if data is None:
    image = Image.new("RGB", CELL, (200, 200, 200))
    ImageDraw.Draw(image).text((4, height // 2 - 6), "missing", fill=(90, 90, 90))
  else:
    try:
      image = Image.open(io.BytesIO(data)).convert("RGB").resize(CELL, Image.BILINEAR)
    except Exception:  # noqa: BLE001
      image = Image.new("RGB", CELL, (255, 0, 0))
      ImageDraw.Draw(image).text((4, height // 2 - 6), "unreadable", fill=(255, 255, 255))
  cell.paste(image, (0, 0))
  ImageDraw.Draw(cell).text((2, height + 1), caption[:12], fill=(0, 0, 0))
  return cell


def contact_sheet(image_set, samples: int, seed: int, title: str) -> Image.Image:
  """Random samples of `image_set`, one row per modality.

  Paired sets (every row has a `tuple_id`): each column is one capture, its modalities one under
  another. Unpaired sets: each column is one identity, with a random image of each modality.
  """
  rng = np.random.default_rng(seed)
  names = image_set.modality_names
  paired = bool(len(image_set)) and bool(np.all(image_set.tuple_ids >= 0))
  keys = np.unique(image_set.tuple_ids if paired else image_set.pids)
  chosen = np.sort(rng.choice(keys, min(samples, len(keys)), replace=False)) if len(keys) else []
  columns = []
  for key in chosen:
    rows = np.flatnonzero((image_set.tuple_ids if paired else image_set.pids) == key)
    column = []
    for m in range(len(names)):
      candidates = rows[image_set.modalities[rows] == m]
      row = int(rng.choice(candidates)) if len(candidates) else None
      caption = (f"id {image_set.pids[row]} c{image_set.camids[row]}" if row is not None
                 else "")
      column.append(_cell(None if row is None else image_set.images[row], caption))
    columns.append(column)
  label_width = max(60, 7 * max((len(n) for n in names), default=0) + 8)
  cell_w, cell_h = CELL[0], CELL[1] + LABEL
  sheet = Image.new("RGB", (label_width + max(len(columns), 1) * (cell_w + 4),
                            LABEL + 4 + len(names) * (cell_h + 4)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  draw.text((2, 2), title, fill=(0, 0, 0))
  for m, name in enumerate(names):
    top = LABEL + 4 + m * (cell_h + 4)
    draw.text((2, top + CELL[1] // 2 - 6), name, fill=(0, 0, 0))
    for c, column in enumerate(columns):
      sheet.paste(column[m], (label_width + c * (cell_w + 4), top))
  return sheet


def inspect(config, output: str | None = None, samples: int = 8, seed: int = 0,
            max_images: int = 0) -> tuple[list[str], str]:
  """Prepares and reads the dataset of `config`; returns the report's lines and the contact
  sheet's path.

  Raises:
    LayoutError: a downloaded set or manifest that does not fit its layout.
  """
  from mmreid_jax.data import datasets  # pylint: disable=import-outside-toplevel

  builder = datasets.builder_from_config(config.data)
  datasets.prepare(builder, config.data.get("manual_dir"))
  dataset = builder.name
  splits = {name: datasets.load_split(builder, name)
            for name in ordered_splits(builder.info.splits)}
  names = builder.MODALITIES
  lines = [f"Dataset {builder.info.full_name} ({builder.data_dir}); modalities "
           f"{', '.join(names)}; splits {', '.join(splits)}.", ""]
  lines += count_lines(splits) + [""]
  lines += missing_modality_lines(splits) + [""]
  lines += image_lines(splits, max_images, seed)
  if isinstance(builder, datasets.ManualBuilder):
    lines += skipped_lines(builder, config.data.get("manual_dir"), splits)
  lines.append("")
  try:
    query_split, gallery_split = datasets.eval_splits(builder)
  except datasets.LayoutError as error:
    lines.append(f"{WARNING} {error}")
  else:
    if query_split in splits and gallery_split in splits:
      lines += protocol_lines(dataset, splits[query_split], splits[gallery_split])
    else:
      lines.append(f"{WARNING} evaluation reads splits {query_split!r} and {gallery_split!r}; "
                   f"the dataset has {list(splits)}.")
  lines += expected_split_lines(dataset, splits)
  sheet_split = "train" if "train" in splits else next(iter(splits))
  path = output or f"{builder.info.full_name.split('/')[0]}_contact_sheet.png"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  contact_sheet(splits[sheet_split], samples, seed,
                f"{dataset} {sheet_split}: rows = modalities").save(path)
  warnings = sum(line.startswith(WARNING) for line in lines)
  lines += ["", f"Contact sheet ({sheet_split} split): {path}",
            f"{warnings} problem{'s' if warnings != 1 else ''} flagged ({WARNING})."]
  return lines, path


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  from mmreid_jax.data import datasets  # pylint: disable=import-outside-toplevel

  try:
    lines, _ = inspect(FLAGS.config, FLAGS.output, FLAGS.samples, FLAGS.seed, FLAGS.max_images)
  except datasets.LayoutError as error:
    print(error, file=sys.stderr)
    sys.exit(1)
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
