"""Retrieval metrics for person re-identification (NumPy, host side).

Distances between query and gallery embeddings, and the ranking metrics used by
the re-ID literature: CMC (rank-k), mAP (Torchreid's ``eval_market1501``) and
mINP (Ye et al. 2021, "Deep Learning for Person Re-identification: A Survey and
Outlook", the AGW baseline).

Shapes: ``Q`` queries, ``G`` gallery entries, ``D`` embedding dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
  "RankingResult",
  "cosine_distance",
  "euclidean_distance",
  "evaluate_ranking",
]

_NORM_EPS = 1e-12
_MAX_CHUNK_ROWS = 256
# Elements of the (rows, G) working arrays per chunk; bounds memory for large galleries.
_CHUNK_ELEMENTS = 1 << 22
_REPORTED_RANKS = (1, 5, 10, 20)


def _as_2d_float32(x: ArrayLike, name: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float32)
  if arr.ndim != 2:
    raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
  return arr


def _check_features(query: ArrayLike, gallery: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  q = _as_2d_float32(query, "query")
  g = _as_2d_float32(gallery, "gallery")
  if q.shape[1] != g.shape[1]:
    raise ValueError(
      f"query and gallery feature dimensions differ: {q.shape[1]} vs {g.shape[1]}"
    )
  return q, g


def _l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows divided by their L2 norm; all-zero rows stay zero. ``(N, D) -> (N, D)``."""
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.maximum(norms, _NORM_EPS)


def cosine_distance(query: ArrayLike, gallery: ArrayLike) -> np.ndarray:
  """Cosine distance ``1 - cos(q, g)`` between every query and gallery row.

  Args:
    query: ``(Q, D)`` query features.
    gallery: ``(G, D)`` gallery features.

  Returns:
    ``(Q, G)`` float32 distances in ``[0, 2]`` (rounding excess is clipped).
    A zero feature row has similarity 0, hence distance 1, to everything.
  """
  q, g = _check_features(query, gallery)
  sim = _l2_normalize(q) @ _l2_normalize(g).T
  return np.clip(1.0 - sim, 0.0, 2.0).astype(np.float32, copy=False)


def euclidean_distance(query: ArrayLike, gallery: ArrayLike) -> np.ndarray:
  """Euclidean distance between every query and gallery row.

  Computed as ``sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0))``; the clip removes the
  small negative values that cancellation produces for (near-)equal rows.

  Args:
    query: ``(Q, D)`` query features.
    gallery: ``(G, D)`` gallery features.

  Returns:
    ``(Q, G)`` float32 distances.
  """
  q, g = _check_features(query, gallery)
  sq = (
    np.sum(q * q, axis=1)[:, None]
    + np.sum(g * g, axis=1)[None, :]
    - 2.0 * (q @ g.T)
  )
  return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class RankingResult:
  """Ranking metrics averaged over the valid queries.

  Attributes:
    cmc: ``(max_rank,)`` float64 CMC curve; ``cmc[k - 1]`` is the fraction of
    valid queries whose first correct match is within the top ``k``.
    mAP: mean average precision.
    mINP: mean inverse negative penalty (AGW).
    num_valid_queries: queries that had at least one correct match left
    after same-camera filtering; the others are skipped.
  """

  cmc: np.ndarray
  mAP: float
  mINP: float
  num_valid_queries: int

  def as_dict(self) -> dict[str, float]:
    """``rank1``/``rank5``/``rank10``/``rank20`` (those ``<= max_rank``), ``mAP``, ``mINP``."""
    out = {f"rank{k}": float(self.cmc[k - 1]) for k in _REPORTED_RANKS if k <= len(self.cmc)}
    out["mAP"] = float(self.mAP)
    out["mINP"] = float(self.mINP)
    return out


def _as_1d(x: ArrayLike, length: int, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.shape != (length,):
    raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")
  return arr


def _rank_chunk(
  distmat: np.ndarray,
  query_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_pids: np.ndarray,
  gallery_camids: np.ndarray,
  remove_same_camera: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-query statistics for one chunk of ``C`` queries.

  Args:
    distmat: ``(C, G)`` distances.
    query_pids, query_camids: ``(C,)``.
    gallery_pids, gallery_camids: ``(G,)``.
    remove_same_camera: drop same-pid same-camera gallery entries.

  Returns:
    ``num_rel (C,)`` correct matches kept, ``first_hit (C,)`` and
    ``last_hit (C,)`` 1-based kept-list positions of the first / last correct
    match (0 where there is none), ``ap (C,)`` float64 average precision
    (0 where there is no correct match).
  """
  order = np.argsort(distmat, axis=1, kind="stable")
  matches = gallery_pids[order] == query_pids[:, None]
  if remove_same_camera:
    keep = ~(matches & (gallery_camids[order] == query_camids[:, None]))
    rel = matches & keep
    # Position of each entry in the filtered list, without compacting rows of unequal length.
    position = np.cumsum(keep, axis=1, dtype=np.int64)
  else:
    rel = matches
    position = np.broadcast_to(np.arange(1, order.shape[1] + 1, dtype=np.int64), order.shape)

  num_rel = rel.sum(axis=1, dtype=np.int64)
  hits_so_far = np.cumsum(rel, axis=1, dtype=np.int64)
  precision_at_hits = np.where(rel, hits_so_far / np.maximum(position, 1), 0.0)
  ap = precision_at_hits.sum(axis=1) / np.maximum(num_rel, 1)

  big = np.iinfo(np.int64).max
  first_hit = np.where(rel, position, big).min(axis=1, initial=big)
  first_hit = np.where(num_rel > 0, first_hit, 0)
  last_hit = np.where(rel, position, 0).max(axis=1, initial=0)
  return num_rel, first_hit, last_hit, ap


def evaluate_ranking(
  distmat: ArrayLike,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  max_rank: int = 20,
  remove_same_camera: bool = True,
) -> RankingResult:
  """CMC, mAP and mINP of a query-gallery distance matrix.

  Follows Torchreid's ``eval_market1501``: each query ranks the gallery by
  ``np.argsort(distmat, kind="stable")`` (ties keep the lower gallery index
  first); with ``remove_same_camera`` the gallery entries sharing both the
  query's pid and camera are removed (set it False for protocols without
  that rule, e.g. RegDB); queries left with no correct match are skipped.
  For a valid query, over its filtered list with relevance ``rel_k``:
  ``CMC@k = [a correct match within the top k]``,
  ``AP = sum_k precision@k * rel_k / num_rel`` and
  ``INP = num_rel / (1-based position of the last correct match)``.
  All three are averaged over the valid queries.

  Unlike Torchreid, which asserts or truncates ``max_rank`` when fewer than
  ``max_rank`` gallery entries are available, the CMC curve of a query whose
  filtered list is shorter than ``max_rank`` is padded with its last value
  (1, since the query has a correct match); ``cmc`` always has
  ``max_rank`` entries.

  Args:
    distmat: ``(Q, G)`` distances, smaller is more similar.
    query_pids: ``(Q,)`` query identities.
    gallery_pids: ``(G,)`` gallery identities.
    query_camids: ``(Q,)`` query camera ids.
    gallery_camids: ``(G,)`` gallery camera ids.
    max_rank: length of the returned CMC curve.
    remove_same_camera: drop same-pid same-camera gallery entries per query.

  Returns:
    A ``RankingResult`` with ``cmc`` of shape ``(max_rank,)``.

  Raises:
    ValueError: on inconsistent shapes, ``max_rank < 1``, or when no query
    has a correct match in the (filtered) gallery.
  """
  dist = np.asarray(distmat)
  if dist.ndim != 2:
    raise ValueError(f"distmat must be 2-D (Q, G), got shape {dist.shape}")
  num_q, num_g = dist.shape
  q_pids = _as_1d(query_pids, num_q, "query_pids")
  q_cams = _as_1d(query_camids, num_q, "query_camids")
  g_pids = _as_1d(gallery_pids, num_g, "gallery_pids")
  g_cams = _as_1d(gallery_camids, num_g, "gallery_camids")
  if max_rank < 1:
    raise ValueError(f"max_rank must be >= 1, got {max_rank}")

  # first_hit_counts[r] = number of valid queries whose first correct match is at position r (1-based).
  first_hit_counts = np.zeros(max_rank + 1, dtype=np.int64)
  ap_sum = 0.0
  inp_sum = 0.0
  num_valid = 0
  rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(num_g, 1)))
  for start in range(0, num_q, rows):
    stop = min(start + rows, num_q)
    num_rel, first_hit, last_hit, ap = _rank_chunk(
      dist[start:stop],
      q_pids[start:stop],
      q_cams[start:stop],
      g_pids,
      g_cams,
      remove_same_camera,
    )
    valid = num_rel > 0
    num_valid += int(valid.sum())
    ap_sum += float(ap[valid].sum())
    inp_sum += float((num_rel[valid] / last_hit[valid]).sum())
    hits_in_range = first_hit[valid]
    hits_in_range = hits_in_range[hits_in_range <= max_rank]
    first_hit_counts += np.bincount(hits_in_range, minlength=max_rank + 1)

  if num_valid == 0:
    filtering = " after removing same-pid same-camera gallery entries" if remove_same_camera else ""
    raise ValueError(
      f"no valid query: none of the {num_q} queries has a matching identity "
      f"in the gallery{filtering}"
    )

  cmc = np.cumsum(first_hit_counts[1:]) / num_valid
  cmc.setflags(write=False)
  return RankingResult(
    cmc=cmc,
    mAP=ap_sum / num_valid,
    mINP=inp_sum / num_valid,
    num_valid_queries=num_valid,
  )
