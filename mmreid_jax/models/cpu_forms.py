"""The CPU's forms of the ResNet's convolutions: `config.model.kernels = "cpu"`.

XLA's CPU backend runs some convolution gradients far below its matmul speed
(docs/performance.md). Each form here computes the same function with the same "kernel"
parameter as `nn.Conv(..., use_bias=False)`, so checkpoints and converted weights serve either
form, and differs only in how XLA is asked to compute it:

- `DotConv`: a convolution as a matmul of image patches (the blocks' 1 x 1 convolutions), whose
  weight gradient is one dot over the rows (`rows_matmul`).
- `PhaseGradConv`: the stride-2 3 x 3 convolution whose input gradient is four stride-1
  convolutions (`conv3x3_stride2`).
- `ShiftGradConv`: the stride-1 3 x 3 convolution whose kernel gradient is one matmul of shifted
  copies (`conv3x3_shifted`).

`KERNELS` names the choices; `resolve_kernels` turns "auto" into "cpu" on a CPU backend and
"xla" elsewhere; `block_convolutions` gives `resnet._Block` its 1 x 1 and 3 x 3 convolutions.
On a GPU or TPU, XLA's own convolutions (cuDNN, the TPU's) are the ones to use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
KERNELS = ("xla", "cpu", "auto")  # `config.model.kernels`

_ROWS = (((0,), (0,)), ((), ()))  # dot_general contracting the rows of both operands


@jax.custom_vjp
def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """(N, C_in) @ (C_in, C_out) whose weight gradient is one dot contracting the N rows.

  Differentiating the einsum makes XLA (CPU) copy the output gradient transposed, fused with the
  BatchNorm backward that produces it; that copy walked memory column-wise and cost ten times the
  matmul. Written as dot_general(x, g) contracting axis 0 of both, the CPU dot reads both operands
  in place.
  """
  return x @ w


def _rows_matmul_fwd(x, w):
  return x @ w, (x, w)


def _rows_matmul_bwd(residuals, g):
  x, w = residuals
  return g @ w.T, jax.lax.dot_general(x, g, _ROWS).astype(w.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


_NHWC = ("NHWC", "HWIO", "NHWC")
# Kernel rows (columns) that reach the even and the odd input rows (columns) of a 3 x 3, stride 2,
# padding 1 convolution, each row with the next output row one step further down.
_PHASE_TAPS = ((1,), (2, 0))


def _conv3x3(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """XLA's 3 x 3, padding-1 convolution of NHWC x with an HWIO kernel."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                      dimension_numbers=_NHWC)


_conv3x3_stride2 = functools.partial(_conv3x3, stride=2)


@jax.custom_vjp
def conv3x3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 3 x 3 convolution, stride 2, padding 1: (B, H, W, C_in) * (3, 3, C_in, C_out) ->
  (B, ceil(H / 2), ceil(W / 2), C_out), whose input gradient (for even H and W) is four stride-1
  convolutions of the output gradient, one per parity of the input's rows and columns, with the
  kernel taps that reach that parity, interleaved. XLA's own input gradient is a convolution of
  the zero-dilated output gradient, which the CPU backend runs in Eigen at a tenth of YNNPACK's
  speed; the phases are ordinary stride-1 convolutions with the same arithmetic.
  """
  return _conv3x3_stride2(x, kernel)


def _conv3x3_stride2_fwd(x, kernel):
  return _conv3x3_stride2(x, kernel), (x, kernel)


def _conv3x3_stride2_bwd(residuals, g):
  x, kernel = residuals
  # XLA's gradients; its input gradient is kept for odd sizes only (else unused and dropped).
  xla_grad_x, grad_kernel = jax.vjp(_conv3x3_stride2, x, kernel)[1](g)
  if x.shape[1] % 2 or x.shape[2] % 2:
    return xla_grad_x, grad_kernel
  transposed = jnp.swapaxes(kernel, 2, 3)  # (3, 3, C_out, C_in)
  phases = [[jax.lax.conv_general_dilated(
      g, transposed[jnp.array(rows)][:, jnp.array(cols)], (1, 1),
      ((0, len(rows) - 1), (0, len(cols) - 1)), dimension_numbers=_NHWC)
      for cols in _PHASE_TAPS] for rows in _PHASE_TAPS]
  grad_x = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (B, h, 2, w, 2, C)
  return grad_x.reshape(x.shape), grad_kernel


conv3x3_stride2.defvjp(_conv3x3_stride2_fwd, _conv3x3_stride2_bwd)


class _Conv3x3(nn.Module):
  """A 3 x 3, padding-1 convolution with `nn.Conv(..., use_bias=False)`'s "kernel" parameter
  (3, 3, C_in, C_out), computed by the subclass's `convolve(x, kernel)`.

  Attributes:
    features: C_out.
    dtype: compute dtype; the kernel is float32.
    kernel_init: the kernel's initializer.
  """

  features: int
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  convolve: ClassVar[Callable[[jax.Array, jax.Array], jax.Array]]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        jnp.float32)
    return type(self).convolve(x.astype(self.dtype), kernel.astype(self.dtype))


class PhaseGradConv(_Conv3x3):
  """`nn.Conv(features, (3, 3), 2, padding=((1, 1), (1, 1)), use_bias=False)` (the same
  "kernel" parameter) computed by `conv3x3_stride2`: (B, H, W, C_in) -> (B, H / 2, W / 2, C_out).
  """

  convolve = staticmethod(conv3x3_stride2)


def shifted_weight_grad(x: jax.Array, g: jax.Array) -> jax.Array:
  """The kernel gradient of a 3 x 3, stride-1, padding-1 convolution of x (B, H, W, C_in) with
  output gradient g (B, H, W, C_out): (3, 3, C_in, C_out), as one matmul. The padded input's
  three column shifts, side by side on the channels, meet the output gradient's three row
  shifts (zero rows above and below), contracting all B * (H + 2) * W positions: block
  (kw, kh) of the (3 C_in, 3 C_out) product is kernel tap (kh, kw). XLA's own is a convolution
  with an H x W window, which the CPU backend runs at a third to a half of matmul speed.
  """
  _, _, width, channels = x.shape
  out_channels = g.shape[-1]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  columns = jnp.concatenate([padded[:, :, j:j + width] for j in range(3)], axis=-1)
  rows = jnp.concatenate([jnp.pad(g, ((0, 0), (i, 2 - i), (0, 0), (0, 0))) for i in range(3)],
                         axis=-1)
  product = jax.lax.dot_general(columns.reshape(-1, 3 * channels),
                                rows.reshape(-1, 3 * out_channels), _ROWS)
  return product.reshape(3, channels, 3, out_channels).transpose(2, 0, 1, 3)


@jax.custom_vjp
def conv3x3_shifted(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 3 x 3 convolution, stride 1, padding 1: (B, H, W, C_in) * (3, 3, C_in, C_out) ->
  (B, H, W, C_out), with XLA's input gradient and `shifted_weight_grad` as the kernel's."""
  return _conv3x3(x, kernel)


def _conv3x3_shifted_fwd(x, kernel):
  return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_shifted_bwd(residuals, g):
  x, kernel = residuals
  grad_x = jax.vjp(lambda inputs: _conv3x3(inputs, kernel), x)[1](g)[0]
  return grad_x, shifted_weight_grad(x, g).astype(kernel.dtype)


conv3x3_shifted.defvjp(_conv3x3_shifted_fwd, _conv3x3_shifted_bwd)


class ShiftGradConv(_Conv3x3):
  """`nn.Conv(features, (3, 3), 1, padding=((1, 1), (1, 1)), use_bias=False)` (the same
  "kernel" parameter) computed by `conv3x3_shifted`: (B, H, W, C_in) -> (B, H, W, C_out).
  """

  convolve = staticmethod(conv3x3_shifted)


class DotConv(nn.Module):
  """A convolution written as a matmul of image patches with the kernel: (B, H, W, C_in) ->
  (B, H', W', C_out), with `nn.Conv(features, kernel_size, strides, padding, use_bias=False)`'s
  parameter ("kernel" of shape (kh, kw, C_in, C_out)), so checkpoints and converted weights serve
  either form. The patches are the kh * kw shifted (strided) views of the padded input
  concatenated along the channels (a 1 x 1 convolution needs none). On a CPU, XLA runs the
  matmul and its gradients at matmul speed and without the layout transposes it puts around a
  convolution's weight gradient (docs/performance.md); on a GPU cuDNN's convolutions win.

  Attributes:
    features: C_out.
    kernel_size: (kh, kw).
    strides: (sh, sw) or one int.
    padding: ((top, bottom), (left, right)).
    dtype: compute dtype; the kernel is float32.
    kernel_init: the kernel's initializer.
  """

  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: int | tuple[int, int] = 1
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (kh, kw, channels, self.features),
                        jnp.float32)
    sh, sw = (self.strides, self.strides) if isinstance(self.strides, int) else self.strides
    x = x.astype(self.dtype)
    if any(p for pair in self.padding for p in pair):
      x = jnp.pad(x, ((0, 0), *self.padding, (0, 0)))
    height = (x.shape[1] - kh) // sh + 1
    width = (x.shape[2] - kw) // sw + 1
    views = [x[:, i:i + sh * (height - 1) + 1:sh, j:j + sw * (width - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
    patches = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    out = rows_matmul(patches.reshape(-1, patches.shape[-1]),
                      kernel.reshape(kh * kw * channels, self.features).astype(self.dtype))
    return out.reshape(patches.shape[:-1] + (self.features,))


ConvFactory = Callable[..., nn.Module]


def resolve_kernels(kernels: str) -> str:
  """"xla" or "cpu" for `config.model.kernels`: "auto" is "cpu" on a CPU backend, else "xla".

  Raises:
    ValueError: not one of `KERNELS`.
  """
  if kernels not in KERNELS:
    raise ValueError(f"config.model.kernels={kernels!r}; expected one of {KERNELS}.")
  if kernels == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  return kernels


def block_convolutions(dtype: Dtype, kernel_init: nn.initializers.Initializer
                       ) -> tuple[ConvFactory, ConvFactory]:
  """The CPU forms of a residual block's convolutions, as `resnet._Block` builds them:
  `pointwise(features, strides=1, name=None)` (1 x 1, `DotConv`) and
  `conv3x3(features, strides, name)` (padding 1: `PhaseGradConv` at stride 2, `ShiftGradConv`
  at stride 1)."""

  def pointwise(features: int, strides: int = 1, name: str | None = None) -> nn.Module:
    return DotConv(features, (1, 1), strides, dtype=dtype, kernel_init=kernel_init, name=name)

  def conv3x3(features: int, strides: int, name: str) -> nn.Module:
    form = {1: ShiftGradConv, 2: PhaseGradConv}[strides]
    return form(features, dtype=dtype, kernel_init=kernel_init, name=name)

  return pointwise, conv3x3
