"""Shared fixtures: the prepared `synthetic_mm/tiny` set, the compilation cache and its lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite compiles many small programs and runs each a few steps: LLVM's lowest optimisation
# level compiles them several times faster for a slower step (docs/performance.md, "The test
# suite"). Set before JAX starts; subprocesses inherit it (add to XLA_FLAGS, never replace it).
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory):
  """The `synthetic_mm/tiny` builder, prepared once per session in a temporary data_dir."""
  from mmreid_jax.data import datasets

  builder = datasets.get_builder("synthetic_mm/tiny", data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope="session")
def tfds_data_dir(tiny_synthetic) -> str:
  """The `data_dir` holding the prepared `synthetic_mm/tiny`, for configs and subprocesses."""
  return str(tiny_synthetic.data_dir_root)


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A persistent XLA compilation cache for this session (shared by pytest-xdist workers).

  Trainers built from equal configs compile equal programs; on a CPU each costs tens of seconds
  (the initialiser about a minute), so the tests and their subprocesses share compilations.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path = base / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope="session")
def compile_lock(jax_cache_dir: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
  """A lock (one at a time, across pytest-xdist workers) around first compilations of programs
  that several tests share, so that one worker compiles them into `jax_cache_dir` while another
  waits and then loads them, instead of both compiling the same programs on the same cores."""

  @contextlib.contextmanager
  def lock() -> Iterator[None]:
    with open(os.path.join(jax_cache_dir, ".compile.lock"), "w") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  return lock


@pytest.fixture(scope="module")
def persistent_compilation_cache(jax_cache_dir: str):
  """Turns JAX's persistent compilation cache (`jax_cache_dir`) on for a module, then restores
  the settings, so that programs equal to other tests' (the tiny preset's initialiser and train
  step) load instead of compiling again."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc

  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", jax_cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  cc.reset_cache()
  yield jax_cache_dir
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  cc.reset_cache()
