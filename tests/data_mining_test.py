"""BM25 (bm25s) hard-negative mining on a SciFact subset: negatives never include a positive."""

import math
import os
import re
from collections import Counter

import numpy as np
import pytest

from xtr_jax.data import beir, mining


@pytest.fixture(scope="module")
def scifact_subset(data_dir):
  root = data_dir / "beir" / "scifact"
  corpus = beir.load_corpus(root / "corpus.jsonl")
  qrels = beir.load_qrels(root, "train")
  qids = sorted(qrels.relevance, key=int)[:120]
  judged = {d for q in qids for d in qrels.relevance[q]}
  # The judged documents plus every 4th other document: a small corpus where positives compete with many others.
  keep = [d for i, d in enumerate(corpus) if d in judged or i % 4 == 0]
  sub = {d: corpus[d] for d in keep}
  queries = beir.load_queries(root / "queries.jsonl", ids=qids)
  return sub, queries, {q: qrels.relevance[q] for q in qids}, qids


def test_bm25_negatives_exclude_positives(scifact_subset):
  corpus, queries, relevance, qids = scifact_subset
  index = mining.BM25Index(list(corpus), [mining.document_text(corpus[d]) for d in corpus])
  examples = mining.mine_bm25_examples(corpus, queries, relevance, num_bm25_negatives=5, num_random_negatives=3,
                                       seed=1, query_ids=qids, index=index)
  assert len(examples) == sum(len(relevance[q]) for q in qids)
  raw, _ = index.search([queries[q] for q in qids], 8)
  positive_in_raw_top = 0
  for ex in examples:
    q, pos = ex.example_id.split("/")
    positives = {d for d, s in relevance[q].items() if s > 0}
    assert ex.positive_id == pos and pos in positives
    assert len(ex.negative_ids) == 8 and len(set(ex.negative_ids)) == 8
    assert not set(ex.negative_ids) & positives
    hard = ex.negative_ids[:5]
    # The hard negatives are exactly BM25's best non-positive documents, in order.
    top = [index.doc_ids[i] for i in raw[qids.index(q)]]
    assert list(hard) == [d for d in top if d not in positives][:5]
    positive_in_raw_top += bool(positives & set(top))
    assert ex.positive == mining.document_text(corpus[pos])
    assert ex.negatives[0] == mining.document_text(corpus[hard[0]])
  # BM25 does rank positives on top for many SciFact queries, so the exclusion was really exercised.
  assert positive_in_raw_top > len(qids) // 2


def _numpy_bm25(corpus_texts, query, k1=0.9, b=0.4):
  """Independent Lucene BM25 scores float [N] (no stopwords, no stemming; a repeated query term counts twice)."""
  tok = lambda s: re.findall(r"(?u)\b\w\w+\b", s.lower())
  docs = [tok(t) for t in corpus_texts]
  n = len(docs)
  avgdl = np.mean([len(d) for d in docs])
  df = Counter(w for d in docs for w in set(d))
  scores = np.zeros(n)
  for w in tok(query):
    if w not in df:
      continue
    idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
    for i, d in enumerate(docs):
      tf = d.count(w)
      if tf:
        scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
  return scores


def test_bm25s_agrees_with_numpy_bm25(scifact_subset):
  corpus, queries, _, qids = scifact_subset
  ids = list(corpus)[:300]
  texts = [mining.document_text(corpus[d]) for d in ids]
  import bm25s  # the reference uses no stopwords, so build the bm25s side the same way
  retriever = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
  retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
  for q in qids[:15]:
    res, got = retriever.retrieve(bm25s.tokenize([queries[q]], stopwords=None, show_progress=False,
                                                 return_ids=False), k=3, show_progress=False)
    want = _numpy_bm25(texts, queries[q])
    np.testing.assert_array_equal(res[0], np.argsort(-want, kind="stable")[:3])
    np.testing.assert_allclose(got[0], np.sort(want)[::-1][:3], rtol=1e-5)


def test_beir_training_examples_shard(data_dir):
  root = os.fspath(data_dir / "beir" / "scifact")
  a = mining.load_beir_training_examples(root, num_bm25_negatives=1, shard_index=0, shard_count=2)
  b = mining.load_beir_training_examples(root, num_bm25_negatives=1, shard_index=1, shard_count=2)
  ids = [e.example_id for e in a + b]
  assert len(ids) == len(set(ids)) == 919  # one example per train qrels row
  assert {e.example_id.split("/")[0] for e in a}.isdisjoint({e.example_id.split("/")[0] for e in b})
