"""The benchmark protocols, each rule against an independent reference written plainly from it.

References here never call the code under test: ranking metrics are per-query Python loops over
the rules of issue 3 (SYSU-MM01's camera-3 / camera-2 rule and identity-level CMC, RegDB without
filtering, Market-1501's same-identity-same-camera filter); the SYSU-MM01 draw is the reference
loader's code path (`random.seed(trial)`, `os.listdir`, `random.choice` / `random.sample`);
re-ranking is a loop transcription of Zhong et al.'s published algorithm.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from mmreid_jax import evaluate, metrics
from mmreid_jax.data import sysu_mm01
from mmreid_jax.data.datasets import ImageSet

# ------------------------------------------------------------------ ranking reference


def reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, max_rank, rule):
  """CMC / mAP / mINP one query at a time, from the rules.

  - Ranking: stable argsort, ties keep the lower gallery index.
  - Ignored gallery entries: "market": same identity and camera; "sysu": camera-2 entries for a
    camera-3 query; "regdb": none.
  - A query with no correct match among the kept entries is skipped.
  - CMC: "sysu" counts each gallery identity once (first occurrence in the kept ranking); the
    others count every kept entry. A curve shorter than max_rank is padded with its last value.
  - AP: mean of precision at each correct match of the kept list; INP: matches / position of the
    last match.
  """
  cmcs, aps, inps = [], [], []
  for i in range(len(q_pids)):
    order = sorted(range(len(g_pids)), key=lambda j: (distmat[i][j], j))
    kept = []
    for j in order:
      if rule == "market" and g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]:
        continue
      if rule == "sysu" and q_cams[i] == 3 and g_cams[j] == 2:
        continue
      kept.append(j)
    hits = [g_pids[j] == q_pids[i] for j in kept]
    if not any(hits):
      continue
    if rule == "sysu":
      identities = []
      for j in kept:
        if g_pids[j] not in identities:
          identities.append(g_pids[j])
      first = identities.index(q_pids[i]) + 1
    else:
      first = hits.index(True) + 1
    cmcs.append([1.0 if k >= first else 0.0 for k in range(1, max_rank + 1)])
    precisions, found = [], 0
    for position, hit in enumerate(hits, start=1):
      if hit:
        found += 1
        precisions.append(found / position)
    aps.append(sum(precisions) / len(precisions))
    last = max(p for p, hit in enumerate(hits, start=1) if hit)
    inps.append(found / last)
  return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


def random_problem(rng, num_q, num_g, num_pids, cameras, integer_distances=False):
  """Random distances (integers in 0..3 for many ties), identities repeated in the gallery, some
  query identities absent from it, cameras drawn from `cameras`."""
  if integer_distances:
    distmat = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float32)
  else:
    distmat = rng.random((num_q, num_g)).astype(np.float32)
  return (distmat, rng.integers(0, num_pids + 2, num_q), rng.integers(0, num_pids, num_g),
          rng.choice(cameras, num_q), rng.choice(cameras, num_g))


RULE_CAMERAS = {"sysu": (1, 2, 3, 4, 5, 6), "regdb": (1, 2), "market": (0, 1, 2)}


@pytest.mark.parametrize("rule", metrics.PROTOCOLS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer_distances", [False, True])
def test_evaluate_rank_matches_reference(rule, seed, integer_distances):
  """Random problems with ties, unmatched queries and repeated identities, every rule."""
  rng = np.random.default_rng(seed)
  problem = random_problem(rng, int(rng.integers(20, 60)), int(rng.integers(25, 90)), 6,
                           RULE_CAMERAS[rule], integer_distances)
  cmc, ap, inp, valid = reference_rank(*problem, max_rank=20, rule=rule)
  result = metrics.evaluate_rank(*problem, max_rank=20, protocol=rule)
  assert set(result) == {"cmc", "mAP", "mINP"}
  assert result["cmc"].shape == (20,)
  np.testing.assert_allclose(result["cmc"], cmc, rtol=0, atol=1e-12)
  assert result["mAP"] == pytest.approx(ap, abs=1e-12)
  assert result["mINP"] == pytest.approx(inp, abs=1e-12)
  assert metrics.evaluate_ranking(*problem, protocol=rule).num_valid_queries == valid
  assert 0 < valid < len(problem[1])  # some queries were skipped


@pytest.mark.parametrize("rule", metrics.PROTOCOLS)
def test_gallery_shorter_than_max_rank(rule):
  """5 gallery entries (3 identities) and max_rank 20: the curve is padded, not truncated."""
  rng = np.random.default_rng(7)
  problem = random_problem(rng, 12, 5, 3, RULE_CAMERAS[rule])
  cmc, ap, inp, _ = reference_rank(*problem, max_rank=20, rule=rule)
  result = metrics.evaluate_rank(*problem, max_rank=20, protocol=rule)
  assert result["cmc"].shape == (20,)
  np.testing.assert_allclose(result["cmc"], cmc, rtol=0, atol=1e-12)
  assert result["cmc"][-1] == 1.0
  assert result["mAP"] == pytest.approx(ap) and result["mINP"] == pytest.approx(inp)


def test_sysu_cmc_counts_each_identity_once():
  """Ranking [5, 5, 7, 9, 9]: the true identity 9 is the 4th image but the 3rd identity."""
  distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
  args = ([9], [5, 5, 7, 9, 9], [6], [1, 1, 4, 5, 1])
  sysu = metrics.evaluate_rank(distmat, *args, max_rank=5, protocol="sysu")
  np.testing.assert_array_equal(sysu["cmc"], [0, 0, 1, 1, 1])
  standard = metrics.evaluate_rank(distmat, *args, max_rank=5, protocol="regdb")
  np.testing.assert_array_equal(standard["cmc"], [0, 0, 0, 1, 1])
  # mAP and mINP use every gallery image, identically under both rules.
  assert sysu["mAP"] == standard["mAP"] == pytest.approx((1 / 4 + 2 / 5) / 2)
  assert sysu["mINP"] == standard["mINP"] == pytest.approx(2 / 5)


def test_sysu_camera_3_query_ignores_camera_2():
  """A camera-2 image of the true identity ranks first: ignored for a camera-3 query (whose list
  becomes [7, 9]), kept for a camera-6 query."""
  distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
  args = ([9, 9], [9, 7, 9], [3, 6], [2, 1, 4])
  result = metrics.evaluate_ranking(distmat, *args, max_rank=3, protocol="sysu")
  np.testing.assert_allclose(result.cmc, [0.5, 1.0, 1.0])
  assert result.mAP == pytest.approx((1 / 2 + (1 + 2 / 3) / 2) / 2)
  # Camera 2 ignored for camera 3 whatever the identity: only camera-2 matches -> skipped.
  only_cam2 = metrics.evaluate_ranking(np.zeros((2, 2)), [9, 9], [9, 9], [3, 6], [2, 2],
                                       protocol="sysu")
  assert only_cam2.num_valid_queries == 1


def test_ties_keep_the_lower_gallery_index_first():
  for rule in metrics.PROTOCOLS:
    hit_first = metrics.evaluate_rank(np.zeros((1, 3)), [1], [1, 2, 3], [3], [1, 1, 1], 3, rule)
    hit_last = metrics.evaluate_rank(np.zeros((1, 3)), [1], [2, 3, 1], [3], [1, 1, 1], 3, rule)
    assert hit_first["cmc"][0] == 1.0 and hit_last["cmc"][0] == 0.0, rule
    assert hit_last["mAP"] == pytest.approx(1 / 3), rule


def test_market_and_regdb_filters_differ():
  """Same identity and camera: ignored by "market", kept by "regdb" (no camera filter)."""
  args = (np.array([[0.0, 1.0]]), [1], [1, 1], [0], [0, 1])
  assert metrics.evaluate_rank(*args, max_rank=2, protocol="market")["mAP"] == 1.0
  assert metrics.evaluate_rank(*args, max_rank=2, protocol="regdb")["mAP"] == 1.0
  assert metrics.evaluate_ranking(*args, protocol="market").num_valid_queries == 1
  only_same = (np.zeros((1, 1)), [1], [1], [0], [0])
  with pytest.raises(ValueError, match="same-camera"):
    metrics.evaluate_rank(*only_same, protocol="market")
  assert metrics.evaluate_rank(*only_same, max_rank=1, protocol="regdb")["cmc"][0] == 1.0


def test_unknown_protocol_raises():
  with pytest.raises(ValueError, match="protocol"):
    metrics.evaluate_rank(np.zeros((1, 1)), [1], [1], [0], [1], protocol="duke")


# ------------------------------------------------------------------ SYSU-MM01 draw


def reference_query_sysu(data_path: str) -> list[str]:
  """`process_query_sysu` of the reference loader (paths only)."""
  with open(os.path.join(data_path, "exp/test_id.txt")) as file:
    ids = ["%04d" % int(y) for y in file.read().splitlines()[0].split(",")]
  files_ir = []
  for pid in sorted(ids):
    for cam in ["cam3", "cam6"]:
      img_dir = os.path.join(data_path, cam, pid)
      if os.path.isdir(img_dir):
        files_ir.extend(sorted([img_dir + "/" + i for i in os.listdir(img_dir)]))
  return files_ir


def reference_gallery_sysu(data_path: str, mode: str, trial: int, shot: int) -> list[str]:
  """`process_gallery_sysu` of the reference loader (global `random`), with the multi-shot
  variant `random.sample(files, 10)`."""
  random.seed(trial)
  rgb_cameras = {"all": ["cam1", "cam2", "cam4", "cam5"], "indoor": ["cam1", "cam2"]}[mode]
  with open(os.path.join(data_path, "exp/test_id.txt")) as file:
    ids = ["%04d" % int(y) for y in file.read().splitlines()[0].split(",")]
  files_rgb = []
  for pid in sorted(ids):
    for cam in rgb_cameras:
      img_dir = os.path.join(data_path, cam, pid)
      if os.path.isdir(img_dir):
        new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
        if shot == 1:
          files_rgb.append(random.choice(new_files))
        else:
          files_rgb.extend(random.sample(new_files, k=10))
  return files_rgb


@pytest.fixture(scope="module")
def sysu_file_tree(tmp_path_factory) -> Path:
  """A SYSU-MM01 tree of empty files: 5 test identities (listed out of order), 10 to 22 images
  per camera, some cameras absent, plus training identities the draw must not touch."""
  root = tmp_path_factory.mktemp("sysu_files")
  rng = np.random.default_rng(0)
  test_ids = [12, 3, 40, 7, 25]
  for pid in test_ids + [1, 2]:
    for cam in range(1, 7):
      if (pid, cam) in {(40, 4), (7, 2), (7, 6), (25, 1)}:
        continue
      folder = root / f"cam{cam}" / f"{pid:04d}"
      folder.mkdir(parents=True)
      for n in rng.permutation(int(rng.integers(10, 23))):  # created in shuffled order
        (folder / f"{n + 1:04d}.jpg").touch()
  (root / "exp").mkdir()
  (root / "exp" / "test_id.txt").write_text(",".join(map(str, test_ids)) + "\n")
  return root


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shot", [1, 10])
def test_sysu_test_split_reproduces_the_reference_loader(sysu_file_tree, mode, shot):
  """Queries, and every trial's gallery, path for path and in order."""
  root = str(sysu_file_tree)
  galleries = set()
  for trial in range(10):
    query, gallery = sysu_mm01.test_split(root, mode, trial, shot)
    assert query == [os.path.relpath(p, root) for p in reference_query_sysu(root)]
    expected = [os.path.relpath(p, root) for p in reference_gallery_sysu(root, mode, trial, shot)]
    assert gallery == expected, trial
    galleries.add(tuple(gallery))
  assert len(galleries) == 10  # the trials redraw the gallery
  assert all(p.split("/")[0] in {"cam1", "cam2", "cam4", "cam5"} for p in gallery)
  if mode == "indoor":
    assert all(p.split("/")[0] in {"cam1", "cam2"} for p in gallery)


def test_sysu_draw_leaves_the_global_generator_alone(sysu_file_tree):
  random.seed(123)
  expected = random.random()
  random.seed(123)
  sysu_mm01.test_split(sysu_file_tree, "all", 4)
  assert random.random() == expected


def test_sysu_multi_shot_with_fewer_than_ten_images_takes_them_all():
  files = {(1, 1): [f"cam1/0001/{n:04d}.jpg" for n in range(1, 5)],
           (1, 2): [f"cam2/0001/{n:04d}.jpg" for n in range(1, 13)]}
  _, gallery = sysu_mm01.draw_split(files, [1], "indoor", trial=0, shot=10)
  assert sorted(gallery[:4]) == files[(1, 1)]
  assert len(gallery) == 14 and set(gallery[4:]) <= set(files[(1, 2)])


def test_sysu_split_arguments_are_checked(sysu_file_tree):
  with pytest.raises(ValueError, match="mode"):
    sysu_mm01.test_split(sysu_file_tree, "outdoor", 0)
  with pytest.raises(ValueError, match="shot"):
    sysu_mm01.test_split(sysu_file_tree, "all", 0, shot=0)


def image_set(paths, pids, camids, modalities, tuple_ids=None, names=("rgb", "ir")):
  n = len(paths)
  return ImageSet(images=np.array([b""] * n, dtype=object), pids=np.asarray(pids, np.int64),
                  camids=np.asarray(camids, np.int64),
                  modalities=np.asarray(modalities, np.int64),
                  tuple_ids=np.full(n, -1, np.int64) if tuple_ids is None
                  else np.asarray(tuple_ids, np.int64),
                  paths=np.array(paths, dtype=object), modality_names=tuple(names))


def sysu_image_sets(root: Path) -> tuple[ImageSet, ImageSet]:
  """Query (cameras 3, 6) and gallery (1, 2, 4, 5) ImageSets of a tree's test identities, rows in
  path order as `datasets.load_split` gives them."""
  ids = [int(i) for i in (root / "exp" / "test_id.txt").read_text().split(",")]
  splits = []
  for cameras, modality in (((3, 6), 1), ((1, 2, 4, 5), 0)):
    paths = sorted(f"cam{c}/{pid:04d}/{name}" for c in cameras for pid in ids
                   if (root / f"cam{c}" / f"{pid:04d}").is_dir()
                   for name in os.listdir(root / f"cam{c}" / f"{pid:04d}"))
    splits.append(image_set(paths, [int(p.split("/")[1]) for p in paths],
                            [int(p[3]) for p in paths], [modality] * len(paths)))
  return splits[0], splits[1]


def test_sysu_protocols_follow_the_draw(sysu_file_tree):
  """Four settings, each with the 10 trial galleries of `test_split`, rows in its order."""
  query, gallery = sysu_image_sets(sysu_file_tree)
  protocols = {p.name: p for p in evaluate.sysu_protocols(query, gallery)}
  assert list(protocols) == ["sysu/all-search/single-shot", "sysu/all-search/multi-shot",
                             "sysu/indoor-search/single-shot", "sysu/indoor-search/multi-shot"]
  for name, protocol in protocols.items():
    mode = name.split("/")[1].split("-")[0]
    shot = 1 if name.endswith("single-shot") else 10
    assert protocol.rule == "sysu"
    assert len(protocol.gallery_trials) == 10
    for trial, rows in enumerate(protocol.gallery_trials):
      query_paths, gallery_paths = sysu_mm01.test_split(sysu_file_tree, mode, trial, shot)
      assert list(gallery.paths[rows]) == gallery_paths
      assert list(query.paths[protocol.query_rows]) == query_paths


# ------------------------------------------------------------------ the other protocols


def test_synthetic_protocols_one_trial_market_rule():
  names = ("rgb", "ir", "depth")
  query = image_set(["a", "b", "c"], [0, 0, 0], [0, 0, 0], [0, 1, 2], [5, 5, 5], names=names)
  gallery = image_set(["d", "e", "f", "g"], [0] * 4, [1] * 4, [2, 1, 0, 0], [8, 8, 8, 9],
                      names=names)
  protocols = {p.name: p for p in evaluate.synthetic_protocols(query, gallery)}
  assert list(protocols) == [
      "rgb->ir", "rgb->depth", "ir->rgb", "ir->depth", "depth->rgb", "depth->ir", "all",
      "fused/all", "fused/missing-rgb", "fused/missing-ir", "fused/missing-depth",
      "fused/missing-rgb+ir", "fused/missing-rgb+depth", "fused/missing-ir+depth"]
  assert all(p.rule == "market" and len(p.gallery_trials) == 1 for p in protocols.values())
  np.testing.assert_array_equal(protocols["ir->rgb"].query_rows, [1])
  np.testing.assert_array_equal(protocols["ir->rgb"].gallery_trials[0], [2, 3])
  np.testing.assert_array_equal(protocols["all"].gallery_trials[0], range(4))
  # Fused retrieval: one row per capture (its first row), embedded with the setting's modalities.
  for name, present in (("fused/all", (0, 1, 2)), ("fused/missing-ir", (0, 2)),
                        ("fused/missing-rgb+depth", (1,))):
    protocol = protocols[name]
    assert protocol.query_modalities == protocol.gallery_modalities == present
    np.testing.assert_array_equal(protocol.query_rows, [0])
    np.testing.assert_array_equal(protocol.gallery_trials[0], [0, 3])
  assert protocols["ir->rgb"].query_modalities is None


def test_regdb_protocols_are_both_directions_without_camera_filter():
  test = image_set(["Thermal/1/a.jpg", "Thermal/2/b.jpg", "Visible/1/c.jpg", "Visible/2/d.jpg"],
                   [0, 1, 0, 1], [2, 2, 1, 1], [1, 1, 0, 0])
  protocols = evaluate.regdb_protocols(test, test)
  assert [p.name for p in protocols] == ["regdb/visible->thermal", "regdb/thermal->visible"]
  assert all(p.rule == "regdb" and len(p.gallery_trials) == 1 for p in protocols)
  np.testing.assert_array_equal(protocols[0].query_rows, [2, 3])
  np.testing.assert_array_equal(protocols[0].gallery_trials[0], [0, 1])
  np.testing.assert_array_equal(protocols[1].query_rows, [0, 1])


def test_modality_settings():
  assert evaluate.modality_settings(("rgb", "nir", "tir")) == [
      ("all", (0, 1, 2)), ("missing-rgb", (1, 2)), ("missing-nir", (0, 2)),
      ("missing-tir", (0, 1)), ("missing-rgb+nir", (2,)), ("missing-rgb+tir", (1,)),
      ("missing-nir+tir", (0,))]


def test_rgbnt201_protocols():
  """Query = gallery = one row per capture; 7 settings and 42 cross-setting retrievals."""
  names = ("rgb", "nir", "tir")
  captures = 4
  test = image_set([f"test/{f}/{c:06d}_cam1_0_00.jpg" for f in ("NI", "RGB", "TI")
                    for c in range(captures)], [c // 2 for c in range(captures)] * 3,
                   [1] * (3 * captures), [m for m in (1, 0, 2) for _ in range(captures)],
                   tuple_ids=list(range(captures)) * 3, names=names)
  protocols = {p.name: p for p in evaluate.rgbnt201_protocols(test, test)}
  assert len(protocols) == 49
  assert {"rgbnt201/all", "rgbnt201/missing-nir", "rgbnt201/missing-rgb+nir",
          "rgbnt201/missing-nir+tir", "rgbnt201/all->missing-rgb",
          "rgbnt201/missing-tir->missing-rgb+nir"} <= set(protocols)
  cross = protocols["rgbnt201/missing-tir->missing-rgb+nir"]
  assert cross.query_modalities == (0, 1) and cross.gallery_modalities == (2,)
  for protocol in protocols.values():
    assert protocol.rule == "market"
    np.testing.assert_array_equal(test.tuple_ids[protocol.query_rows], range(captures))
    np.testing.assert_array_equal(protocol.gallery_trials[0], protocol.query_rows)
  with pytest.raises(ValueError, match="tuple_id"):
    evaluate.rgbnt201_protocols(image_set(["a"], [0], [1], [0], names=names),
                                image_set(["a"], [0], [1], [0], names=names))


def test_fuse_modalities_matches_plain_reference():
  """Present slots normalised, absent slots the mean of the present ones, then normalised."""
  rng = np.random.default_rng(3)
  per_modality = rng.normal(size=(5, 3, 4))
  per_modality[1, 2] = np.nan  # absent slots may hold anything
  present = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 1]], bool)
  fused = evaluate.fuse_modalities(per_modality, present)
  for t in range(5):
    slots = [per_modality[t, m] / np.linalg.norm(per_modality[t, m]) for m in range(3)]
    chosen = [slots[m] for m in range(3) if present[t, m]]
    if not chosen:
      np.testing.assert_array_equal(fused[t], 0.0)
      continue
    mean = sum(chosen) / len(chosen)
    expected = np.concatenate([slots[m] if present[t, m] else mean for m in range(3)])
    np.testing.assert_allclose(fused[t], expected / np.linalg.norm(expected), atol=1e-6)
  # Every modality present: the plain concatenation of the normalised embeddings.
  full = np.concatenate([per_modality[0, m] / np.linalg.norm(per_modality[0, m])
                         for m in range(3)])
  np.testing.assert_allclose(fused[0], full / np.sqrt(3), atol=1e-6)


# ------------------------------------------------------------------ trials and reports


def test_summarize_trials_mean_and_population_std():
  trials = [{"rank1": 0.5, "rank5": 0.7, "mAP": 0.4, "mINP": 0.2},
            {"rank1": 0.7, "rank5": 0.9, "mAP": 0.3, "mINP": 0.1},
            {"rank1": 0.6, "rank5": 0.8, "mAP": 0.5, "mINP": 0.3}]
  entry = evaluate.summarize_trials(trials)
  assert entry["trials"] == 3
  assert entry["rank1"] == pytest.approx(0.6) and entry["rank5"] == pytest.approx(0.8)
  assert entry["std"]["rank1"] == pytest.approx(np.sqrt(((0.1 ** 2) * 2) / 3))
  assert entry["std"]["mAP"] == pytest.approx(np.sqrt(((0.1 ** 2) * 2) / 3))
  assert set(entry["std"]) == {"rank1", "mAP", "mINP"}


def make_report(step, rank1, protocols=("regdb/visible->thermal",)):
  entry = {"rank1": rank1, "rank5": 1.0, "rank10": 1.0, "rank20": 1.0, "mAP": rank1 / 2,
           "mINP": rank1 / 4, "trials": 1, "std": {"rank1": 0.0, "mAP": 0.0, "mINP": 0.0}}
  return {"dataset": "regdb", "step": step, "protocols": {p: dict(entry) for p in protocols},
          "baselines": {"raw_pixel": {p: {"rank1": 0.1, "mAP": 0.05, "mINP": 0.01}
                                      for p in protocols}}}


def test_aggregate_reports_over_runs():
  reports = [make_report(100, r) for r in (0.2, 0.4, 0.6, 0.8)]
  aggregated = evaluate.aggregate_reports(reports)
  entry = aggregated["protocols"]["regdb/visible->thermal"]
  assert aggregated["dataset"] == "regdb" and aggregated["step"] == 100
  assert entry["trials"] == 4
  assert entry["rank1"] == pytest.approx(0.5) and entry["mAP"] == pytest.approx(0.25)
  assert entry["std"]["rank1"] == pytest.approx(np.std([0.2, 0.4, 0.6, 0.8]))
  assert aggregated["baselines"]["raw_pixel"]["regdb/visible->thermal"] == pytest.approx(
      {"rank1": 0.1, "mAP": 0.05, "mINP": 0.01})
  with pytest.raises(ValueError, match="step"):
    evaluate.aggregate_reports([make_report(100, 0.5), make_report(200, 0.5)])
  with pytest.raises(ValueError, match="protocols"):
    evaluate.aggregate_reports([make_report(100, 0.5), make_report(100, 0.5, ("other",))])


def test_rank_protocols_over_trials_and_rerank():
  """Each trial ranked with its own gallery; re-ranking replaces the distance matrix."""
  rng = np.random.default_rng(5)
  query = image_set([f"q{i}" for i in range(6)], [0, 1, 2, 0, 1, 2], [3] * 6, [1] * 6)
  gallery = image_set([f"g{i}" for i in range(9)], [0, 1, 2] * 3, [1] * 9, [0] * 9)
  features = {("query", None): rng.normal(size=(6, 4)), ("gallery", None): rng.normal(size=(9, 4))}
  trials = (np.arange(0, 3), np.arange(3, 6), np.arange(6, 9))
  protocol = evaluate.Protocol("p", np.arange(6), trials, rule="sysu")
  ranked = evaluate.rank_protocols([protocol], query, gallery, features, "cosine", 3)["p"]
  assert len(ranked) == 3
  for rows, result in zip(trials, ranked):
    distmat = metrics.cosine_distance(features[("query", None)], features[("gallery", None)][rows])
    expected = metrics.evaluate_rank(distmat, query.pids, gallery.pids[rows], query.camids,
                                     gallery.camids[rows], 3, "sysu")
    np.testing.assert_allclose(result.cmc, expected["cmc"])
    assert result.mAP == expected["mAP"]
  options = evaluate.rerank_options(
      __import__("ml_collections").ConfigDict({"rerank": True, "rerank_k1": 3, "rerank_k2": 2,
                                               "rerank_lambda": 0.3}))
  reranked = evaluate.rank_protocols([protocol], query, gallery, features, "cosine", 3,
                                     options)["p"]
  qf, gf = features[("query", None)], features[("gallery", None)][trials[0]]
  distmat = metrics.k_reciprocal_rerank(metrics.cosine_distance(qf, gf),
                                        metrics.cosine_distance(qf, qf),
                                        metrics.cosine_distance(gf, gf), k1=3, k2=2,
                                        lambda_value=0.3)
  expected = metrics.evaluate_rank(distmat, query.pids, gallery.pids[trials[0]], query.camids,
                                   gallery.camids[trials[0]], 3, "sysu")
  assert reranked[0].mAP == pytest.approx(expected["mAP"])


# ------------------------------------------------------------------ k-reciprocal re-ranking


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
  """Zhong et al.'s `re_ranking` (the distance-matrix version of Torchreid), in float64."""
  original_dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                  np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
  original_dist = np.power(original_dist, 2).astype(np.float64)
  original_dist = np.transpose(1.0 * original_dist / np.max(original_dist, axis=0))
  V = np.zeros_like(original_dist)
  initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
  query_num = q_g_dist.shape[0]
  gallery_num = q_g_dist.shape[0] + q_g_dist.shape[1]
  all_num = gallery_num
  for i in range(all_num):
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    k_reciprocal_index = forward_k_neigh_index[fi]
    k_reciprocal_expansion_index = k_reciprocal_index
    for j in range(len(k_reciprocal_index)):
      candidate = k_reciprocal_index[j]
      candidate_forward_k_neigh_index = initial_rank[candidate, :int(np.around(k1 / 2.0)) + 1]
      candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                                      :int(np.around(k1 / 2.0)) + 1]
      fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
      candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
      if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > \
          2.0 / 3 * len(candidate_k_reciprocal_index):
        k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                 candidate_k_reciprocal_index)
    k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
    weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
    V[i, k_reciprocal_expansion_index] = 1.0 * weight / np.sum(weight)
  original_dist = original_dist[:query_num, ]
  if k2 != 1:
    V_qe = np.zeros_like(V)
    for i in range(all_num):
      V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
    V = V_qe
  invIndex = []
  for i in range(gallery_num):
    invIndex.append(np.where(V[:, i] != 0)[0])
  jaccard_dist = np.zeros_like(original_dist)
  for i in range(query_num):
    temp_min = np.zeros(shape=[1, gallery_num])
    indNonZero = np.where(V[i, :] != 0)[0]
    indImages = [invIndex[ind] for ind in indNonZero]
    for j in range(len(indNonZero)):
      temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(
          V[i, indNonZero[j]], V[indImages[j], indNonZero[j]])
    jaccard_dist[i] = 1 - temp_min / (2.0 - temp_min)
  final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
  return final_dist[:query_num, query_num:]


@pytest.mark.parametrize("k1, k2, lambda_value, seed", [(20, 6, 0.3, 0), (6, 3, 0.5, 1),
                                                        (4, 1, 0.0, 2)])
def test_k_reciprocal_rerank_matches_reference(k1, k2, lambda_value, seed):
  rng = np.random.default_rng(seed)
  query = rng.normal(size=(14, 8))
  gallery = np.concatenate([query[:6] + 0.3 * rng.normal(size=(6, 8)),
                            rng.normal(size=(30, 8))])
  q_g = metrics.euclidean_distance(query, gallery).astype(np.float64)
  q_q = metrics.euclidean_distance(query, query).astype(np.float64)
  g_g = metrics.euclidean_distance(gallery, gallery).astype(np.float64)
  expected = reference_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
  actual = metrics.k_reciprocal_rerank(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
  assert actual.shape == (14, 36)
  np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
  assert not np.allclose(actual, q_g)


def test_k_reciprocal_rerank_checks_shapes():
  with pytest.raises(ValueError, match="shapes"):
    metrics.k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros((2, 2)))
