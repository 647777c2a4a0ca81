"""Identity-balanced modality-tuple sampling, a pure function of (seed, step).

A batch is P identities x K tuples; a tuple holds one image row per modality slot (or -1 where
the identity has no image of that modality). For paired sets (rows share a `tuple_id`) a tuple is
one aligned capture; for unpaired sets each modality's image is drawn independently among the
identity's images of that modality. A share `single_modality_frac` of the tuples keeps only one
randomly chosen present modality, so that the single-modality embeddings used by cross-modal
retrieval are the ones trained. Because the indices of batch `step` depend on (seed, step) only,
a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmreid_jax import faults
from mmreid_jax.data.datasets import ImageSet


@dataclasses.dataclass(frozen=True)
class TupleBatch:
  """Row indices of one batch of N = P * K tuples over S modality slots.

  Attributes:
    rows: (N, S) int64 rows of the ImageSet, -1 where the slot is absent.
    present: (N, S) bool.
    labels: (N,) int32 class index of the tuple's identity (0 .. num_classes - 1).
  """

  rows: np.ndarray
  present: np.ndarray
  labels: np.ndarray


class TupleSampler:
  """Draws P x K modality tuples of an ImageSet.

  Args:
    image_set: the training split.
    num_identities: P.
    tuples_per_identity: K.
    single_modality_frac: probability that a tuple keeps one modality only.
    seed: sampling seed.
  """

  def __init__(self, image_set: ImageSet, num_identities: int, tuples_per_identity: int,
               single_modality_frac: float, seed: int):
    self.num_identities = num_identities
    self.tuples_per_identity = tuples_per_identity
    self.single_modality_frac = single_modality_frac
    self.seed = seed
    self.num_slots = len(image_set.modality_names)
    self.class_pids = np.unique(image_set.pids)
    if num_identities > len(self.class_pids):
      raise faults.ConfigError(
          f"config.data.num_identities={num_identities} (P, of the P x K="
          f"{num_identities} x {tuples_per_identity} batch) is larger than the "
          f"{len(self.class_pids)} identities of the training split; expected at most "
          f"{len(self.class_pids)}.")
    self.paired = bool(np.all(image_set.tuple_ids >= 0))
    # Per identity: a list of candidate tuples, each an (S,) array of rows (-1 = absent); for
    # unpaired sets, per identity and slot the rows to draw from.
    self._tuples: list[np.ndarray] = []
    self._rows_by_slot: list[list[np.ndarray]] = []
    order = np.lexsort((image_set.modalities, image_set.tuple_ids, image_set.pids))
    for pid in self.class_pids:
      rows = order[image_set.pids[order] == pid]
      if self.paired:
        tuple_ids, starts = np.unique(image_set.tuple_ids[rows], return_index=True)
        table = np.full((len(tuple_ids), self.num_slots), -1, np.int64)
        positions = np.searchsorted(tuple_ids, image_set.tuple_ids[rows])
        table[positions, image_set.modalities[rows]] = rows
        self._tuples.append(table)
      else:
        self._rows_by_slot.append(
            [rows[image_set.modalities[rows] == slot] for slot in range(self.num_slots)])

  @property
  def num_classes(self) -> int:
    return len(self.class_pids)

  @property
  def batch_size(self) -> int:
    """Tuples per (global) batch, N = P * K."""
    return self.num_identities * self.tuples_per_identity

  def __call__(self, step: int) -> TupleBatch:
    """The tuples of batch `step`."""
    rng = np.random.default_rng([self.seed, int(step)])
    classes = rng.choice(self.num_classes, self.num_identities, replace=False)
    rows = np.full((self.batch_size, self.num_slots), -1, np.int64)
    for i, label in enumerate(classes):
      block = slice(i * self.tuples_per_identity, (i + 1) * self.tuples_per_identity)
      if self.paired:
        table = self._tuples[label]
        picks = rng.choice(len(table), self.tuples_per_identity,
                           replace=len(table) < self.tuples_per_identity)
        rows[block] = table[picks]
      else:
        for slot, candidates in enumerate(self._rows_by_slot[label]):
          if len(candidates):
            rows[block, slot] = rng.choice(
                candidates, self.tuples_per_identity,
                replace=len(candidates) < self.tuples_per_identity)
    present = rows >= 0
    single = rng.random(self.batch_size) < self.single_modality_frac
    keep_score = np.where(present, rng.random(rows.shape), -1.0)
    keep_one = np.zeros_like(present)
    keep_one[np.arange(self.batch_size), np.argmax(keep_score, axis=1)] = True
    present = np.where(single[:, None], present & keep_one, present)
    rows = np.where(present, rows, -1)
    labels = np.repeat(classes, self.tuples_per_identity).astype(np.int32)
    return TupleBatch(rows=rows, present=present, labels=labels)
