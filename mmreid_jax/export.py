r"""A trained model as a TensorFlow SavedModel (jax2tf), one serving signature per modality.

  python -m mmreid_jax.export --workdir runs/demo --output runs/demo/saved_model [--step N]

Signature `<modality>` (e.g. "rgb", "ir", "depth") takes `images`: float32 (batch, H, W, 3) in
[0, 255], any batch size and any image size, and returns `embeddings`: (batch, E) float32 unit
vectors, those of `Embedder(images, modality)` (resized as evaluation resizes, flip-summed when
the training config's `eval.flip`, L2-normalised). Use it with

  model = tf.saved_model.load("runs/demo/saved_model")
  embeddings = model.signatures["ir"](images=tf.constant(batch, tf.float32))["embeddings"]

The network's variables are TF variables of the SavedModel; the computation is the jax2tf
(native serialization) lowering of `Embedder.modality_fn`, batch dimension symbolic.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

from mmreid_jax.data.augment import resize  # noqa: E402
from mmreid_jax.inference import Embedder  # noqa: E402


@contextlib.contextmanager
def stablehlo_for_tensorflow() -> Iterator[str]:
  """Serialises jax2tf's StableHLO in a version this TensorFlow can read.

  jax 0.12 writes StableHLO for consumers at most four weeks older than itself (version 1.18.0),
  while TensorFlow 2.21's XlaCallModule reads at most 1.13.7 (it then fails with "unregistered
  operation 'vhlo.custom_call_v2'"). StableHLO artifacts downgrade: inside this context JAX's
  export targets the older of its own choice and TensorFlow's version. (JAX has no public
  setting for the target; this replaces `get_version_from_compatibility_requirement` as seen by
  `jax._src.export._export` for the duration.)

  Yields:
    The StableHLO version TensorFlow reads.
  """
  from jax._src.export import _export
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

  hlo = getattr(_export, "hlo", None)
  original = getattr(hlo, "get_version_from_compatibility_requirement", None)
  if original is None:
    raise RuntimeError("This jax has no jax._src.export._export.hlo."
                       "get_version_from_compatibility_requirement: update "
                       "mmreid_jax.export.stablehlo_for_tensorflow for it.")
  tf_version = tf_stablehlo.get_current_version()

  def target(requirement):
    return tf_stablehlo.get_smaller_version(original(requirement), tf_version)

  hlo.get_version_from_compatibility_requirement = target
  try:
    yield tf_version
  finally:
    hlo.get_version_from_compatibility_requirement = original


def export_saved_model(embedder: Embedder, output_dir: str) -> str:
  """Writes `embedder` as a SavedModel with one signature per modality; returns `output_dir`."""
  variables = jax.tree.map(lambda a: tf.Variable(np.asarray(a), trainable=False),
                           embedder.variables)
  module = tf.Module()
  module.model_variables = jax.tree.leaves(variables)  # tracked, so the SavedModel holds them
  signatures = {}

  def serving_function(modality: str) -> tf.types.experimental.PolymorphicFunction:
    converted = jax2tf.convert(embedder.modality_fn(modality),
                               polymorphic_shapes=[None, "(b, ...)"], with_gradient=False)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
      resized = resize(images, embedder.height, embedder.width)
      return {"embeddings": converted(variables, resized)}

    return tf.function(serve, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])

  with stablehlo_for_tensorflow():
    for name in embedder.modality_names:
      function = serving_function(name)
      signatures[name] = function.get_concrete_function()
      setattr(module, f"embed_{name}", function)
  tf.saved_model.save(module, output_dir, signatures=signatures)
  return output_dir


def directory_size(path: str) -> int:
  """Bytes of every file under `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def main(argv: list[str] | None = None) -> None:
  """Command line: `python -m mmreid_jax.export --workdir DIR --output DIR/saved_model`."""
  parser = argparse.ArgumentParser(
      prog="python -m mmreid_jax.export",
      description="Export a workdir's checkpoint as a TensorFlow SavedModel (one signature per "
                  "modality).")
  parser.add_argument("--workdir", required=True, help="the training workdir")
  parser.add_argument("--output", required=True, help="the SavedModel directory to write")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest)")
  args = parser.parse_args(argv)
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only runs the export; JAX owns GPUs.
  embedder = Embedder.from_workdir(args.workdir, args.step)
  export_saved_model(embedder, args.output)
  print(f"Wrote {args.output} ({directory_size(args.output) / 1e6:.1f} MB): step "
        f"{embedder.step}, signatures {list(embedder.modality_names)}, inputs (batch, H, W, 3) "
        f"float32 in [0, 255] (resized to {embedder.height} x {embedder.width}), outputs "
        f"(batch, {embedder.embedding_dim}) unit embeddings.")


if __name__ == "__main__":
  main()
