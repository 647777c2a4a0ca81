"""scripts/NAME.py loaded as a module by the tests (scripts/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
  """scripts/NAME.py as the module `NAME_script`, registered in sys.modules (dataclasses look
  their module up there)."""
  module_name = f"{name}_script"
  spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module
