"""Where the milliseconds of xtr_jax's FAISS token search go, per query, on one CPU core.

Issue 7's FAISS row (README, Benchmarks) sits at ~9-10x the notebook pipeline; this script splits one search into
its parts so that the next idea can be judged against them. Over the SciFact MiniLM token states retrieval_bench.py
uses (its --cache), for the IVF4096 + 4-bit PQ fast-scan index (+ int8 refinement where the row says so), per
(k', lists probed, refinement factor):

  coarse      FAISS's coarse quantizer alone (which lists each query token probes: 4,096 inner products + top-n)
  scan        the IVF search asking for ONE neighbour (coarse + lookup tables + scanning the probed lists' codes)
  collect     the same search asking for k' x factor neighbours, minus `scan`: keeping the best k' x factor
  refine      the full search with int8 refinement, minus the base search: re-scoring the candidates
  padded      `TokenIndex.search_padded` + `index.lookup_tokens` (xtr_jax's whole token retrieval) minus FAISS's
  score       `scoring.xtr_score` on the result (the jitted scorer)

and, with --alternatives, two ways of doing FAISS's own parts in NumPy that were tried instead (session 16): the
coarse step as one matmul + argpartition feeding `search_preassigned`, and the refinement as a gather of int8 codes
+ dot products; with --list_order, the refinement of a second index holding the same tokens added in inverted-list
order (so that the refinement codes of one list are contiguous in memory, ids mapped back through the permutation),
timed interleaved with the first; with --vs_index_refine, FAISS's own `IndexRefine` search against
`FaissIndex.search` (the same coarse step and list scan, then `faiss_kernels`' refinement), interleaved. With
--probe_gap G, every setting is searched with the adaptive probe instead (`xtr_build_index.probe_gap`: lists probed =
the setting's at most, those within G of the best, at least --min_leaves): `scan` is then the whole base search for
k' x factor candidates minus `coarse` (its top-k collection included, `collect` left empty) and `refine` the numba
refinement. Same core, same queries, medians of --reps:

    python benchmarks/faiss_search_parts.py --alternatives --list_order
    python benchmarks/faiss_search_parts.py --vs_index_refine --settings 100:15:1.5,100:20:1.5,100:20:2,1000:30:1.5
    python benchmarks/faiss_search_parts.py --probe_gap 0.15 --min_leaves 5 --settings 100:20:1.5,100:30:1.5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _one_core  # noqa: E402  pylint: disable=g-import-not-at-top
if __name__ == "__main__":  # single thread everywhere, before numpy / jax are imported
  _one_core.single_thread_env()

import numpy as np  # noqa: E402

import _minilm_encode  # noqa: E402  pylint: disable=g-import-not-at-top

from xtr_jax import faiss_index  # noqa: E402
from xtr_jax import index as index_lib  # noqa: E402
from xtr_jax import scoring  # noqa: E402


def _median_ms(fn, reps: int, per: int) -> float:
  fn()  # warm-up (jit, caches)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times)) / per


def _interleaved_ms(runs: dict, rounds: int, per: int) -> dict[str, float]:
  """Median ms per `per` of each named callable, the callables taking turns for `rounds` rounds after a warm-up one
  (so that a noisy stretch of the machine hits all of them alike)."""
  times: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds + 1):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * float(np.median(v[1:])) / per for name, v in times.items()}


def numpy_coarse(flat: np.ndarray, centroids: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
  """(inner products f32 [m, nprobe], list ids int64 [m, nprobe]) of each query token's nprobe best lists."""
  sims = flat @ centroids.T
  lists = np.argpartition(sims, -nprobe, axis=1)[:, -nprobe:]
  return np.take_along_axis(sims, lists, 1), lists


def numpy_refine(flat: np.ndarray, ids: np.ndarray, codes: np.ndarray, vmin: np.ndarray, vdiff: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
  """FAISS's SQ8 refinement in NumPy: q . (vmin + (code + 0.5) / 255 * vdiff) for each candidate, best k kept."""
  w = flat * (vdiff / 255.0)
  offset = flat @ vmin + 0.5 * w.sum(1)
  s = np.einsum("mkd,md->mk", codes[np.maximum(ids, 0)].astype(np.float32), w) + offset[:, None]
  s[ids < 0] = -np.inf
  top = np.argpartition(-s, k - 1, axis=1)[:, :k]
  top_s = np.take_along_axis(s, top, 1)
  order = np.argsort(-top_s, axis=1, kind="stable")
  return np.take_along_axis(top_s, order, 1), np.take_along_axis(np.take_along_axis(ids, top, 1), order, 1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--num_queries", type=int, default=64, help="first N test queries: one batch, as retrieval_bench")
  ap.add_argument("--settings", default="100:15:1.25,100:20:1.5,1000:50:1,1000:70:1,4000:100:1",
                  help="k':lists:refinement factor (1 = the base index alone, as retrieval_bench's faiss-pq)")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--build_threads", type=int, default=2)
  ap.add_argument("--alternatives", action="store_true", help="also time the NumPy coarse step and refinement")
  ap.add_argument("--probe_gap", type=float, default=0.0, help="> 0: split the adaptive probe's search instead")
  ap.add_argument("--min_leaves", type=int, default=5, help="the adaptive probe's min_leaves_to_search")
  ap.add_argument("--list_order", action="store_true",
                  help="also time refinement on an index whose token ids follow the inverted lists")
  ap.add_argument("--vs_index_refine", action="store_true",
                  help="also time FAISS's own IndexRefine search against FaissIndex.search (xtr_jax's refinement "
                       "kernel), interleaved, for the rows with a refinement factor > 1")
  args = ap.parse_args()
  import faiss  # pylint: disable=g-import-not-at-top

  docs, queries = _minilm_encode.read_scifact(args.data)
  corpus = _minilm_encode.encode_corpus_cached(docs, args.cache, threads=args.build_threads)
  emb, token_doc = np.asarray(corpus["embeddings"], np.float32), corpus["token_doc"]
  _, q, q_mask = _minilm_encode.encode_queries_cached(queries, os.path.join(args.cache, "test_queries.npz"))
  q, q_mask = np.asarray(q[:args.num_queries], np.float32), q_mask[:args.num_queries]
  flat = np.ascontiguousarray(q[q_mask])
  nq = args.num_queries
  params = faiss_index.params(len(emb), emb.shape[1], num_leaves=4096, num_leaves_to_search=20,
                              training_sample_size=250000, dimensions_per_block=1, hash_type="lut16", reorder_k=1,
                              reorder_dtype="int8", reorder_factor=1.25, probe_gap=0.0, min_leaves_to_search=1,
                              training_threads=args.build_threads, search_threads=1)
  t0 = time.perf_counter()
  refined = faiss_index.build(emb, params)
  print(f"{len(emb)} tokens, {len(flat)} query tokens of {nq} queries; IVF4096,PQ128x4fs,Refine(SQ8) built in "
        f"{time.perf_counter() - t0:.0f} s; ms/query, one core, median of {args.reps}", flush=True)
  faiss.omp_set_num_threads(1)
  base = faiss.downcast_index(refined.index.base_index)
  quantizer = faiss.downcast_index(base.quantizer)
  plain = faiss_index.FaissIndex(base, num_tokens=len(emb), dim=emb.shape[1],
                                 params={**params, "reorder_k": 0, "reorder_dtype": "none", "reorder_factor": 1.0})
  if args.alternatives:
    sq = faiss.downcast_index(refined.index.refine_index)
    codes = faiss.vector_to_array(sq.codes).reshape(sq.ntotal, sq.code_size)
    trained = faiss.vector_to_array(sq.sq.trained)
    vmin, vdiff = trained[:emb.shape[1]], trained[emb.shape[1]:]
    centroids = np.ascontiguousarray(quantizer.reconstruct_n(0, base.nlist))
  if args.list_order:
    faiss.omp_set_num_threads(args.build_threads)
    ordered = faiss.clone_index(refined.index)
    ordered.reset()  # trained (coarse centroids, PQ and SQ8 codebooks) but empty
    _, assign = quantizer.search(emb, 1)
    perm = np.argsort(assign[:, 0], kind="stable")
    ordered.add(emb[perm])
    faiss.omp_set_num_threads(1)
  _one_core.pin_to_one_core()  # timings from here on, as retrieval_bench
  head = f"{'k_prime':>7s} {'lists':>5s} {'factor':>6s} {'coarse':>7s} {'scan':>7s} {'collect':>7s} {'refine':>7s} " \
         f"{'padded':>7s} {'score':>7s} {'total':>7s}"
  print(head + ("  | numpy coarse, numpy refine" if args.alternatives else "") +
        ("  | refine: id order vs list order (interleaved)" if args.list_order else ""))
  for setting in args.settings.split(","):
    k, lists, factor = setting.split(":")
    k, lists, factor = int(k), int(lists), float(factor)
    kk = int(np.ceil(k * factor))
    ivf_params = faiss.SearchParametersIVF(nprobe=lists)
    ms = lambda fn: _median_ms(fn, args.reps, nq)  # noqa: E731
    coarse = ms(lambda: quantizer.search(flat, lists))
    if args.probe_gap:  # the adaptive probe: FaissIndex's own path, refined or not
      gap = {"probe_gap": args.probe_gap, "min_leaves_to_search": min(args.min_leaves, lists),
             "num_leaves_to_search": lists}
      idx = faiss_index.FaissIndex(base, num_tokens=len(emb), dim=emb.shape[1], params={**plain.params, **gap})
      scan = None  # the base search's scan and top-k collection are not separable here
      base_kk = ms(lambda: idx.search(flat, kk))
    else:
      idx = plain
      scan = ms(lambda: base.search(flat, 1, params=ivf_params))
      base_kk = ms(lambda: base.search(flat, kk, params=ivf_params))
    full = base_kk
    if factor > 1:
      p = {**params, **(gap if args.probe_gap else {}), "reorder_factor": factor, "num_leaves_to_search": lists}
      idx = faiss_index.FaissIndex(refined.index, num_tokens=len(emb), dim=emb.shape[1], params=p)
      full = ms(lambda: idx.search(flat, k))
    padded = ms(lambda: index_lib.lookup_tokens(token_doc, idx.search_padded(q, q_mask, k, leaves_to_search=lists)[1]))
    s, t = idx.search_padded(q, q_mask, k, leaves_to_search=lists)
    d = index_lib.lookup_tokens(token_doc, t)
    score = ms(lambda: np.asarray(scoring.xtr_score(s, d, q_mask, 10, num_docs=len(docs))[0]))
    scan_cols = (f"{scan - coarse:7.3f} {base_kk - scan:7.3f}" if scan is not None else
                 f"{base_kk - coarse:7.3f} {'':>7s}")
    row = (f"{k:7d} {lists:5d} {factor:6.2f} {coarse:7.3f} {scan_cols} "
           f"{full - base_kk:7.3f} {padded - full:7.3f} {score:7.3f} {padded + score:7.3f}")
    if args.probe_gap:
      print(row + f"  (gap {args.probe_gap:g})", flush=True)
      continue
    rp = faiss.IndexRefineSearchParameters(k_factor=(kk + 0.5) / k, base_index_params=ivf_params)
    if args.alternatives:
      base.nprobe = lists  # search_preassigned takes nprobe from the index, not from search parameters
      dq, iq = numpy_coarse(flat, centroids, lists)
      same = np.array_equal(base.search_preassigned(flat, kk, iq, dq)[1], base.search(flat, kk, params=ivf_params)[1])
      row += f"  | {ms(lambda: numpy_coarse(flat, centroids, lists)):7.3f}{'' if same else ' (DIFFERENT lists)'}"
      if factor > 1:
        cand = base.search(flat, kk, params=ivf_params)[1]
        got = numpy_refine(flat, cand, codes, vmin, vdiff, k)[1]
        want = refined.index.search(flat, k, params=rp)[1]
        agree = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(got, want)])
        row += f" {ms(lambda: numpy_refine(flat, cand, codes, vmin, vdiff, k)):7.3f} (same ids {agree:.3f})"
    if args.vs_index_refine and factor > 1 and not args.probe_gap:
      med = _interleaved_ms({"faiss": lambda: refined.index.search(flat, k, params=rp),
                             "ours": lambda: idx.search(flat, k)}, 2 * args.reps, nq)
      agree = np.mean(refined.index.search(flat, k, params=rp)[1] == idx.search(flat, k)[1])
      row += f"  | IndexRefine {med['faiss']:.3f} vs ours {med['ours']:.3f} (same ids {agree:.4f})"
    if args.list_order and factor > 1:
      med = _interleaved_ms({"a": lambda: refined.index.search(flat, k, params=rp),
                             "a_base": lambda: refined.index.base_index.search(flat, kk, params=ivf_params),
                             "b": lambda: ordered.search(flat, k, params=rp),
                             "b_base": lambda: ordered.base_index.search(flat, kk, params=ivf_params)}, args.reps, nq)
      ids_b = ordered.search(flat, k, params=rp)[1]
      ids_b = np.where(ids_b >= 0, perm[np.maximum(ids_b, 0)], -1)
      agree = np.mean([len(np.intersect1d(a, b)) / k for a, b in
                       zip(refined.index.search(flat, k, params=rp)[1], ids_b)])
      row += (f"  | {med['a'] - med['a_base']:6.3f} vs {med['b'] - med['b_base']:6.3f} "
              f"(search {med['a']:.3f} vs {med['b']:.3f}; same ids {agree:.3f})")
    print(row, flush=True)


if __name__ == "__main__":
  main()
