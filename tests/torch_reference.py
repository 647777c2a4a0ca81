"""Seeded torchvision-layout ResNet weights and PyTorch's feature maps for them.

Shared by `tests/make_torch_reference.py` (which runs PyTorch and writes
`tests/data/torch_resnet_reference.npz`) and `tests/test_convert.py` (which regenerates the same
weights with NumPy and compares the Flax network with the committed PyTorch outputs, and with
PyTorch itself where torch is installed). Only the outputs are committed: the weights are a
function of the seed.

The state dicts are written out here from torchvision's architecture (not from the converter's
tables), names and order as `torchvision.models.resnetN().state_dict()`, including the `fc`
classifier and the `num_batches_tracked` counters a real checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEPTHS = (18, 34, 50, 101)
SEED = 20261122
INPUT_SHAPE = (2, 96, 64, 3)  # NHWC; the last-stride-2 feature map is (2, 3, 2, C)
REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "torch_resnet_reference.npz"
_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def torchvision_shapes(depth: int, width: int = 64) -> dict[str, tuple[int, ...]]:
  """{name: shape} of torchvision's `resnet{depth}` state dict, in its order."""
  bottleneck = depth >= 50
  expansion = 4 if bottleneck else 1
  shapes: dict[str, tuple[int, ...]] = {}

  def conv(name: str, out: int, inp: int, k: int) -> None:
    shapes[f"{name}.weight"] = (out, inp, k, k)

  def bn(name: str, channels: int) -> None:
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{leaf}"] = (channels,)
    shapes[f"{name}.num_batches_tracked"] = ()

  conv("conv1", width, 3, 7)
  bn("bn1", width)
  channels = width
  for stage, blocks in enumerate(_BLOCKS[depth], start=1):
    planes = width * 2 ** (stage - 1)
    for block in range(blocks):
      prefix = f"layer{stage}.{block}"
      if bottleneck:
        convs = [(planes, channels, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      else:
        convs = [(planes, channels, 3), (planes, planes, 3)]
      for i, (out, inp, k) in enumerate(convs, start=1):
        conv(f"{prefix}.conv{i}", out, inp, k)
        bn(f"{prefix}.bn{i}", out)
      if block == 0 and (stage > 1 or channels != planes * expansion):
        conv(f"{prefix}.downsample.0", planes * expansion, channels, 1)
        bn(f"{prefix}.downsample.1", planes * expansion)
      channels = planes * expansion
  shapes["fc.weight"] = (1000, channels)
  shapes["fc.bias"] = (1000,)
  return shapes


def random_state_dict(depth: int, seed: int = SEED, width: int = 64) -> dict[str, np.ndarray]:
  """A torchvision-layout state dict of seeded random values (float32; int64 counters).

  Convolutions are He-normal; BatchNorm scales, shifts and running statistics are all away from
  their initial values (1, 0, 0, 1), so evaluation-mode normalisation is exercised for real. The
  last BatchNorm of each residual branch has a small scale, so that 33 blocks of ResNet-101 keep
  the activations in a moderate range.
  """
  rng = np.random.default_rng([seed, depth, width])
  last_bn = "bn3" if depth >= 50 else "bn2"
  tensors = {}
  for name, shape in torchvision_shapes(depth, width).items():
    module, leaf = name.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      value = np.asarray(rng.integers(1, 10_000), np.int64)
    elif module == "fc":
      value = 0.01 * rng.standard_normal(shape)
    elif len(shape) == 4:
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif leaf == "weight":
      low, high = (0.1, 0.4) if module.endswith(last_bn) else (0.6, 1.4)
      value = rng.uniform(low, high, shape)
    elif leaf == "bias":
      value = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_mean":
      value = 0.2 * rng.standard_normal(shape)
    else:  # running_var
      value = rng.uniform(0.5, 2.0, shape)
    tensors[name] = value if value.dtype == np.int64 else value.astype(np.float32)
  return tensors


def random_input(seed: int = SEED) -> np.ndarray:
  """(2, 96, 64, 3) float32 NHWC images, ImageNet-normalised scale."""
  return np.random.default_rng([seed, 0]).standard_normal(INPUT_SHAPE).astype(np.float32)


def fingerprint(tensors: dict[str, np.ndarray]) -> np.ndarray:
  """(sum, sum of squares) over every float tensor, float64: detects a changed generator."""
  values = [v.astype(np.float64).ravel() for v in tensors.values() if v.dtype == np.float32]
  flat = np.concatenate(values)
  return np.array([flat.sum(), np.square(flat).sum()])


def torch_feature_map(tensors: dict[str, np.ndarray], depth: int, images: np.ndarray
                      ) -> np.ndarray:
  """torchvision `resnet{depth}` in eval mode up to `layer4`, NHWC in and out.

  Needs torch and torchvision, in a process that has not imported TensorFlow (torchvision's
  import of triton crashes after it).
  """
  import torch
  import torchvision

  model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()},
                        strict=True)
  model.eval()
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
  return x.numpy().transpose(0, 2, 3, 1)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  """||actual - expected||_2 / ||expected||_2 in float64."""
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected)
               / np.linalg.norm(expected))
