"""The XTR training objective (in-batch top-k_train token retrieval) and the ColBERT baseline loss.

For query b, valid query token i and the in-batch documents c (positives and hard negatives of the whole global
batch), with token similarities s[b,i,c,j] = q[b,i] . p[c,j]:

  * XTR: token i retrieves the top-k_train similarities over ALL valid tokens of ALL documents (padding is never
    retrieved; with fewer than k_train valid tokens all of them are). Document c gets, from token i, the maximum of its
    retrieved similarities; Z[b,c] counts the query tokens that retrieved at least one token of c, and
    score[b,c] = (sum of contributions) / Z[b,c], exactly 0 when Z = 0. The retrieval (alignment) is a stop-gradient
    mask: gradients reach the retrieved maxima only.
  * ColBERT: score[b,c] = mean over valid i of the max over valid j of s[b,i,c,j].

The loss is the mean over queries of the softmax cross-entropy of score[b,:] / temperature at labels[b].

Three implementations of the XTR scores give the same numbers:
  * "simple": documents replicated, dense top-k over the [B, n, Bd*m] similarity matrix (the reference). At the
    paper's batch (B = 320, n = 32, 640 documents x 256 tokens, k_train 320) its loss + gradient compile to 26.6 GiB
    of temporaries on one (CPU) device, and an xtr_base training step at that batch asked an H200 for 116.5 GiB.
  * "chunked" (the default): exact, without the [B, n, Bd, m] tensor, for one device or replicated documents
    (memory ~ B x n x (Bd + doc_chunk x m) floats; 3.8 GiB of temporaries at the shape above). Pass 1 (no
    gradient) streams document chunks through a running top-k_train per query token to get its k_train-th
    (score, index) threshold; pass 2 recomputes each chunk's similarities, keeps the tokens ranking at or before the
    threshold and takes each document's selected maximum, under `jax.checkpoint`, so the backward pass recomputes a
    chunk instead of storing it. Same selection, same values, same gradients as "simple" (ties included). The
    ColBERT loss streams the same way (every valid token selected, no threshold pass).
  * "sharded": `jax.shard_map` over the data-parallel mesh axes. Queries (small: B x n x d) are all-gathered and
    documents stay sharded, so each device computes [B, n, Bd*m / D] similarities and its local top-k_train per query
    token; the D x k_train candidates of each query token are exchanged with one all-to-all (each device receives
    the candidates of its own queries) and merged into the exact global k_train-th candidate (score, global token
    index), which is all-gathered back as a per-query-token threshold. A token is retrieved iff it ranks before or
    at the threshold in the (score desc, global index asc) order, which is exactly `lax.top_k`'s tie-breaking, so
    all paths retrieve the same tokens even for equal scores. Each device streams its documents in chunks of
    doc_chunk / D (both passes as in "chunked"), so none materialises even its block of the score matrix: at the
    shape above, 565 MiB per device on 8 devices (simple 8,295 MiB, chunked 1,137 MiB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from xtr_jax import partitioning

IMPLEMENTATIONS = ("simple", "chunked", "sharded")

_NEG_INF = -jnp.inf


# --------------------------------------------------------------------------------------------------------- checks


def _check_k_train(k_train: Any) -> int:
  if isinstance(k_train, bool) or not isinstance(k_train, (int, np.integer)):
    raise ValueError(f"k_train must be a positive Python int, got {k_train!r} ({type(k_train).__name__})")
  if k_train <= 0:
    raise ValueError(f"k_train must be >= 1, got {k_train}")
  return int(k_train)


def _check_embeddings(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array) -> None:
  if q.ndim != 3:
    raise ValueError(f"query embeddings must be [B, n, d], got shape {q.shape}")
  if p.ndim != 3:
    raise ValueError(f"document embeddings must be [Bd, m, d], got shape {p.shape}")
  if q_mask.shape != q.shape[:2]:
    raise ValueError(f"query mask must be [B, n] = {q.shape[:2]}, got shape {q_mask.shape}")
  if d_mask.shape != p.shape[:2]:
    raise ValueError(f"document mask must be [Bd, m] = {p.shape[:2]}, got shape {d_mask.shape}")
  if q.shape[-1] != p.shape[-1]:
    raise ValueError(f"query and document embedding sizes differ: q {q.shape} vs p {p.shape}")


def _check_similarities(s: jax.Array, q_mask: jax.Array, d_mask: jax.Array) -> None:
  if s.ndim != 4:
    raise ValueError(f"similarities must be [B, n, Bd, m], got shape {s.shape}")
  if q_mask.shape != s.shape[:2] or d_mask.shape != s.shape[2:]:
    raise ValueError(f"masks must be [B, n] = {s.shape[:2]} and [Bd, m] = {s.shape[2:]}, "
                     f"got {q_mask.shape} and {d_mask.shape}")


def _check_labels_static(labels: Any, num_queries: int, num_docs: int) -> None:
  if labels.ndim != 1 or labels.shape[0] != num_queries:
    raise ValueError(f"labels must be [B] = [{num_queries}], got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integers (index of the positive among the {num_docs} documents), "
                     f"got dtype {labels.dtype}")
  if isinstance(labels, jax.core.Tracer):
    return  # checked at run time in checked mode; an out-of-range label makes the loss NaN otherwise
  values = np.asarray(labels)
  bad = np.flatnonzero((values < 0) | (values >= num_docs))
  if bad.size:
    raise ValueError(f"labels out of range [0, {num_docs}): labels[{int(bad[0])}] = {int(values[bad[0]])} "
                     f"({bad.size} bad of {values.size})")


def _raise_if(bad_embeddings: np.ndarray, bad_labels: np.ndarray, num_docs: int) -> None:
  # Runs on the host inside a debug callback; the exception surfaces from the jitted call as a JaxRuntimeError
  # carrying this message.
  if int(bad_embeddings):
    raise FloatingPointError(f"xtr_jax.losses: {int(bad_embeddings)} non-finite (NaN/Inf) values in the query or "
                             "document embeddings")
  if int(bad_labels):
    raise ValueError(f"xtr_jax.losses: {int(bad_labels)} labels out of range [0, {num_docs})")


def _nonfinite_count(*arrays: jax.Array) -> jax.Array:
  return sum(jnp.sum(~jnp.isfinite(a)).astype(jnp.int32) for a in arrays)


# --------------------------------------------------------------------------------------------------- mesh helpers


def _resolve_mesh(mesh: Mesh | AbstractMesh | None) -> Mesh | AbstractMesh:
  if mesh is not None:
    return mesh
  ambient = jax.sharding.get_abstract_mesh()
  if ambient.empty:
    raise ValueError("implementation='sharded' needs a mesh: pass mesh=... or run under `with jax.set_mesh(mesh):`")
  return ambient


def _batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
  axes = tuple(a for a in partitioning.BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of the data-parallel axes {partitioning.BATCH_AXES}")
  return axes


def _mesh_size(mesh: Mesh | AbstractMesh, axes: Sequence[str]) -> int:
  return math.prod(dict(mesh.shape)[a] for a in axes)


# ---------------------------------------------------------------------------------------------- shared primitives


def _acc_dtype(*arrays: jax.Array) -> Any:
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def token_similarities(q: jax.Array, p: jax.Array) -> jax.Array:
  """s[b,i,c,j] = q[b,i] . p[c,j].

  Args:
    q: float [B, n, d] query token embeddings.
    p: float [Bd, m, d] document token embeddings.

  Returns:
    float32 [B, n, Bd, m] (float64 for float64 inputs).
  """
  return jnp.einsum("bnd,cmd->bncm", q, p, preferred_element_type=_acc_dtype(q, p))


def _canonical(s: jax.Array) -> jax.Array:
  # -0.0 and +0.0 compare equal in IEEE order but may be ordered differently by a total-order sort; selection runs
  # on a copy where they are the same value so that top_k order and the `==` threshold test agree.
  return jnp.where(s == 0, jnp.zeros_like(s), s)


def _aggregate(s: jax.Array, selected: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Selected-only max per (query token, document), summed over query tokens and normalised by Z.

  Args:
    s: float32 [B, n, C, m] similarities (gradients flow through these).
    selected: bool [B, n, C, m] retrieved tokens (already False for padding and invalid query tokens).

  Returns:
    (scores float32 [B, C], z int32 [B, C]).
  """
  hit = jnp.any(selected, axis=-1)  # [B, n, C]
  best = jnp.max(jnp.where(selected, s, _NEG_INF), axis=-1)
  return _scores_from_maxima(best, hit)


def _select_dense(s: jax.Array, q_mask: jax.Array, d_mask: jax.Array, k_train: int) -> jax.Array:
  """bool [B, n, Bd, m]: the top-k_train valid tokens per query token, by a dense `lax.top_k` over Bd*m."""
  b, n, c, m = s.shape
  ranked = jnp.where(d_mask[None, None], _canonical(lax.stop_gradient(s)), _NEG_INF).reshape(b, n, c * m)
  _, idx = lax.top_k(ranked, min(k_train, c * m))
  rows = jnp.arange(b)[:, None, None]
  cols = jnp.arange(n)[None, :, None]
  selected = jnp.zeros((b, n, c * m), bool).at[rows, cols, idx].set(True).reshape(b, n, c, m)
  # top_k fills up with padding (-inf) entries when fewer than k_train tokens are valid: drop them.
  return selected & d_mask[None, None] & q_mask[:, :, None, None]


def xtr_scores_from_similarities(s: jax.Array, q_mask: jax.Array, d_mask: jax.Array, k_train: int,
                                 *, return_z: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """XTR scores from precomputed similarities (dense top-k; the reference path used by `implementation="simple"`).

  Args:
    s: float [B, n, Bd, m] token similarities.
    q_mask: bool [B, n] valid query tokens.
    d_mask: bool [Bd, m] valid document tokens.
    k_train: tokens retrieved per query token from the whole batch (>= 1).
    return_z: also return Z.

  Returns:
    float32 [B, Bd] scores (and int32 [B, Bd] Z when return_z).
  """
  k_train = _check_k_train(k_train)
  _check_similarities(s, q_mask, d_mask)
  s = s.astype(_acc_dtype(s))
  q_mask = q_mask.astype(bool)
  d_mask = d_mask.astype(bool)
  scores, z = _aggregate(s, _select_dense(s, q_mask, d_mask, k_train))
  return (scores, z) if return_z else scores


def colbert_scores_from_similarities(s: jax.Array, q_mask: jax.Array, d_mask: jax.Array) -> jax.Array:
  """ColBERT scores: mean over valid query tokens of the max over valid document tokens.

  Args:
    s: float [B, n, Bd, m] token similarities.
    q_mask: bool [B, n]; d_mask: bool [Bd, m].

  Returns:
    float32 [B, Bd]; 0 for a query without valid tokens or a document without valid tokens.
  """
  _check_similarities(s, q_mask, d_mask)
  q_mask = q_mask.astype(bool)
  d_mask = d_mask.astype(bool)
  selected = jnp.broadcast_to(d_mask[None, None] & q_mask[:, :, None, None], s.shape)
  scores, _ = _aggregate(s.astype(_acc_dtype(s)), selected)
  return scores


# ---------------------------------------------------------------------------------------------------- chunked path


def _doc_chunks(p: jax.Array, d_mask: jax.Array, doc_chunk: int) -> tuple[jax.Array, jax.Array, int]:
  """[Bd, m, d], [Bd, m] -> [K, doc_chunk, m, d], [K, doc_chunk, m] (padding documents fully masked), chunk size."""
  if isinstance(doc_chunk, bool) or not isinstance(doc_chunk, (int, np.integer)) or doc_chunk < 1:
    raise ValueError(f"doc_chunk must be a positive int, got {doc_chunk!r}")
  num_d, m, dim = p.shape
  size = min(int(doc_chunk), num_d)
  num_chunks = -(-num_d // size)
  pad = num_chunks * size - num_d
  p = jnp.pad(p, ((0, pad), (0, 0), (0, 0)))
  d_mask = jnp.pad(d_mask, ((0, pad), (0, 0)))
  return p.reshape(num_chunks, size, m, dim), d_mask.reshape(num_chunks, size, m), size


def _chunked_scores(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, k_train: int | None,
                    doc_chunk: int) -> tuple[jax.Array, jax.Array]:
  """(scores float32 [B, Bd], z int32 [B, Bd]) equal to the dense path's, streaming documents (module docstring).

  k_train=None retrieves every valid token: the ColBERT scores (Z = the valid query tokens, for non-empty documents).
  """
  num_d, m, _ = p.shape
  p_chunks, mask_chunks, _ = _doc_chunks(p, d_mask, doc_chunk)
  threshold = None
  if k_train is not None:
    top_v, top_i = _chunked_top_k(q, p_chunks, mask_chunks, min(k_train, num_d * m), 0)
    threshold = (top_v[..., -1], top_i[..., -1])
  maxima, hit = _chunked_selected_maxima(q, p_chunks, mask_chunks, threshold, 0)
  return _scores_from_maxima(maxima[:, :, :num_d], hit[:, :, :num_d] & q_mask[:, :, None])


def _chunked_top_k(q: jax.Array, p_chunks: jax.Array, mask_chunks: jax.Array, k: int,
                   index_offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """The top-k (score, token index) per query token over all chunks, in (score desc, index asc) order; no gradient.

  q [B, n, d]; p_chunks [K, C, m, d]; mask_chunks bool [K, C, m]; token (chunk c, doc j, position t) has index
  index_offset + (c * C + j) * m + t. Returns float [B, n, k] (-inf past the valid tokens) and int32 [B, n, k].
  """
  num_q, n, _ = q.shape
  _, size, m, _ = p_chunks.shape
  q_fixed = lax.stop_gradient(q)

  def chunk_top(p_c, mask_c, c):
    sims = token_similarities(q_fixed, lax.stop_gradient(p_c))
    ranked = jnp.where(mask_c[None, None], _canonical(sims), _NEG_INF).reshape(num_q, n, size * m)
    v, i = lax.top_k(ranked, min(k, size * m))
    return v, i + index_offset + c * size * m

  def step(carry, xs):
    v, i = chunk_top(*xs)
    # Earlier chunks (lower indices) sit first in the concatenation and top_k keeps the earlier of equal values.
    merged_v, pos = lax.top_k(jnp.concatenate([carry[0], v], axis=-1), k)
    merged_i = jnp.take_along_axis(jnp.concatenate([carry[1], i], axis=-1), pos, axis=-1)
    return (merged_v, merged_i), None

  # The first chunk seeds the carry (rather than constants), so inside shard_map it varies over the same mesh axes
  # as the scan's output; short of k entries, it is padded with (-inf, -1), which rank last.
  top_v, top_i = chunk_top(p_chunks[0], mask_chunks[0], 0)
  if top_v.shape[-1] < k:
    pad = k - top_v.shape[-1]
    top_v = jnp.concatenate([top_v, jnp.full((num_q, n, pad), _NEG_INF, top_v.dtype)], axis=-1)
    top_i = jnp.concatenate([top_i, jnp.full((num_q, n, pad), -1, top_i.dtype)], axis=-1)
  steps = jnp.arange(1, p_chunks.shape[0], dtype=jnp.int32)
  (top_v, top_i), _ = lax.scan(step, (top_v, top_i), (p_chunks[1:], mask_chunks[1:], steps))
  return top_v, top_i


def _chunked_selected_maxima(q: jax.Array, p_chunks: jax.Array, mask_chunks: jax.Array,
                             threshold: tuple[jax.Array, jax.Array] | None,
                             index_offset: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """Per (query token, document) maximum over the SELECTED tokens, with gradient, and whether any was selected.

  A token is selected when valid and ranked at or before `threshold` = (score [B, n], index [B, n]) in the
  (score desc, index asc) order; None selects every valid token. Indices as in `_chunked_top_k`. Each chunk runs
  under `jax.checkpoint`: the backward pass recomputes its similarities. Returns float [B, n, K * C] and
  bool [B, n, K * C].
  """
  num_q, n, _ = q.shape
  _, size, m, _ = p_chunks.shape
  local_idx = jnp.arange(size, dtype=jnp.int32)[:, None] * m + jnp.arange(m, dtype=jnp.int32)[None, :]
  if threshold is not None:
    thr_v, thr_i = threshold[0][..., None, None], threshold[1][..., None, None]  # [B, n, 1, 1]

  @jax.checkpoint
  def step(q_, xs):
    p_c, mask_c, c = xs
    s = jnp.where(mask_c[None, None], token_similarities(q_, p_c), _NEG_INF)
    ranked = _canonical(lax.stop_gradient(s))
    selected = jnp.broadcast_to(mask_c, s.shape)
    if threshold is not None:
      gidx = index_offset + c * size * m + local_idx
      selected = selected & ((ranked > thr_v) | ((ranked == thr_v) & (gidx <= thr_i)))
    top = jnp.max(jnp.where(selected, ranked, _NEG_INF), axis=-1, keepdims=True)
    # The value at the selected maxima, its gradient split among exactly tied ones: what jnp.max does on the
    # dense path's selected-only similarities.
    tie = selected & (ranked == top)
    count = jnp.sum(tie, axis=-1)
    value = jnp.sum(jnp.where(tie, s, 0.0), axis=-1) / jnp.maximum(count, 1).astype(s.dtype)
    return q_, (value, count > 0)

  steps = jnp.arange(p_chunks.shape[0], dtype=jnp.int32)
  _, (maxima, hit) = lax.scan(step, q, (p_chunks, mask_chunks, steps))
  return (jnp.moveaxis(maxima, 0, 2).reshape(num_q, n, -1), jnp.moveaxis(hit, 0, 2).reshape(num_q, n, -1))


def _scores_from_maxima(maxima: jax.Array, hit: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float [B, n, C] selected maxima, bool [B, n, C] hits -> (scores float [B, C], z int32 [B, C])."""
  contribution = jnp.where(hit, maxima, 0.0)
  z = jnp.sum(hit, axis=1, dtype=jnp.int32)
  total = jnp.sum(contribution, axis=1)
  scores = jnp.where(z > 0, total / jnp.maximum(z, 1).astype(total.dtype), 0.0)
  return scores, z


# ---------------------------------------------------------------------------------------------------- sharded path


def _sharded_scores(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, k_train: int,
                    mesh: Mesh | AbstractMesh, doc_chunk: int = 64) -> tuple[jax.Array, jax.Array]:
  axes = _batch_axes(mesh)
  num_shards = _mesh_size(mesh, axes)
  num_q, n, _ = q.shape
  num_d, m, _ = p.shape
  for what, size in (("queries B", num_q), ("documents Bd", num_d)):
    if size % num_shards:
      raise ValueError(f"{what} = {size} is not divisible by the data-parallel size {num_shards} "
                       f"(mesh axes {axes} of {dict(mesh.shape)})")
  local_docs = num_d // num_shards
  local_tokens = local_docs * m
  k_local = min(k_train, local_tokens)
  k_global = min(k_train, num_d * m)

  def body(q_l, q_mask_l, p_l, d_mask_l):
    # Every device scores ALL queries against ITS documents, streamed in chunks of doc_chunk documents.
    q_all = lax.all_gather(q_l, axes, axis=0, tiled=True)
    q_mask_all = lax.all_gather(q_mask_l, axes, axis=0, tiled=True)
    # A device holds all B queries here (B / D under "chunked"), so its chunks are D times narrower for the same
    # per-device memory.
    p_chunks, mask_chunks, _ = _doc_chunks(p_l, d_mask_l, max(1, doc_chunk // num_shards))
    offset = lax.axis_index(axes) * local_tokens
    values, idx = _chunked_top_k(q_all, p_chunks, mask_chunks, k_local, offset)
    # Candidates of query block r go to device r; received blocks are concatenated in shard (= global index) order,
    # so positions in the merged list are ordered like global token indices among equal scores.
    values = lax.all_to_all(values, axes, split_axis=0, concat_axis=2, tiled=True)  # [B/D, n, D*k_local]
    idx = lax.all_to_all(idx, axes, split_axis=0, concat_axis=2, tiled=True)
    merged, pos = lax.top_k(values, k_global)
    thr_value = merged[..., -1]
    thr_index = jnp.take_along_axis(idx, pos[..., -1:], axis=-1)[..., 0]
    thr_value = lax.all_gather(thr_value, axes, axis=0, tiled=True)  # [B, n]
    thr_index = lax.all_gather(thr_index, axes, axis=0, tiled=True)
    maxima, hit = _chunked_selected_maxima(q_all, p_chunks, mask_chunks, (thr_value, thr_index), offset)
    return _scores_from_maxima(maxima[:, :, :local_docs], hit[:, :, :local_docs] & q_mask_all[:, :, None])

  spec_batch3 = P(axes, None, None)
  spec_batch2 = P(axes, None)
  fn = jax.shard_map(body, mesh=mesh, in_specs=(spec_batch3, spec_batch2, spec_batch3, spec_batch2),
                     out_specs=(P(None, axes), P(None, axes)))
  return fn(q, q_mask, p, d_mask)


# ------------------------------------------------------------------------------------------------------ public API


def _xtr_scores_and_z(q, q_mask, p, d_mask, k_train, implementation, mesh, doc_chunk=64):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  k_train = _check_k_train(k_train)
  _check_embeddings(q, q_mask, p, d_mask)
  q_mask = q_mask.astype(bool)
  d_mask = d_mask.astype(bool)
  if implementation == "sharded":
    return _sharded_scores(q, q_mask, p, d_mask, k_train, _resolve_mesh(mesh), doc_chunk)
  p, d_mask = _replicate(p, d_mask, mesh)
  if implementation == "chunked":
    return _chunked_scores(q, q_mask, p, d_mask, k_train, doc_chunk)
  s = token_similarities(q, p)
  return _aggregate(s, _select_dense(s, q_mask, d_mask, k_train))


def _replicate(p: jax.Array, d_mask: jax.Array, mesh: Mesh | AbstractMesh | None):
  """The simple path keeps every document on every device."""
  if mesh is None:
    if jax.sharding.get_abstract_mesh().empty:
      return p, d_mask
    sharding = P()
  else:
    sharding = NamedSharding(mesh, P())
  return lax.with_sharding_constraint(p, sharding), lax.with_sharding_constraint(d_mask, sharding)


def xtr_scores(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, k_train: int, *,
               implementation: str = "chunked", mesh: Mesh | AbstractMesh | None = None,
               doc_chunk: int = 64) -> jax.Array:
  """In-batch XTR scores of every query against every document of the (global) batch.

  Args:
    q: float [B, n, d] query token embeddings (any float dtype; similarities are accumulated in float32).
    q_mask: bool [B, n] valid query tokens.
    p: float [Bd, m, d] document token embeddings of all in-batch documents.
    d_mask: bool [Bd, m] valid document tokens.
    k_train: tokens retrieved per query token from all Bd*m document tokens (Python int >= 1).
    implementation: "simple" (documents replicated, dense top-k), "chunked" (documents replicated, streamed in
      chunks of `doc_chunk` without the [B, n, Bd, m] tensor) or "sharded" (shard_map over the data axes; B and
      Bd must be divisible by the data-parallel size).
    mesh: the mesh; None = the ambient mesh (`jax.set_mesh`), which "sharded" requires and "simple" / "chunked"
      use to keep documents replicated when present.
    doc_chunk: documents per chunk of "chunked" (memory ~ B x n x doc_chunk x m floats per chunk).

  Returns:
    float32 [B, Bd].

  Raises:
    ValueError: k_train <= 0, bad shapes, unknown implementation, indivisible batch for "sharded".
  """
  scores, _ = _xtr_scores_and_z(q, q_mask, p, d_mask, k_train, implementation, mesh, doc_chunk)
  return scores


def colbert_scores(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, *,
                   doc_chunk: int = 64) -> jax.Array:
  """In-batch ColBERT (sum-of-max, averaged over valid query tokens) scores, streamed over document chunks as the
  "chunked" XTR path does (no [B, n, Bd, m] tensor; equal to `colbert_scores_from_similarities`).

  Args:
    q: float [B, n, d]; q_mask: bool [B, n]; p: float [Bd, m, d]; d_mask: bool [Bd, m].
    doc_chunk: documents per chunk.

  Returns:
    float32 [B, Bd].
  """
  _check_embeddings(q, q_mask, p, d_mask)
  scores, _ = _chunked_scores(q, q_mask.astype(bool), p, d_mask.astype(bool), None, doc_chunk)
  return scores


def softmax_cross_entropy(scores: jax.Array, labels: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Mean over queries of -log softmax(scores[b] / temperature)[labels[b]].

  Args:
    scores: float32 [B, Bd]; labels: int [B] in [0, Bd).

  Returns:
    float32 scalar; NaN if a label is out of range (only detectable at run time under jit).
  """
  logp = jax.nn.log_softmax(scores / temperature, axis=-1)
  picked = jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1, mode="fill",
                               fill_value=jnp.nan)[:, 0]
  return -jnp.mean(picked)


def _loss_and_metrics(scores: jax.Array, z: jax.Array, labels: jax.Array, temperature: float,
                      nonfinite: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  num_docs = scores.shape[1]
  labels = labels.astype(jnp.int32)
  loss = softmax_cross_entropy(scores, labels, temperature)
  in_range = (labels >= 0) & (labels < num_docs)
  safe = jnp.clip(labels, 0, num_docs - 1)[:, None]
  is_pos = jnp.arange(num_docs)[None, :] == safe
  z = z.astype(jnp.float32)
  pos_score = jnp.take_along_axis(scores, safe, axis=1)[:, 0]
  neg_count = jnp.maximum(num_docs - 1, 1)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean((jnp.argmax(scores, axis=1) == labels).astype(jnp.float32)),
      "mean_z": jnp.mean(z),
      "mean_z_positive": jnp.mean(jnp.take_along_axis(z, safe, axis=1)[:, 0]),
      "zero_z_fraction": jnp.mean((z == 0).astype(jnp.float32)),
      "mean_positive_score": jnp.mean(pos_score),
      "mean_negative_score": jnp.mean(jnp.sum(jnp.where(is_pos, 0.0, scores), axis=1) / neg_count),
      "nonfinite_embeddings": nonfinite,
      "labels_out_of_range": jnp.sum(~in_range).astype(jnp.int32),
  }
  return loss, metrics


def _prepare_loss(q, q_mask, p, d_mask, labels, temperature, checked, mesh):
  _check_embeddings(q, q_mask, p, d_mask)
  labels = jnp.asarray(labels) if not isinstance(labels, (jax.Array, np.ndarray)) else labels
  _check_labels_static(labels, q.shape[0], p.shape[0])
  if not (isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(f"temperature must be a positive number, got {temperature!r}")
  nonfinite = _nonfinite_count(q, p)
  if checked:
    num_docs = p.shape[0]
    bad_labels = jnp.sum((labels < 0) | (labels >= num_docs)).astype(jnp.int32)
    _raise_on_every_device(nonfinite, bad_labels, num_docs, mesh)
  return labels, nonfinite


def _raise_on_every_device(nonfinite: jax.Array, bad_labels: jax.Array, num_docs: int,
                           mesh: Mesh | AbstractMesh | None) -> None:
  """Checked mode: raise on the host when the (global) counts are non-zero.

  In a multi-device program a callback that fails on one device only leaves the others waiting forever in the next
  collective (XLA then aborts the process). So under a mesh the callback runs inside a shard_map on EVERY device,
  with the same replicated counts, and all devices stop together.
  """
  check = lambda a, b: _raise_if(a, b, num_docs)
  if mesh is None:
    ambient = jax.sharding.get_abstract_mesh()
    mesh = None if ambient.empty else ambient
  if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
    jax.debug.callback(check, nonfinite, bad_labels)
    return

  def body(a, b):
    jax.debug.callback(check, a, b)
    return a

  jax.shard_map(body, mesh=mesh, in_specs=(P(), P()), out_specs=P())(nonfinite, bad_labels)


@gin.configurable
def xtr_loss(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, labels: jax.Array, *,
             k_train: int = gin.REQUIRED, temperature: float = 1.0, implementation: str = "chunked",
             mesh: Mesh | AbstractMesh | None = None, checked: bool = False, doc_chunk: int = 64
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """XTR in-batch token-retrieval loss.

  Args:
    q: float [B, n, d] query token embeddings; q_mask: bool [B, n].
    p: float [Bd, m, d] in-batch document token embeddings; d_mask: bool [Bd, m].
    labels: int32 [B], index of query b's positive among the Bd documents.
    k_train: tokens retrieved per query token from the whole batch (gin-required).
    temperature: softmax temperature (the paper uses 1).
    implementation: "simple" | "chunked" | "sharded" (see `xtr_scores`); doc_chunk: chunk size of "chunked".
    mesh: None = the ambient mesh.
    checked: raise at run time (also under jit) on NaN/Inf embeddings or out-of-range labels.

  Returns:
    (loss float32 scalar, metrics dict of float32/int32 scalars: loss, accuracy (argmax == label), mean_z,
    mean_z_positive, zero_z_fraction, mean_positive_score, mean_negative_score, nonfinite_embeddings,
    labels_out_of_range).

  Raises:
    ValueError: k_train <= 0, bad shapes, labels out of range (when concrete), temperature <= 0.
  """
  if k_train is gin.REQUIRED:
    raise ValueError("xtr_loss needs k_train (e.g. gin binding `xtr_loss.k_train = 320`)")
  k_train = _check_k_train(k_train)
  labels, nonfinite = _prepare_loss(q, q_mask, p, d_mask, labels, temperature, checked, mesh)
  scores, z = _xtr_scores_and_z(q, q_mask, p, d_mask, k_train, implementation, mesh, doc_chunk)
  return _loss_and_metrics(scores, z, labels, temperature, nonfinite)


@gin.configurable
def colbert_loss(q: jax.Array, q_mask: jax.Array, p: jax.Array, d_mask: jax.Array, labels: jax.Array, *,
                 temperature: float = 1.0, mesh: Mesh | AbstractMesh | None = None, checked: bool = False,
                 doc_chunk: int = 64) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ColBERT in-batch softmax loss (the baseline); arguments and metrics as in `xtr_loss` (Z = valid query tokens).

  Args:
    q: float [B, n, d]; q_mask: bool [B, n]; p: float [Bd, m, d]; d_mask: bool [Bd, m]; labels: int32 [B].
    temperature: softmax temperature.
    mesh: only used by checked mode (the run-time check then runs on every device of the mesh); None = ambient.
    checked: raise at run time on NaN/Inf embeddings or out-of-range labels.

  Returns:
    (loss float32 scalar, metrics dict of scalars).
  """
  labels, nonfinite = _prepare_loss(q, q_mask, p, d_mask, labels, temperature, checked, mesh)
  scores = colbert_scores(q, q_mask, p, d_mask, doc_chunk=doc_chunk)
  valid_docs = jnp.any(d_mask.astype(bool), axis=1)
  z = jnp.sum(q_mask.astype(jnp.int32), axis=1)[:, None] * valid_docs[None, :].astype(jnp.int32)
  return _loss_and_metrics(scores, z, labels, temperature, nonfinite)
