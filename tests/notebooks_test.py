"""The Colab notebooks execute end to end (nbclient, python3 kernel) in their tiny configuration.

XTR_JAX_NOTEBOOK_TINY=1 switches each notebook to tiny sizes (a few dozen SciFact documents from the shared data, or a
corpus generated in the notebook when the data is absent); any exception in any cell fails the test. The kernel
inherits this process's environment, including conftest's 8 simulated CPU devices, so the training notebook also
exercises the multi-device batch sharding.
"""

import os
import pathlib

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("quickstart", "train_xtr", "analysis")


def _run(name: str, workdir: pathlib.Path) -> nbformat.NotebookNode:
  book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  client = NotebookClient(book, kernel_name="python3", timeout=600, allow_errors=False,
                          resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env={**os.environ, "XTR_JAX_NOTEBOOK_TINY": "1", "XTR_JAX_NOTEBOOK_WORKDIR": str(workdir)})
  return book


def _text_outputs(book: nbformat.NotebookNode) -> str:
  parts = []
  for cell in book.cells:
    for out in cell.get("outputs", []):
      if out.get("output_type") == "stream":
        parts.append(out["text"])
      elif "data" in out and "text/plain" in out["data"]:
        parts.append(out["data"]["text/plain"])
  return "\n".join(parts)


def test_notebooks_are_stored_without_outputs():
  for name in NAMES:
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(book)
    assert book.metadata["kernelspec"]["name"] == "python3"
    for cell in book.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{name}: outputs not cleared"
    first = book.cells[1].source
    assert "pip" in first and "find_spec(\"xtr_jax\")" in first, f"{name}: first code cell must install xtr_jax"
    assert "XTR_JAX_NOTEBOOK_TINY" in "".join(c.source for c in book.cells)
    assert "jax.default_backend()" in "".join(c.source for c in book.cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_tiny(name, tmp_path):
  book = _run(name, tmp_path)
  text = _text_outputs(book)
  # The kernel inherits this process's environment (JAX_PLATFORMS, XLA_FLAGS), hence its backend.
  assert f"backend {jax.default_backend()!r}" in text and "tiny=True" in text
  plots = sum("image/png" in out.get("data", {}) for cell in book.cells for out in cell.get("outputs", []))
  if name == "quickstart":
    assert "(* = judged relevant)" in text and "query tokens retrieved a token of the top document" in text
  elif name == "train_xtr":
    assert "no overlap" in text  # the train/test overlap check ran before training
    assert (tmp_path / "train_xtr" / "model_dir" / "model" / "xtr_jax_config.json").is_file()
    assert "nDCG@10" in text
    assert plots == 1  # the TensorBoard scalars
  else:
    assert (tmp_path / "analysis" / "eval" / "summary.tsv").is_file()
    assert plots == 2  # k' sweep, token ratios
    assert "gold" in text and "lexical" in text
