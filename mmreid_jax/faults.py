"""What a run survives, and the errors it reports instead of a traceback.

- `StopSignals`: SIGTERM or SIGINT during training asks the loop to stop after the step in
  progress; the trainer then writes a checkpoint and returns (docs/faults.md).
- `all_finite` and `BadSteps`: the jitted train step applies no update whose loss, gradients or
  new state hold a NaN or an infinity; the loop counts such steps and stops after
  `config.max_bad_steps` of them in a row with a `NonFiniteError` naming the values that went
  non-finite.
- `check_config`: the config mistakes that need no data (image size against the backbone's
  stride, the batch against the devices, run-control numbers), caught before the dataset is
  prepared or anything compiles; `check_modalities` those that need the dataset's modalities.
- `config_changes`, `tree_shapes` and `shape_differences`: resuming or evaluating a checkpoint
  with a config whose train state has other arrays is refused with the differing keys.
- `WorkdirLock`: one training run per workdir; a second one stops at once naming the holder.
- `disk_full_reason`: a checkpoint save that failed for lack of space (`DiskFullError`, raised by
  the trainer with the newest complete checkpoint).

Every error of a run's inputs derives from `RunError`: `mmreid_jax.main` prints its message
without a traceback and exits with status 1.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import signal
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

# The train step's metric that is 1.0 when its update was not applied (non-finite values).
SKIPPED_METRIC = "update/skipped"
# Top-level config keys that must be positive integers.
_POSITIVE_KEYS = ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
                  "keep_checkpoints", "max_bad_steps")


class RunError(Exception):
  """A run cannot go on for a reason its message explains (a mistake in its inputs, not a bug):
  the command line prints the message alone and exits with status 1."""


class ConfigError(RunError, ValueError):
  """A config value that cannot work, named with the key, the value and what was expected."""


class CheckpointError(RunError, FileNotFoundError):
  """No checkpoint for the step asked for; the message lists the saved steps."""


class NonFiniteError(RunError, FloatingPointError):
  """`config.max_bad_steps` steps in a row had non-finite values; none of them was applied."""


class DiskFullError(RunError, OSError):
  """A checkpoint save failed for lack of space; the message names the newest complete one."""


# errno values of "no room": the disk, a quota, a file-size limit (RLIMIT_FSIZE).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_reason(error: BaseException) -> str | None:
  """The system's words for it (e.g. "No space left on device") when `error`, or an error it was
  raised from, says a write found no room; else None. TensorStore (orbax's array writer) raises
  plain exceptions that carry the errno as text (os_error_code='28')."""
  seen: set[int] = set()
  current: BaseException | None = error
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    if isinstance(current, OSError) and current.errno in _NO_SPACE_ERRNOS:
      return os.strerror(current.errno)
    text = str(current)
    for code in _NO_SPACE_ERRNOS:
      if f"os_error_code='{code}'" in text or os.strerror(code) in text:
        return os.strerror(code)
    current = current.__cause__ or current.__context__
  return None


def first_line(error: BaseException, limit: int = 200) -> str:
  """The first line of `error`'s message (its type's name if empty), at most `limit` long."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class WorkdirBusyError(RunError):
  """Another training process holds the workdir's lock; the message names it."""


class WorkdirLock:
  """While held (a context manager), `workdir/run.lock` is locked (`fcntl.flock`) and names the
  holder: host, pid and start time.

  The kernel releases a flock when its process ends, however it ends, so the lock of a killed
  run is free: the next run takes it over with a warning naming the dead holder (the file still
  names it; a run that ends normally empties the file). The file is never deleted, so two
  processes cannot lock two different files. flock keeps processes of one host apart; on a
  network filesystem that does not pass flock on, two hosts are not kept apart.
  """

  FILENAME = "run.lock"

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, self.FILENAME)
    self._fd: int | None = None

  @staticmethod
  def describe(record: str) -> str:
    """'pid 12 on host vm, since 2026-12-03 18:10:05 UTC' from the file's JSON (or the text)."""
    try:
      holder = json.loads(record)
      return f"pid {holder['pid']} on host {holder['host']}, since {holder['started']}"
    except (ValueError, KeyError, TypeError):
      return f"unreadable holder record {record!r}"

  def _record(self) -> str:
    assert self._fd is not None
    os.lseek(self._fd, 0, os.SEEK_SET)
    return os.read(self._fd, 4096).decode(errors="replace").strip()

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self.describe(self._record())
      os.close(self._fd)
      self._fd = None
      raise WorkdirBusyError(
          f"{self.workdir} is in use by another training run ({holder}; lock file "
          f"{self.path}). Wait for it to end, stop it, or train in another --workdir; "
          "--mode=evaluate may run beside it.") from None
    previous = self._record()
    if previous:
      logging.warning("Took over %s: its holder (%s) ended without releasing it; resuming from "
                      "the newest complete checkpoint.", self.path, self.describe(previous))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, record.encode() + b"\n", 0)
    os.fsync(self._fd)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # released normally: no holder to report
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class StopSignals:
  """While active (a context manager), SIGTERM and SIGINT ask the training loop to stop.

  The first signal sets `received` (its name, e.g. "SIGTERM") and puts the handlers that were
  there before back at once, so a second signal acts as it always does: SIGINT raises
  KeyboardInterrupt, SIGTERM ends the process (the newest complete checkpoint stays valid).

  Args:
    enabled: install the handlers. Only the main thread can; with several JAX processes JAX's
      preemption service owns SIGTERM and the loop asks `CheckpointManager.reached_preemption`.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled: bool = True):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if self.enabled:
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    self._restore()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.received = signal.Signals(signum).name
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    self._previous = {}


def all_finite(tree: Any) -> jax.Array:
  """Scalar bool: no floating-point leaf of `tree` holds a NaN or an infinity (jit-friendly)."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


class BadSteps:
  """Counts the steps in a row whose update the train step refused (`SKIPPED_METRIC` = 1).

  Each step's metrics are read one step late (`record`), so that checking never waits for the
  step just dispatched; `flush` reads the rest (before a checkpoint, and at the end).

  Args:
    max_bad_steps: `config.max_bad_steps`; that many refused steps in a row raise
      NonFiniteError.
  """

  def __init__(self, max_bad_steps: int):
    self.max_bad_steps = max_bad_steps
    self.streak: list[int] = []  # the steps of the current run of refused updates
    self.values: set[str] = set()  # the metrics that went non-finite during it
    self._unread: list[tuple[int, dict[str, jax.Array]]] = []

  def record(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Notes step `step`'s metrics and reads those of the steps before it.

    Raises:
      NonFiniteError: `max_bad_steps` refused updates in a row.
    """
    self._unread.append((step, metrics))
    while len(self._unread) > 1:
      self._read(*self._unread.pop(0))

  def flush(self) -> None:
    """Reads every recorded step (raises like `record`)."""
    while self._unread:
      self._read(*self._unread.pop(0))

  def _read(self, step: int, metrics: dict[str, jax.Array]) -> None:
    if not float(metrics[SKIPPED_METRIC]):
      self.streak, self.values = [], set()
      return
    values = jax.device_get(metrics)
    bad = sorted(name for name, value in values.items() if not np.all(np.isfinite(value)))
    bad = bad or ["the updated state (optimizer moments or BatchNorm statistics)"]
    self.streak.append(step)
    self.values.update(bad)
    logging.warning("Step %d: non-finite %s; its update was not applied (%d of "
                    "config.max_bad_steps=%d in a row).", step, ", ".join(bad),
                    len(self.streak), self.max_bad_steps)
    if len(self.streak) >= self.max_bad_steps:
      raise NonFiniteError(
          f"Step {step}: {len(self.streak)} steps in a row (steps {self.streak[0]} to {step}) "
          f"had non-finite values: {', '.join(sorted(self.values))} "
          f"(config.max_bad_steps={self.max_bad_steps}); none of their updates was applied.")


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for the mistakes a config shows without its data.

  Checks the image size against the backbone's total stride (the feature map must cover the
  image evenly), the batch of P x K tuples against `num_devices`, and that the run-control
  numbers (`num_train_steps`, `checkpoint_every_steps`, `max_bad_steps`, ...) are positive.
  """
  from mmreid_jax.models import resnet  # pylint: disable=import-outside-toplevel

  for key in _POSITIVE_KEYS:
    value = config[key]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"config.{key}={value!r}; expected a positive integer.")
  stride = resnet.output_stride(config.model.last_stride)
  for key in ("height", "width"):
    size = config.data[key]
    if size < stride or size % stride:
      nearest = sorted({max(stride, size // stride * stride), -(-size // stride) * stride})
      raise ConfigError(
          f"config.data.{key}={size}: the backbone reduces images {stride}-fold "
          f"(config.model.last_stride={config.model.last_stride}), so it must be a positive "
          f"multiple of {stride} (e.g. {' or '.join(map(str, nearest))}).")
  identities, tuples = config.data.num_identities, config.data.tuples_per_identity
  for key, value in (("num_identities", identities), ("tuples_per_identity", tuples)):
    if value < 1:
      raise ConfigError(f"config.data.{key}={value}; expected a positive integer.")
  batch = identities * tuples
  if batch % num_devices:
    raise ConfigError(
        f"The batch of {batch} tuples (config.data.num_identities={identities} x "
        f"config.data.tuples_per_identity={tuples}) is not divisible by the {num_devices} "
        f"devices; choose P x K a multiple of {num_devices}.")


def check_modalities(config: ml_collections.ConfigDict, modality_names: Sequence[str]) -> None:
  """Raises ConfigError when the config asks for something of a modality the dataset lacks:
  channel augmentation (`config.augment.channel_prob` > 0) applies to the "rgb" modality."""
  if config.augment.channel_prob > 0 and "rgb" not in modality_names:
    raise ConfigError(
        f"config.augment.channel_prob={config.augment.channel_prob} augments the 'rgb' "
        f"modality, which config.data.name={config.data.name!r} does not have (its "
        f"modalities: {', '.join(modality_names)}); set it to 0, or name the colour modality "
        "'rgb'.")


def config_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """"key: before -> now" for every key whose value differs between two flattened configs
  ({"a.b": value}, as `train.flatten_config` gives them)."""
  missing = object()
  changes = []
  for key in sorted(set(before) | set(now)):
    old, new = before.get(key, missing), now.get(key, missing)
    if old != new:
      changes.append(f"{key}: {'(absent)' if old is missing else repr(old)} -> "
                     f"{'(absent)' if new is missing else repr(new)}")
  return changes


def _key_name(entry: Any) -> str:
  for attribute in ("key", "idx", "name"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def tree_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{"params/stem_0/conv1/kernel": (shape, dtype name)} for every array leaf of `tree` (a state
  dict, an abstract state or orbax's checkpoint metadata, whose key paths all read alike)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(entry) for entry in path): (tuple(leaf.shape),
                                                         np.dtype(leaf.dtype).name)
          for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(saved: Mapping[str, tuple], expected: Mapping[str, tuple],
                      limit: int = 3) -> list[str]:
  """What differs between two `tree_shapes`: arrays only in one, and shapes or dtypes, the first
  `limit` of each kind named."""
  only_saved = sorted(set(saved) - set(expected))
  only_expected = sorted(set(expected) - set(saved))
  changed = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  problems = []
  if changed:
    problems.append(f"{len(changed)} arrays change shape or dtype (" + "; ".join(
        f"{k}: {saved[k][0]} {saved[k][1]} saved, {expected[k][0]} {expected[k][1]} now"
        for k in changed[:limit]) + (", ..." if len(changed) > limit else "") + ")")
  if only_saved:
    problems.append(f"{len(only_saved)} saved arrays have no place now ("
                    + ", ".join(only_saved[:limit]) + (", ..." if len(only_saved) > limit
                                                        else "") + ")")
  if only_expected:
    problems.append(f"{len(only_expected)} arrays are not in the checkpoint ("
                    + ", ".join(only_expected[:limit]) + (", ..." if len(only_expected) > limit
                                                           else "") + ")")
  return problems
