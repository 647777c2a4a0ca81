"""Heads on the embedding: BNNeck, identity classifiers (`CLASSIFIERS`), modality discriminator.

An identity classifier maps the embedding width to a dict of its variables for the loss:
"class_weights" (num_classes, E) always, and "scale" () for the cosine classifier. The train step
picks the identity loss by the model's `classifier` name (`train_step.IDENTITY_LOSSES`).
"""

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

  The modal cosine cross-entropy (`losses.cosine_cross_entropy`) turns them into logits
  s * cos(f, w_c).
  """

  num_classes: int
  initial_scale: float = 16.0

  @nn.compact
  def __call__(self, dim: int) -> dict[str, jax.Array]:
    """Returns {"class_weights": (num_classes, dim), "scale": ()}."""
    weights = self.param("weights", nn.initializers.normal(0.01), (self.num_classes, dim))
    log_scale = self.param("log_scale", nn.initializers.constant(math.log(self.initial_scale)),
                           ())
    return {"class_weights": weights, "scale": jnp.exp(log_scale)}


class LinearClassifier(nn.Module):
  """A bias-free linear identity classifier, logits f @ W^T (AGW's `nn.Linear(E, C,
  bias=False)`, initialised N(0, 0.001^2)); `losses.softmax_cross_entropy` is its loss."""

  num_classes: int

  @nn.compact
  def __call__(self, dim: int) -> dict[str, jax.Array]:
    """Returns {"class_weights": (num_classes, dim)}."""
    weights = self.param("weights", nn.initializers.normal(0.001), (self.num_classes, dim))
    return {"class_weights": weights}


CLASSIFIERS: dict[str, type[nn.Module]] = {
    "cosine": CosineClassifier,
    "linear": LinearClassifier,
}


class ModalityDiscriminator(nn.Module):
  """MLP(E -> hidden -> M) predicting the modality of an embedding."""

  num_modalities: int
  hidden: int = 256

  @nn.compact
  def __call__(self, embeddings: jax.Array) -> jax.Array:
    """(..., E) -> (..., M) logits."""
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(embeddings.astype(jnp.float32)))
    return nn.Dense(self.num_modalities, name="logits")(x)
