"""Pictures of an evaluation: what the model learned (DESIGN.md section 6).

Pure functions: each takes arrays and returns a matplotlib `Figure` (on its own Agg canvas, no
pyplot state, so nothing here needs a display or changes the user's backend) or writes files.
`evaluate.write_pictures` gathers the arrays of an evaluation and writes, under WORKDIR/eval/:

  cmc.png                CMC curves, Rank-1 to Rank-20, of every protocol (one line each);
  grid_<protocol>.png    ranked-gallery grids: sampled queries, each followed by its first
                         gallery images as the protocol ranks them, framed green (the query's
                         identity) or red (another), the modality written on each image; for
                         fused retrieval ("fused/all", "rgbnt201/all") every tile is a capture,
                         its modalities side by side;
  grid_<protocol>.json   what each grid shows: rows, identities, cameras, whether each gallery
                         image is correct, and every tile's pixel box in the PNG;
  modal_weights.png      histograms of the cross-modal attention's modality weights, per
                         modality, over the test captures (models with the attention only);
  modal_weights_by_condition.png
                         on a set with scene conditions: the mean modality weights and each
                         modality's share of the fused embedding, per condition;
  embedding_map.png      a 2-D PCA (or t-SNE) map of the embeddings of sampled identities,
                         colour by identity, marker by modality;
  index.html             every picture and the metrics table, readable offline.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Frame colours (RGB) of the ranked-gallery grids: a gallery image of the query's identity, one
# of another identity, and the query itself.
CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)
QUERY_COLOR = (40, 90, 220)
# Markers of the embedding map, one per modality (in the dataset's modality order).
MODALITY_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
# The rates of the metrics table, with their column names.
TABLE_RATES = (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"),
               ("rank20", "Rank-20"), ("mAP", "mAP"), ("mINP", "mINP"))
EMBEDDING_MAPS = ("pca", "tsne")


# ---------------------------------------------------------------------------- figures to pixels


def figure_pixels(fig: Figure) -> np.ndarray:
  """Draws `fig` on an Agg canvas; returns its pixels, (H, W, 3) uint8."""
  canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Figure, path: str | os.PathLike) -> np.ndarray:
  """Writes `fig` to the PNG `path` (atomically); returns the pixels written, (H, W, 3) uint8,
  the same picture for TensorBoard."""
  pixels = figure_pixels(fig)
  path = os.fspath(path)
  Image.fromarray(pixels).save(path + ".tmp", format="PNG")
  os.replace(path + ".tmp", path)
  return pixels


def file_stem(name: str) -> str:
  """A protocol name as part of a file name: "ir->rgb" -> "ir_to_rgb",
  "sysu/all-search/single-shot" -> "sysu_all-search_single-shot"."""
  stem = name.replace("->", "_to_").replace("/", "_").replace(" ", "_")
  return "".join(c if c.isalnum() or c in "_-+." else "_" for c in stem)


# ------------------------------------------------------------------------------------------ CMC


def cmc_curves(results: Mapping[str, Sequence[Any]], max_rank: int = 20
               ) -> dict[str, np.ndarray]:
  """Each protocol's CMC curve, the mean over its trials.

  Args:
    results: {protocol: one `metrics.RankingResult` (anything with a `cmc` array) per trial}.
    max_rank: ranks kept (the curves are cut to it).

  Returns:
    {protocol: (min(max_rank, len(cmc)),) float64}, cmc[k - 1] the share of queries whose first
    correct match is within the first k.
  """
  return {name: np.mean([np.asarray(r.cmc, np.float64)[:max_rank] for r in trials], axis=0)
          for name, trials in results.items()}


def cmc_figure(curves: Mapping[str, np.ndarray], title: str = "") -> Figure:
  """One line per protocol: CMC (percent) against the rank, 1 to len(curve)."""
  fig = Figure(figsize=(7.5, 4.8), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  max_rank = 1
  for name, curve in curves.items():
    ranks = np.arange(1, len(curve) + 1)
    max_rank = max(max_rank, len(curve))
    ax.plot(ranks, 100 * np.asarray(curve), marker="o", markersize=2.5, linewidth=1.3,
            label=f"{name} (R1 {100 * curve[0]:.1f})")
  ax.set_xlim(1, max_rank)
  ax.set_ylim(0, 101)
  ax.set_xticks([1] + list(range(5, max_rank + 1, 5)))
  ax.set_xlabel("rank")
  ax.set_ylabel("matched within the first k (%)")
  ax.set_title(title or "CMC")
  ax.grid(True, alpha=0.3)
  columns = 1 if len(curves) <= 12 else 2
  ax.legend(fontsize=7 if len(curves) <= 12 else 5, loc="center left", bbox_to_anchor=(1.01, 0.5),
            ncol=columns, frameon=False)
  fig.subplots_adjust(left=0.09, right=0.7 if columns == 1 else 0.55, bottom=0.11, top=0.92)
  return fig


# ---------------------------------------------------------------------- ranked-gallery grids


def frame_color(correct: bool | None) -> tuple[int, int, int]:
  """The frame of a grid tile: green for a correct identity, red for a wrong one, blue for the
  query (None)."""
  if correct is None:
    return QUERY_COLOR
  return CORRECT_COLOR if correct else WRONG_COLOR


def frame_colors(query_pid: int, gallery_pids: np.ndarray) -> np.ndarray:
  """(K,) gallery identities -> (K, 3) uint8 frame colours, green where the identity is the
  query's and red elsewhere."""
  correct = np.asarray(gallery_pids) == query_pid
  return np.where(correct[:, None], np.array(CORRECT_COLOR, np.uint8),
                  np.array(WRONG_COLOR, np.uint8)).astype(np.uint8)


def border_width(height: int, width: int) -> int:
  """Frame width in image pixels: a twelfth of the shorter side, at least 2."""
  return max(2, int(round(min(height, width) / 12)))


def framed(image: np.ndarray, color: Sequence[int], border: int) -> np.ndarray:
  """(H, W, 3) uint8 inside a frame of `color`: (H + 2 * border, W + 2 * border, 3) uint8."""
  image = np.asarray(image, np.uint8)
  height, width = image.shape[:2]
  out = np.empty((height + 2 * border, width + 2 * border, 3), np.uint8)
  out[...] = np.asarray(color, np.uint8)
  out[border:border + height, border:border + width] = image[..., :3]
  return out


@dataclasses.dataclass(frozen=True)
class GridTile:
  """One image of a ranked-gallery grid.

  Attributes:
    image: (H, W, 3) uint8.
    label: written on the image (its modality).
    caption: above the image (rank, identity, camera, ...); may hold newlines.
    correct: True / False for a gallery image of the query's identity or another; None for the
      query.
  """

  image: np.ndarray
  label: str
  caption: str
  correct: bool | None


def grid_figure(rows: Sequence[Sequence[GridTile | None]], title: str = "", dpi: int = 100
                ) -> tuple[Figure, list[list[list[int] | None]]]:
  """A grid of ranked galleries: row i shows `rows[i][0]` (the query) then its gallery images.

  The tiles are pasted into one pixel array, each image inside its frame (`frame_color`,
  `border_width` of the image size) and enlarged by an integer factor (nearest neighbour) to at
  least 80 pixels wide; the array fills the figure at one figure pixel per array pixel, so the
  frames' colours and positions in the PNG are exact. Matplotlib writes the label at the bottom
  of each image and the caption above it. A None tile (a gallery shorter than the others) stays
  empty.

  Args:
    rows: tiles per row, the query first; every image of one size (H, W, 3).
    title: the figure's title.
    dpi: pixels per inch of the figure (the text size scales with it).

  Returns:
    The figure and the pixel box [left, top, right, bottom] (from the top-left corner of the
    picture `figure_pixels` / `save_png` give, frame included, right and bottom exclusive) of
    every tile, None for empty ones, in the layout of `rows`.
  """
  first = next(t for row in rows for t in row if t is not None)
  height, width = first.image.shape[:2]
  border = border_width(height, width)
  scale = max(1, -(-80 // (width + 2 * border)))
  tile_h, tile_w = (height + 2 * border) * scale, (width + 2 * border) * scale
  # Columns up to the last tile of the longest row (trailing empty tiles take no room).
  columns = max(max((c + 1 for c, t in enumerate(row) if t is not None), default=1)
                for row in rows)
  margin, gap, query_gap, row_gap = 15, 8, 30, 12
  caption_px = int(round(0.46 * dpi))  # three lines of 6.5-point text
  title_px = int(round(0.45 * dpi)) if title else margin
  row_px = caption_px + tile_h + row_gap
  size = (title_px + len(rows) * row_px + margin - row_gap,
          2 * margin + columns * tile_w + max(columns - 2, 0) * gap
          + (query_gap if columns > 1 else 0))
  pixels = np.full(size + (3,), 255, np.uint8)
  fig = Figure(figsize=(size[1] / dpi, size[0] / dpi), dpi=dpi)
  FigureCanvasAgg(fig)
  boxes: list[list[list[int] | None]] = []
  texts = []
  for r, row in enumerate(rows):
    top = title_px + r * row_px + caption_px
    box_row: list[list[int] | None] = []
    for c, tile in enumerate(row[:columns]):
      if tile is None:
        box_row.append(None)
        continue
      left = margin + c * tile_w + (query_gap + (c - 1) * gap if c else 0)
      framed_image = framed(tile.image, frame_color(tile.correct), border)
      pixels[top:top + tile_h, left:left + tile_w] = np.repeat(
          np.repeat(framed_image, scale, axis=0), scale, axis=1)
      box_row.append([left, top, left + tile_w, top + tile_h])
      center = (left + tile_w / 2) / size[1]
      texts.append(((center, 1 - (top - 3) / size[0]), tile.caption, {
          "fontsize": 6.5, "linespacing": 1.1, "color": "black" if tile.correct is None else (
              "darkgreen" if tile.correct else "darkred")}))
      texts.append(((center, 1 - (top + tile_h - border * scale - 3) / size[0]), tile.label, {
          "fontsize": 6, "color": "white", "bbox": {"boxstyle": "square,pad=0.15",
                                                    "facecolor": "black", "alpha": 0.55,
                                                    "linewidth": 0}}))
    boxes.append(box_row)
  ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
  ax.imshow(pixels, interpolation="nearest", aspect="auto", extent=(0, size[1], size[0], 0))
  ax.set_axis_off()
  for (x, y), text, style in texts:
    fig.text(x, y, text, ha="center", va="bottom", **style)
  if title:
    fig.text(0.5, 1 - 12 / size[0], title, ha="center", va="top", fontsize=10)
  return fig, boxes


# ---------------------------------------------------------------------------- modality weights


def modal_weight_figure(weights: Mapping[str, np.ndarray], title: str = "",
                        bins: int = 20) -> Figure:
  """One histogram per modality of the attention's modality weights A_m(m) in [0, 1].

  Args:
    weights: {modality: (N_m,) weights of the captures where it is present}.
    title: the figure's title.
    bins: bins over [0, 1].
  """
  names = list(weights)
  fig = Figure(figsize=(3.0 * max(len(names), 1) + 0.4, 3.2), dpi=100)
  FigureCanvasAgg(fig)
  edges = np.linspace(0.0, 1.0, bins + 1)
  for i, name in enumerate(names):
    ax = fig.add_subplot(1, len(names), i + 1)
    values = np.asarray(weights[name], np.float64)
    ax.hist(values, bins=edges, color=f"C{i}", alpha=0.85)
    if len(values):
      ax.axvline(values.mean(), color="black", linewidth=1)
    ax.axvline(1.0 / len(names), color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"weight of {name}")
    ax.set_title(f"{name}: mean {values.mean():.3f}, n = {len(values)}" if len(values)
                 else f"{name}: none", fontsize=9)
    if i == 0:
      ax.set_ylabel("captures")
  fig.suptitle(title or "Cross-modal attention: modality weights (dashed: 1 / M)", fontsize=10)
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.8, wspace=0.3)
  return fig


def condition_reliance_figure(weights: Mapping[str, Mapping[str, float]],
                              shares: Mapping[str, Mapping[str, float]], title: str = ""
                              ) -> Figure:
  """Grouped bars per scene condition: the attention's mean modality weights and each
  modality's share of the fused embedding (one panel each; a panel without values is left out).

  Args:
    weights: {condition: {modality: mean weight}} (`scene_analysis`), or empty.
    shares: {condition: {modality: mean share}}, or empty.
    title: the figure's title.
  """
  panels = [(label, values) for label, values in (
      ("attention weight A_m(m)", weights), ("share of the fused embedding", shares)) if values]
  fig = Figure(figsize=(6.0 * max(len(panels), 1) + 0.4, 3.6), dpi=100)
  FigureCanvasAgg(fig)
  for i, (label, values) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    conditions = list(values)
    names = list(next(iter(values.values())))
    bar = 0.8 / len(names)
    positions = np.arange(len(conditions))
    for m, name in enumerate(names):
      ax.bar(positions + (m - (len(names) - 1) / 2) * bar,
             [values[c][name] for c in conditions], bar, label=name, color=f"C{m}")
    ax.axhline(1.0 / len(names), color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(positions)
    ax.set_xticklabels([c.replace("_", "\n") for c in conditions], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(label)
    if i == 0:
      ax.legend(fontsize=8, loc="upper right")
  fig.suptitle(title or "Modalities per scene condition (dashed: 1 / M)", fontsize=10)
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.18, top=0.86, wspace=0.2)
  return fig


# ------------------------------------------------------------------------------- embedding map


def sample_identities(pids: np.ndarray, max_identities: int, seed: int) -> np.ndarray:
  """A seeded sample of at most `max_identities` of the distinct `pids`, sorted."""
  distinct = np.unique(pids)
  if len(distinct) <= max_identities:
    return distinct
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(distinct, size=max_identities, replace=False))


def project_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
  """(N, E) -> (N, 2) by scikit-learn's PCA or t-SNE ("pca" or "tsne", seeded)."""
  features = np.asarray(features, np.float64)
  if method == "pca":
    from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel

    if len(features) < 2:
      return np.zeros((len(features), 2))
    components = min(2, features.shape[1], len(features))
    coords = PCA(n_components=components, random_state=seed).fit_transform(features)
    return np.pad(coords, ((0, 0), (0, 2 - components)))
  if method == "tsne":
    from sklearn.manifold import TSNE  # pylint: disable=import-outside-toplevel

    if len(features) < 3:
      return project_2d(features, "pca", seed)
    perplexity = float(min(30.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                ).fit_transform(features)
  raise ValueError(f"config.eval.embedding_map={method!r}; expected one of {EMBEDDING_MAPS}.")


def embedding_map_figure(coords: np.ndarray, pids: np.ndarray, modalities: np.ndarray,
                         modality_names: Sequence[str], title: str = "") -> Figure:
  """A scatter of 2-D points, colour by identity and marker by modality.

  Args:
    coords: (N, 2).
    pids: (N,) identities (at most 20 distinct ones get distinct colours).
    modalities: (N,) indices into `modality_names`.
    modality_names: the dataset's modalities.
    title: the figure's title.
  """
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from matplotlib.lines import Line2D  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(7.5, 6.0), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  distinct = np.unique(pids)
  palette = colormaps["tab20"]
  for i, pid in enumerate(distinct):
    for m, name in enumerate(modality_names):
      rows = (pids == pid) & (modalities == m)
      if rows.any():
        ax.scatter(coords[rows, 0], coords[rows, 1], s=26, color=palette(i % 20),
                   marker=MODALITY_MARKERS[m % len(MODALITY_MARKERS)], edgecolors="black",
                   linewidths=0.3, alpha=0.9)
  modality_handles = [Line2D([], [], linestyle="", marker=MODALITY_MARKERS[m % 8], color="grey",
                             markeredgecolor="black", label=name)
                      for m, name in enumerate(modality_names)]
  legend = ax.legend(handles=modality_handles, title="modality", fontsize=8, loc="upper left",
                     bbox_to_anchor=(1.01, 1.0), frameon=False)
  ax.add_artist(legend)
  identity_handles = [Line2D([], [], linestyle="", marker="o", color=palette(i % 20),
                             label=f"id {pid}") for i, pid in enumerate(distinct)]
  ax.legend(handles=identity_handles, title="identity", fontsize=6.5, loc="upper left",
            bbox_to_anchor=(1.01, 0.72), frameon=False, ncol=2 if len(distinct) > 10 else 1)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title or "Embeddings", fontsize=10)
  fig.subplots_adjust(left=0.03, right=0.74, bottom=0.03, top=0.93)
  return fig


# ---------------------------------------------------------------------------------- index.html


def _rate_cell(entry: Mapping[str, Any], key: str) -> str:
  value = entry.get(key)
  if value is None:
    return "<td>-</td>"
  text = f"{100 * value:.1f}"
  std = entry.get("std", {}).get(key)
  if std and entry.get("trials", 1) > 1:
    text += f" &plusmn; {100 * std:.1f}"
  return f'<td title="{value!r}">{text}</td>'


def metrics_table_html(report: Mapping[str, Any]) -> str:
  """The report's metrics as an HTML table: percentages with one decimal (mean &plusmn; standard
  deviation over trials where there are several), each cell's exact JSON value as its tooltip,
  and the raw-pixel baseline where the report has it."""
  baseline = report.get("baselines", {}).get("raw_pixel", {})
  head = "".join(f"<th>{label}</th>" for _, label in TABLE_RATES)
  if baseline:
    head += "<th>raw pixels Rank-1</th><th>raw pixels mAP</th><th>raw pixels mINP</th>"
  lines = [f"<table><thead><tr><th>protocol</th>{head}<th>trials</th></tr></thead><tbody>"]
  for name, entry in report["protocols"].items():
    cells = "".join(_rate_cell(entry, key) for key, _ in TABLE_RATES)
    if baseline:
      raw = baseline.get(name, {})
      cells += "".join(_rate_cell(raw, key) for key in ("rank1", "mAP", "mINP"))
    lines.append(f"<tr><th>{html.escape(name)}</th>{cells}<td>{entry.get('trials', 1)}</td>"
                 "</tr>")
  lines.append("</tbody></table>")
  return "\n".join(lines)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
thead th { background: #eee; }
tbody th { text-align: left; font-weight: normal; font-family: monospace; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
"""


def index_html(report: Mapping[str, Any], pictures: Sequence[tuple[str, str]],
               report_file: str | None = None) -> str:
  """A self-contained page (no script, no external style) with the metrics table and every
  picture.

  Args:
    report: the evaluation report (WORKDIR/eval/<dataset>.json's content).
    pictures: (file name relative to the page, caption) of each picture, in page order.
    report_file: the report's file name relative to the page, linked from the page.
  """
  dataset, step = html.escape(str(report["dataset"])), report["step"]
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{dataset} at step {step}</title>", f"<style>{_STYLE}</style></head><body>",
           f"<h1>{dataset} at step {step}</h1>",
           "<p>Percentages; hover a cell for the exact value"
           + (f' of <a href="{html.escape(report_file)}">{html.escape(report_file)}</a>'
              if report_file else "") + ".</p>",
           metrics_table_html(report)]
  for name, caption in pictures:
    source = html.escape(name)
    parts.append(f'<figure><img src="{source}" alt="{html.escape(caption)}">'
                 f"<figcaption>{html.escape(caption)} (<code>{source}</code>)</figcaption>"
                 "</figure>")
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"


def write_index(directory: str | os.PathLike, report: Mapping[str, Any],
                pictures: Sequence[tuple[str, str]], report_file: str | None = None) -> str:
  """Writes `index_html` to DIRECTORY/index.html (atomically); returns its path."""
  path = os.path.join(os.fspath(directory), "index.html")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(index_html(report, pictures, report_file))
  os.replace(path + ".tmp", path)
  return path


def write_json(path: str | os.PathLike, content: Any) -> None:
  """Writes `content` as JSON to `path` (atomically)."""
  path = os.fspath(path)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(content, f, indent=1)
  os.replace(path + ".tmp", path)
