"""t5x-style command line for every `python -m xtr_jax.<verb>`.

    python -m xtr_jax.train --gin_file=experiments/xtr_tiny_squad.gin --gin.MODEL_DIR="'/tmp/run'" \
        --gin.train.total_steps=100 --gin_bindings="train.eval_period = 50"

* `--gin_file` may be repeated; later files win. A relative path is looked up in the gin search paths
  (the package's `gin_configs/`, then `$XTR_JAX_GIN_PATH` entries, then the working directory).
* `--gin.NAME=VALUE` becomes the binding `NAME = VALUE` (VALUE is gin syntax: strings need inner quotes).
* `--gin_bindings` may be repeated and holds raw binding lines.
The operative config (every value actually used) is written by the entry point to `MODEL_DIR/config.gin` with
`write_operative_config`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import gin

_REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin_configs")
_PACKAGE_GIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gin_configs")


def gin_search_paths() -> list[str]:
  """Directories searched for relative gin file names, in order.

  The checkout's top-level `gin_configs/` (editable installs and running from the repo), the installed package-data
  copy `xtr_jax/gin_configs/` (after `pip install`), `$XTR_JAX_GIN_PATH` (os.pathsep separated), and the working
  directory.
  """
  paths = []
  for candidate in (_REPO_GIN_DIR, _PACKAGE_GIN_DIR):
    if os.path.isdir(candidate) and candidate not in paths:
      paths.append(candidate)
  for extra in os.environ.get("XTR_JAX_GIN_PATH", "").split(os.pathsep):
    if extra and extra not in paths:
      paths.append(extra)
  paths.append(os.getcwd())
  return paths


def resolve_gin_file(name: str) -> str:
  """Absolute path of a gin file given absolute or relative to a search path; FileNotFoundError lists the tries."""
  if os.path.isabs(name):
    if os.path.isfile(name):
      return name
    raise FileNotFoundError(f"gin file {name!r} does not exist")
  tried = []
  for base in gin_search_paths():
    candidate = os.path.join(base, name)
    tried.append(candidate)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
      f"gin file {name!r} not found; search paths tried:\n  " + "\n  ".join(tried) +
      "\n(set XTR_JAX_GIN_PATH to add directories)")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) into `--gin_bindings=NAME = VALUE`.

  >>> rewrite_gin_args(["--gin.MODEL_DIR='/tmp/x'"])
  ["--gin_bindings=MODEL_DIR = '/tmp/x'"]
  """
  out = []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" in body:
        name, value = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise ValueError(f"{arg} needs a value: --gin.NAME=VALUE")
        name, value = body, argv[i + 1]
        i += 1
      if not name:
        raise ValueError(f"{arg}: empty binding name")
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
    i += 1
  return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="xtr_jax gin-configured entry point",
      epilog="Gin search paths: " + os.pathsep.join(gin_search_paths()))
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later files win)")
  parser.add_argument("--gin_bindings", action="append", default=[], help="raw gin binding (repeatable)")
  parser.add_argument("--gin_search_path", action="append", default=[], help="extra gin search directory")
  return parser.parse_args(rewrite_gin_args(argv))


def _drop_gin_path_misses(record: logging.LogRecord) -> bool:
  return not (record.name == "root" and str(record.msg).startswith("Path not found:"))


def parse_gin(gin_files: Sequence[str] = (), gin_bindings: Sequence[str] = (),
              extra_search_paths: Sequence[str] = (), *, finalize: bool = True) -> None:
  """Parses gin files (resolved through the search paths) then bindings; bindings win over files."""
  for path in list(extra_search_paths) + gin_search_paths():
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  resolved = [resolve_gin_file(f) for f in gin_files]
  # gin tries every search prefix for an `include` and logs a misleading ERROR for each miss before it finds the
  # file; a real miss still raises IOError listing the prefixes.
  root = logging.getLogger()
  root.addFilter(_drop_gin_path_misses)
  try:
    gin.parse_config_files_and_bindings(resolved, list(gin_bindings), finalize_config=finalize)
  finally:
    root.removeFilter(_drop_gin_path_misses)


def write_operative_config(model_dir: str, *, summary_writer: Any | None = None) -> str:
  """Writes gin's operative config to `model_dir/config.gin` (and optionally TensorBoard text); returns its path."""
  os.makedirs(model_dir, exist_ok=True)
  text = gin.operative_config_str()
  path = os.path.join(model_dir, "config.gin")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  if summary_writer is not None:
    summary_writer(text)
  return path


def run(main: Callable[..., Any], argv: Sequence[str] | None = None, *, allow_empty: bool = False) -> Any:
  """Parses the gin command line and calls `main()` with everything bound through gin.

  Gin errors (unknown configurable, unset REQUIRED value) propagate with gin's message and a non-zero exit.
  """
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if not allow_empty and not args.gin_file and not args.gin_bindings:
    raise SystemExit("no --gin_file or --gin.NAME=VALUE given; see --help")
  parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
  return main()
