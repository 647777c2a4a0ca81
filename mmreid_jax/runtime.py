"""Process set-up before JAX starts its backends: XLA flags and glibc tunables from the config,
the multi-process runtime (`jax.distributed`), and the filter of library log chatter.

`mmreid_jax.main` calls these in order (glibc tunables first: applying them restarts the
process); scripts/benchmark.py applies the same config keys.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys


class DropLibraryChatter(pylogging.Filter):
  """Drops orbax's per-save INFO lines (dozens per checkpoint), and asyncio's reports of orbax
  writes whose failure the run has already reported (a save that found no space); other
  warnings and errors pass."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.name == "asyncio" and "orbax" in record.getMessage():
      return False
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def apply_xla_flags(xla_flags: str) -> None:
  """Appends `config.xla_flags` to the XLA_FLAGS environment variable, which XLA reads once,
  when JAX starts its backends; so this must run before anything touches JAX's devices.

  Raises:
    ConfigError: the backends already started (the flags would be silently ignored).
  """
  if not xla_flags:
    return
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  if xla_bridge.backends_are_initialized():
    raise faults.ConfigError(f"config.xla_flags={xla_flags!r} arrived after JAX started its "
                             "backends; set them in the XLA_FLAGS environment variable.")
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), xla_flags]))


_TUNABLE = re.compile(r"glibc\.[a-z_]+\.[a-z_]+=[^:=]+")


def apply_glibc_tunables(tunables: str) -> None:
  """Restarts this process (the same interpreter and command line) with `config.glibc_tunables`
  ("glibc.NAMESPACE.NAME=VALUE" entries joined by ":") merged into the GLIBC_TUNABLES environment
  variable, which glibc reads only when a process starts. Nothing happens when they are already
  there (as after the restart) or when `tunables` is empty; entries of GLIBC_TUNABLES that
  `tunables` does not name are kept.

  configs/benchmark.py keeps freed host memory for reuse and backs it with transparent huge
  pages: XLA's CPU client maps a fresh temporary buffer for every step and unmaps it after (4.3 GB
  for ResNet-50 at 48 images: 1.2 million page faults and 1.8 s of kernel time a step on 2 cores,
  docs/performance.md).

  Raises:
    ConfigError: an entry not of the form glibc.NAMESPACE.NAME=VALUE.
  """
  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  wanted = [entry for entry in tunables.split(":") if entry]
  for entry in wanted:
    if not _TUNABLE.fullmatch(entry):
      raise faults.ConfigError(f"config.glibc_tunables={tunables!r}: {entry!r} is not of the form "
                               "glibc.NAMESPACE.NAME=VALUE (entries joined by ':').")
  current = os.environ.get("GLIBC_TUNABLES", "")
  merged = dict(entry.split("=", 1) for entry in current.split(":") if "=" in entry)
  merged.update(entry.split("=", 1) for entry in wanted)
  value = ":".join(f"{name}={setting}" for name, setting in merged.items())
  if not wanted or value == current:
    return
  os.environ["GLIBC_TUNABLES"] = value
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, auto: bool) -> None:
  """Joins the processes of a multi-process run (before anything else touches JAX's devices).

  With a coordinator address, the process count and id are required; with `auto`, JAX's
  cluster detection supplies all three. CPU devices exchange data through gloo (the
  collectives of multi-process CPU runs, as the tests use on localhost).

  Raises:
    ConfigError: a coordinator address without the count or id, or an id out of range.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from mmreid_jax import faults  # pylint: disable=import-outside-toplevel

  if coordinator_address is None and not auto:
    if num_processes is not None or process_id is not None:
      raise faults.ConfigError("--num_processes and --process_id need --coordinator_address "
                               "(host:port of process 0).")
    return
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise faults.ConfigError(f"--coordinator_address={coordinator_address} needs "
                               "--num_processes and --process_id.")
    if not 0 <= process_id < num_processes:
      raise faults.ConfigError(f"--process_id={process_id}; expected 0 to {num_processes - 1} "
                               f"for --num_processes={num_processes}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
