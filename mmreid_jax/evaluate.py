"""Evaluation: feature extraction, the protocols of each dataset, reports.

Each image is embedded alone, with its own modality (the post-BNNeck embedding, averaged with its
mirror image when `config.eval.flip`), L2-normalised, and ranked by cosine or Euclidean distance
(optionally k-reciprocal re-ranked, `config.eval.rerank`). On sets of aligned captures
(RGBNT201), a protocol may instead embed each capture with a subset of its modalities present
(`Protocol.query_modalities`): the capture goes through the model with those slots present, and its
per-modality embeddings are fused by `fuse_modalities`. Metrics (CMC, mAP, mINP) come from
`metrics.evaluate_ranking` under the benchmark's rule; protocols with several gallery trials
(SYSU-MM01) report the mean and standard deviation over trials. Results go to
WORKDIR/eval/<dataset>.json in the format of DESIGN.md section 8, to TensorBoard and to stdout;
unless `config.eval.pictures` is False, pictures of what the model learned (CMC curves,
ranked-gallery grids, the attention's modality weights, an embedding map) and an index.html go
to WORKDIR/eval/ and TensorBoard (`write_pictures`, `visualize`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from mmreid_jax import metrics, scene_analysis, visualize
from mmreid_jax.data import datasets
from mmreid_jax.data import sysu_mm01 as sysu_protocol
from mmreid_jax.data.pipeline import eval_batches

# The metrics whose spread over trials the report gives.
STD_RATES = ("rank1", "mAP", "mINP")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One retrieval setting: which query rows search which gallery rows, under which rule.

  Attributes:
    name: the key in the results JSON (e.g. "ir->rgb", "sysu/all-search/single-shot").
    query_rows: (Q,) row indices into the query split.
    gallery_trials: one (G_t,) array of row indices into the gallery split per trial; the report
      gives the mean and standard deviation of the metrics over trials.
    rule: `metrics.PROTOCOLS` entry deciding which gallery images a query ignores and how the CMC
      counts ("market": same identity and camera ignored).
    query_modalities, gallery_modalities: None: each row is embedded alone, with its own modality.
      A tuple of modality indices: each row stands for its whole capture (the rows sharing its
      `tuple_id`), embedded with those modalities present (`fuse_modalities`).
  """

  name: str
  query_rows: np.ndarray
  gallery_trials: tuple[np.ndarray, ...]
  rule: str = "market"
  query_modalities: tuple[int, ...] | None = None
  gallery_modalities: tuple[int, ...] | None = None


def modality_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet) -> list[Protocol]:
  """Every ordered pair of distinct modalities ("A->B"), then "all" (every modality both sides).

  A gallery image of the query's identity from the query's own camera is ignored (Market-1501's
  rule; on the synthetic set the aligned captures of one camera would otherwise make
  cross-modal retrieval trivial). A pair without queries or gallery images is left out.
  """
  names = query.modality_names
  protocols = [Protocol(f"{names[a]}->{names[b]}", np.flatnonzero(query.modalities == a),
                        (np.flatnonzero(gallery.modalities == b),))
               for a, b in itertools.permutations(range(len(names)), 2)]
  protocols = [p for p in protocols if len(p.query_rows) and len(p.gallery_trials[0])]
  protocols.append(Protocol("all", np.arange(len(query)), (np.arange(len(gallery)),)))
  return protocols




def sysu_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet) -> list[Protocol]:
  """SYSU-MM01: infrared queries against RGB galleries, `all-search` (cameras 1, 2, 4, 5) and
  `indoor-search` (1, 2), single-shot and multi-shot, each over the 10 trial galleries drawn by
  `mmreid_jax.data.sysu_mm01` (rows in the reference loader's order), ranked by the "sysu" rule.
  """
  query_index = {path: row for row, path in enumerate(query.paths)}
  gallery_index = {path: row for row, path in enumerate(gallery.paths)}
  paths = list(query_index) + list(gallery_index)
  protocols = []
  for mode in sysu_protocol.GALLERY_CAMERAS:
    for shot, shot_name in ((1, "single-shot"), (sysu_protocol.MULTI_SHOT, "multi-shot")):
      trials = []
      for trial in range(sysu_protocol.NUM_TRIALS):
        query_paths, gallery_paths = sysu_protocol.split_from_paths(paths, mode, trial, shot)
        trials.append(np.array([gallery_index[p] for p in gallery_paths], np.int64))
      protocols.append(Protocol(f"sysu/{mode}-search/{shot_name}",
                                np.array([query_index[p] for p in query_paths], np.int64),
                                tuple(trials), rule="sysu"))
  return protocols


def regdb_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet) -> list[Protocol]:
  """RegDB: visible->thermal and thermal->visible over the trial's test set, no camera filter."""
  visible = np.flatnonzero(query.modalities == 0)
  thermal = np.flatnonzero(gallery.modalities == 1)
  return [Protocol("regdb/visible->thermal", visible, (thermal,), rule="regdb"),
          Protocol("regdb/thermal->visible", np.flatnonzero(query.modalities == 1),
                   (np.flatnonzero(gallery.modalities == 0),), rule="regdb")]


def modality_settings(names: Sequence[str]) -> list[tuple[str, tuple[int, ...]]]:
  """("all", every modality), then each setting with one, two, ... modalities absent, named
  "missing-<absent names joined by +>", with the present modality indices."""
  settings = [("all", tuple(range(len(names))))]
  for count in range(1, len(names)):
    for absent in itertools.combinations(range(len(names)), count):
      settings.append(("missing-" + "+".join(names[m] for m in absent),
                       tuple(m for m in range(len(names)) if m not in absent)))
  return settings


def capture_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet, prefix: str,
                      cross_settings: bool) -> list[Protocol]:
  """Capture-to-capture retrieval: one row per capture, each embedded with the modalities of a
  setting (`modality_settings`), same identity and camera ignored.

  `<prefix>/all` embeds every modality, `<prefix>/missing-<m>` leaves modalities out of every
  query and gallery capture; with `cross_settings`, `<prefix>/<A>-><B>` also embeds queries in
  setting A and the gallery in setting B.

  Raises:
    ValueError: a split without aligned captures.
  """
  if np.any(query.tuple_ids < 0) or np.any(gallery.tuple_ids < 0):
    raise ValueError(f"{prefix} protocols need aligned captures (tuple_id >= 0 on every row).")
  _, query_rows = np.unique(query.tuple_ids, return_index=True)
  _, gallery_rows = np.unique(gallery.tuple_ids, return_index=True)
  settings = modality_settings(query.modality_names)
  return [Protocol(f"{prefix}/{q_name}" if q_name == g_name else f"{prefix}/{q_name}->{g_name}",
                   query_rows, (gallery_rows,), rule="market", query_modalities=q_present,
                   gallery_modalities=g_present)
          for q_name, q_present in settings for g_name, g_present in settings
          if cross_settings or q_name == g_name]


def rgbnt201_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet) -> list[Protocol]:
  """RGBNT201: query = gallery = every test capture, same identity and camera ignored.

  `rgbnt201/all` embeds every modality; `rgbnt201/missing-<m>` (six settings) leaves modalities
  out of every query and gallery capture; `rgbnt201/<A>-><B>` (cross-setting retrieval) embeds
  queries in setting A and the gallery in setting B.
  """
  return capture_protocols(query, gallery, "rgbnt201", cross_settings=True)


def synthetic_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet
                        ) -> list[Protocol]:
  """The synthetic set: every single-image protocol of `modality_protocols` ("A->B", "all"),
  then fused retrieval, query captures against gallery captures with the same modalities:
  `fused/all` (every modality, the paper's multimodal setting) and `fused/missing-<m>` for each
  setting with modalities left out (`capture_protocols`)."""
  return (modality_protocols(query, gallery)
          + capture_protocols(query, gallery, "fused", cross_settings=False))


PROTOCOLS: dict[str, Callable[[datasets.ImageSet, datasets.ImageSet], list[Protocol]]] = {
    "synthetic_mm": synthetic_protocols,
    "sysu_mm01": sysu_protocols,
    "regdb": regdb_protocols,
    "rgbnt201": rgbnt201_protocols,
    "manifest": modality_protocols,
}

DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cosine": metrics.cosine_distance,
    "euclidean": metrics.euclidean_distance,
}


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Vectors along the last axis of x scaled to unit norm (zero vectors stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def capture_table(image_set: datasets.ImageSet) -> tuple[np.ndarray, np.ndarray]:
  """The captures of a set of aligned images.

  Returns:
    (T, M) int64 rows of each capture's modalities (-1 where absent), captures in `tuple_id`
    order, and (N,) the capture index of each row.
  """
  if np.any(image_set.tuple_ids < 0):
    raise ValueError("Embedding captures needs aligned images (tuple_id >= 0 on every row).")
  tuple_ids, row_capture = np.unique(image_set.tuple_ids, return_inverse=True)
  table = np.full((len(tuple_ids), len(image_set.modality_names)), -1, np.int64)
  table[row_capture, image_set.modalities] = np.arange(len(image_set))
  return table, row_capture


def fuse_modalities(per_modality: np.ndarray, present: np.ndarray) -> np.ndarray:
  """One vector per capture from its modalities' embeddings.

  Each present modality's embedding is L2-normalised and takes its slot; an absent modality's
  slot holds the mean of the present ones (the model embeds every modality in one shared space);
  the M slots are concatenated and L2-normalised. With every modality present this is the
  paper's concatenation; it also gives captures embedded with different modality subsets
  (cross-setting retrieval) vectors of one size that compare like with like.

  Args:
    per_modality: (T, M, E) embeddings (absent slots are ignored, even if not finite).
    present: (T, M) bool.

  Returns:
    (T, M * E) unit vectors (zero where a capture has no present modality).
  """
  normalized = np.where(present[..., None], l2_normalize(per_modality), 0.0)
  mean = normalized.sum(axis=1) / np.maximum(present.sum(axis=1), 1)[:, None]
  filled = np.where(present[..., None], normalized, mean[:, None, :])
  return l2_normalize(filled.reshape(filled.shape[0], -1)).astype(np.float32)


def _setting_mask(setting: tuple[int, ...], num_modalities: int) -> np.ndarray:
  return np.isin(np.arange(num_modalities), setting)


class FeatureExtractor:
  """Embeds images with a model's eval-mode forward pass: single-modality images (jitted per
  modality) or whole captures with a subset of their modalities present (`captures`).

  Args:
    model: the ReID network.
    variables: {"params": ..., "batch_stats": ...}.
    batch_size: images per forward pass (a multiple of the device count).
    sharding: how input batches are placed (batch axis over devices), or None for the default.
  """

  def __init__(self, model, variables: dict[str, Any], batch_size: int,
               sharding: jax.sharding.Sharding | None = None):
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.sharding = sharding
    # Outputs replicated on the mesh: with several processes it spans devices a process cannot
    # read, and every process needs every embedding.
    self._out_sharding = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                          if isinstance(sharding, jax.sharding.NamedSharding) else None)
    self._fns: dict[Any, Callable] = {}

  def _place(self, x: np.ndarray) -> np.ndarray | jax.Array:
    """`x` (the same on every process) sharded by `sharding`; unchanged without one."""
    if self.sharding is None:
      return x
    return jax.make_array_from_callback(x.shape, self.sharding, lambda index: x[index])

  def _embed_fn(self, modality: int) -> Callable:
    if modality not in self._fns:
      def embed(variables, images):
        present = jnp.ones((images.shape[0], 1), bool)
        outputs = self.model.apply(variables, images[:, None], present, (modality,),
                                   train=False)
        modal_weights = outputs.get("modal_weights")  # None without the attention
        return (outputs["embeddings"][:, 0].astype(jnp.float32),
                None if modal_weights is None else modal_weights[:, 0])
      self._fns[modality] = jax.jit(embed, out_shardings=self._out_sharding)
    return self._fns[modality]

  def __call__(self, image_set: datasets.ImageSet, height: int, width: int,
               flip: bool) -> np.ndarray:
    """(N, E) L2-normalised embeddings of every row of `image_set`, each with its modality."""
    features = None
    for modality in np.unique(image_set.modalities):
      rows = np.flatnonzero(image_set.modalities == modality)
      subset = image_set.subset(rows)
      embedded = self._embed_subset(subset, int(modality), height, width, flip=False)
      if flip:
        embedded = embedded + self._embed_subset(subset, int(modality), height, width, flip=True)
      if features is None:
        features = np.zeros((len(image_set), embedded.shape[1]), np.float32)
      features[rows] = embedded
    return l2_normalize(features)

  def _embed_subset(self, subset: datasets.ImageSet, modality: int, height: int, width: int,
                    flip: bool) -> np.ndarray:
    fn = self._embed_fn(modality)
    outputs = []
    for images, count in eval_batches(subset, height, width, self.batch_size, flip=flip):
      embeddings, _ = fn(self.variables, self._place(images))
      outputs.append(np.asarray(embeddings)[:count])
    return np.concatenate(outputs)

  def _capture_fn(self, num_modalities: int) -> Callable:
    key = ("captures", num_modalities)
    if key not in self._fns:
      def embed(variables, images, present):
        outputs = self.model.apply(variables, images, present, tuple(range(num_modalities)),
                                   train=False)
        return outputs["embeddings"].astype(jnp.float32)
      self._fns[key] = jax.jit(embed, out_shardings=self._out_sharding)
    return self._fns[key]

  def captures(self, image_set: datasets.ImageSet, settings: Sequence[tuple[int, ...]],
               height: int, width: int, flip: bool) -> dict[tuple[int, ...], np.ndarray]:
    """Each row's capture embedded in each modality setting.

    A capture (the rows sharing a `tuple_id`) goes through the model once per setting, with the
    setting's modalities present (those the capture has), and its per-modality embeddings are
    fused by `fuse_modalities`; with `flip`, each slot's embedding is summed with that of the
    mirrored capture first.

    Returns:
      {setting: (N, M * E) float32} for the N rows of `image_set` (rows of one capture share it).
    """
    table, row_capture = capture_table(image_set)
    num_modalities = table.shape[1]
    available = table >= 0
    flat = image_set.subset(np.where(available, table, 0).reshape(-1))
    fn = self._capture_fn(num_modalities)
    masks = {s: _setting_mask(s, num_modalities) for s in settings}
    sums: dict[tuple[int, ...], list[np.ndarray]] = {s: [] for s in settings}
    for mirrored in (False, True) if flip else (False,):
      done = 0
      outputs: dict[tuple[int, ...], list[np.ndarray]] = {s: [] for s in settings}
      for images, count in eval_batches(flat, height, width, self.batch_size * num_modalities,
                                        flip=mirrored):
        images = images.reshape((self.batch_size, num_modalities) + images.shape[1:])
        real = count // num_modalities
        batch_available = np.zeros((self.batch_size, num_modalities), bool)
        batch_available[:real] = available[done:done + real]
        done += real
        images = images * batch_available[..., None, None, None].astype(images.dtype)
        images = self._place(images)
        for setting, mask in masks.items():
          present = batch_available & mask
          # Rows with nothing present (batch padding) run with the setting's slots present on
          # zero images, so that no row of the batch is empty; their outputs are discarded.
          present = np.where(present.any(axis=1, keepdims=True), present, mask)
          embedded = fn(self.variables, images, self._place(present))
          outputs[setting].append(np.asarray(embedded)[:real])
      for setting in settings:
        sums[setting].append(np.concatenate(outputs[setting]))
    features = {}
    for setting, mask in masks.items():
      per_modality = np.sum(sums[setting], axis=0)
      features[setting] = fuse_modalities(per_modality, available & mask)[row_capture]
    return features


  def _weights_fn(self, num_modalities: int) -> Callable:
    key = ("modal_weights", num_modalities)
    if key not in self._fns:
      def weights(variables, images, present):
        outputs = self.model.apply(variables, images, present, tuple(range(num_modalities)),
                                   train=False)
        return outputs["modal_weights"].astype(jnp.float32)
      self._fns[key] = jax.jit(weights, out_shardings=self._out_sharding)
    return self._fns[key]

  def modal_weights(self, image_set: datasets.ImageSet, table: np.ndarray, height: int,
                    width: int) -> np.ndarray:
    """The cross-modal attention's modality weights A_m(m) of tuples of `image_set`'s rows.

    Each tuple (a row of `table`) goes through the model once, without flipping, with the slots
    of its rows present; a model without the modal attention (`model.has_modal_weights` False)
    has none.

    Args:
      image_set: the rows.
      table: (T, M) row of each tuple's modalities, -1 where absent (`capture_table`,
        `modality_tuples`).
      height, width: the model's input size.

    Returns:
      (T, M) float32 weights, zero where absent, summing to one over each tuple's present
      modalities.
    """
    num_modalities = table.shape[1]
    available = table >= 0
    flat = image_set.subset(np.where(available, table, 0).reshape(-1))
    fn = self._weights_fn(num_modalities)
    outputs, done = [], 0
    for images, count in eval_batches(flat, height, width, self.batch_size * num_modalities):
      images = images.reshape((self.batch_size, num_modalities) + images.shape[1:])
      real = count // num_modalities
      present = np.ones((self.batch_size, num_modalities), bool)  # padding rows: discarded
      present[:real] = available[done:done + real]
      done += real
      images = images * present[..., None, None, None].astype(images.dtype)
      outputs.append(np.asarray(fn(self.variables, self._place(images),
                                   self._place(present)))[:real])
    if not outputs:
      return np.zeros((0, num_modalities), np.float32)
    return np.concatenate(outputs)


def modality_tuples(image_set: datasets.ImageSet, seed: int = 0) -> np.ndarray:
  """Tuples of one image per modality and identity, for the attention's modality weights.

  A set of aligned captures (`tuple_id` on every row) gives its captures (`capture_table`). An
  unpaired set (SYSU-MM01, RegDB) gives, per identity, as many tuples as its most frequent
  modality has images: each modality's images of the identity in a seeded random order, repeated
  where it has fewer (the identity-balanced tuples training draws, `data.sampling`).

  Returns:
    (T, M) int64 rows (-1 where the identity lacks the modality).
  """
  if len(image_set) and np.all(image_set.tuple_ids >= 0):
    return capture_table(image_set)[0]
  rng = np.random.default_rng(seed)
  num_modalities = len(image_set.modality_names)
  tables = []
  for pid in np.unique(image_set.pids):
    rows = [rng.permutation(np.flatnonzero((image_set.pids == pid)
                                           & (image_set.modalities == m)))
            for m in range(num_modalities)]
    count = max(len(r) for r in rows)
    table = np.full((count, num_modalities), -1, np.int64)
    for m, r in enumerate(rows):
      if len(r):
        table[:, m] = np.resize(r, count)
    tables.append(table)
  return (np.concatenate(tables) if tables
          else np.zeros((0, num_modalities), np.int64))


def row_modal_weights(table: np.ndarray, weights: np.ndarray, num_rows: int) -> np.ndarray:
  """Each row's modality weight: the mean over the tuples holding it (`modality_tuples`) of the
  weight of its slot; NaN for a row in no tuple. (T, M), (T, M) -> (num_rows,) float64."""
  present = table >= 0
  sums = np.bincount(table[present], weights=weights[present], minlength=num_rows)
  counts = np.bincount(table[present], minlength=num_rows)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def raw_pixel_features(image_set: datasets.ImageSet, height: int, width: int) -> np.ndarray:
  """(N, H * W * 3) L2-normalised raw pixels, the baseline every learned model must beat."""
  batches = [images[:count].reshape(count, -1).astype(np.float32)
             for images, count in eval_batches(image_set, height, width, 256)]
  return l2_normalize(np.concatenate(batches))


def raw_pixel_captures(image_set: datasets.ImageSet, settings: Sequence[tuple[int, ...]],
                       height: int, width: int) -> dict[tuple[int, ...], np.ndarray]:
  """The raw-pixel baseline of `FeatureExtractor.captures`: each modality's pixels fused by
  `fuse_modalities`; {setting: (N, M * H * W * 3)}."""
  table, row_capture = capture_table(image_set)
  pixels = raw_pixel_features(image_set, height, width)
  per_modality = np.where((table >= 0)[..., None], pixels[np.maximum(table, 0)], 0.0)
  return {setting: fuse_modalities(per_modality, (table >= 0)
                                   & _setting_mask(setting, table.shape[1]))[row_capture]
          for setting in settings}


# ("query" | "gallery", None or the modalities present): see `protocol_features`.
FeatureKey = tuple[str, tuple[int, ...] | None]


def protocol_features(
    protocols: Sequence[Protocol], query: datasets.ImageSet, gallery: datasets.ImageSet,
    embed_rows: Callable[[datasets.ImageSet], np.ndarray],
    embed_captures: Callable[[datasets.ImageSet, list[tuple[int, ...]]],
                             dict[tuple[int, ...], np.ndarray]],
) -> dict[FeatureKey, np.ndarray]:
  """The features every protocol reads, keyed by ("query" | "gallery", modalities).

  `embed_rows` embeds each row alone (modalities None); `embed_captures` embeds captures in
  several settings at once. A split serving as both query and gallery is embedded once.
  """
  needed: dict[int, tuple[datasets.ImageSet, set]] = {}
  keys = []
  for protocol in protocols:
    for side, image_set, modalities in (("query", query, protocol.query_modalities),
                                        ("gallery", gallery, protocol.gallery_modalities)):
      needed.setdefault(id(image_set), (image_set, set()))[1].add(modalities)
      keys.append((side, image_set, modalities))
  computed: dict[tuple[int, Any], np.ndarray] = {}
  for set_id, (image_set, wanted) in needed.items():
    if None in wanted:
      computed[(set_id, None)] = embed_rows(image_set)
    settings = sorted(m for m in wanted if m is not None)
    if settings:
      for setting, features in embed_captures(image_set, settings).items():
        computed[(set_id, setting)] = features
  return {(side, modalities): computed[(id(image_set), modalities)]
          for side, image_set, modalities in keys}


def rank_protocols(protocols: Sequence[Protocol], query: datasets.ImageSet,
                   gallery: datasets.ImageSet, features: dict[FeatureKey, np.ndarray],
                   distance: str, max_rank: int, rerank: dict[str, float] | None = None
                   ) -> dict[str, list[metrics.RankingResult]]:
  """Ranks every protocol's trials with one set of features.

  Args:
    protocols: what to rank.
    query, gallery: the splits the protocols' rows index.
    features: from `protocol_features`.
    distance: a `DISTANCES` key.
    max_rank: length of the CMC curves.
    rerank: None, or the k1, k2 and lambda_value of `metrics.k_reciprocal_rerank`.

  Returns:
    {protocol name: one RankingResult per gallery trial}.
  """
  if distance not in DISTANCES:
    raise ValueError(f"config.eval.distance={distance!r}; expected one of {sorted(DISTANCES)}.")
  measure = DISTANCES[distance]
  results = {}
  for protocol in protocols:
    q = protocol.query_rows
    query_features = features[("query", protocol.query_modalities)][q]
    trials = []
    for g in protocol.gallery_trials:
      gallery_features = features[("gallery", protocol.gallery_modalities)][g]
      labels = (query.pids[q], gallery.pids[g], query.camids[q], gallery.camids[g])
      if rerank is None:  # distances a chunk of queries at a time, in bounded memory
        trials.append(metrics.evaluate_features(
            query_features, gallery_features, *labels, distance=distance, max_rank=max_rank,
            protocol=protocol.rule))
        continue
      distmat = metrics.k_reciprocal_rerank(
          measure(query_features, gallery_features), measure(query_features, query_features),
          measure(gallery_features, gallery_features), **rerank)
      trials.append(metrics.evaluate_ranking(distmat, *labels, max_rank=max_rank,
                                             protocol=protocol.rule))
    results[protocol.name] = trials
  return results


def summarize_trials(trials: Sequence[dict[str, float]]) -> dict[str, Any]:
  """One protocol's JSON entry (DESIGN.md section 8) from the rates of each trial: the mean of
  every rate, the number of trials and the (population, ddof=0) standard deviation of
  rank1, mAP and mINP."""
  if not trials:
    raise ValueError("summarize_trials needs at least one trial.")
  entry: dict[str, Any] = {key: float(np.mean([t[key] for t in trials])) for key in trials[0]}
  entry["trials"] = len(trials)
  entry["std"] = {key: float(np.std([t[key] for t in trials])) for key in STD_RATES}
  return entry


def protocol_entry(results: Sequence[metrics.RankingResult]) -> dict[str, Any]:
  """One protocol's JSON entry from its RankingResult per trial."""
  return summarize_trials([result.as_dict() for result in results])


def aggregate_reports(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Reports of separately trained runs (RegDB's ten splits) as one report over trials.

  Every protocol's rates are averaged over the runs (each run counts as one trial, whatever its
  own number of trials) with their standard deviation; baselines likewise.

  Raises:
    ValueError: when the reports are of different datasets, steps or protocols.
  """
  if not reports:
    raise ValueError("aggregate_reports needs at least one report.")
  for key in ("dataset", "step"):
    values = sorted({report[key] for report in reports})
    if len(values) != 1:
      raise ValueError(f"The reports differ in {key!r}: {values}; aggregate runs of one dataset "
                       "trained for the same number of steps.")
  names = [list(report["protocols"]) for report in reports]
  if any(n != names[0] for n in names):
    raise ValueError(f"The reports hold different protocols: {names}.")

  def rates(entry: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in entry.items() if key not in ("trials", "std")}

  aggregated: dict[str, Any] = {
      "dataset": reports[0]["dataset"], "step": reports[0]["step"],
      "protocols": {name: summarize_trials([rates(r["protocols"][name]) for r in reports])
                    for name in names[0]},
  }
  if all("baselines" in report for report in reports):
    aggregated["baselines"] = {
        baseline: {name: {key: value for key, value in summarize_trials(
            [r["baselines"][baseline][name] for r in reports]).items() if key in STD_RATES}
                   for name in entries}
        for baseline, entries in reports[0]["baselines"].items()}
  return aggregated


def format_table(report: dict[str, Any]) -> str:
  """The results as a fixed-width text table, percentages, learned model beside the baseline;
  protocols with several trials show their mean (the JSON holds the standard deviation)."""
  baseline = report.get("baselines", {}).get("raw_pixel", {})
  width = max([14] + [len(name) + 2 for name in report["protocols"]])
  lines = [f"{report['dataset']} at step {report['step']}",
           f"{'protocol':<{width}}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>8}{'mAP':>8}{'mINP':>8}"
           f"   | raw pixels {'Rank-1':>7}{'mAP':>7}{'mINP':>7}"]
  for name, entry in report["protocols"].items():
    line = (f"{name:<{width}}{100 * entry['rank1']:8.1f}{100 * entry['rank5']:8.1f}"
            f"{100 * entry['rank10']:8.1f}{100 * entry['mAP']:8.1f}{100 * entry['mINP']:8.1f}")
    if name in baseline:
      raw = baseline[name]
      line += f"   | {'':>10} {100 * raw['rank1']:7.1f}{100 * raw['mAP']:7.1f}{100 * raw['mINP']:7.1f}"
    lines.append(line)
  return "\n".join(lines)


def rerank_options(eval_config: ml_collections.ConfigDict) -> dict[str, float] | None:
  """`metrics.k_reciprocal_rerank`'s options from `config.eval` (None unless `rerank`)."""
  if not eval_config.get("rerank", False):
    return None
  return {"k1": eval_config.get("rerank_k1", 20), "k2": eval_config.get("rerank_k2", 6),
          "lambda_value": eval_config.get("rerank_lambda", 0.3)}


def picture_options(eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The picture keys of `config.eval` with their defaults (a config without them gets the
  defaults): `pictures` (True), `num_grid_queries` (8), `embedding_map` ("pca" or "tsne").

  Raises:
    ValueError: an unknown `embedding_map` or a negative `num_grid_queries`.
  """
  options = {"pictures": bool(eval_config.get("pictures", True)),
             "num_grid_queries": int(eval_config.get("num_grid_queries", 8)),
             "embedding_map": str(eval_config.get("embedding_map", "pca"))}
  if options["embedding_map"] not in visualize.EMBEDDING_MAPS:
    raise ValueError(f"config.eval.embedding_map={options['embedding_map']!r}; expected one of "
                     f"{visualize.EMBEDDING_MAPS}.")
  if options["num_grid_queries"] < 0:
    raise ValueError(f"config.eval.num_grid_queries={options['num_grid_queries']}; expected "
                     ">= 0.")
  return options


def evaluate_model(config: ml_collections.ConfigDict, builder, model, variables: dict[str, Any],
                   step: int, workdir: str, sharding: jax.sharding.Sharding | None = None
                   ) -> dict[str, Any]:
  """Evaluates `variables` on the test splits; writes JSON, TensorBoard and, unless
  `config.eval.pictures` is False, the pictures and index.html of `write_pictures`; returns the
  report."""
  dataset_name = builder.name
  if dataset_name not in PROTOCOLS:
    raise ValueError(f"No evaluation protocol for dataset {dataset_name!r}; known: "
                     f"{sorted(PROTOCOLS)}.")
  options = picture_options(config.eval)
  query_split, gallery_split = datasets.eval_splits(builder)
  query = datasets.load_split(builder, query_split)
  gallery = query if gallery_split == query_split else datasets.load_split(builder, gallery_split)
  protocols = PROTOCOLS[dataset_name](query, gallery)
  height, width, flip = config.data.height, config.data.width, config.eval.flip
  extractor = FeatureExtractor(model, variables, config.eval.batch_size, sharding)
  features = protocol_features(
      protocols, query, gallery, lambda s: extractor(s, height, width, flip),
      lambda s, settings: extractor.captures(s, settings, height, width, flip))
  ranked = rank_protocols(protocols, query, gallery, features, config.eval.distance,
                          config.eval.max_rank, rerank_options(config.eval))
  report: dict[str, Any] = {
      "dataset": dataset_name, "step": int(step),
      "protocols": {name: protocol_entry(results) for name, results in ranked.items()},
  }
  if config.eval.raw_pixel_baseline:
    raw_features = protocol_features(
        protocols, query, gallery, lambda s: raw_pixel_features(s, height, width),
        lambda s, settings: raw_pixel_captures(s, settings, height, width))
    raw = rank_protocols(protocols, query, gallery, raw_features, "cosine", config.eval.max_rank)
    report["baselines"] = {"raw_pixel": {
        name: {k: v for k, v in protocol_entry(results).items() if k in STD_RATES}
        for name, results in raw.items()}}
  with_conditions = query.conditions is not None
  if with_conditions:
    by_condition = scene_analysis.condition_protocols(protocols, query.conditions)
    report["conditions"] = {
        condition: {name: protocol_entry(results) for name, results in rank_protocols(
            chosen, query, gallery, features, config.eval.distance, config.eval.max_rank,
            rerank_options(config.eval)).items()}
        for condition, chosen in by_condition.items()}
  modal_weights = None
  if (options["pictures"] or with_conditions) and getattr(model, "has_modal_weights", False):
    # Every process runs the forward passes (a sharded jit); process 0 draws.
    table = modality_tuples(query, int(config.get("seed", 0)))
    modal_weights = {"query": (table, extractor.modal_weights(query, table, height, width))}
    modal_weights["gallery"] = modal_weights["query"]
    if gallery is not query:
      table = modality_tuples(gallery, int(config.get("seed", 0)))
      modal_weights["gallery"] = (table, extractor.modal_weights(gallery, table, height, width))
  if with_conditions:
    report.update(condition_weights_and_shares(query, gallery, features, modal_weights))
  if jax.process_index() == 0:
    write_report(report, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=False,
                                                  collection="eval")
    writer.write_scalars(step, {f"{name}/{metric}": value
                                for name, entry in report["protocols"].items()
                                for metric, value in entry.items()
                                if isinstance(value, float)})
    if options["pictures"]:
      try:
        write_pictures(config, report, protocols, query, gallery, features, ranked,
                       modal_weights, workdir, writer)
      except Exception:  # pylint: disable=broad-except
        # The report is written; a picture must not cost the run its printed results.
        logging.exception("Writing the evaluation pictures to %s failed.",
                          os.path.join(workdir, "eval"))
    writer.flush()
  return report


def condition_weights_and_shares(
    query: datasets.ImageSet, gallery: datasets.ImageSet, features: dict[FeatureKey, np.ndarray],
    modal_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> dict[str, Any]:
  """The report's "modal_weights_by_condition" (with the attention's `modal_weights`, see
  `write_pictures`) and "modality_share_by_condition" (where `features` hold every capture
  setting with one modality left out, as the fused protocols do) entries
  (`scene_analysis`)."""
  names = query.modality_names
  entries: dict[str, Any] = {}
  splits = [("query", query)] + ([] if gallery is query else [("gallery", gallery)])
  if modal_weights is not None:
    entries["modal_weights_by_condition"] = scene_analysis.modal_weights_by_condition(
        [modal_weights[side][0] for side, _ in splits],
        [modal_weights[side][1] for side, _ in splits],
        [image_set.conditions for _, image_set in splits], names)
  every = tuple(range(len(names)))
  without = [tuple(n for n in every if n != m) for m in every]
  if not all(("query", s) in features for s in [every] + without):
    return entries
  shares, capture_conditions = [], []
  for side, image_set in splits:
    table, _ = capture_table(image_set)
    rows = table.max(axis=1)  # any row of each capture: its rows share the fused features
    shares.append(scene_analysis.modality_shares(
        features[(side, every)][rows],
        np.stack([features[(side, s)][rows] for s in without], axis=1), table >= 0))
    capture_conditions.append(image_set.conditions[rows])
  entries["modality_share_by_condition"] = scene_analysis.share_by_condition(
      np.concatenate(shares), np.concatenate(capture_conditions), names)
  return entries


# Gallery images per query in the ranked-gallery grids.
GRID_TOP_K = 10
# Identities in the embedding map.
MAP_IDENTITIES = 20


def cross_modal_protocols(protocols: Sequence[Protocol], query: datasets.ImageSet,
                          gallery: datasets.ImageSet) -> list[Protocol]:
  """The protocols whose queries and gallery (first trial) are single images of disjoint
  modalities: the cross-modal directions ("ir->rgb", SYSU-MM01's, RegDB's), not "all"."""
  chosen = []
  for protocol in protocols:
    if protocol.query_modalities is not None or protocol.gallery_modalities is not None:
      continue
    query_modalities = set(np.unique(query.modalities[protocol.query_rows]).tolist())
    gallery_modalities = set(np.unique(gallery.modalities[protocol.gallery_trials[0]]).tolist())
    if query_modalities.isdisjoint(gallery_modalities):
      chosen.append(protocol)
  return chosen


def decoded_images(image_set: datasets.ImageSet, rows: np.ndarray, height: int,
                   width: int) -> np.ndarray:
  """(len(rows), height, width, 3) uint8: the rows' images as evaluation feeds them."""
  rows = np.asarray(rows, np.int64)
  if not len(rows):
    return np.zeros((0, height, width, 3), np.uint8)
  return np.concatenate([images[:count] for images, count in
                         eval_batches(image_set.subset(rows), height, width, 64)])


def _draw_by_condition(conditions: np.ndarray, count: int, rng: np.random.Generator
                       ) -> np.ndarray:
  """`count` sorted indices into `conditions` (N,), drawn without replacement, one condition after
  another in `scene_analysis.ordered_conditions` order, so that every condition is shown."""
  pools = {c: list(rng.permutation(np.flatnonzero(conditions == c)))
           for c in scene_analysis.ordered_conditions(conditions)}
  chosen: list[int] = []
  while len(chosen) < count:
    for pool in pools.values():
      if pool and len(chosen) < count:
        chosen.append(int(pool.pop()))
  return np.sort(np.asarray(chosen, np.int64))


def capture_strips(image_set: datasets.ImageSet, rows: np.ndarray, modalities: Sequence[int],
                   height: int, width: int) -> np.ndarray:
  """(len(rows), height, len(modalities) * width, 3) uint8: the images of each row's capture in
  `modalities`, side by side in that order as evaluation feeds them (black where absent)."""
  table, row_capture = capture_table(image_set)
  captures = table[row_capture[np.asarray(rows, np.int64)]][:, list(modalities)]  # (R, K)
  images = decoded_images(image_set, np.maximum(captures, 0).reshape(-1), height, width)
  images = images.reshape(captures.shape + images.shape[1:])
  images = images * (captures >= 0)[..., None, None, None].astype(np.uint8)
  return np.concatenate(list(np.moveaxis(images, 1, 0)), axis=2) if len(rows) else np.zeros(
      (0, height, len(modalities) * width, 3), np.uint8)


def grid_picture(config: ml_collections.ConfigDict, protocol: Protocol, index: int,
                 query: datasets.ImageSet, gallery: datasets.ImageSet,
                 features: dict[FeatureKey, np.ndarray], query_weights: np.ndarray | None,
                 num_queries: int, step: int):
  """The ranked-gallery grid of one protocol (its first gallery trial).

  `num_queries` queries are drawn without replacement by a generator seeded with
  (config.seed, index), so an evaluation of another step shows the same queries (on a set with
  scene conditions, a capture protocol's queries in turn from each condition); each is ranked
  as `rank_protocols` ranks it (distance, re-ranking, the protocol's rule) and shown with its
  first `GRID_TOP_K` gallery images. A capture protocol's tiles show each capture's images of
  the protocol's modalities side by side. `query_weights` is None, or the attention's modality
  weights of each query row: (N,) the weight of the row's own modality in its capture
  (single-image protocols), or (N, M) the weights of every modality of the row's capture
  (capture protocols).

  Returns:
    The figure and the grid's description (`visualize` module docstring, grid_<protocol>.json).
  """
  seed = int(config.get("seed", 0))
  rng = np.random.default_rng([seed, index])
  count = min(num_queries, len(protocol.query_rows))
  if protocol.query_modalities is not None and query.conditions is not None:
    chosen = _draw_by_condition(query.conditions[protocol.query_rows], count, rng)
  else:
    chosen = np.sort(rng.choice(len(protocol.query_rows), size=count, replace=False))
  q_rows = protocol.query_rows[chosen]
  g_rows = protocol.gallery_trials[0]
  query_features = features[("query", protocol.query_modalities)]
  gallery_features = features[("gallery", protocol.gallery_modalities)][g_rows]
  measure = DISTANCES[config.eval.distance]
  rerank = rerank_options(config.eval)
  if rerank is None:
    distmat = measure(query_features[q_rows], gallery_features)
  else:  # re-ranking needs every query of the protocol
    every = query_features[protocol.query_rows]
    distmat = metrics.k_reciprocal_rerank(measure(every, gallery_features),
                                          measure(every, every),
                                          measure(gallery_features, gallery_features),
                                          **rerank)[chosen]
  top = metrics.ranked_gallery(distmat, query.pids[q_rows], gallery.pids[g_rows],
                               query.camids[q_rows], gallery.camids[g_rows], GRID_TOP_K,
                               protocol.rule)
  shown = np.unique(g_rows[top[top >= 0]])
  height, width = config.data.height, config.data.width
  names = query.modality_names
  if protocol.query_modalities is None:
    query_images = decoded_images(query, q_rows, height, width)
    gallery_images = dict(zip(shown.tolist(), decoded_images(gallery, shown, height, width)))
    query_labels = [names[m] for m in query.modalities[q_rows]]
    gallery_label = lambda g: names[gallery.modalities[g]]
  else:  # each capture's images of the protocol's modalities, side by side
    query_images = capture_strips(query, q_rows, protocol.query_modalities, height, width)
    gallery_images = dict(zip(shown.tolist(), capture_strips(
        gallery, shown, protocol.gallery_modalities, height, width)))
    query_labels = ["+".join(names[m] for m in protocol.query_modalities)] * len(q_rows)
    gallery_label = lambda g: "+".join(names[m] for m in protocol.gallery_modalities)
  rows, entries = [], []
  for i, q in enumerate(q_rows.tolist()):
    modality = query_labels[i]
    weight = None
    if query_weights is not None and np.all(np.isfinite(query_weights[q])):
      weight = query_weights[q].tolist()
    caption = f"query {modality}\nid {query.pids[q]}, cam {query.camids[q]}"
    if query.conditions is not None:
      caption += f", {query.conditions[q]}"
    if isinstance(weight, float):
      caption += f"\nmodal weight {weight:.2f}"
    elif weight is not None:  # a capture's weights, (M,)
      caption += "\nweights " + " ".join(f"{w:.2f}" for w in weight)
      weight = dict(zip(names, weight))
    tiles = [visualize.GridTile(query_images[i], modality, caption, None)]
    listed = []
    for rank, column in enumerate(top[i].tolist(), start=1):
      if column < 0:
        tiles.append(None)
        continue
      g = int(g_rows[column])
      correct = bool(gallery.pids[g] == query.pids[q])
      caption = f"{rank}. id {gallery.pids[g]}\ncam {gallery.camids[g]}"
      if gallery.conditions is not None:
        caption += f", {gallery.conditions[g]}"
      tiles.append(visualize.GridTile(gallery_images[g], gallery_label(g), caption, correct))
      listed.append({"rank": rank, "row": g, "path": str(gallery.paths[g]),
                     "pid": int(gallery.pids[g]), "camid": int(gallery.camids[g]),
                     "modality": gallery_label(g), "correct": correct,
                     **({} if gallery.conditions is None else
                        {"condition": str(gallery.conditions[g])})})
    rows.append(tiles)
    entries.append({"row": q, "path": str(query.paths[q]), "pid": int(query.pids[q]),
                    "camid": int(query.camids[q]), "modality": modality,
                    "modal_weight": weight, "gallery": listed,
                    **({} if query.conditions is None else
                       {"condition": str(query.conditions[q])})})
  title = (f"{protocol.name} at step {step}: {count} of {len(protocol.query_rows)} queries "
           f"(seed {seed}) and their first {GRID_TOP_K} gallery images; frame green: same "
           "identity, red: another")
  fig, boxes = visualize.grid_figure(rows, title)
  for entry, box_row in zip(entries, boxes):
    entry["box"] = box_row[0]
    for item in entry["gallery"]:
      item["box"] = box_row[item["rank"]]
  description = {
      "protocol": protocol.name, "step": step,
      "trial": 0, "rule": protocol.rule, "distance": config.eval.distance,
      "rerank": rerank is not None, "top_k": GRID_TOP_K, "seed": seed,
      "border": visualize.border_width(height, width),
      "frame_colors": {"correct": list(visualize.CORRECT_COLOR),
                       "wrong": list(visualize.WRONG_COLOR),
                       "query": list(visualize.QUERY_COLOR)},
      "queries": entries,
  }
  return fig, description


def write_pictures(config: ml_collections.ConfigDict, report: dict[str, Any],
                   protocols: Sequence[Protocol], query: datasets.ImageSet,
                   gallery: datasets.ImageSet, features: dict[FeatureKey, np.ndarray],
                   ranked: dict[str, list[metrics.RankingResult]],
                   modal_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None,
                   workdir: str, writer: metric_writers.MetricWriter | None = None
                   ) -> list[str]:
  """Writes an evaluation's pictures and index.html under WORKDIR/eval/ (the `visualize`
  module lists them) and the same pictures to TensorBoard (`writer`, "pictures/<name>").

  Args:
    config: the run's config (`config.eval` picture keys: `picture_options`).
    report: the evaluation report (WORKDIR/eval/<dataset>.json).
    protocols, query, gallery, features, ranked: the evaluation's (`evaluate_model`).
    modal_weights: None (no attention), or {"query" | "gallery": ((T, M) tuples of the split's
      rows, `modality_tuples`; (T, M) their modality weights, `FeatureExtractor.modal_weights`)}.
    workdir: the run's directory.
    writer: where the pictures also go, or None.

  Returns:
    The paths written.
  """
  options = picture_options(config.eval)
  directory = os.path.join(workdir, "eval")
  os.makedirs(directory, exist_ok=True)
  step, seed = int(report["step"]), int(config.get("seed", 0))
  title = f"{report['dataset']} at step {step}"
  pictures: list[tuple[str, str]] = []
  pixels: dict[str, np.ndarray] = {}
  written: list[str] = []

  def save(fig, name: str, caption: str) -> None:
    path = os.path.join(directory, name + ".png")
    pixels[name] = visualize.save_png(fig, path)
    pictures.append((name + ".png", caption))
    written.append(path)

  max_rank = min(20, config.eval.max_rank)
  save(visualize.cmc_figure(visualize.cmc_curves(ranked, max_rank), f"CMC, {title}"), "cmc",
       f"CMC curves, Rank-1 to Rank-{max_rank}, of every protocol (mean over gallery trials).")

  query_weights = None
  if modal_weights is not None:
    query_weights = row_modal_weights(*modal_weights["query"], len(query))
  single = ("query", None) in features and ("gallery", None) in features
  if single and options["num_grid_queries"] > 0:
    for index, protocol in enumerate(cross_modal_protocols(protocols, query, gallery)):
      fig, description = grid_picture(config, protocol, index, query, gallery, features,
                                      query_weights, options["num_grid_queries"], step)
      name = "grid_" + visualize.file_stem(protocol.name)
      description = {"dataset": report["dataset"], **description}
      save(fig, name, f"{protocol.name}: sampled queries and their first {GRID_TOP_K} gallery "
           "images, framed green (same identity) or red (another)"
           + ("; the caption's modal weight is the attention's weight of the query's modality "
              "in its capture" if query_weights is not None else "") + ".")
      json_path = os.path.join(directory, name + ".json")
      visualize.write_json(json_path, description)
      written.append(json_path)
  every = tuple(range(len(query.modality_names)))
  fused = [p for p in protocols if p.query_modalities == every and p.gallery_modalities == every]
  if fused and options["num_grid_queries"] > 0:
    capture_weights = None
    if modal_weights is not None and np.all(query.tuple_ids >= 0):
      capture_weights = modal_weights["query"][1][capture_table(query)[1]]  # (N, M) per row
    for index, protocol in enumerate(fused, start=len(protocols)):
      fig, description = grid_picture(config, protocol, index, query, gallery, features,
                                      capture_weights, options["num_grid_queries"], step)
      name = "grid_" + visualize.file_stem(protocol.name)
      save(fig, name, f"{protocol.name}: sampled query captures (every modality, side by side"
           + (", in turn from each scene condition" if query.conditions is not None else "")
           + f") and their first {GRID_TOP_K} gallery captures, framed green (same identity) or "
           "red (another)" + ("; the caption's weights are the attention's, in modality order"
                              if capture_weights is not None else "") + ".")
      json_path = os.path.join(directory, name + ".json")
      visualize.write_json(json_path, {"dataset": report["dataset"], **description})
      written.append(json_path)

  if report.get("modal_weights_by_condition") or report.get("modality_share_by_condition"):
    save(visualize.condition_reliance_figure(
        report.get("modal_weights_by_condition", {}),
        report.get("modality_share_by_condition", {}), f"Modalities per scene condition, {title}"),
         "modal_weights_by_condition",
         "Per scene condition of the test captures: the attention's mean modality weight A_m(m) "
         "(captures with every modality) and each modality's share of the fused embedding, "
         "1 - cos(f, f without it), normalised over the modalities (docs/design.md, 'Scene "
         "conditions').")

  if modal_weights is not None:
    sides = [modal_weights["query"]] + ([] if gallery is query else [modal_weights["gallery"]])
    per_modality: dict[str, list[np.ndarray]] = {n: [] for n in query.modality_names}
    for table, weights in sides:
      several = (table >= 0).sum(axis=1) >= 2  # alone, a modality's weight is 1
      for m, name in enumerate(query.modality_names):
        per_modality[name].append(weights[several & (table[:, m] >= 0), m])
    save(visualize.modal_weight_figure({n: np.concatenate(v) for n, v in per_modality.items()},
                                       f"Cross-modal attention's modality weights, {title} "
                                       "(dashed: 1 / M)"),
         "modal_weights",
         "The cross-modal attention's modality weight A_m(m) of each modality in the test "
         "captures (" + ("aligned captures" if np.all(query.tuple_ids >= 0) else
                          "tuples of one image per modality and identity, seeded")
         + ", at least two modalities present; a modality alone has weight 1).")

  if single:
    sets = [(query, features[("query", None)])]
    if gallery is not query:
      sets.append((gallery, features[("gallery", None)]))
    pids = np.concatenate([s.pids for s, _ in sets])
    modalities = np.concatenate([s.modalities for s, _ in sets])
    embedded = np.concatenate([f for _, f in sets])
    chosen = np.isin(pids, visualize.sample_identities(pids, MAP_IDENTITIES, seed))
    method = options["embedding_map"]
    coords = visualize.project_2d(embedded[chosen], method, seed)
    label = {"pca": "PCA", "tsne": "t-SNE"}[method]
    save(visualize.embedding_map_figure(
        coords, pids[chosen], modalities[chosen], query.modality_names,
        f"{label} of the embeddings of {len(np.unique(pids[chosen]))} test identities, {title}"),
        "embedding_map",
        f"{label} map of the test embeddings (query and gallery images) of at most "
        f"{MAP_IDENTITIES} identities drawn with seed {seed}: colour by identity, marker by "
        "modality.")

  written.append(visualize.write_index(directory, report, pictures,
                                       f"{report['dataset']}.json"))
  if writer is not None and pixels:
    writer.write_images(step, {f"pictures/{name}": image[None] for name, image in pixels.items()})
  logging.info("Wrote %d pictures and %s", len(pixels), written[-1])
  return written


def write_report(report: dict[str, Any], workdir: str) -> str:
  """Writes WORKDIR/eval/<dataset>.json atomically; returns its path."""
  directory = os.path.join(workdir, "eval")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{report['dataset']}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2)
  os.replace(path + ".tmp", path)
  logging.info("Wrote %s", path)
  return path
