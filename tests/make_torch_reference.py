r"""Writes tests/data/torch_resnet_reference.npz: PyTorch's feature maps for seeded weights.

  pip install -e '.[torch]'   # torch and torchvision
  python tests/make_torch_reference.py [--output PATH]

For each depth of `torch_reference.DEPTHS`, builds torchvision's `resnet{depth}` with the seeded
NumPy weights of `torch_reference.random_state_dict` (`load_state_dict(strict=True)`, so their
names and shapes must be torchvision's), runs it in eval mode up to `layer4` on
`torch_reference.random_input()`, and stores the (2, 3, 2, C) float32 NHWC output as
`features_{depth}`, with the weights' `fingerprint_{depth}` and the input's fingerprint (so the
tests can tell a changed NumPy generator from a conversion error) and the torch and torchvision
versions used. About 250 KB.

`tests/test_convert.py` compares the Flax network with the committed file; where torch and
torchvision are installed it also runs this script (`--output` elsewhere) and compares with the
fresh outputs. It runs in a process of its own: importing torchvision after TensorFlow (as a
test session does) crashes in triton's import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch_reference  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description="Write PyTorch's ResNet feature maps for the "
                                               "seeded weights of tests/torch_reference.py.")
  parser.add_argument("--output", default=str(torch_reference.REFERENCE_PATH),
                      help="the .npz to write (default: the committed reference)")
  args = parser.parse_args()
  import torch
  import torchvision

  images = torch_reference.random_input()
  arrays = {"input_fingerprint": np.array([images.astype(np.float64).sum(),
                                           np.square(images.astype(np.float64)).sum()]),
            "versions": np.array(f"torch {torch.__version__}, torchvision "
                                 f"{torchvision.__version__}")}
  for depth in torch_reference.DEPTHS:
    tensors = torch_reference.random_state_dict(depth)
    features = torch_reference.torch_feature_map(tensors, depth, images)
    arrays[f"features_{depth}"] = features.astype(np.float32)
    arrays[f"fingerprint_{depth}"] = torch_reference.fingerprint(tensors)
    print(f"resnet{depth}: features {features.shape}, |f| = {np.linalg.norm(features):.4g}, "
          f"std {features.std():.4g}")
  path = Path(args.output)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)
  print(f"Wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
  main()
