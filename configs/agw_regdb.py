r"""AGW (Ye et al., TPAMI 2021), the standard two-stream baseline, on RegDB (`regdb`), one split.

AGW's network, losses, sampling and schedule as in `configs/agw_sysu_mm01.py`
(`config_lib.agw_recipe`), 81 epochs of 64 steps. One trial:

  python -m mmreid_jax.main --config configs/agw_regdb.py:3 --workdir runs/agw_regdb/trial_3 \
      --config.data.manual_dir=/data/RegDB --config.model.pretrained=weights/resnet50.safetensors

All ten trials, then their mean and standard deviation in runs/agw_regdb/eval/regdb.json:

  CONFIG=agw_regdb.py scripts/run_regdb_trials.sh runs/agw_regdb paper \
      --config.data.manual_dir=/data/RegDB --config.model.pretrained=weights/resnet50.safetensors

`get_config(arg)`: arg is "<preset>", "<trial>" or "<preset>,<trial>" (default "paper,1"), with
the presets of `configs/agw_sysu_mm01.py` (paper, demo, tiny).

What to expect: WORKDIR/eval/regdb.json with regdb/visible->thermal and regdb/thermal->visible.
Published (AGW's code, visible->thermal, mean of the ten trials, ImageNet start): 70.05 Rank-1
/ 66.37 mAP / 50.19 mINP; NOT reproduced here.
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "paper,1") -> ml_collections.ConfigDict:
  """Returns the config of a preset ("paper", "demo" or "tiny") and trial (1..10)."""
  regdb = config_lib.load_config_module(os.path.join(CONFIG_DIR, "regdb.py"))
  preset, _ = regdb.parse_arg(arg)
  return config_lib.agw_recipe(regdb.get_config(arg), preset, regdb.STEPS_PER_EPOCH)
