"""Optimizers of the generator and the discriminator: optax transforms and learning-rate schedules
named by `config.optim` / `config.disc_optim`, weight-decay masks and per-group learning rates."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

def learning_rate_schedule(optim: ml_collections.ConfigDict, batch_size: int,
                           num_train_steps: int) -> optax.Schedule:
  """Linear warm-up to the peak rate, then "cosine", "step" or "constant" decay.

  The peak is `base_learning_rate`, times batch / 64 when `scale_by_batch` (the linear scaling
  rule, with the batch counted in tuples).
  """
  peak = optim.base_learning_rate * (batch_size / 64 if optim.scale_by_batch else 1.0)
  warmup = optim.warmup_steps
  remaining = max(num_train_steps - warmup, 1)
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, remaining)
  elif optim.schedule == "step":
    decay = optax.piecewise_constant_schedule(
        peak, {int(f * num_train_steps) - warmup: optim.decay_factor
               for f in optim.decay_boundaries})
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"Unknown learning-rate schedule {optim.schedule!r}; expected 'cosine', "
                     "'step' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


# Parameter names (path endings) never decayed whatever their rank: biases (the fusion's
# per-stripe `corr_bias` too) and softmax logit tables (the fusion's `corr_pair_logits`).
_NO_DECAY_SUFFIXES = ("bias", "logits")


def _weight_decay_mask(params: Any) -> Any:
  """True for the parameters weight decay applies to: kernels and weight matrices (ndim > 1)
  whose name ends in neither "bias" nor "logits"; BatchNorm scales and scalars (ndim <= 1) are
  never decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not parameter_path(path).endswith(_NO_DECAY_SUFFIXES),
      params)


OPTIMIZERS: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule],
                               optax.GradientTransformation]] = {
    "sgd": lambda o, lr: optax.chain(
        optax.add_decayed_weights(o.get("weight_decay", 0.0), _weight_decay_mask),
        optax.sgd(lr, momentum=o.get("momentum", 0.9), nesterov=o.get("nesterov", False))),
    "adam": lambda o, lr: optax.chain(
        optax.add_decayed_weights(o.get("weight_decay", 0.0), _weight_decay_mask),
        optax.adam(lr)),
    "adamw": lambda o, lr: optax.adamw(lr, weight_decay=o.get("weight_decay", 0.0),
                                       mask=_weight_decay_mask),
}


def parameter_path(path: tuple) -> str:
  """A parameter's "/"-joined name, e.g. "shared/layer1_0/conv1/kernel"."""
  return "/".join(str(getattr(key, "key", key)) for key in path)


def scale_by_path(multipliers: Sequence[Sequence[Any]]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the multiplier of the first `(regex, multiplier)`
  pair whose regex `re.search`es its `parameter_path`; 1 where none matches.

  Chained after an optimizer, this is a learning rate per parameter group (PyTorch's
  `param_groups`): SGD's and Adam's updates, weight decay included, are linear in the rate.

  Raises:
    ValueError: an entry that is not a (regex, number) pair, or an invalid regex.
  """
  rules = []
  for entry in multipliers:
    try:
      pattern, multiplier = entry
      rules.append((re.compile(pattern), float(multiplier)))
    except (TypeError, ValueError, re.error) as error:
      raise ValueError(f"config.optim.lr_multipliers entry {entry!r}: {error}; expected "
                       "(regex on the parameter path, multiplier) pairs, e.g. "
                       "(('^(stem_|shared/)', 0.1),).") from None

  def factor(path: tuple) -> float:
    name = parameter_path(path)
    return next((m for pattern, m in rules if pattern.search(name)), 1.0)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u if factor(path) == 1.0 else u * factor(path), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(optim: ml_collections.ConfigDict, batch_size: int,
                   num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transform named by `optim.name` and its schedule.

  `optim.lr_multipliers` ((regex, multiplier) pairs, `scale_by_path`) scales the learning rate of
  parameter groups, e.g. AGW's backbone at 0.1 x the head's; the schedule (and its logged rate)
  is the unscaled one.
  """
  if optim.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {optim.name!r}; known: {sorted(OPTIMIZERS)}.")
  schedule = learning_rate_schedule(optim, batch_size, num_train_steps)
  tx = OPTIMIZERS[optim.name](optim, schedule)
  if optim.get("lr_multipliers", ()):
    tx = optax.chain(tx, scale_by_path(optim.lr_multipliers))
  if optim.get("clip_grad_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_grad_norm), tx)
  return tx, schedule

