"""Tests for mmreid_jax.metrics against a per-query reference written like Torchreid's."""

from __future__ import annotations

import numpy as np
import pytest

from mmreid_jax import metrics
from mmreid_jax.metrics import (
  RankingResult,
  cosine_distance,
  euclidean_distance,
  evaluate_ranking,
)


def _reference_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, remove_same_camera=True):
  """Torchreid ``eval_market1501`` (python version) + AGW mINP, one query at a time.

  Deviations from Torchreid, matching the documented behaviour of the code under test:
  ``kind="stable"`` argsort, optional same-camera filtering, and CMC padded with its
  last value instead of truncating ``max_rank``.
  """
  num_q, num_g = distmat.shape
  indices = np.argsort(distmat, axis=1, kind="stable")
  matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)

  all_cmc = []
  all_AP = []
  all_INP = []
  num_valid_q = 0.0
  for q_idx in range(num_q):
    q_pid = q_pids[q_idx]
    q_camid = q_camids[q_idx]

    order = indices[q_idx]
    if remove_same_camera:
      remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
    else:
      remove = np.zeros(num_g, dtype=bool)
    keep = np.invert(remove)

    orig_cmc = matches[q_idx][keep]
    if not np.any(orig_cmc):
      continue

    cmc = orig_cmc.cumsum()
    pos_idx = np.where(orig_cmc == 1)
    pos_max_idx = np.max(pos_idx)
    inp = cmc[pos_max_idx] / (pos_max_idx + 1.0)
    all_INP.append(inp)

    cmc[cmc > 1] = 1
    cmc = cmc[:max_rank]
    if len(cmc) < max_rank:
      cmc = np.concatenate([cmc, np.full(max_rank - len(cmc), cmc[-1])])
    all_cmc.append(cmc)
    num_valid_q += 1.0

    num_rel = orig_cmc.sum()
    tmp_cmc = orig_cmc.cumsum()
    tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
    tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
    AP = tmp_cmc.sum() / num_rel
    all_AP.append(AP)

  assert num_valid_q > 0, "Error: all query identities do not appear in gallery"

  all_cmc = np.asarray(all_cmc).astype(np.float32)
  all_cmc = all_cmc.sum(0) / num_valid_q
  return all_cmc, np.mean(all_AP), np.mean(all_INP), int(num_valid_q)


def _random_problem(rng, num_q, num_g, num_pids, num_cams, integer_distances=False):
  if integer_distances:
    distmat = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float32)
  else:
    distmat = rng.random((num_q, num_g), dtype=np.float32)
  # Query pids range one past the gallery's so that some queries have no match at all.
  q_pids = rng.integers(0, num_pids + 1, size=num_q)
  g_pids = rng.integers(0, num_pids, size=num_g)
  q_cams = rng.integers(0, num_cams, size=num_q)
  g_cams = rng.integers(0, num_cams, size=num_g)
  return distmat, q_pids, g_pids, q_cams, g_cams


def _assert_matches_reference(problem, max_rank, remove_same_camera):
  distmat, q_pids, g_pids, q_cams, g_cams = problem
  ref_cmc, ref_map, ref_minp, ref_valid = _reference_eval(
    distmat, q_pids, g_pids, q_cams, g_cams, max_rank, remove_same_camera
  )
  result = evaluate_ranking(
    distmat, q_pids, g_pids, q_cams, g_cams,
    max_rank=max_rank, protocol="market" if remove_same_camera else "regdb",
  )
  assert result.cmc.shape == (max_rank,)
  assert result.num_valid_queries == ref_valid
  np.testing.assert_allclose(result.cmc, ref_cmc, rtol=0, atol=1e-6)
  np.testing.assert_allclose(result.mAP, ref_map, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(result.mINP, ref_minp, rtol=1e-12, atol=1e-12)
  return result, ref_valid


# ---------------------------------------------------------------- hand-computed cases


def test_single_query_wrong_right_wrong_right():
  distmat = np.array([[0.0, 1.0, 2.0, 3.0]])
  result = evaluate_ranking(
    distmat,
    query_pids=np.array([1]),
    gallery_pids=np.array([2, 1, 3, 1]),
    query_camids=np.array([0]),
    gallery_camids=np.array([1, 1, 1, 1]),
    max_rank=5,
  )
  np.testing.assert_array_equal(result.cmc, [0.0, 1.0, 1.0, 1.0, 1.0])
  assert result.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
  assert result.mINP == pytest.approx(2 / 4)
  assert result.num_valid_queries == 1
  assert result.as_dict() == pytest.approx({"rank1": 0.0, "rank5": 1.0, "mAP": 0.5, "mINP": 0.5})


def test_same_camera_removal_and_no_removal():
  distmat = np.array([[0.0, 1.0, 2.0]])
  args = dict(
    query_pids=np.array([1]),
    gallery_pids=np.array([1, 2, 1]),
    query_camids=np.array([0]),
    gallery_camids=np.array([0, 1, 1]),
    max_rank=3,
  )
  # Filtered list: [wrong, right].
  removed = evaluate_ranking(distmat, protocol="market", **args)
  np.testing.assert_array_equal(removed.cmc, [0.0, 1.0, 1.0])
  assert removed.mAP == pytest.approx(0.5)
  assert removed.mINP == pytest.approx(0.5)
  # Unfiltered list: [right, wrong, right].
  kept = evaluate_ranking(distmat, protocol="regdb", **args)
  np.testing.assert_array_equal(kept.cmc, [1.0, 1.0, 1.0])
  assert kept.mAP == pytest.approx((1 / 1 + 2 / 3) / 2)
  assert kept.mINP == pytest.approx(2 / 3)


def test_two_queries_average_and_skipped_query():
  distmat = np.array(
    [
      [0.5, 0.1, 0.9],  # pid 1: order [1, 0, 2] -> [right, wrong, wrong]
      [0.1, 0.3, 0.2],  # pid 2: order [0, 2, 1] -> [wrong, right, wrong]
      [0.1, 0.2, 0.3],  # pid 9: absent from gallery, skipped
    ]
  )
  result = evaluate_ranking(
    distmat,
    query_pids=np.array([1, 2, 9]),
    gallery_pids=np.array([3, 1, 2]),
    query_camids=np.array([0, 0, 0]),
    gallery_camids=np.array([1, 1, 1]),
    max_rank=3,
  )
  assert result.num_valid_queries == 2
  np.testing.assert_allclose(result.cmc, [0.5, 1.0, 1.0])
  assert result.mAP == pytest.approx((1.0 + 0.5) / 2)
  assert result.mINP == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize(
  "gallery_pids, expected_rank1",
  [(np.array([2, 1]), 0.0), (np.array([1, 2]), 1.0)],
)
def test_ties_keep_lower_gallery_index_first(gallery_pids, expected_rank1):
  result = evaluate_ranking(
    np.zeros((1, 2)),
    query_pids=np.array([1]),
    gallery_pids=gallery_pids,
    query_camids=np.array([0]),
    gallery_camids=np.array([1, 1]),
    max_rank=1,
  )
  assert result.cmc[0] == expected_rank1


def test_as_dict_keys_and_types():
  rng = np.random.default_rng(7)
  problem = _random_problem(rng, num_q=20, num_g=40, num_pids=5, num_cams=2)
  full = evaluate_ranking(*problem, max_rank=20).as_dict()
  assert list(full) == ["rank1", "rank5", "rank10", "rank20", "mAP", "mINP"]
  assert all(type(v) is float for v in full.values())
  assert list(evaluate_ranking(*problem, max_rank=7).as_dict()) == ["rank1", "rank5", "mAP", "mINP"]
  assert list(evaluate_ranking(*problem, max_rank=1).as_dict()) == ["rank1", "mAP", "mINP"]


def test_result_is_frozen():
  rng = np.random.default_rng(8)
  result = evaluate_ranking(*_random_problem(rng, 10, 30, 4, 2), max_rank=5)
  assert isinstance(result, RankingResult)
  with pytest.raises(AttributeError):
    result.mAP = 1.0  # type: ignore[misc]


def test_perfect_ranking_scores_one():
  pids = np.arange(6)
  distmat = 1.0 - np.eye(6)
  result = evaluate_ranking(distmat, pids, pids, np.zeros(6), np.ones(6), max_rank=3)
  np.testing.assert_array_equal(result.cmc, [1.0, 1.0, 1.0])
  assert result.mAP == 1.0
  assert result.mINP == 1.0


# ---------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("remove_same_camera", [True, False])
def test_random_matches_reference(seed, remove_same_camera):
  rng = np.random.default_rng(seed)
  num_q = int(rng.integers(1, 80))
  num_g = int(rng.integers(25, 120))
  problem = _random_problem(rng, num_q, num_g, num_pids=6, num_cams=3)
  _assert_matches_reference(problem, max_rank=20, remove_same_camera=remove_same_camera)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("remove_same_camera", [True, False])
def test_integer_distances_with_ties_match_stable_reference(seed, remove_same_camera):
  rng = np.random.default_rng(100 + seed)
  # num_g > 16 so a non-stable sort (introsort) would order ties differently.
  problem = _random_problem(rng, 60, 90, num_pids=5, num_cams=2, integer_distances=True)
  _assert_matches_reference(problem, max_rank=10, remove_same_camera=remove_same_camera)


def test_skipped_queries_are_exercised():
  rng = np.random.default_rng(3)
  problem = _random_problem(rng, 200, 30, num_pids=6, num_cams=2)
  _, num_valid = _assert_matches_reference(problem, max_rank=5, remove_same_camera=True)
  assert 0 < num_valid < 200


@pytest.mark.parametrize("remove_same_camera", [True, False])
def test_short_gallery_pads_cmc(remove_same_camera):
  rng = np.random.default_rng(11)
  problem = _random_problem(rng, 30, 8, num_pids=3, num_cams=2)
  result, _ = _assert_matches_reference(problem, max_rank=20, remove_same_camera=remove_same_camera)
  assert result.cmc[-1] == 1.0


def test_many_queries_span_several_chunks():
  rng = np.random.default_rng(21)
  problem = _random_problem(rng, 600, 50, num_pids=10, num_cams=3)
  _assert_matches_reference(problem, max_rank=20, remove_same_camera=True)


def test_small_chunks_give_same_result(monkeypatch):
  rng = np.random.default_rng(22)
  problem = _random_problem(rng, 53, 40, num_pids=6, num_cams=3)
  whole = evaluate_ranking(*problem, max_rank=10)
  monkeypatch.setattr(metrics, "_MAX_CHUNK_ROWS", 7)
  chunked = evaluate_ranking(*problem, max_rank=10)
  np.testing.assert_allclose(chunked.cmc, whole.cmc, rtol=0, atol=1e-15)
  assert chunked.mAP == pytest.approx(whole.mAP, rel=1e-12)
  assert chunked.mINP == pytest.approx(whole.mINP, rel=1e-12)
  assert chunked.num_valid_queries == whole.num_valid_queries


def test_metric_ranges():
  rng = np.random.default_rng(5)
  result = evaluate_ranking(*_random_problem(rng, 100, 100, 8, 3), max_rank=20)
  assert np.all((result.cmc >= 0) & (result.cmc <= 1))
  assert np.all(np.diff(result.cmc) >= 0)
  assert 0.0 < result.mINP <= result.mAP <= 1.0


# ---------------------------------------------------------------- errors


def test_no_valid_query_raises():
  with pytest.raises(ValueError, match="no valid query"):
    evaluate_ranking(
      np.zeros((2, 3)),
      query_pids=np.array([7, 8]),
      gallery_pids=np.array([1, 2, 3]),
      query_camids=np.array([0, 0]),
      gallery_camids=np.array([1, 1, 1]),
    )


def test_only_same_camera_matches_raises_unless_kept():
  args = (
    np.zeros((1, 2)),
    np.array([1]),
    np.array([1, 2]),
    np.array([0]),
    np.array([0, 0]),
  )
  with pytest.raises(ValueError, match="no valid query"):
    evaluate_ranking(*args, protocol="market")
  assert evaluate_ranking(*args, protocol="regdb").num_valid_queries == 1


def test_empty_inputs_raise():
  with pytest.raises(ValueError, match="no valid query"):
    evaluate_ranking(np.zeros((0, 3)), [], [1, 2, 3], [], [0, 0, 0])
  with pytest.raises(ValueError, match="no valid query"):
    evaluate_ranking(np.zeros((2, 0)), [1, 2], [], [0, 0], [])


@pytest.mark.parametrize(
  "distmat, q_pids, g_pids, q_cams, g_cams",
  [
    (np.zeros(3), [1], [1, 2, 3], [0], [0, 0, 0]),
    (np.zeros((1, 3)), [1, 2], [1, 2, 3], [0], [0, 0, 0]),
    (np.zeros((1, 3)), [1], [1, 2], [0], [0, 0, 0]),
    (np.zeros((1, 3)), [1], [1, 2, 3], [0], [0, 0]),
  ],
)
def test_shape_mismatch_raises(distmat, q_pids, g_pids, q_cams, g_cams):
  with pytest.raises(ValueError):
    evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams)


def test_bad_max_rank_raises():
  with pytest.raises(ValueError, match="max_rank"):
    evaluate_ranking(np.zeros((1, 2)), [1], [1, 2], [0], [1, 1], max_rank=0)


# ---------------------------------------------------------------- distances


def test_cosine_distance_matches_plain_formula():
  rng = np.random.default_rng(0)
  query = rng.normal(size=(7, 16)).astype(np.float32)
  gallery = rng.normal(size=(11, 16)).astype(np.float32)
  query[2] = 0.0
  gallery[4] = 0.0

  expected = np.empty((7, 11))
  for i, q in enumerate(query.astype(np.float64)):
    for j, g in enumerate(gallery.astype(np.float64)):
      denom = np.sqrt(q @ q) * np.sqrt(g @ g)
      expected[i, j] = 1.0 - (q @ g / denom if denom > 0 else 0.0)

  dist = cosine_distance(query, gallery)
  assert dist.shape == (7, 11)
  assert dist.dtype == np.float32
  assert np.all(np.isfinite(dist))
  np.testing.assert_allclose(dist, expected, atol=1e-5)
  np.testing.assert_array_equal(dist[2], 1.0)
  np.testing.assert_array_equal(dist[:, 4], 1.0)


def test_cosine_distance_scale_invariant_and_self_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(np.diag(cosine_distance(x, x)), 0.0, atol=1e-6)
  np.testing.assert_allclose(cosine_distance(3.0 * x, x), cosine_distance(x, x), atol=1e-6)
  np.testing.assert_allclose(cosine_distance(x, -x).diagonal(), 2.0, atol=1e-6)


def test_euclidean_distance_matches_plain_formula():
  rng = np.random.default_rng(2)
  query = rng.normal(size=(6, 12)).astype(np.float32)
  gallery = rng.normal(size=(9, 12)).astype(np.float32)
  gallery[3] = query[1]
  expected = np.linalg.norm(
    query.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[None, :, :], axis=-1
  )
  dist = euclidean_distance(query, gallery)
  assert dist.shape == (6, 9)
  assert dist.dtype == np.float32
  assert np.all(np.isfinite(dist))
  np.testing.assert_allclose(dist, expected, atol=1e-3)
  assert dist[1, 3] < 1e-2


def test_distance_dimension_mismatch_raises():
  with pytest.raises(ValueError, match="dimension"):
    cosine_distance(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="2-D"):
    euclidean_distance(np.zeros(3), np.zeros((2, 3)))


# ---------------------------------------------------------------- features, bounded memory


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_evaluate_features_equals_the_dense_matrix(protocol, distance):
  rng = np.random.default_rng(31)
  query, gallery = rng.normal(size=(70, 16)), rng.normal(size=(300, 16))
  gallery[5] = gallery[9] = query[3]  # exact ties
  q_pids, g_pids = rng.integers(0, 12, 70), rng.integers(0, 10, 300)
  q_cams, g_cams = rng.integers(1, 7, 70), rng.integers(1, 7, 300)
  dense = {"cosine": cosine_distance, "euclidean": euclidean_distance}[distance](query, gallery)
  expected = evaluate_ranking(dense, q_pids, g_pids, q_cams, g_cams, protocol=protocol)
  result = metrics.evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams,
                                     distance=distance, protocol=protocol)
  np.testing.assert_array_equal(result.cmc, expected.cmc)
  assert (result.mAP, result.mINP, result.num_valid_queries) == (
      expected.mAP, expected.mINP, expected.num_valid_queries)


def test_evaluate_features_memory_is_bounded():
  import tracemalloc

  def peak_bytes(num_q: int, num_g: int) -> int:
    rng = np.random.default_rng(32)
    query = rng.normal(size=(num_q, 8)).astype(np.float32)
    gallery = rng.normal(size=(num_g, 8)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 500, num_q), rng.integers(0, 500, num_g)
    tracemalloc.start()
    try:
      metrics.evaluate_features(query, gallery, q_pids, g_pids, np.zeros(num_q), np.ones(num_g))
      return tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()

  small, large = peak_bytes(300, 40_000), peak_bytes(2400, 40_000)
  assert large < 1.1 * small  # chunks of queries: the peak does not grow with Q
  assert large < 2400 * 40_000 * 4 / 4  # a quarter of the dense float32 matrix


def test_infinite_distances_rank_after_the_finite_ones():
  # Gallery 0 is removed (same identity and camera: +inf inside the ranking); the kept infinite
  # entries 1 and 3 follow the finite ones, lower index first.
  distmat = np.array([[0.5, np.inf, 0.2, np.inf, 0.9]])
  g_pids, g_cams = np.array([7, 1, 2, 7, 3]), np.array([0, 1, 1, 1, 1])
  result = evaluate_ranking(distmat, np.array([7]), g_pids, np.array([0]), g_cams, max_rank=5)
  # Kept ranking: 2 (0.2), 4 (0.9), 1 (inf), 3 (inf): the one correct match at position 4.
  np.testing.assert_array_equal(result.cmc, [0, 0, 0, 1, 1])
  assert result.mAP == pytest.approx(1 / 4) and result.mINP == pytest.approx(1 / 4)


def test_nan_distances_are_refused_with_the_query_rows():
  distmat = np.zeros((4, 3))
  distmat[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"NaN \(query rows 2\)"):
    evaluate_ranking(distmat, np.zeros(4), np.zeros(3), np.zeros(4), np.ones(3))


def test_evaluate_features_unknown_distance():
  with pytest.raises(ValueError, match="distance='hamming'"):
    metrics.evaluate_features(np.ones((2, 3)), np.ones((2, 3)), [0, 1], [0, 1], [0, 0], [1, 1],
                              distance="hamming")
