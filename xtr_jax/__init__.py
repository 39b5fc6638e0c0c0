"""xtr_jax: XTR (conteXtualized Token Retriever, Lee et al., NeurIPS 2023) in JAX/Flax.

Submodules are imported lazily so that `import xtr_jax` stays cheap (no TensorFlow, no ScaNN).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


def load_pretrained(path: str, **kwargs: Any):
  """Loads an XTR model (HF XTR dir, HF T5 / BERT dir, or an xtr_jax checkpoint dir); see `xtr_jax.models`."""
  return importlib.import_module("xtr_jax.models").load_pretrained(path, **kwargs)


def __getattr__(name: str) -> Any:
  try:
    return importlib.import_module(f"xtr_jax.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"xtr_jax.{name}":
      raise  # a missing dependency of an existing submodule: report it as it is
    raise AttributeError(f"module 'xtr_jax' has no attribute {name!r}") from e
