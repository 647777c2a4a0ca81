"""Helpers of the config files in `configs/`: loading one config file from another, the
training recipe the real benchmarks share, and the baselines' recipes.

The benchmark configs (`configs/sysu_mm01.py`, `configs/regdb.py`, `configs/rgbnt201.py`) start
from `configs/synthetic.py` (its `paper` preset for the model of the paper, its `tiny` preset for
the tests, its `demo` preset for CPU-sized runs, so that each keeps one definition) and set the
data and the schedule of DESIGN.md. The baseline configs (`configs/agw_*.py`,
`configs/caj_*.py`) start from a benchmark config and apply `agw_recipe` (and `caj_recipe`):
the same model code with AGW's switches, losses, sampling and schedule.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Sequence
import os
import types

import ml_collections
from ml_collections import config_dict

# paper: the published recipe at full size (a GPU job); tiny: the tests'; demo: the CPU demo's
# network, image size, optimizer and 1,500 steps (the synthetic comparison, docs/results.md).
BENCHMARK_PRESETS = ("paper", "tiny", "demo")
# The schedule of DESIGN.md section 4 in epochs, with AGW's step decay (x 0.1 at epochs 20, 50).
EPOCHS = 80
WARMUP_EPOCHS = 10
DECAY_EPOCHS = (20, 50)


def load_config_module(path: str | os.PathLike) -> types.ModuleType:
  """The config file at `path` as a module (its `get_config` and constants)."""
  path = os.fspath(path)
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"Cannot load config file {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path: str | os.PathLike, arg: str | None = None
                     ) -> ml_collections.ConfigDict:
  """`get_config(arg)` (or `get_config()` when `arg` is None) of the config file at `path`."""
  module = load_config_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def benchmark_config(config_dir: str | os.PathLike, preset: str, data_name: str, *,
                     height: int, width: int, steps_per_epoch: int) -> ml_collections.ConfigDict:
  """The config of a real benchmark.

  Args:
    config_dir: the folder holding `synthetic.py` (the calling config's own folder).
    preset: "paper" (ResNet-50 at `height` x `width`, P x K = 8 x 4, SGD with DESIGN.md's
      schedule over `EPOCHS` epochs), "tiny" (`synthetic.py:tiny`'s model and steps, for tests)
      or "demo" (`synthetic.py:demo`'s network, 96 x 48 images, AdamW and 1,500 steps).
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
  # Raw pixels of a real test set are GBs; those of the small sets the other presets run on not.
  config.eval.raw_pixel_baseline = preset != "paper"
  if preset == "demo":
    # The synthetic demo's recipe before scene conditions (single-modality tuples, no alone
    # views), which docs/results.md's comparison with AGW and CAJ was measured with.
    config.data.single_modality_frac = 1.0
    config.model.train_alone_views = False
    config.model.fused_view_detached = False
  if preset != "paper":
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


# AGW's schedule in epochs: 81 (epochs 0..80), warm-up 10, x 0.1 at epoch 20 and again at 50.
AGW_EPOCHS = 81
# AGW's backbone (everything but the BNNeck and the classifier) learns at 0.1 x the head's rate.
AGW_LR_MULTIPLIERS = ((r"^(stem_|shared/)", 0.1),)
# Non-local blocks per stage 1..4: AGW's on ResNet-50; on ResNet-18 (two blocks per stage) the
# demo and tiny presets keep two and one.
AGW_NON_LOCAL = {"paper": (0, 2, 3, 0), "demo": (0, 2, 2, 0), "tiny": (0, 1, 1, 0)}
# CAJ's random-erasing fill: its normalised (0.4914, 0.4822, 0.4465) as ImageNet-normalised pixels.
CAJ_ERASING_FILL = (152, 144, 129)


def two_stream_baseline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The standard multi-stream baseline's switches on any config: `model.name` "agw" (a
  modality-specific stem per modality, shared stages 1-4, last stride 1, GeM with p = 3, BNNeck,
  a linear classifier, no attention, no non-local blocks), identity cross-entropy as the only
  loss (a recipe adds its metric loss), tuples of every modality, no random erasing, channel
  augmentation or exchanged views, one learning rate. Returns `config`, changed in place."""
  model = config.model
  model.name = "agw"
  model.attention = False
  model.embedding = "gem"
  model.gem_p = 3.0
  model.classifier = "linear"
  model.non_local = (0, 0, 0, 0)
  model.specific_stages = 0
  model.last_stride = 1
  model.train_alone_views = False
  model.fused_view_detached = False
  loss = config.loss
  loss.cross_entropy = 1.0
  loss.wrt = 0.0
  loss.wrt_agw_normaliser = True
  loss.adaptive_triplet = 0.0
  loss.adaptive_alpha = 1.0
  loss.adaptive_gamma = 1.0
  loss.adaptive_square = True
  loss.triplet = 0.0
  loss.center = 0.0
  loss.consistency = 0.0
  loss.reconstruction = 0.0
  config.data.single_modality_frac = 0.0
  config.augment.erasing_prob = 0.0
  config.augment.channel_prob = 0.0
  config.augment.exchange_view = False
  config.optim.lr_multipliers = ()
  return config


def agw_recipe(config: ml_collections.ConfigDict, preset: str,
               steps_per_epoch: int) -> ml_collections.ConfigDict:
  """Turns a benchmark config (`benchmark_config`) into AGW's (Ye et al., TPAMI 2021).

  Model `agw` (two-stream ResNet: modality-specific stem, shared stages 1-4, last stride 1;
  non-local blocks in stages 2 and 3; GeM with p = 3; BNNeck; linear classifier); losses:
  identity cross-entropy + weighted regularised triplet, weight 1 each, no other term; batches
  of P x K = 8 x 4 tuples of one image per modality (8 identities x 4 images per modality); no
  random erasing or channel augmentation (pad, crop and flip only). Preset "paper": SGD
  (momentum 0.9, Nesterov, weight decay 5e-4) at 0.1 for the BNNeck and classifier and 0.01
  for the backbone, linear warm-up over 10 epochs, x 0.1 at epoch 20 and x 0.01 from epoch 50,
  81 epochs of `steps_per_epoch`. Presets "demo" and "tiny" keep the source preset's optimizer
  and steps (the same budget as the paper model's preset).

  Args:
    config: a benchmark config of `preset`.
    preset: one of `BENCHMARK_PRESETS`.
    steps_per_epoch: steps of P x K tuples per epoch (AGW's epoch: the larger modality's
      training images once).

  Returns:
    `config`, changed in place.
  """
  if preset not in BENCHMARK_PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for AGW; expected one of {BENCHMARK_PRESETS}.")
  two_stream_baseline(config)
  config.model.non_local = AGW_NON_LOCAL[preset]
  config.loss.wrt = 1.0
  if preset != "paper":
    return config

  config.data.num_identities, config.data.tuples_per_identity = 8, 4
  config.augment.pad = 10
  config.optim.name = "sgd"
  config.optim.base_learning_rate = 0.1
  config.optim.scale_by_batch = False
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.lr_multipliers = AGW_LR_MULTIPLIERS
  config.optim.warmup_steps = WARMUP_EPOCHS * steps_per_epoch
  config.optim.schedule = "step"
  config.optim.decay_boundaries = tuple(epoch / AGW_EPOCHS for epoch in DECAY_EPOCHS)
  config.optim.decay_factor = 0.1
  config.num_train_steps = AGW_EPOCHS * steps_per_epoch
  return config


def caj_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns an AGW config (`agw_recipe`) into CAJ's (Ye et al., ICCV 2021): a second view of
  every RGB image with its channels exchanged (a random one of R, G, B copied to all three, or
  grayscale; one more batch slot, `pipeline.training_slots`) and random erasing (p = 0.5, CAJ's
  per-channel fill) of every image, RGB views and infrared alike; the metric loss is CAJ's
  adaptive weighted triplet (`losses.adaptive_weighted_triplet`, its code's `--method adp`) with
  its training script's `--alpha 1 --gamma 1 --square 1` in place of AGW's WRT. Returns
  `config`, changed in place."""
  config.augment.exchange_view = True
  config.augment.erasing_prob = 0.5
  config.augment.erasing_fill = CAJ_ERASING_FILL
  config.loss.wrt = 0.0
  config.loss.adaptive_triplet = 1.0
  config.loss.adaptive_alpha, config.loss.adaptive_gamma = 1.0, 1.0
  config.loss.adaptive_square = True
  return config


def load_config_with_overrides(config_arg: str, overrides: Sequence[str]
                               ) -> ml_collections.ConfigDict:
  """The `--config` file's config with `--config.KEY=VALUE` overrides, as the command line of
  `mmreid_jax.main` parses them (typed; an unknown key is refused by name)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  for arg in overrides:
    if not arg.startswith(("--config.", "--noconfig.")):
      raise ValueError(f"{arg!r}: only --config.KEY=VALUE overrides are accepted here.")
  argv = ["config", f"--config={config_arg}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=flag_values,
                                  lock_config=False, sys_argv=argv)
  try:
    flag_values(argv)
  except (AttributeError, KeyError, flags.Error) as error:
    message = None
    try:
      message = unknown_override(argv)
    except (OSError, ValueError, AttributeError, KeyError):
      pass
    raise ValueError(message or str(error)) from error
  return flag_values.config


def config_file_arg(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` ("configs/NAME.py[:preset]"), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_override(argv: list[str]) -> str | None:
  """Says which `--config.KEY=VALUE` of `argv` names a key that the `--config` file's config
  lacks, with the keys beside it (None when every override's key exists)."""
  value = config_file_arg(argv)
  if value is None:
    return None
  path, _, preset = value.partition(":")
  config = load_config_file(path, preset or None)
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if not name.startswith(("--config.", "--noconfig.")):
      continue
    parts = name.split(".")[1:]
    node = config
    for depth, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      parent = ".".join(["config", *parts[:depth]])
      if not isinstance(node, ml_collections.ConfigDict):
        return f"{arg}: {parent} is a value, not a group of keys."
      keys = sorted(node.keys())
      close = difflib.get_close_matches(part, keys, n=1)
      return (f"{arg}: {parent} has no key {part!r}"
              + (f" (did you mean {close[0]!r}?)" if close else "")
              + f"; its keys: {', '.join(keys)}.")
  return None
