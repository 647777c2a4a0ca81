"""Training: the loop over the tf.data pipeline (`Trainer`), checkpoints and metric writers.

The model factory, the train state and the jitted min-max step are in `train_step`; the
optimizers in `optimizers`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import flax
import flax.serialization
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmreid_jax import convert, faults
from mmreid_jax.data import datasets
from mmreid_jax.data.pipeline import train_batches, training_slots
from mmreid_jax.data.sampling import TupleSampler
from mmreid_jax.train_step import RETIRED_MODEL_KEYS, TrainState, build_training, make_mesh


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
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.model, self.discriminator, init, self.train_step = build_training(
        config, self.sampler.num_classes, self.num_modalities, batch_size, self.mesh,
        training_slots(self.train_set.modality_names, config.augment))
    self._init = jax.jit(init, out_shardings=self.replicated)
    self.abstract_state = jax.eval_shape(init, jax.random.key_data(jax.random.key(0)))

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
    saved = json.load(f)
  for key in RETIRED_MODEL_KEYS:
    saved.get("model", {}).pop(key, None)
  return ml_collections.ConfigDict(saved)
