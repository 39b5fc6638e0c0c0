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

A setting `lut16:1+2x8` mixes block sizes with ScaNN's VARIABLE_CHUNK projection: 8 blocks of 2 dims, the other 112
dims 1 per block (120 codes = 60 bytes): does spending fewer bits on a few dimensions keep recall >= 0.9?
`--leaf_fractions 20,10` also searches 1/10 of the leaves (the notebook searches 100 of 2000 = 1/20).

A setting `lut16:1+pairedP` is xtr_jax's own `build_index(..., paired_dims=P)`: the same VARIABLE_CHUNK code, but the
P paired dimensions are the lowest-variance principal directions of a rotated basis (`index.principal_rotation`)
instead of the last P coordinates, and the leading axes share the remaining variance evenly:

    python benchmarks/index_quantization_bench.py --max_docs 1250 --num_queries 60 \
      --settings lut16:1,lut16:1+2x8,lut16:1+paired16,lut16:1+paired32,lut16:1+paired48 --leaf_fractions 20,10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _minilm_encode  # noqa: E402  pylint: disable=g-import-not-at-top
import _one_core  # noqa: E402  pylint: disable=g-import-not-at-top

SETTINGS = (("lut16", 1), ("lut16", 2), ("lut256", 2), ("lut256", 3), ("lut256", 4))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--max_docs", type=int, default=1250, help="first N documents (None-equivalent: 0 = all)")
  ap.add_argument("--num_queries", type=int, default=60)
  ap.add_argument("--k_primes", default="100,1000")
  ap.add_argument("--settings", default=",".join(f"{h}:{d}" for h, d in SETTINGS),
                  help="hash_type:dims_per_block[+2xN],... (+2xN: N of the blocks hold 2 dims)")
  ap.add_argument("--leaf_fractions", default="20", help="search 1/F of the leaves, for each F")
  args = ap.parse_args()
  import scann  # pylint: disable=g-import-not-at-top
  from xtr_jax import index as index_lib  # pylint: disable=g-import-not-at-top

  docs, queries = _minilm_encode.read_scifact(args.data)
  arrays = _minilm_encode.encode_corpus_cached(docs, args.cache, max_docs=args.max_docs or None)
  _, q, q_mask = _minilm_encode.encode_queries_cached(queries, os.path.join(args.cache, "test_queries.npz"))
  x = np.asarray(arrays["embeddings"], np.float32)
  qv = q[:args.num_queries][q_mask[:args.num_queries]].astype(np.float32)
  ks = [int(k) for k in args.k_primes.split(",")]
  _one_core.pin_to_one_core()
  exact = []
  for i in range(0, len(qv), 100):  # top-k by partition, a block of queries at a time: bounded memory
    sims = qv[i:i + 100] @ x.T
    top = np.argpartition(-sims, max(ks), axis=1)[:, :max(ks)]
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
    exact.append(np.take_along_axis(top, order, 1))
  exact = np.concatenate(exact)
  leaves = max(1, min(2000, len(x) // 400))
  fractions = [int(f) for f in args.leaf_fractions.split(",")]
  print(f"{len(arrays['doc_ids'])} docs, {len(x)} tokens, {len(qv)} query tokens; {leaves} leaves, "
        f"1/{', 1/'.join(map(str, fractions))} of them searched; one core", flush=True)
  rows = []
  for spec in args.settings.split(","):
    hash_type, dpb = spec.split(":")
    if "+paired" in dpb:
      paired = int(dpb.partition("+paired")[2])
      t0 = time.perf_counter()
      idx = index_lib.build_index(x, backend="scann", num_neighbors=max(ks), num_leaves=leaves,
                                  num_leaves_to_search=max(1, leaves // 20), paired_dims=paired, hash_type=hash_type)
      build_s = time.perf_counter() - t0
      code_bytes = -(-(x.shape[1] - paired // 2) // 2)
      for fraction in fractions:
        row = [f"{hash_type} dims/block=1, {paired} principal dims paired", f"1/{fraction}", f"{code_bytes}",
               f"{8 * code_bytes / x.shape[1]:.2f}", f"{build_s:.0f}"]
        for k in ks:
          t0 = time.perf_counter()
          _, ids = idx.search_with(qv, k, leaves_to_search=max(1, leaves // fraction))
          ms = 1e3 * (time.perf_counter() - t0) / len(qv)
          recall = np.mean([len(np.intersect1d(a, e[:k])) / k for a, e in zip(ids, exact)])
          row += [f"{recall:.3f}", f"{ms:.2f}"]
        rows.append(row)
        print("  ".join(row), flush=True)
      continue
    dpb, _, pairs = dpb.partition("+2x")
    dpb, pairs = int(dpb), int(pairs or 0)
    t0 = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(x, max(ks), "dot_product").tree(
        num_leaves=leaves, num_leaves_to_search=max(1, leaves // 20),
        training_sample_size=min(250000, len(x))).score_ah(
            dpb, anisotropic_quantization_threshold=0.1, hash_type=hash_type)
    config = builder.create_config()
    blocks = -(-x.shape[1] // dpb)
    if pairs:
      if dpb != 1:
        raise ValueError(f"{spec}: +2xN mixes 2-dim blocks into 1-dim ones only")
      # The same config rewrite as build_index(paired_dims=...), on the raw (unrotated) coordinates.
      config = index_lib._paired_projection_config(config, x.shape[1], 2 * pairs)  # pylint: disable=protected-access
      blocks = x.shape[1] - pairs
    searcher = scann.scann_ops_pybind.create_searcher(x, config)
    build_s = time.perf_counter() - t0
    searcher.set_num_threads(1)
    code_bytes = -(-blocks // 2) if hash_type == "lut16" else blocks
    for fraction in fractions:
      row = [f"{hash_type} dims/block={dpb}" + (f" + {pairs} of 2" if pairs else ""), f"1/{fraction}",
             f"{code_bytes}", f"{8 * code_bytes / x.shape[1]:.2f}", f"{build_s:.0f}"]
      for k in ks:
        t0 = time.perf_counter()
        ids, _ = searcher.search_batched(qv, final_num_neighbors=k, leaves_to_search=max(1, leaves // fraction))
        ms = 1e3 * (time.perf_counter() - t0) / len(qv)
        recall = np.mean([len(np.intersect1d(a, e[:k])) / k for a, e in zip(np.asarray(ids), exact)])
        row += [f"{recall:.3f}", f"{ms:.2f}"]
      rows.append(row)
      print("  ".join(row), flush=True)
  header = ["setting", "leaves", "code B/token", "bits/dim", "build s"] + [
      c for k in ks for c in (f"recall@{k}", f"ms/tok@{k}")]
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
  main()
