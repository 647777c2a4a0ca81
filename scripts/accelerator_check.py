r"""The accelerator path in one command: the project's own training loop (`train.Trainer.train`,
which `python -m mmreid_jax.main` runs, with the tf.data pipeline on the synthetic set) on the
backend JAX finds, timed in bfloat16 and float32; prints a table and writes JSON.

  python scripts/accelerator_check.py --output runs/accelerator_check.json   # paper preset
  python scripts/accelerator_check.py --preset tiny --output /tmp/check.json  # a CPU, seconds
  python scripts/accelerator_check.py --input host_arrays --output runs/check.json  # no TF

`--input pipeline` (default) runs `Trainer.train`, the tf.data pipeline feeding the jitted step.
`--input host_arrays` needs no TensorFlow (a machine where it is not installed): the same jitted
`train_step.train_step`, built as `Trainer` builds it (shardings, donation, optimizers), is fed
seeded random batches of the config's shapes (P x K tuples, one slot per modality, about
`single_modality_frac` single-modality tuples) copied from the host every step, so the step
time includes the host-to-device copy but no decoding or augmentation; `--num-classes`
sizes the classifier (default 395, SYSU-MM01's training identities).

`--preset` is a preset of configs/synthetic.py ("paper": ResNet-50 at 288 x 144, P x K = 8 x 4,
three modalities); `--config.KEY=VALUE` overrides it as on `mmreid_jax.main`'s command line.
Each dtype trains `--warmup` + `--steps` steps from scratch in a temporary workdir (the data
in config.data.data_dir, TFDS's default folder unless overridden, prepared there if missing):
the loop logs every `--warmup` steps and saves one checkpoint at the end.

Keys of the JSON:
  input                   "pipeline" or "host_arrays".
  device                  platform, device_kind, devices (local), jax version.
  runs.<dtype>.step_s     seconds a step over the timed steps (the loop runs at most one step
                          ahead of the device, so their mean is the device's step time);
                          step_times_s each timed step's;
  runs.<dtype>.images_per_step, images_per_s   image slots a step (tuples x slots);
  runs.<dtype>.compile_s  XLA's compilation of the train step in the loop (jax.monitoring);
                          compiles: how often the loop compiled it (1: no recompilation);
  runs.<dtype>.flops_per_step  XLA's cost analysis of the lowered train step (the whole
                          program, every device); achieved_flops_per_s;
  runs.<dtype>.peak_flops_per_s, peak_source, fraction_of_peak   the device's dense peak for
                          the dtype (`PEAKS`, by device_kind, times the devices; float32 on a
                          GPU is its TF32 peak, JAX's default matmul precision; a TPU runs
                          float32 matmuls in bfloat16 passes) or, on a CPU, a float32 matmul
                          timed here;
  runs.<dtype>.input_wait_s, input_wait_fraction, input_kept_up   the median time a timed step
                          waited for its batch, the share of the timed wall time spent
                          waiting, and whether that share is under 5%;
  bf16_speedup            float32's step_s over bfloat16's;
  batch_norm.<form>_s     forward and backward of a training-mode BatchNorm of the paper's
                          stage-1 maps (float32, as the model runs it): `layers.batch_norm_train`
                          (closed-form backward, a custom VJP on every platform) against JAX's
                          autodiff of the plain formula; batch_norm.<form>_reductions the
                          reductions in XLA's optimized program; max_grad_difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402  (scripts/benchmark.py: matmul_peak, table)

from mmreid_jax import config_lib  # noqa: E402

DTYPES = ("bfloat16", "float32")
# Dense peak FLOP/s of one device: (device_kind substring, bfloat16, float32 as JAX runs it).
# The first entry whose substring is in jax.Device.device_kind (case-insensitive) applies.
PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),  # SXM
    ("H200", 989e12, 495e12),
    ("A100", 312e12, 156e12),
    ("L4", 121e12, 60e12),
    ("TPU v4", 275e12, 275e12),
    ("TPU v5 lite", 197e12, 197e12),  # v5e
    ("TPU v5e", 197e12, 197e12),
    ("TPU v5p", 459e12, 459e12),
    ("TPU v5", 459e12, 459e12),
)
KEPT_UP = 0.05  # input_kept_up: the loop waited for data less than this share of the time


def device_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
  """(peak FLOP/s of one device for `dtype`, the table row's name), or None if not listed."""
  for name, bf16, f32 in PEAKS:
    if name.lower() in device_kind.lower():
      return (bf16 if dtype == "bfloat16" else f32), name
  return None


class CompileLog:
  """XLA compilations reported through jax.monitoring: (function name, seconds)."""

  def __init__(self):
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import dispatch  # pylint: disable=import-outside-toplevel

    self.event = dispatch.BACKEND_COMPILE_EVENT
    self.compiles: list[tuple[str, float]] = []
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
    if event == self.event:
      self.compiles.append((str(kwargs.get("fun_name", "")), duration))

  def of(self, name: str) -> list[float]:
    return [seconds for fun_name, seconds in self.compiles if name in fun_name]


def time_training(config, steps: int, warmup: int, workdir: str,
                  compile_log: CompileLog) -> dict[str, Any]:
  """Trains `warmup + steps` steps with `train.Trainer.train` and times the last `steps`."""
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import train  # pylint: disable=import-outside-toplevel
  from mmreid_jax.data.pipeline import train_batches  # pylint: disable=import-outside-toplevel

  config = config.copy_and_resolve_references()
  config.num_train_steps = warmup + steps
  config.log_every_steps = warmup
  config.checkpoint_every_steps = warmup + steps
  config.eval.pictures = False
  trainer = train.Trainer(config, workdir)
  before = len(compile_log.compiles)
  trainer.train()
  compiles = [s for name, s in compile_log.compiles[before:] if "train_step" in name]
  timeline = trainer.timeline
  if len(timeline) != warmup + steps:
    raise RuntimeError(f"The loop ran {len(timeline)} steps, not {warmup + steps}.")
  batch = next(train_batches(trainer.train_set, trainer.sampler, config, 0, 1)
               .as_numpy_iterator())
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated),
      trainer.abstract_state)
  cost = trainer.train_step.lower(abstract_state, trainer.device_batch(batch)).cost_analysis()
  return _timings([end for _, end, _ in timeline], [wait for _, _, wait in timeline[warmup:]],
                  warmup, steps, compiles, cost,
                  int(np.prod(batch["present"].shape)) * jax.process_count(), trainer.mesh.size)


def time_host_arrays(config, steps: int, warmup: int, compile_log: CompileLog,
                     num_classes: int, num_modalities: int) -> dict[str, Any]:
  """Times `warmup + steps` jitted train steps fed from host arrays (no tf.data), the last
  `steps` timed; the loop runs at most one step ahead of the device, as `Trainer.train` does."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel
  from mmreid_jax import train_step as step_lib  # pylint: disable=import-outside-toplevel

  if config.augment.get("exchange_view", False):
    raise SystemExit("error: --input host_arrays builds one slot per modality; "
                     "config.augment.exchange_view=True needs --input pipeline.")
  mesh = step_lib.make_mesh()
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  identities, per_identity = config.data.num_identities, config.data.tuples_per_identity
  batch_size = identities * per_identity
  if batch_size % jax.process_count() or (batch_size // jax.process_count()) % mesh.local_mesh.size:
    raise SystemExit(f"error: {batch_size} tuples a step do not divide over the devices.")
  total_steps = warmup + steps
  config = config.copy_and_resolve_references()
  config.num_train_steps = total_steps
  _, _, init, step_fn = step_lib.build_training(config, num_classes, num_modalities, batch_size,
                                                mesh)
  key = jax.random.key_data(jax.random.key(config.seed))
  state = jax.jit(init, out_shardings=replicated)(key)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      jax.eval_shape(init, key))

  rng = np.random.default_rng(config.seed)
  local = batch_size // jax.process_count()
  host_batches = []
  for _ in range(4):
    present = np.ones((local, num_modalities), bool)
    single = rng.random(local) < config.data.single_modality_frac
    present[single] = np.eye(num_modalities, dtype=bool)[rng.integers(0, num_modalities,
                                                                      single.sum())]
    images = rng.integers(0, 256, (local, num_modalities, config.data.height,
                                   config.data.width, 3), dtype=np.uint8)
    images[~present] = 0
    labels = np.repeat(rng.choice(num_classes, identities, replace=False),
                       per_identity)[:local].astype(np.int32)
    host_batches.append({"images": images, "present": present, "labels": labels})

  def device_batch(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  before = len(compile_log.compiles)
  # Compiled once ahead of the loop: XLA's cost analysis of the compiled program also holds the
  # FLOPs on GPUs, where that of the lowered program has none.
  step_fn = step_fn.lower(abstract_state, device_batch(host_batches[0])).compile()
  ends, waits, previous = [], [], None
  start = time.perf_counter()
  for i in range(total_steps):
    copy_start = time.perf_counter()
    batch = device_batch(host_batches[i % len(host_batches)])
    waits.append(time.perf_counter() - copy_start)
    state, metrics = step_fn(state, batch)
    if previous is not None:
      float(previous[faults.SKIPPED_METRIC])  # one step behind, as Trainer.train reads it
    previous = metrics
    ends.append(time.perf_counter() - start)
  jax.block_until_ready((state, previous))
  ends[-1] = time.perf_counter() - start
  compiles = [s for name, s in compile_log.compiles[before:] if "train_step" in name]
  cost = step_fn.cost_analysis()
  return _timings(ends, waits[warmup:], warmup, steps, compiles, cost,
                  int(np.prod(host_batches[0]["present"].shape)) * jax.process_count(),
                  mesh.size)


def _timings(ends: list[float], waits: list[float], warmup: int, steps: int,
             compiles: list[float], cost: Any, images: int, devices: int) -> dict[str, Any]:
  """The JSON's run entry from the loop's step end times (seconds from its start), the timed
  steps' input waits, the train step's compile times and XLA's cost analysis."""
  step_times = list(np.diff(ends[warmup - 1:]))
  window = ends[-1] - ends[warmup - 1]
  step_s = window / steps
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  return {"step_s": step_s, "step_times_s": step_times, "images_per_step": images,
          "images_per_s": images / step_s, "compile_s": sum(compiles), "compiles": len(compiles),
          "flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
          "input_wait_s": statistics.median(waits), "input_wait_fraction": sum(waits) / window,
          "input_kept_up": sum(waits) / window < KEPT_UP, "devices": devices}


def batch_norm_forms(shape: tuple[int, ...], repeats: int = 5) -> dict[str, Any]:
  """Times forward and backward of training-mode BatchNorm on float32 `shape` (B, H, W, C):
  `layers.batch_norm_train` against autodiff of the plain formula, and counts the reductions
  in each optimized program."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from mmreid_jax.models.layers import batch_norm_train  # pylint: disable=import-outside-toplevel

  eps = 1e-5
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  probe = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
  weight = jnp.ones((shape[0],) + (1,) * (len(shape) - 1), jnp.float32)

  def closed_form(x, scale, bias):
    return jnp.sum(batch_norm_train(x, weight, scale, bias, eps)[0] * probe)

  def autodiff(x, scale, bias):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return jnp.sum(((x - mean) * jax.lax.rsqrt(var + eps) * scale + bias) * probe)

  results: dict[str, Any] = {"shape": list(shape)}
  grads = {}
  for name, loss in (("closed_form", closed_form), ("autodiff", autodiff)):
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = step.lower(x, scale, bias).compile()
    grads[name] = jax.block_until_ready(compiled(x, scale, bias))
    results[f"{name}_s"] = min(benchmark.seconds(
        lambda c=compiled: jax.block_until_ready(c(x, scale, bias)), repeats))
    results[f"{name}_reductions"] = compiled.as_text().count(" reduce(")
  results["max_grad_difference"] = max(
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      for a, b in zip(grads["closed_form"], grads["autodiff"]))
  results["autodiff_over_closed_form"] = results["autodiff_s"] / results["closed_form_s"]
  return results


def write_json(results: dict[str, Any], path: str) -> None:
  """Writes `results` to `path` atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(path + ".tmp", path)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  overrides = [a for a in argv if a.startswith(("--config.", "--noconfig."))]
  argv = [a for a in argv if not a.startswith(("--config.", "--noconfig."))]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="paper", help="A preset of configs/synthetic.py.")
  parser.add_argument("--output", required=True, help="The JSON file to write.")
  parser.add_argument("--steps", type=int, default=20, help="Timed train steps.")
  parser.add_argument("--warmup", type=int, default=5, help="Untimed steps first (>= 1).")
  parser.add_argument("--dtypes", default=",".join(DTYPES), help="Comma-separated.")
  parser.add_argument("--input", choices=("pipeline", "host_arrays"), default="pipeline",
                      help="What feeds the step: Trainer.train's tf.data pipeline, or random "
                      "host arrays (no TensorFlow needed).")
  parser.add_argument("--num-classes", type=int, default=395,
                      help="--input host_arrays: the classifier's identities.")
  parser.add_argument("--num-modalities", type=int, default=3,
                      help="--input host_arrays: the modalities (slots) of a tuple.")
  parser.add_argument("--matmul-size", type=int, default=2048,
                      help="A CPU's peak: the float32 matmul size timed.")
  args = parser.parse_args(argv)
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  if set(args.dtypes) - set(DTYPES) or not args.dtypes:
    parser.error(f"--dtypes={','.join(args.dtypes)}; expected some of {', '.join(DTYPES)}.")
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be at least 1.")
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    config = config_lib.load_config_with_overrides(
        str(ROOT / "configs" / f"synthetic.py:{args.preset}"), overrides)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from error
  if args.input == "pipeline":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns accelerators.
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import train_step  # pylint: disable=import-outside-toplevel
  from mmreid_jax.models.resnet import stage_channels  # pylint: disable=import-outside-toplevel

  device = jax.local_devices()[0]
  results: dict[str, Any] = {
      "preset": args.preset, "overrides": overrides, "input": args.input,
      "device": {"platform": device.platform, "device_kind": device.device_kind,
                 "devices": jax.local_device_count(), "jax": jax.__version__},
      "runs": {}}
  compile_log = CompileLog()
  cpu_peak = None
  with tempfile.TemporaryDirectory() as scratch:
    for dtype in args.dtypes:
      run_config = config.copy_and_resolve_references()
      run_config.dtype = dtype
      workdir = os.path.join(scratch, dtype)
      print(f"Training {args.warmup} + {args.steps} steps in {dtype} ...", flush=True)
      if args.input == "pipeline":
        run = time_training(run_config, args.steps, args.warmup, workdir, compile_log)
      else:
        run = time_host_arrays(run_config, args.steps, args.warmup, compile_log,
                               args.num_classes, args.num_modalities)
      peak = device_peak(device.device_kind, dtype)
      if peak is None:
        if cpu_peak is None:
          cpu_peak = benchmark.matmul_peak(train_step.make_mesh(jax.local_devices()),
                                           args.matmul_size)
        peak = (cpu_peak / run["devices"], "float32 matmul timed here")
      run["peak_flops_per_s"] = peak[0] * run["devices"]
      run["peak_source"] = peak[1]
      run["fraction_of_peak"] = run["achieved_flops_per_s"] / run["peak_flops_per_s"]
      results["runs"][dtype] = run
      write_json(results, args.output)  # what a run cut short (a lease's end) has measured
  if {"bfloat16", "float32"} <= set(results["runs"]):
    results["bf16_speedup"] = (results["runs"]["float32"]["step_s"]
                               / results["runs"]["bfloat16"]["step_s"])
  print("BatchNorm forms ...", flush=True)
  images = next(iter(results["runs"].values()))["images_per_step"]
  results["batch_norm"] = batch_norm_forms(
      (images, config.data.height // 4, config.data.width // 4,
       stage_channels(config.model.depth, config.model.width, 1)))
  write_json(results, args.output)
  print(benchmark.table(results))
  print(f"Wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
