"""The model factory, the train state and the min-max train step (no input pipeline here).

One jitted `train_step` does two optax updates (DESIGN.md section 4):
1. the generator (backbone, attention, fusion, BNNeck, classifier) minimises
   w_ce * CE + w_tri * triplet + w_cen * center + w_con * confusion + w_rec * reconstruction
   (+ w_wrt * WRT for AGW, + w_adaptive_triplet * adaptive triplet for CAJ) with the
   discriminator's parameters held fixed; a term whose weight is 0 is not computed, and CE is
   the identity loss of the model's classifier (`IDENTITY_LOSSES`);
2. the discriminator minimises its modality cross-entropy on the generator's pre-BNNeck
   features of this step (computed before the generator update, gradient stopped); with
   w_con = 0 it does not affect the network and only measures how separable the modalities are.
The step runs under `jax.jit` over a `Mesh` of every device (`make_mesh`) with the batch sharded
on the `data` axis and the state replicated, so BatchNorm statistics and triplet mining see the
global batch and a step on N devices equals the step on one. `train.Trainer` feeds it from the
tf.data pipeline; this module imports no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmreid_jax import faults, losses
from mmreid_jax.models import MODELS, ModalityDiscriminator
from mmreid_jax.optimizers import make_optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; the two optax transforms are static fields."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  disc_params: Any
  disc_opt_state: optax.OptState
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  disc_tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


# Model attributes that come from the data or `config.dtype`, not from `config.model`.
_DATA_ATTRIBUTES = ("parent", "name", "num_classes", "num_modalities", "dtype")
# `config.model` keys that configure the run rather than the network class.
_RUN_MODEL_KEYS = ("name", "discriminator_hidden", "pretrained")
# `config.model` keys of earlier versions, dropped when an old WORKDIR/config.json is read: they
# chose CPU convolution forms with the same parameters (now `config.model.kernels`).
RETIRED_MODEL_KEYS = ("conv_1x1", "strided_input_grad", "weight_grad_3x3")


def _as_static(value: Any) -> Any:
  """Config lists (a config read back from JSON holds lists) as tuples, which modules hash."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_static(v) for v in value)
  return value


def build_model(config: ml_collections.ConfigDict, num_classes: int,
                num_modalities: int) -> tuple[nn.Module, nn.Module]:
  """The ReID network named by `config.model.name` and its modality discriminator.

  The network class (`models.MODELS`) takes every attribute it declares from the `config.model`
  key of the same name (the class default where the config has no such key), so one network
  class serves several recipes by its switches (AGW is `MultimodalReID` with other defaults).

  Raises:
    ValueError: an unknown dtype or model name, or a `config.model` key that is neither an
      attribute of the network class nor a run key (a misspelt key would otherwise train another
      model than the one written).
  """
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; expected one of {sorted(DTYPES)}.")
  model_cfg = config.model
  if model_cfg.name not in MODELS:
    raise ValueError(f"config.model.name={model_cfg.name!r}; known models: {sorted(MODELS)}.")
  model_cls = MODELS[model_cfg.name]
  attributes = [f.name for f in dataclasses.fields(model_cls)
                if f.init and f.name not in _DATA_ATTRIBUTES]
  unknown = sorted(set(model_cfg) - set(attributes) - set(_RUN_MODEL_KEYS))
  if unknown:
    valid = ", ".join(sorted([*attributes, *_RUN_MODEL_KEYS]))
    raise ValueError(f"config.model has unknown key(s) {', '.join(unknown)} for model "
                     f"{model_cfg.name!r} ({model_cls.__name__}); valid keys: {valid}.")
  model = model_cls(num_classes=num_classes, num_modalities=num_modalities,
                    dtype=DTYPES[config.dtype],
                    **{k: _as_static(model_cfg[k]) for k in attributes if k in model_cfg})
  discriminator = ModalityDiscriminator(num_modalities, model_cfg.discriminator_hidden)
  return model, discriminator


def create_train_state(rng: jax.Array, model: nn.Module, discriminator: nn.Module,
                       tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                       image_shape: tuple[int, int], num_modalities: int) -> TrainState:
  """Initialises parameters with every modality present (so every stem has parameters)."""
  init_rng, mask_rng, disc_rng, state_rng = jax.random.split(rng, 4)
  images = jnp.zeros((2, num_modalities) + tuple(image_shape) + (3,), jnp.uint8)
  present = jnp.ones((2, num_modalities), bool)
  variables = model.init({"params": init_rng, "mask": mask_rng}, images, present,
                         tuple(range(num_modalities)), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  embedding_dim = model.embedding_dim
  disc_params = discriminator.init(disc_rng, jnp.zeros((1, embedding_dim)))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), disc_params=disc_params,
                    disc_opt_state=disc_tx.init(disc_params), rng=state_rng, tx=tx,
                    disc_tx=disc_tx)


def _cosine_identity_loss(outputs: dict[str, jax.Array], embeddings: jax.Array,
                          labels: jax.Array, valid: jax.Array,
                          loss_config: ml_collections.ConfigDict) -> jax.Array:
  return losses.cosine_cross_entropy(embeddings, outputs["class_weights"], labels, valid,
                                     outputs["scale"], loss_config.cosine_margin)


def _linear_identity_loss(outputs: dict[str, jax.Array], embeddings: jax.Array,
                          labels: jax.Array, valid: jax.Array,
                          loss_config: ml_collections.ConfigDict) -> jax.Array:
  del loss_config
  return losses.softmax_cross_entropy(embeddings, outputs["class_weights"], labels, valid)


# The identity cross-entropy of each classifier head (`models.heads.CLASSIFIERS`), by name:
# (model outputs, post-BNNeck embeddings (N, E), labels (N,), valid (N,), config.loss) -> loss.
IDENTITY_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "cosine": _cosine_identity_loss,
    "linear": _linear_identity_loss,
}


def _require_outputs(outputs: dict[str, jax.Array], keys: Sequence[str], term: str,
                     weight: float, model: nn.Module) -> None:
  """Raises ValueError when a loss term with a nonzero weight needs outputs the model lacks."""
  missing = [key for key in keys if key not in outputs]
  if missing:
    raise ValueError(f"config.loss.{term}={weight} needs the model outputs {missing}, which "
                     f"{type(model).__name__} does not produce; set config.loss.{term}=0.")


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               discriminator: nn.Module, loss_config: ml_collections.ConfigDict,
               schedules: tuple[optax.Schedule, optax.Schedule],
               slot_modalities: Sequence[int] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One generator update followed by one discriminator update.

  Args:
    state: the train state (donated).
    batch: "images" (N, S, H, W, 3) uint8, "present" (N, S) bool, "labels" (N,) int32.
    model, discriminator: the networks (static).
    loss_config: `config.loss` (static).
    schedules: generator and discriminator learning-rate schedules (static, for logging).
    slot_modalities: the dataset modality of each of the S slots (static); None: slot s holds
      modality s. A second view of a modality (CAJ's channel-exchanged RGB view,
      `pipeline.training_slots`) is one more slot of that modality.

  Returns:
    The new state and a dict of scalar metrics. When a loss, a gradient or the updated state is
    not finite, the new state is the old one with the step counter advanced, and the metric
    `faults.SKIPPED_METRIC` is 1.
  """
  images, present, labels = batch["images"], batch["present"], batch["labels"]
  batch_size, slots = present.shape
  modalities = tuple(range(slots)) if slot_modalities is None else tuple(slot_modalities)
  if len(modalities) != slots:
    raise ValueError(f"slot_modalities={modalities} names {len(modalities)} slots; the batch "
                     f"has {slots}.")
  # The model's output rows: the batch, or with `train_alone_views` the batch twice (fused,
  # then each slot alone); labels and modalities follow, presence comes from the model.
  rows = batch_size * (2 if getattr(model, "train_alone_views", False) else 1)
  flat_labels = jnp.repeat(jnp.tile(labels, rows // batch_size), slots)
  flat_modalities = jnp.tile(jnp.asarray(modalities), rows)
  step_rng = jax.random.fold_in(state.rng, state.step)
  w = loss_config

  def generator_loss(params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, images, present, modalities,
        train=True, rngs={"mask": step_rng}, mutable=["batch_stats"])
    valid = outputs["present"].reshape(-1)
    features = outputs["features"].reshape(rows * slots, -1)
    embeddings = outputs["embeddings"].reshape(rows * slots, -1)
    terms = {}
    if w.cross_entropy:
      terms["cross_entropy"] = IDENTITY_LOSSES[model.classifier](
          outputs, embeddings, flat_labels, valid, w)
    if w.triplet:
      terms["triplet"] = losses.cross_modal_triplet(
          features, flat_labels, flat_modalities, valid, w.triplet_margin, w.soft_margin)
    if w.center:
      terms["center"] = losses.center_alignment(features, flat_labels, flat_modalities, valid,
                                                max(modalities) + 1)
    if w.get("wrt", 0.0):
      terms["wrt"] = losses.weighted_regularized_triplet(
          features, flat_labels, valid, agw_normaliser=w.get("wrt_agw_normaliser", True))
    if w.get("adaptive_triplet", 0.0):
      terms["adaptive_triplet"] = losses.adaptive_weighted_triplet(
          features, flat_labels, valid, alpha=w.adaptive_alpha, gamma=w.adaptive_gamma,
          square=w.adaptive_square)
    if w.consistency:
      disc_logits = discriminator.apply({"params": state.disc_params}, features)
      terms["consistency"] = losses.modality_confusion_loss(disc_logits, valid)
    if w.reconstruction:
      _require_outputs(outputs, ("reconstruction", "reconstruction_target",
                                 "reconstruction_mask"), "reconstruction", w.reconstruction, model)
      map_shape = outputs["reconstruction"].shape
      flat_maps = (rows * slots,) + map_shape[2:]
      terms["reconstruction"] = losses.masked_reconstruction_loss(
          outputs["reconstruction"].reshape(flat_maps),
          outputs["reconstruction_target"].reshape(flat_maps),
          outputs["reconstruction_mask"].reshape(flat_maps[:3]), valid)
    total = sum(getattr(w, name) * value for name, value in terms.items())
    aux = (terms, updates["batch_stats"], features, valid, outputs.get("modal_weights"),
           outputs.get("scale"))
    return total, aux

  (total, (terms, batch_stats, features, valid, modal_weights, scale)), grads = (
      jax.value_and_grad(generator_loss, has_aux=True)(state.params))
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  frozen_features = jax.lax.stop_gradient(features)

  def discriminator_loss(disc_params):
    logits = discriminator.apply({"params": disc_params}, frozen_features)
    loss = losses.modality_classification_loss(logits, flat_modalities, valid)
    correct = (jnp.argmax(logits, -1) == flat_modalities) & valid
    return loss, jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)

  (disc_loss, disc_accuracy), disc_grads = jax.value_and_grad(
      discriminator_loss, has_aux=True)(state.disc_params)
  disc_updates, disc_opt_state = state.disc_tx.update(disc_grads, state.disc_opt_state,
                                                      state.disc_params)
  disc_params = optax.apply_updates(state.disc_params, disc_updates)

  present_f = present.astype(jnp.float32)
  metrics = {
      "loss/total": total,
      **{f"loss/{name}": value for name, value in terms.items()},
      "loss/discriminator": disc_loss,
      "discriminator/accuracy": disc_accuracy,
      "learning_rate/generator": schedules[0](state.step),
      "learning_rate/discriminator": schedules[1](state.step),
      "norm/gradients": optax.tree.norm(grads),
      "norm/parameters": optax.tree.norm(params),
      "norm/updates": optax.tree.norm(updates),
      "norm/discriminator_gradients": optax.tree.norm(disc_grads),
  }
  if scale is not None:  # the cosine classifier's
    metrics["classifier/scale"] = scale
  if modal_weights is not None:  # with the cross-modal attention, per dataset modality
    modal_weights = modal_weights[:batch_size]  # the fused view's
    for modality in sorted(set(modalities)):
      held = present_f * (jnp.asarray(modalities) == modality)
      metrics[f"modal_weight/{modality}"] = (jnp.sum(modal_weights * held)
                                             / jnp.maximum(jnp.sum(held), 1.0))
  # A step whose losses, gradients or new state hold a NaN or an infinity changes nothing but
  # the step counter (the loop counts such steps, `faults.BadSteps`).
  updated = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state,
             "disc_params": disc_params, "disc_opt_state": disc_opt_state}
  finite = faults.all_finite((total, terms, disc_loss, grads, disc_grads, updated))
  metrics[faults.SKIPPED_METRIC] = 1.0 - finite.astype(jnp.float32)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                      {name: getattr(state, name) for name in updated})
  return state.replace(step=state.step + 1, **kept), metrics


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def build_training(config: ml_collections.ConfigDict, num_classes: int, num_modalities: int,
                   batch_size: int, mesh: Mesh, slot_modalities: Sequence[int] | None = None
                   ) -> tuple[nn.Module, nn.Module, Callable[[jax.Array], TrainState],
                              Callable[..., tuple[TrainState, dict[str, jax.Array]]]]:
  """The networks, state initialiser and jitted train step of `config` over `mesh`.

  Returns `(model, discriminator, init, step)`: `init(key_data)` builds the train state (not
  jitted, so `jax.eval_shape` can trace it); `step` is `train_step` jitted with the state
  replicated and donated and the batch sharded on the "data" axis, its learning rates scheduled
  over `config.num_train_steps` steps of `batch_size` tuples.
  """
  model, discriminator = build_model(config, num_classes, num_modalities)
  tx, schedule = make_optimizer(config.optim, batch_size, config.num_train_steps)
  disc_tx, disc_schedule = make_optimizer(config.disc_optim, batch_size, config.num_train_steps)
  init = functools.partial(create_train_state, model=model, discriminator=discriminator, tx=tx,
                           disc_tx=disc_tx, image_shape=(config.data.height, config.data.width),
                           num_modalities=num_modalities)
  replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(functools.partial(train_step, model=model, discriminator=discriminator,
                                   loss_config=config.loss, schedules=(schedule, disc_schedule),
                                   slot_modalities=slot_modalities),
                 in_shardings=(replicated, batched), out_shardings=(replicated, replicated),
                 donate_argnums=0)
  return model, discriminator, init, step
