"""End-to-end tests of the command line (`python -m mmreid_jax.main`) and the workdir contract of
DESIGN.md section 8, on the `tiny` preset (6 steps, checkpoints at 3 and 6).

Each run is a subprocess; they share the session's persistent compilation cache, so only the
first compiles the train step and the evaluation forward pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# For `--dist loadgroup`, with test_train.py (whose comment says why `compile_lock` is needed).
pytestmark = pytest.mark.xdist_group("training")
DIRECTIONS = ("rgb->ir", "rgb->depth", "ir->rgb", "ir->depth", "depth->rgb", "depth->ir")
# Capture-to-capture retrieval with every modality and with modalities left out.
FUSED = {"fused/all", "fused/missing-rgb", "fused/missing-ir", "fused/missing-depth",
         "fused/missing-rgb+ir", "fused/missing-rgb+depth", "fused/missing-ir+depth"}
PROTOCOLS = set(DIRECTIONS) | {"all"} | FUSED
MODALITIES = ("rgb", "ir", "depth")
RATES = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


def run_main(workdir: Path, data_dir: str, cache_dir: str, *flags: str
             ) -> subprocess.CompletedProcess:
  """`python -m mmreid_jax.main --config configs/synthetic.py:tiny` with `flags`."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
         "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1"}
  command = [sys.executable, "-m", "mmreid_jax.main", "--config", "configs/synthetic.py:tiny",
             "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)


def table_rows(stdout: str) -> dict[str, str]:
  """The printed results table's row of each protocol."""
  rows = {}
  for line in stdout.splitlines():
    name = line.split(" ", 1)[0]
    if name in PROTOCOLS:
      rows[name] = line
  return rows


def check_report(report: dict, step: int) -> None:
  """WORKDIR/eval/synthetic_mm.json in exactly the format of DESIGN.md section 8, with the
  synthetic set's per-condition entries (mmreid_jax/scene_analysis.py)."""
  assert set(report) == {"dataset", "step", "protocols", "baselines", "conditions",
                         "modal_weights_by_condition", "modality_share_by_condition"}
  assert list(report["conditions"]) == ["clear"]  # the tiny set is all clear
  assert report["conditions"]["clear"] == report["protocols"]
  for key in ("modal_weights_by_condition", "modality_share_by_condition"):
    values = report[key]["clear"]
    assert list(values) == list(MODALITIES)
    assert sum(values.values()) == pytest.approx(1.0, abs=1e-5) and min(values.values()) >= 0
  assert report["dataset"] == "synthetic_mm"
  assert report["step"] == step and isinstance(report["step"], int)
  assert set(report["protocols"]) == PROTOCOLS
  for name, entry in report["protocols"].items():
    assert set(entry) == set(RATES) | {"trials", "std"}, name
    for rate in RATES:
      assert isinstance(entry[rate], float) and 0.0 <= entry[rate] <= 1.0, (name, rate)
    assert entry["rank1"] <= entry["rank5"] <= entry["rank10"] <= entry["rank20"], name
    assert entry["mINP"] <= entry["mAP"] + 1e-9, name
    assert entry["trials"] == 1
    assert set(entry["std"]) == {"rank1", "mAP", "mINP"}
    assert all(value == 0.0 for value in entry["std"].values())  # one trial
  assert set(report["baselines"]) == {"raw_pixel"}
  raw = report["baselines"]["raw_pixel"]
  assert set(raw) == PROTOCOLS
  for name, entry in raw.items():
    assert set(entry) == {"rank1", "mAP", "mINP"}, name
    assert all(0.0 <= value <= 1.0 for value in entry.values()), name


@pytest.fixture(scope="module")
def trained(tfds_data_dir: str, jax_cache_dir: str, tmp_path_factory: pytest.TempPathFactory,
            compile_lock) -> tuple[Path, subprocess.CompletedProcess]:
  """A workdir after `--mode=train` (the default) and that run's output."""
  workdir = tmp_path_factory.mktemp("main") / "run"
  with compile_lock():  # test_train.py compiles the same initialiser and train step
    return workdir, run_main(workdir, tfds_data_dir, jax_cache_dir)


def test_train_writes_the_workdir_contract(trained):
  workdir, result = trained
  assert result.returncode == 0, result.stderr[-5000:]
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_train_steps"] == 6 and config["data"]["name"] == "synthetic_mm/tiny"
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  check_report(json.loads((workdir / "eval" / "synthetic_mm.json").read_text()), step=6)
  events = [p for p in workdir.rglob("events.out.tfevents.*") if p.stat().st_size > 0]
  assert events
  assert "synthetic_mm at step 6" in result.stdout
  assert table_rows(result.stdout).keys() == PROTOCOLS


def test_evaluate_mode_reproduces_the_training_run(trained, tfds_data_dir: str,
                                                   jax_cache_dir: str):
  """`--mode=evaluate` restores the newest checkpoint and prints and writes the same results."""
  workdir, train_result = trained
  assert train_result.returncode == 0
  report_path = workdir / "eval" / "synthetic_mm.json"
  before = report_path.read_text()
  result = run_main(workdir, tfds_data_dir, jax_cache_dir, "--mode=evaluate")
  assert result.returncode == 0, result.stderr[-5000:]
  rows = table_rows(result.stdout)
  assert rows.keys() == PROTOCOLS
  assert rows == table_rows(train_result.stdout)
  assert json.loads(report_path.read_text()) == json.loads(before)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [3, 6]  # evaluation does not train or save


def test_evaluate_an_earlier_step(trained, tfds_data_dir: str, jax_cache_dir: str,
                                  tmp_path: Path):
  """`--step=3` evaluates that checkpoint (on a copy of the workdir, which it rewrites)."""
  workdir, train_result = trained
  assert train_result.returncode == 0
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  result = run_main(copy, tfds_data_dir, jax_cache_dir, "--mode=evaluate", "--step=3")
  assert result.returncode == 0, result.stderr[-5000:]
  assert "synthetic_mm at step 3" in result.stdout
  check_report(json.loads((copy / "eval" / "synthetic_mm.json").read_text()), step=3)


def test_evaluate_a_missing_step_fails(trained, tfds_data_dir: str, jax_cache_dir: str,
                                       tmp_path: Path):
  workdir, train_result = trained
  assert train_result.returncode == 0
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  result = run_main(copy, tfds_data_dir, jax_cache_dir, "--mode=evaluate", "--step=5")
  assert result.returncode != 0
  assert "step 5" in result.stderr and "[3, 6]" in result.stderr, result.stderr[-3000:]
  assert json.loads((copy / "eval" / "synthetic_mm.json").read_text())["step"] == 6


def test_unknown_config_override_fails(tfds_data_dir: str, jax_cache_dir: str, tmp_path: Path):
  result = run_main(tmp_path / "run", tfds_data_dir, jax_cache_dir,
                    "--config.model.nonexistent=1")
  assert result.returncode != 0
  assert "nonexistent" in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_xla_flags_reach_xla_before_the_backend_starts(tmp_path: Path):
  """`config.xla_flags` appended before JAX starts is what XLA runs with (here: a dump folder);
  once the backends run, it is refused by name instead of being ignored."""
  dump = tmp_path / "dump"
  script = (f"from mmreid_jax import runtime; runtime.apply_xla_flags('--xla_dump_to={dump}'); "
            "import jax, jax.numpy as jnp; "
            "jax.jit(lambda x: x * 3)(jnp.ones(4)).block_until_ready()")
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env, timeout=300)
  assert any("jit__lambda" in path.name for path in dump.iterdir())

  import jax

  from mmreid_jax import faults, runtime
  jax.devices()  # the backends run in this process from here on
  runtime.apply_xla_flags("")  # nothing to apply: no error
  with pytest.raises(faults.ConfigError, match="config.xla_flags='--xla_dump_to=x'"):
    runtime.apply_xla_flags("--xla_dump_to=x")


def _heap_after_large_allocation(tunables: str) -> tuple[str, int]:
  """In a fresh process: `apply_glibc_tunables(tunables)`, then a 320 MB NumPy array; returns
  GLIBC_TUNABLES as the process saw it and the size of its brk heap by the kernel's
  /proc/self/maps (glibc maps blocks this large separately unless told not to)."""
  script = (f"from mmreid_jax import runtime; runtime.apply_glibc_tunables({tunables!r}); "
            "import os, numpy as np; a = np.ones(40_000_000); "
            "heap = sum(int(e, 16) - int(s, 16) for s, e in (line.split()[0].split('-') "
            "for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]'))); "
            "print(os.environ.get('GLIBC_TUNABLES', ''), heap, sep='|')")
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  result = subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env=env,
                          timeout=300, capture_output=True, text=True)
  value, heap = result.stdout.strip().split("|")
  return value, int(heap)


def test_glibc_tunables_restart_the_process_with_them():
  """`config.glibc_tunables` reaches glibc: with mmap_max=0 the 320 MB array comes from the brk
  heap (the kernel's memory map says so), without it from a separate mapping; bad entries are
  refused by name."""
  value, heap = _heap_after_large_allocation("glibc.malloc.mmap_max=0")
  assert value == "glibc.malloc.mmap_max=0"
  assert heap >= 320_000_000
  value, heap = _heap_after_large_allocation("")
  assert value == ""
  assert heap < 100_000_000

  from mmreid_jax import faults, runtime
  with pytest.raises(faults.ConfigError, match="config.glibc_tunables='mmap_max=0'"):
    runtime.apply_glibc_tunables("mmap_max=0")
