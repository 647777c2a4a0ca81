r"""Writes tests/data/agw_caj_loss_reference.npz: AGW's and CAJ's triplet losses computed by the
authors' own code, for `tests/test_baselines.py` to compare `mmreid_jax.losses` against.

  git clone https://github.com/mangye16/Cross-Modal-Re-ID-baseline /tmp/agw
  pip install torch numpy          # any CPU build; not a dependency of the package
  python tests/make_loss_reference.py --repo /tmp/agw [--output PATH]

`--repo` is a checkout of AGW's cross-modal code: `loss.py` at its top holds AGW's
`TripletLoss_WRT`, `ICCV21_CAJ/loss.py` CAJ's `TripletLoss_ADP`; both files are imported from
there as they are (nothing of them is copied into this project). For each feature scale of
`SCALES`, seeded float32 embeddings of `NUM_ROWS` rows (`NUM_IDS` identities, rows of one
identity near a common centre, all times the scale) go through each loss of `LOSSES` in float32,
as the authors train; the file stores the embeddings, the labels, each loss's value and its
gradient with respect to the embeddings, and the same on the rows that `VALID` keeps (the
project's losses must give those from the whole batch with the other rows marked invalid).
It also stores the repository's commit and the torch version. About 160 kB.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
from pathlib import Path

import numpy as np

REFERENCE_PATH = Path(__file__).resolve().parent / "data" / "agw_caj_loss_reference.npz"
SCALES = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0)
NUM_IDS, ROWS_PER_ID, DIM = 4, 4, 32
NUM_ROWS = NUM_IDS * ROWS_PER_ID
# Rows the "valid" variant keeps (two of them are dropped from each of two identities).
VALID = np.array([True] * NUM_ROWS)
VALID[[1, 6, 9, 14]] = False
# Name: (authors' file, class, constructor keywords). CAJ's training script runs adp with
# --alpha 1 --gamma 1 --square 1; the others cover its soft-margin form and sharper mining.
LOSSES = {
    "wrt": ("loss.py", "TripletLoss_WRT", {}),
    "adp_square": ("ICCV21_CAJ/loss.py", "TripletLoss_ADP",
                   {"alpha": 1, "gamma": 1, "square": 1}),
    "adp_soft": ("ICCV21_CAJ/loss.py", "TripletLoss_ADP", {"alpha": 1, "gamma": 1, "square": 0}),
    "adp_square_a2_g05": ("ICCV21_CAJ/loss.py", "TripletLoss_ADP",
                          {"alpha": 2, "gamma": 0.5, "square": 1}),
    "adp_soft_a2_g05": ("ICCV21_CAJ/loss.py", "TripletLoss_ADP",
                        {"alpha": 2, "gamma": 0.5, "square": 0}),
}


def embeddings(scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Seeded ``(NUM_ROWS, DIM)`` float32 embeddings at ``scale`` and their ``(NUM_ROWS,)`` ids."""
  rng = np.random.default_rng(round(scale * 1000))
  pids = np.repeat(np.arange(NUM_IDS), ROWS_PER_ID)
  centres = rng.standard_normal((NUM_IDS, DIM))
  x = centres[pids] + 0.7 * rng.standard_normal((NUM_ROWS, DIM))
  return (scale * x).astype(np.float32), pids


def load_module(path: Path):
  spec = importlib.util.spec_from_file_location(f"authors_{path.parent.name}_loss", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description="Write AGW's and CAJ's triplet losses (the "
                                               "authors' code) on seeded embeddings.")
  parser.add_argument("--repo", required=True,
                      help="checkout of github.com/mangye16/Cross-Modal-Re-ID-baseline")
  parser.add_argument("--output", default=str(REFERENCE_PATH), help="the .npz to write")
  args = parser.parse_args()
  import torch

  repo = Path(args.repo)
  commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "unknown"
  arrays = {"scales": np.array(SCALES), "valid": VALID,
            "source": np.array(f"{commit}; torch {torch.__version__}")}
  modules = {}
  for index, scale in enumerate(SCALES):
    x, pids = embeddings(scale)
    arrays[f"embeddings_{index}"], arrays[f"pids_{index}"] = x, pids
    for name, (file, cls, kwargs) in LOSSES.items():
      if file not in modules:
        modules[file] = load_module(repo / file)
      loss_fn = getattr(modules[file], cls)(**kwargs)
      for suffix, rows in (("", slice(None)), ("_valid", VALID)):
        inputs = torch.tensor(x[rows], requires_grad=True)
        value, _ = loss_fn(inputs, torch.tensor(pids[rows]))
        value.backward()
        arrays[f"{name}{suffix}_value_{index}"] = np.float32(value.item())
        arrays[f"{name}{suffix}_grad_{index}"] = inputs.grad.numpy().astype(np.float32)
      print(f"scale {scale:>4}: {name:18s} {arrays[f'{name}_value_{index}']:.6g}")
  path = Path(args.output)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **arrays)
  print(f"Wrote {path} ({path.stat().st_size / 1e3:.0f} kB) from {arrays['source']}")


if __name__ == "__main__":
  main()
