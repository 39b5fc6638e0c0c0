"""XTRModel functional API, PretrainedXTR encode / save / load / identity, and sharded encoding on 8 devices."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from xtr_jax import models, network, partitioning


def _tiny_model(vocab_path: str | None, **kw) -> models.XTRModel:
  cfg = network.T5EncoderConfig(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.1, **kw)
  return models.XTRModel(encoder_config=cfg, token_dim=16, query_max_len=12, doc_max_len=24, vocab_path=vocab_path)


@pytest.fixture(scope="module")
def pretrained(t5_vocab) -> models.PretrainedXTR:
  model = _tiny_model(t5_vocab)
  return models.PretrainedXTR(model, model.init(jax.random.key(0)))


TEXTS = ["What is XTR?", "", "   ", "contextualized token retrieval for multi-vector search",
         "a very long query " * 20]


def test_tokenization_lowercases_truncates_and_empties(pretrained):
  model = pretrained.model
  tok = model.tokenizer
  assert tok.tokenize("Hello world") == [8774, 296, tok.eos_id]
  ids, mask = model.tokenize_queries(TEXTS)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (5, 12)
  expected0 = tok.tokenize("what is xtr?")
  assert ids[0, :len(expected0)].tolist() == expected0 and mask[0].sum() == len(expected0)
  assert not mask[1].any() and not mask[2].any() and (ids[1:3] == 0).all()
  assert mask[4].all() and ids[4, -1] == tok.eos_id  # truncated to query_max_len, EOS kept
  d_ids, d_mask = model.tokenize_documents(["Title Text body"])
  assert d_ids.shape == (1, 24) and d_ids[0, :d_mask[0].sum()].tolist() == tok.tokenize("title text body")


def test_encode_queries_equals_functional_encode_and_does_not_recompile(pretrained):
  model = pretrained.model
  emb, mask = pretrained.encode_queries(TEXTS, batch_size=8)
  assert emb.dtype == np.float32 and emb.shape == (5, 12, 16) and isinstance(emb, np.ndarray)
  ids, mask_ref = model.tokenize_queries(TEXTS)
  np.testing.assert_array_equal(mask, mask_ref)
  ref = np.asarray(model.encode(pretrained.params, ids, mask_ref))  # full length, no bucketing
  np.testing.assert_allclose(emb, ref, atol=1e-5)
  assert np.isfinite(emb).all()
  np.testing.assert_array_equal(emb[~mask], 0.0)
  np.testing.assert_allclose(np.linalg.norm(emb[mask], axis=-1), 1.0, rtol=1e-5)
  compiled = pretrained._encode._cache_size()  # pylint: disable=protected-access
  again, _ = pretrained.encode_queries(list(reversed(TEXTS)), batch_size=8)  # same buckets: 8 rows x 16 -> 12 cols
  np.testing.assert_allclose(again[::-1], emb, atol=1e-6)
  assert pretrained._encode._cache_size() == compiled  # pylint: disable=protected-access


def test_loss_fn_flattens_documents_positive_first(pretrained):
  model = pretrained.model
  q_ids, q_mask = model.tokenize_queries(["first query", "second query"])
  docs = ["doc a pos", "doc a neg", "doc b pos", "doc b neg"]
  d_ids, d_mask = model.tokenize_documents(docs)
  batch = {"query_tokens": q_ids, "query_mask": q_mask, "doc_tokens": d_ids.reshape(2, 2, 24),
           "doc_mask": d_mask.reshape(2, 2, 24)}
  seen = {}

  def recording_loss(q, qm, p, dm, labels):
    seen.update(q=q, qm=qm, p=p, dm=dm, labels=labels)
    return jnp.sum(q) + jnp.sum(p), {"n": jnp.sum(qm)}

  model._loss = recording_loss  # pylint: disable=protected-access
  loss, metrics = model.loss_fn(pretrained.params, batch, None)
  np.testing.assert_array_equal(np.asarray(seen["labels"]), [0, 2])
  assert seen["p"].shape == (4, 24, 16)
  np.testing.assert_allclose(np.asarray(seen["p"]), np.asarray(model.encode(pretrained.params, d_ids, d_mask)),
                             atol=1e-6)
  assert float(metrics["n"]) == q_mask.sum() and np.isfinite(float(loss))
  # The real XTR loss through the same path, with dropout, differentiable.
  from xtr_jax import losses  # pylint: disable=g-import-not-at-top
  model._loss = functools.partial(losses.xtr_loss, k_train=8)  # pylint: disable=protected-access
  grad_fn = jax.jit(jax.grad(lambda p, rng: model.loss_fn(p, batch, rng)[0]))
  grads = grad_fn(pretrained.params, jax.random.key(3))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
  model._loss = None  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="doc_tokens"):
    model.loss_fn(pretrained.params, dict(batch, doc_tokens=d_ids), None)


def test_save_load_roundtrip_identity_and_bad_dirs(pretrained, tmp_path):
  out = pretrained.save(str(tmp_path / "m"))
  assert sorted(os.listdir(out)) == sorted([models.CONFIG_FILE, models.PARAMS_FILE, "t5_spiece.model"])
  loaded = models.load_pretrained(out)
  flat_a, flat_b = models.flatten_params(pretrained.params), models.flatten_params(loaded.params)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k])
  ident = loaded.identity()
  assert ident == pretrained.identity()
  assert len(ident["model_sha256"]) == 64 and ident["token_dim"] == 16 and ident["query_max_len"] == 12
  assert ident["vocab"]["type"] == "sentencepiece"
  emb, _ = loaded.encode_queries(TEXTS[:1])
  ref, _ = pretrained.encode_queries(TEXTS[:1])
  np.testing.assert_array_equal(emb, ref)
  # Another model (different weights) has another fingerprint.
  other = models.PretrainedXTR(pretrained.model, pretrained.model.init(jax.random.key(1)))
  assert other.identity()["model_sha256"] != ident["model_sha256"]
  # Overrides: longer queries, same weights.
  assert models.load_pretrained(out, query_max_len=20).model.query_max_len == 20
  # Broken config json: file, line.
  cfg_path = os.path.join(out, models.CONFIG_FILE)
  text = open(cfg_path).read()
  with open(cfg_path, "w") as f:
    f.write(text.replace('"token_dim": 16', '"token_dim": 16,,'))
  with pytest.raises(ValueError, match=r"xtr_jax_config.json: line \d+"):
    models.load_pretrained(out)
  cfg = json.loads(text)
  del cfg["doc_max_len"]
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="missing field 'doc_max_len'"):
    models.load_pretrained(out)
  # Params that do not fit the config: listed.
  cfg = json.loads(text)
  cfg["encoder_config"]["d_ff"] = 96
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"mis-shaped: \['encoder/layers_0/mlp/wi_0/kernel: expected \(32, 96\), "
                                       r"got \(32, 64\)"):
    models.load_pretrained(out)
  with pytest.raises(FileNotFoundError):
    models.load_pretrained(str(tmp_path / "nope"))


def test_no_head_mode_is_normalized_backbone_states_and_round_trips(bert_vocab, tmp_path):
  """token_dim=0: no token_proj parameters, output = L2-normalized last hidden states with padding zeroed."""
  cfg = network.BertEncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
  model = models.XTRModel(encoder_config=cfg, token_dim=0, query_max_len=12, doc_max_len=24, vocab_path=bert_vocab)
  assert model.output_dim == 32
  params = models.unbox_params(model.init(jax.random.key(3)))
  assert set(params) == {"encoder"}
  pretrained = models.PretrainedXTR(model, params)
  emb, mask = pretrained.encode_queries(TEXTS, batch_size=8)
  assert emb.shape == (5, 12, 32)
  ids, _ = model.tokenize_queries(TEXTS)
  hidden = np.asarray(network.backbone_module(cfg).apply({"params": params["encoder"]}, ids, mask,
                                                         deterministic=True), np.float64)
  norms = np.linalg.norm(hidden, axis=-1, keepdims=True)
  ref = np.where(mask[..., None], hidden / np.maximum(norms, 1e-12), 0.0)
  np.testing.assert_allclose(emb, ref, atol=2e-5)
  np.testing.assert_array_equal(emb[~mask], 0.0)
  out = pretrained.save(str(tmp_path / "nohead"))
  with open(os.path.join(out, models.CONFIG_FILE)) as f:
    assert json.load(f)["token_dim"] == 0
  loaded = models.load_pretrained(out)
  assert loaded.model.token_dim == 0 and loaded.model.output_dim == 32
  assert loaded.identity() == pretrained.identity()
  np.testing.assert_array_equal(loaded.encode_queries(TEXTS, batch_size=8)[0], emb)
  with pytest.raises(ValueError, match="token_dim must be >= 0"):
    models.XTRModel(encoder_config=cfg, token_dim=-1)


def test_sharded_encode_4x2_equals_unsharded(pretrained):
  mesh = partitioning.make_mesh(data=4, model=2)
  model = pretrained.model
  shardings = partitioning.params_shardings(model.abstract_variables(), mesh)["params"]
  q_kernel = shardings["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert q_kernel.spec[1] == "model"  # [embed, heads, kv]: heads split over `model`
  assert shardings["encoder"]["token_embedding"].spec[0] == "model"  # vocab split
  params = jax.device_put(pretrained.params, shardings)
  texts = TEXTS + ["one more", "and another query", "eight"]
  ids, mask = model.tokenize_queries(texts)
  batch = NamedSharding(mesh, partitioning.batch_spec(2))
  encode = jax.jit(model.encode, in_shardings=(shardings, batch, batch),
                   out_shardings=NamedSharding(mesh, partitioning.batch_spec(3)))
  sharded = encode(params, jax.device_put(ids, batch), jax.device_put(mask, batch))
  assert len(sharded.sharding.device_set) == 8
  unsharded = np.asarray(model.encode(pretrained.params, ids, mask))
  np.testing.assert_allclose(np.asarray(sharded), unsharded, atol=1e-5)
  # The inference wrapper on the same mesh (rows padded to a multiple of the 4 data shards).
  on_mesh = models.PretrainedXTR(model, pretrained.params, mesh=mesh)
  emb, _ = on_mesh.encode_queries(texts[:5], batch_size=6)
  np.testing.assert_allclose(emb, unsharded[:5], atol=1e-5)


@pytest.mark.parametrize("name", ["xtr_tiny", "xtr_small", "xtr_base", "xtr_large", "xtr_xl", "xtr_xxl", "mxtr_base",
                                  "minilm_l6"])
def test_gin_model_files_build_models_of_the_published_sizes(name):
  from xtr_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin([f"models/{name}.gin"])
  model = models.XTRModel()
  cfg = model.encoder_config
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(models.unbox_params(model.abstract_variables())))
  if isinstance(cfg, network.T5EncoderConfig):  # embedding + relpos + per layer (attention + gated MLP + 2 norms)
    expected = (cfg.vocab_size * cfg.d_model + 32 * cfg.num_heads + cfg.d_model + cfg.num_layers * (
        4 * cfg.d_model * cfg.num_heads * cfg.d_kv + 3 * cfg.d_model * cfg.d_ff + 2 * cfg.d_model))
  else:
    d, f = cfg.hidden_size, cfg.intermediate_size
    expected = (cfg.vocab_size + 512 + 2 + 2) * d + cfg.num_layers * (4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d)
  assert n == expected + cfg.d_model * model.token_dim
  published = {"xtr_base": 110e6, "xtr_large": 335e6, "xtr_xl": 1.22e9, "xtr_xxl": 4.76e9, "mxtr_base": 277e6,
               "minilm_l6": 22.7e6}  # encoder sizes of T5 v1.1 / mT5 / all-MiniLM-L6-v2 (+ the 128-d head)
  if name in published:
    assert abs(n - published[name]) / published[name] < 0.03, n


def test_unscored_special_tokens_are_attended_but_never_scored(bert_vocab, tmp_path):
  """score_special_tokens=False: [CLS]/[SEP] stay encoder context (other tokens' embeddings are unchanged) but are
  zeroed and masked out of the encode outputs and the loss inputs; the setting round-trips and enters the identity."""
  cfg = network.BertEncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)
  kw = dict(encoder_config=cfg, token_dim=16, query_max_len=12, doc_max_len=24, vocab_path=bert_vocab)
  scored_model = models.XTRModel(**kw)
  model = models.XTRModel(**kw, score_special_tokens=False)
  assert model.tokenizer.special_ids == (model.tokenizer.cls_id, model.tokenizer.sep_id)
  params = models.unbox_params(model.init(jax.random.key(5)))
  scored, unscored = models.PretrainedXTR(scored_model, params), models.PretrainedXTR(model, params)
  emb_all, mask_all = scored.encode_queries(TEXTS, batch_size=8)
  emb, mask = unscored.encode_queries(TEXTS, batch_size=8)
  ids, _ = model.tokenize_queries(TEXTS)
  special = (ids == model.tokenizer.cls_id) | (ids == model.tokenizer.sep_id)
  assert special[0].sum() == 2 and special[4].sum() == 2  # the truncated query keeps its [SEP]
  np.testing.assert_array_equal(mask, mask_all & ~special)
  np.testing.assert_array_equal(emb[~mask], 0.0)
  np.testing.assert_allclose(emb[mask], emb_all[mask], atol=1e-6)
  np.testing.assert_array_equal(model.scoring_mask(ids, mask_all), mask)  # NumPy path ...
  np.testing.assert_array_equal(np.asarray(jax.jit(model.scoring_mask)(ids, mask_all)), mask)  # ... and traced

  q_ids, q_mask = model.tokenize_queries(["first query", "second query"])
  d_ids, d_mask = model.tokenize_documents(["doc a pos", "doc a neg", "doc b pos", "doc b neg"])
  batch = {"query_tokens": q_ids, "query_mask": q_mask, "doc_tokens": d_ids.reshape(2, 2, 24),
           "doc_mask": d_mask.reshape(2, 2, 24)}
  seen = {}

  def recording_loss(q, qm, p, dm, labels):
    seen.update(q=q, qm=qm, p=p, dm=dm)
    return jnp.sum(q) + jnp.sum(p), {}

  model._loss = recording_loss  # pylint: disable=protected-access
  model.loss_fn(params, batch, None)
  d_special = np.isin(d_ids, model.tokenizer.special_ids)
  np.testing.assert_array_equal(np.asarray(seen["qm"]), q_mask & ~np.isin(q_ids, model.tokenizer.special_ids))
  np.testing.assert_array_equal(np.asarray(seen["dm"]), d_mask & ~d_special)
  p_ref = np.asarray(model.encode(params, d_ids, d_mask))
  np.testing.assert_array_equal(np.asarray(seen["p"])[d_special], 0.0)
  np.testing.assert_allclose(np.asarray(seen["p"])[~d_special], p_ref[~d_special], atol=1e-6)

  assert "score_special_tokens" not in scored.identity()
  assert unscored.identity()["score_special_tokens"] is False
  out = unscored.save(str(tmp_path / "unscored"))
  loaded = models.load_pretrained(out)
  assert loaded.model.score_special_tokens is False and loaded.identity() == unscored.identity()
  np.testing.assert_array_equal(loaded.encode_queries(TEXTS, batch_size=8)[1], mask)
  assert models.load_pretrained(out, score_special_tokens=True).identity() == scored.identity()
  # A model dir saved before the option existed loads with the default (scored).
  with open(os.path.join(out, models.CONFIG_FILE)) as f:
    cfg_json = json.load(f)
  del cfg_json["score_special_tokens"]
  with open(os.path.join(out, models.CONFIG_FILE), "w") as f:
    json.dump(cfg_json, f)
  assert models.load_pretrained(out).model.score_special_tokens is True
  with pytest.raises(ValueError, match="needs vocab_path"):
    models.XTRModel(**dict(kw, vocab_path=None), score_special_tokens=False)
  with pytest.raises(TypeError, match="must be a bool"):
    models.XTRModel(**kw, score_special_tokens="no")


def test_t5_special_token_is_eos(pretrained):
  assert pretrained.model.tokenizer.special_ids == (pretrained.model.tokenizer.eos_id,)
