"""Token index over every document token embedding: ScaNN or FAISS (approximate) or exact brute force, one interface.

    index = build_index(embeddings, backend="scann")     # embeddings float16/float32 [T, D]
    scores, token_ids = index.search(q, k)               # q float32 [N, D] -> [N, k] each, token_ids -1 = missing
    index.save(dir); index = load_index(dir)

ScaNN defaults reproduce the official XTR notebook (google-deepmind/xtr, xtr_evaluation_on_beir_miracl.ipynb):
`builder(db, k, "dot_product").tree(num_leaves=min(2000, T), num_leaves_to_search=100,
training_sample_size=min(250000, T)).score_ah(1, anisotropic_quantization_threshold=0.1).build()`, no reordering.
Every parameter is a keyword of the gin-configurable `build_index` (gin name `xtr_build_index`).
A saved ScaNN index keeps two 4-bit AH codes per byte and each leaf id in ceil(log2(num_leaves)) bits (ScaNN's own
serialize spends a byte per code and an int32 per leaf id: 133.7 -> 67.7 bytes/token measured on a 1.24M-token
SciFact index at 128-d with uint16 leaf ids, the previous layout); `load_index` reads every layout.

`paired_dims` (default 0: the notebook's code, 4 bits for every dimension) spends 2 bits per dimension on the
`paired_dims` lowest-variance principal directions of the embeddings instead: the index stores database and queries
in a rotated basis (`principal_rotation`: an orthogonal D x D matrix, so inner products are unchanged up to float
rounding) whose last `paired_dims` axes are those directions, quantized two per 4-bit code (ScaNN's VARIABLE_CHUNK
projection), while the leading axes are mixed by a seeded random rotation so that they share the variance evenly, as
one 4-bit code per axis wants. At 16 paired dims the codes are 60 instead of 64 bytes/token with the same token
recall (`python benchmarks/index_quantization_bench.py`).

`center` (default False: the notebook's index) indexes the embeddings minus their mean and adds q . mean back to each
returned score. Inner-product rankings per query vector are unchanged by the shift (q . mean is the same for every
token), so exact search is unaffected; what changes is ScaNN's anisotropic quantization, whose weighting follows
each datapoint's direction. Trained token embeddings are far from centred (norm of their mean 0.40 for the
batch-128 XTR-trained MiniLM's 1.23M SciFact tokens); there, measured over two builds each, centring raised token
recall against exact search from 0.888 to 0.892 (k'=100) and 0.898 to 0.900 (k'=1000) but not nDCG@10 (70.0 vs
69.7, 70.3 vs 70.1: within the spread of ScaNN rebuilds, whose k-means samples at random;
`python benchmarks/scann_vs_exact_probe.py --center --builds 2`).

The FAISS backend (IVF + 4-bit PQ fast-scan + optional 8-bit refinement) lives in `faiss_index.py`; it reads the
same keywords (num_leaves = inverted lists, num_leaves_to_search = lists probed, reorder_* = refinement).

A search asking for k > T neighbours is clamped to k = T and the remaining columns are padding (-1 / -inf): the
scorer treats them as missing, so asking for k' larger than the corpus is harmless.
"""

from __future__ import annotations

import abc
import functools
import inspect
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from xtr_jax import checksums

INDEX_MANIFEST = "token_index.json"
FORMAT_VERSION = 1
BACKENDS = ("scann", "faiss", "bruteforce")


def _check_embeddings(embeddings) -> np.ndarray:
  if not hasattr(embeddings, "ndim") or embeddings.ndim != 2:
    raise ValueError(f"embeddings must be a [T, D] array, got shape {getattr(embeddings, 'shape', type(embeddings))}")
  if embeddings.shape[0] == 0:
    raise ValueError("cannot build a token index over an empty corpus (0 token embeddings)")
  if embeddings.dtype not in (np.float16, np.float32):
    raise ValueError(f"embeddings must be float16 or float32, got {embeddings.dtype}")
  return embeddings


def lookup_tokens(table: np.ndarray, token_ids: np.ndarray, missing: int = -1) -> np.ndarray:
  """`table[token_ids]` (e.g. token -> document index, token -> vocabulary id) with `missing` where token_ids < 0.

  table [T] (any integer dtype), token_ids int [...] (-1 = missing) -> table.dtype [...]. One gather and one in-place
  fix-up: a -1 id reads the table's last entry first and is then overwritten.
  """
  out = np.asarray(table)[token_ids]
  np.putmask(out, token_ids < 0, missing)
  return out


class TokenIndex(abc.ABC):
  """Base class: `search(q float32 [N, D], k) -> (scores float32 [N, k], token_ids int32 [N, k])`, -1 = missing."""

  backend = ""
  partitioned = False  # True: a search probes some partitions (leaves / inverted lists), see `search_with`

  def __init__(self, num_tokens: int, dim: int, params: dict[str, Any], identity: dict[str, Any] | None):
    self.num_tokens = int(num_tokens)
    self.dim = int(dim)
    self.params = dict(params)
    self.identity = dict(identity or {})
    self.build_seconds = float(self.params.pop("build_seconds", 0.0))

  def _check_query(self, q, k: int) -> tuple[np.ndarray, int]:
    q = np.asarray(q, np.float32)
    if q.ndim != 2:
      raise ValueError(f"queries must be [N, D], got shape {q.shape}")
    if q.shape[1] != self.dim:
      raise ValueError(f"query dimension {q.shape[1]} does not match the index dimension {self.dim}")
    if int(k) < 1:
      raise ValueError(f"k must be >= 1, got {k}")
    finite = np.isfinite(q).all(axis=1)
    if not finite.all():  # every backend would return arbitrary tokens for it
      bad = np.flatnonzero(~finite)
      raise ValueError(f"{len(bad)} of {len(q)} query rows hold NaN or inf (first: row {bad[0]}, "
                       f"{q[bad[0]][~np.isfinite(q[bad[0]])][:3].tolist()}); expected finite embeddings")
    return q, int(k)

  def search(self, q, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k tokens by inner product; k > num_tokens is clamped (extra columns: score -inf, id -1)."""
    return self._clamped_search(q, k, None)

  def search_with(self, q, k: int, *, leaves_to_search: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `search`, probing `leaves_to_search` partitions (ScaNN leaves, FAISS inverted lists) instead of the
    index's `num_leaves_to_search`: a search-time setting, for recall / latency sweeps."""
    if not self.partitioned:
      raise ValueError(f"leaves_to_search={leaves_to_search} needs a partitioned index (scann or faiss), not a "
                       f"{self.backend} one")
    if int(leaves_to_search) < 1:
      raise ValueError(f"leaves_to_search must be >= 1, got {leaves_to_search}")
    return self._clamped_search(q, k, int(leaves_to_search))

  def search_padded(self, q, q_mask, k: int, *, leaves_to_search: int | None = None,
                    missing_score: float = -np.inf) -> tuple[np.ndarray, np.ndarray]:
    """Top-k tokens of every valid query token of a batch of queries, ONE index search for all of them.

    q float [N, n, D], q_mask bool [N, n] -> (scores float32 [N, n, k], token ids int32 [N, n, k]): the scorer's
    layout. Rows of padding query tokens and missing results hold `missing_score` and id -1. `leaves_to_search` as in
    `search_with` (None: the index's own setting). Built with flat row numbers and in-place fills, not masked
    `np.where` copies: at k' = 4000 a batch's arrays are ~100 MB; on SciFact (FAISS, 100 lists, one pinned core) the
    search + layout + token -> document lookup took 13.0 instead of 13.9 ms/query with the copies (4.92 vs 4.97 at
    k' = 1000 / 50 lists, level at k' = 100).
    """
    q_mask = np.asarray(q_mask, bool)
    if q_mask.ndim != 2 or np.ndim(q) != 3 or tuple(np.shape(q)[:2]) != q_mask.shape:
      raise ValueError(f"q must be [N, n, D] with q_mask [N, n]; got {np.shape(q)} and {q_mask.shape}")
    n_q, n = q_mask.shape
    rows = np.flatnonzero(q_mask.reshape(-1))
    flat = np.asarray(q).reshape(n_q * n, -1)[rows]
    if leaves_to_search is None:
      s, t = self.search(flat, k)
    else:
      s, t = self.search_with(flat, k, leaves_to_search=leaves_to_search)
    k = s.shape[1]
    if missing_score != -np.inf:
      np.putmask(s, t < 0, np.float32(missing_score))
    scores = np.full((n_q * n, k), missing_score, np.float32)
    ids = np.full((n_q * n, k), -1, np.int32)
    scores[rows] = s
    ids[rows] = t
    return scores.reshape(n_q, n, k), ids.reshape(n_q, n, k)

  def _clamped_search(self, q, k: int, leaves_to_search: int | None) -> tuple[np.ndarray, np.ndarray]:
    q, k = self._check_query(q, k)
    kk = min(k, self.num_tokens)
    scores, ids = self._search(q, kk, leaves_to_search)
    if kk < k:
      scores = np.concatenate([scores, np.full((len(q), k - kk), -np.inf, np.float32)], axis=1)
      ids = np.concatenate([ids, np.full((len(q), k - kk), -1, np.int32)], axis=1)
    return scores, ids

  @abc.abstractmethod
  def _search(self, q: np.ndarray, k: int, leaves_to_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Backend search with 1 <= k <= num_tokens: (scores float32 [N, k], token ids int32 [N, k]); a partitioned
    backend probes `leaves_to_search` partitions when given."""

  def _manifest(self) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "backend": self.backend, "num_tokens": self.num_tokens,
            "dim": self.dim, "params": self.params, "identity": self.identity,
            "build_seconds": self.build_seconds}

  def save(self, directory: str) -> None:
    """Writes the backend's files and `token_index.json` (backend, sizes, params, model identity, sha256s)."""
    os.makedirs(directory, exist_ok=True)
    files = self._save_files(directory)
    manifest = self._manifest()
    manifest["files"] = {name: checksums.file_sha256(os.path.join(directory, name)) for name in files}
    tmp = os.path.join(directory, INDEX_MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, INDEX_MANIFEST))

  @abc.abstractmethod
  def _save_files(self, directory: str) -> list[str]:
    """Writes the backend's files into `directory`; returns their paths relative to it."""

  def index_bytes(self, directory: str) -> int:
    """Bytes on disk of a saved index (manifest excluded)."""
    with open(os.path.join(directory, INDEX_MANIFEST), encoding="utf-8") as f:
      return sum(os.path.getsize(os.path.join(directory, n)) for n in json.load(f)["files"])



@functools.partial(jax.jit, static_argnames=("k",))
def _bruteforce_topk(q, chunks, valid_per_chunk, *, k: int):
  """q f32 [N, D]; chunks [C, S, D]; valid_per_chunk int32 [C] -> best k over all chunks (ties: lower token id)."""
  n = q.shape[0]
  chunk_size = chunks.shape[1]
  kc = min(k, chunk_size)

  def step(carry, xs):
    best_s, best_i = carry
    chunk, n_valid, c = xs
    # Exact search is the ground truth: true float32 products on every backend (not TF32 / one bfloat16 pass).
    s = jnp.matmul(q, chunk.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)  # [N, S]
    s = jnp.where(jnp.arange(chunk_size)[None, :] < n_valid, s, -jnp.inf)
    cs, ci = jax.lax.top_k(s, kc)
    cand_s = jnp.concatenate([best_s, cs], axis=1)
    cand_i = jnp.concatenate([best_i, ci.astype(jnp.int32) + c * chunk_size], axis=1)
    # top_k keeps the earlier position among equal scores; earlier chunks come first, so ties go to lower ids.
    ts, pos = jax.lax.top_k(cand_s, k)
    return (ts, jnp.take_along_axis(cand_i, pos, axis=1)), None

  init = (jnp.full((n, k), -jnp.inf, jnp.float32), jnp.full((n, k), -1, jnp.int32))
  (s, i), _ = jax.lax.scan(step, init, (chunks, valid_per_chunk, jnp.arange(chunks.shape[0], dtype=jnp.int32)))
  return s, jnp.where(jnp.isfinite(s), i, -1)


class BruteForceIndex(TokenIndex):
  """Exact inner-product top-k: chunked JAX matmul + `lax.top_k`, running top-k merged across chunks."""

  backend = "bruteforce"

  def __init__(self, embeddings, *, chunk_size: int = 65536, query_batch: int = 1024,
               identity: dict[str, Any] | None = None, build_seconds: float = 0.0):
    embeddings = _check_embeddings(embeddings)
    super().__init__(embeddings.shape[0], embeddings.shape[1],
                     {"chunk_size": int(chunk_size), "query_batch": int(query_batch), "build_seconds": build_seconds},
                     identity)
    self.embeddings = np.asarray(embeddings)
    t = self.num_tokens
    size = min(int(chunk_size), t)
    n_chunks = -(-t // size)
    padded = np.zeros((n_chunks * size, self.dim), self.embeddings.dtype)
    padded[:t] = self.embeddings
    self._chunks = jnp.asarray(padded.reshape(n_chunks, size, self.dim))
    self._valid = jnp.asarray(np.clip(t - np.arange(n_chunks) * size, 0, size).astype(np.int32))
    self._query_batch = int(query_batch)

  def _search(self, q, k, leaves_to_search=None):
    del leaves_to_search  # exhaustive
    out_s, out_i = [], []
    for start in range(0, len(q), self._query_batch):
      part = q[start:start + self._query_batch]
      rows = len(part)
      if rows < self._query_batch and len(q) > self._query_batch:  # keep one compiled shape for the tail
        part = np.concatenate([part, np.zeros((self._query_batch - rows, self.dim), np.float32)])
      s, i = _bruteforce_topk(jnp.asarray(part), self._chunks, self._valid, k=k)
      out_s.append(np.asarray(s)[:rows])
      out_i.append(np.asarray(i)[:rows])
    if not out_s:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(out_s), np.concatenate(out_i)

  def _save_files(self, directory):
    np.save(os.path.join(directory, "embeddings.npy"), self.embeddings)
    return ["embeddings.npy"]


class ScannIndex(TokenIndex):
  """ScaNN tree + asymmetric hashing (+ optional exact reordering); saved with ScaNN's own serialize."""

  backend = "scann"
  partitioned = True

  def __init__(self, searcher, *, num_tokens: int, dim: int, params: dict[str, Any],
               identity: dict[str, Any] | None = None, rotation: np.ndarray | None = None,
               center: np.ndarray | None = None):
    super().__init__(num_tokens, dim, params, identity)
    self.searcher = searcher
    self.searcher.set_num_threads(int(self.params.get("search_threads", 1)))
    self.rotation = rotation  # float32 [D, D] or None: the searcher holds rotation-applied embeddings
    self.center = center  # float32 [D] or None: the searcher holds embeddings minus this mean

  def _search(self, q, k, leaves_to_search: int | None = None):
    if len(q) == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    # q . x = q . (x - mean) + q . mean: the index ranks each query row by its first term (the second is the same
    # for every token of that row) and the true score is restored by adding the second.
    shift = None if self.center is None else q @ self.center
    if self.rotation is not None:
      q = np.ascontiguousarray(q @ self.rotation.T)
    leaves = leaves_to_search or self.params["num_leaves_to_search"]
    kwargs: dict[str, Any] = {"final_num_neighbors": k, "leaves_to_search": leaves}
    if self.params.get("reorder_k"):
      kwargs["pre_reorder_num_neighbors"] = max(int(self.params["reorder_k"]),
                                                math.ceil(float(self.params.get("reorder_factor", 1.0)) * k))
    if int(self.params.get("search_threads", 1)) > 1:
      ids, scores = self.searcher.search_batched_parallel(q, **kwargs)
    else:
      ids, scores = self.searcher.search_batched(q, **kwargs)
    ids = np.asarray(ids).astype(np.int32)
    scores = np.asarray(scores, np.float32)
    if ids.shape[1] < k:  # ScaNN returns fewer columns when the searched leaves hold fewer than k tokens
      pad = k - ids.shape[1]
      ids = np.concatenate([ids, np.full((len(q), pad), -1, np.int32)], axis=1)
      scores = np.concatenate([scores, np.full((len(q), pad), -np.inf, np.float32)], axis=1)
    # When the searched leaves hold fewer than k tokens ScaNN pads rows with NaN distances (and arbitrary ids).
    missing = (ids < 0) | ~np.isfinite(scores)
    if shift is not None:
      scores += shift[:, None]
    scores[missing] = -np.inf
    ids[missing] = -1
    return scores, ids

  def _save_files(self, directory):
    scann_dir = os.path.join(directory, "scann")
    os.makedirs(scann_dir, exist_ok=True)
    self.searcher.serialize(scann_dir, relative_path=True)
    _compact_scann_arrays(scann_dir)
    files = [os.path.join("scann", n) for n in sorted(os.listdir(scann_dir))]
    if self.rotation is not None:
      np.save(os.path.join(directory, _ROTATION), self.rotation, allow_pickle=False)
      files.append(_ROTATION)
    if self.center is not None:
      np.save(os.path.join(directory, _CENTER), self.center, allow_pickle=False)
      files.append(_CENTER)
    return files


_ROTATION = "rotation.npy"
_CENTER = "center.npy"


def principal_rotation(sample: np.ndarray, paired_dims: int, *, seed: int = 0) -> np.ndarray:
  """Orthogonal basis for an index that quantizes `paired_dims` dimensions at half rate.

  sample: float [S, D] embeddings (a training sample). Returns float32 [D, D] R with orthonormal rows; the index
  stores x @ R.T. Its last `paired_dims` rows are the sample's lowest-variance principal directions (in descending
  order of variance, so adjacent rows pair up); its first D - paired_dims rows span the other principal directions,
  mixed by a seeded random orthogonal matrix so that each of those axes carries about the same variance (a single
  4-bit code per axis wastes bits on an axis with little variance and starves one with much).
  """
  sample = np.asarray(sample, np.float64)
  d = sample.shape[1]
  if paired_dims < 0 or paired_dims % 2 or paired_dims >= d:
    raise ValueError(f"paired_dims must be even and in [0, {d}), got {paired_dims}")
  eigval, eigvec = np.linalg.eigh(np.cov(sample, rowvar=False))
  basis = eigvec[:, np.argsort(-eigval, kind="stable")].T  # rows: principal directions, variance descending
  head = d - paired_dims
  mix, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((head, head)))
  basis[:head] = mix @ basis[:head]
  return basis.astype(np.float32)


_CHUNK_PROJECTION = re.compile(r"projection_type:\s*CHUNK\s+num_blocks:\s*(\d+)\s+num_dims_per_block:\s*1\b")


def _paired_projection_config(config: str, dim: int, paired_dims: int) -> str:
  """ScaNN's generated text config with its 1-dim CHUNK projection replaced by 1-dim blocks + 2-dim blocks."""
  matches = _CHUNK_PROJECTION.findall(config)
  if len(matches) != 1 or int(matches[0]) != dim:
    raise RuntimeError(f"cannot find ScaNN's single CHUNK projection (num_blocks: {dim}, num_dims_per_block: 1) in "
                       f"its generated config, so paired_dims cannot be applied; got:\n{config}")
  return _CHUNK_PROJECTION.sub(
      "projection_type: VARIABLE_CHUNK\n"
      f"variable_blocks {{ num_blocks: {dim - paired_dims} num_dims_per_block: 1 }}\n"
      f"variable_blocks {{ num_blocks: {paired_dims // 2} num_dims_per_block: 2 }}", config)


# ScaNN serializes each 4-bit AH code in a whole byte and each token's leaf as int32; on disk we keep two codes per
# byte and the leaf in just enough bits for the largest leaf id, which halves the index. `_load_scann_searcher`
# restores ScaNN's own layout in a temporary directory just long enough for `load_searcher` to read it into memory.
_CODES, _LEAVES = "hashed_dataset.npy", "datapoint_to_token.npy"
_PACKED_CODES = "hashed_dataset.nibbles.npy"
_SOAR_CODES, _PACKED_SOAR_CODES = "hashed_dataset_soar.npy", "hashed_dataset_soar.nibbles.npy"  # soar_lambda > 0
_CODE_FILES = ((_CODES, _PACKED_CODES), (_SOAR_CODES, _PACKED_SOAR_CODES))
_PACKED_LEAVES = "datapoint_to_token.uint16.npy"  # leaf ids as uint16: indexes saved before the bit-packed layout
_BIT_LEAVES = "datapoint_to_token.bits.npy"


def pack_bits(values: np.ndarray) -> tuple[np.ndarray, int]:
  """Non-negative int [T] -> (uint8 [ceil(T * bits / 8)], bits): each value in `bits` = max(1, bit_length(max)) bits,
  little-endian, value after value."""
  values = np.asarray(values)
  if values.ndim != 1 or (values.size and int(values.min()) < 0):
    raise ValueError(f"pack_bits takes a 1-D array of non-negative integers, got shape {values.shape}")
  bits = max(1, int(values.max()).bit_length()) if values.size else 1
  planes = ((values.astype(np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
  return np.packbits(planes, axis=None, bitorder="little"), bits


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
  """Inverse of `pack_bits`: uint8 [ceil(count * bits / 8)] -> int32 [count]."""
  if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != -(-count * bits // 8):
    raise ValueError(f"expected uint8 [{-(-count * bits // 8)}] for {count} values of {bits} bits, got "
                     f"{packed.dtype} {list(packed.shape)}")
  planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
  return (planes.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1, dtype=np.int32)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
  """uint8 [T, B] with values < 16 -> uint8 [T, ceil(B / 2)] (column 2j in the low nibble, 2j+1 in the high)."""
  if codes.size and int(codes.max()) >= 16:
    raise ValueError(f"cannot pack codes >= 16 into nibbles (max {int(codes.max())})")
  if codes.shape[1] % 2:
    codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
  return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, num_codes: int) -> np.ndarray:
  """Inverse of `pack_nibbles`: uint8 [T, ceil(B / 2)] -> uint8 [T, B]."""
  out = np.empty((packed.shape[0], 2 * packed.shape[1]), np.uint8)
  out[:, 0::2] = packed & 0x0F
  out[:, 1::2] = packed >> 4
  return np.ascontiguousarray(out[:, :num_codes])


def _compact_scann_arrays(scann_dir: str) -> None:
  for plain, packed_name in _CODE_FILES:
    codes_path = os.path.join(scann_dir, plain)
    if not os.path.isfile(codes_path):
      continue
    codes = np.load(codes_path, allow_pickle=False)
    if codes.dtype == np.uint8 and codes.ndim == 2 and (codes.size == 0 or int(codes.max()) < 16):
      np.save(os.path.join(scann_dir, packed_name), pack_nibbles(codes), allow_pickle=False)
      with open(os.path.join(scann_dir, packed_name + ".json"), "w", encoding="utf-8") as f:
        json.dump({"num_codes": int(codes.shape[1])}, f)
      os.remove(codes_path)
  leaves_path = os.path.join(scann_dir, _LEAVES)
  if os.path.isfile(leaves_path):
    leaves = np.load(leaves_path, allow_pickle=False)
    # With SOAR, ScaNN lists two leaf ids per token, some of them -1 (no leaf).
    offset = 1 if leaves.size and leaves.min() == -1 else 0
    if leaves.ndim == 1 and leaves.dtype == np.int32 and (leaves.size == 0 or leaves.min() >= -offset):
      packed, bits = pack_bits(leaves + offset)
      np.save(os.path.join(scann_dir, _BIT_LEAVES), packed, allow_pickle=False)
      with open(os.path.join(scann_dir, _BIT_LEAVES + ".json"), "w", encoding="utf-8") as f:
        json.dump({"count": int(leaves.size), "bits": bits, "offset": offset}, f)
      os.remove(leaves_path)


def _load_scann_searcher(scann_dir: str):
  """`scann.load_searcher` on a directory written by `ScannIndex._save_files` (compact or ScaNN's own layout)."""
  import scann  # pylint: disable=g-import-not-at-top
  own = {packed for _, packed in _CODE_FILES} | {_PACKED_LEAVES, _BIT_LEAVES}
  compact = [n for n in sorted(own) if os.path.isfile(os.path.join(scann_dir, n))]
  if not compact:
    return scann.scann_ops_pybind.load_searcher(scann_dir)
  with tempfile.TemporaryDirectory(prefix="xtr_scann_") as tmp:
    for name in os.listdir(scann_dir):
      if name not in own and name.removesuffix(".json") not in own:
        os.symlink(os.path.abspath(os.path.join(scann_dir, name)), os.path.join(tmp, name))
    for plain, packed_name in _CODE_FILES:
      if packed_name not in compact:
        continue
      with open(os.path.join(scann_dir, packed_name + ".json"), encoding="utf-8") as f:
        num_codes = int(json.load(f)["num_codes"])
      packed = np.load(os.path.join(scann_dir, packed_name), allow_pickle=False)
      if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (num_codes + 1) // 2:
        raise ValueError(f"{scann_dir}/{packed_name}: expected uint8 [T, {(num_codes + 1) // 2}], got "
                         f"{packed.dtype} {list(packed.shape)}")
      np.save(os.path.join(tmp, plain), unpack_nibbles(packed, num_codes), allow_pickle=False)
      del packed
    if _PACKED_LEAVES in compact:
      leaves = np.load(os.path.join(scann_dir, _PACKED_LEAVES), allow_pickle=False)
      np.save(os.path.join(tmp, _LEAVES), leaves.astype(np.int32), allow_pickle=False)
    if _BIT_LEAVES in compact:
      with open(os.path.join(scann_dir, _BIT_LEAVES + ".json"), encoding="utf-8") as f:
        meta = json.load(f)
      try:
        leaves = unpack_bits(np.load(os.path.join(scann_dir, _BIT_LEAVES), allow_pickle=False), int(meta["count"]),
                             int(meta["bits"]))
      except ValueError as e:
        raise ValueError(f"{scann_dir}/{_BIT_LEAVES}: {e}") from e
      np.save(os.path.join(tmp, _LEAVES), leaves - int(meta.get("offset", 0)), allow_pickle=False)
    return scann.scann_ops_pybind.load_searcher(tmp)


def _build_scann(embeddings: np.ndarray, *, num_leaves: int, num_leaves_to_search: int, training_sample_size: int,
                 dimensions_per_block: int, anisotropic_quantization_threshold: float, hash_type: str, reorder_k: int,
                 reorder_dtype: str, spherical: bool, paired_dims: int, center: bool, soar_lambda: float,
                 overretrieve_factor: float, num_neighbors: int, training_threads: int):
  """-> (ScaNN searcher, float32 [D, D] rotation or None, float32 [D] mean or None); sizes already clamped to T."""
  import scann  # pylint: disable=g-import-not-at-top
  t = embeddings.shape[0]
  db = np.ascontiguousarray(embeddings, dtype=np.float32)
  mean = None
  if center:
    mean = db.mean(axis=0, dtype=np.float64).astype(np.float32)
    db = db - mean  # not in place: db may be the caller's array
  rotation = None
  if paired_dims:
    if hash_type != "lut16" or dimensions_per_block != 1:
      raise ValueError(f"paired_dims needs hash_type='lut16' and dimensions_per_block=1 (it pairs dimensions of the "
                       f"1-dim 4-bit code), got hash_type={hash_type!r}, dimensions_per_block={dimensions_per_block}")
    rows = np.random.default_rng(0).choice(t, size=training_sample_size, replace=False)
    rotation = principal_rotation(db[np.sort(rows)], paired_dims)
    db = np.ascontiguousarray(db @ rotation.T)
  soar = {"soar_lambda": soar_lambda, "overretrieve_factor": overretrieve_factor} if soar_lambda else {}
  builder = scann.scann_ops_pybind.builder(db, num_neighbors, "dot_product").tree(
      num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search, training_sample_size=training_sample_size,
      spherical=spherical, **soar).score_ah(
          dimensions_per_block, anisotropic_quantization_threshold=anisotropic_quantization_threshold,
          hash_type=hash_type)
  if reorder_k:
    from scann.scann_ops.py import scann_builder  # pylint: disable=g-import-not-at-top
    builder = builder.reorder(reorder_k, quantize=getattr(scann_builder.ReorderType, reorder_dtype.upper()))
  if training_threads:
    builder = builder.set_n_training_threads(training_threads)
  if not paired_dims:
    return builder.build(), None, mean
  config = _paired_projection_config(builder.create_config(), db.shape[1], paired_dims)
  return scann.scann_ops_pybind.create_searcher(db, config), rotation, mean


def _scann_params(num_tokens: int, *, num_neighbors, num_leaves, num_leaves_to_search, training_sample_size,
                  dimensions_per_block, anisotropic_quantization_threshold, hash_type, reorder_k, reorder_dtype,
                  reorder_factor, spherical, training_threads, paired_dims, center, soar_lambda, overretrieve_factor,
                  search_threads) -> dict[str, Any]:
  """The parameters a ScaNN index over `num_tokens` tokens records: typed, sizes clamped to the corpus."""
  leaves = min(int(num_leaves), num_tokens)
  if reorder_dtype not in _REORDER_DTYPES or float(reorder_factor) < 1:
    raise ValueError(f"reorder_dtype must be one of {_REORDER_DTYPES} and reorder_factor >= 1, got "
                     f"reorder_dtype={reorder_dtype!r}, reorder_factor={reorder_factor}")
  if float(soar_lambda) < 0 or (soar_lambda and float(overretrieve_factor) < 1):
    raise ValueError(f"soar_lambda must be >= 0 (0 = no spilling) and overretrieve_factor >= 1, got "
                     f"soar_lambda={soar_lambda}, overretrieve_factor={overretrieve_factor}")
  return {"num_neighbors": int(num_neighbors), "num_leaves": leaves,
          "num_leaves_to_search": min(int(num_leaves_to_search), leaves),
          "training_sample_size": min(int(training_sample_size), num_tokens),
          "dimensions_per_block": int(dimensions_per_block),
          "anisotropic_quantization_threshold": float(anisotropic_quantization_threshold),
          "hash_type": str(hash_type), "reorder_k": int(reorder_k),
          "reorder_dtype": str(reorder_dtype) if reorder_k else "none",
          "reorder_factor": float(reorder_factor) if reorder_k else 1.0,
          "spherical": bool(spherical),
          "training_threads": int(training_threads), "paired_dims": int(paired_dims), "center": bool(center),
          "soar_lambda": float(soar_lambda),
          "overretrieve_factor": float(overretrieve_factor) if soar_lambda else 0.0,
          "search_threads": int(search_threads)}


# What decides the contents of a ScaNN index (the rest are search-time or build-speed settings); an index is reused
# only when these equal the configured ones. num_leaves_to_search is the searcher's default, kept in its config.
_REORDER_DTYPES = ("float32", "int8", "bfloat16")
_SCANN_BUILD_KEYS = ("num_leaves", "num_leaves_to_search", "training_sample_size", "dimensions_per_block",
                     "anisotropic_quantization_threshold", "hash_type", "reorder_k", "reorder_dtype", "spherical",
                     "paired_dims", "center", "soar_lambda", "overretrieve_factor", "reorder_factor")
# ScaNN-only settings, refused for the faiss backend when they differ from these (the notebook's / off) values.
_SCANN_ONLY = {"anisotropic_quantization_threshold": 0.1, "spherical": False, "paired_dims": 0, "center": False,
               "soar_lambda": 0.0}
# faiss-only settings (the adaptive probe), refused for ScaNN when they differ from these (off) values.
_FAISS_ONLY = {"probe_gap": 0.0, "min_leaves_to_search": 1}


@gin.configurable("xtr_build_index", denylist=["embeddings", "identity"])
def build_index(embeddings, *, backend: str = "scann", identity: dict[str, Any] | None = None,
                num_neighbors: int = 1000, num_leaves: int = 2000, num_leaves_to_search: int = 100,
                training_sample_size: int = 250000, dimensions_per_block: int = 1,
                anisotropic_quantization_threshold: float = 0.1, hash_type: str = "lut16", reorder_k: int = 0,
                reorder_dtype: str = "float32", reorder_factor: float = 1.0,
                spherical: bool = False, training_threads: int = 0, paired_dims: int = 0, center: bool = False,
                soar_lambda: float = 0.0, overretrieve_factor: float = 2.0, probe_gap: float = 0.0,
                min_leaves_to_search: int = 1, search_threads: int = 1,
                chunk_size: int = 65536, query_batch: int = 1024) -> TokenIndex:
  """Builds a token index over `embeddings` float16/float32 [T, D] (row t = global token id t).

  ScaNN keywords (num_leaves .. spherical) follow `scann_builder`; num_leaves, num_leaves_to_search and
  training_sample_size are clamped to T as the XTR notebook does. `reorder_k` > 0 rescores max(reorder_k,
  ceil(reorder_factor x k)) AH candidates exactly against stored `reorder_dtype` copies of the embeddings ('float32':
  4 bytes per dimension, 'int8': ScaNN's scalar quantization, 1 byte per dimension, or 'bfloat16'; backend "faiss"
  also 'float16') and returns the best k of them. `paired_dims` (even, lut16 with 1 dim per block only) quantizes that
  many lowest-variance principal directions two per 4-bit code in a rotated basis (module docstring; 0 = the
  notebook's code). `center` indexes the embeddings minus their mean and adds query . mean back to every returned
  score (module docstring). `soar_lambda` > 0 spills each token into a second leaf chosen by SOAR (ScaNN's
  TWO_CENTER_ORTHOGONALITY_AMPLIFIED spilling, Sun et al. 2023) with that lambda; a search takes `overretrieve_factor`
  x k candidates and keeps the distinct tokens among them, so 2 (the default) always leaves k (a token sits in at most
  two leaves) while less pads rows with missing entries (1.0 lost 22% of them in a test). It buys token recall per
  leaf searched with a second set of AH codes (about twice the bytes/token). `search_threads` > 1 uses ScaNN's
  parallel batched search (FAISS: OpenMP threads). Brute force keywords: chunk_size (tokens per matmul) and
  query_batch (query vectors per call). Backend "faiss" (`faiss_index`): IVF with num_leaves lists over a k-means of
  training_sample_size tokens, num_leaves_to_search probed, PQ with dimensions_per_block dims per code (hash_type
  lut16: 4-bit fast-scan, lut256: 8-bit), reorder_* as above through FAISS's IndexRefine; the ScaNN-only settings
  (anisotropic threshold, spherical, paired_dims, center, SOAR) must keep their defaults (0.1 is not applied: FAISS's
  PQ is isotropic). FAISS only: `probe_gap` > 0 probes, per query token, those of its num_leaves_to_search nearest
  lists whose centroid score is within probe_gap of its best list's, at least `min_leaves_to_search` (refinement, if
  any, in int8 or float32; `faiss_index` docstring); refused for ScaNN. `identity` (model / vocab / dim facts) is
  stored in the manifest for compatibility checks at load time.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  embeddings = _check_embeddings(embeddings)
  start = time.perf_counter()
  if backend == "bruteforce":
    idx = BruteForceIndex(embeddings, chunk_size=chunk_size, query_batch=query_batch, identity=identity)
  elif backend == "faiss":
    from xtr_jax import faiss_index  # pylint: disable=g-import-not-at-top  (it subclasses TokenIndex from here)
    given = {"anisotropic_quantization_threshold": anisotropic_quantization_threshold, "spherical": spherical,
             "paired_dims": paired_dims, "center": center, "soar_lambda": soar_lambda}
    scann_only = {k: v for k, v in given.items() if v != _SCANN_ONLY[k]}
    if scann_only:
      raise ValueError(f"{scann_only} are ScaNN settings the faiss backend does not have; leave them at "
                       f"{ {k: _SCANN_ONLY[k] for k in scann_only} } or use backend='scann'")
    params = faiss_index.params(
        embeddings.shape[0], embeddings.shape[1], num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
        training_sample_size=training_sample_size, dimensions_per_block=dimensions_per_block, hash_type=hash_type,
        reorder_k=reorder_k, reorder_dtype=reorder_dtype, reorder_factor=reorder_factor, probe_gap=probe_gap,
        min_leaves_to_search=min_leaves_to_search, training_threads=training_threads, search_threads=search_threads)
    idx = faiss_index.build(embeddings, params, identity=identity)
  else:
    given = {"probe_gap": probe_gap, "min_leaves_to_search": min_leaves_to_search}
    faiss_only = {k: v for k, v in given.items() if v != _FAISS_ONLY[k]}
    if faiss_only:
      raise ValueError(f"{faiss_only} are faiss-backend settings ScaNN does not have; leave them at "
                       f"{ {k: _FAISS_ONLY[k] for k in faiss_only} } or use backend='faiss'")
    t = embeddings.shape[0]
    params = _scann_params(
        t, num_neighbors=num_neighbors, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
        training_sample_size=training_sample_size, dimensions_per_block=dimensions_per_block,
        anisotropic_quantization_threshold=anisotropic_quantization_threshold, hash_type=hash_type,
        reorder_k=reorder_k, reorder_dtype=reorder_dtype, reorder_factor=reorder_factor, spherical=spherical,
        training_threads=training_threads, paired_dims=paired_dims, center=center, soar_lambda=soar_lambda,
        overretrieve_factor=overretrieve_factor, search_threads=search_threads)
    searcher, rotation, mean = _build_scann(embeddings, **{k: v for k, v in params.items()
                                                           if k not in ("search_threads", "reorder_factor")})
    idx = ScannIndex(searcher, num_tokens=t, dim=embeddings.shape[1], params=params, identity=identity,
                     rotation=rotation, center=mean)
  idx.build_seconds = time.perf_counter() - start
  return idx


def build_settings_mismatch(backend: str, params: Mapping[str, Any], num_tokens: int,
                            dim: int | None = None) -> dict[str, tuple[Any, Any]]:
  """{setting: (the index's value, the configured value)} for every setting that decides what an index holds or
  how it searches (`_SCANN_BUILD_KEYS`, `faiss_index.BUILD_KEYS`) where an index (its backend, recorded `params`,
  `num_tokens` and `dim`, needed for faiss: `TokenIndex` attributes or `read_manifest` fields) differs from what
  `build_index` would build now for as many tokens under the current gin bindings of `xtr_build_index`. Empty for
  brute force and for a match. An index saved before a setting existed counts as built with the setting's default."""
  if backend not in ("scann", "faiss"):
    return {}
  defaults = {name: p.default for name, p in inspect.signature(build_index).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  configured = dict(defaults, **gin.get_bindings("xtr_build_index"))
  if backend == "faiss":
    from xtr_jax import faiss_index  # pylint: disable=g-import-not-at-top
    if dim is None:
      raise ValueError("build_settings_mismatch needs the index's dim for a faiss index")
    record, keys, skip = functools.partial(faiss_index.params, int(num_tokens), int(dim)), faiss_index.BUILD_KEYS, 2
  else:
    record, keys, skip = functools.partial(_scann_params, int(num_tokens)), _SCANN_BUILD_KEYS, 1
  names = list(inspect.signature(record.func).parameters)[skip:]

  def as_recorded(settings):
    return record(**{k: settings[k] for k in names})
  # (an index saved before reorder_dtype existed reordered in float32 when it reordered at all)
  want, default = as_recorded(configured), as_recorded(dict(defaults, reorder_k=params.get("reorder_k", 0)))
  stored = {k: params.get(k, default[k]) for k in keys}
  if not stored["reorder_k"]:  # recorded as given before the factor was tied to reordering; without it, unused
    stored["reorder_factor"] = 1.0
  return {k: (stored[k], want[k]) for k in keys if stored[k] != want[k]}


def read_manifest(directory: str) -> dict[str, Any]:
  """The checked `token_index.json` of a saved index (backend, num_tokens, dim, params, files, identity), without
  reading the index itself."""
  path = os.path.join(directory, INDEX_MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {directory!r} is not a saved token index")
  with open(path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
  for field in ("format_version", "backend", "num_tokens", "dim", "params", "files"):
    if field not in manifest:
      raise ValueError(f"{path}: missing field {field!r}")
  if manifest["format_version"] != FORMAT_VERSION:
    raise ValueError(f"{path}: format_version expected {FORMAT_VERSION}, got {manifest['format_version']}")
  return manifest


def load_index(directory: str, *, expect_identity: dict[str, Any] | None = None,
               search_threads: int | None = None) -> TokenIndex:
  """Reads an index written by `TokenIndex.save`; verifies every file's sha256 and (optionally) the identity.

  expect_identity: if given, every key in it must equal the stored identity's value (model, vocab, dimension...).
  """
  manifest = read_manifest(directory)
  path = os.path.join(directory, INDEX_MANIFEST)
  for name, digest in manifest["files"].items():
    fpath = os.path.join(directory, name)
    if not os.path.isfile(fpath):
      raise ValueError(f"{fpath}: listed in {path} but missing")
    got = checksums.file_sha256(fpath)
    if got != digest:
      raise ValueError(f"{fpath}: sha256 mismatch (manifest {digest[:16]}..., file {got[:16]}...): corrupted index")
  identity = manifest.get("identity") or {}
  if expect_identity:
    for key, want in expect_identity.items():
      if key not in identity:
        raise ValueError(f"index {directory!r} records no {key!r} (it has {sorted(identity)}), so it cannot be "
                         f"checked against the model's {key}={want!r}; rebuild it with identity=...")
      if identity[key] != want:
        raise ValueError(f"index {directory!r} was built with {key}={identity[key]!r}, but the model has "
                         f"{key}={want!r}")
  params = dict(manifest["params"])
  params["build_seconds"] = manifest.get("build_seconds", 0.0)
  if manifest["backend"] == "bruteforce":
    emb = np.load(os.path.join(directory, "embeddings.npy"), allow_pickle=False)
    if emb.shape != (manifest["num_tokens"], manifest["dim"]):
      raise ValueError(f"{directory}/embeddings.npy: shape {emb.shape}, manifest says "
                       f"({manifest['num_tokens']}, {manifest['dim']})")
    return BruteForceIndex(emb, chunk_size=params["chunk_size"], query_batch=params["query_batch"],
                           identity=identity, build_seconds=params["build_seconds"])
  if manifest["backend"] == "scann":
    scann_dir = os.path.join(directory, "scann")
    if os.path.exists(os.path.join(scann_dir, "scann_docids.pkl")):
      raise ValueError(f"{scann_dir}/scann_docids.pkl: refusing to load a pickle (this project never writes docids)")
    if search_threads is not None:
      params["search_threads"] = int(search_threads)
    d = manifest["dim"]
    rotation = _load_array(directory, _ROTATION, (d, d)) if params.get("paired_dims") else None
    center = _load_array(directory, _CENTER, (d,)) if params.get("center") else None
    searcher = _load_scann_searcher(scann_dir)
    return ScannIndex(searcher, num_tokens=manifest["num_tokens"], dim=d, params=params, identity=identity,
                      rotation=rotation, center=center)
  if manifest["backend"] == "faiss":
    from xtr_jax import faiss_index  # pylint: disable=g-import-not-at-top
    if search_threads is not None:
      params["search_threads"] = int(search_threads)
    return faiss_index.load(directory, manifest, params, identity)
  raise ValueError(f"{path}: backend expected one of {BACKENDS}, got {manifest['backend']!r}")


def _load_array(directory: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
  value = np.load(os.path.join(directory, name), allow_pickle=False)
  if value.dtype != np.float32 or value.shape != shape:
    raise ValueError(f"{directory}/{name}: expected float32 {list(shape)}, got {value.dtype} {list(value.shape)}")
  return value
