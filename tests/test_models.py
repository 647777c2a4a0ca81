"""Tests for mmreid_jax.models against plain NumPy references (DESIGN.md section 3).

Shapes are tiny (ResNet-18, width 8, 32 x 16 images) so the whole file runs in well under a
minute on two CPU cores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmreid_jax.models.attention import CrossModalAttention
from mmreid_jax.models.fusion import MultimodalFusion
from mmreid_jax.models.cpu_forms import DotConv, PhaseGradConv, ShiftGradConv, resolve_kernels
from mmreid_jax.models.layers import MaskedBatchNorm, horizontal_stripes
from mmreid_jax.models.reid import IMAGENET_MEAN, IMAGENET_STD, MultimodalReID
from mmreid_jax.models.resnet import ResNet

EPS = 1e-5
RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------- helpers and NumPy references


def _randomise(tree: Any, rng: np.random.Generator, scale: float = 0.3) -> Any:
  """Replaces every leaf of a parameter tree by seeded normal noise of the same shape."""
  return jax.tree.map(lambda leaf: jnp.asarray(
      scale * rng.standard_normal(leaf.shape), leaf.dtype), tree)


def _random_stats(batch_stats: dict, rng: np.random.Generator) -> dict:
  """Running statistics near (0, 1) but not equal to them, so eval mode normalises for real."""
  def leaf(path: tuple, a: Any) -> jax.Array:
    values = (0.1 * rng.standard_normal(a.shape) if path[-1].key == "mean"
              else rng.uniform(0.8, 1.2, a.shape))
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, batch_stats)


def numpy_init(model: nn.Module, rng: np.random.Generator, *args: Any, **kwargs: Any) -> dict:
  """Variables of `model` drawn with NumPy (He-normal kernels, BN near identity).

  `model.init` runs the shapes only (`jax.eval_shape`): compiling Flax's initialisers costs far
  more on a CPU than the tests themselves.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))

  def leaf(path: tuple, a: Any) -> jax.Array:
    name = path[-1].key
    if name == "kernel":
      values = rng.standard_normal(a.shape) * np.sqrt(2.0 / np.prod(a.shape[:-1]))
    elif name == "scale":
      values = 1.0 + 0.1 * rng.standard_normal(a.shape)
    elif name in ("corr_left", "corr_right"):
      values = rng.standard_normal(a.shape) / np.sqrt(a.shape[1])
    else:
      values = 0.1 * rng.standard_normal(a.shape)
    return jnp.asarray(values, a.dtype)

  variables = {"params": jax.tree_util.tree_map_with_path(leaf, shapes["params"])}
  if "batch_stats" in shapes:
    variables["batch_stats"] = _random_stats(shapes["batch_stats"], rng)
  return variables


def scaled_last_norms(params: dict, depth: int, factor: float) -> dict:
  """ResNet `params` with each residual block's last BatchNorm scale multiplied by `factor`."""
  last_norm = "bn3" if depth >= 50 else "bn2"
  return {name: ({**block, last_norm: {**block[last_norm],
                                       "scale": factor * block[last_norm]["scale"]}}
                 if name.startswith("layer") else block)
          for name, block in params.items()}


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(x - np.max(x))
  return z / z.sum()


def ref_stripes(x: np.ndarray, num_stripes: int) -> np.ndarray:
  """(h, w, C) -> (P, C) with PyTorch adaptive-avg-pool bins, written as loops."""
  h = x.shape[0]
  out = np.zeros((num_stripes, x.shape[-1]))
  for i in range(num_stripes):
    start = int(np.floor(i * h / num_stripes))
    end = int(np.ceil((i + 1) * h / num_stripes))
    total = np.zeros(x.shape[-1])
    count = 0
    for row in range(start, end):
      for col in range(x.shape[1]):
        total += x[row, col]
        count += 1
    out[i] = total / count
  return out


def ref_attention(params: dict, features: np.ndarray, present: np.ndarray,
                  modalities: tuple[int, ...], attention_dim: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """DESIGN.md's cross-modal attention, one sample and slot at a time."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, slots = present.shape
  out = np.zeros(features.shape)
  weights = np.zeros((batch, slots))
  for b in range(batch):
    idx = [s for s in range(slots) if present[b, s]]
    if not idx:
      continue
    pooled = features[b].mean(axis=(1, 2))  # (S, C)
    query = pooled @ p["query"]["kernel"]
    key = pooled @ p["key"]["kernel"]
    summed = np.array([sum((query[m] @ key[n] / np.sqrt(attention_dim)
                            for n in idx if n != m), 0.0) for m in idx])
    w = _softmax(summed)
    for j, m in enumerate(idx):
      fc1 = p[f"channel_fc1_{modalities[m]}"]
      fc2 = p[f"channel_fc2_{modalities[m]}"]
      hidden = np.maximum(pooled[m] @ fc1["kernel"] + fc1["bias"], 0.0)
      channel = _sigmoid(hidden @ fc2["kernel"] + fc2["bias"])
      others = np.zeros(features.shape[2:])
      for n in idx:
        if n != m:
          others += features[b, n]
      out[b, m] = channel * features[b, m] + w[j] * others
      weights[b, m] = w[j]
  return out, weights


def ref_correlation(params: dict, features: np.ndarray, present: np.ndarray,
                    modalities: tuple[int, ...], num_stripes: int) -> np.ndarray:
  """Branch 2 of the fusion: (B, S, h, w, C) -> (B, P * part_dim), loops over stripes and pairs."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  batch, slots = present.shape
  part_dim = p["corr_bias"].shape[-1]
  out = np.zeros((batch, num_stripes, part_dim))
  for b in range(batch):
    stripes = [ref_stripes(features[b, s], num_stripes) for s in range(slots)]
    pairs = [(m, n) for m in range(slots) for n in range(slots) if present[b, m] and present[b, n]]
    for i in range(num_stripes):
      logits = np.array([p["corr_pair_logits"][i, modalities[m], modalities[n]] for m, n in pairs])
      w = _softmax(logits)
      for (m, n), weight in zip(pairs, w):
        linear = (stripes[m][i] @ p["corr_left"][i] + stripes[n][i] @ p["corr_right"][i]
                  + p["corr_bias"][i])
        out[b, i] += weight * linear
  return out.reshape(batch, -1)


# ---------------------------------------------------------------- MaskedBatchNorm


def _bn_case(rng: np.random.Generator, mask: np.ndarray
             ) -> tuple[MaskedBatchNorm, np.ndarray, dict]:
  """Input (with garbage in absent samples) and randomised variables of a MaskedBatchNorm."""
  x = rng.standard_normal((6, 3, 2, 4)).astype(np.float32) * 2.0 + 1.0
  x[~mask] = 500.0 + 1000.0 * rng.random(x[~mask].shape)
  module = MaskedBatchNorm()
  variables = numpy_init(module, rng, x, use_running_average=False, mask=mask)
  return module, x, variables


def test_masked_batchnorm_train_counts_present_samples_only():
  """Normalisation and the running-stat update use the present samples, biased variance."""
  rng = np.random.default_rng(0)
  mask = np.array([True, False, True, True, False, True])
  module, x, variables = _bn_case(rng, mask)
  y, updates = module.apply(variables, x, False, mask, mutable=["batch_stats"])
  present = x[mask].astype(np.float64)
  mean = present.mean(axis=(0, 1, 2))
  var = ((present - mean) ** 2).mean(axis=(0, 1, 2))
  scale = np.asarray(variables["params"]["scale"])
  bias = np.asarray(variables["params"]["bias"])
  expected = (x - mean) / np.sqrt(var + EPS) * scale + bias
  np.testing.assert_allclose(np.asarray(y)[mask], expected[mask], rtol=RTOL, atol=1e-4)
  old_mean = np.asarray(variables["batch_stats"]["mean"])
  old_var = np.asarray(variables["batch_stats"]["var"])
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * old_mean + 0.1 * mean,
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * old_var + 0.1 * var,
                             rtol=RTOL, atol=ATOL)


def test_masked_batchnorm_without_mask_is_plain_batchnorm():
  """mask=None counts every sample."""
  rng = np.random.default_rng(0)
  module, x, variables = _bn_case(rng, np.ones(6, bool))
  y, _ = module.apply(variables, x, False, None, mutable=["batch_stats"])
  mean = x.astype(np.float64).mean(axis=(0, 1, 2))
  var = x.astype(np.float64).var(axis=(0, 1, 2))
  expected = ((x - mean) / np.sqrt(var + EPS) * np.asarray(variables["params"]["scale"])
              + np.asarray(variables["params"]["bias"]))
  np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-4)


def test_masked_batchnorm_no_sample_present_keeps_running_stats():
  rng = np.random.default_rng(0)
  mask = np.zeros(6, bool)
  module, x, variables = _bn_case(rng, mask)
  _, updates = module.apply(variables, x, False, mask, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], variables["batch_stats"]["mean"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], variables["batch_stats"]["var"])


@pytest.mark.parametrize("mask", [[True, False, True, True, False, True], [True] * 6, [False] * 6])
def test_masked_batchnorm_gradients_match_differentiated_statistics(mask):
  """The closed-form backward against autodiff of BatchNorm written plainly (float64 NumPy-style
  jnp, statistics over the present samples), for input, scale and bias, absent samples included
  (their outputs still depend on the statistics)."""
  rng = np.random.default_rng(5)
  mask = np.array(mask)
  module, x, variables = _bn_case(rng, mask)
  x[~mask] = rng.standard_normal(x[~mask].shape) * 3.0  # finite gradients in float32 too
  probe = rng.standard_normal(x.shape)

  def reference(x, scale, bias):
    weight = mask.reshape(-1, 1, 1, 1).astype(np.float64)
    count = max(weight.sum() * x.shape[1] * x.shape[2], 1.0)
    mean = jnp.sum(x * weight, axis=(0, 1, 2)) / count
    var = jnp.sum(weight * (x - mean) ** 2, axis=(0, 1, 2)) / count
    return jnp.sum(((x - mean) / jnp.sqrt(var + EPS) * scale + bias) * probe)

  def loss(x, params):
    y, _ = module.apply({**variables, "params": params}, x, False, mask, mutable=["batch_stats"])
    return jnp.sum(y * probe)

  params = variables["params"]
  with jax.enable_x64(True):
    expected = jax.grad(reference, argnums=(0, 1, 2))(
        np.float64(x), np.float64(params["scale"]), np.float64(params["bias"]))
  grad_x, grad_params = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), params)
  assert np.abs(expected[0]).max() > 1e-2
  np.testing.assert_allclose(grad_x, expected[0], rtol=1e-4, atol=1e-4 * np.abs(expected[0]).max())
  np.testing.assert_allclose(grad_params["scale"], expected[1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_params["bias"], expected[2], rtol=1e-4, atol=1e-4)


def test_masked_batchnorm_eval_uses_running_stats():
  rng = np.random.default_rng(0)
  mask = np.array([True, False, True, True, False, True])
  module, x, variables = _bn_case(rng, mask)
  y = module.apply(variables, x, True, mask)
  mean = np.asarray(variables["batch_stats"]["mean"])
  var = np.asarray(variables["batch_stats"]["var"])
  expected = ((x - mean) / np.sqrt(var + EPS) * np.asarray(variables["params"]["scale"])
              + np.asarray(variables["params"]["bias"]))
  np.testing.assert_allclose(y, expected, rtol=RTOL, atol=1e-3)


# ---------------------------------------------------------------- horizontal stripes


@pytest.mark.parametrize("height", [18, 4])
def test_horizontal_stripes_match_adaptive_pool_bins(height: int):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, height, 3, 5)).astype(np.float32)
  out = np.asarray(horizontal_stripes(jnp.asarray(x), 6))
  assert out.shape == (2, 6, 5)
  for b in range(2):
    np.testing.assert_allclose(out[b], ref_stripes(x[b], 6), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- cross-modal attention

ATT_DIM = 8
ATT_CHANNELS = 32


def _attention_params(rng: np.random.Generator) -> dict:
  """Randomised parameters of a CrossModalAttention initialised with all three modalities."""
  module = CrossModalAttention(reduction=16, attention_dim=ATT_DIM)
  features = jnp.zeros((1, 3, 4, 2, ATT_CHANNELS))
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), features, jnp.ones((1, 3), bool),
                                              (0, 1, 2)))
  return _randomise(shapes["params"], rng)


@pytest.mark.parametrize("modalities", [(0, 1, 2), (2, 0, 1)])
def test_cross_modal_attention_matches_numpy(modalities: tuple[int, ...]):
  """All-present, two-present, one-present and none-present samples; absent slots hold garbage."""
  rng = np.random.default_rng(0)
  params = _attention_params(rng)
  present = np.array([[True, True, True], [True, False, True], [False, True, False],
                      [True, True, False], [False, False, False]])
  features = rng.standard_normal((5, 3, 4, 2, ATT_CHANNELS)).astype(np.float32)
  features[~present] = 100.0 * rng.standard_normal(features[~present].shape)
  module = CrossModalAttention(reduction=16, attention_dim=ATT_DIM)
  out, weights = module.apply({"params": params}, features, present, modalities)
  ref_out, ref_weights = ref_attention(params, features.astype(np.float64), present, modalities,
                                       ATT_DIM)
  np.testing.assert_allclose(weights, ref_weights, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.sum(weights, axis=1), [1, 1, 1, 1, 0], atol=1e-6)
  # One modality present: weight 1 and F' = A_c * F (no other modality to add).
  assert float(weights[2, 1]) == pytest.approx(1.0)
  assert np.all(np.asarray(out)[~present] == 0.0)


def test_cross_modal_attention_single_slot_uses_its_modality_params():
  """A lone slot holding modality 2 uses channel_fc*_2, with modal weight 1."""
  rng = np.random.default_rng(0)
  params = _attention_params(rng)
  features = rng.standard_normal((3, 1, 4, 2, ATT_CHANNELS)).astype(np.float32)
  present = np.ones((3, 1), bool)
  module = CrossModalAttention(reduction=16, attention_dim=ATT_DIM)
  out, weights = module.apply({"params": params}, features, present, (2,))
  ref_out, _ = ref_attention(params, features.astype(np.float64), present, (2,), ATT_DIM)
  np.testing.assert_allclose(weights, np.ones((3, 1)), atol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  # Modality 0's parameters would give another answer: the test can tell them apart.
  wrong, _ = ref_attention(params, features.astype(np.float64), present, (0,), ATT_DIM)
  assert not np.allclose(ref_out, wrong, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- fusion

EMBED, STRIPES, PART = 5, 6, 4


def _fusion_case(rng: np.random.Generator, shape: tuple[int, ...]
                 ) -> tuple[MultimodalFusion, dict]:
  """A MultimodalFusion with randomised parameters for features of `shape` (B, S, h, w, C)."""
  module = MultimodalFusion(num_modalities=3, embed_dim=EMBED, num_stripes=STRIPES,
                            part_dim=PART)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape),
                                              jnp.ones(shape[:2], bool), (0, 1, 2), False))
  return module, _randomise(shapes["params"], rng, scale=0.5)


def test_fusion_eval_correlation_and_intra_branch_match_numpy():
  rng = np.random.default_rng(0)
  shape = (5, 3, 9, 3, 8)
  module, params = _fusion_case(rng, shape)
  present = np.array([[True, True, True], [True, False, True], [False, True, False],
                      [False, True, True], [True, True, False]])
  features = rng.standard_normal(shape).astype(np.float32)
  features[~present] = 50.0 * rng.standard_normal(features[~present].shape)
  modalities = (1, 2, 0)
  out = module.apply({"params": params}, features, present, modalities, False)
  embedding = np.asarray(out["embedding"])
  assert embedding.shape == (5, 3, 2 * EMBED + STRIPES * PART)
  assert not np.any(np.asarray(out["reconstruction_mask"]))
  scales = np.asarray(params["branch_scale"])
  corr = ref_correlation(params, features.astype(np.float64), present, modalities, STRIPES)
  intra_kernel = np.asarray(params["intra_projection"]["kernel"])
  intra_bias = np.asarray(params["intra_projection"]["bias"])
  for b in range(5):
    for s in range(3):
      if not present[b, s]:
        continue
      np.testing.assert_allclose(embedding[b, s, EMBED:EMBED + STRIPES * PART],
                                 scales[1] * corr[b], rtol=RTOL, atol=1e-4)
      pooled = features[b, s].mean(axis=(0, 1)) + features[b, s].max(axis=(0, 1))
      np.testing.assert_allclose(embedding[b, s, :EMBED],
                                 scales[0] * (pooled @ intra_kernel + intra_bias),
                                 rtol=RTOL, atol=1e-4)


def test_fusion_train_mask_fraction_and_rng():
  """Branch-3 mask: per-sample fraction roughly U[0.1, 0.3], driven by the "mask" stream."""
  rng = np.random.default_rng(0)
  shape = (6, 3, 48, 48, 2)
  module, params = _fusion_case(rng, shape)
  features = rng.standard_normal(shape).astype(np.float32)
  present = np.ones(shape[:2], bool)
  apply = jax.jit(lambda key: module.apply({"params": params}, features, present, (0, 1, 2),
                                           True, rngs={"mask": key})["reconstruction_mask"])
  mask_a = np.asarray(apply(jax.random.key(1)))
  mask_b = np.asarray(apply(jax.random.key(2)))
  assert mask_a.shape == shape[:4] and mask_a.dtype == bool
  fractions = mask_a.mean(axis=(1, 2, 3))
  assert np.all(fractions > 0.08) and np.all(fractions < 0.32), fractions
  # p ~ U[0.1, 0.3] per sample: six draws spread far more than the binomial noise (~0.005).
  assert np.ptp(fractions) > 0.04, fractions
  assert np.mean(mask_a != mask_b) > 0.05
  np.testing.assert_array_equal(mask_a, np.asarray(apply(jax.random.key(1))))


# ---------------------------------------------------------------- ResNet


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("last_stride,spatial", [(1, (4, 2)), (2, (2, 1))])
def test_resnet_output_shape(depth: int, last_stride: int, spatial: tuple[int, int]):
  model = ResNet(depth=depth, width=8, last_stride=last_stride)
  x = jnp.zeros((1, 64, 32, 3))
  out, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x))
  channels = 8 * 32 if depth in (50, 101) else 8 * 8
  assert out.shape == (1, *spatial, channels)


def _split_variables(variables: dict, last: int) -> tuple[dict, dict]:
  """Splits a full ResNet's variables into those of stages 0..last and last+1..4."""
  def stage_of(name: str) -> int:
    return int(name[len("layer")]) if name.startswith("layer") else 0

  first, second = {}, {}
  for collection, tree in variables.items():
    first[collection] = {k: v for k, v in tree.items() if stage_of(k) <= last}
    second[collection] = {k: v for k, v in tree.items() if stage_of(k) > last}
  return first, second


@functools.cache
def _resnet_run(model: ResNet, train: bool) -> Callable:
  """Jitted (variables, x) -> (output, updated batch_stats or None), one per (model, train)."""
  def run(variables: dict, x: jax.Array) -> tuple[jax.Array, dict | None]:
    if train:
      out, updates = model.apply(variables, x, True, mutable=["batch_stats"])
      return out, updates["batch_stats"]
    return model.apply(variables, x, False), None

  return jax.jit(run)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("train", [False, True])
def test_resnet_split_equals_full(k: int, train: bool):
  """ResNet(0, k) then ResNet(k + 1, 4) with the full network's sub-trees = the full network."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 64, 32, 3)), jnp.float32)
  full = ResNet(depth=18, width=8)
  variables = numpy_init(full, rng, x)
  first_vars, second_vars = _split_variables(variables, k)
  assert first_vars["params"] and second_vars["params"]
  head = ResNet(depth=18, width=8, first_stage=0, last_stage=k)
  tail = ResNet(depth=18, width=8, first_stage=k + 1, last_stage=4)
  expected, full_stats = _resnet_run(full, train)(variables, x)
  middle, head_stats = _resnet_run(head, train)(first_vars, x)
  split, tail_stats = _resnet_run(tail, train)(second_vars, middle)
  assert np.std(np.asarray(expected)) > 1e-3
  np.testing.assert_allclose(split, expected, rtol=1e-5, atol=1e-5)
  if train:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 full_stats, {**head_stats, **tail_stats})


def _numpy_conv(x: np.ndarray, w: np.ndarray, strides: int, padding, probe_seed: int = 0):
  """A convolution (cross-correlation, zero padding) of x (B, H, W, C_in) with w (kh, kw, C_in,
  C_out) written out in NumPy, and the gradients of sum(out * probe) for a seeded probe: the
  kernel's is each window times the probe at its output position; the input's spreads the
  probe back through the kernel. Returns (out, probe, grad_x, grad_w)."""
  padded = np.pad(x, ((0, 0), *padding, (0, 0)))
  kh, kw = w.shape[:2]
  height = (padded.shape[1] - kh) // strides + 1
  width = (padded.shape[2] - kw) // strides + 1
  out = np.zeros((x.shape[0], height, width, w.shape[3]))
  probe = np.random.default_rng(probe_seed).standard_normal(out.shape).astype(np.float32)
  grad_w = np.zeros(w.shape)
  grad_padded = np.zeros(padded.shape)
  for i in range(height):
    for j in range(width):
      rows, cols = slice(i * strides, i * strides + kh), slice(j * strides, j * strides + kw)
      out[:, i, j] = np.einsum("bhwc,hwcd->bd", padded[:, rows, cols, :], w)
      grad_w += np.einsum("bhwc,bd->hwcd", padded[:, rows, cols, :], probe[:, i, j])
      grad_padded[:, rows, cols, :] += np.einsum("bd,hwcd->bhwc", probe[:, i, j], w)
  (top, _), (left, _) = padding
  grad_x = grad_padded[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return out, probe, grad_x, grad_w


def _check_conv_module(module: nn.Module, x: np.ndarray, w: np.ndarray, strides: int, padding):
  expected, probe, expected_gx, expected_gw = _numpy_conv(x, w, strides, padding)
  out = module.apply({"params": {"kernel": w}}, x)
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  grad_x, grad_w = jax.grad(
      lambda x, w: jnp.sum(module.apply({"params": {"kernel": w}}, x) * probe),
      argnums=(0, 1))(x, w)
  np.testing.assert_allclose(grad_w, expected_gw, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grad_x, expected_gx, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel, strides, padding", [
    ((1, 1), 1, ((0, 0), (0, 0))), ((1, 1), 2, ((0, 0), (0, 0))),
    ((3, 3), 1, ((1, 1), (1, 1))), ((3, 3), 2, ((1, 1), (1, 1))), ((7, 7), 2, ((3, 3), (3, 3)))])
def test_dot_conv_matches_numpy_convolution(kernel, strides, padding):
  """DotConv (forward, input and weight gradients) against the convolution written out."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 9, 7, 5)).astype(np.float32)
  w = rng.standard_normal((*kernel, 5, 4)).astype(np.float32)
  _check_conv_module(DotConv(4, kernel, strides, padding), x, w, strides, padding)


@pytest.mark.parametrize("height, width", [(8, 6), (10, 4), (9, 6), (8, 7)])
def test_phase_grad_conv_matches_numpy_convolution(height: int, width: int):
  """PhaseGradConv against the convolution written out: the four-phase input gradient for even
  sizes, XLA's own for odd ones."""
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, height, width, 5)).astype(np.float32)
  w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
  _check_conv_module(PhaseGradConv(4), x, w, 2, ((1, 1), (1, 1)))


@pytest.mark.parametrize("height, width", [(6, 5), (1, 3)])
def test_shift_grad_conv_matches_numpy_convolution(height: int, width: int):
  """ShiftGradConv against the convolution written out: the kernel gradient as one matmul of
  shifted copies (a single row too, where every tap but the middle row reads padding)."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((3, height, width, 5)).astype(np.float32)
  w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
  _check_conv_module(ShiftGradConv(4), x, w, 1, ((1, 1), (1, 1)))


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_cpu_forms_equal_xla_convolutions(depth: int):
  """kernels="cpu" (cpu_forms: the 1 x 1 convolutions as matmuls, the stride-2 input gradients
  as four phases, the stride-1 kernel gradients as one matmul) has the same parameters as XLA's
  convolutions and computes the same network (forward and gradients), training mode, with
  downsampling blocks; "auto" is "cpu" on a CPU backend only; an unknown name is an error."""
  rng = np.random.default_rng(4)
  # Enough values per channel in stage 4's batch statistics (4 x 4 x 2) that BatchNorm does not
  # blow rounding differences up.
  x = jnp.asarray(rng.standard_normal((4, 64, 32, 3)), jnp.float32)
  conv, cpu = ResNet(depth=depth, width=8), ResNet(depth=depth, width=8, kernels="cpu")
  variables = numpy_init(conv, rng, x)
  # Each block's last BatchNorm scaled down (Goyal et al.'s small-init residual). With it near 1,
  # training-mode ResNet-50 at this size is chaotic: parameters changed by 1e-7 relative (float32
  # rounding) move some gradients by 30%, so two correct forms need not agree on another CPU.
  # Scaled by 0.1, the same perturbation moves no gradient entry by more than 4e-6 of its
  # array's largest (docs/performance.md, "CPU forms against XLA").
  variables["params"] = scaled_last_norms(variables["params"], depth, 0.1)
  assert (jax.tree.map(jnp.shape, cpu.init(jax.random.key(0), x))
          == jax.tree.map(jnp.shape, variables))

  def loss(model, params):
    y, _ = model.apply({**variables, "params": params}, x, True, mutable=["batch_stats"])
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))  # a fixed probe of y

  # Rounding of float32 sums in another order: small against each array's scale.
  def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())

  outputs = [m.apply(variables, x, True, mutable=["batch_stats"]) for m in (conv, cpu)]
  assert np.abs(np.asarray(outputs[0][0])).max() > 1e-2
  jax.tree.map(assert_close, outputs[1], outputs[0])
  grads = [jax.grad(functools.partial(loss, m))(variables["params"]) for m in (conv, cpu)]
  jax.tree.map(assert_close, grads[1], grads[0])
  assert resolve_kernels("auto") == ("cpu" if jax.default_backend() == "cpu" else "xla")
  with pytest.raises(ValueError, match=r"kernels='im2col'; expected one of \('xla', 'cpu'"):
    ResNet(depth=18, width=8, kernels="im2col").init(jax.random.key(0), x)


def test_resnet_unsupported_depth():
  with pytest.raises(ValueError, match="20"):
    ResNet(depth=20, width=8).init(jax.random.key(0), jnp.zeros((1, 64, 32, 3)))


# ---------------------------------------------------------------- MultimodalReID

REID_KW = dict(num_classes=7, num_modalities=3, depth=18, width=8, embed_dim=16, num_stripes=6,
               part_dim=4, attention_dim=8)
REID_E = 2 * 16 + 6 * 4
_REID_APPLY: dict = {}


def reid_apply(dtype: Any, train: bool, modalities: tuple[int, ...]) -> Callable:
  """A jitted (variables, images, present, key) -> (outputs, batch_stats or None), cached."""
  cache_key = (jnp.dtype(dtype).name, train, modalities)
  if cache_key not in _REID_APPLY:
    model = MultimodalReID(**REID_KW, dtype=dtype)

    def run(variables: dict, images: np.ndarray, present: np.ndarray,
            key: jax.Array | None) -> tuple[dict, dict | None]:
      if train:
        out, updates = model.apply(variables, images, present, modalities, train=True,
                                   rngs={"mask": key}, mutable=["batch_stats"])
        return out, updates["batch_stats"]
      return model.apply(variables, images, present, modalities), None

    _REID_APPLY[cache_key] = jax.jit(run)
  return _REID_APPLY[cache_key]


@pytest.fixture(scope="module")
def reid_case() -> tuple[dict, np.ndarray, np.ndarray]:
  """Variables of a tiny MultimodalReID and a batch of uint8-range images with absent slots."""
  rng = np.random.default_rng(0)
  model = MultimodalReID(**REID_KW)
  images = rng.integers(0, 256, (4, 3, 32, 16, 3)).astype(np.float32)
  present = np.array([[True, True, True], [True, False, True], [False, True, False],
                      [True, True, False]])
  # Running statistics away from (0, 1), so eval mode is not an identity normalisation.
  variables = numpy_init(model, rng, images, np.ones((4, 3), bool), (0, 1, 2))
  return variables, images, present


def _assert_informative(embeddings: np.ndarray) -> None:
  """Embeddings differ between samples (the network is not saturated to a constant)."""
  assert np.std(embeddings, axis=0).mean() > 1e-2


def test_reid_output_shapes(reid_case):
  variables, images, present = reid_case
  out, stats = reid_apply(jnp.float32, True, (0, 1, 2))(variables, images, present,
                                                         jax.random.key(2))
  assert out["features"].shape == (4, 3, REID_E)
  assert out["embeddings"].shape == (4, 3, REID_E)
  assert out["class_weights"].shape == (7, REID_E)
  assert out["scale"].shape == ()
  assert out["modal_weights"].shape == (4, 3)
  assert out["reconstruction"].shape == (4, 3, 2, 1, 64)
  assert out["reconstruction_mask"].shape == (4, 3, 2, 1)
  assert MultimodalReID(**REID_KW).embedding_dim == REID_E
  np.testing.assert_allclose(np.asarray(out["modal_weights"]).sum(axis=1), 1.0, atol=1e-6)
  assert np.all(np.asarray(out["modal_weights"])[~present] == 0)
  assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
  # BNNeck statistics: momentum update with the present slots' pre-BNNeck features only.
  features = np.asarray(out["features"], np.float64)[present]
  old = variables["batch_stats"]["bnneck"]["bn"]
  np.testing.assert_allclose(stats["bnneck"]["bn"]["mean"],
                             0.9 * np.asarray(old["mean"]) + 0.1 * features.mean(axis=0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bnneck"]["bn"]["var"],
                             0.9 * np.asarray(old["var"]) + 0.1 * features.var(axis=0),
                             rtol=1e-4, atol=1e-5)
  # One-modality evaluation passes a single slot.
  single, _ = reid_apply(jnp.float32, False, (1,))(variables, images[:, :1], np.ones((4, 1), bool),
                                                   None)
  assert single["embeddings"].shape == (4, 1, REID_E)
  _assert_informative(np.asarray(single["embeddings"])[:, 0])


def test_reid_bfloat16_close_to_float32(reid_case):
  """Same float32 parameters, bfloat16 compute: finite and close embeddings."""
  variables, images, present = reid_case
  out32, _ = reid_apply(jnp.float32, False, (0, 1, 2))(variables, images, present, None)
  out16, _ = reid_apply(jnp.bfloat16, False, (0, 1, 2))(variables, images, present, None)
  e32 = np.asarray(out32["embeddings"], np.float64)[present]
  e16 = np.asarray(out16["embeddings"], np.float64)[present]
  _assert_informative(e32)
  assert np.all(np.isfinite(e16))
  cosine = np.sum(e32 * e16, axis=1) / (np.linalg.norm(e32, axis=1) * np.linalg.norm(e16, axis=1))
  assert np.all(cosine > 0.98), cosine
  assert np.linalg.norm(e16 - e32) / np.linalg.norm(e32) < 0.2
  assert not np.array_equal(e16, e32), "bfloat16 should actually compute in lower precision"


@pytest.mark.parametrize("train", [False, True])
def test_reid_absent_slots_do_not_leak(reid_case, train: bool):
  """Garbage in absent slots changes neither present embeddings nor the BN statistics."""
  variables, images, present = reid_case
  rng = np.random.default_rng(1)
  other = images.copy()
  other[~present] = rng.integers(0, 256, other[~present].shape)
  run = reid_apply(jnp.float32, train, (0, 1, 2))
  key = jax.random.key(3) if train else None
  (out_a, stats_a), (out_b, stats_b) = run(variables, images, present, key), run(
      variables, other, present, key)
  _assert_informative(np.asarray(out_a["embeddings"])[present])
  for name in ("features", "embeddings"):
    np.testing.assert_allclose(np.asarray(out_a[name])[present], np.asarray(out_b[name])[present],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_a["modal_weights"], out_b["modal_weights"], atol=1e-6)
  if train:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats_a, stats_b)
    # And changing a present slot does change the statistics: the comparison can fail.
    changed = images.copy()
    changed[0, 0] = 255 - changed[0, 0]
    _, stats_c = run(variables, changed, present, key)
    assert not np.allclose(stats_a["shared"]["layer4_1"]["bn2"]["mean"],
                           stats_c["shared"]["layer4_1"]["bn2"]["mean"], rtol=1e-5, atol=1e-6)


def test_reid_repeated_modality_stem_pools_views_in_one_batch():
  """CAJ's second RGB view (slots (0, 1, 0)): stem_0 runs once on both views stacked on the
  batch axis, so its BatchNorm statistics equal one standalone stem update on the pooled views
  (absent views left out), not two updates in a row."""
  rng = np.random.default_rng(4)
  modalities = (0, 1, 0)
  # CAJ's network is AGW's switches (no cross-modal attention, whose per-modality channel MLPs
  # take one slot per modality).
  model = MultimodalReID(**REID_KW, attention=False, embedding="gem", classifier="linear")
  images = rng.integers(0, 256, (2, 3, 32, 16, 3)).astype(np.float32)
  present = np.array([[True, True, True], [True, False, False]])
  variables = numpy_init(model, rng, images, np.ones((2, 3), bool), (0, 1, 2))
  stats = jax.jit(lambda v, x, p: model.apply(v, x, p, modalities, train=True,
                                              mutable=["batch_stats"])[1]["batch_stats"])(
                                                  variables, images, present)

  stem = ResNet(depth=18, width=8, last_stride=1, first_stage=0, last_stage=0)
  normalised = (images - IMAGENET_MEAN) / IMAGENET_STD

  @jax.jit
  def stem_update(stem_stats: dict, x: np.ndarray, mask: np.ndarray) -> dict:
    """stem_0's batch_stats after one train-mode call on x (N, H, W, 3) with presence (N,)."""
    _, updates = stem.apply({"params": variables["params"]["stem_0"],
                             "batch_stats": stem_stats}, x, True, mask,
                            mutable=["batch_stats"])
    return updates["batch_stats"]

  old = variables["batch_stats"]["stem_0"]
  pooled = stem_update(old, np.concatenate([normalised[:, 0], normalised[:, 2]]),
                       np.concatenate([present[:, 0], present[:, 2]]))
  sequential = stem_update(stem_update(old, normalised[:, 0], present[:, 0]),
                           normalised[:, 2], present[:, 2])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats["stem_0"], pooled)
  # Two calls in a row would give other statistics: the comparison can fail.
  gap = np.abs(np.asarray(sequential["bn1"]["mean"]) - np.asarray(pooled["bn1"]["mean"]))
  assert np.max(gap) > 1e-2, gap
  # stem_1 (one slot) is updated once by its own slot, as before.
  single = jax.jit(lambda s, x, m: stem.apply(
      {"params": variables["params"]["stem_1"], "batch_stats": s}, x, True, m,
      mutable=["batch_stats"])[1]["batch_stats"])(
          variables["batch_stats"]["stem_1"], normalised[:, 1], present[:, 1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats["stem_1"], single)
  jax.tree.map(np.testing.assert_array_equal, stats["stem_2"], variables["batch_stats"]["stem_2"])
