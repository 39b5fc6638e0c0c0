"""`XTRRetriever`: XTR inference end to end -- encode queries, retrieve tokens, score, map to document ids.

    retriever = XTRRetriever.load("/tmp/model", "/tmp/scifact_idx")   # model dir + `python -m xtr_jax.export` dir
    results = retriever.search(["what causes diabetes"], k=100, token_top_k=1000)
    # -> [[(doc_id, score), ...]]

Scoring modes (`search(..., scoring=)`):
  "xtr"     XTR: only the retrieved tokens, missing similarities imputed (`xtr_jax.scoring.xtr_score`).
  "colbert" the classic ColBERT pipeline for comparison: candidates = every document retrieved by some query
            token, then the exact mean-of-max over ALL their tokens (`scoring.colbert_rescore`).
  "exact"   exact (brute-force) token retrieval over every corpus token + XTR scoring: ground truth for the
            approximate index (as `xtr_jax.eval`'s "exact"); the brute-force index is built on first use.

Lower-level calls expose what token retrieval returned (`retrieve_tokens`: scores, global token positions,
documents and vocabulary ids per query token), for gold-token / lexical-match analyses.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from xtr_jax import export, scoring
from xtr_jax import index as index_lib

SCORINGS = ("xtr", "colbert", "exact")
# What an index must share with the query encoder (PretrainedXTR.identity keys).
IDENTITY_KEYS = ("model_sha256", "encoder_kind", "vocab", "token_dim")


@dataclasses.dataclass
class RetrievedTokens:
  """Token retrieval of a batch of queries: every array is [Nq, n, k'] (n = query max length).

  scores: float32 similarities (-inf where missing); token_pos: int64 global token positions in the store (-1 missing);
  doc_idx: int32 document index (-1 missing); vocab_ids: int32 vocabulary ids of the retrieved tokens (-1 missing).
  Rows of padding query tokens are entirely missing.
  """
  scores: np.ndarray
  token_pos: np.ndarray
  doc_idx: np.ndarray
  vocab_ids: np.ndarray


class XTRRetriever:
  """Query encoder + exported token store + token index, checked to belong together."""

  def __init__(self, encoder, store: export.TokenStore, index: index_lib.TokenIndex | None, *,
               query_batch: int = 32):
    token_dim = int(encoder.model.output_dim)
    if store.manifest["dim"] != token_dim:
      raise ValueError(f"store {store.directory!r} has dimension {store.manifest['dim']}, the model's token_dim is "
                       f"{token_dim}")
    _check_identity(encoder.identity(), store.identity, f"token store {store.directory!r}")
    if index is not None:
      if index.dim != token_dim:
        raise ValueError(f"token index dimension {index.dim} does not match the model's token_dim {token_dim}")
      if index.num_tokens != store.num_tokens:
        raise ValueError(f"token index holds {index.num_tokens} tokens but the store has {store.num_tokens}: "
                         "they come from different exports")
      _check_identity(encoder.identity(), index.identity, "token index")
    self.encoder = encoder
    self.store = store
    self.index = index
    self.query_batch = int(query_batch)
    self._token_doc = np.asarray(store.token_doc)
    self._token_vocab = np.asarray(store.token_ids)
    self._device_embeddings = None
    self._exact_index = None

  @classmethod
  def load(cls, model_path: Any, index_dir: str, *, verify: bool = True, search_threads: int | None = None,
           query_batch: int = 32) -> XTRRetriever:
    """model_path: a model dir for `xtr_jax.load_pretrained`, or an already loaded `PretrainedXTR`.
    index_dir: an export dir (shards + manifest) holding the token index in `token_index/`."""
    if isinstance(model_path, (str, os.PathLike)):
      from xtr_jax import models  # pylint: disable=g-import-not-at-top
      encoder = models.load_pretrained(str(model_path))
    else:
      encoder = model_path
    store = export.TokenStore.open(index_dir, verify=verify)
    index_path = os.path.join(index_dir, export.INDEX_SUBDIR)
    if not os.path.isdir(index_path):
      raise FileNotFoundError(f"{index_path} not found: build it with `python -m xtr_jax.export` (index_backend) "
                              "or xtr_jax.export.build_store_index")
    idx = index_lib.load_index(index_path, search_threads=search_threads)
    return cls(encoder, store, idx, query_batch=query_batch)

  # ------------------------------------------------------------------------------------------- lower-level calls

  def encode_queries(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, Lq, D], bool [N, Lq]) query token embeddings and mask."""
    if isinstance(queries, str):
      raise TypeError("queries must be a list of strings, got one str")
    return self.encoder.encode_queries(list(queries), batch_size=self.query_batch)

  def retrieve_tokens(self, q: np.ndarray, q_mask: np.ndarray, token_top_k: int, *,
                      exact: bool = False) -> RetrievedTokens:
    """Top-`token_top_k` corpus tokens of every valid query token, one batched index search for all of them.

    q float32 [N, n, D], q_mask bool [N, n]. token_top_k larger than the corpus is clamped by the index (padding).
    exact=True searches a brute-force index over every token instead of the loaded (approximate) one.
    """
    scores, ids, doc = self._search_tokens(q, q_mask, token_top_k, exact)
    vocab = index_lib.lookup_tokens(self._token_vocab, ids).astype(np.int32, copy=False)
    return RetrievedTokens(scores=scores, token_pos=ids.astype(np.int64), doc_idx=doc, vocab_ids=vocab)

  def _search_tokens(self, q, q_mask, token_top_k: int, exact: bool):
    """(scores f32, token ids int32, doc_idx int32), each [N, n, k']: what scoring needs and no more (the
    vocabulary ids and int64 positions of `RetrievedTokens` are two more passes over ~100 MB a batch at k' = 4000)."""
    if exact:
      if self._exact_index is None:
        self._exact_index = index_lib.build_index(np.asarray(self.store.embeddings), backend="bruteforce")
      token_index = self._exact_index
    elif self.index is None:
      raise ValueError("this retriever has no token index: only scoring='exact' works")
    else:
      token_index = self.index
    scores, ids = token_index.search_padded(np.asarray(q, np.float32), q_mask, int(token_top_k))
    return scores, ids, index_lib.lookup_tokens(self._token_doc, ids).astype(np.int32, copy=False)

  def _embeddings(self):
    if self._device_embeddings is None:
      self._device_embeddings = jnp.asarray(np.asarray(self.store.embeddings))
    return self._device_embeddings

  def score_arrays(self, q: np.ndarray, q_mask: np.ndarray, k: int, token_top_k: int, *, scoring_mode: str = "xtr",
                   imputation: str = "kth", constant: float = 0.0,
                   max_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ranked (doc_idx int32 [N, k] with -1 padding, scores float32 [N, k]) for encoded queries."""
    if scoring_mode not in SCORINGS:
      raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring_mode!r}")
    n_docs = len(self.store.doc_ids)
    ret_scores, _, ret_docs = self._search_tokens(q, q_mask, token_top_k, scoring_mode == "exact")
    if scoring_mode in ("xtr", "exact"):
      d, s = scoring.xtr_score(ret_scores, ret_docs, q_mask, k, imputation=imputation, constant=constant,
                               num_docs=n_docs)
      return np.asarray(d), np.asarray(s)
    # ColBERT: every retrieved document is a candidate (ordered by XTR score so that a cap keeps the best ones).
    cap = min(ret_docs.shape[1] * ret_docs.shape[2], n_docs)
    if max_candidates:
      cap = min(cap, int(max_candidates))
    cand, _ = scoring.xtr_score(ret_scores, ret_docs, q_mask, cap, num_docs=n_docs)
    d, s = scoring.colbert_rescore(q, q_mask, np.asarray(cand), self._embeddings(), self.store.doc_offsets, k)
    return _pad_k(np.asarray(d), np.asarray(s), k)

  # ------------------------------------------------------------------------------------------------------ search

  def search_indices(self, queries: Sequence[str], k: int = 100, token_top_k: int = 1000, *, scoring: str = "xtr",
                     imputation: str = "kth", constant: float = 0.0, batch_size: int = 64,
                     max_candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `search` but returns (doc_idx int32 [N, k], scores float32 [N, k]); -1 / -inf pad."""
    q, q_mask = self.encode_queries(queries)
    out_d, out_s = [], []
    for start in range(0, len(q), batch_size):
      qb, mb = q[start:start + batch_size], q_mask[start:start + batch_size]
      rows = len(qb)
      if rows < batch_size and len(q) > batch_size:  # one compiled scorer shape for every batch
        qb = np.concatenate([qb, np.zeros((batch_size - rows,) + qb.shape[1:], qb.dtype)])
        mb = np.concatenate([mb, np.zeros((batch_size - rows,) + mb.shape[1:], bool)])
      d, s = self.score_arrays(qb, mb, k, token_top_k, scoring_mode=scoring, imputation=imputation,
                               constant=constant, max_candidates=max_candidates)
      out_d.append(d[:rows])
      out_s.append(s[:rows])
    if not out_d:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return np.concatenate(out_d), np.concatenate(out_s)

  def search(self, queries: Sequence[str], k: int = 100, token_top_k: int = 1000, **kwargs: Any
             ) -> list[list[tuple[str, float]]]:
    """Top-k documents per query as [(doc_id, score), ...], best first; kwargs as `search_indices`."""
    d, s = self.search_indices(queries, k, token_top_k, **kwargs)
    ids = self.store.doc_ids
    return [[(ids[j], float(v)) for j, v in zip(row_d, row_s) if j >= 0] for row_d, row_s in zip(d, s)]


def _pad_k(d: np.ndarray, s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  if d.shape[1] >= k:
    return d[:, :k], s[:, :k]
  pad = k - d.shape[1]
  return (np.concatenate([d, np.full((len(d), pad), -1, d.dtype)], axis=1),
          np.concatenate([s, np.full((len(s), pad), -np.inf, s.dtype)], axis=1))


def _check_identity(model_identity: dict[str, Any], stored: dict[str, Any], what: str) -> None:
  for key in IDENTITY_KEYS:
    want = model_identity.get(key)
    if key not in stored:
      raise ValueError(f"{what} records no {key!r}, so it cannot be checked against the model ({key}={want!r})")
    if stored[key] != want:
      raise ValueError(f"{what} was built with {key}={stored[key]!r}, but the query model has {key}={want!r}: "
                       "re-export the corpus with this model")
  for key, default in export.IDENTITY_DEFAULTS.items():
    want, got = model_identity.get(key, default), stored.get(key, default)
    if want != got:
      raise ValueError(f"{what} was built with {key}={got!r}, but the query model has {key}={want!r}: "
                       "re-export the corpus with this model")
