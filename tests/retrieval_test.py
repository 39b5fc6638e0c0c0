"""XTRRetriever end to end on a tiny real model: brute-force retrieval equals exhaustive NumPy XTR scoring."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from export_test import tiny_model, write_corpus  # pylint: disable=g-bad-import-order
from scoring_test import reference_xtr  # pylint: disable=g-bad-import-order
from xtr_jax import export, retrieval

QUERIES = ["protein cell", "brain tumor trial", "insulin", "human heart lung liver", "kinase receptor enzyme"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bert_vocab):
  root = tmp_path_factory.mktemp("retrieval")
  write_corpus(root / "corpus", 25, seed=5)
  enc = tiny_model(bert_vocab)
  out = str(root / "out")
  export.export_corpus(enc, str(root / "corpus"), out, docs_per_shard=10, dtype="float32")
  export.build_store_index(out, backend="bruteforce", chunk_size=128)
  return enc, out


def test_bruteforce_equals_exhaustive_numpy_xtr(exported):
  enc, out = exported
  r = retrieval.XTRRetriever.load(enc, out)
  q, q_mask = r.encode_queries(QUERIES)
  emb = np.asarray(r.store.embeddings, np.float32)
  sims = np.einsum("qnd,td->qnt", q, emb)  # every query token against every corpus token
  kp = 12
  top = np.argsort(-sims, axis=-1, kind="stable")[..., :kp]
  ref_scores = np.take_along_axis(sims, top, axis=-1)
  ref_docs = r.store.token_doc[top]
  want_d, want_s = reference_xtr(ref_scores, ref_docs, q_mask, 10)
  got_d, got_s = r.search_indices(QUERIES, k=10, token_top_k=kp, batch_size=2)
  np.testing.assert_array_equal(got_d, want_d)
  np.testing.assert_allclose(got_s, want_s, atol=1e-5)
  results = r.search(QUERIES, k=10, token_top_k=kp)
  assert [doc for doc, _ in results[0]] == [r.store.doc_ids[j] for j in want_d[0] if j >= 0]
  # The exposed token retrieval is what the scorer used.
  ret = r.retrieve_tokens(q, q_mask, kp)
  valid = q_mask[..., None] & np.ones(kp, bool)
  np.testing.assert_array_equal(ret.token_pos[valid], top[valid])
  np.testing.assert_array_equal(ret.vocab_ids[valid], r.store.token_ids[top[valid]])
  assert np.all(ret.doc_idx[~q_mask] == -1)


def test_all_tokens_retrieved_equals_exact_colbert(exported):
  enc, out = exported
  r = retrieval.XTRRetriever.load(enc, out)
  q, q_mask = r.encode_queries(QUERIES)
  emb = np.asarray(r.store.embeddings, np.float32)
  offs = r.store.doc_offsets
  n_docs = len(r.store.doc_ids)
  exact = np.array([[(q[b][q_mask[b]] @ emb[offs[d]:offs[d + 1]].T).max(1).mean() for d in range(n_docs)]
                    for b in range(len(QUERIES))])
  want = np.argsort(-exact, axis=1, kind="stable")[:, :8]
  t = r.store.num_tokens
  for mode in ("xtr", "colbert", "exact"):  # with k' = T (and beyond: clamped) nothing needs imputing
    d, s = r.search_indices(QUERIES, k=8, token_top_k=t + 5, scoring=mode)
    np.testing.assert_array_equal(d, want, err_msg=mode)
    np.testing.assert_allclose(s, np.take_along_axis(exact, want, 1), atol=1e-5, err_msg=mode)


def test_refuses_other_model_or_dimension(exported, bert_vocab):
  _, out = exported
  with pytest.raises(ValueError, match="model_sha256"):
    retrieval.XTRRetriever.load(tiny_model(bert_vocab, seed=7), out)
  from xtr_jax import models, network  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = network.BertEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
  model = models.XTRModel(encoder_config=cfg, token_dim=8, query_max_len=8, doc_max_len=24, vocab_path=bert_vocab)
  with pytest.raises(ValueError, match="dimension 16.*token_dim is 8"):
    retrieval.XTRRetriever.load(models.PretrainedXTR(model, model.init(jax.random.key(0))["params"]), out)


def test_load_from_saved_model_dir_and_bad_args(exported, tmp_path):
  enc, out = exported
  enc.save(str(tmp_path / "model"))
  r = retrieval.XTRRetriever.load(str(tmp_path / "model"), out)
  a = r.search(QUERIES[:2], k=5, token_top_k=20)
  b = retrieval.XTRRetriever.load(enc, out).search(QUERIES[:2], k=5, token_top_k=20)
  assert a == b
  with pytest.raises(ValueError, match="scoring"):
    r.search(QUERIES, scoring="bm25")
  with pytest.raises(TypeError, match="list of strings"):
    r.search("one query")
  with pytest.raises(FileNotFoundError, match="token_index"):
    retrieval.XTRRetriever.load(enc, _copy_without_index(out, tmp_path / "noindex"))


def _copy_without_index(src, dst):
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns("token_index"))
  return str(dst)


def test_faiss_probing_every_list_with_exact_refinement_equals_bruteforce(exported, tmp_path):
  """The FAISS backend behind XTRRetriever: with every list probed and every candidate rescored in float32 it must
  retrieve exactly what exhaustive search does (the approximation lives only in the codes and lists it skips)."""
  enc, out = exported
  store = str(tmp_path / "store")
  shutil.copytree(out, store, ignore=shutil.ignore_patterns(export.INDEX_SUBDIR))
  num_tokens = export.TokenStore.open(store).num_tokens
  export.build_store_index(store, backend="faiss", num_leaves=8, num_leaves_to_search=8, reorder_k=num_tokens,
                           reorder_dtype="float32")
  brute, approx = retrieval.XTRRetriever.load(enc, out), retrieval.XTRRetriever.load(enc, store)
  assert approx.index.backend == "faiss"
  want_d, want_s = brute.search_indices(QUERIES, k=10, token_top_k=12)
  got_d, got_s = approx.search_indices(QUERIES, k=10, token_top_k=12)
  np.testing.assert_array_equal(got_d, want_d)
  np.testing.assert_allclose(got_s, want_s, atol=1e-5)
  # The adaptive probe behind XTRRetriever: a gap of 2 (inner products of unit vectors differ by at most 2) keeps
  # every list, so its own refinement must give the same.
  shutil.rmtree(os.path.join(store, export.INDEX_SUBDIR))
  export.build_store_index(store, backend="faiss", num_leaves=8, num_leaves_to_search=8, reorder_k=num_tokens,
                           reorder_dtype="float32", probe_gap=2.0, min_leaves_to_search=2)
  adaptive = retrieval.XTRRetriever.load(enc, store)
  assert adaptive.index.params["probe_gap"] == 2.0
  got_d, got_s = adaptive.search_indices(QUERIES, k=10, token_top_k=12)
  np.testing.assert_array_equal(got_d, want_d)
  np.testing.assert_allclose(got_s, want_s, atol=1e-5)
