r"""AGW (Ye et al., TPAMI 2021), the standard two-stream baseline, on SYSU-MM01 (`sysu_mm01`).

The same model code as the paper's (`mmreid_jax.models.AGW`, config.model.name "agw"): ResNet-50
with a modality-specific stem and shared stages 1-4 (last stride 1), non-local blocks (2 in
stage 2, 3 in stage 3), GeM pooling (p = 3), BNNeck and a linear classifier; identity
cross-entropy plus the weighted regularised triplet loss; 8 identities x 4 images per modality;
SGD 0.1 (BNNeck, classifier) and 0.01 (backbone), linear warm-up over 10 epochs, x 0.1 at
epoch 20 and x 0.01 from epoch 50, 81 epochs of 695 steps (`config_lib.agw_recipe`).

  python -m mmreid_jax.main --config configs/agw_sysu_mm01.py --workdir runs/agw_sysu_mm01 \
      --config.data.manual_dir=/data/SYSU-MM01 \
      --config.model.pretrained=weights/resnet50.safetensors

Presets through `get_config(arg)` (`--config configs/agw_sysu_mm01.py:NAME`):
  paper  (default) the published recipe above, 288 x 144, ImageNet weights via
         `--config.model.pretrained` (README "Pretrained weights"); a GPU job.
  demo   AGW's network at the CPU demo's size (ResNet-18 of width 16, non-local blocks (0, 2, 2, 0)
         since ResNet-18 has two blocks per stage), 96 x 48, with the demo's AdamW and 1,500 steps:
         the budget of `configs/sysu_mm01.py:demo` (scripts/compare_baselines.py).
  tiny   the tests' width-8 network at 32 x 16, non-local blocks (0, 1, 1, 0), 6 steps.

What to expect: WORKDIR/eval/sysu_mm01.json with the four SYSU-MM01 protocols (10 trials each).
Published (AGW's code, single-shot all-search, ImageNet start): 47.50 Rank-1 / 47.65 mAP /
35.30 mINP; NOT reproduced here (no real dataset on the development machine).
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def get_config(preset: str = "paper") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("paper", "demo" or "tiny")."""
  sysu = config_lib.load_config_module(os.path.join(CONFIG_DIR, "sysu_mm01.py"))
  return config_lib.agw_recipe(sysu.get_config(preset), preset, sysu.STEPS_PER_EPOCH)
