"""The joint-attention multimodal ReID network (DESIGN.md section 3), and AGW as its switches.

Input: a batch of modality tuples, images (B, S, H, W, 3) uint8 or float in [0, 255], with slot s
holding modality `modalities[s]` and presence (B, S). Each slot goes through the stem of its
modality (ResNet stages 0..`specific_stages`), then the shared stages, the cross-modal attention,
the three-branch fusion and the BNNeck. Training passes every modality slot; evaluation passes
the one modality it embeds, so only that stem runs.

The same code builds the two-stream baselines by its switches: `attention=False` drops the
cross-modal attention, `embedding="gem"` replaces the fusion by GeM pooling of the backbone map
(`EMBEDDINGS`), `non_local` inserts non-local blocks into the backbone, `classifier="linear"`
uses a plain linear identity classifier (`heads.CLASSIFIERS`). `AGW` (Ye et al., TPAMI 2021) is
that network: two-stream ResNet (modality-specific stem, shared stages 1-4, last stride 1),
non-local blocks (0, 2, 3, 0), GeM (p = 3), BNNeck and a linear classifier. The paper's
ablations (`scripts/ablate.py`) use two more embeddings: "concat" (early concatenation of the
modalities' pooled maps, projected to D: the paper's baseline) and "late" (each modality
embedded on its own, scores averaged at test time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmreid_jax.models.attention import CrossModalAttention
from mmreid_jax.models.fusion import EarlyConcatFusion, LateFusion, MultimodalFusion
from mmreid_jax.models.heads import CLASSIFIERS, BNNeck
from mmreid_jax.models.layers import gem_pool
from mmreid_jax.models.resnet import ResNet, stage_channels

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255



@dataclasses.dataclass(frozen=True)
class Embedding:
  """How a slot's pre-BNNeck embedding is made from the (attended) feature maps.

  Attributes:
    apply: (model, maps (B, S, h, w, C), present (B, S), modalities, train, isolated (B,) bool
      or None) -> (features (B, S, E), extra outputs); the slots of an isolated sample are each
      embedded as if their modality were the only one present. It runs inside the model's
      compact `__call__`, so the submodules it creates are the model's.
    dim: model -> E.
  """

  apply: Callable[["MultimodalReID", jax.Array, jax.Array, tuple[int, ...], bool,
                   jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]
  dim: Callable[["MultimodalReID"], int]


def _fusion_embedding(model: "MultimodalReID", maps: jax.Array, present: jax.Array,
                      modalities: tuple[int, ...], train: bool, isolated: jax.Array | None,
                      slot_weights: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The paper's three-branch fusion; extra outputs are branch 3's reconstruction tensors.
  `slot_weights` (B, S): the reliability-weighted attention's weights, which also weigh the
  correlation branch's pairs."""
  fused = MultimodalFusion(model.num_modalities, model.embed_dim, model.num_stripes,
                           model.part_dim, dtype=model.dtype, name="fusion")(
                               maps, present, modalities, train, isolated, slot_weights)
  features = fused.pop("embedding")
  return features, fused


def _gem_embedding(model: "MultimodalReID", maps: jax.Array, present: jax.Array,
                   modalities: tuple[int, ...], train: bool, isolated: jax.Array | None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GeM pooling of the map with exponent `gem_p` (AGW), per slot; no extra outputs."""
  del present, modalities, train, isolated
  return gem_pool(maps, model.gem_p), {}


def _concat_embedding(model: "MultimodalReID", maps: jax.Array, present: jax.Array,
                      modalities: tuple[int, ...], train: bool, isolated: jax.Array | None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Early concatenation of the modalities' pooled maps, projected to D (`EarlyConcatFusion`)."""
  del train
  return EarlyConcatFusion(model.num_modalities, model.embed_dim, dtype=model.dtype,
                           name="early_fusion")(maps, present, modalities, isolated), {}


def _late_embedding(model: "MultimodalReID", maps: jax.Array, present: jax.Array,
                    modalities: tuple[int, ...], train: bool, isolated: jax.Array | None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Each slot's pooled map projected to D on its own (`LateFusion`, scores fused at test)."""
  del train, isolated  # every slot is alone already
  return LateFusion(model.embed_dim, dtype=model.dtype, name="late_fusion")(
      maps, present, modalities), {}


EMBEDDINGS: dict[str, Embedding] = {
    "fusion": Embedding(_fusion_embedding,
                        lambda m: 2 * m.embed_dim + m.num_stripes * m.part_dim),
    "gem": Embedding(_gem_embedding, lambda m: stage_channels(m.depth, m.width, 4)),
    "concat": Embedding(_concat_embedding, lambda m: m.embed_dim),
    "late": Embedding(_late_embedding, lambda m: m.embed_dim),
}


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
    attention: apply the cross-modal attention (False: the backbone maps go on as they are).
    modal_attention: with the attention, its modal part (False: channel attention only, each
      slot on its own; `attention.CrossModalAttention.modal`).
    modal_weighting: how the modal attention weighs the slots, "paper" or "reliability"
      (`attention.WEIGHTINGS`, `attention.CrossModalAttention.weighting`); with "reliability"
      the weights also weigh the fusion's correlation pairs (`MultimodalFusion.slot_weights`).
    embedding: an `EMBEDDINGS` name: "fusion" (the paper), "gem" (GeM pooling), "concat"
      (early concatenation) or "late" (late fusion).
    gem_p: the GeM exponent of `embedding="gem"`.
    non_local: non-local blocks per ResNet stage 1..4 (`resnet.ResNet.non_local`).
    classifier: a `heads.CLASSIFIERS` name, "cosine" (the paper) or "linear".
    train_alone_views: in training, embed every tuple twice from one backbone pass: fused (the
      slots of a tuple attend to and fuse with each other) and, for tuples with several
      modalities, each slot alone (as a single image is embedded at test time); the outputs
      then hold 2B rows, the fused view first.
    fused_view_detached: with `train_alone_views`, the fused view's gradient stops at the
      backbone's maps: the backbone learns from the alone views (the single images retrieval
      embeds), the attention and fusion from both.
    kernels: "xla", "cpu" or "auto" (`resnet.ResNet.kernels`: the backbone's convolutions as
      XLA's own or as the CPU's forms of `cpu_forms`; the same parameters).
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
  attention: bool = True
  modal_attention: bool = True
  modal_weighting: str = "paper"
  embedding: str = "fusion"
  gem_p: float = 3.0
  non_local: tuple[int, ...] = (0, 0, 0, 0)
  classifier: str = "cosine"
  train_alone_views: bool = False
  fused_view_detached: bool = False
  kernels: str = "xla"

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
      "features": (R, S, E) pre-BNNeck embeddings (metric losses, discriminator);
      "embeddings": (R, S, E) post-BNNeck embeddings (classifier, retrieval);
      "present": (R, S) bool, the slots of those rows that hold an embedding;
      "class_weights": (num_classes, E), and "scale": () for the cosine classifier;
      "modal_weights": (R, S) with the attention on; and the embedding's extra outputs (the
      fusion's branch-3 "reconstruction*" tensors of `MultimodalFusion`, (R, S, ...)).
      R = B, or 2B in training with `train_alone_views` (rows B + i: tuple i's slots alone,
      present only where tuple i has several modalities).
    """
    if len(modalities) != images.shape[1]:
      raise ValueError(f"{images.shape[1]} image slots but modalities={modalities}.")
    if self.embedding not in EMBEDDINGS:
      raise ValueError(f"config.model.embedding={self.embedding!r}; expected one of "
                       f"{sorted(EMBEDDINGS)}.")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"config.model.classifier={self.classifier!r}; expected one of "
                       f"{sorted(CLASSIFIERS)}.")
    x = (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD
    non_local = tuple(self.non_local)
    stems = {m: ResNet(self.depth, self.width, self.last_stride, 0, self.specific_stages,
                       self.dtype, non_local, self.kernels, name=f"stem_{m}")
             for m in range(self.num_modalities)}
    # The slots of one modality (CAJ's channel-exchanged RGB view) go through its stem in one
    # call, stacked on the batch axis: its BatchNorm statistics pool the views as one batch.
    size = x.shape[0]
    per_slot: list[jax.Array | None] = [None] * len(modalities)
    for m in dict.fromkeys(modalities):  # in order of first slot
      held = [slot for slot, n in enumerate(modalities) if n == m]
      out = stems[m](jnp.concatenate([x[:, slot] for slot in held]), train,
                     jnp.concatenate([present[:, slot] for slot in held]))
      for i, slot in enumerate(held):
        per_slot[slot] = out[i * size:(i + 1) * size]
    stem_out = jnp.stack(per_slot, axis=1)  # (B, S, h, w, C)
    batch, slots = present.shape
    flat = stem_out.reshape((batch * slots,) + stem_out.shape[2:])
    shared = ResNet(self.depth, self.width, self.last_stride, self.specific_stages + 1, 4,
                    self.dtype, non_local, self.kernels, name="shared")(
                        flat, train, present.reshape(-1))
    feature_maps = shared.reshape((batch, slots) + shared.shape[1:])

    isolated = None
    if train and self.train_alone_views:
      several = jnp.sum(present, axis=1, keepdims=True) > 1  # alone == fused for one modality
      fused_maps = (jax.lax.stop_gradient(feature_maps) if self.fused_view_detached
                    else feature_maps)
      feature_maps = jnp.concatenate([fused_maps, feature_maps])
      present = jnp.concatenate([present, present & several])
      isolated = jnp.arange(2 * batch) >= batch
    outputs = {"present": present}
    if self.attention:
      feature_maps, modal_weights = CrossModalAttention(
          self.attention_reduction, self.attention_dim, self.dtype, self.modal_attention,
          self.modal_weighting, name="attention")(feature_maps, present, modalities, isolated)
      if modal_weights is not None:
        outputs["modal_weights"] = modal_weights
    weighted = {}
    if self.embedding == "fusion" and self.has_modal_weights and (
        self.modal_weighting == "reliability"):
      weighted["slot_weights"] = outputs["modal_weights"]
    features, extra = EMBEDDINGS[self.embedding].apply(self, feature_maps, present, modalities,
                                                       train, isolated, **weighted)
    embeddings = BNNeck(name="bnneck")(features, present, train)
    classifier = CLASSIFIERS[self.classifier](self.num_classes, name="classifier")
    return {"features": features, "embeddings": embeddings, **classifier(embeddings.shape[-1]),
            **outputs, **extra}

  @property
  def has_modal_weights(self) -> bool:
    """Whether outputs hold "modal_weights" (the attention with its modal part)."""
    return self.attention and self.modal_attention

  @property
  def embedding_dim(self) -> int:
    """E, the width of one slot's embedding."""
    return EMBEDDINGS[self.embedding].dim(self)


class AGW(MultimodalReID):
  """AGW (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI
  2021; mangye16/Cross-Modal-Re-ID-baseline): `MultimodalReID` without attention or fusion, with
  non-local blocks (2 in stage 2, 3 in stage 3, bottleneck width C / 2), GeM pooling (p = 3),
  BNNeck and a bias-free linear identity classifier. Its losses (identity cross-entropy and the
  weighted regularised triplet, `losses.weighted_regularized_triplet`) are the config's.
  """

  attention: bool = False
  embedding: str = "gem"
  non_local: tuple[int, ...] = (0, 2, 3, 0)
  classifier: str = "linear"
