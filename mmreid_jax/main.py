r"""Command line: train and evaluate, or evaluate a checkpoint.

  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo
  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo --mode=evaluate
  python -m mmreid_jax.main --config configs/synthetic.py:tiny --workdir /tmp/r \
      --config.num_train_steps=10

Several processes (hosts), each with its local devices, run the same command with the address
of process 0 and their own id; each feeds its share of every global batch:

  python -m mmreid_jax.main --config configs/sysu_mm01.py --workdir /shared/run \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0   # on host 0
  ... --process_id=1                                                         # on host 1

(`--distributed` instead lets JAX find them on SLURM, Open MPI or a TPU pod.) The workdir must
be one folder every process sees.

`--mode=train` (default) trains to `config.num_train_steps` (resuming from the newest checkpoint
in WORKDIR/checkpoints) and evaluates at the end; `--mode=evaluate` evaluates the newest
checkpoint, or `--step=N`. SIGTERM or SIGINT during training writes a checkpoint and exits with
status 0; a mistake in the config, the data or the workdir is one line on stderr, status 1.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmreid_jax import config_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (then evaluate) or evaluate.")
flags.DEFINE_integer("step", None, "--mode=evaluate: the checkpoint step (default: newest).")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: host:port of process 0 (jax.distributed.initialize).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's id, 0 first.")
flags.DEFINE_bool("distributed", False,
                  "Multi-process runs on a cluster JAX detects (SLURM, Open MPI, TPU pods): "
                  "jax.distributed.initialize() without arguments.")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryChatter(pylogging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint), and asyncio's reports of orbax
  writes whose failure the run has already reported (a save that found no space); other
  warnings and errors pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.name == "asyncio" and "orbax" in record.getMessage():
      return False
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an override of an unknown config key is one line naming the key."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:  # ml_collections' bare error for an unknown key
    try:
      message = config_lib.unknown_override(argv)
    except (OSError, ValueError, AttributeError, KeyError):  # the config file itself fails
      message = None
    sys.exit(f"FATAL Flags parsing error: {message or error}")


def apply_xla_flags(xla_flags: str) -> None:
  """Appends `config.xla_flags` to the XLA_FLAGS environment variable, which XLA reads once,
  when JAX starts its backends; so this must run before anything touches JAX's devices.

  Raises:
    ConfigError: the backends already started (the flags would be silently ignored).
  """
  if not xla_flags:
    return
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  if xla_bridge.backends_are_initialized():
    raise faults.ConfigError(f"config.xla_flags={xla_flags!r} arrived after JAX started its "
                             "backends; set them in the XLA_FLAGS environment variable.")
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), xla_flags]))


_TUNABLE = re.compile(r"glibc\.[a-z_]+\.[a-z_]+=[^:=]+")


def apply_glibc_tunables(tunables: str) -> None:
  """Restarts this process (the same interpreter and command line) with `config.glibc_tunables`
  ("glibc.NAMESPACE.NAME=VALUE" entries joined by ":") merged into the GLIBC_TUNABLES environment
  variable, which glibc reads only when a process starts. Nothing happens when they are already
  there (as after the restart) or when `tunables` is empty; entries of GLIBC_TUNABLES that
  `tunables` does not name are kept.

  configs/benchmark.py keeps freed host memory for reuse and backs it with transparent huge
  pages: XLA's CPU client maps a fresh temporary buffer for every step and unmaps it after (4.3 GB
  for ResNet-50 at 48 images: 1.2 million page faults and 1.8 s of kernel time a step on 2 cores,
  docs/performance.md).

  Raises:
    ConfigError: an entry not of the form glibc.NAMESPACE.NAME=VALUE.
  """
  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  wanted = [entry for entry in tunables.split(":") if entry]
  for entry in wanted:
    if not _TUNABLE.fullmatch(entry):
      raise faults.ConfigError(f"config.glibc_tunables={tunables!r}: {entry!r} is not of the form "
                               "glibc.NAMESPACE.NAME=VALUE (entries joined by ':').")
  current = os.environ.get("GLIBC_TUNABLES", "")
  merged = dict(entry.split("=", 1) for entry in current.split(":") if "=" in entry)
  merged.update(entry.split("=", 1) for entry in wanted)
  value = ":".join(f"{name}={setting}" for name, setting in merged.items())
  if not wanted or value == current:
    return
  os.environ["GLIBC_TUNABLES"] = value
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, auto: bool) -> None:
  """Joins the processes of a multi-process run (before anything else touches JAX's devices).

  With a coordinator address, the process count and id are required; with `auto`, JAX's
  cluster detection supplies all three. CPU devices exchange data through gloo (the
  collectives of multi-process CPU runs, as the tests use on localhost).

  Raises:
    ConfigError: a coordinator address without the count or id, or an id out of range.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  if coordinator_address is None and not auto:
    if num_processes is not None or process_id is not None:
      raise faults.ConfigError("--num_processes and --process_id need --coordinator_address "
                               "(host:port of process 0).")
    return
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise faults.ConfigError(f"--coordinator_address={coordinator_address} needs "
                               "--num_processes and --process_id.")
    if not 0 <= process_id < num_processes:
      raise faults.ConfigError(f"--process_id={process_id}; expected 0 to {num_processes - 1} "
                               f"for --num_processes={num_processes}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  from mmreid_jax import faults

  try:
    apply_glibc_tunables(FLAGS.config.get("glibc_tunables", ""))
  except faults.RunError as error:
    sys.exit(f"error: {error}")
  import tensorflow as tf  # Imported late so that the environment above is in place.

  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns accelerators.
  import jax

  from mmreid_jax import run

  try:
    apply_xla_flags(FLAGS.config.get("xla_flags", ""))
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed)
  except faults.RunError as error:
    sys.exit(f"error: {error}")
  logging.info("JAX process %d / %d, %d local devices, %d in all.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    if FLAGS.mode == "train":
      run.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      run.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)
  except faults.DiskFullError as error:
    # TensorStore's threads of the failed writes would report again into orbax's closed event
    # loop at interpreter exit, after this line; the run's own files are closed by now.
    logging.flush()
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
  except faults.RunError as error:  # the config, the data or the workdir: no traceback
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
