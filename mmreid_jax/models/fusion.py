"""Three-branch multimodal fusion (paper section 2.3, DESIGN.md section 3).

On the attended maps F'_m (B, S, h, w, C):
1. intra-modal enhancement: f1_m = Dense(GAP(F'_m) + GMP(F'_m)) -> D (a 1x1 conv on the pooled
   vector), shared over modalities.
2. cross-modal correlation: P horizontal stripes p_m^i; for stripe i,
   corr_i = sum over present pairs (m, n), (m, m) included, of W_i[m, n] * Linear_i([p_m^i ; p_n^i]),
   W_i a learned table normalised by a softmax over the present pairs. corr is a property of the
   sample, so every present slot of a sample carries the same P stripe features.
3. modal-discrepancy suppression: in training a Bernoulli(p) spatial mask, p ~ U[0.1, 0.3] per
   sample, zeroes positions of F'_m; a conv recovery network R rebuilds them and the branch output
   is F'_m + R(F'_m * (1 - M)), pooled and projected to D. At test time there is no mask. The
   reconstruction error of R on masked positions (target F'_m, gradient stopped) is returned for
   the loss; the recovered features reach the modality discriminator as the branch-3 part of the
   embedding, which is how recovery is trained adversarially.
The embedding of a slot is concat(a1 * f1, a2 * corr_1..P, a3 * f3) with learned scalars a_k,
of size 2 * D + P * part_dim.

The fusion strategies the paper compares it with (its Table 4), for ablations
(`models.reid.EMBEDDINGS` "concat" and "late", `scripts/ablate.py --study fusion`):
`EarlyConcatFusion` projects the concatenation of a sample's pooled modality maps to one vector,
`LateFusion` embeds each modality on its own (its scores are averaged at test time).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmreid_jax.models.attention import masked_softmax
from mmreid_jax.models.layers import global_pool, horizontal_stripes


class MultimodalFusion(nn.Module):
  """The three fusion branches.

  Attributes:
    num_modalities: modalities of the dataset (size of the correlation weight tables).
    embed_dim: D, width of branches 1 and 3.
    num_stripes: P horizontal stripes of branch 2.
    part_dim: width of each stripe feature.
    mask_range: (low, high) of the per-sample masking probability of branch 3.
    recovery_reduction: channel reduction inside the recovery network R.
    dtype: compute dtype.
  """

  num_modalities: int
  embed_dim: int = 512
  num_stripes: int = 6
  part_dim: int = 128
  mask_range: tuple[float, float] = (0.1, 0.3)
  recovery_reduction: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, present: jax.Array, modalities: tuple[int, ...],
               train: bool, isolated: jax.Array | None = None,
               slot_weights: jax.Array | None = None) -> dict[str, jax.Array]:
    """Fuses attended features.

    Args:
      features: F' of shape (B, S, h, w, C), slot s holding modality `modalities[s]`.
      present: (B, S) bool.
      modalities: dataset modality index of each slot (static).
      train: apply the branch-3 mask (needs the "mask" RNG stream).
      isolated: (B,) bool, samples whose slots are each fused as if alone (branch 2 of slot m
        from the pair (m, m) only); None: none.
      slot_weights: (B, S) positive weights of the slots (the reliability-weighted attention's,
        `attention.CrossModalAttention.weighting`), or None: branch 2's pair weights become
        W_i[m, n] w_m w_n, renormalised over the present pairs.

    Returns:
      "embedding": (B, S, 2 * D + P * part_dim) float32, pre-BNNeck;
      "reconstruction", "reconstruction_target": (B, S, h, w, C) float32 and
      "reconstruction_mask": (B, S, h, w) bool (all false at test time).
    """
    batch, slots, height, width, channels = features.shape
    dense = lambda dim, name: nn.Dense(dim, dtype=self.dtype, name=name)

    intra = dense(self.embed_dim, "intra_projection")(
        global_pool(features, "avg") + global_pool(features, "max"))

    stripes = horizontal_stripes(features, self.num_stripes)  # (B, S, P, C)
    init = nn.initializers.lecun_normal()
    left = self.param("corr_left", init, (self.num_stripes, channels, self.part_dim))
    right = self.param("corr_right", init, (self.num_stripes, channels, self.part_dim))
    bias = self.param("corr_bias", nn.initializers.zeros, (self.num_stripes, self.part_dim))
    pair_logits = self.param("corr_pair_logits", nn.initializers.zeros,
                             (self.num_stripes, self.num_modalities, self.num_modalities))
    stripes_c = stripes.astype(self.dtype)
    left_part = jnp.einsum("bspc,pcd->bspd", stripes_c, left.astype(self.dtype))
    right_part = jnp.einsum("bspc,pcd->bspd", stripes_c, right.astype(self.dtype))
    pair_features = (left_part[:, :, None] + right_part[:, None, :]
                     + bias.astype(self.dtype))  # (B, S, S, P, d)
    slot_index = jnp.asarray(modalities)
    logits = pair_logits[:, slot_index][:, :, slot_index]  # (P, S, S)
    pair_present = present[:, :, None] & present[:, None, :]  # (B, S, S)
    flat_logits = jnp.broadcast_to(logits[None], (batch,) + logits.shape)  # (B, P, S, S)
    if slot_weights is not None:
      log_weights = jnp.log(jnp.maximum(slot_weights.astype(jnp.float32), 1e-12))
      flat_logits = flat_logits + (log_weights[:, None, :, None] + log_weights[:, None, None, :])
    flat_logits = flat_logits.reshape(batch, self.num_stripes, slots * slots)
    flat_present = jnp.broadcast_to(pair_present[:, None], flat_logits.shape[:2] + (slots, slots)
                                    ).reshape(flat_logits.shape)
    pair_weights = masked_softmax(flat_logits, flat_present).reshape(
        batch, self.num_stripes, slots, slots)
    correlation = jnp.einsum("bpmn,bmnpd->bpd", pair_weights.astype(self.dtype), pair_features)
    correlation = jnp.broadcast_to(correlation.reshape(batch, 1, -1),
                                   (batch, slots, self.num_stripes * self.part_dim))
    if isolated is not None:  # alone, slot m's only pair is (m, m), of weight 1
      own_pair = (left_part + right_part + bias.astype(self.dtype)).reshape(batch, slots, -1)
      correlation = jnp.where(isolated[:, None, None], own_pair, correlation)

    if train:
      rng_p, rng_m = jax.random.split(self.make_rng("mask"))
      probability = jax.random.uniform(rng_p, (batch, 1, 1, 1), minval=self.mask_range[0],
                                       maxval=self.mask_range[1])
      mask = jax.random.uniform(rng_m, (batch, slots, height, width)) < probability
    else:
      mask = jnp.zeros((batch, slots, height, width), bool)
    masked_input = features * (~mask)[..., None].astype(features.dtype)
    hidden = max(channels // self.recovery_reduction, 1)
    flat = masked_input.reshape((batch * slots, height, width, channels))
    recovered = nn.Conv(hidden, (3, 3), padding="SAME", dtype=self.dtype,
                        name="recovery_conv1")(flat)
    recovered = nn.Conv(channels, (3, 3), padding="SAME", dtype=self.dtype,
                        name="recovery_conv2")(nn.relu(recovered))
    recovered = recovered.reshape(features.shape)
    suppressed = dense(self.embed_dim, "suppression_projection")(
        global_pool(features + recovered, "avg"))

    branch_scale = self.param("branch_scale", nn.initializers.ones, (3,))
    embedding = jnp.concatenate([
        branch_scale[0] * intra.astype(jnp.float32),
        branch_scale[1] * correlation.astype(jnp.float32),
        branch_scale[2] * suppressed.astype(jnp.float32)], axis=-1)
    return {
        "embedding": embedding,
        "reconstruction": recovered.astype(jnp.float32),
        "reconstruction_target": jax.lax.stop_gradient(features.astype(jnp.float32)),
        "reconstruction_mask": mask,
    }


def _pooled_by_modality(features: jax.Array, present: jax.Array, modalities: tuple[int, ...],
                        num_modalities: int) -> jax.Array:
  """Each sample's average-pooled map of every dataset modality, zero where it is absent.

  Args:
    features: (B, S, h, w, C), slot s holding modality `modalities[s]`.
    present: (B, S) bool.
    modalities: dataset modality index of each slot (static).
    num_modalities: M, the dataset's modalities.

  Returns:
    (B, M, C) float32: the mean over a sample's present slots of modality m of GAP(F_s) (one slot
    per modality, except for a second view such as CAJ's channel-exchanged RGB).
  """
  pooled = global_pool(features.astype(jnp.float32), "avg")  # (B, S, C)
  slot_modality = jax.nn.one_hot(jnp.asarray(modalities), num_modalities)  # (S, M)
  weights = present.astype(jnp.float32)[:, :, None] * slot_modality[None]  # (B, S, M)
  counts = jnp.sum(weights, axis=1)  # (B, M)
  summed = jnp.einsum("bsm,bsc->bmc", weights, pooled)
  return summed / jnp.maximum(counts, 1.0)[..., None]


class EarlyConcatFusion(nn.Module):
  """Early concatenation (the paper's Table 3 baseline, "simple feature concatenation", and
  Table 4's "early concatenation"): one vector per sample from its modalities' pooled maps
  concatenated in the dataset's modality order (zeros for an absent modality) and projected to D,
  e = W [GAP(F_1); ...; GAP(F_M)] + b. Every present slot of the sample carries that vector; a
  single-modality image m gets W_m GAP(F_m) + b (W_m its modality's block of W), which is what
  cross-modal retrieval compares. Absent slots get zeros.

  Attributes:
    num_modalities: M, the dataset's modalities.
    embed_dim: D.
    dtype: compute dtype of the projection.
  """

  num_modalities: int
  embed_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, present: jax.Array, modalities: tuple[int, ...],
               isolated: jax.Array | None = None) -> jax.Array:
    """(B, S, h, w, C) maps and (B, S) presence -> (B, S, D) float32 pre-BNNeck embeddings;
    slots of `isolated` (B,) samples are each embedded as if their modality were alone."""
    batch, slots = present.shape
    projection = nn.Dense(self.embed_dim, dtype=self.dtype, name="early_projection")
    per_modality = _pooled_by_modality(features, present, modalities, self.num_modalities)
    fused = projection(per_modality.reshape(batch, -1).astype(self.dtype)).astype(jnp.float32)
    embedding = jnp.broadcast_to(fused[:, None], (batch, slots, self.embed_dim))
    if isolated is not None:  # slot s alone: its pooled map in its modality's block, zeros else
      pooled = global_pool(features.astype(jnp.float32), "avg")  # (B, S, C)
      blocks = jax.nn.one_hot(jnp.asarray(modalities), self.num_modalities)  # (S, M)
      alone = jnp.einsum("sm,bsc->bsmc", blocks, pooled).reshape(batch, slots, -1)
      alone = projection(alone.astype(self.dtype)).astype(jnp.float32)
      embedding = jnp.where(isolated[:, None, None], alone, embedding)
    return embedding * present.astype(jnp.float32)[..., None]


class LateFusion(nn.Module):
  """Late fusion (the paper's Table 4, "weighting scores after independent classification"):
  every slot is embedded on its own, e_s = W GAP(F_s) + b with one projection W shared by the
  modalities, without any exchange between the slots of a sample, and classified on its own by
  the identity losses. Scores are fused at test time: evaluation's capture embedding
  (`evaluate.fuse_modalities`: each modality's embedding L2-normalised, concatenated) gives the
  cosine similarity of two captures as the mean of their modalities' cosine similarities, i.e.
  score averaging. Absent slots get zeros.

  Attributes:
    embed_dim: D.
    dtype: compute dtype of the projection.
  """

  embed_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, present: jax.Array,
               modalities: tuple[int, ...]) -> jax.Array:
    """(B, S, h, w, C) maps and (B, S) presence -> (B, S, D) float32 pre-BNNeck embeddings."""
    del modalities  # one projection for every modality
    pooled = global_pool(features.astype(jnp.float32), "avg")  # (B, S, C)
    embedding = nn.Dense(self.embed_dim, dtype=self.dtype, name="late_projection")(
        pooled.astype(self.dtype)).astype(jnp.float32)
    return embedding * present.astype(jnp.float32)[..., None]
