"""ResNet-18/34/50/101 (torchvision layout, NHWC), splittable into modality-specific and shared parts.

Stage 0 is the stem (7x7 conv, BN, ReLU, 3x3 max-pool); stages 1-4 are the residual stages
(`layer1` .. `layer4` in torchvision). `ResNet(first_stage=a, last_stage=b)` holds stages a..b
only, with the same submodule names as the whole network, so a two-stream ReID backbone is a
per-modality `ResNet(0, k)` followed by a shared `ResNet(k + 1, 4)`, and torchvision weights map
onto either by name. `last_stride=1` keeps stage 4 at the resolution of stage 3 (the ReID
convention); torchvision's classifier network has `last_stride=2`.

`non_local=(n1, n2, n3, n4)` inserts n_s non-local blocks (`layers.NonLocal`) in stage s, after
its last n_s residual blocks (AGW: (0, 2, 3, 0)), named `non_local{s}_{b}` after block
`layer{s}_{b}`; they are not part of torchvision's network and keep their initialisation when
pretrained weights are loaded.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmreid_jax.models import cpu_forms
from mmreid_jax.models.layers import MaskedBatchNorm, NonLocal

STAGE_SIZES: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
BOTTLENECK_DEPTHS = (50, 101)


def stage_channels(depth: int, width: int, stage: int) -> int:
  """Output channels of `stage` (0 = stem) of a ResNet of `depth` and base `width`."""
  if stage == 0:
    return width
  expansion = 4 if depth in BOTTLENECK_DEPTHS else 1
  return width * 2 ** (stage - 1) * expansion


def output_stride(last_stride: int, last_stage: int = 4) -> int:
  """Total down-sampling factor from the input to the end of `last_stage`."""
  stride = 4
  for stage in range(2, last_stage + 1):
    stride *= last_stride if stage == 4 else 2
  return stride


class _Block(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1-3x3-1x1) residual block."""

  filters: int
  strides: int
  bottleneck: bool
  downsample: bool
  dtype: Any
  kernels: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=kernel_init)

    def pointwise(features: int, strides: int = 1, name: str | None = None) -> nn.Module:
      return conv(features, (1, 1), strides, name=name)

    def conv3x3(features: int, strides: int, name: str) -> nn.Module:
      return conv(features, (3, 3), strides, padding=((1, 1), (1, 1)), name=name)

    if self.kernels == "cpu":
      pointwise, conv3x3 = cpu_forms.block_convolutions(self.dtype, kernel_init)

    norm = functools.partial(MaskedBatchNorm, dtype=self.dtype)
    residual = x
    if self.bottleneck:
      y = pointwise(self.filters, name="conv1")(x)
      y = nn.relu(norm(name="bn1")(y, not train, mask))
      y = conv3x3(self.filters, self.strides, name="conv2")(y)
      y = nn.relu(norm(name="bn2")(y, not train, mask))
      y = pointwise(self.filters * 4, name="conv3")(y)
      y = norm(name="bn3")(y, not train, mask)
    else:
      y = conv3x3(self.filters, self.strides, name="conv1")(x)
      y = nn.relu(norm(name="bn1")(y, not train, mask))
      y = conv3x3(self.filters, 1, name="conv2")(y)
      y = norm(name="bn2")(y, not train, mask)
    if self.downsample:
      out_channels = self.filters * (4 if self.bottleneck else 1)
      residual = pointwise(out_channels, self.strides, name="downsample_conv")(x)
      residual = norm(name="downsample_bn")(residual, not train, mask)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """Stages `first_stage`..`last_stage` of a ResNet.

  Attributes:
    depth: 18, 34, 50 or 101.
    width: channels of the stem (64 in the standard network).
    last_stride: stride of stage 4 (1 for ReID, 2 for torchvision's classifier).
    first_stage, last_stage: the stages held, 0 (stem) to 4.
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    non_local: non-local blocks per stage 1..4, after the last blocks of each held stage.
    kernels: how the blocks' convolutions run: "xla" (`nn.Conv`), "cpu" (the forms of
      `cpu_forms`, faster on a CPU backend) or "auto" (`cpu_forms.resolve_kernels`); the same
      parameters either way.
  """

  depth: int = 50
  width: int = 64
  last_stride: int = 1
  first_stage: int = 0
  last_stage: int = 4
  dtype: Any = jnp.float32
  non_local: tuple[int, ...] = (0, 0, 0, 0)
  kernels: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    """Maps (B, H, W, C_in) to (B, h, w, C_out); `mask` (B,) marks samples for BN statistics."""
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"ResNet depth={self.depth} is not supported; expected one of "
                       f"{sorted(STAGE_SIZES)}.")
    if not 0 <= self.first_stage <= self.last_stage <= 4:
      raise ValueError(f"ResNet stages {self.first_stage}..{self.last_stage}: expected "
                       "0 <= first_stage <= last_stage <= 4.")
    if len(self.non_local) != 4 or any(
        not 0 <= n <= blocks for n, blocks in zip(self.non_local, STAGE_SIZES[self.depth])):
      raise ValueError(f"ResNet-{self.depth} non_local={tuple(self.non_local)}: expected four "
                       "counts (stages 1..4), each at most the stage's blocks "
                       f"{STAGE_SIZES[self.depth]}.")
    kernels = cpu_forms.resolve_kernels(self.kernels)
    x = x.astype(self.dtype)
    if self.first_stage == 0:
      x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                  dtype=self.dtype, name="conv1",
                  kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x)
      x = nn.relu(MaskedBatchNorm(dtype=self.dtype, name="bn1")(x, not train, mask))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    bottleneck = self.depth in BOTTLENECK_DEPTHS
    for stage in range(max(self.first_stage, 1), self.last_stage + 1):
      filters = self.width * 2 ** (stage - 1)
      num_blocks = STAGE_SIZES[self.depth][stage - 1]
      for block in range(num_blocks):
        strides = 1
        if block == 0 and stage > 1:
          strides = self.last_stride if stage == 4 else 2
        in_channels = stage_channels(self.depth, self.width, stage - 1) if block == 0 else None
        downsample = block == 0 and (strides != 1 or in_channels != filters * (
            4 if bottleneck else 1))
        x = _Block(filters, strides, bottleneck, downsample, self.dtype, kernels,
                   name=f"layer{stage}_{block}")(x, train, mask)
        if block >= num_blocks - self.non_local[stage - 1]:
          x = NonLocal(dtype=self.dtype, name=f"non_local{stage}_{block}")(x, not train, mask)
    return x
