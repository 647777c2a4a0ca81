"""Training tuples embedded both ways, fused and each modality alone
(`MultimodalReID.train_alone_views`), and what that trains.

The alone view of a slot must be what test time computes for a single image of its modality:
the attention and both fusions are compared, slot by slot, with the same module applied to the
sample with only that slot present. The demo recipe must give the modal attention's query/key
projections and the fusion's pair logits a gradient, which single-modality tuples cannot (a
softmax over one modality is constant): checked with plain SGD, where a parameter moves exactly
when its gradient is non-zero.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmreid_jax import config_lib, train
from mmreid_jax.data.pipeline import train_batches
from mmreid_jax.models.attention import CrossModalAttention
from mmreid_jax.models.fusion import EarlyConcatFusion, MultimodalFusion

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("training")


def random_maps(seed: int = 0, batch: int = 3, slots: int = 3) -> jax.Array:
  """(B, S, h, w, C) non-negative feature maps, as after a ReLU."""
  return jax.nn.relu(jax.random.normal(jax.random.key(seed), (batch, slots, 6, 2, 16)))


def alone_reference(apply, maps: jax.Array, present: np.ndarray) -> np.ndarray:
  """(B, S, ...) the output of `apply(maps, present)` for each slot run with only that slot
  present (zero where the slot is absent)."""
  outputs = []
  for slot in range(present.shape[1]):
    only = np.zeros_like(present)
    only[:, slot] = present[:, slot]
    outputs.append(np.asarray(apply(maps, jnp.asarray(only)))[:, slot])
  return np.stack(outputs, axis=1)


PRESENT = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0]], bool)


@pytest.mark.parametrize("weighting", ["paper", "reliability"])
def test_attention_alone_equals_each_modality_alone(weighting: str):
  maps = random_maps()
  module = CrossModalAttention(reduction=4, attention_dim=8, weighting=weighting)
  variables = module.init(jax.random.key(1), maps, jnp.ones((3, 3), bool), (0, 1, 2))
  apply = lambda m, p, isolated=None: module.apply(variables, m, p, (0, 1, 2), isolated)
  isolated, weights = apply(maps, jnp.asarray(PRESENT), jnp.ones(3, bool))
  reference = alone_reference(lambda m, p: apply(m, p)[0], maps, PRESENT)
  np.testing.assert_allclose(np.asarray(isolated), reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(weights), PRESENT.astype(np.float32))
  # Not isolated, the slots of a multi-modal sample do exchange (the comparison can fail).
  fused, _ = apply(maps, jnp.asarray(PRESENT), jnp.zeros(3, bool))
  assert not np.allclose(np.asarray(fused)[0], reference[0], atol=1e-3)
  # Without the modal attention every slot is alone, and there are no modal weights.
  channel_only = CrossModalAttention(reduction=4, attention_dim=8, modal=False)
  out, none = channel_only.apply(variables, maps, jnp.asarray(PRESENT), (0, 1, 2))
  assert none is None
  np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-6, atol=1e-6)


def test_fusions_alone_equal_each_modality_alone():
  maps = random_maps(2)
  full = jnp.ones((3, 3), bool)
  fusion = MultimodalFusion(num_modalities=3, embed_dim=4, num_stripes=3, part_dim=2)
  variables = fusion.init({"params": jax.random.key(3)}, maps, full, (0, 1, 2), False)
  # Pair logits that differ, so that a wrong pair weighting shows.
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  params["corr_pair_logits"] = jax.random.normal(jax.random.key(4), (3, 3, 3))
  variables = {"params": params}
  embed = lambda m, p, isolated=None: fusion.apply(variables, m, p, (0, 1, 2), False,
                                                   isolated)["embedding"]
  isolated = np.asarray(embed(maps, jnp.asarray(PRESENT), jnp.ones(3, bool)))
  reference = alone_reference(embed, maps, PRESENT)
  np.testing.assert_allclose(isolated[PRESENT], reference[PRESENT], rtol=1e-5, atol=1e-6)
  fused = np.asarray(embed(maps, jnp.asarray(PRESENT), jnp.zeros(3, bool)))
  assert not np.allclose(fused[0], reference[0], atol=1e-3)

  early = EarlyConcatFusion(num_modalities=3, embed_dim=5)
  early_vars = early.init(jax.random.key(5), maps, full, (0, 1, 2))
  embed = lambda m, p, isolated=None: early.apply(early_vars, m, p, (0, 1, 2), isolated)
  isolated = np.asarray(embed(maps, jnp.asarray(PRESENT), jnp.ones(3, bool)))
  np.testing.assert_allclose(isolated, alone_reference(embed, maps, PRESENT), rtol=1e-5,
                             atol=1e-6)


def demo_recipe(data_dir: str):
  """configs/synthetic.py's demo recipe (its tuple sampling and views) on the tiny preset's
  network and data, trained by plain SGD without warm-up, momentum or weight decay."""
  synthetic = ROOT / "configs" / "synthetic.py"
  demo = config_lib.load_config_file(synthetic, "demo")
  config = config_lib.load_config_file(synthetic, "tiny")
  config.data.data_dir = data_dir
  config.data.single_modality_frac = demo.data.single_modality_frac
  config.model.train_alone_views = demo.model.train_alone_views
  config.optim.name = "sgd"
  config.optim.base_learning_rate = 0.05
  config.optim.scale_by_batch = False
  config.optim.warmup_steps = 0
  config.optim.momentum = 0.0
  config.optim.nesterov = False
  config.optim.weight_decay = 0.0
  return config


def test_demo_recipe_trains_the_modal_attention_and_pair_logits(tfds_data_dir, tmp_path,
                                                                persistent_compilation_cache):
  config = demo_recipe(tfds_data_dir)
  trainer = train.Trainer(config, str(tmp_path))
  batch = next(train_batches(trainer.train_set, trainer.sampler, config, 0, 1)
               .as_numpy_iterator())
  assert np.any(batch["present"].sum(axis=1) > 1), "the demo recipe has multi-modal tuples"
  watched = {"query": ("attention", "query", "kernel"), "key": ("attention", "key", "kernel"),
             "pair_logits": ("fusion", "corr_pair_logits")}

  def moved(batch) -> dict[str, float]:
    state = trainer.initial_state()
    before = jax.device_get(state.params)
    after = jax.device_get(trainer.train_step(state, trainer.device_batch(batch))[0].params)
    change = {}
    for name, path in watched.items():
      a, b = before, after
      for key in path:
        a, b = a[key], b[key]
      change[name] = float(np.abs(np.asarray(a) - np.asarray(b)).max())
    return change

  changed = moved(batch)
  assert all(value > 0 for value in changed.values()), changed
  # The same step on single-modality tuples leaves them where they are: a softmax over one
  # modality has no gradient, which is what the demo recipe is there to avoid.
  single = dict(batch)
  keep = np.zeros_like(batch["present"])
  keep[np.arange(len(keep)), np.argmax(batch["present"], axis=1)] = True
  single["present"] = batch["present"] & keep
  single["images"] = batch["images"] * single["present"][..., None, None, None]
  assert moved(single) == {name: 0.0 for name in watched}


def test_reliability_weights_weigh_the_correlation_pairs():
  """With `slot_weights` w, branch 2's stripe feature is sum over present pairs of
  W[m, n] w_m w_n / Z * ([p_m; p_n] projected), W the softmax of the pair logits: written out
  with NumPy from the module's parameters."""
  maps = random_maps(6, batch=2)
  present = np.array([[1, 1, 1], [1, 0, 1]], bool)
  fusion = MultimodalFusion(num_modalities=3, embed_dim=4, num_stripes=2, part_dim=3)
  variables = fusion.init({"params": jax.random.key(7)}, maps, jnp.ones((2, 3), bool),
                          (0, 1, 2), False)
  params = dict(variables["params"])
  params["corr_pair_logits"] = jax.random.normal(jax.random.key(8), (2, 3, 3))
  params["corr_bias"] = jax.random.normal(jax.random.key(9), (2, 3))
  weights = np.array([[0.2, 0.5, 0.3], [0.9, 0.0, 0.1]], np.float32)
  out = fusion.apply({"params": params}, maps, jnp.asarray(present), (0, 1, 2), False, None,
                     jnp.asarray(weights))["embedding"]
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k.startswith("corr")}
  maps_np = np.asarray(maps, np.float64)
  stripes = np.stack([maps_np[:, :, 3 * i:3 * (i + 1)].mean(axis=(2, 3)) for i in range(2)],
                     axis=2)  # (B, S, P, C): 6 rows in two bins of 3
  for b in range(2):
    for i in range(2):
      table = np.zeros((3, 3))
      for m in range(3):
        for n in range(3):
          if present[b, m] and present[b, n]:
            table[m, n] = np.exp(p["corr_pair_logits"][i, m, n]) * weights[b, m] * weights[b, n]
      table /= table.sum()
      expected = sum(table[m, n] * (stripes[b, m, i] @ p["corr_left"][i]
                                    + stripes[b, n, i] @ p["corr_right"][i] + p["corr_bias"][i])
                     for m in range(3) for n in range(3) if table[m, n] > 0)
      scale = float(params["branch_scale"][1])
      got = np.asarray(out)[b, 0, 4 + 3 * i:4 + 3 * (i + 1)] / scale
      np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
