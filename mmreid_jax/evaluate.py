"""Evaluation: feature extraction, the protocols of each dataset, reports.

Each image is embedded alone, with its own modality (the post-BNNeck embedding, averaged with its
mirror image when `config.eval.flip`), L2-normalised, and ranked by cosine or Euclidean distance.
Metrics (CMC, mAP, mINP) come from `metrics.evaluate_ranking`. Results go to
WORKDIR/eval/<dataset>.json in the format of DESIGN.md section 8, to TensorBoard and to stdout.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from mmreid_jax import metrics
from mmreid_jax.data import datasets
from mmreid_jax.data.pipeline import eval_batches


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One retrieval setting: which query rows search which gallery rows.

  Attributes:
    name: the key in the results JSON (e.g. "ir->rgb").
    query_rows, gallery_rows: row indices into the query and gallery splits.
    remove_same_camera: Market-1501-style filtering of same-identity same-camera gallery images.
  """

  name: str
  query_rows: np.ndarray
  gallery_rows: np.ndarray
  remove_same_camera: bool = True


def synthetic_protocols(query: datasets.ImageSet, gallery: datasets.ImageSet) -> list[Protocol]:
  """Every ordered pair of distinct modalities ("A->B"), then "all" (every modality both sides).

  A gallery image of the query's identity from the query's own camera is ignored (the aligned
  captures of one camera would otherwise make cross-modal retrieval trivial).
  """
  names = query.modality_names
  protocols = [Protocol(f"{names[a]}->{names[b]}", np.flatnonzero(query.modalities == a),
                        np.flatnonzero(gallery.modalities == b))
               for a, b in itertools.permutations(range(len(names)), 2)]
  protocols.append(Protocol("all", np.arange(len(query)), np.arange(len(gallery))))
  return protocols


PROTOCOLS: dict[str, Callable[[datasets.ImageSet, datasets.ImageSet], list[Protocol]]] = {
    "synthetic_mm": synthetic_protocols,
}

DISTANCES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cosine": metrics.cosine_distance,
    "euclidean": metrics.euclidean_distance,
}


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows of (N, D) scaled to unit norm (zero rows stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FeatureExtractor:
  """Embeds single-modality images with a model's eval-mode forward pass, jitted per modality.

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
    self._fns: dict[int, Callable] = {}

  def _embed_fn(self, modality: int) -> Callable:
    if modality not in self._fns:
      def embed(variables, images):
        present = jnp.ones((images.shape[0], 1), bool)
        outputs = self.model.apply(variables, images[:, None], present, (modality,),
                                   train=False)
        return outputs["embeddings"][:, 0].astype(jnp.float32), outputs["modal_weights"][:, 0]
      self._fns[modality] = jax.jit(embed)
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
      images = jax.device_put(images, self.sharding) if self.sharding is not None else images
      embeddings, _ = fn(self.variables, images)
      outputs.append(np.asarray(embeddings)[:count])
    return np.concatenate(outputs)


def raw_pixel_features(image_set: datasets.ImageSet, height: int, width: int) -> np.ndarray:
  """(N, H * W * 3) L2-normalised raw pixels, the baseline every learned model must beat."""
  batches = [images[:count].reshape(count, -1).astype(np.float32)
             for images, count in eval_batches(image_set, height, width, 256)]
  return l2_normalize(np.concatenate(batches))


def rank_protocols(protocols: list[Protocol], query: datasets.ImageSet,
                   gallery: datasets.ImageSet, query_features: np.ndarray,
                   gallery_features: np.ndarray, distance: str, max_rank: int
                   ) -> dict[str, metrics.RankingResult]:
  """Ranks every protocol with one set of features."""
  if distance not in DISTANCES:
    raise ValueError(f"config.eval.distance={distance!r}; expected one of {sorted(DISTANCES)}.")
  results = {}
  for protocol in protocols:
    q, g = protocol.query_rows, protocol.gallery_rows
    distmat = DISTANCES[distance](query_features[q], gallery_features[g])
    results[protocol.name] = metrics.evaluate_ranking(
        distmat, query.pids[q], gallery.pids[g], query.camids[q], gallery.camids[g],
        max_rank=max_rank, remove_same_camera=protocol.remove_same_camera)
  return results


def protocol_entry(result: metrics.RankingResult) -> dict[str, Any]:
  """One protocol's JSON entry (DESIGN.md section 8)."""
  entry = result.as_dict()
  entry["trials"] = 1
  entry["std"] = {"rank1": 0.0, "mAP": 0.0, "mINP": 0.0}
  return entry


def format_table(report: dict[str, Any]) -> str:
  """The results as a fixed-width text table, percentages, learned model beside the baseline."""
  baseline = report.get("baselines", {}).get("raw_pixel", {})
  lines = [f"{report['dataset']} at step {report['step']}",
           f"{'protocol':<14}{'Rank-1':>8}{'Rank-5':>8}{'Rank-10':>8}{'mAP':>8}{'mINP':>8}"
           f"   | raw pixels {'Rank-1':>7}{'mAP':>7}{'mINP':>7}"]
  for name, entry in report["protocols"].items():
    line = (f"{name:<14}{100 * entry['rank1']:8.1f}{100 * entry['rank5']:8.1f}"
            f"{100 * entry['rank10']:8.1f}{100 * entry['mAP']:8.1f}{100 * entry['mINP']:8.1f}")
    if name in baseline:
      raw = baseline[name]
      line += f"   | {'':>10} {100 * raw['rank1']:7.1f}{100 * raw['mAP']:7.1f}{100 * raw['mINP']:7.1f}"
    lines.append(line)
  return "\n".join(lines)


def evaluate_model(config: ml_collections.ConfigDict, builder, model, variables: dict[str, Any],
                   step: int, workdir: str, sharding: jax.sharding.Sharding | None = None
                   ) -> dict[str, Any]:
  """Evaluates `variables` on the test splits; writes JSON and TensorBoard; returns the report."""
  dataset_name = builder.name
  if dataset_name not in PROTOCOLS:
    raise ValueError(f"No evaluation protocol for dataset {dataset_name!r}; known: "
                     f"{sorted(PROTOCOLS)}.")
  query = datasets.load_split(builder, "query")
  gallery = datasets.load_split(builder, "gallery")
  protocols = PROTOCOLS[dataset_name](query, gallery)
  height, width = config.data.height, config.data.width
  extractor = FeatureExtractor(model, variables, config.eval.batch_size, sharding)
  query_features = extractor(query, height, width, config.eval.flip)
  gallery_features = extractor(gallery, height, width, config.eval.flip)
  ranked = rank_protocols(protocols, query, gallery, query_features, gallery_features,
                          config.eval.distance, config.eval.max_rank)
  report: dict[str, Any] = {
      "dataset": dataset_name, "step": int(step),
      "protocols": {name: protocol_entry(result) for name, result in ranked.items()},
  }
  if config.eval.raw_pixel_baseline:
    raw = rank_protocols(protocols, query, gallery, raw_pixel_features(query, height, width),
                         raw_pixel_features(gallery, height, width), "cosine",
                         config.eval.max_rank)
    report["baselines"] = {"raw_pixel": {
        name: {k: v for k, v in result.as_dict().items() if k in ("rank1", "mAP", "mINP")}
        for name, result in raw.items()}}
  if jax.process_index() == 0:
    write_report(report, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=False,
                                                  collection="eval")
    writer.write_scalars(step, {f"{name}/{metric}": value
                                for name, entry in report["protocols"].items()
                                for metric, value in entry.items()
                                if isinstance(value, float)})
    writer.flush()
  return report


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
