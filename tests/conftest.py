"""Test harness: 8 simulated CPU devices, hardware markers, and the real-data fixture.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA_ENV = "XTR_JAX_DATA_DIR"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long-running test (real data or many steps)")
  config.addinivalue_line("markers", "gpu: needs a GPU (skipped without one)")
  config.addinivalue_line("markers", "tpu: needs a TPU (skipped without one)")


def _has_backend(name: str) -> bool:
  try:
    return len(jax.devices(name)) > 0
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  for marker in ("gpu", "tpu"):
    if _has_backend(marker):
      continue
    skip = pytest.mark.skip(reason=f"no {marker.upper()} on this machine")
    for item in items:
      if marker in item.keywords:
        item.add_marker(skip)


def shared_data_dir() -> pathlib.Path:
  """`$XTR_JAX_DATA_DIR`, else `../shared/data` relative to the repo root."""
  return pathlib.Path(os.environ.get(DATA_ENV, REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  """The real public data (BEIR SciFact/Cranfield, training pairs, vocabularies); skips with a reason if absent."""
  path = shared_data_dir()
  if not path.is_dir():
    pytest.skip(f"real data not found at {path} (set {DATA_ENV} to its location)")
  return path


@pytest.fixture(scope="session")
def t5_vocab(data_dir) -> str:
  path = data_dir / "vocab" / "t5_spiece.model"
  if not path.is_file():
    pytest.skip(f"T5 SentencePiece model not found at {path}")
  return str(path)


@pytest.fixture(scope="session")
def bert_vocab(data_dir) -> str:
  path = data_dir / "vocab" / "bert-base-uncased-vocab.txt"
  if not path.is_file():
    pytest.skip(f"BERT vocab not found at {path}")
  return str(path)


@pytest.fixture(autouse=True)
def _fresh_gin():
  """Gin bindings never leak from one test into another."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  yield
  gin.clear_config()
