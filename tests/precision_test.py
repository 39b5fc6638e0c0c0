"""Matmul precision: float32 compute is true float32 on GPU/TPU unless a config asks otherwise.

XLA's default lowers float32 products to TF32 (Ampere/Hopper) or one bfloat16 pass (TPU); on an H200 that moved a
random-weight xtr_base's float32 embeddings by up to 8e-2 from the CPU's (benchmarks/encode_bench.py). CPU results are
identical under every precision, so these tests check what reaches XLA: the precision of every dot_general in the
traced programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xtr_jax import head_init, index, losses, models, network, scoring

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
DEFAULT = (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)


def _dot_precisions(jaxpr) -> list:
  """The `precision` of every dot_general in a jaxpr, sub-jaxprs (jit, scan, custom_vjp, shard_map) included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          out += _dot_precisions(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          out += _dot_precisions(sub)
  return out


def _traced(fn, *args) -> list:
  return _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr)


def _model(kind: str, precision: str | None) -> models.XTRModel:
  extra = {} if precision is None else {"matmul_precision": precision}
  if kind == "t5":
    cfg = network.T5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, **extra)
  else:
    cfg = network.BertEncoderConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                                    max_position_embeddings=32, **extra)
  return models.XTRModel(encoder_config=cfg, token_dim=8, query_max_len=8, doc_max_len=12,
                         loss=lambda *a: losses.xtr_loss(*a, k_train=6))


@pytest.mark.parametrize("kind", ["t5", "bert"])
@pytest.mark.parametrize("precision,expected", [(None, HIGHEST), ("highest", HIGHEST), ("default", DEFAULT)])
def test_encoder_and_loss_products_follow_matmul_precision(kind, precision, expected):
  model = _model(kind, precision)
  params = models.unbox_params(model.init(jax.random.key(0)))
  ids = jnp.full((2, 8), 5, jnp.int32)
  mask = jnp.arange(8)[None] < jnp.array([[8], [5]])
  encode = _traced(lambda p: model.encode(p, ids, mask), params)
  # layers x (q, k, v, logits, context, out, 2-3 MLP) + head: every one of them
  assert len(encode) >= 2 * 8 + 1
  assert set(encode) == {expected}
  batch = {"query_tokens": ids, "query_mask": mask, "doc_tokens": jnp.full((2, 2, 12), 7, jnp.int32),
           "doc_mask": jnp.ones((2, 2, 12), bool)}
  train = _traced(lambda p: model.loss_fn(p, batch, jax.random.key(1))[0], params)
  assert len(train) > len(encode)  # two encodes + the in-batch similarities
  assert set(train) == {expected}


def test_bfloat16_compute_keeps_native_products_and_float32_loss_similarities():
  model = _model("t5", "highest")
  cfg = model.encoder_config
  bf16 = models.XTRModel(encoder_config=type(cfg)(**{**cfg.to_dict(), "dtype": "bfloat16"}), token_dim=8,
                         query_max_len=8, doc_max_len=12, loss=lambda *a: losses.xtr_loss(*a, k_train=6))
  params = models.unbox_params(bf16.init(jax.random.key(0)))
  ids, mask = jnp.full((2, 8), 5, jnp.int32), jnp.ones((2, 8), bool)
  assert set(_traced(lambda p: bf16.encode(p, ids, mask), params)) == {DEFAULT}
  batch = {"query_tokens": ids, "query_mask": mask, "doc_tokens": jnp.full((2, 2, 12), 7, jnp.int32),
           "doc_mask": jnp.ones((2, 2, 12), bool)}
  train = _traced(lambda p: bf16.loss_fn(p, batch, None)[0], params)
  assert set(train) == {DEFAULT, HIGHEST}  # the embeddings are float32 unit vectors: their similarities stay exact


def test_matmul_precision_is_validated_saved_and_defaults_for_old_configs(tmp_path):
  with pytest.raises(ValueError, match=r"T5EncoderConfig.matmul_precision='tf32'.*'highest'"):
    network.T5EncoderConfig(matmul_precision="tf32")
  with pytest.raises(ValueError, match=r"BertEncoderConfig.matmul_precision='fastest'"):
    network.BertEncoderConfig(matmul_precision="fastest")
  cfg = network.T5EncoderConfig(num_layers=1, matmul_precision="default")
  assert network.config_from_dict("t5", cfg.to_dict()) == cfg
  old = cfg.to_dict()
  del old["matmul_precision"]  # written before the field existed
  assert network.config_from_dict("t5", old).matmul_precision == "highest"


def test_exact_search_rescoring_and_head_moments_are_float32_products():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
  chunks = jnp.asarray(rng.standard_normal((2, 16, 8)), jnp.float32)
  bruteforce = _traced(functools.partial(index._bruteforce_topk, k=4), q, chunks,  # pylint: disable=protected-access
                       jnp.array([16, 9], jnp.int32))
  assert bruteforce and set(bruteforce) == {HIGHEST}

  emb = jnp.asarray(rng.standard_normal((30, 8)), jnp.float32)
  offsets = jnp.array([0, 10, 30], jnp.int32)
  rescore = _traced(functools.partial(scoring._colbert_jit, max_doc_len=20, top_k=2,  # pylint: disable=protected-access
                                      chunk=2),
                    q[None], jnp.ones((1, 3), bool), jnp.array([[0, 1]], jnp.int32), emb, offsets)
  assert rescore and set(rescore) == {HIGHEST}

  masked_moments = head_init._masked_moments  # pylint: disable=protected-access
  moments = _traced(masked_moments, jnp.ones((2, 5, 8)), jnp.ones((2, 5), bool))
  assert moments and set(moments) == {HIGHEST}
