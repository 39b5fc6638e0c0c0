"""FAISS token index: inverted lists + 4-bit PQ fast-scan (+ optional refinement), behind `index.TokenIndex`.

    build_index(embeddings, backend="faiss", num_leaves=4096, num_leaves_to_search=70)   # k' ~ 1000
    build_index(embeddings, backend="faiss", num_leaves=4096, num_leaves_to_search=20,   # k' ~ 100
                reorder_k=1, reorder_dtype="int8", reorder_factor=1.5)      # gin: xtr_build_index.*
    build_index(embeddings, backend="faiss", num_leaves=4096, num_leaves_to_search=20,   # k' ~ 100, adaptive
                reorder_k=1, reorder_dtype="int8", reorder_factor=1.5, probe_gap=0.15, min_leaves_to_search=5)

Why a second approximate backend: at the notebook's ranking quality it is the faster token search on one CPU core
here. On SciFact (1.69M MiniLM tokens) it reached ~9-10x the notebook pipeline's speed at k' = 100, 1000 and 4000 where
ScaNN with the same batched search and scorer reached 1.8x / 3.8x / 6.6-7.2x (README, Benchmarks: the FAISS row).
Its 4-bit lookup tables live in SIMD registers, and with 4,096 lists it needs fewer tokens scanned for the same
document ranking; its PQ is not anisotropic, so it finds fewer of the true top tokens than ScaNN's AH (token recall
0.85 vs 0.91 at k' = 1000) for the same top-10 agreement with exact XTR. At k' ~ 100 an int8 refinement of 1.25-1.5 k'
candidates is worth its cost; at k' >= 1000 it is not (rescoring is random memory access).

The same `xtr_build_index` keywords mean the same things as for ScaNN: `num_leaves` inverted lists (k-means over
`training_sample_size` tokens; clamped to the corpus), `num_leaves_to_search` lists probed per query token,
`dimensions_per_block` dimensions per PQ code (`hash_type` "lut16": 4-bit fast-scan codes, "lut256": 8-bit PQ),
and `reorder_k` > 0 rescores max(reorder_k, ceil(reorder_factor x k)) PQ candidates against stored `reorder_dtype`
copies of the embeddings ("int8": FAISS's 8-bit per-dimension scalar quantizer, "float16", "bfloat16", "float32":
exact) and returns the best k. ScaNN-only settings (anisotropic quantization, spherical partitioning, paired_dims,
center, SOAR) are refused rather than ignored when set. Builds are deterministic (FAISS seeds its k-means), unlike
ScaNN's. Saved with `faiss.write_index` (FAISS's own binary format: no pickles), sha256-checked by the manifest.

`probe_gap` > 0 makes the number of lists probed adaptive, per query token: of its `num_leaves_to_search` nearest
lists, only those whose centroid score is within `probe_gap` of its best list's are scanned (never fewer than
`min_leaves_to_search`). A token whose best list stands out has its neighbours there; one whose lists score alike
needs many. On SciFact's MiniLM tokens at k' = 100 this reaches a fixed probe's token recall in 9-17% less search
time (README, Benchmarks: the adaptive-probe row); at k' >= 1000, where most tokens need many lists anyway, it was
not faster than a fixed probe at the notebook's ranking quality.

How a search runs: FAISS's coarse quantizer picks each query token's lists, FAISS's `search_preassigned` scans them
(lists the adaptive probe drops are marked -1 and skipped), and int8 / float32 refinement is `faiss_kernels`' numba
kernel over FAISS's stored codes (FAISS has no refinement call for given candidates), whose results equal
`IndexRefine`'s to float rounding in less time. Indexes with 16-bit refinement codes search with FAISS's
`Index.search` and take no probe_gap.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import numba
import numpy as np

from xtr_jax import faiss_kernels
from xtr_jax import index as index_lib

FILE = "faiss.index"
_REFINE = {"int8": "SQ8", "float16": "SQfp16", "bfloat16": "SQbf16", "float32": "Flat"}
_CODE_BITS = {"lut16": 4, "lut256": 8}
# What decides the contents of a FAISS index; search-time settings are recorded too (the manifest is the one place
# an evaluation learns how its index searched), so an index is reused only when all of them match.
BUILD_KEYS = ("num_leaves", "num_leaves_to_search", "training_sample_size", "dimensions_per_block", "hash_type",
              "reorder_k", "reorder_dtype", "reorder_factor", "probe_gap", "min_leaves_to_search")
# Refinement codes xtr_jax's own rescoring reads (`faiss_kernels.rescore_*`); FAISS's 16-bit codes it does not, so
# those indexes search with FAISS's `Index.search` and take no probe_gap.
_OWN_REFINE = ("int8", "float32")


def _faiss():
  import faiss  # pylint: disable=g-import-not-at-top
  return faiss


@contextlib.contextmanager
def _omp_threads(n: int):
  """FAISS's OpenMP thread count is process-wide: set it for one call and restore it (0 = leave FAISS's default)."""
  faiss = _faiss()
  before = faiss.omp_get_max_threads()
  if n:
    faiss.omp_set_num_threads(int(n))
  try:
    yield
  finally:
    faiss.omp_set_num_threads(before)


def params(num_tokens: int, dim: int, *, num_leaves: int, num_leaves_to_search: int, training_sample_size: int,
           dimensions_per_block: int, hash_type: str, reorder_k: int, reorder_dtype: str, reorder_factor: float,
           probe_gap: float, min_leaves_to_search: int, training_threads: int,
           search_threads: int) -> dict[str, Any]:
  """The parameters a FAISS index over `num_tokens` tokens of `dim` dimensions records: checked, sizes clamped."""
  if hash_type not in _CODE_BITS:
    raise ValueError(f"hash_type must be one of {tuple(_CODE_BITS)} for the faiss backend, got {hash_type!r}")
  if int(dimensions_per_block) < 1 or dim % int(dimensions_per_block):
    raise ValueError(f"dimensions_per_block must divide the embedding dimension {dim} for the faiss backend (one PQ "
                     f"sub-quantizer per block), got {dimensions_per_block}")
  if reorder_dtype not in _REFINE or float(reorder_factor) < 1:
    raise ValueError(f"reorder_dtype must be one of {tuple(_REFINE)} and reorder_factor >= 1 for the faiss backend, "
                     f"got reorder_dtype={reorder_dtype!r}, reorder_factor={reorder_factor}")
  gap = float(probe_gap)
  if not gap >= 0:  # (NaN too)
    raise ValueError(f"probe_gap must be >= 0 (0: every query token probes num_leaves_to_search lists), got "
                     f"{probe_gap}")
  if gap and int(reorder_k) and reorder_dtype not in _OWN_REFINE:
    raise ValueError(f"probe_gap > 0 refines with reorder_dtype in {_OWN_REFINE} (or reorder_k=0), got "
                     f"reorder_dtype={reorder_dtype!r}")
  if gap and not 1 <= int(min_leaves_to_search) <= int(num_leaves_to_search):
    raise ValueError(f"min_leaves_to_search must lie in [1, num_leaves_to_search={num_leaves_to_search}] with "
                     f"probe_gap > 0, got {min_leaves_to_search}")
  leaves = min(int(num_leaves), num_tokens)
  sample = min(int(training_sample_size), num_tokens)
  if sample < leaves:
    raise ValueError(f"training_sample_size={training_sample_size} is smaller than num_leaves={leaves}: k-means "
                     "needs at least one training token per inverted list")
  return {"num_leaves": leaves, "num_leaves_to_search": min(int(num_leaves_to_search), leaves),
          "training_sample_size": sample, "dimensions_per_block": int(dimensions_per_block),
          "hash_type": str(hash_type), "reorder_k": int(reorder_k),
          "reorder_dtype": str(reorder_dtype) if reorder_k else "none",
          "reorder_factor": float(reorder_factor) if reorder_k else 1.0,
          "probe_gap": gap, "min_leaves_to_search": min(int(min_leaves_to_search), leaves) if gap else 1,
          "training_threads": int(training_threads), "search_threads": int(search_threads)}


def factory_string(p: dict[str, Any], dim: int) -> str:
  """The `faiss.index_factory` description of an index with recorded params `p`, e.g.
  'IVF4096,PQ128x4fs,Refine(SQ8)'."""
  m = dim // p["dimensions_per_block"]
  pq = f"PQ{m}x4fs" if _CODE_BITS[p["hash_type"]] == 4 else f"PQ{m}"
  refine = f",Refine({_REFINE[p['reorder_dtype']]})" if p["reorder_k"] else ""
  return f"IVF{p['num_leaves']},{pq}{refine}"


class FaissIndex(index_lib.TokenIndex):
  """FAISS IVF + PQ (4-bit fast-scan or 8-bit) + optional refinement; inner-product metric."""

  backend = "faiss"
  partitioned = True

  def __init__(self, faiss_index, *, num_tokens: int, dim: int, params: dict[str, Any],
               identity: dict[str, Any] | None = None):
    super().__init__(num_tokens, dim, params, identity)
    self.index = faiss_index
    if self.index.ntotal != self.num_tokens or self.index.d != self.dim:
      raise ValueError(f"FAISS index holds {self.index.ntotal} vectors of dimension {self.index.d}, expected "
                       f"{self.num_tokens} of dimension {self.dim}")

  def _candidates(self, k: int) -> int:
    """PQ candidates refined for a top-k search: max(reorder_k, ceil(reorder_factor x k)), as for ScaNN."""
    return max(int(self.params["reorder_k"]), math.ceil(float(self.params["reorder_factor"]) * k))

  def _search(self, q, k, leaves_to_search=None):
    if len(q) == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    probe = min(int(leaves_to_search or self.params["num_leaves_to_search"]), self.params["num_leaves"])
    q = np.ascontiguousarray(q, np.float32)
    if self.params["reorder_k"] and self.params["reorder_dtype"] not in _OWN_REFINE:
      scores, ids = self._faiss_search(q, k, probe)
    else:
      scores, ids = self._own_search(q, k, probe)
    # Fewer than k tokens in the probed lists: FAISS pads with id -1 and score -FLT_MAX. Fixed in place (FAISS's
    # output arrays are fresh; at k' = 4000 they are ~40 MB a batch).
    np.putmask(scores, ids < 0, -np.inf)
    return scores, ids.astype(np.int32)

  def _faiss_search(self, q: np.ndarray, k: int, probe: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's own search (16-bit refinement): float32 [N, D] -> (scores float32 [N, k], ids int64 [N, k])."""
    faiss = _faiss()
    search_params = faiss.SearchParametersIVF(nprobe=probe)
    # IndexRefine asks its base index for int(k * k_factor) candidates; the +0.5 keeps float rounding from losing one.
    search_params = faiss.IndexRefineSearchParameters(k_factor=(self._candidates(k) + 0.5) / k,
                                                      base_index_params=search_params)
    with _omp_threads(int(self.params.get("search_threads", 1))):
      return self.index.search(q, k, params=search_params)

  def _own_search(self, q: np.ndarray, k: int, probe: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS's steps called one by one (module docstring): float32 [N, D] -> (scores float32 [N, k], ids int64
    [N, k]). The same tokens as FAISS's `Index.search` up to float rounding, plus the adaptive probe.

    `probe` is the most lists a token probes (num_leaves_to_search or a sweep's leaves_to_search; a smaller one
    also lowers min_leaves_to_search to it)."""
    faiss = _faiss()
    refine = self.index if self.params["reorder_k"] else None
    ivf = faiss.downcast_index(refine.base_index if refine is not None else self.index)
    n = len(q)
    kc = self._candidates(k) if refine is not None else k
    threads = int(self.params.get("search_threads", 1))
    with _omp_threads(threads):
      coarse, lists = ivf.quantizer.search(q, probe)  # best first
      if self.params.get("probe_gap", 0.0):
        far = coarse < coarse[:, :1] - np.float32(self.params["probe_gap"])
        far[:, :min(int(self.params["min_leaves_to_search"]), probe)] = False
        lists[far] = -1  # FAISS skips these lists
      scores = np.empty((n, kc), np.float32)
      ids = np.empty((n, kc), np.int64)
      ivf.search_preassigned_c(n, faiss.swig_ptr(q), kc, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                               faiss.swig_ptr(scores), faiss.swig_ptr(ids), False,
                               faiss.SearchParametersIVF(nprobe=probe))
    if refine is None:
      return scores, ids
    codes, w, b = self._refine_affine(q)
    if threads <= 1:  # (the serial kernel: no threading layer, safe to call from several Python threads at once)
      return faiss_kernels.rescore_serial(codes, ids, w, b, k)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
      return faiss_kernels.rescore_parallel(codes, ids, w, b, k)
    finally:
      numba.set_num_threads(before)

  def _refine_affine(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [T, D] uint8 or float32, a view of FAISS's refinement codes; w float32 [N, D]; b float32 [N]) such
    that w[i] . codes[t] + b[i] is the score FAISS's refinement gives query i and token t."""
    faiss = _faiss()
    refine = faiss.downcast_index(self.index.refine_index)
    raw = faiss.rev_swig_ptr(refine.codes.data(), refine.codes.size())  # no copy: lives as long as the index
    if self.params["reorder_dtype"] == "float32":
      return raw.view(np.float32).reshape(self.num_tokens, self.dim), q, np.zeros(len(q), np.float32)
    sq = refine.sq
    trained = faiss.vector_to_array(sq.trained)
    if sq.qtype != faiss.ScalarQuantizer.QT_8bit or trained.shape != (2 * self.dim,):
      raise ValueError(f"expected FAISS's per-dimension 8-bit scalar quantizer for reorder_dtype 'int8', got qtype "
                       f"{sq.qtype} with {trained.shape[0]} trained values")
    # FAISS decodes code c of dimension j as vmin_j + (c + 0.5) / 255 * vdiff_j.
    vmin, vdiff = trained[:self.dim], trained[self.dim:]
    w = (q * (vdiff / 255.0)).astype(np.float32)
    b = (q @ (vmin + 0.5 * vdiff / 255.0)).astype(np.float32)
    return raw.reshape(self.num_tokens, self.dim), w, b

  def _save_files(self, directory):
    _faiss().write_index(self.index, os.path.join(directory, FILE))
    return [FILE]


def build(embeddings: np.ndarray, p: dict[str, Any], *, identity: dict[str, Any] | None = None) -> FaissIndex:
  """FAISS index over float16/float32 [T, D] embeddings with recorded params `p` (from `params`)."""
  faiss = _faiss()
  t, d = embeddings.shape
  index = faiss.index_factory(d, factory_string(p, d), faiss.METRIC_INNER_PRODUCT)
  rows = np.sort(np.random.default_rng(0).choice(t, size=p["training_sample_size"], replace=False))
  with _omp_threads(p["training_threads"]):
    index.train(np.ascontiguousarray(embeddings[rows], np.float32))
    for start in range(0, t, 1 << 20):  # float32 copies a chunk at a time, not the whole corpus
      index.add(np.ascontiguousarray(embeddings[start:start + (1 << 20)], np.float32))
  return FaissIndex(index, num_tokens=t, dim=d, params=p, identity=identity)


def load(directory: str, manifest: dict[str, Any], p: dict[str, Any], identity: dict[str, Any]) -> FaissIndex:
  """A saved FAISS index (files already sha256-checked by `index.load_index`)."""
  index = _faiss().read_index(os.path.join(directory, FILE))
  return FaissIndex(index, num_tokens=manifest["num_tokens"], dim=manifest["dim"], params=p, identity=identity)
