"""The two things a user runs: train then evaluate, or evaluate a saved checkpoint."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import ml_collections

from mmreid_jax import evaluate, faults, scene_analysis, train, train_step


def _evaluate_state(trainer: train.Trainer, state: train_step.TrainState) -> dict[str, Any]:
  report = evaluate.evaluate_model(
      trainer.config, trainer.builder, trainer.model,
      {"params": state.params, "batch_stats": state.batch_stats}, int(state.step),
      trainer.workdir, trainer.batch_sharding)
  if jax.process_index() == 0:
    print(evaluate.format_table(report), flush=True)
    if "conditions" in report:
      # fused/all and each setting with one modality left out (the JSON holds every protocol)
      fused = [name for name in report["protocols"]
               if name.startswith("fused/") and "+" not in name]
      print(scene_analysis.format_table(report["conditions"], fused or list(report["protocols"])),
            flush=True)
      reliance = scene_analysis.format_reliance(report)
      if reliance:
        print(reliance, flush=True)
  return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict[str, Any] | None:
  """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates, holding
  the workdir's `faults.WorkdirLock` throughout.

  Returns:
    The evaluation report, or None when SIGTERM or SIGINT stopped training: a checkpoint was
    written and a line printed saying where; running again resumes.

  Raises:
    WorkdirBusyError: another training process holds `workdir`, before anything is read.
  """
  # One training run per workdir; the processes of one multi-process run share it (process 0
  # holds the lock for them).
  with (faults.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()):
    trainer = train.Trainer(config, workdir)
    state = trainer.train()
    if trainer.stopped:
      if jax.process_index() == 0:
        print(trainer.stopped, flush=True)
      return None
    return _evaluate_state(trainer, state)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        step: int | None = None) -> dict[str, Any]:
  """Evaluates the checkpoint of `step` (default: the newest that restores, damaged newer
  ones named in a warning) in `workdir`.

  Raises:
    CheckpointError: `workdir` has no checkpoint of `step` (or none at all), before the data is
      read, the message listing the saved steps; or `step` (None: every checkpoint) is damaged.
  """
  manager = train.checkpoint_manager(workdir, config)
  try:
    train.checkpoint_step(manager, step)  # fails before the data is read
    trainer = train.Trainer(config, workdir)
    state = trainer.restore_newest_good(manager, step)
  finally:
    manager.close()
  return _evaluate_state(trainer, state)
