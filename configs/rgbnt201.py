r"""The paper's model on RGBNT201 (`rgbnt201`: aligned RGB, near- and thermal-infrared captures),
read from your download.

Download and unpack RGBNT201 as README.md ("Real benchmarks") explains, then train and evaluate:

  python -m mmreid_jax.main --config configs/rgbnt201.py --workdir runs/rgbnt201 \
      --config.data.manual_dir=/data/RGBNT201

Presets through `get_config(arg)` (`--config configs/rgbnt201.py:NAME`):
  paper  (default) ResNet-50 (width 64) at 256 x 128 (the RGBNT201 literature's size), P x K =
         8 x 4 captures of all three modalities, SGD 0.1, warm-up 10 epochs, x 0.1 at epochs 20
         and 50, 80 epochs of 123 steps; the other sizes of `synthetic.py:paper`.
  tiny   `synthetic.py:tiny`'s network and 6 steps, for the tests' tiny trees.

What to expect: WORKDIR/eval/rgbnt201.json holds rgbnt201/all (every modality), the six
missing-modality settings rgbnt201/missing-<m> (those modalities absent from every query and
gallery capture) and the cross-setting retrievals rgbnt201/<A>-><B> (queries in setting A, gallery
in setting B). The paper reports no RGBNT201 result and no published figure is reproduced here.
ImageNet initialisation, which RGBNT201 methods use: `--config.model.pretrained=PATH`
(torchvision's ImageNet ResNet-50, see `config.model.pretrained` in configs/synthetic.py).
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

# 3,951 training captures (171 identities) / (8 x 4 tuples) per epoch.
STEPS_PER_EPOCH = 123


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("paper" or "tiny")."""
  return config_lib.benchmark_config(os.path.dirname(os.path.abspath(__file__)), preset,
                                     "rgbnt201", height=256, width=128,
                                     steps_per_epoch=STEPS_PER_EPOCH)
