"""scripts/accelerator_check.py runs the project's training loop on the tiny preset and writes
every key it promises (the times themselves are not tested); its BatchNorm comparison finds the
closed-form backward equal to autodiff; its table of peaks finds the devices it names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import script_modules  # tests/, on the path as the test's folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("training")


def load_script():
  return script_modules.load_script("accelerator_check")


@pytest.mark.parametrize("device_kind, dtype, peak, row", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "H100"),
    ("NVIDIA H100 PCIe", "float32", 378e12, "H100 PCIe"),
    ("NVIDIA H200", "float32", 495e12, "H200"),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12, "A100"),
    ("NVIDIA L4", "float32", 60e12, "L4"),
    ("TPU v4", "float32", 275e12, "TPU v4"),
    ("TPU v5 lite", "bfloat16", 197e12, "TPU v5 lite"),
    ("TPU v5p", "bfloat16", 459e12, "TPU v5p")])
def test_device_peaks(device_kind: str, dtype: str, peak: float, row: str):
  """Published dense peaks (NVIDIA's and Google's data sheets; float32 on a GPU at TF32)."""
  assert load_script().device_peak(device_kind, dtype) == (peak, row)


def test_a_cpu_has_no_table_peak():
  assert load_script().device_peak("cpu", "float32") is None


def test_accelerator_check_on_the_tiny_preset(tfds_data_dir: str, jax_cache_dir: str,
                                              tmp_path: Path, compile_lock):
  """float32 only: 2 + 4 steps keep the tiny preset's schedule (num_train_steps = 6), so the
  train step is the program the other tests compiled into the shared cache."""
  output = tmp_path / "check.json"
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  command = [sys.executable, "scripts/accelerator_check.py", "--preset", "tiny", "--output",
             str(output), "--dtypes", "float32", "--warmup", "2", "--steps", "4",
             "--matmul-size", "256", f"--config.data.data_dir={tfds_data_dir}"]
  with compile_lock():
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(output.read_text())
  assert report["device"]["platform"] == "cpu" and report["device"]["devices"] >= 1
  run = report["runs"]["float32"]
  for key in ("step_s", "images_per_s", "compile_s", "flops_per_step", "achieved_flops_per_s",
              "peak_flops_per_s", "fraction_of_peak"):
    assert run[key] > 0, key
  assert run["compiles"] == 1  # the loop compiled its step once: no recompilation
  assert run["images_per_step"] == 4 * 2 * 3  # P x K tuples x 3 modalities
  assert len(run["step_times_s"]) == 4
  assert run["step_s"] == pytest.approx(sum(run["step_times_s"]) / 4, rel=1e-9)
  assert 0 <= run["input_wait_fraction"] <= 1
  assert run["input_kept_up"] == (run["input_wait_fraction"] < 0.05)
  assert run["peak_source"] == "float32 matmul timed here"
  assert "bf16_speedup" not in report  # one dtype
  norm = report["batch_norm"]
  assert norm["shape"] == [24, 8, 4, 8]  # the images of a step, stage 1 of the tiny ResNet
  assert norm["max_grad_difference"] < 1e-5  # the custom VJP is BatchNorm's gradient
  assert norm["closed_form_reductions"] <= norm["autodiff_reductions"]
  assert "runs.float32.fraction_of_peak" in result.stdout


def test_host_arrays_input_runs_without_tensorflow(jax_cache_dir: str, tmp_path: Path,
                                                   compile_lock):
  """--input host_arrays (for a machine without TensorFlow) imports neither TensorFlow, TFDS nor
  clu, compiles the step once and times it on batches of the config's shapes; 8 classes and
  2 + 4 steps make the program the tiny preset's (the tiny set has 8 training identities)."""
  output = tmp_path / "check.json"
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  blocked = ("tensorflow", "tensorflow_datasets", "clu")
  program = ("import runpy, sys\n"
             f"sys.modules.update(dict.fromkeys({blocked!r}))  # an import of these fails\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
  command = [sys.executable, "-c", program, "scripts/accelerator_check.py", "--preset", "tiny",
             "--input", "host_arrays", "--num-classes", "8", "--output", str(output),
             "--dtypes", "float32", "--warmup", "2", "--steps", "4", "--matmul-size", "256"]
  with compile_lock():
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  report = json.loads(output.read_text())
  assert report["input"] == "host_arrays"
  run = report["runs"]["float32"]
  assert run["compiles"] == 1
  assert run["images_per_step"] == 4 * 2 * 3
  assert len(run["step_times_s"]) == 4
  assert run["flops_per_step"] > 0 and run["fraction_of_peak"] > 0
  assert run["step_s"] == pytest.approx(sum(run["step_times_s"]) / 4, rel=1e-9)
