"""Helpers of the config files in `configs/`: loading one config file from another, and the
training recipe the real benchmarks share.

The benchmark configs (`configs/sysu_mm01.py`, `configs/regdb.py`, `configs/rgbnt201.py`) start
from `configs/synthetic.py` (its `paper` preset for the model of the paper, its `tiny` preset for
the tests, so that both keep one definition) and set the data and the schedule of DESIGN.md.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections
from ml_collections import config_dict

BENCHMARK_PRESETS = ("paper", "tiny")
# The schedule of DESIGN.md section 4 in epochs, with AGW's step decay (x 0.1 at epochs 20, 50).
EPOCHS = 80
WARMUP_EPOCHS = 10
DECAY_EPOCHS = (20, 50)


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """`get_config(arg)` (or `get_config()` when `arg` is None) of the config file at `path`."""
  path = os.fspath(path)
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def benchmark_config(config_dir: str | os.PathLike, preset: str, data_name: str, *,
                     height: int, width: int, steps_per_epoch: int) -> ml_collections.ConfigDict:
  """The config of a real benchmark.

  Args:
    config_dir: the folder holding `synthetic.py` (the calling config's own folder).
    preset: "paper" (ResNet-50 at `height` x `width`, P x K = 8 x 4, SGD with DESIGN.md's
      schedule over `EPOCHS` epochs) or "tiny" (`synthetic.py:tiny`'s model and steps, for tests).
    data_name: `config.data.name` ("sysu_mm01", "regdb/3", ...).
    height, width: the image size of the paper preset.
    steps_per_epoch: steps of P x K tuples that see the training images of the larger modality
      once (as AGW counts an epoch); the schedule is set in epochs.

  Returns:
    The config; `data.manual_dir` (the user's download) is left to the command line.
  """
  if preset not in BENCHMARK_PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for {data_name}; expected one of "
                     f"{BENCHMARK_PRESETS}.")
  config = load_config_file(os.path.join(os.fspath(config_dir), "synthetic.py"), preset)
  config.data.name = data_name
  config.data.manual_dir = config_dict.placeholder(str)
  config.eval.rerank = False
  config.eval.rerank_k1 = 20
  config.eval.rerank_k2 = 6
  config.eval.rerank_lambda = 0.3
  config.eval.raw_pixel_baseline = preset == "tiny"  # Raw pixels of a real test set are GBs.
  if preset == "tiny":
    return config

  config.data.height, config.data.width = height, width
  config.data.num_identities, config.data.tuples_per_identity = 8, 4
  config.data.single_modality_frac = 0.5
  # SGD, momentum 0.9 (Nesterov), weight decay 5e-4: 0.1 for the 8 x 4 tuples of two images,
  # AGW's rate for its batch of 64 images.
  config.optim.name = "sgd"
  config.optim.base_learning_rate = 0.1
  config.optim.scale_by_batch = False
  config.optim.weight_decay = 5e-4
  config.optim.warmup_steps = WARMUP_EPOCHS * steps_per_epoch
  config.optim.schedule = "step"
  config.optim.decay_boundaries = tuple(epoch / EPOCHS for epoch in DECAY_EPOCHS)
  config.optim.decay_factor = 0.1
  config.num_train_steps = EPOCHS * steps_per_epoch
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5 * steps_per_epoch
  return config
