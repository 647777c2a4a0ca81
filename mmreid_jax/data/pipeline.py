"""tf.data input pipelines: training batches of modality tuples and evaluation batches.

Training: `Dataset.range(start_step, num_steps)` -> the stateless sampler's rows for each step ->
one element per image (row, slot, seed) -> parallel, deterministic decode and augmentation ->
batch -> prefetch. Encoded images sit in memory as one string tensor. Each host builds the global
batch's rows and keeps its own contiguous share (`jax.process_index()`).

A batch holds one slot per modality (`training_slots`); with `config.augment.exchange_view`
(CAJ) one more slot holds a second, independently augmented view of each tuple's RGB image with
its channels exchanged (`augment.augment(..., exchange=True)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from mmreid_jax import faults
from mmreid_jax.data import augment as augment_lib
from mmreid_jax.data.datasets import ImageSet
from mmreid_jax.data.sampling import TupleSampler


def training_slots(modality_names: Sequence[str], augment_config: ml_collections.ConfigDict
                   ) -> tuple[int, ...]:
  """The dataset modality each slot of a training batch holds: slot m holds modality m, and with
  `augment_config.exchange_view` one more slot holds the channel-exchanged second view of the
  "rgb" images (CAJ).

  Raises:
    ConfigError: `exchange_view` on a dataset without an "rgb" modality.
  """
  slots = tuple(range(len(modality_names)))
  if augment_config.get("exchange_view", False):
    if "rgb" not in modality_names:
      raise faults.ConfigError(f"config.augment.exchange_view=True needs an 'rgb' modality; "
                               f"the dataset has {list(modality_names)}.")
    slots += (list(modality_names).index("rgb"),)
  return slots


def train_batches(image_set: ImageSet, sampler: TupleSampler, config: ml_collections.ConfigDict,
                  start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Batches for steps start_step .. num_steps - 1.

  Each element is a dict of NumPy-convertible tensors for this host's share of the global batch
  (N = P * K / process_count tuples, S slots, `training_slots`):
    "images": (N, S, H, W, 3) uint8 (zeros where absent), "present": (N, S) bool,
    "labels": (N,) int32.

  Args:
    image_set: the training split.
    sampler: draws each step's tuples.
    config: the run config (uses `data.height`, `data.width`, `seed`, `augment`).
    start_step: first step (a resumed run starts where it stopped).
    num_steps: total steps of the run.
    process_index, process_count: this host and the number of hosts.
  """
  global_batch = sampler.batch_size
  if global_batch % process_count:
    raise ValueError(f"Global batch of {global_batch} tuples (P x K) is not divisible by "
                     f"{process_count} processes.")
  local = global_batch // process_count
  # The sampler's column (= modality) that each batch slot reads; slots past the modalities are
  # second views (`training_slots`).
  sources = np.asarray(training_slots(image_set.modality_names, config.augment))
  num_modalities = sampler.num_slots
  slots = len(sources)
  height, width = config.data.height, config.data.width
  rgb_slot = image_set.modality_names.index("rgb") if "rgb" in image_set.modality_names else -1
  encoded = tf.constant(list(image_set.images), tf.string)

  def sample(step):
    batch = sampler(int(step))
    start = process_index * local
    return (batch.rows[start:start + local][:, sources],
            batch.present[start:start + local][:, sources], batch.labels[start:start + local])

  def sample_tf(step):
    rows, present, labels = tf.numpy_function(sample, [step], [tf.int64, tf.bool, tf.int32],
                                              stateful=False)
    rows.set_shape([local, slots])
    present.set_shape([local, slots])
    labels.set_shape([local])
    position = tf.range(local * slots, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({
        "row": tf.reshape(rows, [-1]),
        "present": tf.reshape(present, [-1]),
        "label": tf.repeat(labels, slots),
        "slot": tf.tile(tf.range(slots, dtype=tf.int32), [local]),
        "seed": tf.stack([tf.fill([local * slots], step * (global_batch * slots)
                                  + process_index * local * slots) + position,
                          tf.fill([local * slots], tf.cast(config.seed, tf.int64))], axis=1),
    })

  def load(element):
    image = augment_lib.decode(tf.gather(encoded, tf.maximum(element["row"], 0)), height, width)
    slot_modality = tf.gather(tf.constant(sources, tf.int32), element["slot"])
    exchange = (tf.greater_equal(element["slot"], num_modalities) if slots > num_modalities
                else None)
    image = augment_lib.augment(image, element["seed"], tf.equal(slot_modality, rgb_slot),
                                config.augment, exchange=exchange)
    image = tf.where(element["present"], image, tf.zeros_like(image))
    return {"image": image, "present": element["present"], "label": element["label"]}

  def assemble(flat):
    return {
        "images": tf.reshape(flat["image"], [local, slots, height, width, 3]),
        "present": tf.reshape(flat["present"], [local, slots]),
        "labels": tf.reshape(flat["label"], [local, slots])[:, 0],
    }

  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = config.data.get("num_threads", 0) or 0
  return (tf.data.Dataset.range(start_step, num_steps)
          .flat_map(sample_tf)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(local * slots, drop_remainder=True)
          .map(assemble)
          .prefetch(config.data.get("prefetch", 2))
          .with_options(options))


def eval_batches(image_set: ImageSet, height: int, width: int, batch_size: int,
                 flip: bool = False) -> Iterator[tuple[np.ndarray, int]]:
  """Decoded, resized images of `image_set` in order, padded to full batches.

  Yields:
    (images (batch_size, H, W, 3) uint8, number of real rows) pairs; with `flip`, the images
    are mirrored left-right.
  """
  encoded = tf.constant(list(image_set.images), tf.string)

  def load(value):
    image = augment_lib.decode(value, height, width)
    return tf.image.flip_left_right(image) if flip else image

  dataset = (tf.data.Dataset.from_tensor_slices(encoded)
             .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
             .batch(batch_size)
             .prefetch(2))
  for images in dataset.as_numpy_iterator():
    count = len(images)
    if count < batch_size:
      images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:],
                                                images.dtype)])
    yield images, count
