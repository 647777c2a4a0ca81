"""How far float32 rounding can move the gradients that test_resnet_cpu_forms_equal_xla_convolutions
compares: the probe behind that test's initialisation.

Perturbs every parameter by 1e-7 relative (about float32's rounding), recomputes the gradient of the
test's loss with XLA's convolutions, and prints, for each scale of the blocks' last BatchNorm, the
largest change of a gradient entry relative to its array's largest entry (worst of three draws):

  .venv/bin/python tests/probe_resnet_conditioning.py [--depth 50]

Two correct implementations can differ by about this much on another CPU, so the test's tolerance
(1e-4) must sit well above it. docs/performance.md ("CPU forms against XLA") records the output.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_models import numpy_init, scaled_last_norms  # noqa: E402  pylint: disable=wrong-import-position

from mmreid_jax.models.resnet import ResNet  # noqa: E402  pylint: disable=wrong-import-position


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=50)
  args = parser.parse_args()
  rng = np.random.default_rng(4)  # The test's draws, in the test's order.
  x = jnp.asarray(rng.standard_normal((4, 64, 32, 3)), jnp.float32)
  model = ResNet(depth=args.depth, width=8)
  variables = numpy_init(model, rng, x)
  results = {}
  for factor in (1.0, 0.3, 0.1):
    base = {**variables, "params": scaled_last_norms(variables["params"], args.depth, factor)}

    @jax.jit
    def grads(params, base=base):
      def loss(params):
        y, _ = model.apply({**base, "params": params}, x, True, mutable=["batch_stats"])
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
      return jax.grad(loss)(params)

    reference = grads(base["params"])
    worst = 0.0
    for seed in range(3):
      noise = np.random.default_rng(seed)
      moved = jax.tree.map(
          lambda a, noise=noise: a * (1 + 1e-7 * noise.standard_normal(a.shape)).astype(np.float32),
          base["params"])
      worst = max(worst, max(float(np.abs(a - b).max() / np.abs(b).max())
                             for a, b in zip(jax.tree.leaves(grads(moved)),
                                             jax.tree.leaves(reference))))
    results[f"last_norm_scale_x{factor}"] = worst
    print(f"ResNet-{args.depth}, last BatchNorm scale x{factor}: gradients move by up to "
          f"{worst:.1e} of their array's largest entry", flush=True)
  print(json.dumps({"depth": args.depth, "relative_change_for_1e-7_perturbation": results}))


if __name__ == "__main__":
  main()
