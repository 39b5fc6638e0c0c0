"""Training examples from BEIR train qrels + corpus, with BM25 hard negatives (bm25s) and random negatives.

One example per judged-relevant (query, document) pair. Hard negatives are the highest-scoring BM25 documents for
the query that are NOT judged relevant to it (every document with a positive score for the query is excluded, not
only the example's own positive); random negatives are drawn uniformly from the rest of the corpus, excluding the
positives and the hard negatives already chosen. Documents are `f"{title} {text}"` as XTR encodes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np

from xtr_jax.data import beir
from xtr_jax.data.training_files import TrainingExample


def document_text(doc: beir.BeirDoc) -> str:
  """`title text` with the original case (the pipeline lowercases at tokenization)."""
  title = doc.title.strip()
  return f"{title} {doc.text}" if title else doc.text


class BM25Index:
  """bm25s index of a corpus (English stopwords, Lucene BM25, k1=0.9, b=0.4 as Anserini's BEIR baselines)."""

  def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], *, k1: float = 0.9, b: float = 0.4):
    import bm25s  # pylint: disable=g-import-not-at-top
    self._bm25s = bm25s
    self.doc_ids = list(doc_ids)
    self.retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    tokens = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
    self.retriever.index(tokens, show_progress=False)

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc indices int [Nq, k], scores float32 [Nq, k]) best first; k is capped at the corpus size."""
    k = min(k, len(self.doc_ids))
    q_tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)
    # A query whose every token is a stopword or unknown would make bm25s fail; give it a neutral token instead.
    q_tokens = [t if t else ["the_empty_query"] for t in q_tokens]
    idx, scores = self.retriever.retrieve(q_tokens, k=k, show_progress=False, n_threads=1)
    return np.asarray(idx), np.asarray(scores, dtype=np.float32)


def mine_bm25_examples(corpus: Mapping[str, beir.BeirDoc], queries: Mapping[str, str],
                       relevance: Mapping[str, Mapping[str, int]], *, num_bm25_negatives: int = 4,
                       num_random_negatives: int = 0, bm25_depth: int | None = None, seed: int = 0,
                       query_ids: Sequence[str] | None = None, index: BM25Index | None = None,
                       ) -> list[TrainingExample]:
  """Examples `(query, positive, bm25 negatives..., random negatives...)` with doc ids in `negative_ids`.

  Args:
    corpus / queries / relevance: a BEIR split (`relevance[qid][doc_id] = score`; score > 0 is relevant).
    num_bm25_negatives: hard negatives per example, best BM25 first.
    num_random_negatives: uniform random corpus negatives appended after the hard ones.
    bm25_depth: BM25 candidates retrieved per query (default: negatives + positives of the query + 10).
    seed: random negatives are drawn from `np.random.default_rng([seed, query position])`.
    query_ids: restrict to these queries (e.g. this process's shard), in this order; default all judged queries.
    index: a prebuilt `BM25Index` over `corpus` (built here when None).
  Returns:
    list of TrainingExample, ordered by query then positive doc id; queries missing from `queries` are skipped with
    a warning.
  """
  if num_bm25_negatives < 0 or num_random_negatives < 0:
    raise ValueError("negative counts must be >= 0")
  qids = list(query_ids) if query_ids is not None else list(relevance)
  missing = [q for q in qids if q not in queries]
  if missing:
    logging.warning("%d judged queries are not in queries.jsonl and are skipped (first: %s)", len(missing),
                    missing[:5])
  qids = [q for q in qids if q in queries]
  doc_ids = list(corpus)
  if index is None and num_bm25_negatives:
    index = BM25Index(doc_ids, [document_text(corpus[d]) for d in doc_ids])
  positives = {q: {d for d, s in relevance.get(q, {}).items() if s > 0} for q in qids}
  hard: dict[str, list[str]] = {q: [] for q in qids}
  if num_bm25_negatives and qids:
    max_pos = max(len(p) for p in positives.values())
    depth = bm25_depth or num_bm25_negatives + max_pos + 10
    idx, _ = index.search([queries[q] for q in qids], depth)
    for row, q in enumerate(qids):
      cands = [index.doc_ids[i] for i in idx[row] if index.doc_ids[i] not in positives[q]]
      hard[q] = cands[:num_bm25_negatives]
      if len(hard[q]) < num_bm25_negatives:
        logging.warning("query %s: only %d BM25 negatives within depth %d", q, len(hard[q]), depth)
  out = []
  for pos_in_list, q in enumerate(qids):
    rng = np.random.default_rng([seed, pos_in_list])
    for pos_id in sorted(positives[q]):
      if pos_id not in corpus:
        continue  # a qrels row for an unknown document (counted by beir.load_qrels)
      taken = set(positives[q]) | set(hard[q])
      rand: list[str] = []
      while len(rand) < num_random_negatives and len(taken) < len(doc_ids):
        cand = doc_ids[int(rng.integers(len(doc_ids)))]
        if cand not in taken:
          taken.add(cand)
          rand.append(cand)
      neg_ids = tuple(hard[q]) + tuple(rand)
      out.append(TrainingExample(
          example_id=f"{q}/{pos_id}", query=queries[q], positive=document_text(corpus[pos_id]),
          negatives=tuple(document_text(corpus[d]) for d in neg_ids), positive_id=pos_id, negative_ids=neg_ids))
  return out


def load_beir_training_examples(root: str | os.PathLike, split: str = "train", *, num_bm25_negatives: int = 4,
                                num_random_negatives: int = 0, seed: int = 0, shard_index: int = 0,
                                shard_count: int = 1) -> list[TrainingExample]:
  """Mines examples for the judged queries of `qrels/<split>.tsv` whose position % shard_count == shard_index."""
  root = os.fspath(root)
  corpus = beir.load_corpus(os.path.join(root, "corpus.jsonl"))
  qrels = beir.load_qrels(root, split, corpus_ids=corpus)
  all_qids = list(qrels.relevance)
  queries = beir.load_queries(os.path.join(root, "queries.jsonl"), ids=all_qids)
  mine_ids = [q for i, q in enumerate(all_qids) if i % shard_count == shard_index]
  return mine_bm25_examples(corpus, queries, qrels.relevance, num_bm25_negatives=num_bm25_negatives,
                            num_random_negatives=num_random_negatives, seed=seed, query_ids=mine_ids)
