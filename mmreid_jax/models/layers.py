"""Layers shared by the backbone and the heads."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _batch_statistics(x: jax.Array, weight: jax.Array):
  """Weighted mean and biased variance over all axes but the last, and the weighted count."""
  axes = tuple(range(x.ndim - 1))
  count = jnp.sum(weight) * (x.size // (x.shape[0] * x.shape[-1]))
  safe_count = jnp.maximum(count, 1.0)
  mean = jnp.sum(x * weight, axis=axes) / safe_count
  var = jnp.sum(weight * jnp.square(x - mean), axis=axes) / safe_count
  return mean, var, count, safe_count


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train(x: jax.Array, weight: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of x (B, ..., C) float32 with per-sample weights (B, 1, ..., 1) in
  the statistics. Returns (y, mean (C,), biased var (C,), count); mean, var and count carry no
  gradient (they only feed the running statistics).

  The backward is BatchNorm's closed form: with xhat = (x - mean) * r, r = rsqrt(var + eps),
  n = count and dxhat = g * scale, dx = r * (dxhat - weight * (sum(dxhat) + xhat *
  sum(dxhat * xhat)) / n), the sums over every position. Two reductions and one elementwise pass
  instead of the several passes XLA makes of the differentiated statistics.
  """
  return _batch_norm_train_fwd(x, weight, scale, bias, epsilon)[0]


def _batch_norm_train_fwd(x, weight, scale, bias, epsilon):
  mean, var, count, safe_count = _batch_statistics(x, weight)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * rstd * scale + bias
  return (y, mean, var, count), (x, weight, mean, rstd, scale, safe_count)


def _batch_norm_train_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, weight, mean, rstd, scale, safe_count = residuals
  g = cotangents[0]
  axes = tuple(range(x.ndim - 1))
  xhat = (x - mean) * rstd
  grad_bias = jnp.sum(g, axis=axes)
  grad_scale = jnp.sum(g * xhat, axis=axes)
  grad_x = (rstd * scale) * (
      g - weight * (grad_bias + xhat * grad_scale) / safe_count)
  return grad_x, jnp.zeros_like(weight), grad_scale, grad_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class MaskedBatchNorm(nn.Module):
  """BatchNorm whose batch statistics count only the samples marked present.

  Training batches carry modality slots that are absent for some samples (zero images): they must
  not shift the statistics, or training and test would normalise differently. With every sample
  present this is ordinary BatchNorm (PyTorch convention: momentum 0.1 on the new value, biased
  batch variance for normalising). Variables: params `scale`, `bias`; batch_stats `mean`, `var`.

  Attributes:
    use_bias: learn a shift (False for the BNNeck).
    momentum: weight of the old running statistic in the update.
    epsilon: added to the variance.
    dtype: output dtype (statistics are always float32).
  """

  use_bias: bool = True
  use_scale: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool,
               mask: jax.Array | None = None) -> jax.Array:
    """Normalises x of shape (B, ..., C); `mask` (B,) bool marks the samples that count."""
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    scale = (self.param("scale", self.scale_init, (features,), jnp.float32) if self.use_scale
             else jnp.ones((features,), jnp.float32))
    bias = (self.param("bias", nn.initializers.zeros, (features,), jnp.float32) if self.use_bias
            else jnp.zeros((features,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if use_running_average:
      y = (x32 - running_mean.value) * jax.lax.rsqrt(running_var.value + self.epsilon)
      return (y * scale + bias).astype(self.dtype)
    if mask is None:
      mask = jnp.ones(x.shape[:1], bool)
    weight = mask.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    y, mean, var, count = batch_norm_train(x32, weight, scale, bias, self.epsilon)
    if not self.is_initializing():
      any_present = count > 0
      running_mean.value = jnp.where(
          any_present, self.momentum * running_mean.value + (1 - self.momentum) * mean,
          running_mean.value)
      running_var.value = jnp.where(
          any_present, self.momentum * running_var.value + (1 - self.momentum) * var,
          running_var.value)
    return y.astype(self.dtype)


def global_pool(x: jax.Array, kind: str) -> jax.Array:
  """Pools (..., h, w, C) over h and w with "avg" or "max" into (..., C).

  "max" gathers at the argmax, so its gradient goes to one position per channel (the first on
  ties, as in PyTorch). `jnp.max`'s gradient instead re-tests `x == max(x)`, which XLA may
  evaluate on a differently rounded copy of `x`: whole channels then lose their gradient at
  random (1 vs 8 devices, jit vs eager disagreed by up to 30%; NaN at -O0).
  """
  if kind == "avg":
    return jnp.mean(x, axis=(-3, -2))
  if kind == "max":
    flat = x.reshape(x.shape[:-3] + (-1, x.shape[-1]))
    index = jnp.argmax(jax.lax.stop_gradient(flat), axis=-2, keepdims=True)
    return jnp.take_along_axis(flat, index, axis=-2)[..., 0, :]
  raise ValueError(f"Unknown pooling {kind!r}; expected 'avg' or 'max'.")


def horizontal_stripes(x: jax.Array, num_stripes: int) -> jax.Array:
  """Average-pools (..., h, w, C) into (..., num_stripes, C) horizontal stripes.

  Stripe i covers rows floor(i * h / P) to ceil((i + 1) * h / P), the bins of PyTorch's
  adaptive average pooling, so any h >= 1 works (stripes overlap when h < P).
  """
  h = x.shape[-3]
  stripes = []
  for i in range(num_stripes):
    start = (i * h) // num_stripes
    end = -((-(i + 1) * h) // num_stripes)
    stripes.append(jnp.mean(x[..., start:end, :, :], axis=(-3, -2)))
  return jnp.stack(stripes, axis=-2)


def gem_pool(x: jax.Array, p: float, eps: float = 1e-6) -> jax.Array:
  """Generalised-mean (GeM) pooling of (..., h, w, C) over h and w into (..., C) float32.

  (mean over positions of max(x, eps)^p)^(1/p) (Radenović et al.): p = 1 is average pooling
  (of the clamped map), p -> infinity max pooling; AGW uses p = 3 on post-ReLU maps. Computed as
  m * mean((x / m)^p)^(1/p) with m the per-channel maximum (gradient stopped), which is the same
  value for any m > 0 and so has the same gradient, but cannot overflow for large p.
  """
  x = jnp.maximum(x.astype(jnp.float32), eps)
  peak = jax.lax.stop_gradient(jnp.max(x, axis=(-3, -2), keepdims=True))
  mean = jnp.mean(jnp.power(x / peak, p), axis=(-3, -2))
  return peak[..., 0, 0, :] * jnp.power(mean, 1.0 / p)


class NonLocal(nn.Module):
  """Non-local block (Wang et al., CVPR 2018) in AGW's form: embedded dot product divided by the
  number of positions, and a residual whose output BatchNorm starts at zero scale and shift, so
  that the block is an identity map at initialisation.

  On x of shape (B, h, w, C), with N = h * w positions and 1x1 convolutions (with bias) theta,
  phi and g to `C // reduction` channels (AGW's "proper" bottleneck width C / 2):
    y_i = sum_j <theta(x)_i, phi(x)_j> / N * g(x)_j,   z = x + BN(W(y)).

  Attributes:
    reduction: bottleneck width is C // reduction.
    dtype: compute dtype.
  """

  reduction: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool,
               mask: jax.Array | None = None) -> jax.Array:
    """(B, h, w, C) -> (B, h, w, C); `mask` (B,) marks the samples the BatchNorm counts."""
    batch, height, width, channels = x.shape
    inner = max(channels // self.reduction, 1)
    positions = height * width

    def project(name: str) -> jax.Array:
      y = nn.Conv(inner, (1, 1), dtype=self.dtype, name=name)(x)
      return y.reshape(batch, positions, inner)

    theta, phi, g = project("theta"), project("phi"), project("g")
    affinity = jnp.einsum("bic,bjc->bij", theta, phi) / positions
    y = jnp.einsum("bij,bjc->bic", affinity, g).reshape(batch, height, width, inner)
    y = nn.Conv(channels, (1, 1), dtype=self.dtype, name="w")(y)
    y = MaskedBatchNorm(dtype=self.dtype, scale_init=nn.initializers.zeros, name="w_bn")(
        y, use_running_average, mask)
    return x + y.astype(x.dtype)
