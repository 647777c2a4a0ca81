"""scripts/benchmark.py runs end to end on the tiny preset and writes every key it promises (the
times themselves are not tested: benchmarks are scripts, not timed tests); its plain NumPy
ranking is the per-query reference it claims to be."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmreid_jax import metrics
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("training")


def load_benchmark():
  return load_script("benchmark")


def test_numpy_reference_ranking_matches_the_metrics():
  benchmark = load_benchmark()
  rng = np.random.default_rng(5)
  distmat = rng.integers(0, 5, (40, 120)).astype(np.float32)  # many ties
  q_pids, g_pids = rng.integers(0, 8, 40), rng.integers(0, 8, 120)
  q_cams, g_cams = rng.integers(0, 3, 40), rng.integers(0, 3, 120)
  cmc, ap, inp = benchmark.numpy_reference_rank(distmat, q_pids, g_pids, q_cams, g_cams, 20)
  result = metrics.evaluate_ranking(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=20)
  np.testing.assert_allclose(cmc, result.cmc, rtol=0, atol=1e-12)
  assert ap == pytest.approx(result.mAP, abs=1e-12) and inp == pytest.approx(result.mINP,
                                                                              abs=1e-12)


def test_benchmark_writes_every_key(tfds_data_dir: str, jax_cache_dir: str, tmp_path: Path,
                                    compile_lock):
  output = tmp_path / "bench.json"
  env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
         "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  command = [sys.executable, "scripts/benchmark.py", "--config", "configs/benchmark.py:tiny",
             "--output", str(output), "--steps", "2", "--warmup", "1", "--pipeline-batches", "4",
             "--matmul-size", "256", "--rank-size", "300x2000", "--peak-size", "300x200000",
             "--feature-dim", "16", f"--config.data.data_dir={tfds_data_dir}",
             # One of configs/benchmark.py's host-memory entries: enough to see the restart;
             # all four (one malloc arena, huge pages) slow this small run by a third.
             "--config.glibc_tunables=glibc.malloc.mmap_max=0"]
  with compile_lock():
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(output.read_text())
  # The script restarted itself with the glibc tunables.
  assert report["machine"]["glibc_tunables"] == "glibc.malloc.mmap_max=0"
  for key in ("step_s", "images_per_s", "compile_s", "flops_per_step", "achieved_flops_per_s",
              "matmul_peak_flops_per_s", "fraction_of_peak"):
    assert report["train"][key] > 0, key
  assert len(report["train"]["step_times_s"]) == 2
  assert report["train"]["images_per_step"] == 4 * 2 * 3  # P x K tuples x 3 modalities
  assert report["pipeline"]["images_per_s"] > 0 and report["pipeline"]["over_train"] > 0
  assert report["eval"]["max_metric_difference"] < 1e-12
  assert report["eval"]["speedup_vs_numpy"] > 0 and report["eval"]["size"] == [300, 2000]
  assert report["eval"]["peak_bytes"] < report["eval"]["dense_bytes"]
  assert list(report["devices"]) == ["1"] and report["devices"]["1"]["step_s"] > 0
  for line in ("train.fraction_of_peak", "pipeline.over_train", "eval.speedup_vs_numpy",
               "devices.1.step_s"):
    assert line in result.stdout
