"""Index bytes per token vs token recall for ScaNN asymmetric-hashing settings, on SciFact token embeddings.

    python benchmarks/index_quantization_bench.py --max_docs 1250 --num_queries 60

Why: the retrieval target asks for <= 64 bytes/token at token recall@k' >= 0.9. A 128-d embedding quantized with
ScaNN's default (lut16, 1 dim per block) is 128 codes x 4 bits = 64 bytes of codes alone, before the per-token leaf id;
this script measures how recall falls when fewer bits per dimension are spent (lut16 with 2 dims per block, lut256
with 2 / 3 / 4 dims per block), on the same corpus and tree, against exact brute-force token retrieval.

Encoder and cache as benchmarks/retrieval_bench.py (MiniLM token states + the fixed seeded 384->128 projection).
The tree keeps the notebook's ratio: num_leaves = min(2000, T / 400) with 1/20 of them searched. Code bytes are
the packed codes (lut16: two per byte as xtr_jax saves them; lut256: one byte each); on disk add ~2 bytes/token of
leaf id and the shared centers. Search timings are one thread, batched over all query tokens, shared machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _minilm_encode  # noqa: E402  pylint: disable=g-import-not-at-top

SETTINGS = (("lut16", 1), ("lut16", 2), ("lut256", 2), ("lut256", 3), ("lut256", 4))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--max_docs", type=int, default=1250, help="first N documents (None-equivalent: 0 = all)")
  ap.add_argument("--num_queries", type=int, default=60)
  ap.add_argument("--k_primes", default="100,1000")
  ap.add_argument("--settings", default=",".join(f"{h}:{d}" for h, d in SETTINGS), help="hash_type:dims_per_block,...")
  args = ap.parse_args()
  import scann  # pylint: disable=g-import-not-at-top

  docs, queries = _minilm_encode.read_scifact(args.data)
  arrays = _minilm_encode.encode_corpus_cached(docs, args.cache, max_docs=args.max_docs or None)
  _, q, q_mask = _minilm_encode.encode_queries_cached(queries, os.path.join(args.cache, "test_queries.npz"))
  x = np.asarray(arrays["embeddings"], np.float32)
  qv = q[:args.num_queries][q_mask[:args.num_queries]].astype(np.float32)
  ks = [int(k) for k in args.k_primes.split(",")]
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  exact = np.argsort(-(qv @ x.T), axis=1, kind="stable")[:, :max(ks)]
  leaves = max(1, min(2000, len(x) // 400))
  print(f"{len(arrays['doc_ids'])} docs, {len(x)} tokens, {len(qv)} query tokens; {leaves} leaves, "
        f"{max(1, leaves // 20)} searched; one core", flush=True)
  rows = []
  for spec in args.settings.split(","):
    hash_type, dpb = spec.split(":")
    dpb = int(dpb)
    t0 = time.perf_counter()
    searcher = scann.scann_ops_pybind.builder(x, max(ks), "dot_product").tree(
        num_leaves=leaves, num_leaves_to_search=max(1, leaves // 20),
        training_sample_size=min(250000, len(x))).score_ah(
            dpb, anisotropic_quantization_threshold=0.1, hash_type=hash_type).build()
    build_s = time.perf_counter() - t0
    searcher.set_num_threads(1)
    blocks = -(-x.shape[1] // dpb)
    code_bytes = -(-blocks // 2) if hash_type == "lut16" else blocks
    row = [f"{hash_type} dims/block={dpb}", f"{code_bytes}", f"{8 * code_bytes / x.shape[1]:.2f}", f"{build_s:.0f}"]
    for k in ks:
      t0 = time.perf_counter()
      ids, _ = searcher.search_batched(qv, final_num_neighbors=k)
      ms = 1e3 * (time.perf_counter() - t0) / len(qv)
      recall = np.mean([len(np.intersect1d(a, e[:k])) / k for a, e in zip(np.asarray(ids), exact)])
      row += [f"{recall:.3f}", f"{ms:.2f}"]
    rows.append(row)
    print("  ".join(row), flush=True)
  header = ["setting", "code B/token", "bits/dim", "build s"] + [c for k in ks for c in (f"recall@{k}", f"ms/tok@{k}")]
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
  main()
