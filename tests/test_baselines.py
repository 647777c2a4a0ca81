"""The baselines (issue 8): AGW and CAJ as configs of the same model code.

Each new loss and module is checked against a plain NumPy loop or a written-out value: the
weighted regularised triplet (its softmax weights over positive and negative distances), GeM's
limit cases (p = 1 is average pooling, large p max pooling), the non-local block (an identity
map at initialisation, and its formula), the linear identity loss, per-group learning rates;
then AGW's network is checked to be the backbone + GeM + BNNeck it claims, its train step to
carry exactly its two loss terms, CAJ's second view to reach the batch, and CAJ (a superset of
AGW) to train and evaluate on the synthetic set exported in SYSU-MM01's layout through the real
`sysu_mm01` builder. Shapes are tiny (ResNet-18 of width 8, 32 x 16 images).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from mmreid_jax import config_lib, losses, optimizers, run, train_step
from mmreid_jax.data import augment, datasets, pipeline
from mmreid_jax.data.sampling import TupleSampler
from mmreid_jax.models import AGW, MODELS, MultimodalReID
from mmreid_jax.models.layers import NonLocal, gem_pool
from mmreid_jax.models.resnet import ResNet

import make_loss_reference  # tests/, on the path as the test's folder
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def load(config_file: str, arg: str | None = None) -> ml_collections.ConfigDict:
  return config_lib.load_config_file(ROOT / "configs" / config_file, arg)


def random_variables(module, rng: np.random.Generator, *args) -> dict:
  """Variables of `module` drawn with NumPy: LeCun-normal kernels, BN scales near 1 (the non-local
  blocks' output BN included, so they do something), running statistics near (0, 1). Only the
  shapes come from `module.init` (`jax.eval_shape`): compiling Flax's initialisers costs more
  on a CPU than the tests."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))

  def leaf(path, a):
    name = path[-1].key
    if name == "kernel":
      values = rng.standard_normal(a.shape) * np.sqrt(1.0 / np.prod(a.shape[:-1]))
    elif name in ("scale", "var"):
      values = rng.uniform(0.8, 1.2, a.shape)
    else:
      values = 0.1 * rng.standard_normal(a.shape)
    return jnp.asarray(values, a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


# ---------------------------------------------------------------- weighted regularised triplet


def ref_wrt(emb: np.ndarray, pids: np.ndarray, valid: np.ndarray,
            agw_normaliser: bool = True) -> float:
  """AGW's TripletLoss_WRT written as loops (float64): softmax weights of the distances over
  each anchor's positives (itself included) and of the negated distances over its negatives,
  then the soft margin log(1 + exp(d_p - d_n)), averaged over anchors. With `agw_normaliser`,
  AGW's `softmax_weights`: the shift is the row maximum with the other entries counted as 0
  (so 0 for the negatives) and each normaliser gets 1e-6; without, the exact softmax."""
  rows = [i for i in range(len(emb)) if valid[i]]
  total, count = 0.0, 0

  def weights(logits: list[float]) -> np.ndarray:
    if agw_normaliser:
      shift = max(logits + [0.0])
      e = np.exp(np.array(logits) - shift)
      return e / (e.sum() + 1e-6)
    e = np.exp(np.array(logits) - max(logits))
    return e / e.sum()

  for i in rows:
    dist = {j: max(float(np.linalg.norm(emb[i] - emb[j])), 1e-6) for j in rows}
    positives = [j for j in rows if pids[j] == pids[i]]
    negatives = [j for j in rows if pids[j] != pids[i]]
    if not negatives:
      continue
    w_pos = weights([dist[j] for j in positives])
    w_neg = weights([-dist[j] for j in negatives])
    d_p = sum(w * dist[j] for w, j in zip(w_pos, positives))
    d_n = sum(w * dist[j] for w, j in zip(w_neg, negatives))
    total += math.log1p(math.exp(d_p - d_n))
    count += 1
  return total / count if count else 0.0


_WRT = jax.jit(jax.value_and_grad(losses.weighted_regularized_triplet),
               static_argnames="agw_normaliser")


def test_wrt_written_out_weights():
  """Three points on a line, 0, 1 and 3, pids (a, a, b): anchor 0's positives are itself (d 0)
  and point 1 (d 1), weighted e^0 : e^1; its one negative is at 3; and so on (the exact
  softmax)."""
  x = np.array([[0.0], [1.0], [3.0]], np.float32)
  value, _ = _WRT(x, np.array([0, 0, 1]), np.ones(3, bool), agw_normaliser=False)
  e = math.e
  d_p = e / (1 + e)  # anchors 0 and 1: sum of w * d over {itself: 0, the other: 1}
  anchor0 = math.log1p(math.exp(d_p - 3.0))
  anchor1 = math.log1p(math.exp(d_p - 2.0))
  anchor2 = math.log1p(math.exp(0.0 - (3 * math.exp(-3) + 2 * math.exp(-2))
                                / (math.exp(-3) + math.exp(-2))))
  assert float(value) == pytest.approx((anchor0 + anchor1 + anchor2) / 3, rel=1e-5)


def test_wrt_agw_normaliser_shrinks_far_negatives():
  """Points at 0, 0.5 and 30, pids (a, a, b): with AGW's normaliser the one negative of anchor
  0 weighs e^-30 / (e^-30 + 1e-6), so its weighted distance is about 2.8e-6, not 30; the exact
  softmax gives it weight 1."""
  x = np.array([[0.0], [0.5], [30.0]], np.float32)
  pids, valid = np.array([0, 0, 1]), np.ones(3, bool)
  agw, _ = _WRT(x, pids, valid, agw_normaliser=True)
  exact, _ = _WRT(x, pids, valid, agw_normaliser=False)
  w_self, w_other = math.exp(1e-6 - 0.5), 1.0  # shifted by the largest positive distance
  d_p = (w_self * 1e-6 + w_other * 0.5) / (w_self + w_other + 1e-6)
  negative = lambda d: d * math.exp(-d) / (math.exp(-d) + 1e-6)  # noqa: E731
  anchor0 = math.log1p(math.exp(d_p - negative(30.0)))
  anchor1 = math.log1p(math.exp(d_p - negative(29.5)))
  anchor2 = math.log1p(math.exp(1e-6 - (30 * math.exp(-30) + 29.5 * math.exp(-29.5))
                                / (math.exp(-30) + math.exp(-29.5) + 1e-6)))
  assert float(agw) == pytest.approx((anchor0 + anchor1 + anchor2) / 3, rel=1e-5)
  assert float(agw) > 0.6 and float(exact) < 1e-9


@pytest.mark.parametrize("agw_normaliser", [True, False])
def test_wrt_matches_numpy_with_invalid_rows(agw_normaliser: bool):
  rng = np.random.default_rng(0)
  emb = (4.0 * rng.standard_normal((12, 5))).astype(np.float32)
  pids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  valid = np.array([True, True, False, True, True, True, True, False, True, True, True, False])
  garbage = emb.copy()
  garbage[~valid] = np.nan  # absent rows must not reach the value or the gradient
  value, grad = _WRT(garbage, pids, valid, agw_normaliser=agw_normaliser)
  reference = functools.partial(ref_wrt, pids=pids, valid=valid, agw_normaliser=agw_normaliser)
  assert float(value) == pytest.approx(reference(emb.astype(np.float64)), rel=1e-5)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.all(grad[~valid] == 0)
  # The gradient flows through the softmax weights too (they are not detached, as in AGW).
  eps = 1e-3
  for i in np.flatnonzero(valid)[:4]:
    for k in range(2):
      plus, minus = emb.astype(np.float64), emb.astype(np.float64)
      plus[i, k] += eps
      minus[i, k] -= eps
      numeric = (reference(plus) - reference(minus)) / (2 * eps)
      assert grad[i, k] == pytest.approx(numeric, rel=2e-2, abs=1e-4)


with np.load(make_loss_reference.REFERENCE_PATH) as _data:
  _AUTHORS = dict(_data)
_AUTHORS_LOSSES = make_loss_reference.LOSSES


@pytest.mark.parametrize("name", sorted(_AUTHORS_LOSSES))
def test_triplets_match_the_authors_code(name: str):
  """AGW's `TripletLoss_WRT` and CAJ's `TripletLoss_ADP` as the authors' code computes them
  (tests/data/agw_caj_loss_reference.npz, made by tests/make_loss_reference.py from their
  loss.py files, in float32): value and gradient at feature scales 0.1 to 8, where AGW's
  normaliser and CAJ's clamp at 88 matter, on the whole batch and on the batch whose dropped
  rows are marked invalid (holding NaN here; their gradient must be exactly 0)."""
  _, cls, kwargs = _AUTHORS_LOSSES[name]
  if cls == "TripletLoss_WRT":
    loss = losses.weighted_regularized_triplet
  else:
    loss = functools.partial(losses.adaptive_weighted_triplet, alpha=float(kwargs["alpha"]),
                             gamma=float(kwargs["gamma"]), square=bool(kwargs["square"]))
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  keep = _AUTHORS["valid"]
  for index, scale in enumerate(_AUTHORS["scales"]):
    x, pids = _AUTHORS[f"embeddings_{index}"], _AUTHORS[f"pids_{index}"]
    garbage = x.copy()
    garbage[~keep] = np.nan
    for suffix, inputs, valid in (("", x, np.ones(len(x), bool)), ("_valid", garbage, keep)):
      value, grad = value_and_grad(inputs, pids, valid)
      grad = np.asarray(grad)
      expected = _AUTHORS[f"{name}{suffix}_value_{index}"]
      expected_grad = _AUTHORS[f"{name}{suffix}_grad_{index}"]
      where = f"{name}{suffix} at scale {scale}"
      assert float(value) == pytest.approx(float(expected), rel=2e-4), where
      np.testing.assert_allclose(grad[valid], expected_grad, rtol=0,
                                 atol=2e-4 * np.abs(expected_grad).max() + 1e-12, err_msg=where)
      assert np.all(grad[~valid] == 0), where


def test_wrt_without_negatives_is_zero():
  value, grad = _WRT(np.ones((3, 2), np.float32), np.zeros(3, np.int32), np.ones(3, bool))
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_softmax_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  emb = rng.standard_normal((6, 4)).astype(np.float32)
  weights = rng.standard_normal((5, 4)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  valid = np.array([True, True, False, True, True, False])
  value = float(jax.jit(losses.softmax_cross_entropy)(emb, weights, labels, valid))
  expected = []
  for i in np.flatnonzero(valid):
    logits = emb[i].astype(np.float64) @ weights.T.astype(np.float64)
    expected.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[labels[i]])
  assert value == pytest.approx(np.mean(expected), rel=1e-5)


# ---------------------------------------------------------------- GeM


def test_gem_p1_is_average_pooling_and_large_p_tends_to_max():
  rng = np.random.default_rng(0)
  x = rng.uniform(0.1, 2.0, (2, 3, 4, 3, 5)).astype(np.float32)  # (B, S, h, w, C)
  np.testing.assert_allclose(gem_pool(x, 1.0), x.mean(axis=(2, 3)), rtol=RTOL, atol=ATOL)
  maximum = x.max(axis=(2, 3))
  previous = np.asarray(gem_pool(x, 1.0))
  for p in (3.0, 10.0, 100.0, 1000.0):
    value = np.asarray(gem_pool(x, p))
    # Between the mean and the max, growing with p: m * (1/N)^(1/p) <= GeM <= m (N positions).
    assert np.all(value >= previous - 1e-5) and np.all(value <= maximum * (1 + 1e-6))
    assert np.all(value >= maximum * 12 ** (-1 / p) * (1 - 1e-6))
    previous = value
  np.testing.assert_allclose(previous, maximum, rtol=3e-3)
  # p = 3 against the formula; and no overflow where x ** p alone would (float32 max ~3e38).
  np.testing.assert_allclose(gem_pool(x, 3.0), np.mean(x.astype(np.float64) ** 3,
                                                       axis=(2, 3)) ** (1 / 3), rtol=1e-5)
  big = np.asarray(gem_pool(x * 1e4, 50.0))
  assert np.all(np.isfinite(big)) and np.all(big <= maximum * 1e4 * (1 + 1e-6))


def test_gem_gradient_matches_the_analytic_one():
  """d/dx_k (mean x^p)^(1/p) = x_k^(p-1) / N * (mean x^p)^(1/p - 1): the stopped maximum used for
  stability leaves the gradient unchanged."""
  rng = np.random.default_rng(1)
  x = rng.uniform(0.2, 1.5, (3, 2, 4)).astype(np.float32)
  grad = np.asarray(jax.grad(lambda v: jnp.sum(gem_pool(v, 3.0)))(x))
  x64 = x.astype(np.float64)
  mean = np.mean(x64 ** 3, axis=(0, 1))
  expected = x64 ** 2 / 6 * mean ** (1 / 3 - 1)
  np.testing.assert_allclose(grad, expected, rtol=1e-5)


# ---------------------------------------------------------------- non-local block


def test_non_local_with_zero_initialised_output_bn_is_the_identity():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 2, 16)).astype(np.float32)
  block = NonLocal()
  variables = block.init(jax.random.key(0), x, False)
  assert variables["params"]["theta"]["kernel"].shape == (1, 1, 16, 8)  # width C / 2
  assert np.all(np.asarray(variables["params"]["w_bn"]["scale"]) == 0)
  assert np.any(np.asarray(variables["params"]["w"]["kernel"]) != 0)
  train_out, _ = block.apply(variables, x, False, mutable=["batch_stats"])
  np.testing.assert_array_equal(train_out, x)
  np.testing.assert_array_equal(block.apply(variables, x, True), x)


def test_non_local_matches_numpy():
  """z = x + BN(W(sum_j <theta_i, phi_j> / N g_j)) with random parameters, eval mode."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)
  block = NonLocal()
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), x, True))
  params = jax.tree.map(lambda a: np.asarray(0.5 * rng.standard_normal(a.shape), np.float32),
                        shapes["params"])
  stats = {"w_bn": {"mean": rng.standard_normal(8).astype(np.float32) * 0.1,
                    "var": rng.uniform(0.5, 1.5, 8).astype(np.float32)}}
  out = np.asarray(block.apply({"params": params, "batch_stats": stats}, x, True))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(2):
    flat = x[b].reshape(6, 8).astype(np.float64)

    def conv(name, v):
      return v @ p[name]["kernel"][0, 0] + p[name]["bias"]

    theta, phi, g = conv("theta", flat), conv("phi", flat), conv("g", flat)
    y = np.zeros((6, 4))
    for i in range(6):
      for j in range(6):
        y[i] += theta[i] @ phi[j] / 6 * g[j]
    w = conv("w", y)
    bn = ((w - stats["w_bn"]["mean"]) / np.sqrt(stats["w_bn"]["var"] + 1e-5)
          * p["w_bn"]["scale"] + p["w_bn"]["bias"])
    np.testing.assert_allclose(out[b].reshape(6, 8), flat + bn, rtol=1e-4, atol=1e-5)


def test_resnet_places_non_local_blocks_after_the_last_blocks_of_a_stage():
  """AGW's (0, 2, 3, 0) on ResNet-50's (3, 4, 6, 3) blocks: after blocks 2, 3 of stage 2 and
  3, 4, 5 of stage 3; at initialisation the network equals the one without them."""
  x = jnp.zeros((1, 64, 32, 3))
  shapes = jax.eval_shape(lambda: ResNet(50, 8, non_local=(0, 2, 3, 0)).init(
      jax.random.key(0), x))
  assert sorted(k for k in shapes["params"] if k.startswith("non_local")) == [
      "non_local2_2", "non_local2_3", "non_local3_3", "non_local3_4", "non_local3_5"]
  with pytest.raises(ValueError, match=r"non_local=\(0, 3, 0, 0\).*\(2, 2, 2, 2\)"):
    ResNet(18, 8, non_local=(0, 3, 0, 0)).init(jax.random.key(0), x)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 64, 32, 3)).astype(np.float32)
  with_nl = ResNet(18, 8, non_local=(0, 1, 2, 0))
  variables = random_variables(with_nl, rng, images)
  assert sorted(k for k in variables["params"] if k.startswith("non_local")) == [
      "non_local2_1", "non_local3_0", "non_local3_1"]
  plain = {c: {k: v for k, v in tree.items() if not k.startswith("non_local")}
           for c, tree in variables.items()}
  expected = np.asarray(ResNet(18, 8).apply(plain, images, False))
  assert not np.allclose(with_nl.apply(variables, images, False), expected, atol=1e-3)
  for name in ("non_local2_1", "non_local3_0", "non_local3_1"):  # AGW's initialisation
    bn = variables["params"][name]["w_bn"]
    bn["scale"], bn["bias"] = jnp.zeros_like(bn["scale"]), jnp.zeros_like(bn["bias"])
  np.testing.assert_allclose(with_nl.apply(variables, images, False), expected, rtol=1e-6,
                             atol=1e-6)


# ---------------------------------------------------------------- AGW network and its step


def test_agw_is_the_backbone_with_gem_bnneck_and_a_linear_classifier():
  """AGW's features are GeM (p = 3) of its two-stream backbone's map; its embeddings their
  BNNeck; no attention, fusion or classifier scale."""
  assert MODELS["agw"] is AGW and issubclass(AGW, MultimodalReID)
  model = AGW(num_classes=5, num_modalities=2, depth=18, width=8, non_local=(0, 1, 1, 0))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 2, 32, 16, 3)).astype(np.float32)
  present = np.ones((3, 2), bool)
  variables = random_variables(model, rng, images, present, (0, 1))
  assert sorted(variables["params"]) == ["bnneck", "classifier", "shared", "stem_0", "stem_1"]
  out = model.apply(variables, images, present, (0, 1))
  assert sorted(out) == ["class_weights", "embeddings", "features", "present"]
  np.testing.assert_array_equal(out["present"], present)
  assert out["features"].shape == (3, 2, 64) and model.embedding_dim == 64
  assert out["class_weights"].shape == (5, 64)
  normalised = (images - np.array([0.485, 0.456, 0.406]) * 255) / (
      np.array([0.229, 0.224, 0.225]) * 255)
  for slot in range(2):
    stem = ResNet(18, 8, 1, 0, 0, non_local=(0, 1, 1, 0)).apply(
        {c: t[f"stem_{slot}"] for c, t in variables.items()}, normalised[:, slot], False)
    maps = ResNet(18, 8, 1, 1, 4, non_local=(0, 1, 1, 0)).apply(
        {c: t["shared"] for c, t in variables.items()}, stem, False)
    pooled = np.mean(np.maximum(np.asarray(maps, np.float64), 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(out["features"][:, slot], pooled, rtol=1e-3, atol=1e-4)
    stats = jax.tree.map(np.asarray, variables["batch_stats"]["bnneck"]["bn"])
    expected = ((pooled - stats["mean"]) / np.sqrt(stats["var"] + 1e-5)
                * np.asarray(variables["params"]["bnneck"]["bn"]["scale"]))
    np.testing.assert_allclose(out["embeddings"][:, slot], expected, rtol=1e-4, atol=1e-5)


def _step_metrics(config: ml_collections.ConfigDict, num_modalities: int = 2,
                  slots: tuple[int, ...] | None = None) -> dict:
  """The metric shapes of one train step of `config` (traced with `jax.eval_shape`, nothing
  compiled)."""
  model, discriminator = train_step.build_model(config, num_classes=6, num_modalities=num_modalities)
  tx, schedule = optimizers.make_optimizer(config.optim, 8, config.num_train_steps)
  disc_tx, disc_schedule = optimizers.make_optimizer(config.disc_optim, 8, config.num_train_steps)
  shape = (config.data.height, config.data.width)
  init = functools.partial(train_step.create_train_state, model=model, discriminator=discriminator,
                           tx=tx, disc_tx=disc_tx, image_shape=shape,
                           num_modalities=num_modalities)
  state = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
  slots = slots or tuple(range(num_modalities))
  batch = {"images": jax.ShapeDtypeStruct((8, len(slots)) + shape + (3,), jnp.uint8),
           "present": jax.ShapeDtypeStruct((8, len(slots)), jnp.bool_),
           "labels": jax.ShapeDtypeStruct((8,), jnp.int32)}
  step = functools.partial(train_step.train_step, model=model, discriminator=discriminator,
                           loss_config=config.loss, schedules=(schedule, disc_schedule),
                           slot_modalities=slots)
  return jax.eval_shape(step, state, batch)[1]


def test_agw_step_has_exactly_its_loss_terms():
  """Weights of 0 remove the paper's terms: AGW's step computes identity CE and WRT only, logs
  no classifier scale or modal weights; a nonzero weight on an output AGW lacks is refused."""
  config = load("agw_sysu_mm01.py", "tiny")
  metrics = _step_metrics(config)
  assert sorted(k for k in metrics if k.startswith("loss/")) == [
      "loss/cross_entropy", "loss/discriminator", "loss/total", "loss/wrt"]
  assert not any(k.startswith(("modal_weight/", "classifier/")) for k in metrics)
  caj = _step_metrics(load("caj_sysu_mm01.py", "tiny"), slots=(0, 1, 0))
  assert sorted(k for k in caj if k.startswith("loss/")) == [
      "loss/adaptive_triplet", "loss/cross_entropy", "loss/discriminator", "loss/total"]
  config.loss.reconstruction = 1.0
  with pytest.raises(ValueError, match=r"config.loss.reconstruction=1.0 needs the model outputs "
                                       r"\['reconstruction'.*AGW does not produce"):
    _step_metrics(config)
  paper = _step_metrics(load("sysu_mm01.py", "tiny"))
  assert {"classifier/scale", "modal_weight/0", "modal_weight/1", "loss/reconstruction",
          "loss/triplet", "loss/center", "loss/consistency"} <= set(paper)


def test_agw_paper_preset_traces_at_full_size():
  """The published recipe's network (ResNet-50 of width 64 at 288 x 144, non-local blocks on the
  36 x 18 and 18 x 9 maps, E = 2048) builds a train step: traced, not compiled."""
  config = load("agw_sysu_mm01.py")
  metrics = _step_metrics(config)
  assert metrics["loss/wrt"].shape == () and metrics["loss/cross_entropy"].shape == ()
  assert train_step.build_model(config, 6, 2)[0].embedding_dim == 2048


def test_lr_multipliers_scale_a_parameter_group():
  """SGD (momentum, Nesterov, weight decay) with the backbone at 0.1: the backbone's update is
  0.1 x the head's for equal parameters and gradients, over several steps (the parameters are
  held fixed so that they stay equal; the momentum carries the steps)."""
  optim = ml_collections.ConfigDict({
      "name": "sgd", "base_learning_rate": 0.1, "scale_by_batch": False, "momentum": 0.9,
      "nesterov": True, "weight_decay": 5e-4, "warmup_steps": 0, "schedule": "constant",
      "lr_multipliers": config_lib.AGW_LR_MULTIPLIERS})
  tx, _ = optimizers.make_optimizer(optim, 32, 10)
  leaf = jnp.arange(6.0).reshape(2, 3)
  params = {"stem_0": {"conv1": {"kernel": leaf}}, "shared": {"layer1_0": {"kernel": leaf}},
            "bnneck": {"bn": {"scale": leaf}}, "classifier": {"weights": leaf}}
  state = tx.init(params)
  for step in range(3):
    grads = jax.tree.map(lambda p: jnp.sin(p + step), params)
    updates, state = tx.update(grads, state, params)
    head = np.asarray(updates["classifier"]["weights"])
    np.testing.assert_allclose(updates["stem_0"]["conv1"]["kernel"], 0.1 * head, rtol=1e-6)
    np.testing.assert_allclose(updates["shared"]["layer1_0"]["kernel"], 0.1 * head, rtol=1e-6)
    np.testing.assert_array_equal(updates["bnneck"]["bn"]["scale"], head)
  key = jax.tree_util.DictKey
  assert optimizers.parameter_path((key("shared"), key("layer1_0"), key("kernel"))) == (
      "shared/layer1_0/kernel")
  optim.lr_multipliers = (("(unclosed", 0.1),)
  with pytest.raises(ValueError, match=r"lr_multipliers entry \('\(unclosed', 0.1\)"):
    optimizers.make_optimizer(optim, 32, 10)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("config_file, arg, name, steps_per_epoch", [
    ("agw_sysu_mm01.py", None, "sysu_mm01", 695),
    ("agw_regdb.py", "paper,4", "regdb/4", 64),
    ("caj_sysu_mm01.py", None, "sysu_mm01", 695),
])
def test_baseline_paper_presets(config_file, arg, name, steps_per_epoch):
  """AGW's published recipe: ResNet-50 at 288 x 144, non-local (0, 2, 3, 0), GeM 3, ID + WRT,
  8 identities x 4 images per modality, SGD 0.1 head / 0.01 backbone, warm-up 10 epochs,
  x 0.1 at epoch 20 and x 0.01 at 50, 81 epochs."""
  config = load(config_file, arg)
  model = train_step.build_model(config, 395, 2)[0]
  assert isinstance(model, AGW) and config.data.name == name
  assert (model.depth, model.width, model.last_stride, model.specific_stages) == (50, 64, 1, 0)
  assert model.non_local == (0, 2, 3, 0) and model.gem_p == 3.0 and not model.attention
  assert (config.data.height, config.data.width) == (288, 144)
  assert (config.data.num_identities, config.data.tuples_per_identity) == (8, 4)
  assert config.data.single_modality_frac == 0.0
  caj = config_file.startswith("caj")
  weights = {k: v for k, v in config.loss.items() if k in (
      "cross_entropy", "wrt", "adaptive_triplet", "triplet", "center", "consistency",
      "reconstruction")}
  assert weights == {"cross_entropy": 1.0, "wrt": 0.0 if caj else 1.0,
                     "adaptive_triplet": 1.0 if caj else 0.0, "triplet": 0.0, "center": 0.0,
                     "consistency": 0.0, "reconstruction": 0.0}
  # AGW's normaliser; CAJ's training script's --alpha 1 --gamma 1 --square 1.
  assert config.loss.wrt_agw_normaliser
  assert (config.loss.adaptive_alpha, config.loss.adaptive_gamma,
          config.loss.adaptive_square) == (1.0, 1.0, True)
  tx, schedule = optimizers.make_optimizer(config.optim, 32, config.num_train_steps)
  assert config.num_train_steps == 81 * steps_per_epoch
  epoch = steps_per_epoch
  rates = [float(schedule(s)) for s in (5 * epoch, 10 * epoch, 20 * epoch - 1, 20 * epoch,
                                        50 * epoch - 1, 50 * epoch, 81 * epoch - 1)]
  np.testing.assert_allclose(rates, [0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-4)
  assert config.optim.lr_multipliers == ((r"^(stem_|shared/)", 0.1),)
  assert config.augment.exchange_view == caj
  assert config.augment.erasing_prob == (0.5 if caj else 0.0)
  assert config.augment.channel_prob == 0.0


def test_baseline_tiny_and_demo_presets_keep_the_shared_budget():
  """The demo and tiny presets keep the paper model's preset's size, optimizer and steps."""
  for preset in ("tiny", "demo"):
    paper = load("sysu_mm01.py", preset)
    for config_file in ("agw_sysu_mm01.py", "caj_sysu_mm01.py"):
      config = load(config_file, preset)
      for key in ("depth", "width"):
        assert config.model[key] == paper.model[key]
      assert ({k: v for k, v in config.optim.items() if k != "lr_multipliers"}
              == dict(paper.optim.items())) and not config.optim.lr_multipliers
      assert config.num_train_steps == paper.num_train_steps
      assert (config.data.height, config.data.width) == (paper.data.height, paper.data.width)


def test_compare_baselines_equal_images_per_step_and_seed_statistics(tmp_path):
  """The side-by-side's budget: K per method for 96 images per step (the paper's demo recipe
  one image per tuple, AGW two, CAJ three; P = 8), a budget no K gives is refused; with three
  seeds the table holds the mean and the ddof-0 standard deviation of the seeds' values."""
  script = load_script("compare_baselines")
  assert {m: script.tuples_per_identity(m, "demo", 96) for m in ("paper", "agw", "caj")} == {
      "paper": 12, "agw": 6, "caj": 4}
  with pytest.raises(SystemExit, match="not a multiple of caj's P x images per tuple = 8 x 3"):
    script.tuples_per_identity("caj", "demo", 64)
  rank1 = {"agw": [0.5, 0.6, 0.7], "caj": [0.8, 0.8, 0.9]}
  for method, values in rank1.items():
    for seed, value in enumerate(values):
      report = {"step": 1500, "protocols": {p: {"rank1": value, "mAP": value / 2, "mINP": 0.1}
                                            for p in script.PROTOCOLS}}
      path = tmp_path / method / f"seed{seed}" / "eval" / "sysu_mm01.json"
      path.parent.mkdir(parents=True)
      path.write_text(json.dumps(report))
  table = script.results_table(tmp_path, ["agw", "caj"], "demo", "demo", 3, 96,
                               {"agw": 6, "caj": 4}, {})
  rows = {line.split(" | ")[0]: line.split(" | ") for line in table.splitlines()}
  agw = rows["| AGW (non-local, GeM, BNNeck, ID + WRT)"]
  assert agw[3:7] == ["6", f"{100 * np.mean(rank1['agw']):.1f} ± "
                      f"{100 * np.std(rank1['agw']):.1f}",
                      f"{50 * np.mean(rank1['agw']):.1f} ± {50 * np.std(rank1['agw']):.1f}",
                      "10.0 ± 0.0"]
  assert "over 3 seeds" in table and "--images-per-step 96" in table


# ---------------------------------------------------------------- CAJ's augmentation


def test_channel_exchange_view_and_erasing_fill():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, (16, 8, 3)), tf.uint8)
  cfg = ml_collections.ConfigDict({"flip": False, "pad": 0, "erasing_prob": 1.0,
                                   "erasing_area": (0.3, 0.3), "erasing_aspect": (1.0, 1.0),
                                   "erasing_fill": config_lib.CAJ_ERASING_FILL,
                                   "channel_prob": 0.0})
  seen = set()
  for seed in range(24):
    seed_t = tf.constant([seed, 1], tf.int64)
    plain = augment.augment(image, seed_t, tf.constant(True), cfg).numpy()
    erased = np.any(plain != image.numpy(), axis=-1)
    assert erased.sum() > 0 and np.all(plain[erased] == config_lib.CAJ_ERASING_FILL)
    view = augment.augment(image, seed_t, tf.constant(True), cfg, exchange=tf.constant(True))
    view = view.numpy().astype(np.int64)
    assert np.all(view[..., 0] == view[..., 1]) and np.all(view[..., 1] == view[..., 2])
    # The same draws as the single view, then one of R, G, B or grayscale on all channels.
    options = {"rgb"[c]: plain[..., c] for c in range(3)}
    options["grey"] = np.round(plain @ np.array([0.2989, 0.5870, 0.1140]))
    match = [k for k, v in options.items() if np.max(np.abs(view[..., 0] - v)) <= 1]
    assert match, seed
    seen.add(match[0])
    unchanged = augment.augment(image, seed_t, tf.constant(True), cfg,
                                exchange=tf.constant(False)).numpy()
    np.testing.assert_array_equal(unchanged, plain)
  assert seen == {"r", "g", "b", "grey"}


def test_training_slots_and_the_second_view_in_batches(tiny_synthetic):
  train_set = datasets.load_split(tiny_synthetic, "train")
  config = load("caj_sysu_mm01.py", "tiny")
  assert pipeline.training_slots(("rgb", "ir", "depth"), config.augment) == (0, 1, 2, 0)
  assert pipeline.training_slots(("ir", "rgb"), config.augment) == (0, 1, 1)
  with pytest.raises(ValueError, match="exchange_view=True needs an 'rgb' modality"):
    pipeline.training_slots(("ir", "depth"), config.augment)
  config.augment.erasing_prob = 0.0
  sampler = TupleSampler(train_set, 4, 2, 0.0, seed=0)
  (batch,) = pipeline.train_batches(train_set, sampler, config, 0, 1).as_numpy_iterator()
  assert batch["images"].shape == (8, 4, 32, 16, 3) and batch["present"].all()
  view, rgb = batch["images"][:, 3].astype(int), batch["images"][:, 0].astype(int)
  assert np.all(view[..., 0] == view[..., 2]) and np.any(rgb[..., 0] != rgb[..., 2])
  assert not np.array_equal(view, rgb)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synthetic_sysu(tmp_path_factory) -> Path:
  """`synthetic_mm/tiny` written in SYSU-MM01's layout by scripts/export_synthetic.py."""
  module = load_script("export_synthetic")
  output = tmp_path_factory.mktemp("synthetic_sysu") / "tree"
  assert module.main(["--layout", "sysu_mm01", "--output", str(output), "--config", "tiny"]) == 0
  return output


def test_caj_trains_and_evaluates_on_synthetic_sysu_layout(synthetic_sysu, tmp_path):
  """CAJ (AGW's network and losses plus the second view) through the real `sysu_mm01` builder:
  a few steps, then SYSU-MM01's four protocols over 10 trials."""
  config = load("caj_sysu_mm01.py", "tiny")
  config.data.manual_dir = str(synthetic_sysu)
  config.data.data_dir = str(tmp_path / "tfds")
  config.num_train_steps = 2
  report = run.train_and_evaluate(config, str(tmp_path / "work"))
  assert report["step"] == 2
  assert set(report["protocols"]) == {f"sysu/{m}-search/{s}-shot" for m in ("all", "indoor")
                                      for s in ("single", "multi")}
  for entry in report["protocols"].values():
    assert entry["trials"] == 10 and 0.0 <= entry["mAP"] <= 1.0
  written = (tmp_path / "work" / "eval" / "sysu_mm01.json").read_text()
  assert '"sysu/all-search/single-shot"' in written
