"""XTR inference scoring: documents scored only with the tokens that token retrieval returned.

For one query with valid query tokens i = 1..n and, per token, k' retrieved `(score, doc)` pairs (doc = -1 marks a
missing entry):

* m_i  = the imputed similarity of token i: the smallest valid retrieved score of i (the k'-th when k' came back)
  for `imputation="kth"`, 0 for `"zero"`, `constant` for `"constant"`; a token that retrieved nothing has m_i = 0.
* candidates = every document retrieved by some valid query token.
* value(i, d) = max retrieved score among d's tokens for query token i, else m_i.
* score(d) = mean over valid query tokens of value(i, d).  `imputation="none"` (the paper's no-imputation ablation)
  instead averages value(i, d) over only the query tokens that retrieved d.

Rank by score descending, ties by document index ascending. Everything is a fixed-shape JAX program with no Python
loop over documents or queries, in one of two exact strategies:
* dense (when the document table is small enough: n x num_docs <= `DENSE_MAX_CELLS`): a scatter-max of every
  entry into a [num_docs, n] table per query, then masked means and `lax.top_k`. O(n*k' + n*num_docs) per query
  and much faster on CPU, where XLA's multi-operand sort is slow.
* sort (any corpus size): entries sorted by (doc, query token, -score) so that each (doc, token) group's first entry
  is its max, then per-document segment sums over the sorted order. O(n*k' log(n*k')) per query.

`colbert_rescore` is the classic ColBERT second stage for comparison: gather ALL tokens of each candidate document
and compute the exact mean over query tokens of the max similarity.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

IMPUTATIONS = ("kth", "zero", "none", "constant")
_NO_DOC = np.iinfo(np.int32).max  # sorts after every real document index


def _check_retrieved(ret_scores, ret_docs, q_mask) -> None:
  if ret_scores.ndim != 3 or ret_docs.shape != ret_scores.shape:
    raise ValueError(f"ret_scores and ret_docs must both be [Nq, n, k']; got ret_scores {tuple(ret_scores.shape)} "
                     f"and ret_docs {tuple(ret_docs.shape)}")
  if tuple(q_mask.shape) != tuple(ret_scores.shape[:2]):
    raise ValueError(f"q_mask must be [Nq, n] = {tuple(ret_scores.shape[:2])}, got {tuple(q_mask.shape)}")
  if not jnp.issubdtype(ret_docs.dtype, jnp.integer):
    raise ValueError(f"ret_docs must be an integer array (document indices, -1 = missing), got {ret_docs.dtype}")


def _score_one_query(scores, docs, q_mask, top_k: int, imputation: str, constant: float):
  """Sort strategy: scores f32 [n, k'], docs int32 [n, k'], q_mask bool [n] -> (int32 [top_k], f32 [top_k])."""
  n, kp = scores.shape
  valid = (docs >= 0) & q_mask[:, None]
  imputed = _imputed(scores, valid, q_mask, imputation, constant)  # "none" does not use it

  m = n * kp
  doc = jnp.where(valid, docs, _NO_DOC).reshape(m)
  tok = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, kp)).reshape(m)
  neg = jnp.where(valid, -scores, jnp.inf).reshape(m)
  doc, tok, neg = jax.lax.sort((doc, tok, neg), num_keys=3)
  real = doc != _NO_DOC
  first_of_group = jnp.concatenate([jnp.ones((1,), bool), (doc[1:] != doc[:-1]) | (tok[1:] != tok[:-1])]) & real
  first_of_doc = jnp.concatenate([jnp.ones((1,), bool), doc[1:] != doc[:-1]]) & real
  seg = jnp.cumsum(first_of_doc) - 1  # candidate slot of every entry; < 0 never happens for real entries
  seg = jnp.where(real, seg, m)  # padding entries go to a dropped segment
  group_max = -neg
  if imputation == "none":
    total = jax.ops.segment_sum(jnp.where(first_of_group, group_max, 0.0), seg, num_segments=m)
    count = jax.ops.segment_sum(first_of_group.astype(jnp.float32), seg, num_segments=m)
    cand_score = total / jnp.maximum(count, 1.0)
  else:
    n_valid = jnp.sum(q_mask).astype(jnp.float32)
    gain = jnp.where(first_of_group, group_max - imputed[tok.clip(0, n - 1)], 0.0)
    cand_score = (jnp.sum(imputed * q_mask) + jax.ops.segment_sum(gain, seg, num_segments=m)) / jnp.maximum(n_valid,
                                                                                                          1.0)
  cand_doc = jax.ops.segment_max(jnp.where(real, doc, -1), seg, num_segments=m)
  has = jnp.arange(m) < jnp.sum(first_of_doc)
  cand_doc = jnp.where(has, cand_doc, _NO_DOC)
  key = jnp.where(has, -cand_score, jnp.inf)
  key, cand_doc = jax.lax.sort((key, cand_doc), num_keys=2)
  if top_k > m:
    key = jnp.concatenate([key, jnp.full((top_k - m,), jnp.inf, key.dtype)])
    cand_doc = jnp.concatenate([cand_doc, jnp.full((top_k - m,), _NO_DOC, cand_doc.dtype)])
  key, cand_doc = key[:top_k], cand_doc[:top_k]
  found = cand_doc != _NO_DOC
  return jnp.where(found, cand_doc, -1).astype(jnp.int32), jnp.where(found, -key, -jnp.inf).astype(jnp.float32)


def _imputed(scores, valid, q_mask, imputation: str, constant):
  """float32 [n]: the similarity given to a query token for documents it did not retrieve."""
  n = scores.shape[0]
  if imputation == "kth":
    imputed = jnp.min(jnp.where(valid, scores, jnp.inf), axis=1)
  elif imputation == "constant":
    imputed = jnp.full((n,), constant, jnp.float32)
  else:
    imputed = jnp.zeros((n,), jnp.float32)
  return jnp.where(jnp.any(valid, axis=1), imputed, 0.0).astype(jnp.float32)


def _score_one_query_dense(scores, docs, q_mask, top_k: int, imputation: str, constant, num_docs: int):
  """Dense strategy: max per (doc, token) by scatter into a [num_docs, n] table."""
  n, kp = scores.shape
  valid = (docs >= 0) & q_mask[:, None]
  imputed = _imputed(scores, valid, q_mask, imputation, constant)
  cell = jnp.where(valid, docs * n + jnp.arange(n, dtype=jnp.int32)[:, None], num_docs * n)  # invalid: dropped
  table = jnp.full((num_docs * n,), -jnp.inf, jnp.float32).at[cell.reshape(-1)].max(
      scores.reshape(-1), mode="drop").reshape(num_docs, n)
  hit = table > -jnp.inf
  is_cand = jnp.any(hit, axis=1)
  if imputation == "none":
    cand_score = jnp.sum(jnp.where(hit, table, 0.0), axis=1) / jnp.maximum(jnp.sum(hit, axis=1), 1)
  else:
    value = jnp.where(hit, table, imputed[None, :])
    cand_score = jnp.sum(jnp.where(q_mask[None, :], value, 0.0), axis=1) / jnp.maximum(jnp.sum(q_mask), 1)
  cand_score = jnp.where(is_cand, cand_score, -jnp.inf)
  k = min(top_k, num_docs)
  # lax.top_k returns the lower index first among equal values: ties go to the lower document index.
  best, idx = jax.lax.top_k(cand_score, k)
  found = best > -jnp.inf
  out_d = jnp.where(found, idx, -1).astype(jnp.int32)
  out_s = jnp.where(found, best, -jnp.inf).astype(jnp.float32)
  if top_k > k:
    out_d = jnp.concatenate([out_d, jnp.full((top_k - k,), -1, jnp.int32)])
    out_s = jnp.concatenate([out_s, jnp.full((top_k - k,), -jnp.inf, jnp.float32)])
  return out_d, out_s


@functools.partial(jax.jit, static_argnames=("top_k", "imputation", "num_docs"))
def _xtr_score_jit(ret_scores, ret_docs, q_mask, constant, *, top_k: int, imputation: str, num_docs: int):
  if num_docs:
    # lax.map (one query at a time) keeps the table at one query's size and is faster than a batched scatter.
    return jax.lax.map(lambda a: _score_one_query_dense(*a, top_k, imputation, constant, num_docs),
                       (ret_scores, ret_docs, q_mask))
  return jax.vmap(lambda s, d, q: _score_one_query(s, d, q, top_k, imputation, constant))(
      ret_scores, ret_docs, q_mask)


# Largest n x num_docs document table (float32 cells, per query) the dense strategy allocates.
DENSE_MAX_CELLS = 1 << 23


def xtr_score(ret_scores, ret_docs, q_mask, top_k: int, *, imputation: str = "kth", constant: float = 0.0,
              num_docs: int | None = None, strategy: str = "auto") -> tuple[jax.Array, jax.Array]:
  """XTR scores of the retrieved documents, batched over queries (jit-compiled per static shape).

  Args:
    ret_scores: float32 [Nq, n, k'] retrieved token similarities per query token.
    ret_docs: int32 [Nq, n, k'] document index of each retrieved token; -1 = missing entry (ignored).
    q_mask: bool [Nq, n] valid query tokens (entries of invalid tokens are ignored).
    top_k: number of documents returned per query (static).
    imputation: "kth" (default, XTR), "zero", "none" (mean over matching query tokens only), or "constant".
    constant: the imputed similarity when imputation == "constant".
    num_docs: number of documents in the corpus (every ret_docs entry must be < num_docs). None: taken from a
      host (NumPy) ret_docs as the next power of two above its max (few distinct compiled shapes).
    strategy: "dense", "sort", or "auto" (dense when n * num_docs <= DENSE_MAX_CELLS). Both are exact.

  Returns:
    doc_idx int32 [Nq, top_k] (-1 where fewer than top_k documents were retrieved) and scores float32
    [Nq, top_k] (-inf at -1 slots), sorted by score descending then document index ascending.
  """
  if imputation not in IMPUTATIONS:
    raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {imputation!r}")
  if int(top_k) < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  host_docs = ret_docs if isinstance(ret_docs, np.ndarray) else None
  ret_scores = jnp.asarray(ret_scores, jnp.float32)
  ret_docs = jnp.asarray(ret_docs)
  q_mask = jnp.asarray(q_mask)
  _check_retrieved(ret_scores, ret_docs, q_mask)
  if strategy not in ("auto", "dense", "sort"):
    raise ValueError(f"strategy must be 'auto', 'dense' or 'sort', got {strategy!r}")
  n = ret_scores.shape[1]
  table = 0
  if strategy != "sort":
    if num_docs is None and host_docs is not None:
      top = int(host_docs.max(initial=-1)) + 1
      num_docs = 1 << max(top - 1, 0).bit_length() if top > 0 else 1
    elif num_docs is not None:
      num_docs = int(num_docs)
      if host_docs is not None and host_docs.size and int(host_docs.max()) >= num_docs:
        raise ValueError(f"ret_docs holds document index {int(host_docs.max())} >= num_docs={num_docs}")
    if num_docs is not None and (strategy == "dense" or n * num_docs <= DENSE_MAX_CELLS):
      table = num_docs
    elif strategy == "dense":
      raise ValueError("strategy='dense' needs num_docs (or ret_docs as a NumPy array)")
  return _xtr_score_jit(ret_scores, ret_docs.astype(jnp.int32), q_mask.astype(bool), jnp.float32(constant),
                        top_k=int(top_k), imputation=imputation, num_docs=table)


@functools.partial(jax.jit, static_argnames=("max_doc_len", "top_k", "chunk"))
def _colbert_jit(q, q_mask, cand, embeddings, doc_offsets, *, max_doc_len: int, top_k: int, chunk: int):
  pos = jnp.arange(max_doc_len)

  def chunk_scores(qv, qm, cd):  # [n, D], [n], [chunk] -> [chunk] mean-of-max scores
    safe = jnp.where(cd >= 0, cd, 0)
    start = doc_offsets[safe]
    length = doc_offsets[safe + 1] - start
    tok_ok = pos[None, :] < length[:, None]  # [chunk, L]
    idx = jnp.where(tok_ok, start[:, None] + pos[None, :], 0)
    sims = jnp.einsum("cld,nd->cln", embeddings[idx].astype(jnp.float32), qv,
                      precision=jax.lax.Precision.HIGHEST)  # full rescoring is exact on GPU/TPU too
    best = jnp.max(jnp.where(tok_ok[:, :, None], sims, -jnp.inf), axis=1)  # [chunk, n]
    return jnp.sum(jnp.where(qm[None, :], best, 0.0), axis=1) / jnp.maximum(jnp.sum(qm), 1)

  def one_query(args):
    qv, qm, cd = args  # [n, D], [n], [C]
    # Candidate chunks bound the gathered [chunk, max_doc_len, D] block.
    score = jax.lax.map(lambda c: chunk_scores(qv, qm, c), cd.reshape(-1, chunk)).reshape(-1)
    ok = cd >= 0
    key = jnp.where(ok, -score, jnp.inf)
    docs = jnp.where(ok, cd, _NO_DOC)
    key, docs = jax.lax.sort((key, docs), num_keys=2)
    key, docs = key[:top_k], docs[:top_k]
    found = docs != _NO_DOC
    return jnp.where(found, docs, -1).astype(jnp.int32), jnp.where(found, -key, -jnp.inf)

  return jax.lax.map(one_query, (q, q_mask.astype(bool), cand))


def colbert_rescore(q, q_mask, cand_docs, embeddings, doc_offsets, top_k: int, *,
                    chunk: int = 64) -> tuple[jax.Array, jax.Array]:
  """ColBERT second stage: exact mean-of-max over ALL tokens of each candidate document.

  Args:
    q: float32 [Nq, n, D] query token embeddings.
    q_mask: bool [Nq, n].
    cand_docs: int32 [Nq, C] candidate document indices per query (-1 = none; duplicates are not allowed).
    embeddings: float16/float32 [T, D] every document token of the corpus (documents contiguous).
    doc_offsets: int64 [Ndocs + 1] start of each document's tokens in `embeddings`; offsets[-1] == T.
    top_k: documents returned per query (at most C).
    chunk: candidates scored at once (memory: chunk x longest document x D floats per query).

  Returns:
    doc_idx int32 [Nq, min(top_k, C)] (-1 pad) and float32 scores (-inf at pads), score descending then index.
  """
  q = jnp.asarray(q, jnp.float32)
  q_mask = jnp.asarray(q_mask)
  cand_docs = np.asarray(cand_docs)
  offsets = np.asarray(doc_offsets, np.int64)
  if q.ndim != 3 or tuple(q_mask.shape) != tuple(q.shape[:2]):
    raise ValueError(f"q must be [Nq, n, D] and q_mask [Nq, n]; got {tuple(q.shape)} and {tuple(q_mask.shape)}")
  if cand_docs.ndim != 2 or cand_docs.shape[0] != q.shape[0]:
    raise ValueError(f"cand_docs must be [Nq={q.shape[0]}, C], got {cand_docs.shape}")
  if embeddings.ndim != 2 or embeddings.shape[1] != q.shape[2]:
    raise ValueError(f"embeddings must be [T, D={q.shape[2]}] (query dimension), got {tuple(embeddings.shape)}")
  if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != embeddings.shape[0] or np.any(np.diff(offsets) < 0):
    raise ValueError(f"doc_offsets must be non-decreasing from 0 to T={embeddings.shape[0]}, got "
                     f"{offsets[:3]}...{offsets[-3:]}")
  n_docs = len(offsets) - 1
  if cand_docs.size and (cand_docs.max() >= n_docs or cand_docs.min() < -1):
    raise ValueError(f"cand_docs entries must be in [-1, {n_docs}), got range [{cand_docs.min()}, {cand_docs.max()}]")
  max_doc_len = max(int(np.max(np.diff(offsets))) if n_docs else 1, 1)
  top_k = min(int(top_k), cand_docs.shape[1])
  chunk = max(1, min(int(chunk), cand_docs.shape[1]))
  pad = -cand_docs.shape[1] % chunk
  if pad:
    cand_docs = np.concatenate([cand_docs, np.full((cand_docs.shape[0], pad), -1, cand_docs.dtype)], axis=1)
  return _colbert_jit(q, q_mask, jnp.asarray(cand_docs, jnp.int32), jnp.asarray(embeddings),
                      jnp.asarray(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)),
                      max_doc_len=max_doc_len, top_k=top_k, chunk=chunk)
