"""Flax linen encoder stacks for XTR: T5 (v1.0 relu, v1.1 / mT5 gated-gelu), BERT, and the XTR token head.

The T5 stack reproduces Hugging Face `T5EncoderModel` exactly (fp32): shared token embedding (not scaled), one
relative-position bias table (bidirectional buckets) computed once and added to the attention logits of every layer,
unscaled dot-product attention, RMS layer norm without bias or mean subtraction, pre-norm residual blocks, no biases,
final norm. Dropout sits where HF puts it (embeddings, attention probabilities, each block output, inside the
feed-forward, after the final norm).

The BERT stack reproduces HF `BertModel`'s last hidden state: word + absolute position + token type embeddings, post-LN
residual blocks with biases, attention scaled by 1/sqrt(head_dim), exact (erf) GELU.

Every parameter carries logical axis names (`partitioning.LOGICAL_AXIS_RULES` maps them to mesh axes); attention
kernels are [embed, heads, kv] / [heads, kv, embed] so that `heads` can be sharded over `model`. With
`scan_layers=True` the per-layer parameters are stacked along a leading `layers` axis. `remat=True` recomputes each
layer's activations in the backward pass; on XLA CPU it only lowers memory together with `scan_layers=True` (all-MiniLM
train step, batch 128: 16.1 GiB of temporaries with remat alone, 3.7 GiB with both;
`benchmarks/experiment_step_time.py --memory_only`): in a plain layer loop the compiler keeps the activations anyway.

Masking: keys at padding positions get the most negative finite logit, as HF's additive mask does; an all-padding row
therefore attends uniformly and stays finite (no NaN). The XTR head zeroes those rows anyway.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str) -> Any:
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


# Precision of float32 matrix products on GPU/TPU (jax.default_matmul_precision names). "highest" keeps float32
# compute float32 there (XLA's default lowers it to TF32 on Ampere/Hopper and one bfloat16 pass on TPU: ~1e-3
# relative error per product, compounding over layers); "default" trades that for speed. CPU is exact either way,
# and bfloat16 compute is bfloat16 either way.
MATMUL_PRECISIONS = ("default", "high", "highest")


def _check_precision(owner: str, value: str) -> None:
  if value not in MATMUL_PRECISIONS:
    raise ValueError(f"{owner}.matmul_precision={value!r} is not supported; expected one of {list(MATMUL_PRECISIONS)}")


def _gelu_tanh(x: Array) -> Array:
  # HF "gelu_new": the tanh approximation used by T5 v1.1 / mT5 ("gated-gelu").
  return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)


# Activation names as in HF ACT2FN.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def parse_feed_forward_proj(feed_forward_proj: str) -> tuple[str, bool]:
  """(activation name, gated) for a HF T5 `feed_forward_proj` such as "relu" or "gated-gelu".

  Raises:
    ValueError: naming the value and the accepted forms when it is not `ACT` or `gated-ACT` with a known ACT.
  """
  parts = feed_forward_proj.split("-")
  ok = (len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")) and parts[-1] in ACTIVATIONS
  if not ok:
    raise ValueError(f"feed_forward_proj={feed_forward_proj!r} is not supported; expected 'ACT' or 'gated-ACT' with "
                     f"ACT in {sorted(ACTIVATIONS)} (T5 v1.0: 'relu', T5 v1.1 / mT5: 'gated-gelu')")
  act = parts[-1]
  if feed_forward_proj == "gated-gelu":
    act = "gelu_new"  # as HF T5Config does for backwards compatibility
  return act, len(parts) == 2


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """Hyper-parameters of a T5 encoder (names as in HF `T5Config`).

  `dtype` is the compute dtype (activations, matmuls); `param_dtype` the storage dtype of parameters. Softmax and
  layer-norm statistics are always computed in float32. `matmul_precision` (MATMUL_PRECISIONS) is how float32
  products run on GPU/TPU: "highest" (default) is true float32, "default" lets XLA use TF32 / bfloat16 passes.
  """
  vocab_size: int = 32128
  d_model: int = 768
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 12
  num_heads: int = 12
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_precision: str = "highest"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    parse_feed_forward_proj(self.feed_forward_proj)
    _dtype(self.dtype)
    _dtype(self.param_dtype)
    _check_precision("T5EncoderConfig", self.matmul_precision)
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"T5EncoderConfig.{field} must be >= 1, got {getattr(self, field)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5EncoderConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")

  @property
  def hidden_size(self) -> int:
    return self.d_model

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BertEncoderConfig:
  """Hyper-parameters of a BERT encoder (names as in HF `BertConfig`); dtype fields as in `T5EncoderConfig`."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  hidden_act: str = "gelu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  matmul_precision: str = "highest"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"BertEncoderConfig.hidden_act={self.hidden_act!r} is not supported; "
                       f"expected one of {sorted(ACTIVATIONS)}")
    _dtype(self.dtype)
    _dtype(self.param_dtype)
    _check_precision("BertEncoderConfig", self.matmul_precision)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"BertEncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}")

  @property
  def d_model(self) -> int:
    return self.hidden_size

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


EncoderConfig = T5EncoderConfig | BertEncoderConfig


def config_from_dict(kind: str, values: dict[str, Any]) -> EncoderConfig:
  """Inverse of `to_dict`: kind is "t5" or "bert"; unknown fields raise ValueError naming them."""
  cls = {"t5": T5EncoderConfig, "bert": BertEncoderConfig}.get(kind)
  if cls is None:
    raise ValueError(f"unknown encoder kind {kind!r}; expected 't5' or 'bert'")
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
  return cls(**values)


def matmul_flops_per_token(config: EncoderConfig, seq_len: int, token_dim: int = 128) -> int:
  """Forward matmul FLOPs per token of encoder + head (2 per multiply-add) at attention length `seq_len`.

  The model-FLOPs count that MFU is defined on (embeddings, norms, softmax and dropout excluded); training costs
  3x forward. T5: q, k, v, o, [gated] MLP, logits and context; BERT likewise with biases ignored.
  """
  if isinstance(config, T5EncoderConfig):
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    ff_mats = 3 if parse_feed_forward_proj(config.feed_forward_proj)[1] else 2
  else:
    d, inner, ff, ff_mats = config.hidden_size, config.hidden_size, config.intermediate_size, 2
  per_layer = 2 * 4 * d * inner + 2 * ff_mats * d * ff + 2 * 2 * seq_len * inner
  return config.num_layers * per_layer + 2 * d * token_dim


def encoder_kind(config: EncoderConfig) -> str:
  if isinstance(config, T5EncoderConfig):
    return "t5"
  if isinstance(config, BertEncoderConfig):
    return "bert"
  raise TypeError(f"expected T5EncoderConfig or BertEncoderConfig, got {type(config).__name__}")


def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple[str, ...],
           param_dtype: Any) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)


_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_kernel_init_3d = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2))
_kernel_init_out = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)


# ----------------------------------------------------------------------------------------------------------------------
# Shared pieces.


class RMSNorm(nn.Module):
  """T5 layer norm: x / sqrt(mean(x^2) + eps) * scale; statistics in float32; no bias, no mean subtraction."""
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
  """BERT layer norm with scale and bias; statistics in float32."""
  epsilon: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = _param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
    bias = _param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """Self-attention with [embed, heads, kv] kernels; optional biases and 1/sqrt(kv) scaling (BERT) or neither (T5).

  Inputs: x [B, L, E]; bias f32 [1 or B, H, L, L] or None (T5 relative positions); key_mask bool [B, L].
  """
  num_heads: int
  head_dim: int
  use_bias: bool
  scale_logits: bool
  dropout_rate: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, bias: Array | None, key_mask: Array, *, deterministic: bool) -> Array:
    h, k = self.num_heads, self.head_dim

    def proj_in(name: str) -> Array:
      return _Proj(num_heads=h, head_dim=k, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=name)(x)

    q, key, v = proj_in("query"), proj_in("key"), proj_in("value")
    if self.scale_logits:
      q = q / jnp.asarray(math.sqrt(k), q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, key, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(rate=self.dropout_rate)(probs, deterministic=deterministic).astype(self.dtype)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return _Out(embed_dim=x.shape[-1], use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                name="out")(ctx)


class _Proj(nn.Module):
  """x [B, L, E] -> [B, L, H, K] with kernel [embed, heads, kv] (+ bias [heads, kv])."""
  num_heads: int
  head_dim: int
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", _kernel_init_3d, (x.shape[-1], self.num_heads, self.head_dim),
                    ("embed", "heads", "kv"), self.param_dtype)
    y = jnp.einsum("ble,ehk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      b = _param(self, "bias", nn.initializers.zeros, (self.num_heads, self.head_dim), ("heads", "kv"),
                 self.param_dtype)
      y = y + b.astype(self.dtype)
    return y


class _Out(nn.Module):
  """ctx [B, L, H, K] -> [B, L, E] with kernel [heads, kv, embed] (+ bias [embed])."""
  embed_dim: int
  use_bias: bool
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, ctx: Array) -> Array:
    h, k = ctx.shape[-2:]
    kernel = _param(self, "kernel", _kernel_init_out, (h, k, self.embed_dim), ("heads", "kv", "embed"),
                    self.param_dtype)
    y = jnp.einsum("blhk,hke->ble", ctx.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      b = _param(self, "bias", nn.initializers.zeros, (self.embed_dim,), ("embed",), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y


class DenseIn(nn.Module):
  """x [..., In] -> [..., features] with kernel [in_axis, out_axis] (default [embed, mlp]) and optional bias."""
  features: int
  use_bias: bool
  dtype: Any
  param_dtype: Any
  in_axis: str = "embed"
  out_axis: str = "mlp"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", _kernel_init, (x.shape[-1], self.features), (self.in_axis, self.out_axis),
                    self.param_dtype)
    y = jnp.einsum("...e,ef->...f", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      b = _param(self, "bias", nn.initializers.zeros, (self.features,), (self.out_axis,), self.param_dtype)
      y = y + b.astype(self.dtype)
    return y


def _dropout(x: Array, rate: float, deterministic: bool) -> Array:
  return nn.Dropout(rate=rate)(x, deterministic=deterministic)


def _apply_layers(layer_cls: type[nn.Module], config: EncoderConfig, deterministic: bool, x: Array,
                  *args: Array) -> Array:
  """Runs `config.num_layers` layers (plain loop, or `nn.scan` with params stacked on `layers`), optionally remat'd.

  Layer modules take (config, deterministic, scanned) attributes and `(x, *args)`; `args` are broadcast to all layers.
  """
  cls = layer_cls
  if config.remat:
    # Under scan, XLA cannot CSE across iterations anyway; outside it, prevent_cse keeps the recomputation.
    cls = nn.remat(cls, prevent_cse=not config.scan_layers)
  if config.scan_layers:
    scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args), length=config.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(config=config, deterministic=deterministic, scanned=True, name="layers")(x, *args)
    return x
  for i in range(config.num_layers):
    x = cls(config=config, deterministic=deterministic, scanned=False, name=f"layers_{i}")(x, *args)
  return x


_PER_LAYER = re.compile(r"((?:.*/)?encoder/)layers_(\d+)(/.*)")
_SCANNED = re.compile(r"((?:.*/)?encoder/)layers(/.*)")


def relayout_layers(flat: Mapping[str, np.ndarray], scan_layers: bool) -> dict[str, np.ndarray]:
  """Converts a flat {'/'-path: array} tree between the per-layer encoder layout (`.../encoder/layers_<i>/...`, one
  array per layer) and the `nn.scan` layout (`.../encoder/layers/...`, stacked on axis 0), for parameters and the
  optimizer state alike. Trees already in the wanted layout come back unchanged.

  Raises:
    ValueError: when the per-layer arrays of one parameter are not numbered 0..N-1 or differ in shape.
  """
  out: dict[str, np.ndarray] = {}
  if scan_layers:
    groups: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, value in flat.items():
      m = _PER_LAYER.fullmatch(name)
      if m:
        groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = np.asarray(value)
      else:
        out[name] = value
    for (prefix, suffix), per_layer in groups.items():
      if sorted(per_layer) != list(range(len(per_layer))):
        raise ValueError(f"{prefix}layers_<i>{suffix}: layers {sorted(per_layer)} are not numbered 0..N-1")
      shapes = {v.shape for v in per_layer.values()}
      if len(shapes) != 1:
        raise ValueError(f"{prefix}layers_<i>{suffix}: per-layer shapes differ {sorted(shapes)}; cannot stack")
      out[f"{prefix}layers{suffix}"] = np.stack([per_layer[i] for i in range(len(per_layer))])
  else:
    for name, value in flat.items():
      m = _SCANNED.fullmatch(name)
      if m and np.ndim(value) >= 1:
        for i, layer in enumerate(np.asarray(value)):
          out[f"{m.group(1)}layers_{i}{m.group(2)}"] = layer
      else:
        out[name] = value
  return out


def stack_layers(encoder_params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Nested per-layer subtrees `layers_0..N-1` -> one `layers` subtree stacked on axis 0 (nn.scan layout)."""
  return _relayout_nested(encoder_params, num_layers, scan_layers=True)


def unstack_layers(encoder_params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Inverse of `stack_layers`."""
  return _relayout_nested(encoder_params, num_layers, scan_layers=False)


def _relayout_nested(encoder_params: Mapping[str, Any], num_layers: int, *, scan_layers: bool) -> dict[str, Any]:
  flat = {"encoder/" + k: v for k, v in traverse_util.flatten_dict(dict(encoder_params), sep="/").items()}
  out = relayout_layers(flat, scan_layers)
  if scan_layers:
    got = {len(v) for k, v in out.items() if _SCANNED.fullmatch(k)}
  else:
    got = {int(m.group(2)) + 1 for m in map(_PER_LAYER.fullmatch, out) if m}
    got = {max(got)} if got else set()
  if got != {num_layers}:
    raise ValueError(f"encoder has {sorted(got)} layers, expected {num_layers}")
  return traverse_util.unflatten_dict({k[len("encoder/"):]: v for k, v in out.items()}, sep="/")


# ----------------------------------------------------------------------------------------------------------------------
# T5.


def relative_position_buckets(query_len: int, key_len: int, *, num_buckets: int = 32, max_distance: int = 128,
                              bidirectional: bool = True) -> np.ndarray:
  """int32 [query_len, key_len] bucket of (key position - query position), as Mesh TensorFlow / HF T5.

  Computed with NumPy at trace time (lengths are static) in float32 like HF's torch code, so buckets agree exactly.
  """
  rel = np.arange(key_len, dtype=np.int64)[None, :] - np.arange(query_len, dtype=np.int64)[:, None]
  buckets = np.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets += (rel > 0).astype(np.int64) * num_buckets
    rel = np.abs(rel)
  else:
    rel = -np.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = (np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
             * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class T5MLP(nn.Module):
  """Feed-forward: wo(dropout(act(wi x))) (v1.0) or wo(dropout(act(wi_0 x) * wi_1 x)) (gated, v1.1 / mT5)."""
  config: T5EncoderConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    act_name, gated = parse_feed_forward_proj(cfg.feed_forward_proj)
    act = ACTIVATIONS[act_name]
    if gated:
      h = act(DenseIn(cfg.d_ff, False, dt, pdt, name="wi_0")(x)) * DenseIn(cfg.d_ff, False, dt, pdt, name="wi_1")(x)
    else:
      h = act(DenseIn(cfg.d_ff, False, dt, pdt, name="wi")(x))
    h = _dropout(h, cfg.dropout_rate, self.deterministic)
    return DenseIn(cfg.d_model, False, dt, pdt, in_axis="mlp", out_axis="embed", name="wo")(h)


class T5Layer(nn.Module):
  """Pre-norm self-attention block then pre-norm feed-forward block, both with residual dropout."""
  config: T5EncoderConfig
  deterministic: bool
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, position_bias: Array, mask: Array) -> Array | tuple[Array, None]:
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    h = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_attention_layer_norm")(x)
    h = MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.d_kv, use_bias=False, scale_logits=False,
                           dropout_rate=cfg.dropout_rate, dtype=dt, param_dtype=pdt, name="attention")(
                               h, position_bias, mask, deterministic=self.deterministic)
    x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
    h = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="pre_mlp_layer_norm")(x)
    h = T5MLP(cfg, self.deterministic, name="mlp")(h)
    x = x + _dropout(h, cfg.dropout_rate, self.deterministic)
    return (x, None) if self.scanned else x


class T5Encoder(nn.Module):
  """HF-exact T5 encoder stack: token_ids int32 [B, L], mask bool [B, L] -> hidden states `dtype` [B, L, d_model]."""
  config: T5EncoderConfig

  @nn.compact
  def __call__(self, token_ids: Array, mask: Array, *, deterministic: bool = True) -> Array:
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    embedding = _param(self, "token_embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                       ("vocab", "embed"), pdt)
    x = jnp.take(embedding, token_ids, axis=0).astype(dt)
    # One bias table for all layers (HF stores it in block 0 and passes the computed bias on to the others).
    rel_embedding = _param(self, "relpos_bias", nn.initializers.normal(1.0),
                           (cfg.relative_attention_num_buckets, cfg.num_heads), ("relpos_buckets", "heads"), pdt)
    length = token_ids.shape[1]
    buckets = relative_position_buckets(length, length, num_buckets=cfg.relative_attention_num_buckets,
                                        max_distance=cfg.relative_attention_max_distance)
    position_bias = jnp.take(rel_embedding, jnp.asarray(buckets), axis=0)  # [L, L, H]
    position_bias = jnp.transpose(position_bias, (2, 0, 1))[None].astype(jnp.float32)
    mask = mask.astype(bool)
    x = _dropout(x, cfg.dropout_rate, deterministic)
    x = _apply_layers(T5Layer, cfg, deterministic, x, position_bias, mask)
    x = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="encoder_norm")(x)
    return _dropout(x, cfg.dropout_rate, deterministic)


# ----------------------------------------------------------------------------------------------------------------------
# BERT.


class BertLayer(nn.Module):
  """Post-LN block: LN(x + drop(attn(x))), then LN(x + drop(W2 act(W1 x)))."""
  config: BertEncoderConfig
  deterministic: bool
  scanned: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array | tuple[Array, None]:
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    h = MultiHeadAttention(num_heads=cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads, use_bias=True,
                           scale_logits=True, dropout_rate=cfg.attention_probs_dropout_prob, dtype=dt,
                           param_dtype=pdt, name="attention")(x, None, mask, deterministic=self.deterministic)
    h = _dropout(h, cfg.hidden_dropout_prob, self.deterministic)
    x = LayerNorm(cfg.layer_norm_eps, dt, pdt, name="attention_layer_norm")(x + h)
    h = ACTIVATIONS[cfg.hidden_act](DenseIn(cfg.intermediate_size, True, dt, pdt, name="intermediate")(x))
    h = DenseIn(cfg.hidden_size, True, dt, pdt, in_axis="mlp", out_axis="embed", name="output")(h)
    h = _dropout(h, cfg.hidden_dropout_prob, self.deterministic)
    x = LayerNorm(cfg.layer_norm_eps, dt, pdt, name="output_layer_norm")(x + h)
    return (x, None) if self.scanned else x


class BertEncoder(nn.Module):
  """HF-exact BERT last hidden state: token_ids int32 [B, L], mask bool [B, L], optional token_type_ids int32 [B, L]
  -> `dtype` [B, L, hidden_size]. Positions are 0..L-1 (absolute); L must be <= max_position_embeddings."""
  config: BertEncoderConfig

  @nn.compact
  def __call__(self, token_ids: Array, mask: Array, *, deterministic: bool = True,
               token_type_ids: Array | None = None) -> Array:
    cfg = self.config
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    length = token_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds BertEncoderConfig.max_position_embeddings="
                       f"{cfg.max_position_embeddings}; lower the max length")
    init = nn.initializers.normal(0.02)
    word = _param(self, "word_embeddings", init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdt)
    pos = _param(self, "position_embeddings", init, (cfg.max_position_embeddings, cfg.hidden_size),
                 ("abspos_buckets", "embed"), pdt)
    types = _param(self, "token_type_embeddings", init, (cfg.type_vocab_size, cfg.hidden_size),
                   ("type_vocab", "embed"), pdt)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)
    x = (jnp.take(word, token_ids, axis=0).astype(jnp.float32) + pos[:length][None].astype(jnp.float32)
         + jnp.take(types, token_type_ids, axis=0).astype(jnp.float32))
    x = LayerNorm(cfg.layer_norm_eps, dt, pdt, name="embeddings_layer_norm")(x)
    x = _dropout(x, cfg.hidden_dropout_prob, deterministic)
    return _apply_layers(BertLayer, cfg, deterministic, x, mask.astype(bool))


# ----------------------------------------------------------------------------------------------------------------------
# XTR.


def backbone_module(config: EncoderConfig, name: str | None = None) -> nn.Module:
  return {"t5": T5Encoder, "bert": BertEncoder}[encoder_kind(config)](config, name=name)


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """x / max(||x||, 1e-12) in float32 (torch `F.normalize` semantics): all-zero vectors stay zero, no NaN."""
  x = x.astype(jnp.float32)
  sumsq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sumsq, 1e-24))


class XTREncoder(nn.Module):
  """Backbone -> bias-free Dense d_model -> token_dim (`proj` axis) -> zero padding -> L2 normalize.

  token_ids int32 [B, L], mask bool [B, L] -> float32 [B, L, output_dim]; rows at padding are exactly zero and valid
  rows have unit norm. Parameters: {"encoder": backbone params, "token_proj": {"kernel": [d_model, token_dim]}}.
  token_dim=0 means no projection head: the backbone's last hidden states themselves (padding zeroed, L2-normalized,
  output_dim = d_model) and no "token_proj" parameters -- e.g. to evaluate an untrained sentence encoder as a
  multi-vector retriever.
  """
  config: EncoderConfig
  token_dim: int = 128

  @property
  def output_dim(self) -> int:
    return self.token_dim if self.token_dim else self.config.d_model

  @nn.compact
  def __call__(self, token_ids: Array, mask: Array, *, deterministic: bool = True) -> Array:
    cfg = self.config
    # bfloat16 compute keeps XLA's native bfloat16 products whatever the setting (only float32 has a choice).
    with jax.default_matmul_precision(cfg.matmul_precision if cfg.dtype == "float32" else "default"):
      hidden = backbone_module(cfg, name="encoder")(token_ids, mask, deterministic=deterministic)
      if self.token_dim:
        emb = DenseIn(self.token_dim, False, _dtype(cfg.dtype), _dtype(cfg.param_dtype), in_axis="embed",
                      out_axis="proj", name="token_proj")(hidden)
      else:
        emb = hidden
    emb = jnp.where(mask.astype(bool)[..., None], emb.astype(jnp.float32), 0.0)
    return l2_normalize(emb)
