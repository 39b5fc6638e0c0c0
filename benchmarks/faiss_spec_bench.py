"""Which FAISS index spec gives the most token recall per millisecond at a given k'? (issue 7's FAISS search)

Issue 7's FAISS row (README, Benchmarks) reaches the notebook's ranking quality with IVF4096 + PQ128x4fs (one 4-bit
code per dimension) + int8 refinement. This script builds each FAISS factory string over the same SciFact MiniLM
token states retrieval_bench.py uses (its --cache, encoded there) and prints, per lists probed and refinement factor
(and fast-scan search implementation, --implems), token recall@k' against exact search and ms/query of FAISS's search
call on one pinned core (median of --reps, one thread; builds use --build_threads). What was compared with it:

    # session 15: rotations before the PQ
    python benchmarks/faiss_spec_bench.py --specs "IVF4096,PQ128x4fs,Refine(SQ8)" \
      "RR128,IVF4096,PQ128x4fs,Refine(SQ8)" "PCAR128,IVF4096,PQ128x4fs,Refine(SQ8)"
    # session 17: list counts and coarse quantizers, narrower PQ, RaBitQ, other refinement codes
    python benchmarks/faiss_spec_bench.py --nprobes 10,15,20 --k_factors 1.5,2 --specs \
      "IVF4096,PQ128x4fs,Refine(SQ8)" "IVF2048,PQ128x4fs,Refine(SQ8)" "IVF8192,PQ128x4fs,Refine(SQ8)" ...

    # session 19: the adaptive probe (xtr_build_index.probe_gap) against fixed probes, same index
    python benchmarks/faiss_spec_bench.py --specs "IVF4096,PQ128x4fs,Refine(SQ8)" --nprobes 8,10,15,20,30 \
      --k_factors 1.25,1.5,2 --probe_gaps 0.08,0.1,0.12,0.15,0.18 --gap_nprobes 20,30,40 --min_leaves 5

Timings are the search call alone (no padded layout, no scoring), so they compare specs with each other, not with
the notebook pipeline (retrieval_bench.py does that). `--probe_gaps` adds, per gap, xtr_jax's adaptive probe over the
same index (`faiss_index.FaissIndex` with probe_gap / min_leaves_to_search: FAISS's coarse search of --gap_nprobes
lists, the lists beyond the gap skipped, numba refinement), its rows marked "gap=".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _one_core  # noqa: E402  pylint: disable=g-import-not-at-top
if __name__ == "__main__":  # single thread everywhere, before numpy / faiss are imported
  _one_core.single_thread_env()

import numpy as np  # noqa: E402

import _minilm_encode  # noqa: E402  pylint: disable=g-import-not-at-top
import retrieval_bench  # noqa: E402  pylint: disable=g-import-not-at-top

from xtr_jax import faiss_index  # noqa: E402

_REFINE_DTYPE = {"SQ8": "int8", "Flat": "float32"}


def timed(search, reps: int, num_queries: int):
  """(median ms/query over reps after one warm-up, the last result's ids)."""
  search()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    _, ids = search()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times)) / num_queries, ids


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--specs", nargs="+",
                  default=["IVF4096,PQ128x4fs,Refine(SQ8)", "RR128,IVF4096,PQ128x4fs,Refine(SQ8)"])
  ap.add_argument("--num_queries", type=int, default=100)
  ap.add_argument("--k", type=int, default=100, help="k' (tokens retrieved per query token)")
  ap.add_argument("--nprobes", default="10,15,20,30")
  ap.add_argument("--k_factors", default="1.25,1.5", help="refinement candidates per k' (specs with Refine only)")
  ap.add_argument("--implems", default="0", help="IndexIVFFastScan.implem values (fast-scan specs; 0 = FAISS picks)")
  ap.add_argument("--probe_gaps", default="", help="adaptive-probe gaps to time as well (IVF fast-scan specs with no "
                  "refinement, Refine(SQ8) or Refine(Flat)); empty: none")
  ap.add_argument("--gap_nprobes", default="40", help="most lists an adaptive-probe token may probe")
  ap.add_argument("--min_leaves", type=int, default=5, help="fewest lists an adaptive-probe token probes")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--training_sample", type=int, default=250000)
  ap.add_argument("--build_threads", type=int, default=2)
  ap.add_argument("--encode_threads", type=int, default=2)
  args = ap.parse_args()
  import faiss  # pylint: disable=g-import-not-at-top

  docs, queries = _minilm_encode.read_scifact(args.data)
  emb = np.asarray(_minilm_encode.encode_corpus_cached(docs, args.cache, threads=args.encode_threads)["embeddings"],
                   np.float32)
  _, q, q_mask = _minilm_encode.encode_queries_cached(queries, os.path.join(args.cache, "test_queries.npz"),
                                                      threads=args.encode_threads)
  q, q_mask = q[:args.num_queries], q_mask[:args.num_queries]
  gt = retrieval_bench.exact_token_topk(emb, q, q_mask, args.k)[q_mask]  # [valid query tokens, k]
  flat = np.ascontiguousarray(q[q_mask], np.float32)
  print(f"{emb.shape[0]} tokens; {len(flat)} query tokens of {args.num_queries} queries; k'={args.k}; ms/query: "
        f"FAISS search call, one pinned core, median of {args.reps}", flush=True)
  recall = lambda ids: np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids, gt)])  # noqa: E731
  sample = emb[np.random.default_rng(0).choice(len(emb), min(args.training_sample, len(emb)), replace=False)]
  print(f"{'spec':42s} {'build s':>7s} {'implem':>6s} {'lists':>5s} {'factor':>6s} {'ms/query':>8s} {'recall':>6s}")
  cores = os.sched_getaffinity(0)
  for spec in args.specs:
    os.sched_setaffinity(0, cores)
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    index = faiss.index_factory(emb.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    index.add(emb)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    _one_core.pin_to_one_core()
    refine = "Refine" in spec
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    fast_scan = isinstance(ivf, faiss.IndexIVFFastScan)
    for implem in ([int(x) for x in args.implems.split(",")] if fast_scan else [None]):
      if implem is not None:
        ivf.implem = implem
      for nprobe in (int(x) for x in args.nprobes.split(",")):
        for factor in ([float(x) for x in args.k_factors.split(",")] if refine else [1.0]):
          params = faiss.SearchParametersIVF(nprobe=nprobe)
          if refine:  # FAISS takes int(k * k_factor) candidates; +0.5 / k keeps float rounding from losing one
            params = faiss.IndexRefineSearchParameters(k_factor=(np.ceil(factor * args.k) + 0.5) / args.k,
                                                       base_index_params=params)
          ms, ids = timed(lambda: index.search(flat, args.k, params=params), args.reps, args.num_queries)
          print(f"{spec:42s} {build_s:7.0f} {'-' if implem is None else implem:>6} {nprobe:5d} {factor:6.2f} "
                f"{ms:8.2f} {recall(ids):6.3f}", flush=True)
    refine_code = spec.split("Refine(")[1].rstrip(")") if refine else None
    if args.probe_gaps and fast_scan and (not refine or refine_code in _REFINE_DTYPE):
      ivf.implem = 0  # FAISS's own choice, as xtr_jax searches
      for gap in (float(x) for x in args.probe_gaps.split(",")):
        for nprobe in (int(x) for x in args.gap_nprobes.split(",")):
          for factor in ([float(x) for x in args.k_factors.split(",")] if refine else [1.0]):
            p = {"num_leaves": ivf.nlist, "num_leaves_to_search": nprobe, "reorder_k": int(refine),
                 "reorder_dtype": _REFINE_DTYPE[refine_code] if refine else "none", "reorder_factor": factor,
                 "probe_gap": gap, "min_leaves_to_search": min(args.min_leaves, nprobe), "search_threads": 1}
            adaptive = faiss_index.FaissIndex(index, num_tokens=emb.shape[0], dim=emb.shape[1], params=p)
            ms, ids = timed(lambda: adaptive.search(flat, args.k), args.reps, args.num_queries)
            label = f"{spec} gap={gap:g} min={p['min_leaves_to_search']}"
            print(f"{label:42s} {build_s:7.0f} {'-':>6} {nprobe:5d} {factor:6.2f} {ms:8.2f} {recall(ids):6.3f}",
                  flush=True)
    del index


if __name__ == "__main__":
  main()
