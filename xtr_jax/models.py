"""The XTR model: functional API for training (`XTRModel`) and the inference wrapper (`PretrainedXTR`).

    model = xtr_jax.load_pretrained(path)   # HF XTR dir, HF T5 / BERT dir, or an xtr_jax model dir
    q_emb, q_mask = model.encode_queries(["what is xtr?"])        # float32 [N, Lq, 128], bool [N, Lq]
    d_emb, d_mask = model.encode_documents(["title text", ...])   # float32 [N, Ld, 128], bool [N, Ld]

Texts are lowercased (official XTR preprocessing); documents are expected as "title text" already. Over-long texts are
truncated to the max length (query 32, document 512 by default) keeping the closing special token. Empty or
whitespace-only texts encode to zero valid tokens (all-false mask, all-zero embeddings), never NaN.

`score_special_tokens=False` keeps the tokenizer's added tokens (BERT [CLS]/[SEP], T5 EOS) as encoder context but
leaves them out of everything that scores: their embeddings are zeroed and masked out of the returned masks, the
training loss, the export and so the index. The default (True) is the official XTR behaviour.

xtr_jax model dir (written by `PretrainedXTR.save`): `xtr_jax_config.json` (encoder kind + config, token_dim, max
lengths, file names), `params.safetensors` (parameters keyed by their "/"-joined Flax path), and the vocab file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding

from xtr_jax import losses, network, partitioning, tokenization

CONFIG_FILE = "xtr_jax_config.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1


def unbox_params(params: Any) -> Any:
  """The plain parameter tree: accepts boxed (nn.Partitioned) or plain trees, with or without a {"params": ...} wrap."""
  params = nn.meta.unbox(params)
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    params = params["params"]
  return params


@gin.configurable
class XTRModel:
  """Functional XTR model (encoder + token head) for training and evaluation.

  Attributes:
    encoder_config: `network.T5EncoderConfig` or `network.BertEncoderConfig`.
    module: the Flax `network.XTREncoder`.
    token_dim, query_max_len, doc_max_len, vocab_path: as given; token_dim=0 means no projection head (the
      backbone's last hidden states, padding zeroed, L2-normalized).
    output_dim: the embedding size: token_dim, or d_model without a head.
    loss: callable (q, q_mask, p, d_mask, labels) -> (loss, metrics); defaults to `losses.xtr_loss` (gin-configured).
    score_special_tokens: False = the tokenizer's special tokens are attended to but never scored (see
      `scoring_mask`); needs `vocab_path`.
  """

  def __init__(self, *, encoder_config: network.EncoderConfig, token_dim: int = 128, query_max_len: int = 32,
               doc_max_len: int = 512, vocab_path: str | None = None, loss: Callable[..., Any] | None = None,
               score_special_tokens: bool = True):
    network.encoder_kind(encoder_config)  # type check
    if int(token_dim) < 0:
      raise ValueError(f"XTRModel.token_dim must be >= 0 (0 = no projection head), got {token_dim}")
    for name, value in (("query_max_len", query_max_len), ("doc_max_len", doc_max_len)):
      if int(value) < 1:
        raise ValueError(f"XTRModel.{name} must be >= 1, got {value}")
    if isinstance(encoder_config, network.BertEncoderConfig):
      too_long = max(query_max_len, doc_max_len)
      if too_long > encoder_config.max_position_embeddings:
        raise ValueError(f"max length {too_long} exceeds the BERT max_position_embeddings="
                         f"{encoder_config.max_position_embeddings}")
    self.encoder_config = encoder_config
    self.token_dim = int(token_dim)
    self.query_max_len = int(query_max_len)
    self.doc_max_len = int(doc_max_len)
    self.vocab_path = vocab_path
    if not isinstance(score_special_tokens, (bool, np.bool_)):
      raise TypeError(f"XTRModel.score_special_tokens must be a bool, got {score_special_tokens!r}")
    self.score_special_tokens = bool(score_special_tokens)
    if not self.score_special_tokens and not vocab_path:
      raise ValueError("XTRModel.score_special_tokens=False needs vocab_path (the special ids come from the tokenizer)")
    self._loss = loss
    self._tokenizer = None
    self.module = network.XTREncoder(encoder_config, token_dim=self.token_dim)
    self.output_dim = self.module.output_dim
    # Jitted here so eager callers (tests, notebooks) do not dispatch op by op; nests inside an outer jit.
    self._init_jit = jax.jit(self._init_impl)
    self._encode_jit = jax.jit(self._encode_impl, static_argnames=("deterministic",))

  # ---------------------------------------------------------------------------------------------- functional API

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Fresh variables {"params": tree} with `nn.Partitioned` leaves carrying logical axis names. Jitted (and can be
    wrapped in an outer `jax.jit` with out_shardings)."""
    return self._init_jit(rng)

  def _init_impl(self, rng: jax.Array) -> dict[str, Any]:
    ids = jnp.ones((1, 8), jnp.int32)
    mask = jnp.ones((1, 8), bool)
    return dict(self.module.init({"params": rng}, ids, mask, deterministic=True))

  def abstract_variables(self) -> dict[str, Any]:
    """`jax.eval_shape(init)`: boxed ShapeDtypeStructs, for building shardings without allocating."""
    return jax.eval_shape(self._init_impl, jax.random.key(0))

  def encode(self, params: Any, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool = True,
             dropout_rng: jax.Array | None = None) -> jax.Array:
    """Token embeddings float32 [N, L, output_dim] of token_ids int32 [N, L], mask bool [N, L].

    Padding rows are zero, valid rows unit norm. `params` may be boxed or plain, wrapped in {"params": ..} or not.
    Dropout is applied only when deterministic=False, which needs `dropout_rng`.
    """
    if not deterministic and dropout_rng is None:
      raise ValueError("XTRModel.encode(deterministic=False) needs a dropout_rng")
    return self._encode_jit(params, token_ids, mask, deterministic=deterministic,
                            dropout_rng=None if deterministic else dropout_rng)

  def _encode_impl(self, params: Any, token_ids: jax.Array, mask: jax.Array, *, deterministic: bool,
                   dropout_rng: jax.Array | None) -> jax.Array:
    rngs = None if deterministic else {"dropout": dropout_rng}
    return self.module.apply({"params": unbox_params(params)}, token_ids, mask, deterministic=deterministic, rngs=rngs)

  @property
  def loss(self) -> Callable[..., Any]:
    if self._loss is None:
      self._loss = losses.xtr_loss
    return self._loss

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array],
              dropout_rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss f32 [], metrics) of a batch {"query_tokens" int32 [B, Lq], "query_mask" bool [B, Lq], "doc_tokens" int32
    [B, G, Ld], "doc_mask" bool [B, G, Ld]}; G = 1 + negatives with the positive first, so labels[b] = b * G over the
    flattened [B * G] documents. Dropout is on iff dropout_rng is given."""
    q_tok, q_mask = batch["query_tokens"], batch["query_mask"]
    d_tok, d_mask = batch["doc_tokens"], batch["doc_mask"]
    if d_tok.ndim != 3 or d_mask.shape != d_tok.shape or q_tok.ndim != 2 or q_mask.shape != q_tok.shape:
      raise ValueError(f"batch shapes: query_tokens {q_tok.shape}, query_mask {q_mask.shape} (expected [B, Lq] both); "
                       f"doc_tokens {d_tok.shape}, doc_mask {d_mask.shape} (expected [B, G, Ld] both)")
    b, g, ld = d_tok.shape
    if q_tok.shape[0] != b:
      raise ValueError(f"query batch {q_tok.shape[0]} != document batch {b}")
    deterministic = dropout_rng is None
    q_rng = d_rng = None
    if not deterministic:
      q_rng, d_rng = jax.random.split(dropout_rng)
    q = self.encode(params, q_tok, q_mask, deterministic=deterministic, dropout_rng=q_rng)
    d_tok_flat, d_mask_flat = d_tok.reshape(b * g, ld), d_mask.reshape(b * g, ld)
    p = self.encode(params, d_tok_flat, d_mask_flat, deterministic=deterministic, dropout_rng=d_rng)
    q_score, d_score = self.scoring_mask(q_tok, q_mask), self.scoring_mask(d_tok_flat, d_mask_flat)
    if not self.score_special_tokens:  # encode already zeroes padding; only unscored special tokens remain
      q, p = q * q_score[..., None], p * d_score[..., None]
    labels = jnp.arange(b, dtype=jnp.int32) * g
    with jax.default_matmul_precision(self.encoder_config.matmul_precision):  # the in-batch similarities too
      loss, metrics = self.loss(q, q_score, p, d_score, labels)
    return loss, dict(metrics)

  def scoring_mask(self, token_ids: Any, mask: Any) -> Any:
    """The tokens that are scored, bool [..., L]: `mask` (bool [..., L]) without the tokenizer's special tokens when
    score_special_tokens=False, else `mask` itself. token_ids int [..., L]. NumPy in -> NumPy out, else JAX."""
    if self.score_special_tokens:
      return mask.astype(bool)
    special = np.asarray(self.tokenizer.special_ids, np.int32)
    if isinstance(token_ids, np.ndarray) and isinstance(mask, np.ndarray):
      return mask.astype(bool) & ~np.isin(token_ids, special)
    return mask.astype(bool) & ~jnp.isin(token_ids, jnp.asarray(special))

  # ------------------------------------------------------------------------------------------------ tokenization

  @property
  def tokenizer(self) -> tokenization.SentencePieceTokenizer | tokenization.WordPieceTokenizer:
    if self._tokenizer is None:
      if not self.vocab_path:
        raise ValueError("XTRModel.vocab_path is not set (gin: XTRModel.vocab_path = '.../spiece.model')")
      self._tokenizer = tokenization.load_tokenizer(self.vocab_path)
      if self._tokenizer.vocab_size > self.encoder_config.vocab_size:
        raise ValueError(f"tokenizer {self.vocab_path!r} has {self._tokenizer.vocab_size} ids but the encoder "
                         f"embedding has only vocab_size={self.encoder_config.vocab_size}")
    return self._tokenizer

  def _tokenize(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError("expected a list of texts, got one str")
    texts = [tokenization.preprocess_query(t) for t in texts]  # lowercasing (documents are already "title text")
    ids, mask = self.tokenizer.batch_encode(texts, max_len)
    empty = np.asarray([not t.strip() for t in texts], dtype=bool)
    # Empty text has no tokens: drop the lone special tokens so it encodes to nothing (all-zero embeddings).
    ids[empty] = self.tokenizer.pad_id
    mask[empty] = False
    return ids, mask

  def tokenize_queries(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lowercased, tokenized, truncated/padded to query_max_len: (int32 [N, Lq], bool [N, Lq])."""
    return self._tokenize(texts, self.query_max_len)

  def tokenize_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Lowercased "title text" strings, tokenized, truncated/padded to doc_max_len: (int32 [N, Ld], bool [N, Ld])."""
    return self._tokenize(texts, self.doc_max_len)

  def config_dict(self) -> dict[str, Any]:
    return {"encoder_kind": network.encoder_kind(self.encoder_config),
            "encoder_config": self.encoder_config.to_dict(), "token_dim": self.token_dim,
            "query_max_len": self.query_max_len, "doc_max_len": self.doc_max_len,
            "score_special_tokens": self.score_special_tokens}


# -------------------------------------------------------------------------------------------------- parameters io


def flatten_params(params: Any) -> dict[str, np.ndarray]:
  """{"a/b/kernel": np.ndarray} of a (boxed or plain) parameter tree, on host."""
  flat = traverse_util.flatten_dict(unbox_params(params), sep="/")
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def params_fingerprint(params: Any) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes (sorted by path), in the per-layer layout so that a
  model gives the same fingerprint with and without `scan_layers`."""
  flat = network.relayout_layers(flatten_params(unbox_params(params)), scan_layers=False)
  h = hashlib.sha256()
  for key, value in sorted(flat.items()):
    arr = np.ascontiguousarray(value)
    h.update(f"{key}|{arr.dtype.str}|{arr.shape}\n".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def check_params_match(model: XTRModel, params: Any, *, source: str) -> None:
  """ValueError listing missing / unexpected / mis-shaped parameters of `params` against the model's abstract tree."""
  expected = {k: (tuple(v.shape), np.dtype(v.dtype))
              for k, v in traverse_util.flatten_dict(unbox_params(model.abstract_variables()), sep="/").items()}
  got = flatten_params(params)
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = [f"{k}: expected {expected[k][0]}, got {tuple(got[k].shape)}" for k in sorted(set(expected) & set(got))
               if tuple(got[k].shape) != expected[k][0]]
  if missing or unexpected or misshaped:
    raise ValueError(f"{source}: parameters do not match the model config:\n  missing: {missing}\n"
                     f"  unexpected: {unexpected}\n  mis-shaped: {misshaped}")


# ------------------------------------------------------------------------------------------------- PretrainedXTR


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


class PretrainedXTR:
  """An `XTRModel` with its parameters and tokenizer, for inference.

  `encode_queries` / `encode_documents` run one jitted function on batches padded to bucketed shapes (rows: powers of
  two up to batch_size; length: powers of two from 8 up to the max length), so repeated calls do not recompile.
  With `mesh`, parameters are sharded by their logical axes and batches split over the data axes.

  Args:
    model: the `XTRModel` (its `vocab_path` is needed to tokenize and to `save`).
    params: its parameters, boxed or plain, with or without the {"params": ...} wrap; ValueError listing missing /
      unexpected / mis-shaped entries when they do not fit the model.
    mesh: optional device mesh for sharded inference.
  """

  def __init__(self, model: XTRModel, params: Any, *, mesh: Mesh | None = None):
    self.model = model
    params = unbox_params(params)
    check_params_match(model, params, source="PretrainedXTR")
    self.mesh = mesh
    if mesh is not None:
      shardings = partitioning.params_shardings(model.abstract_variables(), mesh)["params"]
      self.params = jax.device_put(params, shardings)
      batch_sharding = NamedSharding(mesh, partitioning.batch_spec(2))
      out_sharding = NamedSharding(mesh, partitioning.batch_spec(3))
      self._encode = jax.jit(model.encode, in_shardings=(shardings, batch_sharding, batch_sharding),
                             out_shardings=out_sharding)
      self._row_multiple = partitioning.data_parallel_size(mesh)
    else:
      self.params = jax.tree.map(jnp.asarray, params)
      self._encode = jax.jit(model.encode)
      self._row_multiple = 1
    self._fingerprint: str | None = None

  @property
  def tokenizer(self):
    return self.model.tokenizer

  def _run(self, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
    n, max_len = ids.shape
    out = np.zeros((n, max_len, self.model.output_dim), np.float32)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = -(-batch_size // self._row_multiple) * self._row_multiple
    for start in range(0, n, step):
      b_ids, b_mask = ids[start:start + step], mask[start:start + step]
      rows = min(step, max(_next_pow2(len(b_ids)), self._row_multiple))
      rows = -(-rows // self._row_multiple) * self._row_multiple
      longest = int(b_mask.sum(axis=1).max(initial=0))
      # Trailing padding does not change valid tokens (masked keys; positions count from the start).
      cols = min(max_len, max(8, _next_pow2(longest)))
      p_ids = np.zeros((rows, cols), np.int32)
      p_mask = np.zeros((rows, cols), bool)
      p_ids[:len(b_ids)] = b_ids[:, :cols]
      p_mask[:len(b_ids)] = b_mask[:, :cols]
      emb = np.asarray(jax.device_get(self._encode(self.params, p_ids, p_mask)))
      out[start:start + len(b_ids), :cols] = emb[:len(b_ids)]
    return out

  def _encode_scored(self, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    emb = self._run(ids, mask, batch_size)
    if self.model.score_special_tokens:
      return emb, mask
    scored = self.model.scoring_mask(ids, mask)
    emb[~scored] = 0.0
    return emb, scored

  def encode_queries(self, texts: Sequence[str], batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(np.float32 [N, query_max_len, output_dim], np.bool_ [N, query_max_len]) of raw query strings; the mask is
    `model.scoring_mask` of the tokenization (special tokens off when score_special_tokens=False)."""
    ids, mask = self.model.tokenize_queries(texts)
    return self._encode_scored(ids, mask, batch_size)

  def encode_documents(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(np.float32 [N, doc_max_len, output_dim], np.bool_ [N, doc_max_len]) of "title text" strings; mask as in
    `encode_queries`."""
    ids, mask = self.model.tokenize_documents(texts)
    return self._encode_scored(ids, mask, batch_size)

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = params_fingerprint(self.params)
    return self._fingerprint

  def identity(self) -> dict[str, Any]:
    """What an index built with this model depends on: params fingerprint, vocab identity, dims and max lengths, and
    "score_special_tokens": False when special tokens are left out (absent = the default in
    `export.IDENTITY_DEFAULTS`, so exports and indexes written before the option existed still match it)."""
    identity = {"model_sha256": self.fingerprint(), "encoder_kind": network.encoder_kind(self.model.encoder_config),
                "vocab": self.tokenizer.identity(), "token_dim": self.model.token_dim,
                "query_max_len": self.model.query_max_len, "doc_max_len": self.model.doc_max_len}
    if not self.model.score_special_tokens:
      identity["score_special_tokens"] = False
    return identity

  def save(self, directory: str) -> str:
    """Writes the xtr_jax model dir (config json, params safetensors, vocab copy); returns `directory`."""
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    os.makedirs(directory, exist_ok=True)
    vocab_src = self.model.vocab_path
    if not vocab_src:
      raise ValueError("cannot save a model without a vocab file (XTRModel.vocab_path is not set)")
    vocab_name = os.path.basename(vocab_src)
    vocab_dst = os.path.join(directory, vocab_name)
    if os.path.abspath(vocab_src) != os.path.abspath(vocab_dst):
      shutil.copyfile(vocab_src, vocab_dst)
    save_file(flatten_params(self.params), os.path.join(directory, PARAMS_FILE), metadata={"format": "xtr_jax"})
    config = {"format": "xtr_jax", "format_version": FORMAT_VERSION, **self.model.config_dict(),
              "vocab_file": vocab_name, "params_file": PARAMS_FILE, "model_sha256": self.fingerprint()}
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    return directory


# ------------------------------------------------------------------------------------------------ load_pretrained


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def load_xtr_jax_dir(path: str, *, overrides: Mapping[str, Any] | None = None,
                     mesh: Mesh | None = None) -> PretrainedXTR:
  """Reads a dir written by `PretrainedXTR.save`. overrides: XTRModel kwargs / encoder config fields to change
  (e.g. query_max_len, dtype); parameter shapes must still match."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(path, CONFIG_FILE)
  cfg = _read_json(cfg_path)
  for field in ("encoder_kind", "encoder_config", "token_dim", "query_max_len", "doc_max_len", "vocab_file",
                "params_file"):
    if field not in cfg:
      raise ValueError(f"{cfg_path}: missing field {field!r}")
  if cfg.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{cfg_path}: field 'format_version': expected {FORMAT_VERSION}, "
                     f"got {cfg.get('format_version')!r}")
  enc_values = dict(cfg["encoder_config"])
  model_kw = {k: cfg[k] for k in ("token_dim", "query_max_len", "doc_max_len")}
  model_kw["score_special_tokens"] = cfg.get("score_special_tokens", True)  # absent in dirs saved before the option
  for key, value in (overrides or {}).items():
    if key in model_kw:
      model_kw[key] = value
    else:
      enc_values[key] = value
  try:
    enc = network.config_from_dict(cfg["encoder_kind"], enc_values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{cfg_path}: field 'encoder_config': {e}") from e
  vocab = os.path.join(path, cfg["vocab_file"])
  model = XTRModel(encoder_config=enc, vocab_path=vocab, **model_kw)
  flat = load_file(os.path.join(path, cfg["params_file"]))
  params = unflatten_params(network.relayout_layers(flat, model.encoder_config.scan_layers))
  pretrained = PretrainedXTR(model, params, mesh=mesh)
  return pretrained


def load_pretrained(path: str, *, query_max_len: int | None = None, doc_max_len: int | None = None,
                    token_dim: int | None = None, dtype: str | None = None, param_dtype: str | None = None,
                    scan_layers: bool | None = None, remat: bool | None = None, vocab_path: str | None = None,
                    allow_partial: bool = False, seed: int = 0, mesh: Mesh | None = None,
                    score_special_tokens: bool | None = None) -> PretrainedXTR:
  """Loads an XTR model from
    * an xtr_jax model dir (`xtr_jax_config.json`),
    * a Hugging Face XTR dir (google/xtr-base-en layout: T5 `config.json` + weights + `spiece.model` + `2_Dense/`),
    * a plain HF T5 (`T5EncoderModel` / `T5ForConditionalGeneration`) or BERT dir: the token head starts at a seeded
      random init (logged), ready for fine-tuning.
  Keyword overrides change max lengths, dtypes, scan/remat, token_dim (0 = no projection head: L2-normalized backbone
  hidden states, e.g. an untrained sentence encoder used as a multi-vector baseline), score_special_tokens (see
  `XTRModel`; None = as saved, True for HF dirs); `allow_partial` keeps missing
  tensors at init (listed in the log) instead of raising. Returns a `PretrainedXTR`.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model dir {path!r} does not exist")
  overrides = {k: v for k, v in (("query_max_len", query_max_len), ("doc_max_len", doc_max_len),
                                 ("token_dim", token_dim), ("dtype", dtype), ("param_dtype", param_dtype),
                                 ("scan_layers", scan_layers), ("remat", remat),
                                 ("score_special_tokens", score_special_tokens)) if v is not None}
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    if vocab_path is not None or allow_partial:
      logging.info("vocab_path / allow_partial are ignored for xtr_jax model dirs")
    return load_xtr_jax_dir(path, overrides=overrides, mesh=mesh)
  return convert.load_hf_dir(path, overrides=overrides, vocab_path=vocab_path, allow_partial=allow_partial,
                             seed=seed, mesh=mesh)


# At the end (convert imports this module): importing models also registers convert's gin configurable, so loading an
# HF dir after the gin config is locked does not try to register it late.
from xtr_jax import convert  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
