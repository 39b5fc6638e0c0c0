"""Test harness: 8 simulated CPU devices, hardware markers, the real-data fixture and BEIR subsets of it.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""

import json
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
def beir_subset(data_dir, tmp_path_factory):
  """Factory `beir_subset(name, queries=Q, docs=D) -> str`: a BEIR dir holding the first Q judged test queries of
  `<data>/beir/<name>`, their judged documents and other documents up to D in all (skips when the dataset is
  absent)."""

  def make(name: str, *, queries: int, docs: int) -> str:
    src = data_dir / "beir" / name
    if not (src / "corpus.jsonl").is_file():
      pytest.skip(f"{name} not found under {src}")
    with open(src / "qrels" / "test.tsv", encoding="utf-8") as f:
      rows = [line.rstrip("\n").split("\t") for line in f][1:]
    qids = list(dict.fromkeys(q for q, _, _ in rows))[:queries]
    rows = [r for r in rows if r[0] in qids]
    judged = {d for _, d, _ in rows}
    with open(src / "corpus.jsonl", encoding="utf-8") as f:
      corpus = [line for line in f if line.strip()]
    kept = [line for line in corpus if json.loads(line)["_id"] in judged]
    kept += [line for line in corpus if json.loads(line)["_id"] not in judged][:docs - len(kept)]
    root = tmp_path_factory.mktemp("beir") / name
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(kept), encoding="utf-8")
    with open(src / "queries.jsonl", encoding="utf-8") as f:
      (root / "queries.jsonl").write_text("".join(line for line in f if line.strip() and json.loads(line)["_id"]
                                                  in set(qids)), encoding="utf-8")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n"
                                                                                   for r in rows), encoding="utf-8")
    return str(root)

  return make


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
