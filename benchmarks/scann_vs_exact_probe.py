"""Where does a ScaNN token index lose nDCG@10 against exact token search: in WHICH tokens it finds or in the SCORES
it returns for them?

    python benchmarks/scann_vs_exact_probe.py --model /tmp/xtr_b128/model \
        --store /tmp/xtr_b128/eval/index/scifact [--dataset ../shared/data/beir/scifact] [--k_primes 100 1000]

`--store` is an evaluation's exported corpus with its ScaNN index (`xtr_jax.eval` writes them under
OUTPUT_DIR/index/<dataset>; exported and built here if absent, refused if another model's). For each k' it prints the
index's token recall against exact search, the mean and 99th percentile of |ScaNN score - exact dot product| over the
retrieved tokens, and nDCG@10 of XTR scoring (k'-th score imputation) three ways: ScaNN's tokens and scores, ScaNN's
tokens rescored exactly, and exact search. Also the anisotropy of the stored token embeddings (norm of their mean).
`--center` adds the same rows for an index with the stored one's settings built over the mean-removed tokens
(`xtr_build_index.center`); `--builds N` rebuilds each kind N times (ScaNN builds are not deterministic: its k-means
samples at random) and prints mean +- sd. Test queries are encoded, but nothing is tuned here.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from xtr_jax import analysis, index as index_lib, metrics, models, tokenization
from xtr_jax import eval as xeval


def exact_scores_of(q: np.ndarray, tokens: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
  """f32 [Nq, n, k'] dot products of each query token with its retrieved token rows (-1 -> 0), one query at a time."""
  out = np.zeros(tokens.shape, np.float32)
  for i in range(len(q)):
    rows = embeddings[np.maximum(tokens[i], 0)].astype(np.float32)  # [n, k', D]
    out[i] = np.where(tokens[i] >= 0, np.einsum("nd,nkd->nk", q[i], rows), 0.0)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--store", required=True)
  ap.add_argument("--dataset", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                    "scifact"))
  ap.add_argument("--split", default="test")
  ap.add_argument("--k_primes", type=int, nargs="+", default=[100, 1000])
  ap.add_argument("--query_max_len", type=int, default=64)
  ap.add_argument("--doc_max_len", type=int, default=256, help="as the store was exported (eval_minilm_cpu.gin: 256)")
  ap.add_argument("--center", action="store_true",
                  help="also build the stored index's settings over the mean-removed tokens and print its rows")
  ap.add_argument("--builds", type=int, default=0,
                  help="rebuild the stored settings this many times (and as many centered builds with --center)")
  args = ap.parse_args()

  encoder = models.load_pretrained(args.model, query_max_len=args.query_max_len, doc_max_len=args.doc_max_len)
  corpus, queries, qrels = xeval.load_split(args.dataset, args.split)
  # The evaluation's own check: a store exported by another model or for another corpus is refused.
  store, token_index, _ = xeval.ensure_token_store(encoder, args.dataset, args.store, list(corpus))
  qids = list(queries)
  q, q_mask, _ = xeval.encode_queries(encoder, [tokenization.preprocess_query(queries[i]) for i in qids],
                                      batch_size=32)
  embeddings = np.asarray(store.embeddings)
  mean = embeddings.astype(np.float32).mean(axis=0)
  print(f"{store.num_tokens:,} tokens ({token_index.backend}, {token_index.params.get('num_leaves')} leaves, "
        f"{token_index.params.get('num_leaves_to_search')} searched); |mean token| {np.linalg.norm(mean):.3f}")
  exact_index = index_lib.build_index(embeddings.astype(np.float32), backend="bruteforce")

  def ndcg(ret: xeval.Retrieved) -> float:
    d, s, _ = xeval.score_xtr(ret, q_mask, 100, imputation="kth", constant=0.0, batch_size=32)
    run = metrics.run_from_rankings(xeval.to_rankings(qids, d, s, store.doc_ids, 100, drop_self=False))
    return 100 * metrics.evaluate(qrels, run)[0]["nDCG@10"]

  exact_of = {k: xeval.retrieve_tokens(exact_index, q, q_mask, store.token_doc, k, batch_size=32)
              for k in args.k_primes}
  params = {k: v for k, v in token_index.params.items() if k not in ("num_neighbors", "search_threads")}
  # ScaNN's k-means training samples at random, so two builds with the same settings differ: --builds N rebuilds
  # the stored settings N times (and, with --center, N times over the mean-removed tokens) to show that spread.
  plan = [("stored index", None)]
  plan += [(f"rebuilt #{b + 1}", dict(params, center=False)) for b in range(args.builds)]
  if args.center:
    plan += [(f"centered #{b + 1}", dict(params, center=True)) for b in range(max(args.builds, 1))]
  results: dict[str, list[tuple[float, ...]]] = {}
  print(f"\n{'index':<14} {'k_prime':>7} {'recall':>7} {'|err| mean':>10} {'p99':>7} {'nDCG scann':>10} "
        f"{'+exact scores':>13} {'exact':>7}")
  for label, kwargs in plan:
    idx = token_index if kwargs is None else index_lib.build_index(embeddings, backend="scann", **kwargs)
    for k_prime in args.k_primes:
      approx = xeval.retrieve_tokens(idx, q, q_mask, store.token_doc, k_prime, batch_size=32)
      exact = exact_of[k_prime]
      true = exact_scores_of(q, approx.tokens, embeddings)
      valid = q_mask[:, :, None] & (approx.tokens >= 0)
      err = np.abs(true - approx.scores)[valid]
      rescored = xeval.Retrieved(scores=true, tokens=approx.tokens, docs=approx.docs, seconds=0.0)
      row = (analysis.token_recall(approx.tokens, exact.tokens, q_mask)["mean"], float(err.mean()),
             float(np.quantile(err, 0.99)), ndcg(approx), ndcg(rescored), ndcg(exact))
      results.setdefault(f"{label.split(' #')[0]} k'={k_prime}", []).append(row)
      print(f"{label:<14} {k_prime:>7} {row[0]:>7.3f} {row[1]:>10.4f} {row[2]:>7.4f} {row[3]:>10.1f} {row[4]:>13.1f} "
            f"{row[5]:>7.1f}", flush=True)
    del idx
  if args.builds > 1:
    print("\nmean +- sd over builds: token recall, nDCG@10 (ScaNN scores)")
    for key, rows in results.items():
      if len(rows) > 1:
        r = np.asarray(rows)
        print(f"  {key:<22} recall {r[:, 0].mean():.3f} +- {r[:, 0].std(ddof=1):.3f}   nDCG {r[:, 3].mean():.1f} +- "
              f"{r[:, 3].std(ddof=1):.1f}  ({len(rows)} builds)")


if __name__ == "__main__":
  main()
