"""Training losses for multimodal re-identification (DESIGN.md section 4).

Per-sample inputs are flattened over (batch, modality): ``N = B * M`` rows, and
``valid`` of shape ``(N,)`` marks the rows whose modality is present. Invalid rows
are replaced by zeros with ``jnp.where`` before any arithmetic, so whatever they
hold (including NaN or inf) influences neither the value nor the gradient, and
their gradient is exactly zero. Every function computes in float32, has static
shapes and is jit-able; a loss with nothing to average over returns 0.0.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

_NORM_EPS = 1e-12
_DIST_EPS = 1e-12
_HIGHEST = jax.lax.Precision.HIGHEST


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values`` where ``mask`` is true, 0.0 when it is nowhere true; both ``(K,)``."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  count = jnp.sum(mask.astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def _rows_where(valid: jax.Array, x: jax.Array, fill: float | int = 0) -> jax.Array:
  """``x`` ``(N, ...)`` with the rows where ``valid`` ``(N,)`` is false set to ``fill``."""
  cond = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
  return jnp.where(cond, x, jnp.asarray(fill, x.dtype))


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Rows of ``x`` ``(K, D)`` over ``max(||row||, 1e-12)``; zero rows have finite gradient."""
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS**2))


def _pairwise_distances(x: jax.Array) -> jax.Array:
  """Euclidean distances ``(N, N)`` between the rows of ``x`` ``(N, D)``, finite gradient at 0."""
  sq = jnp.sum(x * x, axis=-1)
  gram = jnp.matmul(x, x.T, precision=_HIGHEST)
  d2 = sq[:, None] + sq[None, :] - 2.0 * gram
  return jnp.sqrt(jnp.maximum(d2, _DIST_EPS))


def cosine_cross_entropy(
  embeddings: jax.Array,
  class_weights: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
  scale: jax.Array,
  margin: float = 0.0,
) -> jax.Array:
  """Scaled cosine softmax cross-entropy with an additive cosine margin (CosFace).

  Args:
    embeddings: ``(N, D)`` features.
    class_weights: ``(C, D)`` identity class weights.
    labels: ``(N,)`` int identity class of each row.
    valid: ``(N,)`` bool, rows that count.
    scale: scalar array, positive logit scale ``s``.
    margin: additive margin ``m`` subtracted from the true-class cosine.

  Returns:
    Scalar mean over valid rows of the cross-entropy of
    ``logits = s * (cos(f, w_c) - m * onehot(label))``; 0.0 with no valid row.
  """
  f = _l2_normalize(_rows_where(valid, embeddings.astype(jnp.float32)))
  w = _l2_normalize(class_weights.astype(jnp.float32))
  cos = jnp.matmul(f, w.T, precision=_HIGHEST)
  onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), w.shape[0], dtype=jnp.float32)
  logits = jnp.asarray(scale, jnp.float32) * (cos - jnp.asarray(margin, jnp.float32) * onehot)
  ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return _masked_mean(ce, valid)


def softmax_cross_entropy(
  embeddings: jax.Array,
  class_weights: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
) -> jax.Array:
  """Softmax cross-entropy of a bias-free linear classifier (AGW's identity loss).

  Args:
    embeddings: ``(N, D)`` features.
    class_weights: ``(C, D)`` classifier weights.
    labels: ``(N,)`` int identity class of each row.
    valid: ``(N,)`` bool, rows that count.

  Returns:
    Scalar mean over valid rows of the cross-entropy of ``logits = f @ W^T``; 0.0 with no
    valid row.
  """
  f = _rows_where(valid, embeddings.astype(jnp.float32))
  logits = jnp.matmul(f, class_weights.astype(jnp.float32).T, precision=_HIGHEST)
  onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), class_weights.shape[0],
                          dtype=jnp.float32)
  ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return _masked_mean(ce, valid)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax of each row of ``logits`` ``(N, N)`` over the entries where ``mask`` is true;
  zeros elsewhere and in rows with no such entry."""
  row_max = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  exp = jnp.where(mask, jnp.exp(jnp.where(mask, logits - row_max, 0.0)), 0.0)
  total = jnp.sum(exp, axis=1, keepdims=True)
  return exp / jnp.where(total > 0, total, 1.0)


# AGW's `softmax_weights` adds this to each normaliser.
_AGW_NORMALISER_EPS = 1e-6


def _agw_softmax_weights(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """AGW's `softmax_weights` over the rows of ``logits`` ``(N, N)``, entries where ``mask``:
  shifted by the row maximum of ``logits * mask`` (so masked-out entries count as 0: for
  negated distances the shift is 0, not the largest kept value), normaliser plus 1e-6, and the
  shift not detached. Zeros where ``mask`` is false."""
  kept = jnp.where(mask, logits, 0.0)
  shifted = jnp.where(mask, kept - jnp.max(kept, axis=1, keepdims=True), 0.0)
  exp = jnp.where(mask, jnp.exp(shifted), 0.0)
  return exp / (jnp.sum(exp, axis=1, keepdims=True) + _AGW_NORMALISER_EPS)


def _softmax_weighted_distances(
  embeddings: jax.Array,
  pids: jax.Array,
  valid: jax.Array,
  alpha: float,
  agw_normaliser: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The weighted positive and negative distances of AGW's and CAJ's triplets.

  Returns ``(d_p, d_n, anchors)``, each ``(N,)``: ``d_p(i) = sum_j softmax_{P_i}(alpha d_ij)
  d_ij`` over the positives (the anchor itself included), ``d_n(i) = sum_k softmax_{N_i}(-alpha
  d_ik) d_ik`` over the negatives, and the valid rows with at least one negative.
  """
  x = _rows_where(valid, embeddings.astype(jnp.float32))
  dist = _pairwise_distances(x)
  both_valid = valid[:, None] & valid[None, :]
  same_pid = pids[:, None] == pids[None, :]
  pos = both_valid & same_pid
  neg = both_valid & ~same_pid
  softmax = _agw_softmax_weights if agw_normaliser else _masked_softmax
  d_p = jnp.sum(softmax(alpha * dist, pos) * dist, axis=1)
  d_n = jnp.sum(softmax(-alpha * dist, neg) * dist, axis=1)
  return d_p, d_n, valid & jnp.any(neg, axis=1)


def weighted_regularized_triplet(
  embeddings: jax.Array,
  pids: jax.Array,
  valid: jax.Array,
  *,
  agw_normaliser: bool = True,
) -> jax.Array:
  """AGW's weighted regularised triplet (WRT) loss, `TripletLoss_WRT` of AGW's code.

  Over the Euclidean distances ``d`` between valid rows (of every modality), for anchor ``i``
  with positives ``P_i`` (same pid, the anchor itself included, as in AGW's code) and negatives
  ``N_i`` (other pids):

    d_p(i) = sum_{j in P_i} softmax_{P_i}(d_ij)_j d_ij     (softmax over the positives)
    d_n(i) = sum_{k in N_i} softmax_{N_i}(-d_ik)_k d_ik    (softmax over the negatives)
    loss   = mean_i log(1 + exp(d_p(i) - d_n(i)))

  so far positives and near negatives weigh most, without choosing one hardest sample. The
  weights are not detached (as in AGW).

  With ``agw_normaliser`` (the default, and AGW's configs) each softmax is AGW's: shifted by the
  row maximum of the masked logits, which for the negatives is 0 rather than the largest
  ``-d_ik``, with 1e-6 added to the normaliser. Once every negative is farther than about 14,
  ``exp(-d)`` falls under 1e-6 and ``d_n`` shrinks towards 0, so at large feature scales the
  loss is far above the exact softmax's (docs/design.md). ``agw_normaliser=False`` is the exact
  softmax, shifted by the largest kept value.

  Args:
    embeddings: ``(N, D)`` features (pre-BNNeck in AGW).
    pids: ``(N,)`` int person ids.
    valid: ``(N,)`` bool, rows that count.
    agw_normaliser: AGW's shift and 1e-6 (True) or the exact softmax (False).

  Returns:
    Scalar mean over valid anchors with at least one negative; 0.0 when there is none.
  """
  d_p, d_n, anchors = _softmax_weighted_distances(embeddings, pids, valid, 1.0, agw_normaliser)
  return _masked_mean(jax.nn.softplus(d_p - d_n), anchors)


# CAJ's `TripletLoss_ADP` clamps the squared difference here (exp(88) is near float32's limit).
_ADP_SQUARE_CLAMP = 88.0


def adaptive_weighted_triplet(
  embeddings: jax.Array,
  pids: jax.Array,
  valid: jax.Array,
  *,
  alpha: float = 1.0,
  gamma: float = 1.0,
  square: bool = True,
) -> jax.Array:
  """CAJ's adaptive weighted triplet, `TripletLoss_ADP` of CAJ's code (its ``--method adp``).

  The weighted distances of `weighted_regularized_triplet` with AGW's softmax weights over
  ``alpha * d`` and ``-alpha * d`` (``alpha`` sharpens the mining), then, per anchor:

    square=True:  x = min(gamma (d_p - d_n)^2, 88),
                  loss = log(1 + exp(x)) if d_p > d_n else log(1 + exp(-x))
    square=False: loss = log(1 + exp(-gamma (d_n - d_p)))

  averaged over the anchors. CAJ's training script runs ``square=True``, ``alpha = gamma = 1``.
  The comparison ``d_p > d_n`` carries no gradient, and none flows where the clamp holds.

  Args:
    embeddings: ``(N, D)`` features (pre-BNNeck, as AGW's).
    pids: ``(N,)`` int person ids.
    valid: ``(N,)`` bool, rows that count.
    alpha: scale of the distances inside the softmax weights.
    gamma: scale of the difference (or of its square).
    square: the squared-difference form (True) or the scaled soft margin (False).

  Returns:
    Scalar mean over valid anchors with at least one negative; 0.0 when there is none.
  """
  d_p, d_n, anchors = _softmax_weighted_distances(embeddings, pids, valid, alpha, True)
  if square:
    squared = gamma * jnp.square(d_p - d_n)
    # torch.clamp_max passes the gradient where the value equals the bound.
    squared = jnp.where(squared > _ADP_SQUARE_CLAMP, _ADP_SQUARE_CLAMP, squared)
    sign = jnp.where(jax.lax.stop_gradient(d_p > d_n), 1.0, -1.0)
    per_anchor = jax.nn.softplus(sign * squared)
  else:
    per_anchor = jax.nn.softplus(gamma * (d_p - d_n))
  return _masked_mean(per_anchor, anchors)


def cross_modal_triplet(
  embeddings: jax.Array,
  pids: jax.Array,
  modalities: jax.Array,
  valid: jax.Array,
  margin: float = 0.3,
  soft_margin: bool = False,
) -> jax.Array:
  """Batch-hard triplet loss whose positives and negatives come from other modalities.

  For each valid anchor ``i`` the hardest positive is the farthest valid row with the
  same pid and a different modality, the hardest negative the nearest valid row with a
  different pid and a different modality.

  Args:
    embeddings: ``(N, D)`` features.
    pids: ``(N,)`` int person ids.
    modalities: ``(N,)`` int modality index of each row.
    valid: ``(N,)`` bool, rows that count.
    margin: hinge margin (ignored when ``soft_margin``).
    soft_margin: use ``softplus(d_ap - d_an)`` instead of ``relu(d_ap - d_an + margin)``.

  Returns:
    Scalar mean over anchors having at least one such positive and one such negative;
    0.0 when there is none.
  """
  x = _rows_where(valid, embeddings.astype(jnp.float32))
  dist = _pairwise_distances(x)
  both_valid = valid[:, None] & valid[None, :]
  cross = both_valid & (modalities[:, None] != modalities[None, :])
  same_pid = pids[:, None] == pids[None, :]
  pos = cross & same_pid
  neg = cross & ~same_pid
  has_pos = jnp.any(pos, axis=1)
  has_neg = jnp.any(neg, axis=1)
  d_ap = jnp.max(jnp.where(pos, dist, 0.0), axis=1)
  d_an = jnp.min(jnp.where(neg, dist, jnp.finfo(jnp.float32).max), axis=1)
  gap = d_ap - d_an
  if soft_margin:
    per_anchor = jax.nn.softplus(gap)
  else:
    per_anchor = jax.nn.relu(gap + jnp.asarray(margin, jnp.float32))
  return _masked_mean(per_anchor, valid & has_pos & has_neg)


def center_alignment(
  embeddings: jax.Array,
  pids: jax.Array,
  modalities: jax.Array,
  valid: jax.Array,
  num_modalities: int,
) -> jax.Array:
  """Squared distance between per-(pid, modality) batch centres of the same pid.

  ``c_{p,m}`` is the mean of the valid rows with pid ``p`` and modality ``m``. Each pid
  is represented by its first valid row, which keeps every shape static.

  Args:
    embeddings: ``(N, D)`` features.
    pids: ``(N,)`` int person ids.
    modalities: ``(N,)`` int modality index in ``[0, num_modalities)``.
    valid: ``(N,)`` bool, rows that count.
    num_modalities: ``M``, number of modalities (static).

  Returns:
    Scalar mean of ``||c_{p,m} - c_{p,n}||^2`` over pids ``p`` and modality pairs
    ``m < n`` with both centres defined; 0.0 when there is no such pair.
  """
  x = _rows_where(valid, embeddings.astype(jnp.float32))
  n = x.shape[0]
  same = valid[:, None] & valid[None, :] & (pids[:, None] == pids[None, :])
  earlier = jnp.tril(jnp.ones((n, n), dtype=bool), k=-1)
  is_first = valid & ~jnp.any(same & earlier, axis=1)
  mod_onehot = _rows_where(valid, jax.nn.one_hot(modalities, num_modalities, dtype=jnp.float32))
  weights = same.astype(jnp.float32)[:, None, :] * mod_onehot.T[None, :, :]
  counts = jnp.sum(weights, axis=-1)
  sums = jnp.einsum("imj,jd->imd", weights, x, precision=_HIGHEST)
  centres = sums / jnp.maximum(counts, 1.0)[..., None]
  defined = counts > 0
  pairs = list(itertools.combinations(range(num_modalities), 2))
  if not pairs:
    return jnp.zeros((), jnp.float32)
  first = jnp.array([a for a, _ in pairs])
  second = jnp.array([b for _, b in pairs])
  diff = centres[:, first, :] - centres[:, second, :]
  sq = jnp.sum(diff * diff, axis=-1)
  pair_ok = is_first[:, None] & defined[:, first] & defined[:, second]
  return _masked_mean(sq.reshape(-1), pair_ok.reshape(-1))


def modality_classification_loss(
  logits: jax.Array,
  modalities: jax.Array,
  valid: jax.Array,
) -> jax.Array:
  """Discriminator objective: softmax cross-entropy of the true modality.

  Args:
    logits: ``(N, M)`` discriminator logits.
    modalities: ``(N,)`` int true modality of each row.
    valid: ``(N,)`` bool, rows that count.

  Returns:
    Scalar mean over valid rows; 0.0 with no valid row.
  """
  z = _rows_where(valid, logits.astype(jnp.float32))
  onehot = jax.nn.one_hot(jnp.where(valid, modalities, 0), z.shape[-1], dtype=jnp.float32)
  ce = -jnp.sum(onehot * jax.nn.log_softmax(z, axis=-1), axis=-1)
  return _masked_mean(ce, valid)


def modality_confusion_loss(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Generator's adversarial objective: cross-entropy against the uniform distribution.

  Args:
    logits: ``(N, M)`` discriminator logits.
    valid: ``(N,)`` bool, rows that count.

  Returns:
    Scalar mean over valid rows of ``-(1/M) * sum_m log_softmax(logits)_m``; its minimum,
    reached by a uniform prediction, is ``log M``. 0.0 with no valid row.
  """
  z = _rows_where(valid, logits.astype(jnp.float32))
  ce = -jnp.mean(jax.nn.log_softmax(z, axis=-1), axis=-1)
  return _masked_mean(ce, valid)


def masked_reconstruction_loss(
  reconstruction: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  valid: jax.Array,
) -> jax.Array:
  """Mean squared error over the masked positions of valid rows.

  Args:
    reconstruction: ``(N, h, w, C)`` predicted values.
    target: ``(N, h, w, C)`` values to recover (not stop-gradiented here).
    mask: ``(N, h, w)`` bool or float, 1 where the position was masked (a fractional
    value weights the position).
    valid: ``(N,)`` bool, rows that count.

  Returns:
    Scalar ``sum (r - t)^2 / (number of masked positions * C)`` over valid rows;
    0.0 when no valid row has a masked position.
  """
  m = _rows_where(valid, mask.astype(jnp.float32))
  keep = (m != 0.0)[..., None]
  r = jnp.where(keep, reconstruction.astype(jnp.float32), 0.0)
  t = jnp.where(keep, target.astype(jnp.float32), 0.0)
  err = jnp.sum(jnp.square(r - t) * m[..., None])
  denom = jnp.sum(m) * jnp.float32(reconstruction.shape[-1])
  return jnp.where(denom > 0, err / jnp.where(denom > 0, denom, 1.0), 0.0)
