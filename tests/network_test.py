"""Flax T5 / BERT stacks against Hugging Face torch on the same random weights, plus the layer/scan/dtype options."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from xtr_jax import convert, models, network, partitioning


def _hf_t5(feed_forward_proj: str, seed: int = 0) -> transformers.T5EncoderModel:
  torch.manual_seed(seed)
  hc = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                             feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
  model = transformers.T5EncoderModel(hc).eval()
  with torch.no_grad():  # non-trivial norms, so a swapped scale would show
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


def _padded_batch(vocab: int, length: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, vocab, (len(lengths), length)).astype(np.int32)
  mask = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
  ids[~mask] = 0
  return ids, mask


def _convert(hf_model, kind: str, **cfg_overrides):
  state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  hc = hf_model.config.to_dict()
  if kind == "t5":
    cfg = convert.t5_config_from_hf(hc, source="test", **cfg_overrides)
  else:
    cfg = convert.bert_config_from_hf(hc, source="test", **cfg_overrides)
  model = models.XTRModel(encoder_config=cfg, token_dim=16, query_max_len=8, doc_max_len=16)
  head = {"linear.weight": np.random.RandomState(0).normal(size=(16, cfg.d_model)).astype(np.float32)}
  params, report = convert.hf_state_to_params(state, model, source="test", head_state=head)
  assert not report.left_at_init
  return cfg, params


def test_relative_position_buckets_match_hf():
  rel_fn = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for nb, md in ((32, 128), (16, 40)):
    ours = network.relative_position_buckets(300, 300, num_buckets=nb, max_distance=md)
    ctx = torch.arange(300)[:, None]
    mem = torch.arange(300)[None, :]
    ref = rel_fn(mem - ctx, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ours)) == nb - 1  # every bucket but 'distance 0, positive side' is used over +-300


@pytest.mark.parametrize("ffp", ["relu", "gated-gelu"])
def test_t5_matches_hf_torch_padded(ffp):
  hf = _hf_t5(ffp)
  cfg, params = _convert(hf, "t5")
  ids, mask = _padded_batch(120, 40, [40, 23, 5])  # > 8 tokens apart: the logarithmic buckets are exercised
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long(),
             attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state.numpy()
  ours = np.asarray(jax.jit(network.T5Encoder(cfg).apply)({"params": params["encoder"]}, ids, mask))
  assert np.abs(ref).max() > 0.1
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-5, rtol=0)
  # Padding positions too (same additive-mask semantics).
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_bert_matches_hf_torch_padded():
  torch.manual_seed(1)
  hc = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
  hf = transformers.BertModel(hc, add_pooling_layer=False).eval()
  cfg, params = _convert(hf, "bert")
  ids, mask = _padded_batch(100, 20, [20, 11, 3])
  types = np.zeros_like(ids)
  types[:, 10:] = 1
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask.astype(np.int64)),
             token_type_ids=torch.from_numpy(types).long()).last_hidden_state.numpy()
  ours = np.asarray(jax.jit(network.BertEncoder(cfg).apply)({"params": params["encoder"]}, ids, mask,
                                                             token_type_ids=types))
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-5, rtol=0)


def test_every_param_has_logical_axes_known_to_the_rules():
  rule_names = {name for name, _ in partitioning.LOGICAL_AXIS_RULES}
  for cfg in (network.T5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4),
              network.T5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                      scan_layers=True, feed_forward_proj="relu"),
              network.BertEncoderConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                                        intermediate_size=32, max_position_embeddings=32)):
    abstract = models.XTRModel(encoder_config=cfg, token_dim=8, doc_max_len=32).abstract_variables()["params"]
    leaves = jax.tree_util.tree_leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for leaf in leaves:
      assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= rule_names, leaf.names
    if cfg.scan_layers:
      layer_leaves = jax.tree_util.tree_leaves(abstract["encoder"]["layers"],
                                               is_leaf=lambda x: isinstance(x, nn.Partitioned))
      assert all(x.names[0] == "layers" and x.value.shape[0] == 2 for x in layer_leaves)


def test_scan_and_remat_equal_plain_loop_forward_and_grad():
  hf = _hf_t5("gated-gelu", seed=3)
  cfg, params = _convert(hf, "t5")
  scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=True)
  scan_params = dict(params, encoder=convert.stack_layers(params["encoder"], cfg.num_layers))
  ids, mask = _padded_batch(120, 12, [12, 7])
  plain, scanned = models.XTRModel(encoder_config=cfg, token_dim=16), models.XTRModel(encoder_config=scan_cfg,
                                                                                       token_dim=16)
  np.testing.assert_allclose(np.asarray(plain.encode(params, ids, mask)),
                             np.asarray(scanned.encode(scan_params, ids, mask)), atol=1e-6)

  def loss(model, p):
    return jnp.sum(model.encode(p, ids, mask)[..., 0])

  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(scan_params)
  g_scan["encoder"] = convert.unstack_layers(g_scan["encoder"], cfg.num_layers)
  flat_p, flat_s = traverse_util.flatten_dict(g_plain), traverse_util.flatten_dict(g_scan)
  assert flat_p.keys() == flat_s.keys()
  for k in flat_p:
    np.testing.assert_allclose(np.asarray(flat_p[k]), np.asarray(flat_s[k]), atol=1e-5, err_msg=str(k))


def test_stack_layers_checks_the_layer_count():
  enc = {f"layers_{i}": {"mlp": {"kernel": np.full((2, 3), i, np.float32)}} for i in range(3)}
  enc["final_norm"] = {"scale": np.ones(3, np.float32)}
  stacked = network.stack_layers(enc, 3)
  assert stacked["layers"]["mlp"]["kernel"].shape == (3, 2, 3)
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["kernel"][:, 0, 0], [0, 1, 2])
  back = network.unstack_layers(stacked, 3)
  assert traverse_util.flatten_dict(back).keys() == traverse_util.flatten_dict(enc).keys()
  with pytest.raises(ValueError, match=r"encoder has \[3\] layers, expected 4"):
    network.stack_layers(enc, 4)
  with pytest.raises(ValueError, match=r"encoder has \[3\] layers, expected 2"):
    network.unstack_layers(stacked, 2)


def test_dropout_only_when_not_deterministic():
  cfg = network.T5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                dropout_rate=0.2)
  model = models.XTRModel(encoder_config=cfg, token_dim=8)
  params = model.init(jax.random.key(0))
  ids, mask = _padded_batch(64, 10, [10, 4])
  det = np.asarray(model.encode(params, ids, mask))
  d1 = np.asarray(model.encode(params, ids, mask, deterministic=False, dropout_rng=jax.random.key(1)))
  d1b = np.asarray(model.encode(params, ids, mask, deterministic=False, dropout_rng=jax.random.key(1)))
  d2 = np.asarray(model.encode(params, ids, mask, deterministic=False, dropout_rng=jax.random.key(2)))
  assert np.abs(d1 - det).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
  np.testing.assert_array_equal(d1, d1b)
  np.testing.assert_array_equal(d1[~mask], 0.0)
  with pytest.raises(ValueError, match="dropout_rng"):
    model.encode(params, ids, mask, deterministic=False)


def test_bfloat16_compute_and_param_dtypes():
  base = network.T5EncoderConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
  model32 = models.XTRModel(encoder_config=base, token_dim=16)
  params = models.unbox_params(model32.init(jax.random.key(0)))
  ids, mask = _padded_batch(64, 16, [16, 9])
  ref = np.asarray(model32.encode(params, ids, mask))
  bf = models.XTRModel(encoder_config=dataclasses.replace(base, dtype="bfloat16"), token_dim=16)
  out = np.asarray(bf.encode(params, ids, mask))
  assert out.dtype == np.float32
  cos = np.sum(out * ref, axis=-1)[mask]
  assert cos.min() > 0.97, cos.min()
  pbf = models.XTRModel(encoder_config=dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16"),
                        token_dim=16)
  dtypes = {x.dtype for x in jax.tree_util.tree_leaves(models.unbox_params(pbf.abstract_variables()))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_all_padding_rows_are_zero_without_nan():
  cfg = network.BertEncoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
  for c in (cfg, network.T5EncoderConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)):
    model = models.XTRModel(encoder_config=c, token_dim=8, query_max_len=8, doc_max_len=16)
    params = model.init(jax.random.key(0))
    ids, mask = _padded_batch(64, 8, [8, 0])
    out = np.asarray(model.encode(params, ids, mask))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(out[0], axis=-1), 1.0, rtol=1e-5)
    if isinstance(c, network.T5EncoderConfig):  # training sees all-padding documents: gradients stay finite
      g = jax.jit(jax.grad(lambda p: jnp.sum(model.encode(p, ids, mask))))(models.unbox_params(params))
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="gated-swiglu"):
    network.T5EncoderConfig(feed_forward_proj="gated-swiglu")
  with pytest.raises(ValueError, match="dtype"):
    network.T5EncoderConfig(dtype="float8")
  with pytest.raises(ValueError, match="hidden_act"):
    network.BertEncoderConfig(hidden_act="tanhh")
  cfg = network.BertEncoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  max_position_embeddings=16)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    models.XTRModel(encoder_config=cfg, query_max_len=8, doc_max_len=32)
