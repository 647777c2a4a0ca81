r"""The benchmark's baseline network in PyTorch (eager), for `scripts/benchmark.py --compare-torch`:
the network and loss of configs/benchmark.py (`model.name` "agw" without non-local blocks) built
from the same config keys, timed on a batch of the same shape.

A modality-specific stem per modality (7 x 7 convolution, BatchNorm, ReLU, max-pool), the shared
torchvision-layout ResNet stages 1-4 (last stride 1), GeM pooling, BNNeck (BatchNorm1d without
a learned shift) and a bias-free linear classifier; identity cross-entropy on the BNNeck
embeddings plus a batch-hard triplet loss (margin `loss.triplet_margin`) on the pooled
features; SGD with momentum. Images enter as uint8 NHWC, as the JAX step receives them, and are
normalised and transposed to NCHW (channels_last memory format) inside the timed step.

  python scripts/torch_baseline.py --config configs/benchmark.py:r50 --steps 3 --threads 2

prints one JSON line: {"torch_step_s", "step_times_s", "threads", "torch_version", ...}.
Not part of the package or of `make test`: torch is the optional extra `.[torch]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = (nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes))
                       if stride != 1 or inplanes != planes else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    out = planes * 4
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                     nn.BatchNorm2d(out))
                       if stride != 1 or inplanes != out else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class MultiStreamBaseline(nn.Module):
  """Images (B, S, 3, H, W) of S slots -> pooled features and logits of B * S images."""

  def __init__(self, depth: int, width: int, last_stride: int, num_modalities: int,
               num_classes: int, gem_p: float):
    super().__init__()
    block = Bottleneck if depth >= 50 else BasicBlock
    self.stems = nn.ModuleList(
        nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        for _ in range(num_modalities))
    layers, inplanes = [], width
    for stage, blocks in enumerate(BLOCKS[depth]):
      planes = width * 2 ** stage
      stride = 1 if stage == 0 else (last_stride if stage == 3 else 2)
      stage_blocks = []
      for b in range(blocks):
        stage_blocks.append(block(inplanes, planes, stride if b == 0 else 1))
        inplanes = planes * block.expansion
      layers.append(nn.Sequential(*stage_blocks))
    self.shared = nn.Sequential(*layers)
    self.gem_p = gem_p
    self.bnneck = nn.BatchNorm1d(inplanes)
    self.bnneck.bias.requires_grad_(False)
    self.classifier = nn.Linear(inplanes, num_classes, bias=False)

  def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, slots = images.shape[:2]
    stems = torch.stack([self.stems[s](images[:, s]) for s in range(slots)], dim=1)
    maps = self.shared(stems.flatten(0, 1))
    pooled = maps.clamp(min=1e-6).pow(self.gem_p).mean(dim=(2, 3)).pow(1.0 / self.gem_p)
    return pooled, self.classifier(self.bnneck(pooled))


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor,
                       margin: float) -> torch.Tensor:
  """Mean over anchors of relu(hardest positive - hardest negative + margin), Euclidean."""
  distances = torch.cdist(features, features).clamp(min=1e-12)
  same = labels[:, None] == labels[None, :]
  hardest_positive = distances.masked_fill(~same, 0).amax(dim=1)
  hardest_negative = distances.masked_fill(same, float("inf")).amin(dim=1)
  return F.relu(hardest_positive - hardest_negative + margin).mean()


def load_config(config_arg: str):
  sys.path.insert(0, str(ROOT))
  from mmreid_jax import config_lib  # pylint: disable=import-outside-toplevel

  path, _, preset = config_arg.partition(":")
  return config_lib.load_config_file(path, preset or None)


def time_steps(config, num_modalities: int, num_classes: int, steps: int, warmup: int,
               seed: int = 0) -> dict:
  """Builds the network and times `steps` SGD steps (after `warmup`) on a seeded batch of the
  config's P x K tuples of `num_modalities` slots."""
  torch.manual_seed(seed)
  model_cfg = config.model
  model = MultiStreamBaseline(model_cfg.depth, model_cfg.width, model_cfg.last_stride,
                              num_modalities, num_classes, float(model_cfg.gem_p))
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                              lr=config.optim.base_learning_rate, momentum=config.optim.momentum,
                              weight_decay=config.optim.weight_decay)
  tuples = config.data.num_identities * config.data.tuples_per_identity
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.integers(0, 256, (tuples, num_modalities, config.data.height,
                                                  config.data.width, 3), np.uint8))
  labels = torch.from_numpy(np.repeat(rng.permutation(num_classes)[:config.data.num_identities],
                                      config.data.tuples_per_identity).astype(np.int64))
  mean = torch.from_numpy(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
  std = torch.from_numpy(IMAGENET_STD).view(1, 1, 3, 1, 1)
  flat_labels = labels.repeat_interleave(num_modalities)

  def step() -> float:
    start = time.perf_counter()
    x = (images.permute(0, 1, 4, 2, 3).float() - mean) / std  # NHWC in memory: channels_last
    features, logits = model(x)
    loss = (config.loss.cross_entropy * F.cross_entropy(logits, flat_labels)
            + config.loss.triplet * batch_hard_triplet(features, flat_labels,
                                                       config.loss.triplet_margin))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start

  for _ in range(warmup):
    step()
  times = [step() for _ in range(steps)]
  return {"torch_step_s": statistics.median(times), "step_times_s": times,
          "images_per_step": tuples * num_modalities, "threads": torch.get_num_threads(),
          "torch_version": torch.__version__}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--num-modalities", type=int, default=3)
  parser.add_argument("--num-classes", type=int, required=True)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  result = time_steps(load_config(args.config), args.num_modalities, args.num_classes,
                      args.steps, args.warmup)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
