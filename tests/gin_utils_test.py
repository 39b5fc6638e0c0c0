"""The t5x-style gin command line, gin search paths, config dump, and a parse of every .gin file we ship."""

import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys

import gin
import pytest

import xtr_jax
from xtr_jax import gin_utils

REPO = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = REPO / "gin_configs"


def test_rewrite_gin_args():
  out = gin_utils.rewrite_gin_args(["--gin_file=a.gin", "--gin.MODEL_DIR='/tmp/x'", "--gin.train.steps", "3",
                                    "--other"])
  assert out == ["--gin_file=a.gin", "--gin_bindings=MODEL_DIR = '/tmp/x'", "--gin_bindings=train.steps = 3",
                 "--other"]
  with pytest.raises(ValueError, match="needs a value"):
    gin_utils.rewrite_gin_args(["--gin.X"])


def test_search_paths_find_repo_gin_configs():
  assert str(GIN_DIR) in gin_utils.gin_search_paths()


def test_unknown_gin_file_lists_search_paths():
  with pytest.raises(FileNotFoundError) as e:
    gin_utils.resolve_gin_file("models/does_not_exist.gin")
  assert "search paths tried" in str(e.value)
  assert str(GIN_DIR / "models" / "does_not_exist.gin") in str(e.value)


@gin.configurable
def _entry(*, a=gin.REQUIRED, b=2):
  return a, b


def test_files_then_bindings_later_wins_and_config_dump(tmp_path):
  f1 = tmp_path / "one.gin"
  f1.write_text("_entry.a = 1\n_entry.b = 10\n")
  f2 = tmp_path / "two.gin"
  f2.write_text("_entry.b = 20\n")
  args = gin_utils.parse_args([f"--gin_file={f1}", f"--gin_file={f2}", "--gin._entry.a=5"])
  gin_utils.parse_gin(args.gin_file, args.gin_bindings)
  assert _entry() == (5, 20)
  path = gin_utils.write_operative_config(str(tmp_path / "model"))
  text = open(path).read()
  assert "_entry.a = 5" in text and "_entry.b = 20" in text


def test_required_unset_names_it():
  gin_utils.parse_gin([], ["_entry.b = 3"])
  with pytest.raises(RuntimeError, match="a"):
    _entry()


def _import_all_modules():
  for info in pkgutil.walk_packages(xtr_jax.__path__, "xtr_jax."):
    if info.name.endswith("__main__"):
      continue
    importlib.import_module(info.name)


GIN_FILES = sorted(p.relative_to(GIN_DIR).as_posix() for p in GIN_DIR.rglob("*.gin"))


@pytest.mark.parametrize("name", GIN_FILES)
def test_every_gin_file_parses(name):
  _import_all_modules()
  gin_utils.parse_gin([name], [], finalize=False)
  assert gin.config_str() is not None


def test_cli_unknown_configurable_fails_nonzero(tmp_path):
  env = dict(os.environ)
  proc = subprocess.run([sys.executable, "-m", "xtr_jax.partitioning_info", "--gin.no_such_thing.x=1"],
                        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
  assert proc.returncode != 0
  assert "no_such_thing" in proc.stderr


def test_cli_runs_and_dumps_config(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "xtr_jax.partitioning_info", "--gin.make_mesh.data=4",
                         "--gin.make_mesh.model=2", f"--gin.partitioning_info.model_dir='{tmp_path}'"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300,
                        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr
  assert "mesh {'data': 4, 'fsdp': 1, 'model': 2}" in proc.stdout
  assert "make_mesh.model = 2" in (tmp_path / "config.gin").read_text()
