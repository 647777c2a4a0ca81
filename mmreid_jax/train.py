"""Training: the train state, the min-max step, the loop, checkpoints and metric writers.

One jitted `train_step` does two optax updates (DESIGN.md section 4):
1. the generator (backbone, attention, fusion, BNNeck, classifier) minimises
   w_ce * CE + w_tri * triplet + w_cen * center + w_con * confusion + w_rec * reconstruction
   (+ w_wrt * WRT for AGW, + w_adaptive_triplet * adaptive triplet for CAJ) with the
   discriminator's parameters held fixed; a term whose weight is 0 is not computed, and CE is
   the identity loss of the model's classifier (`IDENTITY_LOSSES`);
2. the discriminator minimises its modality cross-entropy on the generator's pre-BNNeck
   features of this step (computed before the generator update, gradient stopped); with
   w_con = 0 it does not affect the network and only measures how separable the modalities are.
The step runs under `jax.jit` over a `Mesh` of every device with the batch sharded on the `data`
axis and the state replicated, so BatchNorm statistics and triplet mining see the global batch
and a step on N devices equals the step on one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmreid_jax import convert, faults, losses
from mmreid_jax.data import datasets
from mmreid_jax.data.pipeline import train_batches, training_slots
from mmreid_jax.data.sampling import TupleSampler
from mmreid_jax.models import MODELS, ModalityDiscriminator

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
  """
  if config.dtype not in DTYPES:
    raise ValueError(f"config.dtype={config.dtype!r}; expected one of {sorted(DTYPES)}.")
  model_cfg = config.model
  if model_cfg.name not in MODELS:
    raise ValueError(f"config.model.name={model_cfg.name!r}; known models: {sorted(MODELS)}.")
  model_cls = MODELS[model_cfg.name]
  attributes = [f.name for f in dataclasses.fields(model_cls)
                if f.init and f.name not in _DATA_ATTRIBUTES]
  model = model_cls(num_classes=num_classes, num_modalities=num_modalities,
                    dtype=DTYPES[config.dtype],
                    **{k: _as_static(model_cfg[k]) for k in attributes if k in model_cfg})
  discriminator = ModalityDiscriminator(num_modalities, model_cfg.discriminator_hidden)
  return model, discriminator


def learning_rate_schedule(optim: ml_collections.ConfigDict, batch_size: int,
                           num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak rate, then "cosine", "step" or "constant" decay.

  The peak is `base_learning_rate`, times batch / 64 when `scale_by_batch` (the linear scaling
  rule, with the batch counted in tuples).
  """
  peak = optim.base_learning_rate * (batch_size / 64 if optim.scale_by_batch else 1.0)
  warmup = optim.warmup_steps
  remaining = max(num_train_steps - warmup, 1)
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, remaining)
  elif optim.schedule == "step":
    decay = optax.piecewise_constant_schedule(
        peak, {int(f * num_train_steps) - warmup: optim.decay_factor
               for f in optim.decay_boundaries})
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown learning-rate schedule {optim.schedule!r}; expected 'cosine', "
                     "'step' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


# Parameter names (path endings) never decayed whatever their rank: biases (the fusion's
# per-stripe `corr_bias` too) and softmax logit tables (the fusion's `corr_pair_logits`).
_NO_DECAY_SUFFIXES = ("bias", "logits")


def _weight_decay_mask(params: Any) -> Any:
  """True for the parameters weight decay applies to: kernels and weight matrices (ndim > 1)
  whose name ends in neither "bias" nor "logits"; BatchNorm scales and scalars (ndim <= 1) are
  never decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not parameter_path(path).endswith(_NO_DECAY_SUFFIXES),
      params)


OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule],
                               optax.GradientTransformation]] = {
    "sgd": lambda o, lr: optax.chain(
        optax.add_decayed_weights(o.get("weight_decay", 0.0), _weight_decay_mask),
        optax.sgd(lr, momentum=o.get("momentum", 0.9), nesterov=o.get("nesterov", False))),
    "adam": lambda o, lr: optax.chain(
        optax.add_decayed_weights(o.get("weight_decay", 0.0), _weight_decay_mask),
        optax.adam(lr)),
    "adamw": lambda o, lr: optax.adamw(lr, weight_decay=o.get("weight_decay", 0.0),
                                       mask=_weight_decay_mask),
}


def parameter_path(path: tuple) -> str:
  """A parameter's "/"-joined name, e.g. "shared/layer1_0/conv1/kernel"."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def scale_by_path(multipliers: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the multiplier of the first `(regex, multiplier)`
  pair whose regex `re.search`es its `parameter_path`; 1 where none matches.

  Chained after an optimizer, this is a learning rate per parameter group (PyTorch's
  `param_groups`): SGD's and Adam's updates, weight decay included, are linear in the rate.

  Raises:
    ValueError: an entry that is not a (regex, number) pair, or an invalid regex.
  """
  rules = []
  for entry in multipliers:
    try:
      pattern, multiplier = entry
      rules.append((re.compile(pattern), float(multiplier)))
    except (TypeError, ValueError, re.error) as error:
      raise ValueError(f"config.optim.lr_multipliers entry {entry!r}: {error}; expected "
                       "(regex on the parameter path, multiplier) pairs, e.g. "
                       "(('^(stem_|shared/)', 0.1),).") from None

  def factor(path: tuple) -> float:
    name = parameter_path(path)
    return next((m for pattern, m in rules if pattern.search(name)), 1.0)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u if factor(path) == 1.0 else u * factor(path), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(optim: ml_collections.ConfigDict, batch_size: int,
                   num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transform named by `optim.name` and its schedule.

  `optim.lr_multipliers` ((regex, multiplier) pairs, `scale_by_path`) scales the learning rate of
  parameter groups, e.g. AGW's backbone at 0.1 x the head's; the schedule (and its logged rate)
  is the unscaled one.
  """
  if optim.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optim.name!r}; known: {sorted(OPTIMIZERS)}.")
  schedule = learning_rate_schedule(optim, batch_size, num_train_steps)
  tx = OPTIMIZERS[optim.name](optim, schedule)
  if optim.get("lr_multipliers", ()):
    tx = optax.chain(tx, scale_by_path(optim.lr_multipliers))
  if optim.get("clip_grad_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_grad_norm), tx)
  return tx, schedule


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


class Trainer:
  """Builds the data, model, state and jitted step of a config; runs and checkpoints training.

  Attributes:
    config, workdir, mesh, model, discriminator, sampler, train_set, num_modalities.
    stopped: after `train`, the line saying where SIGTERM or SIGINT stopped it (else None).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mesh: Mesh | None = None):
    self.config = config
    self.workdir = workdir
    self.mesh = make_mesh() if mesh is None else mesh
    faults.check_config(config, self.mesh.size)  # before the data is prepared or anything compiles
    self.builder = datasets.builder_from_config(config.data)
    prepare_data = functools.partial(datasets.prepare, self.builder, config.data.get("manual_dir"))
    # Process 0 prepares first; the others then read its data (a shared folder) or prepare their
    # own copy (a local one).
    if jax.process_index() == 0:
      prepare_data()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"prepared {self.builder.info.full_name}")
    if jax.process_index() != 0:
      prepare_data()
    self.train_set = datasets.load_split(self.builder, "train")
    self.num_modalities = len(self.train_set.modality_names)
    faults.check_modalities(config, self.train_set.modality_names)
    self.sampler = TupleSampler(self.train_set, config.data.num_identities,
                                config.data.tuples_per_identity,
                                config.data.single_modality_frac, config.seed)
    batch_size = self.sampler.batch_size
    self.stopped: str | None = None  # after `train`: why a signal stopped it, and where
    # After `train`: per step of that call, (step, seconds from its start to the end of the
    # step's iteration, seconds the iteration waited for its batch). The loop reads each step's
    # skip flag one step later (faults.BadSteps), so it runs at most one step ahead of the
    # device: over many steps, the differences are the device's step times.
    self.timeline: list[tuple[int, float, float]] = []
    self._saving: int | None = None  # the step of the newest checkpoint save begun
    self.model, self.discriminator = build_model(config, self.sampler.num_classes,
                                                 self.num_modalities)
    tx, schedule = make_optimizer(config.optim, batch_size, config.num_train_steps)
    disc_tx, disc_schedule = make_optimizer(config.disc_optim, batch_size,
                                            config.num_train_steps)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    init = functools.partial(create_train_state, model=self.model,
                             discriminator=self.discriminator, tx=tx, disc_tx=disc_tx,
                             image_shape=(config.data.height, config.data.width),
                             num_modalities=self.num_modalities)
    self._init = jax.jit(init, out_shardings=self.replicated)
    self.abstract_state = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))
    step_fn = functools.partial(train_step, model=self.model, discriminator=self.discriminator,
                                loss_config=config.loss, schedules=(schedule, disc_schedule),
                                slot_modalities=training_slots(self.train_set.modality_names,
                                                               config.augment))
    self.train_step = jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding),
                              out_shardings=(self.replicated, self.replicated),
                              donate_argnums=0)

  def initial_state(self) -> TrainState:
    """A freshly initialised, replicated state (seeded by `config.seed`).

    With `config.model.pretrained` (a torchvision ResNet `.pth` or `.safetensors` file, see
    `mmreid_jax.convert`), every modality-specific stem and the shared stages start from those
    weights (BatchNorm running statistics included); the rest keeps its initialisation.
    """
    path = self.config.model.get("pretrained")
    if not path:
      return self._init(jax.random.key_data(jax.random.key(self.config.seed)))
    model_cfg = self.config.model
    try:
      resnet = convert.torchvision_resnet_variables(path, model_cfg.depth, model_cfg.width)
      # Checked against the shapes first: a file that does not fit fails before compiling.
      convert.load_backbone({"params": self.abstract_state.params,
                             "batch_stats": self.abstract_state.batch_stats}, resnet)
    except FileNotFoundError as error:
      raise FileNotFoundError(f"config.model.pretrained={path!r}: {error}") from error
    except ValueError as error:
      raise ValueError(f"config.model.pretrained={path!r}: {error}") from error
    state = self._init(jax.random.key_data(jax.random.key(self.config.seed)))
    variables = convert.load_backbone(
        jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), resnet)
    logging.info("Backbone initialised from %s (ResNet-%d).", path, model_cfg.depth)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=state.tx.init(variables["params"]))
    return jax.device_put(state, self.replicated)

  def device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This host's share of a batch as global arrays sharded over the `data` axis."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}

  def checkpoint_manager(self, for_training: bool = False) -> ocp.CheckpointManager:
    """`checkpoint_manager` of this workdir and config."""
    return checkpoint_manager(self.workdir, self.config, for_training=for_training)

  def config_changes(self) -> list[str] | None:
    """"key: saved -> now" for each key of this config that differs from WORKDIR/config.json
    (None when the workdir has no config.json)."""
    if not os.path.isfile(os.path.join(self.workdir, "config.json")):
      return None
    now = ml_collections.ConfigDict(json.loads(self.config.to_json_best_effort()))
    return faults.config_changes(flatten_config(read_config(self.workdir)), flatten_config(now))

  def restore(self, manager: ocp.CheckpointManager, step: int | None = None) -> TrainState:
    """The state saved at `step` (default: the latest), restored replicated on the mesh.

    Raises:
      CheckpointError: no checkpoint of `step` (the message lists the saved steps).
      ConfigError: the checkpoint's arrays are not those of this config's train state (another
        model or dataset); the message lists the keys that differ from WORKDIR/config.json.
    """
    step = checkpoint_step(manager, step)
    saved = manager.item_metadata(step)["state"]
    problems = [] if saved is None else faults.shape_differences(
        faults.tree_shapes(saved),
        faults.tree_shapes(flax.serialization.to_state_dict(self.abstract_state)))
    if problems:
      changes = self.config_changes()
      saved_config = os.path.join(self.workdir, "config.json")
      raise faults.ConfigError(
          f"Checkpoint {step} in {manager.directory} does not fit this config: "
          f"{'; '.join(problems)}. "
          + (f"{saved_config} is missing. " if changes is None else
             f"Keys that differ from {saved_config}: {'; '.join(changes) or 'none'}. ")
          + "Use the config the checkpoint was trained with, or another --workdir.")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
        self.abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def _wait_for_saves(self, manager: ocp.CheckpointManager) -> None:
    """Waits for the asynchronous save; one that failed for lack of space is a DiskFullError."""
    try:
      manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-exception-caught
      if faults.disk_full_reason(error) is None:
        raise
      raise self._disk_full(manager, error) from None

  def _disk_full(self, manager: ocp.CheckpointManager,
                 error: BaseException) -> faults.DiskFullError:
    folder = os.fspath(manager.directory)
    complete = sorted(int(name) for name in os.listdir(folder) if name.isdigit())
    # The error may surface at the next save's start: the failed one left its temporary folder.
    unfinished = sorted(int(match.group(1)) for match in map(_TEMPORARY_STEP.match,
                                                             os.listdir(folder)) if match)
    failed = next((step for step in unfinished if not complete or step > complete[-1]),
                  self._saving)
    return faults.DiskFullError(
        f"Saving checkpoint {failed} to {folder} failed for lack of space "
        f"({faults.disk_full_reason(error)}). "
        + (f"The newest complete checkpoint is step {complete[-1]}; " if complete else
           "No checkpoint was completed; ")
        + "free space and run the same command again to resume"
        + (" from it." if complete else "."))

  def restore_newest_good(self, manager: ocp.CheckpointManager, step: int | None = None,
                          set_aside: bool = False) -> TrainState:
    """The state of checkpoint `step`, or (None) of the newest checkpoint that restores: a
    damaged one (a truncated or overwritten file) is named in a warning and the next older one
    tried.

    Args:
      manager: the workdir's checkpoint manager.
      step: the one step to restore (a damaged one is an error), or None.
      set_aside: move damaged checkpoints into checkpoints/.damaged/ so that training can save
        those steps again (training's manager only; evaluation never writes there).

    Raises:
      CheckpointError: `step` is damaged, or no checkpoint restores; the message names them.
      ConfigError: a checkpoint does not fit this config (see `restore`).
    """
    steps = [checkpoint_step(manager, step)] if step is not None else sorted(
        manager.all_steps(), reverse=True)
    damaged = []
    for candidate in steps:
      try:
        state = self.restore(manager, candidate)
      except faults.RunError:
        raise
      except Exception as error:  # pylint: disable=broad-exception-caught
        # orbax and TensorStore raise plain Exceptions (or JSON errors) for damaged files.
        reason = faults.first_line(error)
        damaged.append(candidate)
        logging.warning("Checkpoint %d in %s is damaged and was skipped: %s", candidate,
                        manager.directory, reason)
        continue
      if damaged:
        logging.warning("Restored step %d, the newest good checkpoint in %s (damaged: %s).",
                        candidate, manager.directory, damaged)
        if set_aside:
          set_aside_damaged(manager, damaged)
      return state
    raise faults.CheckpointError(
        f"Checkpoint {step} in {manager.directory} is damaged (the warning above says how); "
        "choose another --step or remove it." if step is not None else
        f"No checkpoint in {manager.directory} restores: steps {damaged} are damaged (the "
        "warnings above say how). Remove them to train from the start, or use another "
        "--workdir.")

  def _save(self, manager: ocp.CheckpointManager, state: TrainState, force: bool) -> None:
    step = int(state.step)
    self._saving = step
    if jax.process_index() == 0:
      purge_deleted_checkpoints(manager.directory)
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({"step": step, "seed": self.config.seed})), force=force)

  def train(self, max_steps: int | None = None) -> TrainState:
    """Trains to `config.num_train_steps`, resuming from the latest checkpoint if any.

    A resumed run may change the config (the changed keys are logged) as long as the train
    state keeps its arrays. SIGTERM or SIGINT stops training at the next step boundary with a
    checkpoint of that step, and `stopped` says where (a later call resumes); a second signal
    acts as usual. A step with non-finite values is not applied; after `config.max_bad_steps`
    of them in a row training stops with NonFiniteError, writing no checkpoint of its own.

    Args:
      max_steps: stop (with a checkpoint) after this many steps of this invocation, for
        time-boxed jobs; a later call resumes. None: run to the end.

    Raises:
      ConfigError: the newest checkpoint does not fit this config.
      NonFiniteError: `config.max_bad_steps` steps in a row were not applied.
    """
    config = self.config
    self.stopped = None
    self.timeline = []
    manager = self.checkpoint_manager(for_training=True)
    writer = None
    try:
      with faults.StopSignals(enabled=jax.process_count() == 1) as signals:
        if manager.latest_step() is not None:
          state = self.restore_newest_good(manager, set_aside=True)
          logging.info("Resumed from step %d of %s.", int(state.step), manager.directory)
          changes = self.config_changes()
          if changes:
            logging.warning("Resumed with a config that differs from %s/config.json in: %s.",
                            self.workdir, "; ".join(changes))
        else:
          state = self.initial_state()
        write_config(config, self.workdir)
        initial_step = int(state.step)
        writer = metric_writers.create_default_writer(
            self.workdir, just_logging=jax.process_index() > 0)
        if initial_step == 0:
          writer.write_hparams({k: v for k, v in flatten_config(config).items()
                                if isinstance(v, (int, float, str, bool))})
        hooks = []
        if jax.process_index() == 0:
          hooks.append(periodic_actions.ReportProgress(
              num_train_steps=config.num_train_steps, writer=writer))
        dataset = train_batches(self.train_set, self.sampler, config, initial_step,
                                config.num_train_steps, jax.process_index(),
                                jax.process_count())
        pending: list[dict[str, jax.Array]] = []
        bad_steps = faults.BadSteps(config.max_bad_steps)
        modality_names = self.train_set.modality_names
        last_step = config.num_train_steps
        if max_steps is not None:
          last_step = min(last_step, initial_step + max_steps)
        batches = dataset.as_numpy_iterator()
        started = time.perf_counter()
        window_start, waited = started, 0.0  # since the last log step
        for step in range(initial_step + 1, last_step + 1):
          wait_start = time.perf_counter()
          batch = next(batches, None)
          wait = time.perf_counter() - wait_start
          if batch is None:
            break
          waited += wait
          with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = self.train_step(state, self.device_batch(batch))
          pending.append(metrics)
          bad_steps.record(step, metrics)
          for hook in hooks:
            hook(step)
          if step % config.log_every_steps == 0 or step == last_step:
            summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                       for k in pending[0]}
            summary = {(f"modal_weight/{modality_names[int(k.split('/')[1])]}"
                        if k.startswith("modal_weight/") else k): v for k, v in summary.items()}
            now = time.perf_counter()
            # The share of the loop's time spent waiting for the input pipeline.
            summary["input_wait_fraction"] = waited / max(now - window_start, 1e-9)
            window_start, waited = now, 0.0
            writer.write_scalars(step, summary)
            pending = []
          self.timeline.append((step, time.perf_counter() - started, wait))
          if signals.received or manager.reached_preemption(step):
            self.stopped = (f"Stopped by {signals.received or 'a preemption notice'} at step "
                            f"{step} of {config.num_train_steps}; checkpoint written to "
                            f"{manager.directory / str(step)}. Run the same command again to "
                            "resume.")
            break
          if step % config.checkpoint_every_steps == 0 and step != last_step:
            bad_steps.flush()  # a checkpoint never ends a run of refused updates
            self._save(manager, state, force=False)
        bad_steps.flush()
        if int(state.step) not in manager.all_steps():  # rerunning a finished run saves nothing
          self._save(manager, state, force=True)
    except faults.NonFiniteError as error:
      self._wait_for_saves(manager)
      latest = manager.latest_step()
      raise faults.NonFiniteError(
          f"{error} "
          + ("No checkpoint was written yet. " if latest is None else
             f"The newest checkpoint, step {latest} in {manager.directory}, holds the last "
             "applied update: lower config.optim.base_learning_rate or set "
             "config.optim.clip_grad_norm, then rerun to resume from it.")) from None
    except faults.RunError:
      raise
    except Exception as error:  # pylint: disable=broad-exception-caught
      if faults.disk_full_reason(error) is None:
        raise
      raise self._disk_full(manager, error) from None
    finally:
      try:
        self._wait_for_saves(manager)
      finally:
        if jax.process_index() == 0:
          purge_deleted_checkpoints(manager.directory)
        manager.close()
        if writer is not None:
          writer.flush()
    if self.stopped:
      logging.warning("%s", self.stopped)
    return state


# Where training's checkpoint manager moves old checkpoints to delete them (under checkpoints/).
DELETED_DIR = ".deleted"


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict, *,
                       for_training: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of WORKDIR/checkpoints (items "state" and "meta").

  Every step it lists is a complete checkpoint, whenever a process writing one was killed:
  orbax writes a checkpoint into a temporary folder and renames it when complete, and training's
  manager deletes an old checkpoint by renaming it into checkpoints/.deleted/ first.

  Args:
    workdir: the run's folder.
    config: its config (`checkpoint_every_steps`, `keep_checkpoints`).
    for_training: the manager that saves: it creates the folder, keeps the config's cadence
      and number of checkpoints, and removes what a killed run left (temporary folders,
      checkpoints/.deleted/). Otherwise it only reads, and creates or removes nothing.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if for_training and jax.process_index() == 0:
    purge_deleted_checkpoints(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every_steps,
      create=for_training, cleanup_tmp_directories=for_training,
      todelete_subdir=DELETED_DIR if for_training else None)
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


DAMAGED_DIR = ".damaged"
_TEMPORARY_STEP = re.compile(r"(\d+)\.orbax-checkpoint-tmp")  # a save under way (or failed)


def set_aside_damaged(manager: ocp.CheckpointManager, steps: Sequence[int]) -> None:
  """Moves checkpoints `steps` into checkpoints/.damaged/ (kept for inspection), so that
  training can write those steps again, and reloads `manager`'s list of steps."""
  if jax.process_index() == 0:
    folder = os.path.join(os.fspath(manager.directory), DAMAGED_DIR)
    os.makedirs(folder, exist_ok=True)
    for step in steps:
      target = os.path.join(folder, str(step))
      if os.path.exists(target):
        shutil.rmtree(target)
      os.rename(os.path.join(os.fspath(manager.directory), str(step)), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("damaged checkpoints set aside")
  manager.reload()


def purge_deleted_checkpoints(directory: str | os.PathLike) -> None:
  """Removes the old checkpoints that orbax moved into DIRECTORY/.deleted/ (each in one atomic
  rename: a kill while removing them here leaves no partial checkpoint among the steps)."""
  trash = os.path.join(os.fspath(directory), DELETED_DIR)
  if os.path.isdir(trash):
    for name in os.listdir(trash):
      shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def checkpoint_step(manager: ocp.CheckpointManager, step: int | None = None) -> int:
  """`step` if `manager` holds it, or its newest step when `step` is None.

  Raises:
    CheckpointError: no such checkpoint (the message lists the saved steps).
  """
  steps = sorted(manager.all_steps())
  if not steps:
    raise faults.CheckpointError(
        f"No checkpoint in {manager.directory} (saved steps: none): --workdir must be the "
        "folder of a training run; train one first (--mode=train).")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise faults.CheckpointError(
        f"No checkpoint for step {step} in {manager.directory}; saved steps: {steps}.")
  return step


def flatten_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for every leaf of `config`."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten_config(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to WORKDIR/config.json (host 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config that `write_config` wrote to WORKDIR/config.json (tuples come back as lists)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {path}: not a training workdir (training writes its resolved "
                            "config there).")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
