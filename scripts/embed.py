r"""Embeds every image of a folder with a trained model; writes the embeddings and an index.

  python scripts/embed.py --workdir runs/demo --images FOLDER --modality ir --output out/ir

writes out/ir.npy, (N, E) float32 unit vectors (row i embeds image i of the index), and
out/ir.json, the index: {"images": the N paths relative to FOLDER (sorted), "modality",
"workdir", "step", "embedding_dim"}. Images (PNG, JPEG, BMP or GIF, searched recursively) are
decoded and resized exactly as evaluation decodes its images (`augment.decode`), then embedded
by `mmreid_jax.inference.Embedder` in batches, with a progress bar on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mmreid_jax.data import augment  # noqa: E402
from mmreid_jax.inference import Embedder  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def find_images(folder: str) -> list[str]:
  """Paths (relative to `folder`, sorted) of the image files under `folder`."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--images={folder!r} is not a folder.")
  found = []
  for root, _, names in os.walk(folder):
    for name in names:
      if name.lower().endswith(IMAGE_SUFFIXES):
        found.append(os.path.relpath(os.path.join(root, name), folder))
  if not found:
    raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {folder!r}.")
  return sorted(found)


def embed_folder(embedder: Embedder, folder: str, modality: str, show_progress: bool = True
                 ) -> tuple[np.ndarray, list[str]]:
  """(N, E) embeddings of the images under `folder` and their relative paths."""
  embedder.modality_index(modality)  # an unknown modality fails before any decoding
  paths = find_images(folder)
  encoded = []
  for path in paths:  # a file that cannot be decoded is named before anything is embedded
    with open(os.path.join(folder, path), "rb") as f:
      encoded.append(f.read())
    augment.check_image(encoded[-1], os.path.join(folder, path))
  files = tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string))
  images = (files.map(lambda image: augment.decode(image, embedder.height, embedder.width),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(embedder.batch_size)
            .prefetch(2))
  outputs = []
  with tqdm(total=len(paths), unit="img", desc=f"embedding {modality}",
            disable=not show_progress, file=sys.stderr) as progress:
    for batch in images.as_numpy_iterator():
      outputs.append(embedder(batch, modality))
      progress.update(len(batch))
  return np.concatenate(outputs), paths


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python scripts/embed.py",
      description="Embed a folder of images with a trained model (.npy plus a JSON index).")
  parser.add_argument("--workdir", required=True, help="the training workdir")
  parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
  parser.add_argument("--modality", required=True, help="the images' modality (e.g. rgb, ir)")
  parser.add_argument("--output", required=True,
                      help="output prefix: writes PREFIX.npy and PREFIX.json")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per forward pass (default: the config's eval.batch_size)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only decodes; JAX owns accelerators.
  embedder = Embedder.from_workdir(args.workdir, args.step, batch_size=args.batch_size)
  embeddings, paths = embed_folder(embedder, args.images, args.modality,
                                   show_progress=not args.no_progress)
  directory = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(directory, exist_ok=True)
  np.save(args.output + ".npy", embeddings)
  index = {"images": paths, "modality": args.modality,
           "workdir": os.path.abspath(args.workdir), "step": embedder.step,
           "embedding_dim": int(embeddings.shape[1])}
  with open(args.output + ".json", "w") as f:
    json.dump(index, f, indent=1)
  print(f"Wrote {args.output}.npy ({embeddings.shape[0]} x {embeddings.shape[1]}) and "
        f"{args.output}.json")


if __name__ == "__main__":
  main()
