"""Scene conditions: the generator's degradations, the builder's mixes, and what evaluation
reports per condition (mmreid_jax.scene_analysis).

References: the renderer's pixels before conditions existed (a digest recorded from version
1.0.0 of the set), physical properties of each degradation measured with NumPy on the images,
and shares and means written out plainly.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from mmreid_jax import scene_analysis
from mmreid_jax.data.datasets import get_builder, load_split, synthetic_render
from mmreid_jax.data.datasets.synthetic_mm import SyntheticMm

# sha256 of the images of generate_split(range(3), 2, 2, 32, 16, seed=0, difficulty=0.5) as
# synthetic_mm 1.0.0 rendered them (before scene conditions).
CLEAR_DIGEST_1_0_0 = "3e8d66153c1c3970acd1919f1e542ed80cea71a921500dc6dd090216c17dd3a4"
RGB, IR, DEPTH = range(3)


def digest(records) -> str:
  hasher = hashlib.sha256()
  for record in records:
    hasher.update(record.image.tobytes())
  return hasher.hexdigest()


def test_clear_scenes_render_as_version_1_0_0():
  records = list(synthetic_render.generate_split(range(3), 2, 2, 32, 16, 0, 0.5))
  assert {r.condition for r in records} == {"clear"}
  assert digest(records) == CLEAR_DIGEST_1_0_0
  # In a mix, the clear captures are those of a clear-only set, pixel for pixel.
  mixed = list(synthetic_render.generate_split(
      range(3), 2, 2, 32, 16, 0, 0.5, conditions=(("clear", 0.5), ("night", 0.5))))
  assert {r.condition for r in mixed} == {"clear", "night"}
  for clear, other in zip(records, mixed):
    assert clear.path == other.path
    if other.condition == "clear":
      np.testing.assert_array_equal(clear.image, other.image)


def render(condition: str, seed: int = 3) -> dict[str, np.ndarray]:
  """One demo-sized capture in `condition` (the same pose and noise for every condition), as
  float images in [0, 1]."""
  identity = synthetic_render.sample_identity(np.random.default_rng([0, 0, seed]))
  camera = synthetic_render.sample_camera(np.random.default_rng([0, 1, 1]), 0.15)
  images = synthetic_render.render_tuple(identity, camera, 96, 48,
                                         np.random.default_rng([0, 2, seed]), 0.15, condition,
                                         np.random.default_rng([0, 3, seed]))
  return {name: images[name].astype(np.float64) / 255 for name in images}


@pytest.mark.parametrize("condition", synthetic_render.CONDITIONS[1:])
def test_each_condition_degrades_what_it_names(condition: str):
  clear, degraded = render("clear"), render(condition)
  changed = {name for name in synthetic_render.MODALITIES
             if not np.array_equal(clear[name], degraded[name])}
  target = synthetic_render.DEGRADED_MODALITY[condition]
  assert changed == ({target} if target else set(synthetic_render.MODALITIES))
  rgb, rgb_clear = degraded["rgb"], clear["rgb"]
  if condition == "night":
    assert rgb.mean() < 0.35 * rgb_clear.mean()
    # Little colour: the spread over channels of 6 x 6 blocks (averaging the noise out),
    # relative to the brightness, is under half the clear image's.
    blocks = lambda image: image.reshape(16, 6, 8, 6, 3).mean(axis=(1, 3))
    chroma = lambda image: np.std(blocks(image), axis=-1).mean() / image.mean()
    assert chroma(rgb) < 0.5 * chroma(rgb_clear)
  elif condition == "overexposed":
    assert np.mean(rgb.max(axis=-1) >= 1.0) > 0.5 > np.mean(rgb_clear.max(axis=-1) >= 1.0)
  elif condition == "thermal_crossover":
    # The person (where clear infrared differs most from the wall behind) fades into it.
    ir, ir_clear = degraded["ir"][..., 0], clear["ir"][..., 0]
    person = np.abs(clear["depth"][..., 0] - np.median(clear["depth"][:20, ..., 0])) > 0.2
    contrast = lambda image: abs(image[person].mean() - image[~person].mean())
    assert contrast(ir) < 0.25 * contrast(ir_clear)
  elif condition == "depth_dropout":
    holes = degraded["depth"][..., 0] == 0
    assert 0.1 < holes.mean() < 0.7 and (clear["depth"][..., 0] == 0).mean() < 0.01
  elif condition == "occluded":
    # One region changes in every modality, and in depth it is nearer (brighter) than the
    # person it hides.
    masks = [np.abs(degraded[n] - clear[n]).max(axis=-1) > 0.1 for n in ("rgb", "depth")]
    overlap = (masks[0] & masks[1]).sum() / max(masks[0].sum(), 1)
    assert overlap > 0.8 and masks[0].mean() > 0.1
    region = masks[0] & masks[1]
    assert degraded["depth"][region].mean() > clear["depth"][region].mean()


@pytest.mark.parametrize("mix,expected", [
    ({"clear": 0.5, "nigth": 0.5}, "unknown scene condition.*nigth.*thermal_crossover"),
    ({"clear": 0.5, "night": 0.3}, "sum to 0.8, expected 1.*occluded"),
    ({"clear": 1.5, "night": -0.5}, "non-negative"),
])
def test_condition_mix_errors_name_the_valid_names(mix, expected):
  with pytest.raises(ValueError, match=expected) as error:
    get_builder("synthetic_mm/tiny", conditions=mix)
  assert "config.data.conditions" in str(error.value)
  assert "\n" not in str(error.value)


def test_builder_records_each_captures_condition(tmp_path):
  mix = {"clear": 0.4, "night": 0.3, "depth_dropout": 0.3}
  builder = get_builder("synthetic_mm/tiny", str(tmp_path), conditions=mix,
                        test_conditions={"occluded": 1.0})
  assert builder.builder_config.name.startswith("tiny-")
  # The named config's own mix gives the named config back (no new folder).
  assert get_builder("synthetic_mm/tiny", str(tmp_path), conditions={"clear": 1.0}
                     ).builder_config.name == "tiny"
  builder.download_and_prepare()
  train = load_split(builder, "train")
  assert set(train.conditions) <= set(mix) and len(set(train.conditions)) > 1
  for tuple_id in np.unique(train.tuple_ids):  # every modality of a capture shares it
    assert len(set(train.conditions[train.tuple_ids == tuple_id])) == 1
  for split in ("query", "gallery"):
    assert set(load_split(builder, split).conditions) == {"occluded"}
  # The same capture under the same condition renders the same pixels in any mix.
  reference = {r.path: r for r in synthetic_render.generate_split(
      range(8), 2, 2, 32, 16, 0, 0.5, conditions=(("clear", 0.4), ("night", 0.3),
                                                   ("depth_dropout", 0.3)))}
  assert [reference[p].condition for p in train.paths] == list(train.conditions)
  assert SyntheticMm.VERSION == "1.1.0"


# ---------------------------------------------------------------- scene_analysis


def test_condition_protocols_keep_the_gallery():
  @dataclasses.dataclass(frozen=True)
  class P:  # any dataclass with `query_rows`, as evaluate.Protocol
    name: str
    query_rows: np.ndarray
    gallery_trials: tuple

  conditions = np.array(["night", "clear", "night", "occluded", "clear"], object)
  protocols = [P("a", np.array([0, 1, 2]), (np.array([7]),)), P("b", np.array([3, 4]), ())]
  by = scene_analysis.condition_protocols(protocols, conditions)
  assert list(by) == ["clear", "night", "occluded"]
  assert [(p.name, p.query_rows.tolist()) for p in by["night"]] == [("a", [0, 2])]
  assert [(p.name, p.query_rows.tolist()) for p in by["clear"]] == [("a", [1]), ("b", [4])]
  assert by["clear"][0].gallery_trials[0].tolist() == [7]


def test_modality_shares_by_leaving_one_out():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  fused = unit(rng.normal(size=(4, 6)))
  without = unit(rng.normal(size=(4, 3, 6)))
  present = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
  without[3] = fused[3]  # no modality changes capture 3
  shares = scene_analysis.modality_shares(fused, without, present)
  for t in range(3):
    change = [max(0.0, 1 - float(fused[t] @ without[t, m])) if present[t, m] else 0.0
              for m in range(3)]
    np.testing.assert_allclose(shares[t], np.array(change) / sum(change), rtol=1e-12)
  assert shares[2, 1] == 0 and np.all(np.isnan(shares[3]))
  by = scene_analysis.share_by_condition(shares, np.array(["night", "night", "clear", "clear"]),
                                         ("rgb", "ir", "depth"))
  np.testing.assert_allclose(list(by["night"].values()), shares[:2].mean(axis=0))
  np.testing.assert_allclose(list(by["clear"].values()), shares[2])  # capture 3: NaN, left out
  assert list(by) == ["clear", "night"]


def test_modal_weights_by_condition_over_complete_captures():
  tables = [np.array([[0, 1, 2], [3, 4, 5], [6, -1, 7]]), np.array([[0, 1, 2]])]
  weights = [np.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2], [0.5, 0.0, 0.5]]),
             np.array([[0.4, 0.4, 0.2]])]
  conditions = [np.array(["night"] * 3 + ["clear"] * 3 + ["night"] * 2, object),
                np.array(["night"] * 3, object)]
  by = scene_analysis.modal_weights_by_condition(tables, weights, conditions,
                                                 ("rgb", "ir", "depth"))
  assert by == {"clear": {"rgb": 0.6, "ir": 0.2, "depth": 0.2},
                "night": pytest.approx({"rgb": 0.3, "ir": 0.45, "depth": 0.25})}


def test_scene_response_compares_each_failing_modality_with_clear_scenes():
  """share_ratio = share of the degraded modality in its condition / in clear scenes, and
  weight_change = its A_m(m) there minus in clear scenes; conditions that degrade nothing or
  are absent are left out, and a report without shares gives {}."""
  report = {
      "modality_share_by_condition": {
          "clear": {"rgb": 0.4, "ir": 0.3, "depth": 0.3},
          "night": {"rgb": 0.1, "ir": 0.5, "depth": 0.4},
          "thermal_crossover": {"rgb": 0.45, "ir": 0.15, "depth": 0.4},
          "occluded": {"rgb": 0.3, "ir": 0.3, "depth": 0.4}},
      "modal_weights_by_condition": {
          "clear": {"rgb": 0.5, "ir": 0.3, "depth": 0.2},
          "night": {"rgb": 0.7, "ir": 0.2, "depth": 0.1},
          "thermal_crossover": {"rgb": 0.4, "ir": 0.5, "depth": 0.1}}}
  response = scene_analysis.scene_response(report)
  assert list(response) == ["night", "thermal_crossover"]
  assert response["night"]["modality"] == "rgb"
  assert response["night"]["share_ratio"] == pytest.approx(0.25)
  assert response["night"]["weight_change"] == pytest.approx(0.2)
  assert response["thermal_crossover"]["modality"] == "ir"
  assert response["thermal_crossover"]["share_ratio"] == pytest.approx(0.5)
  assert response["thermal_crossover"]["weight_change"] == pytest.approx(0.2)
  del report["modal_weights_by_condition"]
  assert "weight_change" not in scene_analysis.scene_response(report)["night"]
  assert scene_analysis.scene_response({}) == {}
