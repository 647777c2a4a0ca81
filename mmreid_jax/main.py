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

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmreid_jax import config_lib, runtime  # noqa: E402

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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(runtime.DropLibraryChatter())
  from mmreid_jax import faults

  try:
    runtime.apply_glibc_tunables(FLAGS.config.get("glibc_tunables", ""))
  except faults.RunError as error:
    sys.exit(f"error: {error}")
  import tensorflow as tf  # Imported late so that the environment above is in place.

  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns accelerators.
  import jax

  from mmreid_jax import run

  try:
    runtime.apply_xla_flags(FLAGS.config.get("xla_flags", ""))
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id, FLAGS.distributed)
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
