"""Does a rotation before FAISS's 4-bit PQ buy token recall (and so fewer inverted lists probed) at a given k'?

Issue 7's FAISS row (README, Benchmarks) reaches the notebook's ranking quality with IVF4096 + PQ128x4fs (one 4-bit
code per dimension) + int8 refinement; a learned (OPQ) or random rotation could spread the variance over the
dimensions before the per-dimension codes. This script builds each FAISS factory string over the same SciFact
MiniLM token states retrieval_bench.py uses (its --cache, encoded there) and prints token recall@k' against exact
search and ms/query on one core, per lists probed and refinement factor:

    python benchmarks/faiss_rotation_bench.py --specs "IVF4096,PQ128x4fs,Refine(SQ8)" \
      "RR128,IVF4096,PQ128x4fs,Refine(SQ8)" "PCAR128,IVF4096,PQ128x4fs,Refine(SQ8)"

Timings are FAISS's search call alone (no scoring), so they compare specs with each other, not with the notebook.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import _minilm_encode
import retrieval_bench


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--specs", nargs="+", default=["IVF4096,PQ128x4fs,Refine(SQ8)", "RR128,IVF4096,PQ128x4fs,Refine(SQ8)"])
  ap.add_argument("--num_queries", type=int, default=100)
  ap.add_argument("--k", type=int, default=100, help="k' (tokens retrieved per query token)")
  ap.add_argument("--nprobes", default="10,15,20,30")
  ap.add_argument("--k_factors", default="1.25,1.5", help="refinement candidates per k' (specs with Refine only)")
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
  print(f"{emb.shape[0]} tokens; {len(flat)} query tokens of {args.num_queries} queries; k'={args.k}", flush=True)
  sample = emb[np.random.default_rng(0).choice(len(emb), min(args.training_sample, len(emb)), replace=False)]
  print(f"{'spec':42s} {'build s':>7s} {'lists':>5s} {'factor':>6s} {'ms/query':>8s} {'recall':>6s}")
  for spec in args.specs:
    faiss.omp_set_num_threads(args.build_threads)
    t0 = time.perf_counter()
    index = faiss.index_factory(emb.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    index.add(emb)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    refine = "Refine" in spec
    for nprobe in (int(x) for x in args.nprobes.split(",")):
      for factor in ([float(x) for x in args.k_factors.split(",")] if refine else [1.0]):
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        if refine:
          params = faiss.IndexRefineSearchParameters(k_factor=factor, base_index_params=params)
        index.search(flat[:200], args.k, params=params)  # warm-up
        t0 = time.perf_counter()
        _, ids = index.search(flat, args.k, params=params)
        ms = 1e3 * (time.perf_counter() - t0) / args.num_queries
        recall = np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(ids, gt)])
        print(f"{spec:42s} {build_s:7.0f} {nprobe:5d} {factor:6.2f} {ms:8.2f} {recall:6.3f}", flush=True)


if __name__ == "__main__":
  main()
