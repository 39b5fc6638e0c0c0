"""xtr_jax.export: shards reload identically, resume skips finished shards, corruption is refused."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from xtr_jax import export, models, network, tokenization

WORDS = ("protein cell gene virus vaccine brain cancer tumor dose trial mouse human blood heart lung liver "
         "insulin diabetes obesity sleep memory neuron receptor enzyme kinase").split()


def tiny_model(vocab: str, seed: int = 0) -> models.PretrainedXTR:
  cfg = network.BertEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
  model = models.XTRModel(encoder_config=cfg, token_dim=16, query_max_len=8, doc_max_len=24, vocab_path=vocab)
  return models.PretrainedXTR(model, model.init(jax.random.key(seed))["params"])


def write_corpus(path, n_docs: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n_docs):
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
    docs.append({"_id": f"d{i}", "title": f"Title {i}" if i % 3 else "", "text": text})
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d) + "\n")
  return docs


def test_export_reloads_identically_and_resumes(tmp_path, bert_vocab):
  enc = tiny_model(bert_vocab)
  docs = write_corpus(tmp_path / "corpus", 23)
  out = str(tmp_path / "out")
  export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=7, batch_size=4, dtype="float32")
  store = export.TokenStore.open(out)
  assert store.doc_ids == [d["_id"] for d in docs]
  assert len(store.manifest["shards"]) == 4
  # Independent check: encode every document alone and compare with the stored tokens.
  texts = [tokenization.preprocess_document(d["title"], d["text"]) for d in docs]
  emb, mask = enc.encode_documents(texts, batch_size=32)
  ids, _ = enc.model.tokenize_documents(texts)
  for j in range(len(docs)):
    lo, hi = store.doc_offsets[j], store.doc_offsets[j + 1]
    assert hi - lo == mask[j].sum()
    np.testing.assert_allclose(store.embeddings[lo:hi], emb[j][mask[j]], atol=1e-5)
    np.testing.assert_array_equal(store.token_ids[lo:hi], ids[j][mask[j]])
    assert np.all(store.token_doc[lo:hi] == j)
  assert store.manifest["identity"]["model_sha256"] == enc.identity()["model_sha256"]
  assert store.manifest["num_tokens"] == int(mask.sum())

  # Resume: a finished shard is not re-encoded (its file is untouched), a missing one is re-created identically.
  os.remove(os.path.join(out, "shard_00002.json"))
  before = os.path.getmtime(os.path.join(out, "shard_00000.embeddings.npy"))
  export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=7, batch_size=4, dtype="float32")
  assert os.path.getmtime(os.path.join(out, "shard_00000.embeddings.npy")) == before
  again = export.TokenStore.open(out)
  np.testing.assert_array_equal(np.asarray(again.embeddings), np.asarray(store.embeddings))

  # The query length is not part of what a document export depends on: resuming with it changed skips every shard.
  longer_queries = models.PretrainedXTR(
      models.XTRModel(encoder_config=enc.model.encoder_config, token_dim=16, query_max_len=32, doc_max_len=24,
                      vocab_path=bert_vocab), enc.params)
  os.remove(os.path.join(out, "shard_00001.json"))
  export.export_corpus(longer_queries, str(tmp_path / "corpus"), out, docs_per_shard=7, batch_size=4,
                       dtype="float32")
  assert os.path.getmtime(os.path.join(out, "shard_00000.embeddings.npy")) == before
  np.testing.assert_array_equal(np.asarray(export.TokenStore.open(out).embeddings), np.asarray(store.embeddings))
  # ... but the document length is.
  with pytest.raises(ValueError, match="identity"):
    export.export_corpus(models.PretrainedXTR(models.XTRModel(
        encoder_config=enc.model.encoder_config, token_dim=16, query_max_len=8, doc_max_len=20, vocab_path=bert_vocab),
        enc.params), str(tmp_path / "corpus"), out, docs_per_shard=7, dtype="float32")
  # Resuming with another model into the same directory is refused.
  with pytest.raises(ValueError, match="identity"):
    export.export_corpus(tiny_model(bert_vocab, seed=1), str(tmp_path / "corpus"), out, docs_per_shard=7,
                         dtype="float32")


def test_two_processes_write_disjoint_shards_float16(tmp_path, bert_vocab):
  enc = tiny_model(bert_vocab)
  write_corpus(tmp_path / "corpus", 15, seed=3)
  out = str(tmp_path / "out")
  assert export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=4, process_index=1,
                              process_count=2) is None
  assert sorted(f for f in os.listdir(out) if f.endswith("0.json") or f.endswith("1.json") or
                f.endswith("2.json") or f.endswith("3.json")) == ["shard_00001.json", "shard_00003.json"]
  export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=4, process_index=0, process_count=2)
  store = export.TokenStore.open(out)
  one = str(tmp_path / "one")
  export.export_corpus(enc, str(tmp_path / "corpus"), one, docs_per_shard=15)
  ref = export.TokenStore.open(one)
  assert store.embeddings.dtype == np.float16
  # Batches differ between the two exports (other padded shapes), so float16 rounding may differ by one ulp.
  np.testing.assert_allclose(np.asarray(store.embeddings, np.float32), np.asarray(ref.embeddings, np.float32),
                             atol=1e-3)
  np.testing.assert_array_equal(store.token_ids, ref.token_ids)
  np.testing.assert_array_equal(store.doc_offsets, ref.doc_offsets)
  assert store.doc_ids == ref.doc_ids


def test_corrupted_or_truncated_shard_refused(tmp_path, bert_vocab):
  enc = tiny_model(bert_vocab)
  write_corpus(tmp_path / "corpus", 6)
  out = str(tmp_path / "out")
  export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=3)
  path = os.path.join(out, "shard_00001.embeddings.npy")
  data = bytearray(open(path, "rb").read())
  data[-3] ^= 0xFF
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="shard_00001.embeddings.npy: sha256"):
    export.TokenStore.open(out)
  with pytest.raises(ValueError, match="sha256"):  # resume re-verifies instead of trusting the marker
    export.export_corpus(enc, str(tmp_path / "corpus"), out, docs_per_shard=3)
  open(path, "wb").write(bytes(data[:len(data) // 2]))
  with pytest.raises(ValueError, match="sha256"):
    export.TokenStore.open(out)
  # Without hashing, the truncated .npy is still caught by its reader.
  with pytest.raises(ValueError, match="shard_00001.embeddings.npy"):
    export.TokenStore.open(out, verify=False)


def test_bad_inputs(tmp_path, bert_vocab):
  enc = tiny_model(bert_vocab)
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "corpus.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="no documents"):
    export.export_corpus(enc, str(tmp_path / "empty"), str(tmp_path / "o1"))
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b"}\n')
  with pytest.raises(ValueError, match="corpus.jsonl:2: missing field 'text'"):
    export.export_corpus(enc, str(tmp_path / "bad"), str(tmp_path / "o2"))
  with pytest.raises(ValueError, match="dtype"):
    export.export_corpus(enc, str(tmp_path / "bad"), str(tmp_path / "o3"), dtype="bfloat16")
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    export.TokenStore.open(str(tmp_path / "nowhere"))


def test_gin_entry_point_sharded_over_devices(tmp_path, bert_vocab):
  from xtr_jax import gin_utils, index  # pylint: disable=g-import-not-at-top
  enc = tiny_model(bert_vocab)
  enc.save(str(tmp_path / "model"))
  write_corpus(tmp_path / "corpus", 11)
  out = str(tmp_path / "out")
  gin_utils.run(export.export, [
      "--gin_file=runs/export.gin", f"--gin.MODEL='{tmp_path / 'model'}'", f"--gin.CORPUS='{tmp_path / 'corpus'}'",
      f"--gin.OUTPUT_DIR='{out}'", "--gin.xtr_export.index_backend='bruteforce'", "--gin.xtr_export.dtype='float32'",
      "--gin.xtr_export.batch_size=8"])
  store = export.TokenStore.open(out)  # encoded with the batch split over the 8 local devices
  ref = str(tmp_path / "ref")
  export.export_corpus(enc, str(tmp_path / "corpus"), ref, dtype="float32")
  np.testing.assert_allclose(np.asarray(store.embeddings), np.asarray(export.TokenStore.open(ref).embeddings),
                             atol=1e-5)
  idx = index.load_index(os.path.join(out, export.INDEX_SUBDIR), expect_identity=enc.identity())
  assert idx.backend == "bruteforce" and idx.num_tokens == store.num_tokens


def test_export_without_special_tokens_stores_only_scored_tokens(tmp_path, bert_vocab):
  """A model that does not score [CLS]/[SEP] exports only its scored tokens, and its store is kept apart from the
  scoring model's: resuming across the two settings and querying one with the other are refused."""
  scored = tiny_model(bert_vocab)
  unscored = models.PretrainedXTR(models.XTRModel(
      encoder_config=scored.model.encoder_config, token_dim=16, query_max_len=8, doc_max_len=24,
      vocab_path=bert_vocab, score_special_tokens=False), scored.params)
  docs = write_corpus(tmp_path / "corpus", 9, seed=2)
  out = str(tmp_path / "out")
  export.export_corpus(unscored, str(tmp_path / "corpus"), out, docs_per_shard=4, batch_size=4, dtype="float32")
  store = export.TokenStore.open(out)
  texts = [tokenization.preprocess_document(d["title"], d["text"]) for d in docs]
  ids, mask = scored.model.tokenize_documents(texts)
  emb_all, _ = scored.encode_documents(texts)
  keep = mask & ~np.isin(ids, scored.model.tokenizer.special_ids)
  assert keep.sum() == store.num_tokens == mask.sum() - 2 * len(docs)
  for j in range(len(docs)):
    lo, hi = store.doc_offsets[j], store.doc_offsets[j + 1]
    np.testing.assert_array_equal(store.token_ids[lo:hi], ids[j][keep[j]])
    np.testing.assert_allclose(store.embeddings[lo:hi], emb_all[j][keep[j]], atol=1e-5)  # same context
  assert store.identity["score_special_tokens"] is False
  os.remove(os.path.join(out, "shard_00001.json"))
  with pytest.raises(ValueError, match="identity"):
    export.export_corpus(scored, str(tmp_path / "corpus"), out, docs_per_shard=4, dtype="float32")
  from xtr_jax import retrieval  # pylint: disable=g-import-not-at-top
  export.export_corpus(unscored, str(tmp_path / "corpus"), out, docs_per_shard=4, dtype="float32")
  export.build_store_index(out, backend="bruteforce")
  assert retrieval.XTRRetriever.load(unscored, out).search(["protein cell"], k=3, token_top_k=5)[0]
  with pytest.raises(ValueError, match="score_special_tokens"):
    retrieval.XTRRetriever.load(scored, out)
