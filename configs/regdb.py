r"""The paper's model on RegDB (`regdb`), one of its ten splits, read from your download.

Download and unpack RegDB with its idx/ lists as README.md ("Real benchmarks") explains. Every
published RegDB result trains one model per split (trial 1..10) and averages the ten; one trial:

  python -m mmreid_jax.main --config configs/regdb.py:3 --workdir runs/regdb/trial_3 \
      --config.data.manual_dir=/data/RegDB

All ten trials, then their mean and standard deviation in runs/regdb/eval/regdb.json:

  scripts/run_regdb_trials.sh runs/regdb paper --config.data.manual_dir=/data/RegDB

`get_config(arg)`: arg is "<preset>", "<trial>" or "<preset>,<trial>" (default "paper,1"):
  paper  ResNet-50 (width 64) at 288 x 144, P x K = 8 x 4 (each tuple one visible and one thermal
         image of an identity), SGD 0.1, warm-up 10 epochs, x 0.1 at epochs 20 and 50, 80 epochs
         of 64 steps; the other sizes of `synthetic.py:paper`.
  tiny   `synthetic.py:tiny`'s network and 6 steps, for the tests' tiny trees.

What to expect: WORKDIR/eval/regdb.json holds regdb/visible->thermal and regdb/thermal->visible.
Published figures, NOT reproduced here: the paper reports 94.3 Rank-1 / 88.5 mAP; AGW, the
strongest public two-stream baseline, 70.05 Rank-1 / 66.37 mAP / 50.19 mINP (visible->thermal),
both averaged over the ten trials and both from ImageNet weights: add
`--config.model.pretrained=PATH` (torchvision's ImageNet ResNet-50, see `config.model.pretrained`
in configs/synthetic.py); from random weights far lower numbers are to be expected.
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

NUM_TRIALS = 10
# 2,060 training images per modality (206 identities x 10) / (8 x 4 tuples) per epoch.
STEPS_PER_EPOCH = 64


def parse_arg(arg: str) -> tuple[str, int]:
  """(preset, trial) of "<preset>", "<trial>" or "<preset>,<trial>"."""
  preset, trial = "paper", "1"
  for part in (p.strip() for p in arg.split(",")):
    if part.isdigit():
      trial = part
    elif part:
      preset = part
  if not 1 <= int(trial) <= NUM_TRIALS:
    raise ValueError(f"configs/regdb.py:{arg}: trial {trial} is not in 1..{NUM_TRIALS}; expected "
                     "'<preset>', '<trial>' or '<preset>,<trial>', e.g. 'paper,3'.")
  return preset, int(trial)


def get_config(arg: str = "paper,1") -> ml_collections.ConfigDict:
  """Returns the config of a preset ("paper" or "tiny") and trial (1..10)."""
  preset, trial = parse_arg(arg)
  return config_lib.benchmark_config(os.path.dirname(os.path.abspath(__file__)), preset,
                                     f"regdb/{trial}", height=288, width=144,
                                     steps_per_epoch=STEPS_PER_EPOCH)
