"""Checkpoint import/export between Hugging Face layouts and xtr_jax parameters.

Reads:
  * HF `T5EncoderModel` / `T5ForConditionalGeneration` / mT5 dirs (`config.json` + `model.safetensors`, sharded
    safetensors, or `pytorch_model.bin` read with `torch.load(weights_only=True)`); decoder / lm_head tensors are
    ignored;
  * the HF XTR layout of `google/xtr-base-en`: the T5 dir above plus `spiece.model` and `2_Dense/config.json` +
    `2_Dense/pytorch_model.bin` (or `model.safetensors`) holding the bias-free d_model -> 128 linear as sentence-
    transformers stores it (`linear.weight`, [out, in]);
  * HF BERT dirs (`BertModel`, e.g. all-MiniLM-L6-v2), optionally with a `2_Dense/` head, vocab in `vocab.txt`.
Writes the HF XTR layout back (`export_hf_xtr`), so models trained here load in PyTorch (`T5EncoderModel` /
`BertModel` + the 2_Dense linear).

A checkpoint whose tensors do not match the config raises `CheckpointMismatchError` listing the missing, unexpected
and mis-shaped tensors; `allow_partial=True` instead keeps missing tensors at their (seeded) init and lists them.

CLI:
    python -m xtr_jax.convert --gin.convert_xtr_checkpoint.source="'/path/xtr-base-en'" \
        --gin.convert_xtr_checkpoint.output_dir="'/tmp/xtr_base'" \
        [--gin.convert_xtr_checkpoint.output_format="'hf_xtr'"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import numpy as np
from flax import traverse_util

from xtr_jax import gin_utils, models, network

DENSE_DIR = "2_Dense"
_IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "Identity", None)


class CheckpointMismatchError(ValueError):
  """The tensors of a checkpoint do not match the model config (message lists every offending tensor)."""


# ------------------------------------------------------------------------------------------------- reading tensors


def _to_numpy(t: Any) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if t.dtype == torch.bfloat16:
    t = t.float()  # numpy has no bfloat16; widening is exact
  return t.detach().cpu().numpy()


def _load_torch_bin(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types for corrupt/unsafe files)
    raise ValueError(f"{path}: cannot be read as a weights-only torch checkpoint: {e}") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(state).__name__}")
  return {k: _to_numpy(v) for k, v in state.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return dict(load_file(path))
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises SafetensorError / OSError)
    raise ValueError(f"{path}: cannot be read as safetensors: {e}") from e


def read_state_dict(directory: str) -> tuple[dict[str, np.ndarray], str]:
  """(name -> np.ndarray, file described) of the weights in an HF dir; safetensors preferred over .bin."""
  for single, index, loader in (("model.safetensors", "model.safetensors.index.json", _load_safetensors),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_torch_bin)):
    path = os.path.join(directory, single)
    if os.path.isfile(path):
      return loader(path), path
    index_path = os.path.join(directory, index)
    if os.path.isfile(index_path):
      weight_map = models._read_json(index_path).get("weight_map")  # pylint: disable=protected-access
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path}: missing field 'weight_map'")
      state: dict[str, np.ndarray] = {}
      for shard in sorted(set(weight_map.values())):
        state.update(loader(os.path.join(directory, shard)))
      return state, index_path
  raise FileNotFoundError(f"{directory}: no model.safetensors, pytorch_model.bin or sharded index found")


# ------------------------------------------------------------------------------------------------- name mappings


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor: Flax path <-> HF name. kind: "copy" (same shape), "linear" (torch [out, in] -> kernel [in.., out..]
  with `n_in` leading input axes), "reshape" (flat HF bias -> [heads, kv])."""
  flax: str
  hf: str
  kind: str = "copy"
  n_in: int = 1

  def hf_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if self.kind == "linear":
      return (math.prod(flax_shape[self.n_in:]), math.prod(flax_shape[:self.n_in]))
    if self.kind == "reshape":
      return (math.prod(flax_shape),)
    return tuple(flax_shape)

  def to_flax(self, x: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
    if self.kind == "linear":
      return np.ascontiguousarray(x.T).reshape(flax_shape)
    return np.ascontiguousarray(x).reshape(flax_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return np.ascontiguousarray(x.reshape(math.prod(x.shape[:self.n_in]), -1).T)
    if self.kind == "reshape":
      return np.ascontiguousarray(x).reshape(-1)
    return np.ascontiguousarray(x)


def t5_entries(config: network.T5EncoderConfig) -> list[_Entry]:
  _, gated = network.parse_feed_forward_proj(config.feed_forward_proj)
  out = [_Entry("encoder/token_embedding", "shared.weight"),
         _Entry("encoder/relpos_bias", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
         _Entry("encoder/encoder_norm/scale", "encoder.final_layer_norm.weight")]
  for i in range(config.num_layers):
    f, h = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
    out += [_Entry(f"{f}/pre_attention_layer_norm/scale", f"{h}.0.layer_norm.weight"),
            _Entry(f"{f}/attention/query/kernel", f"{h}.0.SelfAttention.q.weight", "linear", 1),
            _Entry(f"{f}/attention/key/kernel", f"{h}.0.SelfAttention.k.weight", "linear", 1),
            _Entry(f"{f}/attention/value/kernel", f"{h}.0.SelfAttention.v.weight", "linear", 1),
            _Entry(f"{f}/attention/out/kernel", f"{h}.0.SelfAttention.o.weight", "linear", 2),
            _Entry(f"{f}/pre_mlp_layer_norm/scale", f"{h}.1.layer_norm.weight"),
            _Entry(f"{f}/mlp/wo/kernel", f"{h}.1.DenseReluDense.wo.weight", "linear", 1)]
    wis = ("wi_0", "wi_1") if gated else ("wi",)
    out += [_Entry(f"{f}/mlp/{w}/kernel", f"{h}.1.DenseReluDense.{w}.weight", "linear", 1) for w in wis]
  return out


def _t5_ignored(name: str) -> bool:
  # Decoder / LM head of T5ForConditionalGeneration and the tied copy of the shared embedding.
  return name.startswith(("decoder.", "lm_head.")) or name == "encoder.embed_tokens.weight"


def bert_entries(config: network.BertEncoderConfig) -> list[_Entry]:
  out = [_Entry("encoder/word_embeddings", "embeddings.word_embeddings.weight"),
         _Entry("encoder/position_embeddings", "embeddings.position_embeddings.weight"),
         _Entry("encoder/token_type_embeddings", "embeddings.token_type_embeddings.weight"),
         _Entry("encoder/embeddings_layer_norm/scale", "embeddings.LayerNorm.weight"),
         _Entry("encoder/embeddings_layer_norm/bias", "embeddings.LayerNorm.bias")]
  for i in range(config.num_layers):
    f, h = f"encoder/layers_{i}", f"encoder.layer.{i}"
    for name in ("query", "key", "value"):
      out += [_Entry(f"{f}/attention/{name}/kernel", f"{h}.attention.self.{name}.weight", "linear", 1),
              _Entry(f"{f}/attention/{name}/bias", f"{h}.attention.self.{name}.bias", "reshape")]
    out += [_Entry(f"{f}/attention/out/kernel", f"{h}.attention.output.dense.weight", "linear", 2),
            _Entry(f"{f}/attention/out/bias", f"{h}.attention.output.dense.bias"),
            _Entry(f"{f}/attention_layer_norm/scale", f"{h}.attention.output.LayerNorm.weight"),
            _Entry(f"{f}/attention_layer_norm/bias", f"{h}.attention.output.LayerNorm.bias"),
            _Entry(f"{f}/intermediate/kernel", f"{h}.intermediate.dense.weight", "linear", 1),
            _Entry(f"{f}/intermediate/bias", f"{h}.intermediate.dense.bias"),
            _Entry(f"{f}/output/kernel", f"{h}.output.dense.weight", "linear", 1),
            _Entry(f"{f}/output/bias", f"{h}.output.dense.bias"),
            _Entry(f"{f}/output_layer_norm/scale", f"{h}.output.LayerNorm.weight"),
            _Entry(f"{f}/output_layer_norm/bias", f"{h}.output.LayerNorm.bias")]
  return out


def _bert_ignored(name: str) -> bool:
  # Position-id buffer, pooler and pre-training heads are not part of the token encoder.
  return name == "embeddings.position_ids" or name.startswith(("pooler.", "cls."))


def _strip_bert_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # BertForMaskedLM & co. prefix the encoder with "bert.".
  if any(k.startswith("bert.") for k in state):
    return {(k[len("bert."):] if k.startswith("bert.") else k): v for k, v in state.items()}
  return state


HEAD_ENTRY = _Entry("token_proj/kernel", "linear.weight", "linear", 1)


def entries_for(config: network.EncoderConfig) -> tuple[list[_Entry], Callable[[str], bool]]:
  if network.encoder_kind(config) == "t5":
    return t5_entries(config), _t5_ignored
  return bert_entries(config), _bert_ignored


# ------------------------------------------------------------------------------------------------- scan layout


# The nn.scan parameter layout helpers live with the network; re-exported here for conversion callers.
stack_layers = network.stack_layers
unstack_layers = network.unstack_layers


# ------------------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did: tensors left at init (only with allow_partial / absent head) and ignored HF tensors."""
  source: str
  left_at_init: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    return (f"{self.source}: {len(self.left_at_init)} tensors left at init {self.left_at_init}; "
            f"{len(self.ignored)} checkpoint tensors ignored")


def _unscanned(config: network.EncoderConfig) -> network.EncoderConfig:
  return dataclasses.replace(config, scan_layers=False)


def hf_state_to_params(state: Mapping[str, np.ndarray], model: models.XTRModel, *, source: str,
                       head_state: Mapping[str, np.ndarray] | None = None, allow_partial: bool = False,
                       seed: int = 0) -> tuple[dict[str, Any], ConversionReport]:
  """Parameters for `model` from an HF encoder state dict (+ optional 2_Dense head `{"linear.weight": [out, in]}`).

  Missing encoder tensors, unexpected tensors (besides known unused ones such as the T5 decoder or BERT pooler) and
  mis-shaped tensors raise CheckpointMismatchError listing all of them, unless allow_partial (missing ones then stay at
  the seeded init and are listed in the report). An absent head (head_state None) is left at init and reported.
  """
  config = model.encoder_config
  flat_model = model if not config.scan_layers else models.XTRModel(
      encoder_config=_unscanned(config), token_dim=model.token_dim, query_max_len=model.query_max_len,
      doc_max_len=model.doc_max_len)
  abstract = traverse_util.flatten_dict(models.unbox_params(flat_model.abstract_variables()), sep="/")
  entries, ignored_fn = entries_for(config)
  if network.encoder_kind(config) == "bert":
    state = _strip_bert_prefix(dict(state))
  report = ConversionReport(source=source)
  out: dict[str, np.ndarray] = {}
  missing, misshaped = [], []
  used = set()
  for entry in entries:
    fshape = tuple(abstract[entry.flax].shape)
    dtype = np.dtype(abstract[entry.flax].dtype)
    name = entry.hf
    if name == "shared.weight" and name not in state and "encoder.embed_tokens.weight" in state:
      name = "encoder.embed_tokens.weight"
    if name not in state:
      missing.append(f"{entry.hf} {entry.hf_shape(fshape)}")
      continue
    used.add(name)
    value = np.asarray(state[name])
    if tuple(value.shape) != entry.hf_shape(fshape):
      misshaped.append(f"{name}: expected {entry.hf_shape(fshape)}, got {tuple(value.shape)}")
      continue
    out[entry.flax] = entry.to_flax(value, fshape).astype(dtype)
  unexpected = []
  for name in sorted(set(state) - used):
    if ignored_fn(name):
      report.ignored.append(name)
    else:
      unexpected.append(f"{name} {tuple(np.shape(state[name]))}")
  if head_state is not None:
    fshape = tuple(abstract[HEAD_ENTRY.flax].shape)
    head_unexpected = sorted(set(head_state) - {HEAD_ENTRY.hf})
    unexpected += [f"{DENSE_DIR}/{k} {tuple(np.shape(head_state[k]))}" for k in head_unexpected]
    if HEAD_ENTRY.hf not in head_state:
      missing.append(f"{DENSE_DIR}/{HEAD_ENTRY.hf} {HEAD_ENTRY.hf_shape(fshape)}")
    elif tuple(np.shape(head_state[HEAD_ENTRY.hf])) != HEAD_ENTRY.hf_shape(fshape):
      misshaped.append(f"{DENSE_DIR}/{HEAD_ENTRY.hf}: expected {HEAD_ENTRY.hf_shape(fshape)}, "
                       f"got {tuple(np.shape(head_state[HEAD_ENTRY.hf]))}")
    else:
      out[HEAD_ENTRY.flax] = HEAD_ENTRY.to_flax(np.asarray(head_state[HEAD_ENTRY.hf]), fshape).astype(
          np.dtype(abstract[HEAD_ENTRY.flax].dtype))
  if misshaped or unexpected or (missing and not allow_partial):
    raise CheckpointMismatchError(
        f"{source}: checkpoint does not match the {network.encoder_kind(config)} config "
        f"(d_model={config.d_model}, num_layers={config.num_layers}):\n  missing: {missing}\n"
        f"  unexpected: {unexpected}\n  mis-shaped: {misshaped}"
        + ("\n(pass allow_partial=True to keep missing tensors at init)" if missing else ""))
  left = sorted(set(abstract) - set(out))
  if left:
    init = traverse_util.flatten_dict(models.unbox_params(flat_model.init(jax.random.key(seed))), sep="/")
    for key in left:
      out[key] = np.asarray(init[key])
    report.left_at_init = left
  params = traverse_util.unflatten_dict(out, sep="/")
  if config.scan_layers:
    params["encoder"] = stack_layers(params["encoder"], config.num_layers)
  return params, report


def params_to_hf_state(params: Any, config: network.EncoderConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(HF encoder state dict, 2_Dense `linear.weight` [token_dim, d_model]) of xtr_jax parameters."""
  params = models.unbox_params(params)
  if config.scan_layers:
    params = dict(params, encoder=unstack_layers(params["encoder"], config.num_layers))
  flat = {k: np.asarray(jax.device_get(v)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
  entries, _ = entries_for(config)
  state = {e.hf: e.to_hf(flat[e.flax]) for e in entries}
  return state, HEAD_ENTRY.to_hf(flat[HEAD_ENTRY.flax])


# ------------------------------------------------------------------------------------------------- HF configs


def t5_config_from_hf(hf: Mapping[str, Any], *, source: str, **overrides: Any) -> network.T5EncoderConfig:
  model_type = hf.get("model_type")
  if model_type not in ("t5", "mt5"):
    raise ValueError(f"{source}: field 'model_type': expected 't5' or 'mt5', got {model_type!r}")
  values = {"vocab_size": hf.get("vocab_size", 32128), "d_model": hf.get("d_model", 512), "d_kv": hf.get("d_kv", 64),
            "d_ff": hf.get("d_ff", 2048), "num_layers": hf.get("num_layers", 6), "num_heads": hf.get("num_heads", 8),
            "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
            "relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
            "dropout_rate": hf.get("dropout_rate", 0.1), "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
            "feed_forward_proj": hf.get("feed_forward_proj", "relu")}
  values.update(overrides)
  try:
    return network.T5EncoderConfig(**values)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def bert_config_from_hf(hf: Mapping[str, Any], *, source: str, **overrides: Any) -> network.BertEncoderConfig:
  if hf.get("model_type") != "bert":
    raise ValueError(f"{source}: field 'model_type': expected 'bert', got {hf.get('model_type')!r}")
  pos_type = hf.get("position_embedding_type", "absolute")
  if pos_type != "absolute":
    raise ValueError(f"{source}: field 'position_embedding_type': expected 'absolute', got {pos_type!r}")
  values = {"vocab_size": hf.get("vocab_size", 30522), "hidden_size": hf.get("hidden_size", 768),
            "num_layers": hf.get("num_hidden_layers", 12), "num_heads": hf.get("num_attention_heads", 12),
            "intermediate_size": hf.get("intermediate_size", 3072),
            "max_position_embeddings": hf.get("max_position_embeddings", 512),
            "type_vocab_size": hf.get("type_vocab_size", 2), "layer_norm_eps": hf.get("layer_norm_eps", 1e-12),
            "hidden_dropout_prob": hf.get("hidden_dropout_prob", 0.1),
            "attention_probs_dropout_prob": hf.get("attention_probs_dropout_prob", 0.1),
            "hidden_act": hf.get("hidden_act", "gelu")}
  values.update(overrides)
  try:
    return network.BertEncoderConfig(**values)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def read_dense_head(directory: str) -> tuple[dict[str, np.ndarray], int] | None:
  """({"linear.weight": [out, in]}, out_features) of `directory/2_Dense`, or None when there is no head."""
  dense = os.path.join(directory, DENSE_DIR)
  if not os.path.isdir(dense):
    return None
  cfg_path = os.path.join(dense, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{dense}: has no config.json")
  cfg = models._read_json(cfg_path)  # pylint: disable=protected-access
  for field in ("in_features", "out_features"):
    if not isinstance(cfg.get(field), int):
      raise ValueError(f"{cfg_path}: field {field!r}: expected an int, got {cfg.get(field)!r}")
  if cfg.get("bias", False):
    raise ValueError(f"{cfg_path}: field 'bias': the XTR token head is bias-free, got {cfg['bias']!r}")
  if cfg.get("activation_function") not in _IDENTITY_ACTIVATIONS:
    raise ValueError(f"{cfg_path}: field 'activation_function': expected torch.nn.modules.linear.Identity, "
                     f"got {cfg.get('activation_function')!r}")
  state, _ = read_state_dict(dense)
  return state, int(cfg["out_features"])


def _vocab_for(directory: str, kind: str, vocab_path: str | None) -> str:
  if vocab_path is not None:
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f"vocab_path {vocab_path!r} does not exist")
    return vocab_path
  name = "spiece.model" if kind == "t5" else "vocab.txt"
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no {name}; pass vocab_path=")
  return path


def load_hf_dir(directory: str, *, overrides: Mapping[str, Any] | None = None, vocab_path: str | None = None,
                allow_partial: bool = False, seed: int = 0, mesh: Any = None) -> models.PretrainedXTR:
  """`PretrainedXTR` from an HF XTR / T5 / BERT dir (see the module docstring). The conversion report is attached as
  `.conversion_report` and logged."""
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{directory}: neither {models.CONFIG_FILE} (xtr_jax) nor config.json (Hugging Face)")
  hf = models._read_json(cfg_path)  # pylint: disable=protected-access
  overrides = dict(overrides or {})
  model_kw = {k: overrides.pop(k) for k in ("query_max_len", "doc_max_len", "token_dim", "score_special_tokens")
              if k in overrides}
  kind = "bert" if hf.get("model_type") == "bert" else "t5"
  config = (bert_config_from_hf if kind == "bert" else t5_config_from_hf)(hf, source=cfg_path, **overrides)
  head = read_dense_head(directory)
  if head is not None:
    if model_kw.get("token_dim", head[1]) != head[1]:
      raise ValueError(f"{directory}/{DENSE_DIR}: out_features={head[1]} but token_dim={model_kw['token_dim']} given")
    model_kw["token_dim"] = head[1]
  model = models.XTRModel(encoder_config=config, vocab_path=_vocab_for(directory, kind, vocab_path), **model_kw)
  state, source = read_state_dict(directory)
  params, report = hf_state_to_params(state, model, source=source, head_state=None if head is None else head[0],
                                      allow_partial=allow_partial, seed=seed)
  if report.left_at_init:
    logging.warning("%s", report.summary())
  pretrained = models.PretrainedXTR(model, params, mesh=mesh)
  pretrained.conversion_report = report
  return pretrained


def export_hf_xtr(pretrained: models.PretrainedXTR, directory: str) -> str:
  """Writes the HF XTR layout: `config.json` + `model.safetensors` (T5EncoderModel or BertModel names) + vocab file +
  `2_Dense/{config.json, pytorch_model.bin}`. Returns `directory`."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  model = pretrained.model
  config = model.encoder_config
  kind = network.encoder_kind(config)
  os.makedirs(os.path.join(directory, DENSE_DIR), exist_ok=True)
  state, head = params_to_hf_state(pretrained.params, config)
  state = {k: v.astype(np.float32) for k, v in state.items()}
  if kind == "t5":
    hf_cfg = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": config.vocab_size,
              "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff, "num_layers": config.num_layers,
              "num_heads": config.num_heads, "relative_attention_num_buckets": config.relative_attention_num_buckets,
              "relative_attention_max_distance": config.relative_attention_max_distance,
              "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
              "feed_forward_proj": config.feed_forward_proj, "pad_token_id": 0, "eos_token_id": 1}
    vocab_name = "spiece.model"
  else:
    hf_cfg = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": config.vocab_size,
              "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
              "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
              "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": config.type_vocab_size,
              "layer_norm_eps": config.layer_norm_eps, "hidden_dropout_prob": config.hidden_dropout_prob,
              "attention_probs_dropout_prob": config.attention_probs_dropout_prob, "hidden_act": config.hidden_act,
              "position_embedding_type": "absolute", "pad_token_id": 0}
    vocab_name = "vocab.txt"
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=2, sort_keys=True)
  save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  shutil.copyfile(model.vocab_path, os.path.join(directory, vocab_name))
  with open(os.path.join(directory, DENSE_DIR, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"in_features": int(head.shape[1]), "out_features": int(head.shape[0]), "bias": False,
               "activation_function": "torch.nn.modules.linear.Identity"}, f, indent=2)
  torch.save({"linear.weight": torch.from_numpy(head.astype(np.float32))},
             os.path.join(directory, DENSE_DIR, "pytorch_model.bin"))
  return directory


# ------------------------------------------------------------------------------------------------- CLI


def convert_xtr_checkpoint(*, source: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
                           output_format: str = "xtr_jax", allow_partial: bool = False,
                           vocab_path: str | None = None) -> str:
  """Converts `source` (anything `load_pretrained` reads) to `output_format` "xtr_jax" (model dir) or "hf_xtr"."""
  if output_format not in ("xtr_jax", "hf_xtr"):
    raise ValueError(f"convert_xtr_checkpoint.output_format: expected 'xtr_jax' or 'hf_xtr', got {output_format!r}")
  if os.path.isfile(os.path.join(source, models.CONFIG_FILE)):
    pretrained = models.load_pretrained(source)
  else:
    pretrained = load_hf_dir(source, vocab_path=vocab_path, allow_partial=allow_partial)
  if output_format == "xtr_jax":
    pretrained.save(output_dir)
  else:
    export_hf_xtr(pretrained, output_dir)
  print(f"wrote {output_format} model to {output_dir} (model_sha256 {pretrained.fingerprint()})")
  return output_dir


if __name__ != "__main__":
  # Registered only in the importable module: under `python -m xtr_jax.convert` this file also runs as __main__, and
  # `xtr_jax.models` imports `xtr_jax.convert`, so registering both copies would make the gin name ambiguous.
  convert_xtr_checkpoint = gin.configurable(convert_xtr_checkpoint)
else:
  from xtr_jax import convert as _registered  # pylint: disable=g-import-not-at-top,import-self
  gin_utils.run(_registered.convert_xtr_checkpoint)
