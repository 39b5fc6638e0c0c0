"""BM25 baseline with bm25s, to put the neural numbers in context on the same dataset and split.

bm25s' own tokenizer: lowercased, English stopwords removed, no stemming (PyStemmer is not a dependency), Lucene BM25
with k1 = 1.5, b = 0.75 by default. This is close to but not the same as BEIR's Elasticsearch BM25 (which stems), so
expect somewhat lower numbers than the BEIR paper's BM25 column.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import bm25s
import numpy as np


def bm25_rankings(doc_ids: Sequence[str], doc_texts: Sequence[str], queries: Mapping[str, str], *, k: int = 100,
                  k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str | None = "en",
                  show_progress: bool = True) -> tuple[dict[str, list[tuple[str, float]]], dict[str, float]]:
  """Top-k BM25 rankings {query_id: [(doc_id, score), ...] best first} and timings {index_s, retrieve_s}.

  Documents that share no term with the query (score 0) are left out, as a lexical engine would not return them.
  """
  if len(doc_ids) != len(doc_texts):
    raise ValueError(f"{len(doc_ids)} document ids for {len(doc_texts)} document texts")
  if not doc_ids:
    raise ValueError("BM25 needs a non-empty corpus")
  t0 = time.perf_counter()
  retriever = bm25s.BM25(k1=k1, b=b, method=method)
  retriever.index(bm25s.tokenize(list(doc_texts), stopwords=stopwords, show_progress=show_progress),
                  show_progress=show_progress)
  index_s = time.perf_counter() - t0
  qids = list(queries)
  t0 = time.perf_counter()
  query_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords=stopwords, show_progress=False)
  k_eff = min(k, len(doc_ids))
  docs, scores = retriever.retrieve(query_tokens, k=k_eff, show_progress=show_progress, n_threads=0)
  retrieve_s = time.perf_counter() - t0
  docs = np.asarray(docs)
  scores = np.asarray(scores, dtype=np.float64)
  rankings = {}
  for row, qid in enumerate(qids):
    keep = scores[row] > 0
    rankings[qid] = [(doc_ids[int(d)], float(s)) for d, s in zip(docs[row][keep], scores[row][keep])]
  return rankings, {"index_s": index_s, "retrieve_s": retrieve_s}
