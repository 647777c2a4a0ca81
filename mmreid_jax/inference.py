"""Trained models out: embed images with a workdir's checkpoint, outside the training loop.

  embedder = Embedder.from_workdir("runs/demo")            # newest checkpoint, its config
  queries = embedder(ir_images, "ir")                        # (B, E) unit vectors
  captures = embedder({"rgb": rgb_images, "ir": ir_images})  # (B, M * E) unit vectors

An embedding is the one evaluation computes (`evaluate.FeatureExtractor`, whose jitted forward
passes this module runs): images resized to the training size as evaluation resizes them, the
post-BNNeck embedding, summed with the mirrored image's when `config.eval.flip`, L2-normalised.
A multi-modal call embeds aligned captures as evaluation embeds them: one forward pass with the
given modalities present (so the cross-modal attention sees them together), fused by
`evaluate.fuse_modalities` into M * E dimensions, M the dataset's modality count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmreid_jax import evaluate, train, train_step
from mmreid_jax.data import augment, datasets


def l2_normalize(x: jax.Array) -> jax.Array:
  """`evaluate.l2_normalize` in JAX: vectors along the last axis scaled to unit norm."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def restore_variables(workdir: str, config: ml_collections.ConfigDict, step: int | None = None
                      ) -> tuple[dict[str, Any], int]:
  """The model variables ({"params", "batch_stats"}) of WORKDIR's checkpoint `step` (default:
  the newest), and that step."""
  manager = train.checkpoint_manager(workdir, config)
  try:
    step = train.checkpoint_step(manager, step)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  finally:
    manager.close()
  state = restored["state"]
  return {"params": state["params"], "batch_stats": state["batch_stats"]}, int(step)


class Embedder:
  """Embeds images of any size with a trained model, in batches, with evaluation's jitted
  forward pass.

  Args:
    model: the ReID network (`train_step.build_model`).
    variables: its {"params", "batch_stats"}.
    modality_names: the dataset's ordered modalities (the model's modality indices).
    height, width: the model's input size (`config.data.height`, `config.data.width`).
    flip: sum each embedding with the mirrored image's (`config.eval.flip`).
    batch_size: images per forward pass; a call pads its last batch to a power of two (or to
      `batch_size`), so a handful of shapes is compiled.
    step: the checkpoint step the variables come from (for reports), if any.
  """

  def __init__(self, model: nn.Module, variables: dict[str, Any], modality_names: tuple[str, ...],
               height: int, width: int, *, flip: bool = True, batch_size: int = 64,
               step: int | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; expected a positive number of images.")
    self.model = model
    self.variables = jax.device_put(variables)
    self.modality_names = tuple(modality_names)
    self.height, self.width = int(height), int(width)
    self.flip = bool(flip)
    self.batch_size = int(batch_size)
    self.step = step
    self._extractor = evaluate.FeatureExtractor(model, self.variables, self.batch_size)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, *, batch_size: int | None = None,
                   flip: bool | None = None) -> "Embedder":
    """The model of WORKDIR/config.json with the variables of checkpoint `step` (default: the
    newest). `batch_size` and `flip` default to the config's `eval` settings."""
    config = train.read_config(workdir)
    variables, step = restore_variables(workdir, config, step)
    builder = datasets.builder_from_config(config.data)
    modality_names = tuple(builder.MODALITIES)
    stems = sorted(k for k in variables["params"] if k.startswith("stem_"))
    if len(stems) != len(modality_names):
      raise ValueError(f"The checkpoint of {workdir} has {len(stems)} modality stems, but "
                       f"config.data.name={config.data.name!r} has modalities {modality_names}.")
    num_classes = variables["params"]["classifier"]["weights"].shape[0]
    model, _ = train_step.build_model(config, num_classes, len(modality_names))
    return cls(model, variables, modality_names, config.data.height, config.data.width,
               flip=config.eval.flip if flip is None else flip,
               batch_size=config.eval.batch_size if batch_size is None else batch_size,
               step=step)

  @property
  def embedding_dim(self) -> int:
    """E, the width of one modality's embedding."""
    return self.model.embedding_dim

  def modality_index(self, modality: str) -> int:
    """The model's index of modality `modality` ("rgb", "ir", ...)."""
    if modality not in self.modality_names:
      raise ValueError(f"Unknown modality {modality!r}; this model embeds "
                       f"{list(self.modality_names)}.")
    return self.modality_names.index(modality)

  def modality_fn(self, modality: str) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
    """The pure function (variables, images (B, H, W, 3) uint8 at the model's size) -> (B, E)
    float32 unit embeddings of one modality: what a call computes per batch, and what
    `mmreid_jax.export` serves.

    It runs evaluation's jitted forward pass (`evaluate.FeatureExtractor`) on the images and,
    with `flip`, on their mirror images, so a batch of evaluation's size reuses its compiled
    program (from the persistent compilation cache, when one is on).
    """
    forward = self._extractor._embed_fn(self.modality_index(modality))

    def embed(variables: dict[str, Any], images: jax.Array) -> jax.Array:
      embeddings, _ = forward(variables, images)
      if self.flip:
        embeddings = embeddings + forward(variables, jnp.flip(images, axis=2))[0]
      return l2_normalize(embeddings)

    return embed

  def _captures_fn(self, variables: dict[str, Any], images: jax.Array, present: jax.Array
                   ) -> jax.Array:
    """(B, M, H, W, 3) captures, (B, M) presence -> (B, M, E) flip-summed embeddings, with
    evaluation's jitted forward pass of captures."""
    forward = self._extractor._capture_fn(len(self.modality_names))
    embeddings = forward(variables, images, present)
    if self.flip:
      embeddings = embeddings + forward(variables, jnp.flip(images, axis=3), present)
    return embeddings

  def __call__(self, images: np.ndarray | Mapping[str, np.ndarray],
               modality: str | None = None) -> np.ndarray:
    """Embeds images of one modality, or aligned captures of several.

    Args:
      images: (B, H, W, C) uint8 or float images in [0, 255] of any size, C = 3 (or 1 for a
        grey image, repeated to three channels as decoding does); or, for captures, a mapping
        {modality: (B, H, W, C) images} with the same B (and row order) for every modality.
        They are resized to the model's size as evaluation resizes (`augment.resize`; float
        images are rounded to uint8 pixels on the way).
      modality: the images' modality ("rgb", "ir", ...); None for captures.

    Returns:
      (B, E) float32 unit vectors for one modality; (B, M * E) for captures.
    """
    if isinstance(images, Mapping):
      if modality is not None:
        raise ValueError(f"modality={modality!r} with a mapping of images: a multi-modal call "
                         "names each array's modality by its key; leave modality out.")
      return self._embed_captures(images)
    if modality is None:
      raise ValueError(f"Which modality are the images? Pass one of {list(self.modality_names)}"
                       ", or a mapping {modality: images} for multi-modal captures.")
    fn = self.modality_fn(modality)  # checks the name; the jitted forward pass is cached
    images = self._check(images, modality)
    outputs = [np.zeros((0, self.embedding_dim), np.float32)]
    for start in range(0, len(images), self.batch_size):
      chunk = self._prepare(images[start:start + self.batch_size])
      outputs.append(np.asarray(fn(self.variables, self._pad(chunk)))[:len(chunk)])
    return np.concatenate(outputs)

  def _embed_captures(self, images: Mapping[str, np.ndarray]) -> np.ndarray:
    if not images:
      raise ValueError(f"No images: expected a mapping {{modality: images}} over "
                       f"{list(self.modality_names)}.")
    checked = {self.modality_index(name): self._check(array, name)
               for name, array in images.items()}
    sizes = {self.modality_names[m]: len(a) for m, a in checked.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"A multi-modal call needs one image per modality for every capture; "
                       f"got batch sizes {sizes}.")
    count = next(iter(sizes.values()))
    num_modalities = len(self.modality_names)
    present = np.zeros((num_modalities,), bool)
    present[list(checked)] = True
    outputs = [np.zeros((0, num_modalities, self.embedding_dim), np.float32)]
    for start in range(0, count, self.batch_size):
      rows = min(self.batch_size, count - start)
      batch = np.zeros((rows, num_modalities, self.height, self.width, 3), np.uint8)
      for m, array in checked.items():
        batch[:, m] = self._prepare(array[start:start + rows])
      batch = self._pad(batch)
      mask = np.broadcast_to(present, (len(batch), num_modalities))
      outputs.append(np.asarray(self._captures_fn(self.variables, batch, mask))[:rows])
    per_modality = np.concatenate(outputs)
    return evaluate.fuse_modalities(per_modality, np.broadcast_to(present, (count,
                                                                            num_modalities)))

  def _check(self, images: Any, modality: str) -> np.ndarray:
    """Validates (B, H, W, C) images of `modality`; returns them as a NumPy array."""
    images = np.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"Images of modality {modality!r} have shape {images.shape}; expected "
                       "(B, H, W, C) (one image: add a batch axis, images[None]).")
    if images.shape[-1] not in (1, 3):
      raise ValueError(f"Images of modality {modality!r} have {images.shape[-1]} channels "
                       f"(shape {images.shape}); expected 3, or 1 for a grey image.")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"Images of modality {modality!r} have dtype {images.dtype}; expected "
                       "uint8, or float in [0, 255].")
    return images

  def _prepare(self, images: np.ndarray) -> np.ndarray:
    """Checked images -> (B, H, W, 3) uint8 at the model's size."""
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    if images.dtype == np.uint8 and images.shape[1:3] == (self.height, self.width):
      return images  # what resizing would return, bit for bit
    return augment.resize(images, self.height, self.width).numpy()

  def _pad(self, batch: np.ndarray) -> np.ndarray:
    """Zero rows up to the next power of two (at most `batch_size`): few compiled shapes."""
    rows = len(batch)
    target = min(self.batch_size, 1 << max(rows - 1, 0).bit_length())
    target = max(target, rows)
    if target == rows:
      return batch
    return np.concatenate([batch, np.zeros((target - rows,) + batch.shape[1:], batch.dtype)])

