r"""The baseline network that scripts/benchmark.py times, on the generated set (`synthetic_mm`):
a multi-stream ResNet (a modality-specific stem per modality, shared stages 1-4, last stride 1),
GeM pooling (p = 3), BNNeck and a linear classifier, trained with identity cross-entropy and the
cross-modal batch-hard triplet loss (AGW's network without its non-local blocks, `model.name`
"agw"). scripts/torch_baseline.py is the same network and loss in PyTorch (`--compare-torch`).

  python scripts/benchmark.py --config configs/benchmark.py --output runs/benchmark.json
  python scripts/benchmark.py --config configs/benchmark.py:r50 --compare-torch \
      --output runs/benchmark_r50.json

Presets through `get_config(arg)`:
  small  (default) ResNet-18 of width 16 at 96 x 48 (the demo's network), 8 x 4 tuples of the
         three modalities (96 images a step); minutes on a 2-core CPU.
  r50    ResNet-50 at 288 x 144 (the paper's backbone and input), 4 x 4 tuples of the three
         modalities (48 images a step).
  tiny   the tests' width-8 network at 32 x 16.

What to expect: docs/performance.md holds the figures measured on the development machine.
"""

from __future__ import annotations

import os

import ml_collections

from mmreid_jax import config_lib

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))
PRESETS = ("small", "r50", "tiny")
HOST_MALLOC = ("glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:"
               "glibc.malloc.trim_threshold=1000000000000:glibc.malloc.hugetlb=1")


def get_config(preset: str = "small") -> ml_collections.ConfigDict:
  """Returns the config of `preset` ("small", "r50" or "tiny")."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} of configs/benchmark.py; expected one of "
                     f"{PRESETS}.")
  synthetic = config_lib.load_config_module(os.path.join(CONFIG_DIR, "synthetic.py"))
  config = synthetic.get_config({"small": "demo", "r50": "paper", "tiny": "tiny"}[preset])
  config_lib.two_stream_baseline(config)
  # The CPU's faster forms of the convolutions (--config.model.kernels=xla: XLA's own, as on a
  # GPU).
  config.model.kernels = "cpu"
  # XLA's CPU scheduler that runs independent operations side by side slowed ResNet-50's step on
  # 2 cores by 10-13% (docs/performance.md).
  config.xla_flags = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
  # glibc's malloc keeps freed memory (no mmap of large blocks, one arena, no trimming) on
  # transparent huge pages: XLA's CPU client maps a fresh 4.3 GB temporary buffer for each
  # ResNet-50 step otherwise, and faulting it in cost 1.8 s of kernel time a step. PyTorch's
  # baseline runs under the same setting (docs/performance.md).
  config.glibc_tunables = HOST_MALLOC
  config.loss.triplet = 1.0
  config.optim.name = "sgd"
  config.optim.base_learning_rate = 0.01
  config.optim.scale_by_batch = False
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 5e-4
  config.optim.warmup_steps = 0
  config.optim.schedule = "cosine"
  config.eval.pictures = False
  if preset == "small":
    config.data.num_identities, config.data.tuples_per_identity = 8, 4
  elif preset == "r50":
    config.data.num_identities, config.data.tuples_per_identity = 4, 4
  return config
