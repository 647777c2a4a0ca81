"""Tests for mmreid_jax.data: the synthetic set, tuple sampling, augmentation and the pipeline.

References are independent of the code under test: images are decoded with Pillow, expected
tuples and pixels are built with NumPy loops.
"""

from __future__ import annotations

import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmreid_jax.data import augment as augment_lib
from mmreid_jax.data import pipeline
from mmreid_jax.data.datasets import ImageSet, get_builder, load_split, synthetic_render
from mmreid_jax.data.datasets.synthetic_mm import SyntheticMm, SyntheticMmConfig
from mmreid_jax.data.sampling import TupleBatch, TupleSampler

MEAN_PIXEL = (124, 116, 104)
SPLITS = ("train", "query", "gallery")


# ---------------------------------------------------------------- helpers


def png_to_array(encoded: bytes) -> np.ndarray:
  """Decodes an encoded image with Pillow (independent of TensorFlow) to (H, W, 3) uint8."""
  return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))


def images_by_path(image_set: ImageSet) -> dict[str, np.ndarray]:
  """Decoded images of a split keyed by their relative path."""
  return {str(path): png_to_array(image) for path, image in zip(image_set.paths, image_set.images)}


def augment_config(flip: bool = False, pad: int = 0, erasing_prob: float = 0.0,
                   channel_prob: float = 0.0) -> ml_collections.ConfigDict:
  """`config.augment` with every augmentation off unless asked for."""
  return ml_collections.ConfigDict({
      "flip": flip, "pad": pad, "erasing_prob": erasing_prob, "erasing_area": (0.02, 0.4),
      "erasing_aspect": (0.3, 3.3), "channel_prob": channel_prob})


def run_config(**augment_kwargs) -> ml_collections.ConfigDict:
  """The run config fields `pipeline.train_batches` reads."""
  return ml_collections.ConfigDict({
      "seed": 0,
      "data": {"height": 32, "width": 16},
      "augment": augment_config(**augment_kwargs),
  })


def run_augment(image: np.ndarray, seed: int, config: ml_collections.ConfigDict,
                is_rgb: bool = True) -> np.ndarray:
  """`augment.augment` on one NumPy image with the stateless seed (seed, 0)."""
  out = augment_lib.augment(tf.constant(image), tf.constant([seed, 0], tf.int64),
                            tf.constant(is_rgb), config)
  return out.numpy()


@pytest.fixture(scope="module")
def splits(tiny_synthetic) -> dict[str, ImageSet]:
  return {split: load_split(tiny_synthetic, split) for split in SPLITS}


@pytest.fixture(scope="module")
def train_set(splits) -> ImageSet:
  return splits["train"]


# ---------------------------------------------------------------- synthetic_mm


def test_synthetic_splits_and_identities(splits):
  cfg = SyntheticMm.BUILDER_CONFIGS[0]
  assert cfg.name == "tiny"
  assert set(SPLITS) <= set(splits)
  train_pids = set(splits["train"].pids.tolist())
  query_pids = set(splits["query"].pids.tolist())
  gallery_pids = set(splits["gallery"].pids.tolist())
  assert len(train_pids) == cfg.num_train_ids and len(query_pids) == cfg.num_test_ids
  assert not train_pids & (query_pids | gallery_pids)
  assert query_pids == gallery_pids
  assert splits["train"].modality_names == ("rgb", "ir", "depth")
  for pid in sorted(query_pids):
    for camid in range(cfg.num_cameras):
      for split in ("query", "gallery"):
        s = splits[split]
        modalities = {int(m) for p, c, m in zip(s.pids, s.camids, s.modalities)
                      if p == pid and c == camid}
        assert modalities == {0, 1, 2}, (split, pid, camid)


def test_synthetic_tuples_share_labels(splits):
  """The three images of a tuple_id share pid and camid and cover modalities 0, 1, 2."""
  groups: dict[int, list[tuple[int, int, int]]] = {}
  for s in splits.values():
    for pid, camid, modality, tuple_id in zip(s.pids, s.camids, s.modalities, s.tuple_ids):
      groups.setdefault(int(tuple_id), []).append((int(pid), int(camid), int(modality)))
  assert len(groups) == sum(len(s) for s in splits.values()) // 3
  for tuple_id, members in groups.items():
    assert len(members) == 3, tuple_id
    assert len({(pid, camid) for pid, camid, _ in members}) == 1, tuple_id
    assert sorted(m for _, _, m in members) == [0, 1, 2], tuple_id
  image = png_to_array(splits["train"].images[0])
  assert image.shape == (32, 16, 3) and image.dtype == np.uint8


def test_synthetic_same_config_is_byte_identical(splits, tmp_path):
  other = get_builder("synthetic_mm/tiny", data_dir=str(tmp_path))
  other.download_and_prepare()
  for split in SPLITS:
    again = load_split(other, split)
    np.testing.assert_array_equal(again.pids, splits[split].pids)
    np.testing.assert_array_equal(again.tuple_ids, splits[split].tuple_ids)
    expected = images_by_path(splits[split])
    actual = images_by_path(again)
    assert actual.keys() == expected.keys()
    for path, image in expected.items():
      np.testing.assert_array_equal(actual[path], image, err_msg=path)


def test_synthetic_other_seed_gives_other_images(splits, tmp_path):
  config = SyntheticMmConfig(name="tiny_seed1", num_train_ids=2, num_test_ids=1, num_cameras=2,
                             tuples_per_camera=2, height=32, width=16, difficulty=0.5, seed=1)
  builder = SyntheticMm(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  seeded = images_by_path(load_split(builder, "train"))
  reference = images_by_path(splits["train"])
  assert len(seeded) == 2 * 2 * 2 * 3
  for path, image in seeded.items():
    assert image.shape == reference[path].shape
    assert not np.array_equal(image, reference[path]), path


def test_generate_split_is_deterministic():
  def records() -> list[synthetic_render.SyntheticRecord]:
    return list(synthetic_render.generate_split(range(3, 5), 2, 2, 24, 12, seed=7,
                                                difficulty=0.8))

  first, second = records(), records()
  assert len(first) == 2 * 2 * 2 * 3
  for a, b in zip(first, second):
    assert (a.pid, a.camid, a.modality, a.tuple_id, a.path) == (
        b.pid, b.camid, b.modality, b.tuple_id, b.path)
    assert a.image.shape == (24, 12, 3) and a.image.dtype == np.uint8
    np.testing.assert_array_equal(a.image, b.image)
  # Different captures differ (the comparison above is not between constant images).
  assert not np.array_equal(first[0].image, first[3].image)


@pytest.mark.parametrize("field,value", [("tuples_per_camera", 1), ("difficulty", 1.5)])
def test_synthetic_config_validation(field: str, value):
  with pytest.raises(ValueError, match=field):
    SyntheticMmConfig(name="bad", **{field: value})


def test_get_builder_unknown_names():
  with pytest.raises(ValueError) as error:
    get_builder("no_such_set/tiny")
  assert "no_such_set" in str(error.value) and "synthetic_mm" in str(error.value)
  with pytest.raises(ValueError) as error:
    get_builder("synthetic_mm/huge")
  message = str(error.value)
  assert "huge" in message
  for name in ("tiny", "demo", "hard"):
    assert name in message


# ---------------------------------------------------------------- TupleSampler


def check_tuples(image_set: ImageSet, sampler: TupleSampler, batch: TupleBatch, num_ids: int,
                 per_id: int) -> None:
  """P distinct identities x K tuples; every present row has the tuple's pid and slot's modality."""
  labels = batch.labels
  assert labels.shape == (num_ids * per_id,) and labels.dtype == np.int32
  assert batch.rows.shape == batch.present.shape == (num_ids * per_id, 3)
  values, counts = np.unique(labels, return_counts=True)
  assert len(values) == num_ids and np.all(counts == per_id)
  for i in range(len(labels)):
    pid = sampler.class_pids[labels[i]]
    for slot in range(3):
      row = batch.rows[i, slot]
      assert batch.present[i, slot] == (row >= 0)
      if row >= 0:
        assert image_set.pids[row] == pid
        assert image_set.modalities[row] == slot


def test_sampler_paired_tuples(train_set):
  sampler = TupleSampler(train_set, 4, 3, 0.5, seed=0)
  np.testing.assert_array_equal(sampler.class_pids, sorted(set(train_set.pids.tolist())))
  for step in range(3):
    batch = sampler(step)
    check_tuples(train_set, sampler, batch, 4, 3)
    for i in range(len(batch.labels)):
      rows = batch.rows[i][batch.present[i]]
      assert len(rows) >= 1
      assert len(set(train_set.tuple_ids[rows].tolist())) == 1


def test_sampler_is_a_function_of_seed_and_step(train_set):
  a = TupleSampler(train_set, 4, 3, 0.5, seed=0)
  b = TupleSampler(train_set, 4, 3, 0.5, seed=0)
  for step in (0, 5):
    for field in ("rows", "present", "labels"):
      np.testing.assert_array_equal(getattr(a(step), field), getattr(b(step), field))
  assert not np.array_equal(a(0).rows, a(1).rows)
  assert not np.array_equal(a(0).rows, TupleSampler(train_set, 4, 3, 0.5, seed=1)(0).rows)


@pytest.mark.parametrize("frac,expected", [(1.0, 1), (0.0, 3)])
def test_sampler_single_modality_frac(train_set, frac: float, expected: int):
  sampler = TupleSampler(train_set, 4, 2, frac, seed=0)
  for step in range(4):
    batch = sampler(step)
    check_tuples(train_set, sampler, batch, 4, 2)
    np.testing.assert_array_equal(batch.present.sum(axis=1), expected)


def test_sampler_too_many_identities(train_set):
  with pytest.raises(ValueError, match="identities"):
    TupleSampler(train_set, 9, 2, 0.5, seed=0)


def test_sampler_unpaired_missing_modality():
  """Unpaired set: modalities drawn independently; identity 20 has no depth image."""
  per_modality = {10: (3, 2, 1), 20: (2, 2, 0), 30: (1, 1, 2)}
  pids, modalities = [], []
  for pid, counts in per_modality.items():
    for modality, count in enumerate(counts):
      pids += [pid] * count
      modalities += [modality] * count
  n = len(pids)
  paths = np.array([f"{m}/{i}.png" for i, m in enumerate(modalities)], dtype=object)
  image_set = ImageSet(images=np.array([b""] * n, dtype=object), pids=np.array(pids),
                       camids=np.zeros(n, np.int64), modalities=np.array(modalities),
                       tuple_ids=np.full(n, -1), paths=paths,
                       modality_names=("rgb", "ir", "depth"))
  sampler = TupleSampler(image_set, 3, 4, 0.0, seed=0)
  for step in range(3):
    batch = sampler(step)
    check_tuples(image_set, sampler, batch, 3, 4)
    for i, label in enumerate(batch.labels):
      has = [count > 0 for count in per_modality[int(sampler.class_pids[label])]]
      np.testing.assert_array_equal(batch.present[i], has)


# ---------------------------------------------------------------- augment


def test_channel_augmentation_gives_equal_channels():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
  channels = [image[..., c].astype(int) for c in range(3)]
  gray = np.round(image.astype(float) @ np.array([0.2989, 0.5870, 0.1140])).astype(int)
  config = augment_config(channel_prob=1.0)
  chosen = set()
  for seed in range(12):
    out = run_augment(image, seed, config)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    value = out[..., 0].astype(int)
    matches = [c for c in range(3) if np.array_equal(value, channels[c])]
    if np.max(np.abs(value - gray)) <= 1:
      matches.append(3)
    assert matches, f"seed {seed}: neither a channel nor grayscale"
    chosen.update(matches)
  assert len(chosen) >= 2
  # Not an RGB image: untouched.
  np.testing.assert_array_equal(run_augment(image, 0, config, is_rgb=False), image)


def test_random_erasing_fills_a_rectangle_with_the_mean_pixel():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 100, (32, 16, 3), dtype=np.uint8)  # never equal to the mean pixel
  config = augment_config(erasing_prob=1.0)
  for seed in range(5):
    out = run_augment(image, seed, config)
    changed = np.any(out != image, axis=-1)
    assert changed.any()
    assert np.all(out[changed] == MEAN_PIXEL)
    rows, cols = np.nonzero(changed)
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all(), "the erased region is one rectangle"


def test_flip_only_equals_fliplr():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
  config = augment_config(flip=True)
  flipped = kept = 0
  for seed in range(16):
    out = run_augment(image, seed, config)
    if np.array_equal(out, image):
      kept += 1
    else:
      np.testing.assert_array_equal(out, np.fliplr(image))
      flipped += 1
  assert flipped and kept


# ---------------------------------------------------------------- pipeline


def take(image_set: ImageSet, sampler: TupleSampler, config: ml_collections.ConfigDict,
         start_step: int, num_steps: int) -> list[dict[str, np.ndarray]]:
  return list(pipeline.train_batches(image_set, sampler, config, start_step,
                                     num_steps).as_numpy_iterator())


@pytest.fixture(scope="module")
def augmented_run(train_set: ImageSet
                  ) -> tuple[TupleSampler, ml_collections.ConfigDict, list[dict]]:
  """Three augmented batches from step 0, and a sampler with P=4, K=2, half single-modality."""
  sampler = TupleSampler(train_set, 4, 2, 0.5, seed=0)
  config = run_config(flip=True, pad=2, erasing_prob=0.5, channel_prob=0.5)
  return sampler, config, take(train_set, sampler, config, 0, 3)


def test_pipeline_shapes_and_absent_slots(augmented_run):
  sampler, _, batches = augmented_run
  assert len(batches) == 3
  for step, batch in enumerate(batches):
    assert batch["images"].shape == (8, 3, 32, 16, 3) and batch["images"].dtype == np.uint8
    assert batch["present"].shape == (8, 3) and batch["present"].dtype == bool
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == np.int32
    expected = sampler(step)
    np.testing.assert_array_equal(batch["present"], expected.present)
    np.testing.assert_array_equal(batch["labels"], expected.labels)
    assert not batch["present"].all(), "half the tuples should keep one modality"
    assert np.all(batch["images"][~batch["present"]] == 0)
    assert np.all(batch["images"][batch["present"]].reshape(-1, 32 * 16 * 3).max(axis=1) > 0)


def test_pipeline_is_deterministic_and_resumable(train_set, augmented_run):
  sampler, config, batches = augmented_run
  again = take(train_set, TupleSampler(train_set, 4, 2, 0.5, seed=0), config, 0, 3)
  for a, b in zip(batches, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  (resumed,) = take(train_set, sampler, config, 2, 3)
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], batches[2][key])
  assert not np.array_equal(batches[1]["images"], batches[2]["images"])


def test_pipeline_without_augmentation_gives_the_decoded_images(train_set):
  sampler = TupleSampler(train_set, 4, 2, 0.5, seed=3)
  (batch,) = take(train_set, sampler, run_config(), 4, 5)
  tuples = sampler(4)
  for i in range(8):
    for slot in range(3):
      row = tuples.rows[i, slot]
      expected = (png_to_array(train_set.images[row]) if row >= 0
                  else np.zeros((32, 16, 3), np.uint8))
      np.testing.assert_array_equal(batch["images"][i, slot], expected, err_msg=f"{i}, {slot}")


@pytest.mark.parametrize("stored", [(32, 16), (40, 12), (16, 8)])
def test_decode_returns_target_size_pixels(stored: tuple[int, int]):
  """An image stored at the target size comes back pixel for pixel (PIL's own decoding); any
  other size equals PIL's pixels resized by `augment.resize`; resizing to the same size is the
  identity, so both paths agree where they meet."""
  rng = np.random.default_rng(7)
  pixels = rng.integers(0, 256, (*stored, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  decoded = augment_lib.decode(tf.constant(buffer.getvalue()), 32, 16).numpy()
  assert decoded.shape == (32, 16, 3)
  expected = pixels if stored == (32, 16) else augment_lib.resize(tf.constant(pixels), 32, 16)
  np.testing.assert_array_equal(decoded, np.asarray(expected))
  np.testing.assert_array_equal(augment_lib.resize(tf.constant(pixels), *stored).numpy(), pixels)
