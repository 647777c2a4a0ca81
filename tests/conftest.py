"""Shared fixtures: the prepared `synthetic_mm/tiny` set."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
