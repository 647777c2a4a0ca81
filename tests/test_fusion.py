"""Branch 3 of `MultimodalFusion` (masked recovery, DESIGN.md section 3) against plain NumPy.

The recovery network R (3x3 conv, ReLU, 3x3 conv, SAME padding) is written out here as sums of
shifted, zero-padded copies, so the reference shares no convolution code with Flax or lax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmreid_jax.models.fusion import MultimodalFusion

EMBED, STRIPES, PART = 4, 2, 2


def numpy_conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """Cross-correlation of x (N, h, w, C_in) with kernel (3, 3, C_in, C_out), zero padding 1,
  stride 1, plus bias (C_out,): (N, h, w, C_out)."""
  _, height, width, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(3):
    for dx in range(3):
      window = padded[:, dy:dy + height, dx:dx + width]  # input at (i + dy - 1, j + dx - 1)
      out += np.einsum("nhwc,cd->nhwd", window, kernel[dy, dx])
  return out + bias


def numpy_recovery(params: dict, x: np.ndarray) -> np.ndarray:
  """R of (B, S, h, w, C): conv2(relu(conv1(x)))."""
  flat = x.reshape((-1,) + x.shape[2:])
  c1, c2 = params["recovery_conv1"], params["recovery_conv2"]
  hidden = np.maximum(numpy_conv3x3_same(flat, c1["kernel"], c1["bias"]), 0.0)
  return numpy_conv3x3_same(hidden, c2["kernel"], c2["bias"]).reshape(x.shape)


def test_fusion_branch3_masked_recovery_matches_numpy():
  """In training, reconstruction = R(F * (1 - M)) and branch 3 of the embedding is
  branch_scale[2] * Dense(GAP(F + R(F * (1 - M)))), M the returned mask."""
  rng = np.random.default_rng(0)
  shape = (2, 3, 4, 2, 8)  # B, S, h, w, C
  module = MultimodalFusion(num_modalities=3, embed_dim=EMBED, num_stripes=STRIPES,
                            part_dim=PART)
  present = np.ones(shape[:2], bool)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape), present,
                                              (0, 1, 2), False))
  params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype),
                        shapes["params"])
  features = rng.standard_normal(shape).astype(np.float32)
  out = module.apply({"params": params}, features, present, (0, 1, 2), True,
                     rngs={"mask": jax.random.key(7)})

  mask = np.asarray(out["reconstruction_mask"])
  assert mask.shape == shape[:4] and mask.dtype == bool
  assert 0 < mask.sum() < mask.size, mask.mean()  # some positions masked, not all
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  f = features.astype(np.float64)
  recovered = numpy_recovery(p, f * (1.0 - mask[..., None]))
  np.testing.assert_allclose(out["reconstruction"], recovered, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["reconstruction_target"], features)

  projection = p["suppression_projection"]
  pooled = (f + recovered).mean(axis=(2, 3))  # (B, S, C)
  branch3 = p["branch_scale"][2] * (pooled @ projection["kernel"] + projection["bias"])
  embedding = np.asarray(out["embedding"])
  assert embedding.shape == shape[:2] + (2 * EMBED + STRIPES * PART,)
  np.testing.assert_allclose(embedding[..., -EMBED:], branch3, rtol=1e-5, atol=1e-5)
