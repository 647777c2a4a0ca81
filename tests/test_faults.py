"""Faults a run survives and the errors it reports instead (issue 6), each triggered for real:
signals to real processes, corrupt files on disk, non-finite steps through the real jitted step,
configs and workdirs that do not fit.

Training runs the `tiny` preset with other checkpoint settings only, which do not enter the
compiled programs: the initialiser and the train step are test_train.py's and test_main.py's,
shared through the session's persistent compilation cache (first compiled under
`compile_lock`). The training subprocesses load them from that cache; in this process one
Trainer (`reference.trainer`) serves every in-process run, copied with another workdir and
checkpoint settings (`run_copy`).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hypothesis
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from mmreid_jax import config_lib, faults, run, train, train_step
from mmreid_jax.data import augment, datasets, pipeline
from mmreid_jax.data.sampling import TupleSampler

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.xdist_group("faults"),
              pytest.mark.usefixtures("persistent_compilation_cache")]
STEPS = 6  # the tiny preset's num_train_steps
# Flags of every training subprocess: a checkpoint after every step, two kept.
CHAIN_FLAGS = ("--config.checkpoint_every_steps=1", "--config.keep_checkpoints=2",
               "--config.eval.raw_pixel_baseline=False")
STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "disc_params", "disc_opt_state",
                "rng")


def tiny_config(data_dir: str, **overrides: Any):
  """configs/synthetic.py:tiny reading `data_dir`, with dotted-key overrides."""
  config = config_lib.load_config_file(ROOT / "configs" / "synthetic.py", "tiny")
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(overrides)
  return config


def host_state(state: train_step.TrainState) -> dict[str, Any]:
  return {field: jax.device_get(getattr(state, field)) for field in STATE_FIELDS}


def assert_states_equal(a: dict[str, Any], b: dict[str, Any], context: str = "") -> None:
  """Bit-identical leaves of every state field."""
  for field in STATE_FIELDS:
    leaves_a = jax.tree_util.tree_leaves_with_path(a[field])
    leaves_b = jax.tree_util.tree_leaves_with_path(b[field])
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b], (context, field)
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=f"{context} {field}{jax.tree_util.keystr(path)}")


def checkpoint_dirs(workdir: Path) -> list[str]:
  folder = workdir / "checkpoints"
  return sorted(os.listdir(folder)) if folder.is_dir() else []


def saved_steps(workdir: Path) -> list[int]:
  return sorted(int(name) for name in checkpoint_dirs(workdir) if name.isdigit())


def run_copy(reference: SimpleNamespace, workdir: Path, **overrides: Any) -> train.Trainer:
  """`reference.trainer` (its data, model and jitted programs) on `workdir`, with config
  overrides that leave the programs alone (checkpoints, logging, max_bad_steps)."""
  trainer = copy.copy(reference.trainer)
  trainer.workdir = str(workdir)
  trainer.config = copy.deepcopy(reference.trainer.config)
  trainer.config.update_from_flattened_dict(overrides)
  return trainer


def restored(reference: SimpleNamespace, workdir: Path, step: int) -> dict[str, Any]:
  """Checkpoint `step` of `workdir`, restored by a reading manager (which changes nothing)."""
  manager = train.checkpoint_manager(str(workdir), reference.trainer.config)
  try:
    return host_state(reference.trainer.restore(manager, step))
  finally:
    manager.close()


@pytest.fixture(scope="module")
def reference(tfds_data_dir: str, tmp_path_factory: pytest.TempPathFactory, compile_lock
              ) -> SimpleNamespace:
  """An uninterrupted run of the tiny preset with a checkpoint after every step, all kept, and
  its state after every step (restored from those checkpoints)."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny_config(tfds_data_dir, checkpoint_every_steps=1, keep_checkpoints=STEPS)
  trainer = train.Trainer(config, str(workdir))
  with compile_lock():  # test_train.py and test_main.py compile the same two programs
    trainer.train()
  result = SimpleNamespace(trainer=trainer, workdir=workdir, data_dir=tfds_data_dir)
  assert saved_steps(workdir) == list(range(1, STEPS + 1))
  result.states = {step: restored(result, workdir, step) for step in range(1, STEPS + 1)}
  return result


# ------------------------------------------------------------- signals and kills, for real


class Chain:
  """A workdir that training subprocesses are started on, interrupted and resumed in."""

  def __init__(self, root: Path, reference: SimpleNamespace, cache_dir: str):
    self.root, self.reference, self.cache_dir = root, reference, cache_dir
    self.count = 0
    self.workdir = root / "chain_0"
    self.completed = 0

  def latest(self) -> int:
    steps = saved_steps(self.workdir)
    return steps[-1] if steps else 0

  def start(self, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_COMPILATION_CACHE_DIR": self.cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
    command = [sys.executable, "-m", "mmreid_jax.main", "--config", "configs/synthetic.py:tiny",
               "--workdir", str(self.workdir),
               f"--config.data.data_dir={self.reference.data_dir}", *CHAIN_FLAGS]
    with open(log, "w") as out:
      return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

  def check(self) -> None:
    """Every checkpoint of the workdir restores to the uninterrupted run's state."""
    for step in saved_steps(self.workdir):
      assert_states_equal(restored(self.reference, self.workdir, step),
                          self.reference.states[step], f"{self.workdir} step {step}")

  def complete(self) -> None:
    """Resumes the workdir in this process to the end, checks the result, starts a new one."""
    trainer = run_copy(self.reference, self.workdir, checkpoint_every_steps=1,
                       keep_checkpoints=2)
    final = host_state(trainer.train())
    assert trainer.stopped is None
    assert_states_equal(final, self.reference.states[STEPS], f"{self.workdir} final")
    self.check()
    leftovers = [name for name in checkpoint_dirs(self.workdir) if not name.isdigit()]
    assert leftovers in ([], [train.DELETED_DIR]), leftovers  # no temporary folder left
    assert not any((self.workdir / "checkpoints" / train.DELETED_DIR).glob("*"))
    self.completed += 1
    self.count += 1
    self.workdir = self.root / f"chain_{self.count}"


def temporary(folder: Path) -> set[str]:
  """orbax's temporary checkpoint folders (a save under way) in `folder`."""
  return {name for name in os.listdir(folder) if "tmp" in name} if folder.is_dir() else set()


def wait_until(condition, process: subprocess.Popen, timeout: float = 300.0) -> bool:
  """Polls `condition` every 5 ms while `process` runs; whether it came true."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    if condition():
      return True
    time.sleep(0.005)
  return False


def test_killed_and_stopped_training_resumes_to_the_uninterrupted_result(
    reference: SimpleNamespace, jax_cache_dir: str, tmp_path: Path):
  """Training subprocesses (checkpoint after every step, two kept) are interrupted 11 times at
  seeded random moments: 10 SIGKILLs (6 in the first 12 s from the start: imports, restoring,
  loading the programs; 3 as soon as a checkpoint save is under way; 1 while steps run) and one
  SIGTERM. After each, every checkpoint in the
  workdir restores to the uninterrupted run's state of its step; each workdir, resumed to the
  end, ends bit-identical to the uninterrupted run, with no temporary or deleted checkpoint
  left. A SIGTERM exits 0 after writing the checkpoint of its step, saying where."""
  rng = np.random.default_rng(6)
  plan = ["anytime"] * 6 + ["saving"] * 3 + ["training"] + ["SIGTERM"]
  plan = [plan[i] for i in rng.permutation(len(plan))]
  chain = Chain(tmp_path, reference, jax_cache_dir)
  kills, during_save, report = 0, 0, []
  for number, how in enumerate(plan):
    if chain.latest() >= STEPS - (2 if how == "SIGTERM" else 1):
      chain.complete()  # too little left to interrupt
    start_step = chain.latest()
    log = tmp_path / f"run_{number}.log"
    started = time.monotonic()
    process = chain.start(log)
    folder = chain.workdir / "checkpoints"
    left_before = temporary(folder)  # by an earlier kill, until this run's manager cleans up

    def new_step() -> bool:
      return chain.latest() > start_step

    def saving() -> bool:
      return bool(temporary(folder) - left_before)

    if how == "anytime":
      wait_until(lambda: False, process, timeout=rng.uniform(0.0, 12.0))
    elif how == "saving":
      assert wait_until(lambda: saving() or new_step(), process), log.read_text()[-3000:]
      time.sleep(rng.uniform(0.0, 0.03))
    else:
      assert wait_until(new_step, process), log.read_text()[-3000:]
      time.sleep(rng.uniform(0.0, 0.3) if how == "training" else 0.0)
    assert process.poll() is None, f"run {number} ended by itself:\n{log.read_text()[-3000:]}"
    in_save = False
    if how == "SIGTERM":
      process.send_signal(signal.SIGTERM)
      process.wait(timeout=300)
      output = log.read_text()
      assert process.returncode == 0, output[-3000:]
      stopped_at = chain.latest()
      assert f"Stopped by SIGTERM at step {stopped_at} of {STEPS}" in output, output[-3000:]
      assert str(chain.workdir / "checkpoints" / str(stopped_at)) in output
      assert stopped_at > start_step
    else:
      process.kill()
      process.wait(timeout=60)
      assert process.returncode == -signal.SIGKILL
      kills += 1
      in_save = saving()
      during_save += in_save
    report.append(f"{how} after {time.monotonic() - started:.1f} s: steps {start_step} -> "
                  f"{chain.latest()}" + (" (a save was under way)" if in_save else ""))
    chain.check()
  chain.complete()
  print("\n".join(report))
  assert kills == 10 and chain.completed >= 1
  assert during_save >= 1, report  # at least one kill landed inside a checkpoint save


def test_sigint_stops_after_the_step_and_a_second_one_at_once(reference: SimpleNamespace,
                                                               tmp_path: Path, caplog):
  """SIGINT (sent to this process during step 3) lets step 3 finish, writes its checkpoint and
  returns, the handler put back; a resumed run (with another logging cadence, a change that is
  allowed and logged) ends where the uninterrupted run does. Two SIGINTs stop at once with
  KeyboardInterrupt, leaving only complete checkpoints."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist ignores it
  try:
    sigint_runs(reference, tmp_path, caplog)
  finally:
    signal.signal(signal.SIGINT, previous)


def sigint_runs(reference: SimpleNamespace, tmp_path: Path, caplog) -> None:
  workdir = tmp_path / "run"
  trainer = run_copy(reference, workdir, checkpoint_every_steps=4)
  step_fn = trainer.train_step

  def interrupted_step(state, batch):
    if int(state.step) + 1 == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return step_fn(state, batch)

  trainer.train_step = interrupted_step
  state = host_state(trainer.train())
  assert trainer.stopped.startswith("Stopped by SIGINT at step 3 of 6; checkpoint written to "
                                    f"{workdir / 'checkpoints' / '3'}")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert saved_steps(workdir) == [3]
  assert_states_equal(state, reference.states[3])
  assert_states_equal(restored(reference, workdir, 3), reference.states[3])

  resumed = run_copy(reference, workdir, checkpoint_every_steps=4, log_every_steps=3)
  with caplog.at_level("WARNING"):
    final = host_state(resumed.train())
  assert "differs from" in caplog.text and "log_every_steps: 2 -> 3" in caplog.text
  assert resumed.stopped is None
  assert_states_equal(final, reference.states[STEPS])
  assert saved_steps(workdir) == [3, 4, 6]

  twice = run_copy(reference, tmp_path / "twice", checkpoint_every_steps=1)

  def twice_interrupted_step(state, batch):
    if int(state.step) + 1 == 2:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
    return step_fn(state, batch)

  twice.train_step = twice_interrupted_step
  with pytest.raises(KeyboardInterrupt):
    twice.train()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert saved_steps(tmp_path / "twice") == [1]
  assert_states_equal(restored(reference, tmp_path / "twice", 1), reference.states[1])


# ------------------------------------------------------------------- non-finite steps


def poisoned(state: train_step.TrainState) -> train_step.TrainState:
  """`state` with a NaN in its first parameter array (what a numerical blow-up leaves)."""
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.nan)
  return state.replace(params=jax.tree.unflatten(treedef, leaves))


def first_batch(trainer: train.Trainer, step: int) -> dict[str, jax.Array]:
  """The batch of step `step` (1-based), on the mesh."""
  config = trainer.config
  batches = pipeline.train_batches(trainer.train_set, trainer.sampler, config, step - 1, step)
  return trainer.device_batch(next(batches.as_numpy_iterator()))


def test_a_non_finite_step_changes_nothing_but_the_step(reference: SimpleNamespace):
  """The jitted step on a state with a NaN parameter returns that state unchanged (optimizer
  moments, BatchNorm statistics and discriminator included) with the step advanced, and says
  so in its metrics; on the clean state the same batch gives the uninterrupted run's step."""
  trainer = reference.trainer
  state = trainer.abstract_state.replace(**reference.states[2])
  bad_input = jax.device_get(poisoned(jax.device_put(state, trainer.replicated)))
  out, metrics = trainer.train_step(jax.device_put(bad_input, trainer.replicated),
                                    first_batch(trainer, 3))
  metrics = jax.device_get(metrics)
  assert metrics[faults.SKIPPED_METRIC] == 1.0
  assert not np.isfinite(metrics["loss/total"]) and not np.isfinite(metrics["norm/gradients"])
  expected = host_state(bad_input)
  expected["step"] = np.int32(3)
  assert_states_equal(host_state(out), expected)

  good, metrics = trainer.train_step(jax.device_put(state, trainer.replicated),
                                     first_batch(trainer, 3))
  assert float(metrics[faults.SKIPPED_METRIC]) == 0.0
  assert_states_equal(host_state(good), reference.states[3])


def test_max_bad_steps_in_a_row_stop_the_run(reference: SimpleNamespace, tmp_path: Path,
                                             caplog):
  """A blow-up at step 3 that the next step recovers from is skipped with a warning; two in a
  row (steps 5 and 6, `max_bad_steps=2`) stop the run with an error naming the step and the
  values that went non-finite, and no checkpoint is written after the last applied step."""
  workdir = tmp_path / "run"
  trainer = run_copy(reference, workdir, checkpoint_every_steps=2, max_bad_steps=2)
  step_fn = trainer.train_step

  def blowing_up_step(state, batch):
    step = int(state.step) + 1
    if step == 3:  # one bad step: the refused state is the clean one, as the step keeps it
      clean = jax.tree.map(lambda x: x.copy(), state.params)
      out, metrics = step_fn(poisoned(state), batch)
      return out.replace(params=clean), metrics
    if step >= 5:
      return step_fn(poisoned(state), batch)
    return step_fn(state, batch)

  trainer.train_step = blowing_up_step
  with caplog.at_level("WARNING"), pytest.raises(faults.NonFiniteError) as error:
    trainer.train()
  message = str(error.value)
  assert message.startswith("Step 6: 2 steps in a row (steps 5 to 6) had non-finite values: ")
  for name in ("loss/total", "loss/cross_entropy", "norm/gradients"):
    assert name in message, message
  assert "config.max_bad_steps=2" in message
  assert f"The newest checkpoint, step 4 in {workdir / 'checkpoints'}" in message
  assert "Step 3: non-finite " in caplog.text and "(1 of config.max_bad_steps=2 in a row)" in (
      caplog.text)
  assert saved_steps(workdir) == [2, 4]
  assert_states_equal(restored(reference, workdir, 2), reference.states[2])
  step_4 = restored(reference, workdir, 4)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(step_4["params"]))
  # Step 3 was skipped: step 4 is step 2's state moved by step 4's batch alone.
  assert int(step_4["step"]) == 4


# ------------------------------------------------------ configs and workdirs that do not fit


def test_resuming_with_another_model_shape_is_refused(reference: SimpleNamespace,
                                                      tmp_path: Path):
  """A config whose network has other arrays (width 16 for 8) cannot resume the workdir nor
  evaluate it: the error lists the differing keys; config.json stays the run's."""
  workdir = Path(shutil.copytree(reference.workdir, tmp_path / "run"))
  saved_config = (workdir / "config.json").read_text()
  config = tiny_config(reference.data_dir, **{"model.width": 16, "checkpoint_every_steps": 1,
                                              "keep_checkpoints": STEPS})
  trainer = train.Trainer(config, str(workdir))
  with pytest.raises(faults.ConfigError) as error:
    trainer.train()
  message = str(error.value)
  assert "\n" not in message
  assert f"Checkpoint 6 in {workdir / 'checkpoints'} does not fit this config" in message
  assert "arrays change shape" in message and "model.width: 8 -> 16" in message
  assert (workdir / "config.json").read_text() == saved_config
  assert saved_steps(workdir) == list(range(1, STEPS + 1))
  with pytest.raises(faults.ConfigError, match="model.width: 8 -> 16"):
    run.evaluate_checkpoint(config, str(workdir), 3)


def damage(checkpoint: Path, how: str) -> None:
  """Damages the largest array file of `checkpoint`'s state: "truncate" cuts it to half,
  "overwrite" writes seeded random bytes over it (its size kept)."""
  files = [path for path in (checkpoint / "state").rglob("*") if path.is_file()]
  largest = max(files, key=lambda path: path.stat().st_size)
  size = largest.stat().st_size
  if how == "truncate":
    with open(largest, "r+b") as file:
      file.truncate(size // 2)
  else:
    largest.write_bytes(np.random.default_rng(size).bytes(size))


def test_a_damaged_newest_checkpoint_is_named_and_the_newest_good_one_used(
    reference: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture):
  """Checkpoint 6 truncated and 5 overwritten: evaluation's restore warns naming both and
  restores step 4 (moving nothing), asking for step 6 alone is a one-line CheckpointError;
  training sets 5 and 6 aside in checkpoints/.damaged/, resumes from 4 and ends bit-identical to
  the uninterrupted run; with every checkpoint damaged training stops with one line."""
  workdir = tmp_path / "w"
  shutil.copytree(reference.workdir / "checkpoints", workdir / "checkpoints")
  damage(workdir / "checkpoints" / "6", "truncate")
  damage(workdir / "checkpoints" / "5", "overwrite")
  manager = train.checkpoint_manager(str(workdir), reference.trainer.config)
  try:
    with caplog.at_level(logging.WARNING):
      state = reference.trainer.restore_newest_good(manager)
    assert_states_equal(host_state(state), reference.states[4], "newest good")
    warnings = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("Checkpoint 6 in ") and "is damaged" in message
               for message in warnings), warnings
    assert any(message.startswith("Checkpoint 5 in ") and "is damaged" in message
               for message in warnings), warnings
    assert any(message.startswith("Restored step 4, the newest good checkpoint")
               for message in warnings), warnings
    with pytest.raises(faults.CheckpointError, match=r"^Checkpoint 6 in .* is damaged") as error:
      reference.trainer.restore_newest_good(manager, 6)
    assert "\n" not in str(error.value)
  finally:
    manager.close()
  assert saved_steps(workdir) == list(range(1, STEPS + 1))

  trainer = run_copy(reference, workdir, checkpoint_every_steps=1, keep_checkpoints=STEPS)
  assert_states_equal(host_state(trainer.train()), reference.states[STEPS], "resumed")
  assert sorted(os.listdir(workdir / "checkpoints" / train.DAMAGED_DIR)) == ["5", "6"]
  for step in (5, 6):
    assert_states_equal(restored(reference, workdir, step), reference.states[step], str(step))

  ruined = tmp_path / "ruined"
  shutil.copytree(reference.workdir / "checkpoints", ruined / "checkpoints")
  for step in range(1, STEPS + 1):
    damage(ruined / "checkpoints" / str(step), "truncate")
  with pytest.raises(faults.CheckpointError, match=r"^No checkpoint in .* restores: steps "
                     r"\[6, 5, 4, 3, 2, 1\] are damaged") as error:
    run_copy(reference, ruined).train()
  assert "\n" not in str(error.value)


# Runs `python -m mmreid_jax.main ARGS` under a file-size limit of argv[1] bytes.
LIMIT_FILE_SIZE = """import resource, runpy, signal, sys
limit = int(sys.argv.pop(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv[0] = "mmreid_jax.main"
runpy.run_module("mmreid_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_save_that_finds_no_space_stops_with_one_line_and_resumes_when_there_is(
    reference: SimpleNamespace, jax_cache_dir: str, tmp_path: Path):
  """A training subprocess under a file-size limit (RLIMIT_FSIZE, half the largest file of a
  checkpoint; writes past it fail with EFBIG as on a full disk) resumes from step 3, trains step
  4 and fails to save it: it exits with status 1 and one line naming step 4 and the newest
  complete checkpoint, 3, which restores to the uninterrupted run's state. Rerun without the
  limit, training ends bit-identical to the uninterrupted run."""
  workdir = tmp_path / "w"
  for step in (1, 2, 3):
    shutil.copytree(reference.workdir / "checkpoints" / str(step),
                    workdir / "checkpoints" / str(step))
  shutil.copy(reference.workdir / "config.json", workdir / "config.json")
  largest = max(path.stat().st_size
                for path in (reference.workdir / "checkpoints" / "6").rglob("*") if path.is_file())
  command = main_command("--workdir", str(workdir), f"--config.data.data_dir={reference.data_dir}",
                         *CHAIN_FLAGS)
  result = subprocess.run(
      [sys.executable, "-c", LIMIT_FILE_SIZE, str(largest // 2), *command[3:]],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"})
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == (
      f"error: Saving checkpoint 4 to {workdir / 'checkpoints'} failed for lack of space (File "
      "too large). The newest complete checkpoint is step 3; free space and run the same "
      "command again to resume from it."), result.stderr[-3000:]
  assert max(saved_steps(workdir)) == 3
  assert_states_equal(restored(reference, workdir, 3), reference.states[3], "last good")

  trainer = run_copy(reference, workdir, checkpoint_every_steps=1, keep_checkpoints=2)
  assert_states_equal(host_state(trainer.train()), reference.states[STEPS], "after freeing")
  assert saved_steps(workdir) == [STEPS - 1, STEPS] and not temporary(workdir / "checkpoints")


def test_evaluate_needs_a_checkpoint_of_the_step(reference: SimpleNamespace, tmp_path: Path):
  """--mode=evaluate on an empty or foreign workdir, or for a step that was not saved: an error
  listing the saved steps, before any data is read; nothing is created in the workdir."""
  config = reference.trainer.config
  empty = tmp_path / "empty"
  empty.mkdir()
  foreign = tmp_path / "foreign"
  (foreign / "checkpoints" / "notes").mkdir(parents=True)
  (foreign / "checkpoints" / "7.orbax-checkpoint-tmp").mkdir()
  (foreign / "results.txt").write_text("not a training run")
  for workdir in (empty, foreign, tmp_path / "missing"):
    before = sorted(p.name for p in workdir.rglob("*")) if workdir.exists() else None
    with pytest.raises(faults.CheckpointError) as error:
      run.evaluate_checkpoint(config, str(workdir))
    assert "(saved steps: none)" in str(error.value) and "--mode=train" in str(error.value)
    assert (sorted(p.name for p in workdir.rglob("*")) if workdir.exists() else None) == before
  with pytest.raises(faults.CheckpointError,
                     match=r"No checkpoint for step 9 in .*; saved steps: \[1, 2, 3, 4, 5, 6\]"):
    run.evaluate_checkpoint(config, str(reference.workdir), 9)


def test_config_mistakes_fail_before_compiling(tfds_data_dir: str, tmp_path: Path):
  """Each a ConfigError of one line, raised while the Trainer is built (nothing compiles)."""
  cases = {
      "data.height=40": ({"data.height": 40},
                         "config.data.height=40: the backbone reduces images 16-fold "
                         "(config.model.last_stride=1), so it must be a positive multiple of "
                         "16 (e.g. 32 or 48)."),
      "data.width=8": ({"data.width": 8}, "config.data.width=8: "),
      "P > identities": ({"data.num_identities": 9},
                         "config.data.num_identities=9 (P, of the P x K=9 x 2 batch) is larger "
                         "than the 8 identities of the training split; expected at most 8."),
      "max_bad_steps=0": ({"max_bad_steps": 0},
                          "config.max_bad_steps=0; expected a positive integer."),
  }
  for name, (overrides, expected) in cases.items():
    config = tiny_config(tfds_data_dir, **overrides)
    with pytest.raises(faults.ConfigError) as error:
      train.Trainer(config, str(tmp_path / name))
    assert str(error.value).startswith(expected), (name, str(error.value))
    assert "\n" not in str(error.value)
    assert not (tmp_path / name).exists()
  with pytest.raises(faults.ConfigError, match=r"^The batch of 8 tuples \(config.data."
                     r"num_identities=4 x config.data.tuples_per_identity=2\) is not divisible "
                     r"by the 3 devices"):
    faults.check_config(tiny_config(tfds_data_dir), num_devices=3)


def test_channel_augmentation_needs_an_rgb_modality(tmp_path: Path):
  """A manifest whose modalities are "visible" and "thermal": the config's channel
  augmentation and CAJ's exchanged view (both of "rgb") are refused by name; without them the
  Trainer builds."""
  rng = np.random.default_rng(0)
  rows = ["path,pid,camid,modality,split"]
  for pid in range(3):
    for modality in ("visible", "thermal"):
      relative = f"images/{pid}_{modality}.png"
      write_png(tmp_path / relative, rng.integers(0, 256, (32, 16, 3), np.uint8))
      rows.append(f"{relative},{pid},{1 if modality == 'visible' else 2},{modality},train")
      rows.append(f"{relative},{pid},{1 if modality == 'visible' else 2},{modality},test")
  manifest = tmp_path / "manifest.csv"
  manifest.write_text("\n".join(rows) + "\n")
  config = config_lib.load_config_file(ROOT / "configs" / "manifest.py", f"tiny,{manifest}")
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.num_identities = 2
  with pytest.raises(faults.ConfigError, match=r"^config.augment.channel_prob=0.3 augments the "
                     r"'rgb' modality, which config.data.name='manifest' does not have \(its "
                     r"modalities: visible, thermal\)"):
    train.Trainer(config, str(tmp_path / "run"))
  config.augment.channel_prob = 0.0
  config.augment.exchange_view = True  # CAJ's second view of the "rgb" images
  with pytest.raises(faults.ConfigError, match=r"^config.augment.exchange_view=True needs an "
                     r"'rgb' modality; the dataset has \['visible', 'thermal'\]"):
    train.Trainer(config, str(tmp_path / "run"))
  config.augment.exchange_view = False
  assert train.Trainer(config, str(tmp_path / "run")).num_modalities == 2


def main_command(*flags: str) -> list[str]:
  return [sys.executable, "-m", "mmreid_jax.main", "--config", "configs/synthetic.py:tiny",
          *flags]


def test_command_line_errors_are_one_line(tfds_data_dir: str, tmp_path: Path):
  """On the command line: an unknown config key (named, with the keys beside it), and a batch
  that 3 devices cannot share, fail with one line and no traceback, before anything compiles
  (the process's compilation cache stays empty)."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run(main_command("--workdir", str(tmp_path / "a"),
                                       "--config.model.widht=16"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      "FATAL Flags parsing error: --config.model.widht=16: config.model has no key 'widht' (did "
      "you mean 'width'?); its keys: "), result.stderr
  assert " depth, " in lines[0] and not (tmp_path / "a").exists()

  cache = tmp_path / "cache"
  cache.mkdir()
  result = subprocess.run(
      main_command("--workdir", str(tmp_path / "b"), f"--config.data.data_dir={tfds_data_dir}"),
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**env, "XLA_FLAGS": (f"{os.environ.get('XLA_FLAGS', '')} "
                              "--xla_force_host_platform_device_count=3"),
           "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.splitlines()[-1] == (
      "error: The batch of 8 tuples (config.data.num_identities=4 x "
      "config.data.tuples_per_identity=2) is not divisible by the 3 devices; choose P x K a "
      "multiple of 3.")
  assert "Traceback" not in result.stderr
  assert not any(cache.iterdir())
  assert not (tmp_path / "b" / "checkpoints").exists()


# ------------------------------------------------------------------- one run per workdir

HOLD_LOCK = ("import sys, time\nfrom mmreid_jax import faults\n"
             "with faults.WorkdirLock(sys.argv[1]):\n"
             "  print('held', flush=True)\n  time.sleep(600)\n")
# Prepares synthetic_mm/tiny in the folder argv[1] once the file argv[2] exists (so that the
# processes start preparing together), then prints a digest of its training split.
PREPARE = """import hashlib, os, sys, time
from mmreid_jax.data import datasets
builder = datasets.get_builder("synthetic_mm/tiny", data_dir=sys.argv[1])
while not os.path.exists(sys.argv[2]):
  time.sleep(0.01)
datasets.prepare(builder)
split = datasets.load_split(builder, "train")
print(len(split), hashlib.sha256(b"".join(split.images) + split.pids.tobytes()).hexdigest())
"""


def test_a_second_training_run_on_a_workdir_stops_at_once_naming_the_holder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture):
  """While another process holds W's lock, training on W exits with status 1 and one line naming
  the holder's pid and host, before reading data or writing anything; once the holder is killed
  (SIGKILL: no clean-up), the next run takes the lock over with a warning naming the dead
  holder; a run that ends normally leaves the lock free and names nobody."""
  workdir = tmp_path / "w"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    result = subprocess.run(
        main_command("--workdir", str(workdir), f"--config.data.data_dir={tmp_path / 'tfds'}"),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: {workdir} is in use by another training run (pid "
                           f"{holder.pid} on host {socket.gethostname()}, since "), last
    assert last.endswith("--mode=evaluate may run beside it.") and "Traceback" not in result.stderr
    assert not (tmp_path / "tfds").exists() and sorted(os.listdir(workdir)) == ["run.lock"]
    with pytest.raises(faults.WorkdirBusyError, match=f"pid {holder.pid} on host"):
      with faults.WorkdirLock(str(workdir)):
        pass
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level(logging.WARNING):
    with faults.WorkdirLock(str(workdir)):
      assert f'"pid": {os.getpid()}' in (workdir / "run.lock").read_text()
  assert any(f"pid {holder.pid} on host" in record.getMessage() and "ended without releasing"
             in record.getMessage() for record in caplog.records), caplog.text
  assert (workdir / "run.lock").read_text() == ""
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    with faults.WorkdirLock(str(workdir)):
      pass
  assert not caplog.records


def test_processes_preparing_one_dataset_in_one_folder_all_get_it(tmp_path: Path):
  """Three processes preparing synthetic_mm/tiny in one empty folder at once each end with the
  same set, prepared once (without the lock they fail: TFDS's rename raises FileExistsError, or
  a builder made before another process's data reads no splits)."""
  go = tmp_path / "go"
  processes = [subprocess.Popen([sys.executable, "-c", PREPARE, str(tmp_path / "tfds"), str(go)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
               for _ in range(3)]
  time.sleep(5)  # the imports
  go.touch()
  results = [process.communicate(timeout=300) for process in processes]
  for process, (_, stderr) in zip(processes, results):
    assert process.returncode == 0, stderr[-3000:]
  digests = {stdout.strip().splitlines()[-1] for stdout, _ in results}
  assert len(digests) == 1 and int(next(iter(digests)).split()[0]) > 0, digests
  # One prepared it; the others waited for it and read its files.
  assert sum("Downloading and preparing" in stdout for stdout, _ in results) == 1


# ------------------------------------------------------------------------ bad input data


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> bytes:
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels).convert(mode)
  image.save(path, format="PNG" if path.suffix == ".png" else "JPEG")
  return path.read_bytes()


def write_sysu_with_faults(root: Path) -> dict[str, str]:
  """A SYSU-MM01 tree (identities 1-6 train, 7-8 val, 9-10 test; 2 images per identity and
  camera) with, on disk: a truncated JPEG, a file of random bytes, an empty file, a grayscale
  JPEG and an RGBA PNG in RGB cameras, a 16-bit PNG in an infrared camera, an empty identity
  folder, a training identity without infrared images and a listed identity without any."""
  rng = np.random.default_rng(0)
  for pid in range(1, 11):
    for camera in range(1, 7):
      if pid == 6 and camera in (3, 6):
        continue  # no infrared image of identity 6
      for n in (1, 2):
        grey = camera in (3, 6)
        pixels = rng.integers(0, 256, (40, 20) if grey else (40, 20, 3), np.uint8)
        write_png(root / f"cam{camera}/{pid:04d}/{n:04d}.jpg", pixels)
  faults_on_disk = {
      "truncated": "cam1/0001/0001.jpg", "random": "cam2/0002/0002.jpg",
      "empty": "cam4/0003/0001.jpg", "grey": "cam1/0004/0003.jpg",
      "rgba": "cam5/0004/0003.png", "16-bit": "cam3/0005/0003.png",
  }
  data = (root / faults_on_disk["truncated"]).read_bytes()
  (root / faults_on_disk["truncated"]).write_bytes(data[:len(data) // 2])
  (root / faults_on_disk["random"]).write_bytes(rng.integers(0, 256, 700, np.uint8).tobytes())
  (root / faults_on_disk["empty"]).write_bytes(b"")
  write_png(root / faults_on_disk["grey"], rng.integers(0, 256, (40, 20), np.uint8))
  write_png(root / faults_on_disk["rgba"], rng.integers(0, 256, (40, 20, 4), np.uint8))
  write_png(root / faults_on_disk["16-bit"],
            rng.integers(0, 65536, (40, 20), np.uint16).astype(np.uint16))
  (root / "cam2/0011").mkdir(parents=True)  # listed, empty everywhere
  (root / "exp").mkdir()
  (root / "exp/train_id.txt").write_text("1,2,3,4,5,6,11\n")
  (root / "exp/val_id.txt").write_text("7,8\n")
  (root / "exp/test_id.txt").write_text("9,10\n")
  return faults_on_disk


def test_bad_images_and_identities_are_skipped_or_converted_and_counted(tmp_path: Path,
                                                                        caplog):
  """Preparing a SYSU-MM01 tree with bad files: the 3 unreadable images are skipped and the
  converted ones, the empty identity folder, the identity without infrared images and the
  listed identity without images are counted in one warning; every stored image decodes, and
  training batches and evaluation batches of the set build."""
  root = tmp_path / "sysu"
  on_disk = write_sysu_with_faults(root)
  builder = datasets.get_builder("sysu_mm01", data_dir=str(tmp_path / "tfds"))
  with caplog.at_level("WARNING"):
    datasets.prepare(builder, str(root))
  warning = caplog.text
  assert "3 unreadable images skipped (3 images with the rest of their captures):" in warning
  for key in ("truncated", "random", "empty"):
    assert f"{on_disk[key]}: not an image that can be read" in warning, (key, warning)
  assert ("1 rgb images, grayscale, copied to 3 channels: " + on_disk["grey"]) in warning
  assert ("1 rgb images, RGBA: alpha dropped: " + on_disk["rgba"]) in warning
  assert ("1 ir images, 16-bit: scaled to 8 bits (value / 257), copied to 3 channels: "
          + on_disk["16-bit"]) in warning
  assert "train: 1 of 8 identities have no ir image: 6" in warning
  assert "1 identity folders hold no image: cam2/0011/" in warning
  assert "1 listed identities have no image in any camera: 11 (exp/train_id.txt)" in warning

  train_set = datasets.load_split(builder, "train")
  paths = set(train_set.paths.tolist())
  assert not paths & {on_disk[k] for k in ("truncated", "random", "empty")}
  assert {on_disk[k] for k in ("grey", "rgba", "16-bit")} <= paths
  for path, encoded in zip(train_set.paths, train_set.images):
    assert augment.decode(tf.constant(encoded), 32, 16).shape == (32, 16, 3), path
  config = tiny_config(str(tmp_path / "tfds"))
  sampler = TupleSampler(train_set, 4, 2, 0.5, 0)
  batches = list(pipeline.train_batches(train_set, sampler, config, 0, 3).as_numpy_iterator())
  assert len(batches) == 3 and batches[0]["images"].shape == (8, 2, 32, 16, 3)
  query = datasets.load_split(builder, "query")
  assert sum(count for _, count in pipeline.eval_batches(query, 32, 16, 16)) == len(query)


def test_rgbnt201_unreadable_image_drops_its_capture_and_bad_names_are_named(tmp_path: Path,
                                                                             caplog):
  """RGBNT201: an unreadable thermal image takes its RGB and NIR images with it (the capture is
  aligned); a file name without a numeric identity or camera is an error naming the file."""
  rng = np.random.default_rng(1)
  root = tmp_path / "rgbnt201"
  for split, ids in (("train_171", range(1, 4)), ("test", range(4, 6))):
    for pid in ids:
      for n in range(2):
        for folder in ("RGB", "NI", "TI"):
          write_png(root / split / folder / f"{pid:06d}_cam1_0_{n:02d}.jpg",
                    rng.integers(0, 256, (40, 20, 3), np.uint8))
  (root / "train_171/TI/000002_cam1_0_01.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
  builder = datasets.get_builder("rgbnt201", data_dir=str(tmp_path / "tfds"))
  with caplog.at_level("WARNING"):
    datasets.prepare(builder, str(root))
  assert "1 unreadable images skipped (3 images with the rest of their captures):" in caplog.text
  assert "train_171/TI/000002_cam1_0_01.jpg: not an image that can be read" in caplog.text
  train_set = datasets.load_split(builder, "train")
  assert len(train_set) == 3 * 5 and not any("000002_cam1_0_01" in p for p in train_set.paths)

  for name in ("abc_cam1_0_00.jpg", "000007_camX_0_00.jpg", "000007.jpg"):
    broken = Path(shutil.copytree(root, tmp_path / f"broken_{name}"))
    for folder in ("RGB", "NI", "TI"):
      shutil.copy(root / "test" / folder / "000004_cam1_0_00.jpg", broken / "test" / folder / name)
    with pytest.raises(datasets.LayoutError, match=f"'{name}' does not look like "
                       r"'<pid>_cam<c>_<\.\.\.>\.jpg' \(pid and camera numbers\)"):
      datasets.get_builder("rgbnt201", data_dir=str(tmp_path / "tfds2")).scan(broken)


def valid_images() -> list[bytes]:
  rng = np.random.default_rng(2)
  images = []
  for mode, fmt in (("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "GIF"),
                    ("RGB", "BMP"), ("I;16", "PNG")):
    pixels = rng.integers(0, 256, (12, 6, 3), np.uint8)
    image = Image.fromarray(pixels).convert("L" if mode == "I;16" else mode)
    if mode == "I;16":
      image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    images.append(buffer.getvalue())
  return images


VALID_IMAGES = valid_images()


@st.composite
def damaged_images(draw) -> bytes:
  """A valid image cut short, with bytes replaced or inserted, or random bytes."""
  kind = draw(st.sampled_from(["random", "cut", "replace", "insert"]))
  if kind == "random":
    return draw(st.binary(max_size=4096))
  image = draw(st.sampled_from(VALID_IMAGES))
  at = draw(st.integers(0, len(image)))
  if kind == "cut":
    return image[:at]
  patch = draw(st.binary(min_size=1, max_size=32))
  return image[:at] + patch + image[at + (len(patch) if kind == "replace" else 0):]


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(damaged_images())
def test_decoding_random_bytes_raises_image_error_or_decodes(data: bytes):
  """Any bytes: `check_image` raises ImageError naming the file, or the training decoder reads
  them into the requested (H, W, 3) uint8 image."""
  try:
    augment.check_image(data, "fuzz/image.jpg")
  except augment.ImageError as error:
    assert str(error).startswith("fuzz/image.jpg: ")
    return
  image = augment.decode(tf.constant(data), 16, 8)
  assert image.shape == (16, 8, 3) and image.dtype == tf.uint8
