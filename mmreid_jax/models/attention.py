"""Cross-modal self-attention (paper section 2.2, DESIGN.md section 3).

For each present modality m with feature map F_m:
  channel attention  A_c,m = sigmoid(FC_m2(relu(FC_m1(GAP(F_m)))))   (per-modality FCs, C -> C/r -> C)
  modal attention    z_m = GAP(F_m); q_m = W_q z_m; k_m = W_k z_m (shared projections);
                     S[m, n] = <q_m, k_n> / sqrt(d);  s_m = sum_{n != m, present} S[m, n];
                     A_m = softmax over present modalities of s
  output             F'_m = A_c,m * F_m + A_m(m) * sum_{n != m, present} F_n
With one modality present A_m = 1 and F'_m = A_c,m * F_m. Absent modalities get F' = 0.
A sample marked `isolated` has each slot attend to itself only (A_m = 1, F'_m = A_c,m * F_m for
every present slot): the embedding a slot would get if its modality were the only one present,
computed for all slots at once (training's alone views, `reid.MultimodalReID.train_alone_views`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


# How the modal attention weighs the slots (`CrossModalAttention.weighting`).
WEIGHTINGS = ("paper", "reliability")


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax over the entries of `axis` where `mask` is true; all-false rows give zeros."""
  logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
  row_max = jnp.max(logits, axis=axis, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  exp = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  total = jnp.sum(exp, axis=axis, keepdims=True)
  return exp / jnp.where(total > 0, total, 1.0)


class CrossModalAttention(nn.Module):
  """Channel and modal attention over the modality slots of a sample.

  Channel-attention parameters are per modality (`channel_fc*_{m}`); a slot uses those of the
  modality it holds, so the model must be initialised with every modality present.

  Attributes:
    reduction: channel-attention reduction r.
    attention_dim: width d of the shared query/key projections.
    dtype: compute dtype.
    modal: the modal attention (False: F'_m = A_c,m * F_m for every slot, no exchange between
      slots and no modal weights; the channel attention alone).
    weighting: how the modal attention weighs the slots (`WEIGHTINGS`): "paper", the formula
      above; "reliability", each modality's confidence from its own descriptor alone,
      r_m = sigmoid(w_m . GAP(F_m) + b_m), and a slot kept in proportion to it and filled with
      the others in proportion to theirs:
        F'_m = r_m A_c,m F_m + (1 - r_m) sum_{n != m} r_n A_c,n F_n / sum_{n != m} r_n,
      with the weights reported as r normalised over the present slots (one slot alone:
      F'_m = A_c,m F_m, weight 1); the fusion weighs its correlation pairs (m, n) by them too
      (`reid.MultimodalReID.modal_weighting`).
  """

  reduction: int = 16
  attention_dim: int = 64
  dtype: Any = jnp.float32
  modal: bool = True
  weighting: str = "paper"

  @nn.compact
  def __call__(self, features: jax.Array, present: jax.Array, modalities: tuple[int, ...],
               isolated: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Attends over slots.

    Args:
      features: (B, S, h, w, C), slot s holding modality `modalities[s]`.
      present: (B, S) bool.
      modalities: the dataset modality index of each slot (static).
      isolated: (B,) bool, samples whose slots each attend to themselves only; None: none.

    Returns:
      F' of shape (B, S, h, w, C) and the modal weights A_m of shape (B, S) (float32, zero for
      absent slots, summing to one over present ones; None without the modal attention).
    """
    channels = features.shape[-1]
    hidden = max(channels // self.reduction, 1)
    pooled = jnp.mean(features.astype(jnp.float32), axis=(2, 3))  # (B, S, C)
    channel_weights = jnp.stack([
        nn.sigmoid(nn.Dense(channels, name=f"channel_fc2_{modality}")(
            nn.relu(nn.Dense(hidden, name=f"channel_fc1_{modality}")(pooled[:, slot]))))
        for slot, modality in enumerate(modalities)], axis=1)  # (B, S, C)
    present_f = present.astype(features.dtype)[:, :, None, None, None]
    attended = channel_weights.astype(features.dtype)[:, :, None, None, :] * features
    if not self.modal:
      return attended * present_f, None
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"config.model.modal_weighting={self.weighting!r}; expected one of "
                       f"{WEIGHTINGS}.")
    num_slots = len(modalities)
    others = present[:, None, :] & ~jnp.eye(num_slots, dtype=bool)[None]  # (B, S, S)
    if isolated is not None:
      others = others & ~isolated[:, None, None]
    if self.weighting == "reliability":
      reliability = jnp.stack([
          nn.sigmoid(nn.Dense(1, bias_init=nn.initializers.constant(2.0),
                              name=f"reliability_{modality}")(pooled[:, slot])[:, 0])
          for slot, modality in enumerate(modalities)], axis=1)  # (B, S)
      reliability = jnp.where(present, reliability, 0.0)
      mix = others * reliability[:, None, :]  # (B, S, S): slot n's share in slot m's filling
      total = jnp.sum(mix, axis=-1, keepdims=True)
      mix = mix / jnp.where(total > 0, total, 1.0)
      kept = jnp.where(jnp.any(others, axis=-1), reliability, 1.0)  # alone: the slot itself
      filling = jnp.einsum("bmn,bnhwc->bmhwc", mix.astype(features.dtype), attended)
      enhanced = (kept.astype(features.dtype)[:, :, None, None, None] * attended
                  + (1 - kept).astype(features.dtype)[:, :, None, None, None] * filling)
      shares = reliability / jnp.maximum(jnp.sum(reliability, -1, keepdims=True), 1e-12)
      weights = jnp.where(jnp.any(others, axis=-1), shares, present.astype(jnp.float32))
      return enhanced * present_f, weights

    query = nn.Dense(self.attention_dim, use_bias=False, name="query")(pooled)
    key = nn.Dense(self.attention_dim, use_bias=False, name="key")(pooled)
    similarity = jnp.einsum("bmd,bnd->bmn", query, key) / jnp.sqrt(float(self.attention_dim))
    summed = jnp.sum(jnp.where(others, similarity, 0.0), axis=-1)  # (B, S)
    modal_weights = masked_softmax(summed, present)

    masked_features = features * present_f
    total = jnp.sum(masked_features, axis=1, keepdims=True)
    sum_of_others = total - masked_features
    if isolated is not None:
      modal_weights = jnp.where(isolated[:, None], present.astype(jnp.float32), modal_weights)
      sum_of_others = jnp.where(isolated[:, None, None, None, None], 0, sum_of_others)
    modal_scale = modal_weights.astype(features.dtype)[:, :, None, None, None]
    enhanced = attended + modal_scale * sum_of_others
    return enhanced * present_f, modal_weights
