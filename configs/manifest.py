r"""The paper's model on your own images, listed in a manifest file (`manifest`).

The manifest is a CSV (with a header line) or JSON-lines file with one row per image: `path`
(relative to the manifest's folder), `pid`, `camid`, `modality` (any names), and optionally
`tuple_id` (rows of one pixel-aligned capture) and `split` (train, test, or query and gallery;
train when absent). `mmreid_jax/data/datasets/manifest.py` gives the details, README ("Your own
data") an example. Check how the data is read first, then train and evaluate:

  python -m mmreid_jax.data.inspect --config configs/manifest.py:/data/mine/manifest.csv
  python -m mmreid_jax.main --config configs/manifest.py:/data/mine/manifest.csv --workdir runs/mine

`get_config(arg)`: arg is "<path>" or "<preset>,<path>" with a preset of the benchmark configs:
  paper  (default) ResNet-50 at 288 x 144, P x K = 8 x 4, SGD 0.1 with DESIGN.md's schedule
         over 80 epochs, an epoch being the training images of the largest modality once.
  demo   `configs/synthetic.py:demo`'s network, 96 x 48 images, AdamW, 1,500 steps (a CPU run).
  tiny   the tests' width-8 network at 32 x 16 and 6 steps.

What to expect: WORKDIR/eval/manifest.json with "A->B" for every ordered pair of modalities and
"all", under Market-1501's rule (a gallery image of the query's identity and camera is ignored).
"""

from __future__ import annotations

import collections
import os

import ml_collections

from mmreid_jax import config_lib
from mmreid_jax.data.datasets.manifest import read_manifest

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_arg(arg: str) -> tuple[str, str]:
  """(preset, manifest path) of "<path>" or "<preset>,<path>"."""
  preset, sep, rest = arg.partition(",")
  if sep and preset.strip() in config_lib.BENCHMARK_PRESETS:
    return preset.strip(), rest.strip()
  return "paper", arg.strip()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the config of a manifest: arg "<path>" or "<preset>,<path>"."""
  preset, path = parse_arg(arg)
  if not path:
    raise ValueError("configs/manifest.py needs the manifest's path: --config "
                     "configs/manifest.py:/path/to/manifest.csv (or :tiny,/path/to/manifest.csv).")
  path = os.path.abspath(os.path.expanduser(path))
  table = read_manifest(path)
  per_modality = collections.Counter(r.modality for r in table.records.get("train", []))
  images = max(per_modality.values(), default=0)
  config = config_lib.benchmark_config(CONFIG_DIR, preset, "manifest", height=288, width=144,
                                       steps_per_epoch=max(images // (8 * 4), 1))
  config.data.manifest = path
  return config
