r"""Every cost of training and evaluation, measured in one run on the devices present; prints a
table and writes JSON.

  python scripts/benchmark.py --config configs/benchmark.py --output runs/benchmark.json
  python scripts/benchmark.py --config configs/benchmark.py:r50 --compare-torch \
      --output runs/benchmark_r50.json --skip devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/benchmark.py \
      --config configs/benchmark.py:tiny --output /tmp/b.json        # the devices sweep on CPU

Keys of the JSON (and rows of the table):
  train.step_s             median seconds of a train step (the project's jitted `train_step` on
                           a mesh of every local device, batches from the real pipeline, after
                           `--warmup` steps), train.step_times_s every timed step;
  train.images_per_s       images a second (tuples x slots: every image the network computes);
  train.compile_s          lowering and compiling the step;
  train.flops_per_step     XLA's cost analysis of the compiled step (one device's partitioned
                           program, times the devices);
  train.achieved_flops_per_s, train.matmul_peak_flops_per_s (a float32 matmul of
                           `--matmul-size` on every device of the mesh, timed here),
                           train.fraction_of_peak (their ratio);
  train.torch_step_s, train.jax_over_torch (`--compare-torch`): scripts/torch_baseline.py, the
                           same network, loss and batch shape in PyTorch eager, in a subprocess
                           with this process's thread count;
  pipeline.images_per_s    the tf.data training pipeline alone (decode, augment, batch);
  pipeline.over_train      its rate over the rate a train step consumes images;
  eval.rank_s              `metrics.evaluate_ranking` of a seeded Q x G distance matrix
                           (`--rank-size`, default 2,000 x 20,000), eval.numpy_rank_s a plain
                           per-query NumPy argsort implementation of the same metrics,
                           eval.speedup_vs_numpy their ratio, eval.max_metric_difference the
                           largest difference of their CMC, mAP and mINP (must be ~0);
  eval.peak_bytes          the traced peak memory of `metrics.evaluate_features` on 10,000 x
                           100,000 (`--peak-size`) random features, which computes distances a
                           chunk of queries at a time (eval.dense_bytes: one float32 matrix);
  devices.<n>.step_s       a step on the first n local devices (1, 2, 4, 8, as present) at a
                           fixed per-device batch (`--per-device-tuples`), and its images_per_s.
`--skip train,pipeline,eval,devices` leaves parts out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from mmreid_jax import config_lib  # noqa: E402
PARTS = ("train", "pipeline", "eval", "devices")


def seconds(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


# ------------------------------------------------------------------------------ train step


def matmul_peak(mesh, size: int, repeats: int = 5) -> float:
  """FLOP/s of a float32 (size x size) @ (size x size) matmul on every device of `mesh` at once
  (a batch of them sharded over the "data" axis)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  n = mesh.size
  sharding = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)
  a, b = (jax.device_put(rng.standard_normal((n, size, size), np.float32), sharding)
          for _ in range(2))
  matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=sharding)
  matmul(a, b).block_until_ready()
  best = min(seconds(lambda: matmul(a, b).block_until_ready(), repeats))
  return 2.0 * n * size ** 3 / best


def time_train(config, mesh, steps: int, warmup: int, workdir: str) -> dict[str, Any]:
  """Compiles and times the project's train step on `mesh` with batches of the real pipeline."""
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import train  # pylint: disable=import-outside-toplevel
  from mmreid_jax.data.pipeline import train_batches  # pylint: disable=import-outside-toplevel

  trainer = train.Trainer(config, workdir, mesh=mesh)
  state = trainer.initial_state()
  batches = train_batches(trainer.train_set, trainer.sampler, config, 0, warmup + steps + 1)
  batches = [trainer.device_batch(b) for b in batches.as_numpy_iterator()]
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The cost of the partitioned program is one device's: the step runs it on every device.
  flops = (float(cost.get("flops", float("nan"))) if cost else float("nan")) * mesh.size
  times = []
  for i, batch in enumerate(batches[:warmup + steps]):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  images = int(np.prod(batches[0]["present"].shape))
  step_s = statistics.median(times)
  return {"step_s": step_s, "step_times_s": times, "images_per_step": images,
          "images_per_s": images / step_s, "compile_s": compile_s, "flops_per_step": flops,
          "achieved_flops_per_s": flops / step_s, "devices": mesh.size,
          "num_classes": trainer.sampler.num_classes, "num_modalities": trainer.num_modalities,
          "trainer": trainer}


def torch_step(config_arg: str, overrides: list[str], num_modalities: int, num_classes: int,
               steps: int, warmup: int) -> dict[str, Any]:
  """scripts/torch_baseline.py in a subprocess (PyTorch beside TensorFlow in one process is not
  safe), with this process's cores as threads."""
  command = [sys.executable, str(ROOT / "scripts" / "torch_baseline.py"), "--config", config_arg,
             "--num-modalities", str(num_modalities), "--num-classes", str(num_classes),
             "--steps", str(steps), "--warmup", str(warmup), "--threads",
             str(len(os.sched_getaffinity(0)))]
  if overrides:
    raise SystemExit("error: --compare-torch takes the config file's values; drop the overrides.")
  result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
  if result.returncode:
    raise SystemExit(f"error: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- pipeline


def time_pipeline(trainer, config, batches: int) -> dict[str, Any]:
  """Images a second of the tf.data training pipeline alone (after one warm-up batch)."""
  from mmreid_jax.data.pipeline import train_batches  # pylint: disable=import-outside-toplevel

  iterator = train_batches(trainer.train_set, trainer.sampler, config, 0,
                           batches + 1).as_numpy_iterator()
  first = next(iterator)
  images = int(np.prod(first["present"].shape))
  start = time.perf_counter()
  count = sum(1 for _ in iterator)
  elapsed = time.perf_counter() - start
  return {"images_per_s": images * count / elapsed, "batches": count, "seconds": elapsed}


# ------------------------------------------------------------------------------ evaluation


def numpy_reference_rank(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray,
                         q_cams: np.ndarray, g_cams: np.ndarray, max_rank: int
                         ) -> tuple[np.ndarray, float, float]:
  """CMC, mAP and mINP under the "market" rule, one query at a time with a stable argsort of
  its row (Torchreid's eval_market1501 with AGW's mINP)."""
  cmc_sum = np.zeros(max_rank)
  ap_sum = inp_sum = 0.0
  valid = 0
  for i in range(distmat.shape[0]):
    order = np.argsort(distmat[i], kind="stable")
    keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
    hits = (g_pids[order][keep] == q_pids[i]).astype(np.float64)
    if not hits.any():
      continue
    valid += 1
    cumulative = hits.cumsum()
    positions = np.flatnonzero(hits)
    cmc = np.minimum(cumulative, 1.0)[:max_rank]
    cmc_sum += np.concatenate([cmc, np.full(max_rank - len(cmc), 1.0)])
    ap_sum += float((cumulative[positions] / (positions + 1.0)).sum() / hits.sum())
    inp_sum += float(hits.sum() / (positions[-1] + 1.0))
  return cmc_sum / valid, ap_sum / valid, inp_sum / valid


def time_ranking(num_q: int, num_g: int, dim: int, seed: int = 0) -> dict[str, Any]:
  """The project's ranking against the plain NumPy one on the same seeded distance matrix."""
  from mmreid_jax import metrics  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  num_ids = max(num_g // 20, 1)
  q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
  # Features near their identity's centre, so that rankings are neither perfect nor random.
  centres = rng.normal(size=(num_ids, dim)).astype(np.float32)
  query = centres[q_pids] + 1.5 * rng.normal(size=(num_q, dim)).astype(np.float32)
  gallery = centres[g_pids] + 1.5 * rng.normal(size=(num_g, dim)).astype(np.float32)
  distmat = metrics.cosine_distance(query, gallery)
  start = time.perf_counter()
  result = metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
  rank_s = time.perf_counter() - start
  start = time.perf_counter()
  cmc, ap, inp = numpy_reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, 20)
  numpy_s = time.perf_counter() - start
  difference = max(float(np.abs(result.cmc - cmc).max()), abs(result.mAP - ap),
                   abs(result.mINP - inp))
  return {"rank_s": rank_s, "numpy_rank_s": numpy_s, "speedup_vs_numpy": numpy_s / rank_s,
          "max_metric_difference": difference, "size": [num_q, num_g],
          "rank1": float(result.cmc[0]), "mAP": float(result.mAP)}


def ranking_peak_bytes(num_q: int, num_g: int, dim: int, seed: int = 0) -> dict[str, Any]:
  """Traced peak memory of `metrics.evaluate_features` on random features (the features
  themselves excluded: they are allocated before tracing starts)."""
  from mmreid_jax import metrics  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  num_ids = max(num_g // 20, 1)
  query = rng.normal(size=(num_q, dim)).astype(np.float32)
  gallery = rng.normal(size=(num_g, dim)).astype(np.float32)
  q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
  q_cams, g_cams = rng.integers(0, 6, num_q), rng.integers(0, 6, num_g)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    metrics.evaluate_features(query, gallery, q_pids, g_pids, q_cams, g_cams)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  return {"peak_bytes": int(peak), "peak_size": [num_q, num_g], "peak_dim": dim,
          "dense_bytes": 4 * num_q * num_g, "peak_seconds": time.perf_counter() - start}


# -------------------------------------------------------------------------------- devices


def time_devices(config, per_device_tuples: int, counts: list[int], steps: int, warmup: int,
                 workdir: str) -> dict[str, Any]:
  """A step on the first n local devices for each n of `counts`, at `per_device_tuples` tuples
  per device (P = n * per_device_tuples / K identities of K tuples)."""
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import train_step  # pylint: disable=import-outside-toplevel

  out = {}
  k = config.data.tuples_per_identity
  for n in counts:
    tuples = n * per_device_tuples
    if tuples % k:
      raise SystemExit(f"error: {tuples} tuples on {n} devices is not a multiple of "
                       f"data.tuples_per_identity={k}.")
    variant = config.copy_and_resolve_references()
    variant.data.num_identities = tuples // k
    mesh = train_step.make_mesh(jax.local_devices()[:n])
    timed = time_train(variant, mesh, steps, warmup, os.path.join(workdir, f"devices{n}"))
    out[str(n)] = {key: timed[key] for key in ("step_s", "images_per_s", "images_per_step",
                                              "compile_s")}
    print(f"  devices {n}: {timed['step_s']:.3f} s a step, {timed['images_per_s']:.1f} "
          "images/s", flush=True)
  return out


# ------------------------------------------------------------------------------------ main


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def table(results: dict[str, Any]) -> str:
  rows = []
  for key, value in flatten(results).items():
    if isinstance(value, float):
      text = f"{value:.4g}"
    elif isinstance(value, list):
      text = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    else:
      text = str(value)
    rows.append(f"{key:<34} {text}")
  return "\n".join(rows)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  overrides = [a for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="configs/NAME.py[:preset]")
  parser.add_argument("--output", required=True, help="The JSON file to write.")
  parser.add_argument("--workdir", default=None,
                      help="Scratch folder of the trainers (default: beside --output).")
  parser.add_argument("--steps", type=int, default=5, help="Timed train steps.")
  parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
  parser.add_argument("--compare-torch", action="store_true")
  parser.add_argument("--pipeline-batches", type=int, default=30)
  parser.add_argument("--matmul-size", type=int, default=2048)
  parser.add_argument("--rank-size", default="2000x20000", help="Q x G of eval.rank_s.")
  parser.add_argument("--peak-size", default="10000x100000", help="Q x G of eval.peak_bytes.")
  parser.add_argument("--feature-dim", type=int, default=256)
  parser.add_argument("--per-device-tuples", type=int, default=4)
  parser.add_argument("--devices", default=None,
                      help="Device counts of the sweep (default: 1, 2, 4, 8 up to the local ones).")
  parser.add_argument("--skip", default="", help=f"Comma-separated parts of {PARTS} to leave out.")
  args = parser.parse_args(argv)
  args.skip = {p for p in args.skip.split(",") if p}
  if args.skip - set(PARTS):
    parser.error(f"--skip={','.join(sorted(args.skip))}; parts are {', '.join(PARTS)}.")
  return args, overrides


def main(argv: list[str] | None = None) -> int:
  args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    config = config_lib.load_config_with_overrides(args.config, overrides)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from error
  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel
  from mmreid_jax import runtime  # pylint: disable=import-outside-toplevel

  try:  # Restarts this script with the tunables (PyTorch's subprocess inherits them).
    runtime.apply_glibc_tunables(config.get("glibc_tunables", ""))
    runtime.apply_xla_flags(config.get("xla_flags", ""))
  except faults.ConfigError as error:
    raise SystemExit(f"error: {error}") from error
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import train_step  # pylint: disable=import-outside-toplevel

  workdir = args.workdir or os.path.splitext(args.output)[0] + "_work"
  results: dict[str, Any] = {
      "config": args.config, "overrides": overrides,
      "machine": {"backend": jax.default_backend(), "local_devices": jax.local_device_count(),
                  "device_kind": jax.local_devices()[0].device_kind,
                  "cpu_cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
                  "dtype": config.dtype, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}}
  trainer = None
  if "train" not in args.skip or "pipeline" not in args.skip:
    mesh = train_step.make_mesh(jax.local_devices())
    print(f"Train step on {mesh.size} local devices ...", flush=True)
    timed = time_train(config, mesh, args.steps, args.warmup, os.path.join(workdir, "train"))
    trainer = timed.pop("trainer")
    peak = matmul_peak(mesh, args.matmul_size)
    results["train"] = {**{k: v for k, v in timed.items()
                           if k not in ("num_classes", "num_modalities")},
                        "matmul_peak_flops_per_s": peak,
                        "fraction_of_peak": timed["achieved_flops_per_s"] / peak}
    if args.compare_torch:
      print("PyTorch step ...", flush=True)
      torch = torch_step(args.config, overrides, timed["num_modalities"], timed["num_classes"],
                         args.steps, args.warmup)
      results["train"].update({"torch_step_s": torch["torch_step_s"],
                               "torch_step_times_s": torch["step_times_s"],
                               "torch_threads": torch["threads"],
                               "torch_version": torch["torch_version"],
                               "jax_over_torch": timed["step_s"] / torch["torch_step_s"]})
  if "pipeline" not in args.skip:
    print("Input pipeline ...", flush=True)
    results["pipeline"] = time_pipeline(trainer, config, args.pipeline_batches)
    results["pipeline"]["over_train"] = (results["pipeline"]["images_per_s"]
                                         / results["train"]["images_per_s"])
  if "eval" not in args.skip:
    print("Ranking ...", flush=True)
    rank_q, rank_g = (int(v) for v in args.rank_size.lower().split("x"))
    peak_q, peak_g = (int(v) for v in args.peak_size.lower().split("x"))
    results["eval"] = {**time_ranking(rank_q, rank_g, args.feature_dim),
                       **ranking_peak_bytes(peak_q, peak_g, args.feature_dim)}
  if "devices" not in args.skip:
    counts = ([int(n) for n in args.devices.split(",")] if args.devices else
              [n for n in (1, 2, 4, 8) if n <= jax.local_device_count()])
    print(f"Devices {counts} at {args.per_device_tuples} tuples each ...", flush=True)
    results["devices"] = time_devices(config, args.per_device_tuples, counts, args.steps,
                                      args.warmup, workdir)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(args.output + ".tmp", args.output)
  print(table(results))
  print(f"Wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
