"""The XTR paper's token-retrieval analyses, as pure functions over retrieved token hits.

Inputs are what token retrieval returns for a batch of queries, after mapping each retrieved token to its document and
vocabulary id (`TokenStore.token_doc` / `.token_ids`):

  hit_docs   int32 [Nq, n, k']  document index of the j-th token retrieved for query token i; -1 = no hit
  hit_vocab  int32 [Nq, n, k']  vocabulary id of that retrieved token (ignored where hit_docs == -1)
  q_mask     bool  [Nq, n]      valid query tokens (padding retrieves nothing that counts)
  q_ids      int32 [Nq, n]      vocabulary ids of the query tokens

* gold-token ratio (paper section 6.1): share of the retrieved tokens that belong to a relevant document.
* lexical-token ratio: share of the retrieved tokens whose vocabulary id equals some token id of the query
  (`same_position=True`: equals the id of the query token that retrieved it, the stricter reading).
* token recall vs exact search: share of the exact top-k' tokens of each query token that an approximate index
  (ScaNN) also returned. Label-free, so it can pick index settings without touching relevance judgments. On the
  MiniLM models of the README's Results it is what separates ScaNN from exact XTR scoring: the scores ScaNN returns
  are within ~0.005 (mean) of the exact ones, and rescoring its tokens exactly changes nDCG@10 by ~0.1.
All three are computed per query and averaged over queries (each query weighs the same); queries with no valid hits
are left out of the mean and counted in `queries_without_hits`.

* cost analysis (paper section 3.3, measured instead of assumed): mean query length n, mean document length m, mean
  number of retrieved tokens per candidate document r, the paper's operation counts
  ColBERT = n^2 k' (2 m d + m + 1) and XTR = n^2 k' (r + 1), their ratio, and the bytes each scoring stage reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _check_hits(hit_docs: np.ndarray, q_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  hit_docs = np.asarray(hit_docs)
  q_mask = np.asarray(q_mask, dtype=bool)
  if hit_docs.ndim != 3:
    raise ValueError(f"hit_docs must be [Nq, n, k'], got shape {hit_docs.shape}")
  if q_mask.shape != hit_docs.shape[:2]:
    raise ValueError(f"q_mask shape {q_mask.shape} does not match hit_docs [Nq, n] = {hit_docs.shape[:2]}")
  valid = (hit_docs >= 0) & q_mask[:, :, None]
  return hit_docs, valid


def _per_query_mean(matches: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
  """matches, valid: bool [Nq, n, k'] -> {'mean', 'per_query' float64 [Nq] (nan: no hits), 'queries_without_hits'}."""
  hits = valid.sum(axis=(1, 2))
  good = (matches & valid).sum(axis=(1, 2))
  per_query = np.full(hits.shape, np.nan, dtype=np.float64)
  np.divide(good, hits, out=per_query, where=hits > 0)
  counted = hits > 0
  mean = float(per_query[counted].mean()) if counted.any() else float("nan")
  return {"mean": mean, "per_query": per_query, "queries_without_hits": int((~counted).sum())}


def gold_token_ratio(hit_docs: np.ndarray, q_mask: np.ndarray,
                     relevant_docs: Sequence[set[int] | frozenset[int]]) -> dict[str, Any]:
  """Share of retrieved tokens that come from a relevant document of the query.

  Args:
    hit_docs: int32 [Nq, n, k'] document index per retrieved token, -1 = none.
    q_mask: bool [Nq, n].
    relevant_docs: per query, the set of document indices with relevance > 0.

  Returns:
    {"mean": float, "per_query": float64 [Nq], "queries_without_hits": int}.
  """
  hit_docs, valid = _check_hits(hit_docs, q_mask)
  if len(relevant_docs) != hit_docs.shape[0]:
    raise ValueError(f"relevant_docs has {len(relevant_docs)} entries for {hit_docs.shape[0]} queries")
  matches = np.zeros(hit_docs.shape, dtype=bool)
  for q, rel in enumerate(relevant_docs):
    if rel:
      matches[q] = np.isin(hit_docs[q], np.fromiter(rel, dtype=np.int64, count=len(rel)))
  return _per_query_mean(matches, valid)


def lexical_token_ratio(hit_docs: np.ndarray, hit_vocab: np.ndarray, q_ids: np.ndarray, q_mask: np.ndarray, *,
                        same_position: bool = False) -> dict[str, Any]:
  """Share of retrieved tokens whose vocabulary id equals a query token id.

  Args:
    hit_docs: int32 [Nq, n, k'] (-1 = no hit).
    hit_vocab: int32 [Nq, n, k'] vocabulary id of each retrieved token.
    q_ids: int32 [Nq, n] query token ids; q_mask: bool [Nq, n].
    same_position: compare with the retrieving query token's id only, instead of any valid query token's id.

  Returns:
    {"mean": float, "per_query": float64 [Nq], "queries_without_hits": int}.
  """
  hit_docs, valid = _check_hits(hit_docs, q_mask)
  hit_vocab = np.asarray(hit_vocab)
  q_ids = np.asarray(q_ids)
  if hit_vocab.shape != hit_docs.shape:
    raise ValueError(f"hit_vocab shape {hit_vocab.shape} != hit_docs shape {hit_docs.shape}")
  if q_ids.shape != hit_docs.shape[:2]:
    raise ValueError(f"q_ids shape {q_ids.shape} != [Nq, n] = {hit_docs.shape[:2]}")
  if same_position:
    matches = hit_vocab == q_ids[:, :, None]
  else:
    matches = np.zeros(hit_docs.shape, dtype=bool)
    for q in range(hit_docs.shape[0]):
      matches[q] = np.isin(hit_vocab[q], q_ids[q][np.asarray(q_mask[q], dtype=bool)])
  return _per_query_mean(matches, valid)


def token_recall(approx_tokens: np.ndarray, exact_tokens: np.ndarray, q_mask: np.ndarray) -> dict[str, Any]:
  """Share of the exact search's tokens that the approximate search also retrieved, per query token.

  Args:
    approx_tokens: int [Nq, n, k'] global token rows an approximate index returned, -1 = none.
    exact_tokens: int [Nq, n, k'] the exact top-k' token rows of the same query tokens, -1 = none.
    q_mask: bool [Nq, n].

  Returns:
    {"mean": float, "per_query": float64 [Nq] (nan: no exact hits), "queries_without_hits": int}: per query, the
    exact hits of its valid tokens found by the approximate search over all its valid exact hits.
  """
  approx_tokens = np.asarray(approx_tokens)
  exact_tokens, valid = _check_hits(exact_tokens, q_mask)
  if approx_tokens.shape != exact_tokens.shape:
    raise ValueError(f"approx_tokens shape {approx_tokens.shape} != exact_tokens shape {exact_tokens.shape}")
  rows = approx_tokens.reshape(-1, approx_tokens.shape[-1])
  found = np.zeros(exact_tokens.shape, dtype=bool).reshape(rows.shape)
  exact_rows = exact_tokens.reshape(rows.shape)
  for r in np.flatnonzero(np.asarray(q_mask, dtype=bool).reshape(-1)):
    found[r] = np.isin(exact_rows[r], rows[r][rows[r] >= 0])
  return _per_query_mean(found.reshape(exact_tokens.shape), valid)


def cost_analysis(hit_docs: np.ndarray, q_mask: np.ndarray, doc_lengths: np.ndarray, *, token_dim: int,
                  k_prime: int, embedding_bytes: int = 4) -> dict[str, float]:
  """The paper's scoring cost model with measured n, m and r.

  Args:
    hit_docs: int32 [Nq, n, k'] (-1 = no hit).
    q_mask: bool [Nq, n].
    doc_lengths: int [Ndocs] valid tokens per document of the corpus.
    token_dim: d, the token embedding size.
    k_prime: k', tokens retrieved per query token.
    embedding_bytes: bytes per stored embedding component (4 for float32, 2 for bfloat16).

  Returns:
    n_bar (mean valid query tokens), m_bar (mean corpus document length), m_bar_candidates (mean length of the
    candidate documents, each counted once per query it is a candidate of), r_bar (retrieved tokens per candidate
    document), candidates_per_query, colbert_ops / xtr_ops (paper formulas with n_bar, m_bar, r_bar), op_ratio
    (colbert / xtr), colbert_bytes_per_query (embeddings of every candidate's tokens, which ColBERT rescoring
    gathers) and xtr_bytes_per_query (the retrieved scores and document ids, 4 + 4 bytes per hit, which XTR scoring
    reads).
  """
  hit_docs, valid = _check_hits(hit_docs, q_mask)
  doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
  if doc_lengths.ndim != 1 or doc_lengths.size == 0:
    raise ValueError(f"doc_lengths must be a non-empty 1-D array, got shape {doc_lengths.shape}")
  if hit_docs.max(initial=-1) >= doc_lengths.size:
    raise ValueError(f"hit_docs names document {int(hit_docs.max())} but doc_lengths has {doc_lengths.size} entries")
  nq = hit_docs.shape[0]
  n_bar = float(np.asarray(q_mask, dtype=bool).sum(axis=1).mean())
  m_bar = float(doc_lengths.mean())
  candidates = 0
  candidate_tokens = 0
  hits = int(valid.sum())
  for q in range(nq):
    docs = np.unique(hit_docs[q][valid[q]])
    candidates += docs.size
    candidate_tokens += int(doc_lengths[docs].sum())
  r_bar = hits / candidates if candidates else 0.0
  m_bar_candidates = candidate_tokens / candidates if candidates else 0.0
  colbert_ops = n_bar * n_bar * k_prime * (2.0 * m_bar * token_dim + m_bar + 1.0)
  xtr_ops = n_bar * n_bar * k_prime * (r_bar + 1.0)
  return {
      "k_prime": int(k_prime),
      "token_dim": int(token_dim),
      "n_bar": n_bar,
      "m_bar": m_bar,
      "m_bar_candidates": m_bar_candidates,
      "r_bar": r_bar,
      "candidates_per_query": candidates / nq if nq else 0.0,
      "colbert_ops": colbert_ops,
      "xtr_ops": xtr_ops,
      "op_ratio": colbert_ops / xtr_ops if xtr_ops else float("inf"),
      "colbert_bytes_per_query": candidate_tokens * token_dim * embedding_bytes / nq if nq else 0.0,
      "xtr_bytes_per_query": hits * 8.0 / nq if nq else 0.0,
  }
