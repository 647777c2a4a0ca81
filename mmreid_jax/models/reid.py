"""The joint-attention multimodal ReID network (DESIGN.md section 3).

Input: a batch of modality tuples, images (B, S, H, W, 3) uint8 or float in [0, 255], with slot s
holding modality `modalities[s]` and presence (B, S). Each slot goes through the stem of its
modality (ResNet stages 0..`specific_stages`), then the shared stages, the cross-modal attention,
the three-branch fusion and the BNNeck. Training passes every modality slot; evaluation passes
the one modality it embeds, so only that stem runs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmreid_jax.models.attention import CrossModalAttention
from mmreid_jax.models.fusion import MultimodalFusion
from mmreid_jax.models.heads import BNNeck, CosineClassifier
from mmreid_jax.models.resnet import ResNet

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class MultimodalReID(nn.Module):
  """Backbone with modality-specific stems, attention, fusion, BNNeck and cosine classifier.

  Attributes:
    num_classes: training identities.
    num_modalities: modalities of the dataset.
    depth, width, last_stride: the ResNet.
    specific_stages: stages 0..k are per modality (0 = the stem only), the rest shared.
    embed_dim, num_stripes, part_dim: fusion sizes.
    attention_reduction, attention_dim: cross-modal attention sizes.
    dtype: compute dtype (float32 or bfloat16); parameters are float32.
  """

  num_classes: int
  num_modalities: int
  depth: int = 50
  width: int = 64
  last_stride: int = 1
  specific_stages: int = 0
  embed_dim: int = 512
  num_stripes: int = 6
  part_dim: int = 128
  attention_reduction: int = 16
  attention_dim: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, present: jax.Array, modalities: tuple[int, ...],
               train: bool = False) -> dict[str, jax.Array]:
    """Embeds a batch of modality tuples.

    Args:
      images: (B, S, H, W, 3) in [0, 255].
      present: (B, S) bool.
      modalities: dataset modality index of each of the S slots (static).
      train: training mode (batch statistics, branch-3 masking with the "mask" RNG).

    Returns:
      "features": (B, S, E) pre-BNNeck embeddings (metric losses, discriminator);
      "embeddings": (B, S, E) post-BNNeck embeddings (classifier, retrieval);
      "class_weights": (num_classes, E), "scale": (), "modal_weights": (B, S);
      and the branch-3 "reconstruction*" tensors of `MultimodalFusion`.
    """
    if len(modalities) != images.shape[1]:
      raise ValueError(f"{images.shape[1]} image slots but modalities={modalities}.")
    x = (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD
    stems = {m: ResNet(self.depth, self.width, self.last_stride, 0, self.specific_stages,
                       self.dtype, name=f"stem_{m}") for m in range(self.num_modalities)}
    stem_out = jnp.stack([stems[m](x[:, slot], train, present[:, slot])
                          for slot, m in enumerate(modalities)], axis=1)
    batch, slots = present.shape
    flat = stem_out.reshape((batch * slots,) + stem_out.shape[2:])
    shared = ResNet(self.depth, self.width, self.last_stride, self.specific_stages + 1, 4,
                    self.dtype, name="shared")(flat, train, present.reshape(-1))
    feature_maps = shared.reshape((batch, slots) + shared.shape[1:])

    attended, modal_weights = CrossModalAttention(
        self.attention_reduction, self.attention_dim, self.dtype, name="attention")(
            feature_maps, present, modalities)
    fused = MultimodalFusion(self.num_modalities, self.embed_dim, self.num_stripes,
                             self.part_dim, dtype=self.dtype, name="fusion")(
                                 attended, present, modalities, train)
    features = fused.pop("embedding")
    embeddings = BNNeck(name="bnneck")(features, present, train)
    class_weights, scale = CosineClassifier(self.num_classes, name="classifier")(
        embeddings.shape[-1])
    return {"features": features, "embeddings": embeddings, "class_weights": class_weights,
            "scale": scale, "modal_weights": modal_weights, **fused}

  @property
  def embedding_dim(self) -> int:
    return 2 * self.embed_dim + self.num_stripes * self.part_dim
