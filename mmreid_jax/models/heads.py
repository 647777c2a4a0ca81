"""Heads on the fused embedding: BNNeck, cosine classifier, modality discriminator."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmreid_jax.models.layers import MaskedBatchNorm


class BNNeck(nn.Module):
  """BatchNorm without shift between the metric-loss feature and the classifier (Luo et al.)."""

  @nn.compact
  def __call__(self, features: jax.Array, present: jax.Array, train: bool) -> jax.Array:
    """(B, S, E) features, (B, S) presence -> (B, S, E) float32 normalised features."""
    batch, slots, dim = features.shape
    flat = features.reshape(batch * slots, dim)
    normed = MaskedBatchNorm(use_bias=False, name="bn")(flat, not train,
                                                        present.reshape(batch * slots))
    return normed.reshape(batch, slots, dim)


class CosineClassifier(nn.Module):
  """Identity class weights w_c and a learnable positive scale s = exp(log_scale).

  Returns the class weights and the scale; the modal cosine cross-entropy
  (`losses.cosine_cross_entropy`) turns them into logits s * cos(f, w_c).
  """

  num_classes: int
  initial_scale: float = 16.0

  @nn.compact
  def __call__(self, dim: int) -> tuple[jax.Array, jax.Array]:
    """Returns (class weights (num_classes, dim), scale ())."""
    weights = self.param("weights", nn.initializers.normal(0.01), (self.num_classes, dim))
    log_scale = self.param("log_scale", nn.initializers.constant(math.log(self.initial_scale)),
                           ())
    return weights, jnp.exp(log_scale)


class ModalityDiscriminator(nn.Module):
  """MLP(E -> hidden -> M) predicting the modality of an embedding."""

  num_modalities: int
  hidden: int = 256

  @nn.compact
  def __call__(self, embeddings: jax.Array) -> jax.Array:
    """(..., E) -> (..., M) logits."""
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(embeddings.astype(jnp.float32)))
    return nn.Dense(self.num_modalities, name="logits")(x)
