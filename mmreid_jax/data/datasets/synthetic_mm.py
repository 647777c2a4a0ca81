"""`synthetic_mm`: the generated RGB / infrared / depth person set (TFDS builder).

Splits: ``train`` (identities ``0 .. num_train_ids - 1``, every tuple), ``query`` and ``gallery``
(the next ``num_test_ids`` identities, disjoint from training). For every test identity and
camera the first half of the tuples goes to ``query`` and the second half to ``gallery``, so a
query of any modality has gallery matches of every modality in the other cameras.

Every capture has a scene condition (`synthetic_render.CONDITIONS`: ``clear``, ``night``,
``overexposed``, ``thermal_crossover``, ``depth_dropout``, ``occluded``), drawn from the config's
mix (``conditions`` for the train split, ``test_conditions`` for query and gallery) and stored
in every example as ``condition``.

Named configs (``synthetic_mm/NAME``): ``tiny`` for tests, ``demo`` (moderate nuisances) for
``make demo``, ``hard`` (strong nuisances, more identities) for benchmarks and ablations, all in
clear scenes; ``conditions``, the demo's identities and nuisances (and twice its test
identities) in a mix of every condition. A run picks another mix with
``config.data.conditions`` (and ``config.data.test_conditions``): the builder then renders the
named config's set under that mix, as a config of its own name (the named one, a hyphen and a
digest of the mixes). Any other combination: ``SyntheticMmConfig(name=..., ...)`` passed as
``config=``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import tensorflow_datasets as tfds

from mmreid_jax.data.datasets import schema, synthetic_render

CLEAR = (("clear", 1.0),)
# The `conditions` set's mix, train and test alike: a quarter clear, the rest one failure each.
CONDITION_MIX = (("clear", 0.25), ("night", 0.15), ("overexposed", 0.15),
                 ("thermal_crossover", 0.15), ("depth_dropout", 0.15), ("occluded", 0.15))


@dataclasses.dataclass(eq=False)
class SyntheticMmConfig(tfds.core.BuilderConfig):
  """Size, difficulty and seed of a generated set.

  Attributes:
    num_train_ids: identities in the train split.
    num_test_ids: identities shared by the query and gallery splits (disjoint from train).
    num_cameras: cameras; each captures every identity `tuples_per_camera` times.
    tuples_per_camera: aligned (rgb, ir, depth) captures per identity and camera; must be >= 2
      so that test identities have both query and gallery images in every camera.
    height, width: image size in pixels.
    difficulty: nuisance strength in [0, 1] (noise, light, clutter, jitter, IR polarity).
    seed: the generator seed; the same config renders the same pixels.
    conditions: the train split's scene conditions, (name, probability) pairs summing to 1.
    test_conditions: the query and gallery splits' conditions; None: `conditions`.
  """

  num_train_ids: int = 100
  num_test_ids: int = 50
  num_cameras: int = 3
  tuples_per_camera: int = 4
  height: int = 96
  width: int = 48
  difficulty: float = 0.5
  seed: int = 0
  conditions: tuple[tuple[str, float], ...] = CLEAR
  test_conditions: tuple[tuple[str, float], ...] | None = None

  def __post_init__(self):
    self.conditions = synthetic_render.check_conditions(
        dict(self.conditions), f"synthetic_mm config {self.name!r}: conditions")
    if self.test_conditions is not None:
      self.test_conditions = synthetic_render.check_conditions(
          dict(self.test_conditions), f"synthetic_mm config {self.name!r}: test_conditions")
    if self.tuples_per_camera < 2:
      raise ValueError(f"synthetic_mm config {self.name!r}: tuples_per_camera="
                       f"{self.tuples_per_camera}, expected >= 2 (query and gallery per camera).")
    if not 0.0 <= self.difficulty <= 1.0:
      raise ValueError(f"synthetic_mm config {self.name!r}: difficulty={self.difficulty}, "
                       "expected a value in [0, 1].")
    for field in ("num_train_ids", "num_test_ids", "num_cameras", "height", "width"):
      if getattr(self, field) < 1:
        raise ValueError(f"synthetic_mm config {self.name!r}: {field}="
                         f"{getattr(self, field)}, expected >= 1.")


class SyntheticMm(tfds.core.GeneratorBasedBuilder):
  """Generated three-modality (rgb, ir, depth) person re-identification set."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Scene conditions: the `condition` feature and the `conditions` "
                            "config; clear captures render as in 1.0.0."}
  MODALITIES = synthetic_render.MODALITIES
  # `config.data` keys that `datasets.builder_from_config` passes to the constructor.
  BUILDER_OPTIONS = ("conditions", "test_conditions")
  BUILDER_CONFIGS = [
      SyntheticMmConfig(name="tiny", description="Tests: 8 + 4 identities, 32 x 16 pixels.",
                        num_train_ids=8, num_test_ids=4, num_cameras=2, tuples_per_camera=2,
                        height=32, width=16, difficulty=0.5),
      SyntheticMmConfig(name="demo", description="make demo: 150 + 50 identities, mild nuisances.",
                        num_train_ids=150, num_test_ids=50, num_cameras=3, tuples_per_camera=4,
                        height=96, width=48, difficulty=0.15),
      SyntheticMmConfig(name="hard", description="Benchmarks: 400 + 100 identities, strong.",
                        num_train_ids=400, num_test_ids=100, num_cameras=4, tuples_per_camera=4,
                        height=128, width=64, difficulty=1.0),
      SyntheticMmConfig(name="conditions",
                        description="Scene conditions: 150 + 100 identities, demo nuisances, "
                                    "a mix of every condition.",
                        num_train_ids=150, num_test_ids=100, num_cameras=3, tuples_per_camera=4,
                        height=96, width=48, difficulty=0.15, conditions=CONDITION_MIX),
  ]
  DEFAULT_CONFIG_NAME = "demo"

  def __init__(self, *, config: str | SyntheticMmConfig | None = None,
               conditions: Mapping[str, float] | None = None,
               test_conditions: Mapping[str, float] | None = None, **kwargs):
    """`config` as TFDS takes it; `conditions` / `test_conditions` ({name: probability}, from
    `config.data`) render that config's set under other mixes, as a config named after them."""
    if conditions is not None or test_conditions is not None:
      named = {c.name: c for c in self.BUILDER_CONFIGS}
      base = config if isinstance(config, SyntheticMmConfig) else named[
          config or self.DEFAULT_CONFIG_NAME]
      train_mix = (base.conditions if conditions is None else synthetic_render.check_conditions(
          dict(conditions), "config.data.conditions"))
      test_mix = (base.test_conditions if test_conditions is None else
                  synthetic_render.check_conditions(dict(test_conditions),
                                                    "config.data.test_conditions"))
      if test_mix == train_mix:
        test_mix = None
      if (train_mix, test_mix) != (base.conditions, base.test_conditions):
        digest = hashlib.sha256(json.dumps([train_mix, test_mix]).encode()).hexdigest()[:10]
        config = dataclasses.replace(base, name=f"{base.name}-{digest}",
                                     conditions=train_mix, test_conditions=test_mix)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=schema.reid_features("png", condition=tfds.features.Text()),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager
    cfg = self.builder_config
    train_ids = range(cfg.num_train_ids)
    test_ids = range(cfg.num_train_ids, cfg.num_train_ids + cfg.num_test_ids)
    half = cfg.tuples_per_camera // 2
    test_mix = cfg.conditions if cfg.test_conditions is None else cfg.test_conditions
    return {
        "train": self._generate_examples(train_ids, lambda t: True, cfg.conditions),
        "query": self._generate_examples(test_ids, lambda t: t < half, test_mix),
        "gallery": self._generate_examples(test_ids, lambda t: t >= half, test_mix),
    }

  def _generate_examples(self, pids: range, tuple_filter, conditions):
    cfg = self.builder_config
    for record in synthetic_render.generate_split(
        pids, cfg.num_cameras, cfg.tuples_per_camera, cfg.height, cfg.width, cfg.seed,
        cfg.difficulty, tuple_filter, conditions):
      yield record.path, {
          "image": record.image,
          "pid": record.pid,
          "camid": record.camid,
          "modality": record.modality,
          "tuple_id": record.tuple_id,
          "path": record.path,
          "condition": record.condition,
      }
