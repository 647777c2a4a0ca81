"""Image decoding and training augmentations (TensorFlow, stateless random ops).

Every random choice takes an explicit (2,) int seed, so an image's augmentation is a pure
function of (run seed, step, position in the batch). Images stay uint8 in [0, 255]; the model
normalises them.

CAJ (Ye et al., ICCV 2021) uses two of these on every image: random erasing, whose fill is a
constant per channel (`erasing_fill`; CAJ's "channel random erasing" fills its normalised
tensors with (0.4914, 0.4822, 0.4465), the pixel (152, 144, 129)), and channel exchange, which
copies a random one of R, G, B to all three channels, or the grayscale image, onto a second view
of every RGB image (`augment(..., exchange=...)`, the same draw as the channel augmentation).
"""

from __future__ import annotations

import io

import ml_collections
import tensorflow as tf
from PIL import Image

# Random erasing fills with the ImageNet mean pixel (what the model normalises to zero).
_MEAN_PIXEL = (124, 116, 104)


class ImageError(ValueError):
  """Encoded bytes that `decode` cannot read; the message names the file and why."""


# What `decode` does to images that are not 8-bit RGB, by Pillow mode (what `check_image` says).
CONVERSIONS = {
    "L": "grayscale, copied to 3 channels", "1": "1-bit, copied to 3 channels",
    "LA": "grayscale with alpha: alpha dropped, copied to 3 channels",
    "RGBA": "RGBA: alpha dropped", "P": "palette: expanded to RGB",
    "PA": "palette with alpha: expanded to RGB, alpha dropped",
    "I;16": "16-bit: scaled to 8 bits (value / 257), copied to 3 channels",
    "I;16B": "16-bit: scaled to 8 bits (value / 257), copied to 3 channels",
    "I": "16-bit: scaled to 8 bits (value / 257), copied to 3 channels",
    "CMYK": "CMYK: converted to RGB",
}


def check_image(encoded: bytes, name: str) -> str:
  """Checks that `decode` reads `encoded`, and says how it converts it to 8-bit RGB.

  `decode` reads JPEG, PNG, BMP, GIF (the first frame) and WebP; grayscale images get 3 equal
  channels, alpha is dropped, 16-bit PNGs are scaled to 8 bits (value / 257), palettes are
  expanded.

  Args:
    encoded: the file's bytes.
    name: the file, for the error message.

  Returns:
    "" for an 8-bit RGB image, else the `CONVERSIONS` entry of its mode.

  Raises:
    ImageError: the bytes are not a complete image `decode` can read, or it has no pixels.
  """
  try:
    shape = tf.io.decode_image(encoded, channels=3, expand_animations=False).shape
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
    reason = str(error).split("\n")[0].split("} ")[-1].replace("[Op:DecodeImage]", "").strip()
    raise ImageError(f"{name}: not an image that can be read ({len(encoded)} bytes: "
                     f"{reason}); expected a complete JPEG, PNG, BMP, GIF or WebP file.") from None
  if shape[0] == 0 or shape[1] == 0:
    raise ImageError(f"{name}: an image of {shape[0]} x {shape[1]} pixels; expected at least "
                     "one pixel.")
  try:
    mode = Image.open(io.BytesIO(encoded)).mode
  except (OSError, ValueError, SyntaxError):  # Pillow cannot name the mode; TensorFlow read it.
    return ""
  return CONVERSIONS.get(mode, "")


def decode(encoded: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Decodes a PNG/JPEG string to (height, width, 3) uint8, resizing (bilinear) if needed.

  Every image that `check_image` accepts decodes; the builders check each one when they
  prepare a dataset. An image already of height x width is returned as decoded: `resize` to the
  same size is the identity (tested), and skipping it triples the decode rate.
  """
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  size = tf.shape(image)[:2]
  same_size = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  image = tf.cond(same_size, lambda: image, lambda: resize(image, height, width))
  image.set_shape([height, width, 3])
  return image


def resize(images: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(h, w, 3) or (B, h, w, 3) images in [0, 255] -> uint8 images of height x width: bilinear
  with antialiasing, rounded and clipped (how every image reaches the model; `inference` and the
  exported SavedModel resize with it too)."""
  resized = tf.image.resize(images, (height, width), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _random_erasing(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict
                    ) -> tf.Tensor:
  """Zhong et al.'s random erasing: one rectangle of random area and aspect, mean-filled."""
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  area = tf.random.stateless_uniform([], seeds[0], config.erasing_area[0],
                                     config.erasing_area[1]) * height * width
  log_ratio = tf.random.stateless_uniform([], seeds[1], tf.math.log(config.erasing_aspect[0]),
                                          tf.math.log(config.erasing_aspect[1]))
  ratio = tf.exp(log_ratio)
  erase_h = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, height)
  erase_w = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, width)
  top = tf.random.stateless_uniform([], seeds[2], 0, height - erase_h + 1, tf.int32)
  left = tf.random.stateless_uniform([], seeds[3], 0, width - erase_w + 1, tf.int32)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
  apply = tf.random.stateless_uniform([], seeds[4]) < config.erasing_prob
  fill = tf.broadcast_to(tf.constant(tuple(config.get("erasing_fill", _MEAN_PIXEL)), tf.uint8),
                         image.shape)
  return tf.where(inside[..., None] & apply, fill, image)


def _channel_augmentation(image: tf.Tensor, seed: tf.Tensor, probability: float) -> tf.Tensor:
  """With `probability`, replaces the three channels by one random channel or by grayscale."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  choice = tf.random.stateless_uniform([], seeds[0], 0, 4, tf.int32)
  as_float = tf.cast(image, tf.float32)
  options = tf.stack([as_float[..., 0], as_float[..., 1], as_float[..., 2],
                      tf.image.rgb_to_grayscale(as_float)[..., 0]])
  single = tf.cast(tf.round(tf.gather(options, choice)), tf.uint8)
  apply = tf.random.stateless_uniform([], seeds[1]) < probability
  return tf.where(apply, tf.repeat(single[..., None], 3, axis=-1), image)


def augment(image: tf.Tensor, seed: tf.Tensor, is_rgb: tf.Tensor,
            config: ml_collections.ConfigDict, exchange: tf.Tensor | None = None) -> tf.Tensor:
  """Training augmentation of one (H, W, 3) uint8 image.

  Flip, zero-pad by `config.pad` and random-crop back, random erasing, (for RGB images)
  channel augmentation, and channel exchange where `exchange`, each switched by `config`.

  Args:
    image: (H, W, 3) uint8.
    seed: (2,) int64 stateless seed.
    is_rgb: scalar bool, whether channel augmentation applies.
    config: `config.augment` (flip, pad, erasing_prob, erasing_area, erasing_aspect,
      erasing_fill (optional), channel_prob).
    exchange: scalar bool or None; where true, the image's channels are always replaced by a
      random one of R, G, B or by grayscale, after everything else (CAJ's second RGB view).
  """
  height, width = image.shape[0], image.shape[1]
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if config.flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
  if config.pad > 0:
    padded = tf.pad(image, [[config.pad, config.pad], [config.pad, config.pad], [0, 0]])
    image = tf.image.stateless_random_crop(padded, (height, width, 3), seeds[1])
  if config.erasing_prob > 0:
    image = _random_erasing(image, seeds[2], config)
  if config.channel_prob > 0:
    image = tf.where(is_rgb, _channel_augmentation(image, seeds[3], config.channel_prob), image)
  if exchange is not None:  # its own seed: the draws above stay those of a single-view run
    exchange_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    image = tf.where(exchange, _channel_augmentation(image, exchange_seed, 1.0), image)
  return image
