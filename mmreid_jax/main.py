r"""Command line: train and evaluate, or evaluate a checkpoint.

  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo
  python -m mmreid_jax.main --config configs/synthetic.py --workdir runs/demo --mode=evaluate
  python -m mmreid_jax.main --config configs/synthetic.py:tiny --workdir /tmp/r \
      --config.num_train_steps=10

`--mode=train` (default) trains to `config.num_train_steps` (resuming from the newest checkpoint
in WORKDIR/checkpoints) and evaluates at the end; `--mode=evaluate` evaluates the newest
checkpoint, or `--step=N`.
"""

from __future__ import annotations

import logging as pylogging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (then evaluate) or evaluate.")
flags.DEFINE_integer("step", None, "--mode=evaluate: the checkpoint step (default: newest).")
flags.mark_flags_as_required(["config", "workdir"])


class _DropLibraryChatter(pylogging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint); warnings and errors pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_DropLibraryChatter())
  import tensorflow as tf  # Imported late so that the environment above is in place.

  tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns accelerators.
  import jax

  from mmreid_jax import run

  logging.info("JAX process %d / %d, %d local devices, %d in all.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if FLAGS.mode == "train":
    run.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    run.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == "__main__":
  app.run(main)
