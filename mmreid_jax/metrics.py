"""Retrieval metrics for person re-identification (NumPy, host side).

Distances between query and gallery embeddings, the ranking metrics used by
the re-ID literature: CMC (rank-k), mAP (Torchreid's ``eval_market1501``) and
mINP (Ye et al. 2021, "Deep Learning for Person Re-identification: A Survey and
Outlook", the AGW baseline), under the filtering rules of each benchmark's
official evaluation code (``PROTOCOLS``), and k-reciprocal re-ranking (Zhong et
al. 2017).

Shapes: ``Q`` queries, ``G`` gallery entries, ``D`` embedding dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
  "PROTOCOLS",
  "RankingResult",
  "cosine_distance",
  "euclidean_distance",
  "evaluate_features",
  "evaluate_rank",
  "evaluate_ranking",
  "k_reciprocal_rerank",
  "ranked_gallery",
]

_NORM_EPS = 1e-12
_MAX_CHUNK_ROWS = 256
# Elements of the (rows, G) working arrays per chunk; bounds memory for large galleries.
_CHUNK_ELEMENTS = 1 << 22
_REPORTED_RANKS = (1, 5, 10, 20)

# Which gallery entries a query ignores, and how its CMC counts, per benchmark:
#   "market": entries with the query's identity and camera are ignored (Market-1501, Torchreid).
#   "regdb":  nothing is ignored (RegDB's eval_regdb: one visible and one thermal camera).
#   "sysu":   a camera-3 query ignores every camera-2 entry (the two share a location), and the CMC
#             counts each gallery identity once, at its first occurrence in the ranking
#             (SYSU-MM01's eval_sysu, after the dataset authors' MATLAB code); mAP and mINP use
#             every kept entry.
PROTOCOLS = ("market", "regdb", "sysu")
_SYSU_QUERY_CAMERA = 3
_SYSU_IGNORED_GALLERY_CAMERA = 2


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


def _cosine_of_normalized(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """``(Q, G)`` float32 ``1 - q.g`` of L2-normalised rows, clipped to ``[0, 2]``."""
  distances = (q @ g.T).astype(np.float32, copy=False)
  np.subtract(1.0, distances, out=distances)
  return np.clip(distances, 0.0, 2.0, out=distances)


def _euclidean_of_rows(q: np.ndarray, g: np.ndarray) -> np.ndarray:
  """``(Q, G)`` float32 ``sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0))``."""
  sq = (
    np.sum(q * q, axis=1)[:, None]
    + np.sum(g * g, axis=1)[None, :]
    - 2.0 * (q @ g.T)
  )
  return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32, copy=False)


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
  return _cosine_of_normalized(_l2_normalize(q), _l2_normalize(g))


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
  return _euclidean_of_rows(q, g)


# {name: (what is done once to each side's features, the distances of prepared rows)}.
_PAIRWISE: dict[str, tuple[Callable[[np.ndarray], np.ndarray],
                           Callable[[np.ndarray, np.ndarray], np.ndarray]]] = {
  "cosine": (_l2_normalize, _cosine_of_normalized),
  "euclidean": (lambda x: x, _euclidean_of_rows),
}


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


def _labels(
  num_q: int,
  num_g: int,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  protocol: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The checked labels of a ranking: query pids and camids ``(Q,)``, then gallery pids and
  camids ``(G,)``.

  Raises:
    ValueError: labels of another length, or an unknown ``protocol``.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol={protocol!r}; expected one of {PROTOCOLS}")
  return (_as_1d(query_pids, num_q, "query_pids"), _as_1d(query_camids, num_q, "query_camids"),
          _as_1d(gallery_pids, num_g, "gallery_pids"),
          _as_1d(gallery_camids, num_g, "gallery_camids"))


def _ranking_inputs(
  distmat: ArrayLike,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  protocol: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The checked arrays of a ranking: ``(Q, G)`` distances, then the ``_labels``.

  Raises:
    ValueError: a distance matrix that is not 2-D, labels of another length, or an unknown
    ``protocol``.
  """
  dist = np.asarray(distmat)
  if dist.ndim != 2:
    raise ValueError(f"distmat must be 2-D (Q, G), got shape {dist.shape}")
  return (dist, *_labels(*dist.shape, query_pids, gallery_pids, query_camids, gallery_camids,
                         protocol))


def _kept(
  matches: np.ndarray,
  query_camids: np.ndarray,
  ranked_gallery_camids: np.ndarray,
  protocol: str,
) -> np.ndarray:
  """Which entries of each query's ranking ``protocol`` keeps (see ``PROTOCOLS``).

  Args:
    matches: ``(C, G)`` bool, ranked gallery entry has the query's identity.
    query_camids: ``(C,)``.
    ranked_gallery_camids: ``(C, G)`` camera of each ranked gallery entry.
    protocol: one of ``PROTOCOLS``.

  Returns:
    ``(C, G)`` bool.
  """
  if protocol == "market":
    return ~(matches & (ranked_gallery_camids == query_camids[:, None]))
  if protocol == "sysu":
    return ~((query_camids[:, None] == _SYSU_QUERY_CAMERA)
             & (ranked_gallery_camids == _SYSU_IGNORED_GALLERY_CAMERA))
  return np.ones_like(matches)  # "regdb"


def ranked_gallery(
  distmat: ArrayLike,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  top_k: int = 10,
  protocol: str = "market",
) -> np.ndarray:
  """Each query's first ``top_k`` gallery entries, in the order ``evaluate_ranking`` ranks them
  (stable argsort of the distances) after removing the entries ``protocol`` ignores.

  Args:
    distmat: ``(Q, G)`` distances.
    query_pids, query_camids: ``(Q,)``.
    gallery_pids, gallery_camids: ``(G,)``.
    top_k: entries per query.
    protocol: one of ``PROTOCOLS``.

  Returns:
    ``(Q, top_k)`` int64 gallery indices, ``-1`` past the end of a short kept list.
  """
  dist, q_pids, q_cams, g_pids, g_cams = _ranking_inputs(
    distmat, query_pids, gallery_pids, query_camids, gallery_camids, protocol)
  num_q = dist.shape[0]
  order = np.argsort(dist, axis=1, kind="stable")
  keep = _kept(g_pids[order] == q_pids[:, None], q_cams, g_cams[order], protocol)
  result = np.full((num_q, top_k), -1, np.int64)
  for row in range(num_q):
    kept = order[row][keep[row]][:top_k]
    result[row, :len(kept)] = kept
  return result


def _rank_chunk(
  distmat: np.ndarray,
  query_pids: np.ndarray,
  query_camids: np.ndarray,
  gallery_pids: np.ndarray,
  gallery_camids: np.ndarray,
  protocol: str,
  pid_groups: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Per-query statistics for one chunk of ``C`` queries.

  A query's ranking is its kept gallery entries ordered by (distance, gallery index), as a
  stable argsort gives it; an entry's 1-based position in it is one plus the number of kept
  entries before it. Each row's kept distances are sorted (values only, the removed entries
  moved past the end as +inf) and each correct match's position is found by binary search in
  them; equal distances, rare with real features, are then ordered by gallery index. This gives
  the argsort's numbers without argsorting every row (``np.sort`` of values is several times
  faster than a stable argsort, and only the correct matches are looked up).

  Args:
    distmat: ``(C, G)`` distances, without NaN.
    query_pids, query_camids: ``(C,)``.
    gallery_pids, gallery_camids: ``(G,)``.
    protocol: one of ``PROTOCOLS``.
    pid_groups: ``(pid_values (U,), members (G,), starts (U,), group_of (G,))``: the distinct
      gallery identities, the gallery indices sorted by identity, where each identity's run
      starts in ``members``, and each gallery entry's identity index into ``pid_values`` (only
      read by the "sysu" protocol).

  Returns:
    ``num_rel (C,)`` correct matches kept, ``cmc_rank (C,)`` the 1-based CMC rank of the first
    correct match (its kept-list position, or under "sysu" its position among distinct kept
    identities; 0 where there is none), ``last_hit (C,)`` the 1-based kept-list position of the
    last correct match (0 where there is none), ``ap (C,)`` float64 average precision (0 where
    there is no correct match).
  """
  num_rows = distmat.shape[0]
  matches = gallery_pids[None, :] == query_pids[:, None]
  keep = _kept(matches, query_camids, gallery_camids[None, :], protocol)
  rel = matches & keep
  num_rel = rel.sum(axis=1, dtype=np.int64)
  kept_distances = np.where(keep, distmat, np.inf)
  sorted_distances = np.sort(kept_distances, axis=1)

  first_hit = np.zeros(num_rows, np.int64)
  last_hit = np.zeros(num_rows, np.int64)
  ap = np.zeros(num_rows, np.float64)
  for row in np.flatnonzero(num_rel):
    hits = np.flatnonzero(rel[row])
    hit_distances = distmat[row, hits]
    by_rank = np.argsort(hit_distances, kind="stable")  # hits ascend: ties by gallery index
    hits, hit_distances = hits[by_rank], hit_distances[by_rank]
    before = np.searchsorted(sorted_distances[row], hit_distances, side="left")
    equal = np.searchsorted(sorted_distances[row], hit_distances, side="right") - before
    for j in np.flatnonzero(equal > 1):  # kept entries at the same distance, lower index first
      lower = slice(0, hits[j])
      before[j] += np.count_nonzero(keep[row, lower] & (distmat[row, lower] == hit_distances[j]))
    position = before + 1
    ap[row] = np.mean(np.arange(1, len(hits) + 1) / position)
    first_hit[row] = position[0]
    last_hit[row] = position[-1]
  if protocol != "sysu" or not num_rel.any():
    return num_rel, first_hit, last_hit, ap

  # Identity-level CMC: rank of the query's identity among the distinct identities of the kept
  # list, ordered by first occurrence: one plus the identities whose nearest kept entry comes
  # before the query identity's nearest (a smaller distance, or the same at a lower index).
  pid_values, members, starts, group_of = pid_groups
  nearest = np.minimum.reduceat(kept_distances[:, members], starts, axis=1)  # (C, U)
  query_group = np.minimum(np.searchsorted(pid_values, query_pids), len(pid_values) - 1)
  own = nearest[np.arange(num_rows), query_group]
  identity_rank = (nearest < own[:, None]).sum(axis=1) + 1
  tied = (nearest == own[:, None]).sum(axis=1) > 1
  for row in np.flatnonzero(tied & (num_rel > 0)):
    at_own = np.flatnonzero(keep[row] & (distmat[row] == own[row]))  # ascending gallery index
    own_first = at_own[group_of[at_own] == query_group[row]][0]
    earlier = group_of[at_own[at_own < own_first]]
    identity_rank[row] += len(np.unique(earlier[nearest[row, earlier] == own[row]]))
  return num_rel, np.where(num_rel > 0, identity_rank, 0), last_hit, ap


def _evaluate_chunks(
  distances: Callable[[int, int], np.ndarray],
  q_pids: np.ndarray,
  q_cams: np.ndarray,
  g_pids: np.ndarray,
  g_cams: np.ndarray,
  max_rank: int,
  protocol: str,
) -> RankingResult:
  """``evaluate_ranking`` of the distances ``distances(start, stop)`` gives for the queries
  ``start:stop`` (``(stop - start, G)``), a bounded chunk of rows at a time."""
  num_q, num_g = len(q_pids), len(g_pids)
  if max_rank < 1:
    raise ValueError(f"max_rank must be >= 1, got {max_rank}")
  pid_values, group_of = np.unique(g_pids, return_inverse=True)
  members = np.argsort(group_of, kind="stable")
  starts = np.searchsorted(g_pids[members], pid_values) if num_g else np.zeros(0, np.int64)

  # first_hit_counts[r] = number of valid queries whose first correct match is at position r (1-based).
  first_hit_counts = np.zeros(max_rank + 1, dtype=np.int64)
  ap_sum = 0.0
  inp_sum = 0.0
  num_valid = 0
  rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_ELEMENTS // max(num_g, 1)))
  for start in range(0, num_q, rows):
    stop = min(start + rows, num_q)
    chunk = distances(start, stop)
    if np.isnan(chunk).any():
      bad = start + np.flatnonzero(np.isnan(chunk).any(axis=1))
      raise ValueError(f"distances of {len(bad)} queries hold NaN (query rows "
                       f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}); "
                       "expected finite or infinite distances")
    num_rel, first_hit, last_hit, ap = _rank_chunk(
      chunk,
      q_pids[start:stop],
      q_cams[start:stop],
      g_pids,
      g_cams,
      protocol,
      (pid_values, members, starts, group_of),
    )
    valid = num_rel > 0
    num_valid += int(valid.sum())
    ap_sum += float(ap[valid].sum())
    inp_sum += float((num_rel[valid] / last_hit[valid]).sum())
    hits_in_range = first_hit[valid]
    hits_in_range = hits_in_range[hits_in_range <= max_rank]
    first_hit_counts += np.bincount(hits_in_range, minlength=max_rank + 1)

  if num_valid == 0:
    filtering = {
      "market": " after removing same-pid same-camera gallery entries",
      "sysu": " after removing camera-2 gallery entries for camera-3 queries",
      "regdb": "",
    }[protocol]
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


def evaluate_ranking(
  distmat: ArrayLike,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  max_rank: int = 20,
  protocol: str = "market",
) -> RankingResult:
  """CMC, mAP and mINP of a query-gallery distance matrix.

  Follows Torchreid's ``eval_market1501`` and the official evaluation code of
  RegDB and SYSU-MM01 (``eval_regdb`` / ``eval_sysu``): each query ranks the
  gallery by ``np.argsort(distmat, kind="stable")`` (ties keep the lower
  gallery index first); the gallery entries that ``protocol`` ignores for that
  query are removed (see ``PROTOCOLS``); queries left with no correct match are
  skipped. For a valid query, over its filtered list with relevance ``rel_k``:
  ``CMC@k = [a correct match within the top k]`` (under "sysu": within the
  first k distinct identities of the list),
  ``AP = sum_k precision@k * rel_k / num_rel`` and
  ``INP = num_rel / (1-based position of the last correct match)``.
  All three are averaged over the valid queries.

  Unlike Torchreid and the RegDB / SYSU-MM01 code, which assert, truncate
  ``max_rank`` or fail on ragged arrays when fewer than ``max_rank`` gallery
  entries (identities, under "sysu") are available, the CMC curve of such a
  query is padded with its last value (1, since the query has a correct
  match); ``cmc`` always has ``max_rank`` entries.

  Args:
    distmat: ``(Q, G)`` distances, smaller is more similar (no NaN).
    query_pids: ``(Q,)`` query identities.
    gallery_pids: ``(G,)`` gallery identities.
    query_camids: ``(Q,)`` query camera ids.
    gallery_camids: ``(G,)`` gallery camera ids.
    max_rank: length of the returned CMC curve.
    protocol: "market", "regdb" or "sysu" (``PROTOCOLS``).

  Returns:
    A ``RankingResult`` with ``cmc`` of shape ``(max_rank,)``.

  Raises:
    ValueError: on inconsistent shapes, ``max_rank < 1``, an unknown
    ``protocol``, NaN distances, or when no query has a correct match in the
    (filtered) gallery.
  """
  dist, q_pids, q_cams, g_pids, g_cams = _ranking_inputs(
    distmat, query_pids, gallery_pids, query_camids, gallery_camids, protocol)
  return _evaluate_chunks(lambda start, stop: dist[start:stop], q_pids, q_cams, g_pids, g_cams,
                          max_rank, protocol)


def evaluate_features(
  query_features: ArrayLike,
  gallery_features: ArrayLike,
  query_pids: ArrayLike,
  gallery_pids: ArrayLike,
  query_camids: ArrayLike,
  gallery_camids: ArrayLike,
  distance: str = "cosine",
  max_rank: int = 20,
  protocol: str = "market",
) -> RankingResult:
  """``evaluate_ranking`` of the ``distance`` between features, in bounded memory: the distances
  of a chunk of queries at a time (about ``_CHUNK_ELEMENTS`` of them), never the whole ``(Q, G)``
  matrix; the same numbers as ``evaluate_ranking(cosine_distance(q, g), ...)``.

  Args:
    query_features: ``(Q, D)``.
    gallery_features: ``(G, D)``.
    query_pids, query_camids: ``(Q,)``.
    gallery_pids, gallery_camids: ``(G,)``.
    distance: "cosine" (``cosine_distance``) or "euclidean" (``euclidean_distance``).
    max_rank: length of the CMC curve.
    protocol: one of ``PROTOCOLS``.
  """
  if distance not in _PAIRWISE:
    raise ValueError(f"distance={distance!r}; expected one of {sorted(_PAIRWISE)}")
  q, g = _check_features(query_features, gallery_features)
  prepare, pairwise = _PAIRWISE[distance]
  q, g = prepare(q), prepare(g)
  q_pids, q_cams, g_pids, g_cams = _labels(len(q), len(g), query_pids, gallery_pids,
                                           query_camids, gallery_camids, protocol)
  return _evaluate_chunks(lambda start, stop: pairwise(q[start:stop], g), q_pids, q_cams,
                          g_pids, g_cams, max_rank, protocol)


def evaluate_rank(
  distmat: ArrayLike,
  q_pids: ArrayLike,
  g_pids: ArrayLike,
  q_camids: ArrayLike,
  g_camids: ArrayLike,
  max_rank: int = 20,
  protocol: str = "market",
) -> dict[str, np.ndarray | float]:
  """CMC, mAP and mINP under a benchmark's rules, as a dict (see ``evaluate_ranking``).

  Args:
    distmat: ``(Q, G)`` distances, smaller is more similar.
    q_pids, g_pids: ``(Q,)`` and ``(G,)`` identities.
    q_camids, g_camids: ``(Q,)`` and ``(G,)`` cameras.
    max_rank: length of the CMC curve (padded when the gallery is shorter).
    protocol: "sysu", "regdb" or "market" (``PROTOCOLS``).

  Returns:
    ``{"cmc": (max_rank,) float64 fractions, "mAP": float, "mINP": float}``.
  """
  result = evaluate_ranking(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                            protocol=protocol)
  return {"cmc": result.cmc, "mAP": float(result.mAP), "mINP": float(result.mINP)}


def _top_k_mask(rank: np.ndarray, k: int) -> np.ndarray:
  """``(N, N)`` bool, ``[i, j]`` = j is among the first ``k`` entries of row i of ``rank``."""
  mask = np.zeros(rank.shape, dtype=bool)
  np.put_along_axis(mask, rank[:, :k], True, axis=1)
  return mask


def k_reciprocal_rerank(
  query_gallery: ArrayLike,
  query_query: ArrayLike,
  gallery_gallery: ArrayLike,
  k1: int = 20,
  k2: int = 6,
  lambda_value: float = 0.3,
) -> np.ndarray:
  """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of a query-gallery distance matrix.

  The algorithm of the authors' ``re_ranking`` (as in Torchreid): over all ``N = Q + G``
  images, squared distances are divided by each row's maximum; each image's k1-reciprocal
  neighbours (mutual top-``k1 + 1``) are expanded by the k1/2-reciprocal sets of its members that
  share more than 2/3 of their set with it; Gaussian weights ``exp(-d)`` over that set, normalised,
  form a vector ``V_i``, averaged over the top-``k2`` neighbours (query expansion); the Jaccard
  distance ``1 - sum min(V_q, V_g) / sum max(V_q, V_g)`` is blended with the normalised distance:
  ``(1 - lambda) * jaccard + lambda * original``. Computed in float64 (the authors' code keeps V
  in float16), with stable sorts. Memory grows as ``N^2``.

  Args:
    query_gallery: ``(Q, G)`` distances.
    query_query: ``(Q, Q)`` distances.
    gallery_gallery: ``(G, G)`` distances.
    k1, k2: neighbourhood sizes.
    lambda_value: weight of the original distance.

  Returns:
    ``(Q, G)`` float64 re-ranked distances.
  """
  q_g = np.asarray(query_gallery, dtype=np.float64)
  q_q = np.asarray(query_query, dtype=np.float64)
  g_g = np.asarray(gallery_gallery, dtype=np.float64)
  num_q, num_g = q_g.shape
  if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
    raise ValueError(f"distance shapes disagree: query_gallery {q_g.shape}, query_query "
                     f"{q_q.shape}, gallery_gallery {g_g.shape}")
  if k1 < 1 or k2 < 1:
    raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
  dist = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
  # As the authors: each column divided by its maximum, then transposed.
  original = (dist / np.maximum(dist.max(axis=0), _NORM_EPS)).T
  rank = np.argsort(original, axis=1, kind="stable")

  top = _top_k_mask(rank, k1 + 1)
  reciprocal = top & top.T
  half = int(np.around(k1 / 2))
  top_half = _top_k_mask(rank, half + 1)
  # Set sizes and overlaps are counts: float32 matrix products hold them exactly.
  reciprocal_half = (top_half & top_half.T).astype(np.float32)
  # Expansion: candidate c of i's set adds its own k1/2-reciprocal set when more than 2/3 of that
  # set lies in i's set.
  overlap = reciprocal.astype(np.float32) @ reciprocal_half.T
  sizes = reciprocal_half.sum(axis=1, dtype=np.float64)
  adds = reciprocal & (overlap > 2.0 / 3 * sizes[None, :])  # the authors' float64 threshold
  expanded = reciprocal | ((adds.astype(np.float32) @ reciprocal_half) > 0)

  weights = np.where(expanded, np.exp(-original), 0.0)
  v = weights / weights.sum(axis=1, keepdims=True)
  if k2 != 1:
    v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(v.shape[0])])

  gallery_v = v[num_q:]
  jaccard = np.empty((num_q, num_g))
  for i in range(num_q):
    support = np.flatnonzero(v[i])
    shared = np.minimum(v[i, support][None, :], gallery_v[:, support]).sum(axis=1)
    jaccard[i] = 1.0 - shared / (2.0 - shared)
  return jaccard * (1.0 - lambda_value) + original[:num_q, num_q:] * lambda_value
