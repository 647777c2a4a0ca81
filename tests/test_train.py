"""Tests for mmreid_jax.train: the min-max step, sharding, resuming and dtypes (DESIGN.md 4, 5, 8).

Everything runs the `tiny` preset (32 x 16 images, ResNet-18 of width 8). Compiling the train
step costs about 30 s on a 2-core CPU and the initialiser up to a minute, so the module shares
one initial state and one jitted step, and turns on the session's persistent compilation cache
(new Trainers of an equal config then load the compiled programs instead of compiling again).
Eight devices need a fresh process (`--xla_force_host_platform_device_count`), run inline.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmreid_jax import config_lib, optimizers, train, train_step
from mmreid_jax.data.pipeline import train_batches

ROOT = Path(__file__).resolve().parents[1]
# For `--dist loadgroup`: one worker should run this module and test_main.py. (pytest-xdist 3.8
# cannot group under pytest 9, whose node ids it fails to rename; `compile_lock` copes.)
pytestmark = pytest.mark.xdist_group("training")


def load_config(preset: str, data_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
  """configs/synthetic.py:`preset` reading data from `data_dir`, with dotted-key overrides."""
  config = config_lib.load_config_file(ROOT / "configs" / "synthetic.py", preset)
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(overrides)
  return config


def tree_leaves(tree: Any) -> dict[str, np.ndarray]:
  """{path: host array} of every leaf."""
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def assert_trees_equal(a: Any, b: Any) -> None:
  """Bit-identical leaves."""
  la, lb = tree_leaves(a), tree_leaves(b)
  assert la.keys() == lb.keys()
  for key in la:
    np.testing.assert_array_equal(la[key], lb[key], err_msg=key)


def assert_trees_close(a: Any, b: Any, rtol: float, atol: float) -> None:
  """Leaves equal within `rtol` and `atol`."""
  la, lb = tree_leaves(a), tree_leaves(b)
  assert la.keys() == lb.keys()
  for key in la:
    np.testing.assert_allclose(la[key], lb[key], rtol=rtol, atol=atol, err_msg=key)


def tree_changed(a: Any, b: Any) -> bool:
  """Whether any leaf differs."""
  la, lb = tree_leaves(a), tree_leaves(b)
  return any(not np.array_equal(la[k], lb[k]) for k in la)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(jax_cache_dir: str):
  """Turns the persistent compilation cache on for this module, then restores the settings."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", jax_cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  cc.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  cc.reset_cache()


@pytest.fixture(scope="module")
def tiny(tfds_data_dir: str, tmp_path_factory: pytest.TempPathFactory, compile_lock
         ) -> SimpleNamespace:
  """The tiny preset's Trainer, its initial state (on the host), the first two batches, and the
  state and metrics after the first step (the generator's learning rate is 0 at step 0)."""
  config = load_config("tiny", tfds_data_dir)
  trainer = train.Trainer(config, str(tmp_path_factory.mktemp("tiny")))
  batches = list(train_batches(trainer.train_set, trainer.sampler, config, 0, 2)
                 .as_numpy_iterator())
  with compile_lock():  # test_main.py's training run compiles the same two programs
    initial = jax.device_get(trainer.initial_state())
    after_one, first_metrics = step(trainer, initial, batches[0])
  return SimpleNamespace(config=config, trainer=trainer, initial=initial, batches=batches,
                         after_one=after_one, first_metrics=first_metrics)


def step(trainer: train.Trainer, state: train_step.TrainState, batch: dict[str, np.ndarray]
         ) -> tuple[train_step.TrainState, dict[str, float]]:
  """One `trainer.train_step` on a host state (the step donates its input); host results."""
  new_state, metrics = trainer.train_step(jax.device_put(state, trainer.replicated),
                                          trainer.device_batch(batch))
  return jax.device_get(new_state), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def second_step(tiny: SimpleNamespace) -> tuple[train_step.TrainState, dict[str, float]]:
  """The real second step (generator learning rate > 0) from `tiny.after_one`."""
  return step(tiny.trainer, tiny.after_one, tiny.batches[1])


# ------------------------------------------------------------------------------- 8 devices

MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from configs import synthetic
    from mmreid_jax import train, train_step
    from mmreid_jax.data.pipeline import train_batches

    data_dir, workdir, initial_path, out_path, runs = sys.argv[1:]
    assert jax.device_count() == 8, jax.devices()
    config = synthetic.get_config("tiny")
    config.data.data_dir = data_dir
    initial = np.load(initial_path)
    out = {}
    for name in runs.split(","):
      devices = {"eight": jax.devices(), "one": jax.devices()[:1]}[name]
      trainer = train.Trainer(config, f"{workdir}/{name}", mesh=train_step.make_mesh(devices))
      leaves = [initial[f"arr_{i}"] for i in range(len(initial.files))]
      state = jax.tree.unflatten(jax.tree.structure(trainer.abstract_state), leaves)
      state = jax.device_put(state, trainer.replicated)
      for i, batch in enumerate(train_batches(trainer.train_set, trainer.sampler, config, 0, 2)
                                .as_numpy_iterator()):
        batch = trainer.device_batch(batch)
        assert len(batch["images"].sharding.device_set) == len(devices)
        state, metrics = trainer.train_step(state, batch)
        out.update({f"{name}/metrics/{i}/{k}": np.asarray(v) for k, v in metrics.items()})
      for group in ("params", "batch_stats", "disc_params"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, group)):
          key = f"{group}/{jax.tree_util.keystr(path)}"
          out[f"{name}/{key}"] = np.asarray(leaf)
          out[f"{name}/devices/{key}"] = np.array(len(leaf.sharding.device_set))
      out[f"{name}/step"] = np.array(int(state.step))
    np.savez(out_path, **out)
""")


def test_step_on_8_devices_equals_1_device(tiny: SimpleNamespace, second_step, tmp_path: Path):
  """Two steps of the tiny preset on a mesh of 8 (simulated) CPU devices equal those on 1.

  The 8-device run is a subprocess. On a CPU the 1-device reference is this process's `tiny`
  Trainer on the same initial state and batches (compiling it again there would add ~30 s);
  on an accelerator the subprocess computes it too, on 1 of its 8 CPU devices.
  """
  initial_path, out_path = tmp_path / "initial.npz", tmp_path / "out.npz"
  np.savez(initial_path, *jax.tree.leaves(tiny.initial))
  on_cpu = jax.default_backend() == "cpu"
  env = dict(os.environ, XLA_FLAGS=(f"{os.environ.get('XLA_FLAGS', '')} "
                                    "--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run(
      [sys.executable, "-c", MULTI_DEVICE_SCRIPT, tiny.config.data.data_dir,
       str(tmp_path / "work"), str(initial_path), str(out_path),
       "eight" if on_cpu else "eight,one"],
      check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  out = dict(np.load(out_path))
  if on_cpu:
    state, second_metrics = second_step
    out["one/step"] = np.array(int(state.step))
    for i, metrics in enumerate((tiny.first_metrics, second_metrics)):
      out.update({f"one/metrics/{i}/{k}": np.asarray(v) for k, v in metrics.items()})
    for group in ("params", "batch_stats", "disc_params"):
      out.update({f"one/{group}/{k}": v for k, v in tree_leaves(getattr(state, group)).items()})
  assert out["eight/step"] == out["one/step"] == 2

  metric_keys = [k[len("one/"):] for k in out if k.startswith("one/metrics/")]
  assert len(metric_keys) > 20
  for key in metric_keys:
    np.testing.assert_allclose(out[f"eight/{key}"], out[f"one/{key}"], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  leaf_keys = [k[len("one/"):] for k in out
               if k.startswith(("one/params/", "one/batch_stats/", "one/disc_params/"))]
  assert set(leaf_keys) == {k[len("eight/"):] for k in out
                            if k.startswith(("eight/params/", "eight/batch_stats/",
                                             "eight/disc_params/"))}
  worst = {}
  for key in leaf_keys:
    a, b = out[f"eight/{key}"].astype(np.float64), out[f"one/{key}"].astype(np.float64)
    worst[key] = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
  # Zero-initialised biases hold nothing but their own update after two steps, and float32 sums
  # over 8 shards round differently from one sum: a few such leaves reach ~5e-5. BatchNorm
  # statistics, the discriminator and the parameters as a whole stay below 1e-5.
  params = [k for k in leaf_keys if k.startswith("params/")]
  bad = {k: v for k, v in worst.items() if v > (2e-4 if k in params else 1e-5)}
  assert not bad, bad
  assert sum(worst[k] > 1e-5 for k in params) <= 0.1 * len(params), sorted(worst.values())[-10:]
  total = np.sqrt(
      sum(np.sum((out[f"eight/{k}"].astype(np.float64) - out[f"one/{k}"]) ** 2) for k in params)
      / sum(np.sum(out[f"one/{k}"].astype(np.float64) ** 2) for k in params))
  assert total < 1e-5
  # The state really lives on all 8 devices (replicated).
  assert {int(out[f"eight/devices/{k}"]) for k in leaf_keys} == {8}


# ------------------------------------------------------------------------- the min-max step


def manual_discriminator_step(tiny: SimpleNamespace, state: train_step.TrainState,
                              batch: dict[str, np.ndarray]) -> Any:
  """The discriminator's parameters after one Adam step, recomputed independently: train-mode
  features of the model (same "mask" RNG), softmax cross-entropy of the true modality over the
  present slots, and optax's Adam formula (b1 0.9, b2 0.999, eps 1e-8) from the state's moments."""
  trainer = tiny.trainer
  images, present = batch["images"], batch["present"]
  slots = present.shape[1]

  @jax.jit
  def features_fn(params, batch_stats, rng):
    outputs, _ = trainer.model.apply({"params": params, "batch_stats": batch_stats}, images,
                                     present, tuple(range(slots)), train=True,
                                     rngs={"mask": rng}, mutable=["batch_stats"])
    return outputs["features"].reshape(-1, outputs["features"].shape[-1])

  rng = jax.random.fold_in(jnp.asarray(state.rng), jnp.asarray(state.step))
  features = features_fn(state.params, state.batch_stats, rng)
  valid = jnp.asarray(present.reshape(-1))
  modality = jnp.tile(jnp.arange(slots), present.shape[0])

  def loss(disc_params):
    logits = trainer.discriminator.apply({"params": disc_params}, features)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_p, modality[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)

  grads = jax.grad(loss)(state.disc_params)
  adam = [s for s in jax.tree.leaves(state.disc_opt_state,
                                     is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  count = int(adam[0].count) + 1
  lr = tiny.config.disc_optim.base_learning_rate

  def update(p, g, mu, nu):
    mu = 0.9 * mu + 0.1 * g
    nu = 0.999 * nu + 0.001 * g * g
    mu_hat, nu_hat = mu / (1 - 0.9 ** count), nu / (1 - 0.999 ** count)
    return p - lr * mu_hat / (np.sqrt(nu_hat) + 1e-8)

  return jax.tree.map(lambda p, g, mu, nu: update(np.float64(p), np.float64(g), np.float64(mu),
                                                  np.float64(nu)),
                      state.disc_params, jax.device_get(grads), adam[0].mu, adam[0].nu)


def test_generator_update_leaves_discriminator_untouched_and_vice_versa(tiny, second_step):
  """Each optax update touches only its own parameters, and neither feeds the other."""
  state = tiny.after_one
  batch = tiny.batches[1]
  zero = optax.set_to_zero()
  real, real_metrics = second_step
  assert real_metrics["learning_rate/generator"] > 0
  assert tree_changed(real.params, state.params) and tree_changed(real.disc_params,
                                                                  state.disc_params)

  # (a) discriminator frozen: its parameters are untouched, the generator's move.
  frozen_disc, _ = step(tiny.trainer, state.replace(
      disc_tx=zero, disc_opt_state=zero.init(state.disc_params)), batch)
  assert_trees_equal(frozen_disc.disc_params, state.disc_params)
  assert tree_changed(frozen_disc.params, state.params)
  # (b) generator frozen: its parameters are untouched (BatchNorm statistics still update).
  frozen_gen, _ = step(tiny.trainer, state.replace(tx=zero, opt_state=zero.init(state.params)),
                       batch)
  assert_trees_equal(frozen_gen.params, state.params)
  assert tree_changed(frozen_gen.batch_stats, state.batch_stats)
  assert tree_changed(frozen_gen.disc_params, state.disc_params)
  # (c) the generator update does not see the discriminator update and vice versa: the
  # discriminator learns from the features computed before the generator update. (Separate
  # compilations may round differently, hence a float32-level tolerance, not bit equality.)
  assert_trees_close(frozen_disc.params, real.params, rtol=1e-6, atol=1e-9)
  assert_trees_close(frozen_disc.batch_stats, real.batch_stats, rtol=1e-6, atol=1e-9)
  assert_trees_close(frozen_gen.disc_params, real.disc_params, rtol=1e-6, atol=1e-9)
  assert_trees_close(frozen_gen.batch_stats, real.batch_stats, rtol=1e-6, atol=1e-9)

  expected = manual_discriminator_step(tiny, state, batch)
  assert_trees_close(real.disc_params, expected, rtol=0, atol=1e-6)
  # The reference is not trivially the old parameters: the step moved them by far more.
  moved = max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(expected),
                                                     jax.tree.leaves(state.disc_params)))
  assert moved > 20 * 1e-6


LOSS_TERMS = ("cross_entropy", "triplet", "center", "consistency", "reconstruction")


def weighted_step(tiny: SimpleNamespace, **weights: float) -> Callable:
  """`train_step.train_step` of the tiny model, jitted, with the loss weights of LOSS_TERMS replaced
  by `weights` (0 where not given)."""
  loss_config = ml_collections.ConfigDict(tiny.config.loss.to_dict())
  for term in LOSS_TERMS:
    loss_config[term] = weights.get(term, 0.0)
  schedule = optax.constant_schedule(0.0)  # logged only
  return jax.jit(functools.partial(
      train_step.train_step, model=tiny.trainer.model, discriminator=tiny.trainer.discriminator,
      loss_config=loss_config, schedules=(schedule, schedule)))


def test_consistency_term_pushes_discriminator_towards_uniform(tiny: SimpleNamespace):
  """With only the consistency weight on, one plain SGD step of the generator lowers the
  confusion loss (cross-entropy against the uniform distribution) of the OLD discriminator on
  the same batch and mask draws, by about lr * |gradient|^2 (first order)."""
  lr = 1e-4  # first order holds (drop / (lr |g|^2) was 1.01; 0.54 at lr 3e-3)
  tx, _ = optimizers.make_optimizer(ml_collections.ConfigDict({
      "name": "sgd", "base_learning_rate": lr, "scale_by_batch": False, "warmup_steps": 0,
      "schedule": "constant", "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}), 8, 10)
  state = tiny.after_one.replace(tx=tx, opt_state=tx.init(tiny.after_one.params))
  batch = tiny.batches[1]
  new_state, metrics = jax.device_get(weighted_step(tiny, consistency=1.0)(state, batch))
  assert {k for k in metrics if k.startswith("loss/")} == {
      "loss/total", "loss/consistency", "loss/discriminator"}
  model, discriminator = tiny.trainer.model, tiny.trainer.discriminator

  @jax.jit
  def confusion(params: Any, rng: jax.Array) -> jax.Array:
    """Mean over present slots of -(1/M) sum_m log softmax(D_old(features))_m, features of the
    model in train mode (batch statistics of this batch, branch-3 mask drawn from `rng`)."""
    outputs, _ = model.apply({"params": params, "batch_stats": state.batch_stats},
                             batch["images"], batch["present"], (0, 1, 2), train=True,
                             rngs={"mask": rng}, mutable=["batch_stats"])
    features = outputs["features"].reshape(-1, outputs["features"].shape[-1])
    log_p = jax.nn.log_softmax(discriminator.apply({"params": state.disc_params}, features))
    valid = outputs["present"].reshape(-1)
    return jnp.sum(jnp.where(valid, -jnp.mean(log_p, axis=-1), 0.0)) / jnp.sum(valid)

  rng = jax.random.fold_in(jnp.asarray(state.rng), jnp.asarray(state.step))  # the step's draws
  before = float(confusion(state.params, rng))
  after = float(confusion(new_state.params, rng))
  np.testing.assert_allclose(before, metrics["loss/consistency"], rtol=1e-5)
  assert tree_changed(new_state.params, state.params)
  expected_drop = lr * metrics["norm/gradients"] ** 2
  assert expected_drop > 1e-4 * before, (expected_drop, before)  # well above float32 noise
  assert after < before, (before, after)
  assert 0.8 * expected_drop < before - after < 1.2 * expected_drop, (
      before, after, expected_drop)


def test_total_loss_is_weighted_sum_of_terms(tiny: SimpleNamespace):
  """The metric loss/total equals sum over terms of weight * loss/<term>, with weights that
  differ from each other and from 1 (a dropped term or a wrong weight shows)."""
  weights = {"cross_entropy": 0.7, "triplet": 0.3, "center": 0.05, "consistency": 0.2,
             "reconstruction": 0.4}
  _, metrics = jax.device_get(weighted_step(tiny, **weights)(tiny.after_one, tiny.batches[1]))
  contributions = {term: w * float(metrics[f"loss/{term}"]) for term, w in weights.items()}
  total = float(metrics["loss/total"])
  # Every term weighs in far above the tolerance, so leaving one out cannot pass.
  assert min(abs(c) for c in contributions.values()) > 1e-4 * abs(total), contributions
  np.testing.assert_allclose(total, sum(contributions.values()), rtol=1e-6)


# ----------------------------------------------------------------------------- learning


def test_loss_falls_on_tiny_set(tiny: SimpleNamespace, tmp_path: Path):
  """80 AdamW steps (lr 1e-3) on the tiny set: the loss on the first 8 batches falls clearly.

  The per-batch training loss is too noisy to compare (identities and single-modality slots
  vary, and the trajectory depends on the CPU's rounding: its last-8 / first-8 ratio was
  0.64-0.74 on one machine and 0.81 on another), so the test compares the loss of the initial
  and of the trained parameters on the same 8 batches, with the same mask draws.
  """
  config = load_config("tiny", tiny.config.data.data_dir, **{
      "num_train_steps": 80, "optim.name": "adamw", "optim.base_learning_rate": 1e-3,
      "optim.scale_by_batch": False})
  trainer = train.Trainer(config, str(tmp_path))
  tx = trainer.abstract_state.tx
  # The initial parameters of this config equal the fixture's (same seed and model); only the
  # optimizer differs, so reuse them rather than compile another initialiser.
  state = tiny.initial.replace(tx=tx, opt_state=tx.init(tiny.initial.params))
  state = jax.device_put(state, trainer.replicated)
  batches = list(train_batches(trainer.train_set, trainer.sampler, config, 0, 80
                               ).as_numpy_iterator())

  def loss_on_first_batches(state: train_step.TrainState) -> float:
    """Mean loss of `state`'s parameters on batches 0..7, with step i's mask draws (a step's loss
    precedes its update)."""
    host = jax.device_get(state)
    return float(np.mean([step(trainer, host.replace(step=np.int32(i)), batch)[1]["loss/total"]
                          for i, batch in enumerate(batches[:8])]))

  before = loss_on_first_batches(state)
  losses = []
  for batch in batches:
    state, metrics = trainer.train_step(state, trainer.device_batch(batch))
    losses.append(float(metrics["loss/total"]))
  assert len(losses) == 80 and np.all(np.isfinite(losses))
  assert int(state.step) == 80
  after = loss_on_first_batches(state)
  assert after < 0.8 * before, (before, after, losses)


def test_gradient_clipping_option():
  """`optim.clip_grad_norm` clips the global gradient norm before the optimizer."""
  optim = ml_collections.ConfigDict({
      "name": "sgd", "base_learning_rate": 0.5, "scale_by_batch": False, "warmup_steps": 0,
      "schedule": "constant", "momentum": 0.0, "clip_grad_norm": 1.0})
  tx, schedule = optimizers.make_optimizer(optim, 8, 10)
  params = {"w": jnp.ones((2, 2))}
  updates, _ = tx.update({"w": jnp.full((2, 2), 10.0)}, tx.init(params), params)
  assert float(schedule(3)) == 0.5
  np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-6)  # lr x clipped norm 1
  np.testing.assert_allclose(updates["w"], -0.25, rtol=1e-6)


# Leaf names weight decay applies to (docs/design.md): convolution and dense kernels, the
# fusion's stripe projections and the classifier's class weights; nothing else (not BatchNorm
# scales, biases, the fusion's `corr_bias` and `corr_pair_logits`, nor the scalars).
DECAYED_NAMES = ("kernel", "corr_left", "corr_right", "weights")


def test_misspelt_model_key_is_refused_and_retired_keys_are_dropped(tmp_path: Path):
  """A `config.model` key that is no attribute of the network (a misspelling) stops the build,
  naming the key and the valid ones, instead of training the class default; the CPU-form keys
  of earlier versions' WORKDIR/config.json are dropped when it is read."""
  config = load_config("tiny", "unused")
  with config.unlocked():
    config.model.embed_dimm = 256
  with pytest.raises(ValueError, match=r"unknown key\(s\) embed_dimm for model 'joint_attention' "
                     r"\(MultimodalReID\); valid keys: .*\bembed_dim\b.*\bpretrained\b"):
    train_step.build_model(config, num_classes=8, num_modalities=3)
  del config.model.embed_dimm
  with config.unlocked():
    config.model.conv_1x1 = "dot"
  train.write_config(config, str(tmp_path))
  saved = train.read_config(str(tmp_path))
  assert "conv_1x1" not in saved.model and saved.model.embed_dim == config.model.embed_dim
  assert train_step.build_model(saved, num_classes=8, num_modalities=3)[0].embed_dim == (
      config.model.embed_dim)


def test_weight_decay_applies_to_kernels_only():
  """On the tiny preset's network and discriminator, the weight-decay mask holds exactly the
  parameters whose name is in DECAYED_NAMES, and those are what the optimizers' weight decay
  moves (from zero gradients)."""
  config = load_config("tiny", "unused")
  model, discriminator = train_step.build_model(config, num_classes=8, num_modalities=3)
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(1)},
      jnp.zeros((2, 3, 32, 16, 3), jnp.uint8), jnp.ones((2, 3), bool), (0, 1, 2)))
  disc = jax.eval_shape(lambda: discriminator.init(jax.random.key(0),
                                                   jnp.zeros((1, model.embedding_dim))))
  params = {"model": variables["params"], "discriminator": disc["params"]}
  params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params)
  ranks = {optimizers.parameter_path(path): leaf.ndim
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  expected = {p for p in ranks if p.split("/")[-1] in DECAYED_NAMES}
  # The rule is not vacuous: these exist, with ndim > 1, and are left alone.
  for kept in ("model/fusion/corr_bias", "model/fusion/corr_pair_logits"):
    assert ranks[kept] > 1 and kept not in expected
  assert {"model/fusion/corr_left", "model/classifier/weights"} <= expected

  mask = optimizers._weight_decay_mask(params)
  decayed = {optimizers.parameter_path(path) for path, flag in
             jax.tree_util.tree_leaves_with_path(mask) if flag}
  assert decayed == expected, (sorted(decayed - expected), sorted(expected - decayed))
  # And the optimizers use that mask ("adam" as "sgd": decayed weights added to the gradients):
  # zero gradients move exactly the decayed parameters.
  for name in ("sgd", "adamw"):
    optim = ml_collections.ConfigDict({
        "name": name, "base_learning_rate": 0.1, "scale_by_batch": False, "warmup_steps": 0,
        "schedule": "constant", "momentum": 0.0, "weight_decay": 0.01})
    tx, _ = optimizers.make_optimizer(optim, 8, 10)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params),
                                    params)
    moved = {optimizers.parameter_path(path) for path, u in
             jax.tree_util.tree_leaves_with_path(updates) if np.any(np.asarray(u) != 0)}
    assert moved == expected, (name, sorted(moved - expected), sorted(expected - moved))


# ------------------------------------------------------------------------ checkpoints


def checkpoint_steps(workdir: Path) -> list[int]:
  """The steps saved under WORKDIR/checkpoints."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_resume_equals_uninterrupted(tiny: SimpleNamespace, tmp_path: Path):
  """Stopping after 3 of 6 steps and resuming in a new Trainer ends where an uninterrupted run
  does; checkpoints are kept at the configured cadence and number."""
  config = load_config("tiny", tiny.config.data.data_dir, num_train_steps=6,
                       checkpoint_every_steps=2, keep_checkpoints=2)
  workdir_a, workdir_b = tmp_path / "a", tmp_path / "b"
  state_a = jax.device_get(train.Trainer(config, str(workdir_a)).train())
  assert int(state_a.step) == 6
  assert checkpoint_steps(workdir_a) == [4, 6]  # saved 2, 4, 6; keep_checkpoints = 2
  saved = json.loads((workdir_a / "config.json").read_text())
  assert saved["num_train_steps"] == 6 and saved["data"]["name"] == "synthetic_mm/tiny"

  interrupted = jax.device_get(train.Trainer(config, str(workdir_b)).train(max_steps=3))
  assert int(interrupted.step) == 3
  assert checkpoint_steps(workdir_b) == [2, 3]  # the cadence, and the stop

  resumed_trainer = train.Trainer(config, str(workdir_b))
  started_at = []
  original_step = resumed_trainer.train_step

  def counting_step(state, batch):
    started_at.append(int(state.step))
    return original_step(state, batch)

  resumed_trainer.train_step = counting_step
  state_b = jax.device_get(resumed_trainer.train())
  assert started_at == [3, 4, 5]  # resumed from step 3, did not start over
  assert int(state_b.step) == 6
  assert checkpoint_steps(workdir_b) == [4, 6]

  for field in ("params", "batch_stats", "opt_state", "disc_params", "disc_opt_state"):
    assert_trees_close(getattr(state_b, field), getattr(state_a, field), rtol=1e-6, atol=1e-7)
  assert tree_changed(state_a.params, tiny.initial.params)
  # The last checkpoint holds the returned state.
  trainer = train.Trainer(config, str(workdir_a))
  manager = trainer.checkpoint_manager()
  try:
    restored = jax.device_get(trainer.restore(manager, 6))
    with pytest.raises(FileNotFoundError, match=r"\[4, 6\]"):
      trainer.restore(manager, 5)
  finally:
    manager.close()
  assert_trees_equal(restored.params, state_a.params)
  assert_trees_equal(restored.disc_opt_state, state_a.disc_opt_state)


# ------------------------------------------------------------------------------ scale


@pytest.mark.xdist_group("full_size")  # shares nothing with the rest: free to run beside it
def test_full_size_model_one_training_step(tfds_data_dir: str, tmp_path: Path):
  """The paper preset (ResNet-50 of width 64, 288 x 144, three modalities, D = 512, parts of
  128) runs one training step on a batch of 2 tuples of the tiny set (resized to 288 x 144)."""
  config = load_config("paper", tfds_data_dir, **{
      "data.name": "synthetic_mm/tiny", "data.num_identities": 2,
      "data.tuples_per_identity": 1, "optim.warmup_steps": 0})  # warm-up would make lr(0) = 0
  start = time.time()
  trainer = train.Trainer(config, str(tmp_path))
  assert trainer.model.embedding_dim == 2 * 512 + 6 * 128
  state = trainer.initial_state()
  initial_params = jax.device_get(state.params)
  batch = next(train_batches(trainer.train_set, trainer.sampler, config, 0, 1
                             ).as_numpy_iterator())
  assert batch["images"].shape == (2, 3, 288, 144, 3)
  state, metrics = trainer.train_step(state, trainer.device_batch(batch))
  metrics = jax.device_get(metrics)
  print(f"full-size step (init + compile + run): {time.time() - start:.0f} s")
  assert np.isfinite(metrics["loss/total"]) and metrics["loss/total"] > 0
  assert np.isfinite(metrics["norm/gradients"]) and metrics["norm/gradients"] > 0
  assert tree_changed(state.params, initial_params)
  assert state.params["stem_0"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert int(state.step) == 1


def test_bfloat16_step_matches_float32(tiny: SimpleNamespace, second_step, tmp_path: Path):
  """Compute in bfloat16: the loss is within 2% of float32's, parameters stay float32."""
  config = load_config("tiny", tiny.config.data.data_dir, dtype="bfloat16")
  trainer = train.Trainer(config, str(tmp_path))
  assert trainer.model.dtype == jnp.bfloat16
  state, metrics = step(trainer, tiny.after_one, tiny.batches[1])
  reference = second_step[1]["loss/total"]
  assert np.isfinite(metrics["loss/total"])
  assert abs(metrics["loss/total"] - reference) < 0.02 * abs(reference), (
      metrics["loss/total"], reference)
  assert metrics["loss/total"] != reference  # bfloat16 really ran
  for tree in (state.params, state.batch_stats, state.disc_params):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
  for tree in (state.opt_state, state.disc_opt_state):  # optimizer moments, not their counters
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} == {np.dtype(np.float32)}
  assert tree_changed(state.params, tiny.after_one.params)
