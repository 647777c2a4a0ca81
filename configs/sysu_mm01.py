r"""The paper's model on SYSU-MM01 (`sysu_mm01`), read from your download.

Download and unpack SYSU-MM01 as README.md ("Real benchmarks") explains, then train and evaluate
(a GPU job: 80 epochs of 695 steps of ResNet-50 at 288 x 144):

  python -m mmreid_jax.main --config configs/sysu_mm01.py --workdir runs/sysu_mm01 \
      --config.data.manual_dir=/data/SYSU-MM01

The first run checks the download's layout (naming everything missing in one error) and converts
it to TFDS files under `--config.data.data_dir` (default ~/tensorflow_datasets). Evaluate the
newest checkpoint again with `--mode=evaluate`; add `--config.eval.rerank=True` for k-reciprocal
re-ranking.

Presets through `get_config(arg)` (`--config configs/sysu_mm01.py:NAME`):
  paper  (default) ResNet-50 (width 64) at 288 x 144, P x K = 8 x 4 (each tuple one RGB and one
         infrared image of an identity), SGD 0.1, warm-up 10 epochs, x 0.1 at epochs 20 and 50,
         80 epochs; D = 512 and the other sizes of `synthetic.py:paper`.
  tiny   `synthetic.py:tiny`'s network and 6 steps, for the tests' tiny trees.

What to expect: WORKDIR/eval/sysu_mm01.json holds sysu/all-search/single-shot,
sysu/all-search/multi-shot, sysu/indoor-search/single-shot and sysu/indoor-search/multi-shot, each
the mean and standard deviation over the 10 gallery trials. Published figures, NOT reproduced
here: the paper reports 88.7 Rank-1 / 82.6 mAP (all-search); AGW, the strongest public two-stream
baseline, 47.50 Rank-1 / 47.65 mAP / 35.30 mINP (all-search, single-shot). Both start from
ImageNet weights: add `--config.model.pretrained=PATH` (torchvision's ImageNet ResNet-50, see
`config.model.pretrained` in configs/synthetic.py); from random weights far lower numbers are to
be expected.
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

# 22,258 RGB training images (train + val identities) / (8 x 4 tuples) per epoch.
STEPS_PER_EPOCH = 695


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("paper" or "tiny")."""
  return config_lib.benchmark_config(os.path.dirname(os.path.abspath(__file__)), preset,
                                     "sysu_mm01", height=288, width=144,
                                     steps_per_epoch=STEPS_PER_EPOCH)
