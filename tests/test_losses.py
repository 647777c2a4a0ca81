"""Tests for mmreid_jax.losses against plain NumPy loop references.

Every loss is jitted once (``jax.value_and_grad`` under ``jax.jit``) and all cases share
the same shapes, so the whole file compiles only a handful of programs.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmreid_jax import losses

N, D, M, C = 12, 5, 3, 4
HW = (4, 3)
CH = 2
RTOL, ATOL = 1e-5, 1e-6


def _jit_vg(fn, argnums=0, static=()):
  return jax.jit(jax.value_and_grad(fn, argnums=argnums), static_argnames=static)


_VG = {
  "cosine": _jit_vg(losses.cosine_cross_entropy, argnums=(0, 4)),
  "triplet": _jit_vg(losses.cross_modal_triplet, static=("soft_margin",)),
  "center": _jit_vg(losses.center_alignment, static=("num_modalities",)),
  "mod_cls": _jit_vg(losses.modality_classification_loss),
  "confusion": _jit_vg(losses.modality_confusion_loss),
  "recon": _jit_vg(losses.masked_reconstruction_loss, argnums=(0, 1)),
}


def _run(name: str, *args, **kwargs) -> tuple[float, np.ndarray | tuple[np.ndarray, ...]]:
  """Value and gradient(s) of a loss; asserts a float32 scalar and finite gradients."""
  value, grads = _VG[name](*args, **kwargs)
  assert value.dtype == jnp.float32 and value.shape == ()
  grads = jax.tree.map(np.asarray, grads)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
  return float(value), grads


# ---------------------------------------------------------------- NumPy references


def _softmax_ce(logits: np.ndarray, label: int) -> float:
  z = logits - logits.max()
  return float(np.log(np.exp(z).sum()) - z[label])


def ref_cosine_ce(emb, weights, labels, valid, scale, margin=0.0):
  total, count = 0.0, 0
  for i in range(len(emb)):
    if not valid[i]:
      continue
    f = emb[i] / max(np.linalg.norm(emb[i]), 1e-12)
    logits = np.empty(len(weights))
    for c in range(len(weights)):
      w = weights[c] / max(np.linalg.norm(weights[c]), 1e-12)
      logits[c] = scale * (f @ w - (margin if c == labels[i] else 0.0))
    total += _softmax_ce(logits, labels[i])
    count += 1
  return total / count if count else 0.0


def ref_triplet(emb, pids, mods, valid, margin=0.3, soft_margin=False):
  total, count = 0.0, 0
  for i in range(len(emb)):
    if not valid[i]:
      continue
    pos, neg = [], []
    for j in range(len(emb)):
      if not valid[j] or mods[j] == mods[i]:
        continue
      d = float(np.linalg.norm(emb[i] - emb[j]))
      (pos if pids[j] == pids[i] else neg).append(d)
    if not pos or not neg:
      continue
    gap = max(pos) - min(neg)
    total += math.log1p(math.exp(gap)) if soft_margin else max(gap + margin, 0.0)
    count += 1
  return total / count if count else 0.0


def ref_center(emb, pids, mods, valid, num_modalities):
  total, count = 0.0, 0
  for p in sorted({int(pids[i]) for i in range(len(emb)) if valid[i]}):
    centres = {}
    for m in range(num_modalities):
      rows = [emb[i] for i in range(len(emb)) if valid[i] and pids[i] == p and mods[i] == m]
      if rows:
        centres[m] = np.mean(rows, axis=0)
    for a, b in itertools.combinations(range(num_modalities), 2):
      if a in centres and b in centres:
        total += float(np.sum((centres[a] - centres[b]) ** 2))
        count += 1
  return total / count if count else 0.0


def ref_mod_cls(logits, mods, valid):
  vals = [_softmax_ce(logits[i], mods[i]) for i in range(len(logits)) if valid[i]]
  return float(np.mean(vals)) if vals else 0.0


def ref_confusion(logits, valid):
  vals = []
  for i in range(len(logits)):
    if valid[i]:
      z = logits[i] - logits[i].max()
      logp = z - np.log(np.exp(z).sum())
      vals.append(-float(np.mean(logp)))
  return float(np.mean(vals)) if vals else 0.0


def ref_recon(rec, tgt, mask, valid):
  total, positions = 0.0, 0
  n, h, w, c = rec.shape
  for i in range(n):
    if not valid[i]:
      continue
    for y in range(h):
      for x in range(w):
        if mask[i, y, x]:
          total += float(np.sum((rec[i, y, x] - tgt[i, y, x]) ** 2))
          positions += 1
  return total / (positions * c) if positions else 0.0


# ---------------------------------------------------------------- helpers


def _batch(seed: int, num_pids: int = 3):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(N, D)).astype(np.float32)
  pids = rng.integers(0, num_pids, size=N).astype(np.int32)
  mods = rng.integers(0, M, size=N).astype(np.int32)
  valid = rng.random(N) < 0.75
  valid[:2] = True
  return emb, pids, mods, valid


def _pad(rows: int, *arrays: np.ndarray, garbage: float = np.nan):
  """Pads per-row arrays to N rows; padded float rows hold ``garbage``, padded ints hold 0."""
  out = []
  for a in arrays:
    fill = garbage if np.issubdtype(a.dtype, np.floating) else 0
    pad = np.full((N - rows,) + a.shape[1:], fill, a.dtype)
    out.append(np.concatenate([a, pad]))
  valid = np.arange(N) < rows
  return (*out, valid)


def _garbage(x: np.ndarray, valid: np.ndarray, value: float) -> np.ndarray:
  out = np.array(x, copy=True)
  out[~valid] = value
  return out


def _close(actual: float, expected: float):
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def _zero_on_invalid(g: np.ndarray, valid: np.ndarray):
  np.testing.assert_array_equal(g[~valid], 0.0)


def _cos_inputs(seed: int):
  rng = np.random.default_rng(100 + seed)
  weights = rng.normal(size=(C, D)).astype(np.float32)
  labels = rng.integers(0, C, size=N).astype(np.int32)
  return weights, labels


# ---------------------------------------------------------------- cosine cross-entropy


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("margin", [0.0, 0.35])
def test_cosine_ce_matches_reference(seed, margin):
  emb, _, _, valid = _batch(seed)
  weights, labels = _cos_inputs(seed)
  scale = jnp.float32(16.0)
  expected = ref_cosine_ce(
    emb.astype(np.float64), weights.astype(np.float64), labels, valid, 16.0, margin
  )
  value, _ = _run("cosine", emb, weights, labels, valid, scale, margin)
  _close(value, expected)
  dirty = _garbage(emb, valid, np.nan)
  bad_labels = np.where(valid, labels, 999).astype(np.int32)
  value, (g_emb, g_scale) = _run("cosine", dirty, weights, bad_labels, valid, scale, margin)
  _close(value, expected)
  _zero_on_invalid(g_emb, valid)
  assert np.any(g_emb[valid] != 0.0) and float(g_scale) != 0.0


def test_cosine_ce_margin_increases_loss():
  emb, _, _, valid = _batch(3)
  weights, labels = _cos_inputs(3)
  plain, _ = _run("cosine", emb, weights, labels, valid, jnp.float32(16.0), 0.0)
  cosface, _ = _run("cosine", emb, weights, labels, valid, jnp.float32(16.0), 0.35)
  assert cosface > plain


def test_cosine_ce_invariant_to_rescaling_and_safe_for_zero_rows():
  emb, _, _, valid = _batch(2)
  weights, labels = _cos_inputs(2)
  scale = jnp.float32(8.0)
  base, _ = _run("cosine", emb, weights, labels, valid, scale, 0.2)
  scaled, _ = _run("cosine", emb * 37.5, weights * 0.01, labels, valid, scale, 0.2)
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  zero = emb.copy()
  zero[0] = 0.0
  expected = ref_cosine_ce(
    zero.astype(np.float64), weights.astype(np.float64), labels, valid, 8.0, 0.2
  )
  value, (g_emb, _) = _run("cosine", zero, weights, labels, valid, scale, 0.2)
  _close(value, expected)
  _zero_on_invalid(g_emb, valid)


# ---------------------------------------------------------------- cross-modal triplet


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_matches_reference(seed, soft_margin):
  emb, pids, mods, valid = _batch(seed)
  expected = ref_triplet(emb.astype(np.float64), pids, mods, valid, 0.3, soft_margin)
  assert expected > 0.0
  value, _ = _run("triplet", emb, pids, mods, valid, 0.3, soft_margin=soft_margin)
  _close(value, expected)
  dirty = _garbage(emb, valid, np.inf)
  value, g = _run("triplet", dirty, pids, mods, valid, 0.3, soft_margin=soft_margin)
  _close(value, expected)
  _zero_on_invalid(g, valid)
  assert np.any(g != 0.0)


def test_triplet_skips_anchor_without_cross_modal_positive():
  rng = np.random.default_rng(4)
  emb = rng.normal(size=(6, D)).astype(np.float32)
  pids = np.array([0, 0, 1, 1, 2, 2], np.int32)
  mods = np.array([0, 1, 0, 1, 0, 0], np.int32)
  emb, pids, mods, valid = _pad(6, emb, pids, mods)
  expected = ref_triplet(emb[:6].astype(np.float64), pids[:6], mods[:6], valid[:6], 5.0)
  dist = np.linalg.norm(emb[:6, None].astype(np.float64) - emb[None, :6], axis=-1)
  nearest_negative = [
    min(dist[i, j] for j in range(6) if mods[j] != mods[i] and pids[j] != pids[i])
    for i in range(4)
  ]
  by_hand = np.mean([dist[i, i ^ 1] - nearest_negative[i] + 5.0 for i in range(4)])
  np.testing.assert_allclose(expected, by_hand, rtol=1e-12)
  value, g = _run("triplet", emb, pids, mods, valid, 5.0, soft_margin=False)
  _close(value, expected)
  _zero_on_invalid(g, valid)


@pytest.mark.parametrize("soft_margin", [False, True])
def test_triplet_single_modality_is_zero(soft_margin):
  emb, pids, _, valid = _batch(5)
  mods = np.zeros(N, np.int32)
  value, g = _run("triplet", emb, pids, mods, valid, 0.3, soft_margin=soft_margin)
  assert value == 0.0
  np.testing.assert_array_equal(g, 0.0)


def test_triplet_zero_distance_gradient_finite():
  base = np.random.default_rng(6).normal(size=(2, D)).astype(np.float32)
  emb = np.stack([base[0], base[0], base[1], base[1]])
  pids = np.array([0, 0, 1, 1], np.int32)
  mods = np.array([0, 1, 0, 1], np.int32)
  emb, pids, mods, valid = _pad(4, emb, pids, mods)
  expected = ref_triplet(emb.astype(np.float64), pids, mods, valid)
  value, g = _run("triplet", emb, pids, mods, valid, 0.3, soft_margin=False)
  np.testing.assert_allclose(value, expected, atol=1e-5)
  _zero_on_invalid(g, valid)


# ---------------------------------------------------------------- center alignment


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_center_matches_reference(seed):
  emb, pids, mods, valid = _batch(seed)
  expected = ref_center(emb.astype(np.float64), pids, mods, valid, M)
  assert expected > 0.0
  value, _ = _run("center", emb, pids, mods, valid, num_modalities=M)
  _close(value, expected)
  huge = _garbage(emb, valid, 1e30)
  bad_mods = np.where(valid, mods, 7).astype(np.int32)
  value, _ = _run("center", huge, pids, bad_mods, valid, num_modalities=M)
  _close(value, expected)
  value, g = _run("center", _garbage(emb, valid, np.nan), pids, mods, valid, num_modalities=M)
  _close(value, expected)
  _zero_on_invalid(g, valid)
  assert np.any(g != 0.0)


def test_center_first_row_invalid_and_unsorted_pids():
  emb = np.random.default_rng(9).normal(size=(8, D)).astype(np.float32)
  pids = np.array([5, 5, 2, 5, 2, 9, 2, 9], np.int32)
  mods = np.array([0, 1, 2, 2, 0, 1, 1, 1], np.int32)
  emb, pids, mods, valid = _pad(8, emb, pids, mods)
  valid[0] = False
  expected = ref_center(emb.astype(np.float64), pids, mods, valid, M)
  value, g = _run("center", emb, pids, mods, valid, num_modalities=M)
  _close(value, expected)
  _zero_on_invalid(g, valid)


def test_center_single_modality_is_zero():
  emb, pids, _, valid = _batch(3)
  mods = np.full(N, 2, np.int32)
  value, g = _run("center", emb, pids, mods, valid, num_modalities=M)
  assert value == 0.0
  np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------- modality losses


@pytest.mark.parametrize("seed", [0, 1])
def test_modality_classification_matches_reference(seed):
  logits = (np.random.default_rng(seed).normal(size=(N, M)) * 3).astype(np.float32)
  _, _, mods, valid = _batch(seed)
  expected = ref_mod_cls(logits.astype(np.float64), mods, valid)
  value, _ = _run("mod_cls", logits, mods, valid)
  _close(value, expected)
  bad_mods = np.where(valid, mods, -3).astype(np.int32)
  value, g = _run("mod_cls", _garbage(logits, valid, np.nan), bad_mods, valid)
  _close(value, expected)
  _zero_on_invalid(g, valid)


@pytest.mark.parametrize("seed", [0, 1])
def test_modality_confusion_matches_reference(seed):
  logits = (np.random.default_rng(seed).normal(size=(N, M)) * 3).astype(np.float32)
  valid = _batch(seed)[3]
  expected = ref_confusion(logits.astype(np.float64), valid)
  assert expected > math.log(M)
  value, _ = _run("confusion", logits, valid)
  _close(value, expected)
  value, g = _run("confusion", _garbage(logits, valid, -np.inf), valid)
  _close(value, expected)
  _zero_on_invalid(g, valid)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_modality_confusion_uniform_is_log_m(num_modalities):
  logits = np.full((N, num_modalities), 4.2, np.float32)
  value, g = _run("confusion", logits, np.ones(N, bool))
  np.testing.assert_allclose(value, math.log(num_modalities), rtol=1e-6)
  np.testing.assert_allclose(g, 0.0, atol=1e-7)


# ---------------------------------------------------------------- masked reconstruction


def _recon_inputs(seed: int):
  rng = np.random.default_rng(seed)
  rec = rng.normal(size=(N, *HW, CH)).astype(np.float32)
  tgt = rng.normal(size=(N, *HW, CH)).astype(np.float32)
  mask = rng.random((N, *HW)) < 0.4
  return rec, tgt, mask


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_reconstruction_matches_reference(seed, mask_dtype):
  rec, tgt, mask = _recon_inputs(seed)
  valid = _batch(seed)[3]
  expected = ref_recon(rec.astype(np.float64), tgt.astype(np.float64), mask, valid)
  value, (_, g_tgt) = _run("recon", rec, tgt, mask.astype(mask_dtype), valid)
  _close(value, expected)
  assert np.any(g_tgt != 0.0)
  unmasked = np.broadcast_to(~mask[..., None], rec.shape)
  dirty_rec = _garbage(rec, valid, np.nan)
  dirty_rec[unmasked] = np.nan
  dirty_tgt = _garbage(tgt, valid, np.inf)
  dirty_mask = _garbage(mask.astype(mask_dtype), valid, 1)
  value, (g_rec, g_tgt) = _run("recon", dirty_rec, dirty_tgt, dirty_mask, valid)
  _close(value, expected)
  _zero_on_invalid(g_rec, valid)
  _zero_on_invalid(g_tgt, valid)
  np.testing.assert_array_equal(g_rec[unmasked], 0.0)


def test_reconstruction_without_masked_positions_is_zero():
  rec, tgt, _ = _recon_inputs(3)
  value, (g_rec, _) = _run("recon", rec, tgt, np.zeros((N, *HW), bool), np.ones(N, bool))
  assert value == 0.0
  np.testing.assert_array_equal(g_rec, 0.0)


# ---------------------------------------------------------------- all losses together


def _all_inputs(seed: int):
  emb, pids, mods, valid = _batch(seed)
  weights, labels = _cos_inputs(seed)
  logits = np.random.default_rng(seed + 50).normal(size=(N, M)).astype(np.float32)
  rec, tgt, mask = _recon_inputs(seed)
  return emb, logits, rec, tgt, mask, weights, labels, pids, mods, valid


def _all_losses(emb, logits, rec, tgt, mask, weights, labels, pids, mods, valid):
  return jnp.stack(
    [
      losses.cosine_cross_entropy(emb, weights, labels, valid, jnp.float32(16.0), 0.1),
      losses.cross_modal_triplet(emb, pids, mods, valid),
      losses.cross_modal_triplet(emb, pids, mods, valid, soft_margin=True),
      losses.center_alignment(emb, pids, mods, valid, M),
      losses.modality_classification_loss(logits, mods, valid),
      losses.modality_confusion_loss(logits, valid),
      losses.masked_reconstruction_loss(rec, tgt, mask, valid),
    ]
  )


_all_losses_jit = jax.jit(_all_losses)
_total_grad_jit = jax.jit(jax.grad(lambda *a: jnp.sum(_all_losses(*a)), argnums=(0, 1, 2)))


def test_all_rows_invalid_gives_zero_and_zero_grad():
  emb, logits, rec, tgt, mask, weights, labels, pids, mods, _ = _all_inputs(0)
  valid = np.zeros(N, bool)
  emb = np.full_like(emb, np.nan)
  logits = np.full_like(logits, np.inf)
  rec = np.full_like(rec, np.nan)
  args = (emb, logits, rec, tgt, mask, weights, labels, pids, mods, valid)
  np.testing.assert_array_equal(np.asarray(_all_losses_jit(*args)), 0.0)
  for g in _total_grad_jit(*args):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_one_jit_for_all_losses_matches_references():
  emb, logits, rec, tgt, mask, weights, labels, pids, mods, valid = _all_inputs(1)
  f64 = lambda x: x.astype(np.float64)  # noqa: E731
  expected = [
    ref_cosine_ce(f64(emb), f64(weights), labels, valid, 16.0, 0.1),
    ref_triplet(f64(emb), pids, mods, valid),
    ref_triplet(f64(emb), pids, mods, valid, soft_margin=True),
    ref_center(f64(emb), pids, mods, valid, M),
    ref_mod_cls(f64(logits), mods, valid),
    ref_confusion(f64(logits), valid),
    ref_recon(f64(rec), f64(tgt), mask, valid),
  ]
  dirty = _garbage(emb, valid, np.nan)
  args = (dirty, logits, rec, tgt, mask, weights, labels, pids, mods, valid)
  np.testing.assert_allclose(np.asarray(_all_losses_jit(*args)), expected, rtol=RTOL, atol=ATOL)
  g_emb, g_logits, g_rec = (np.asarray(g) for g in _total_grad_jit(*args))
  for g in (g_emb, g_logits, g_rec):
    assert np.all(np.isfinite(g))
    _zero_on_invalid(g, valid)
  low = [jnp.asarray(a, jnp.bfloat16) for a in (emb, logits, rec, tgt, weights)]
  low_values = _all_losses_jit(
    low[0], low[1], low[2], low[3], mask, low[4], labels, pids, mods, valid
  )
  assert low_values.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(low_values), expected, rtol=5e-2, atol=1e-2)
