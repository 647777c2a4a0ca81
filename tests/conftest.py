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
