r"""CAJ (Ye et al., "Channel Augmented Joint Learning for Visible-Infrared Recognition", ICCV 2021)
on SYSU-MM01 (`sysu_mm01`): AGW (`configs/agw_sysu_mm01.py`) plus channel-exchange augmentation
and random erasing, and CAJ's adaptive triplet in place of WRT (`config_lib.caj_recipe`).

Every training tuple carries a second view of its RGB image, augmented on its own and with its
channels exchanged (a random one of R, G, B copied to all three channels, or the grayscale
image): a batch of 8 x 4 tuples holds 32 RGB images, their 32 exchanged views and 32 infrared
images, all in the identity and triplet losses, as in CAJ's code. Every image is also randomly
erased (p = 0.5) with CAJ's per-channel fill.

  python -m mmreid_jax.main --config configs/caj_sysu_mm01.py --workdir runs/caj_sysu_mm01 \
      --config.data.manual_dir=/data/SYSU-MM01 \
      --config.model.pretrained=weights/resnet50.safetensors

Presets (`--config configs/caj_sysu_mm01.py:NAME`): paper (default), demo and tiny, as in
`configs/agw_sysu_mm01.py`.

What to expect: WORKDIR/eval/sysu_mm01.json with the four SYSU-MM01 protocols. Published (CAJ's
code, single-shot all-search, ImageNet start, flip-averaged test features): 69.88 Rank-1 / 66.89
mAP / 53.61 mINP; NOT reproduced here (no SYSU-MM01 copy on the machines that built this). The
metric loss is CAJ's "enhanced squared difference" triplet, as in those figures (its code's
`--method adp --alpha 1 --gamma 1 --square 1`, `losses.adaptive_weighted_triplet`).
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("paper", "demo" or "tiny")."""
  agw = config_lib.load_config_file(os.path.join(CONFIG_DIR, "agw_sysu_mm01.py"), preset)
  return config_lib.caj_recipe(agw)
