"""The features every re-identification builder stores, synthetic or downloaded."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


def reid_features(encoding_format: str, **extra: tfds.features.FeatureConnector
                  ) -> tfds.features.FeaturesDict:
  """`image` (encoded as `encoding_format`), `pid`, `camid`, `modality` (index into the builder's
  MODALITIES), `tuple_id` (the capture shared by pixel-aligned images, or -1) and `path`, and a
  builder's `extra` features (the synthetic set's `condition`)."""
  return tfds.features.FeaturesDict({
      **extra,
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "pid": np.int64,
      "camid": np.int64,
      "modality": np.int64,
      "tuple_id": np.int64,
      "path": tfds.features.Text(),
  })
