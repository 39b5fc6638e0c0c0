"""`python -m xtr_jax.eval`: BEIR evaluation of an XTR model -- run files, metrics, timings, ablations, analyses.

    python -m xtr_jax.eval --gin_file=runs/eval_beir.gin --gin.MODEL="'/path/to/model'" \
        --gin.DATASET="'../shared/data/beir/scifact'" --gin.SPLIT="'test'" --gin.OUTPUT_DIR="'/tmp/eval'"

Pipeline per dataset: load the BEIR split (validated); export the corpus into token shards and build the token index
under `index_root/<dataset>` unless a matching one is already there (an index of another model or corpus is
refused); encode the queries; retrieve k' tokens per query token; score; write a TREC run file, per-query metrics
and `metrics.json` (nDCG@10, Recall@100, MRR@10, MAP@100 through ir-measures / pytrec_eval).

Scoring modes (`xtr_eval.scoring`, one or several):
  xtr      ScaNN token retrieval + XTR scoring with the missing-similarity imputation(s) `xtr_eval.imputation`
           (kth | zero | none | constant: the paper's Table 5 ablation)
  colbert  the same retrieved candidates rescored ColBERT-style with ALL their token embeddings
  exact    brute-force (exact) token retrieval over every token + XTR scoring: ground truth for the index
`token_top_k` (k') may be a list: a k' sweep, written as `sweep.tsv` and `sweep.png`. `analysis=True` adds the
gold-token / lexical-token ratios and the cost analysis (which also times ColBERT rescoring on the same candidates).
A BM25 (bm25s) baseline runs on the same split for context. All datasets end up in one printed summary table.

Timings are wall-clock per query after one untimed warm-up batch per stage (so jit compilation is excluded);
the index export/build is reported separately.

Output layout: OUTPUT_DIR/{summary.tsv, summary.json, config.gin, <dataset>/{metrics.json, sweep.*,
runs/<system>.trec, per_query/<system>.tsv}}; the default index_root is OUTPUT_DIR/index, which is kept by
`--overwrite` (it is checked against the model and corpus before reuse) while every previous result is removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np
from tqdm import tqdm

from xtr_jax import analysis, export, gin_utils, metrics, models, runfiles, scoring, tokenization
from xtr_jax import bm25 as bm25_lib
from xtr_jax import index as index_lib  # registers the gin configurable xtr_build_index

SCORING_MODES = ("xtr", "colbert", "exact")
INDEX_DIRNAME = "index"
SUMMARY_COLUMNS = ("nDCG@10", "Recall@100", "MRR@10", "MAP@100")


# ----------------------------------------------------------------------------------------------------- inputs


def dataset_name(root: str) -> str:
  return os.path.basename(os.path.normpath(root))


def check_split(root: str, split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
  """Reads and checks a split's queries and qrels (not the corpus) -> (queries {qid: text} of judged queries,
  qrels {qid: {doc_id: rel}} restricted to queries that exist).

  Unknown split / missing qrels file / qrels that name no known query raise with the file and what was found.
  """
  from xtr_jax.data import beir  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(root):
    raise FileNotFoundError(f"BEIR dataset directory {root!r} does not exist")
  qrels_dir = os.path.join(root, "qrels")
  path = beir.qrels_path(root, split)
  if not os.path.isfile(path):
    if not os.path.isdir(qrels_dir):
      raise FileNotFoundError(f"{root}: no qrels/ directory, so split {split!r} cannot be evaluated "
                              f"(expected {path})")
    available = sorted(f[:-4] for f in os.listdir(qrels_dir) if f.endswith(".tsv"))
    raise FileNotFoundError(f"{root}: unknown split {split!r}: {path} does not exist (available splits: "
                            f"{', '.join(available) or 'none'})")
  for name in ("corpus.jsonl", "queries.jsonl"):
    if not os.path.isfile(os.path.join(root, name)):
      raise FileNotFoundError(f"{root}: no {name} (a BEIR dataset has corpus.jsonl, queries.jsonl, qrels/)")
  all_queries = beir.load_queries(os.path.join(root, "queries.jsonl"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the counts are checked and reported below
    relevance = beir.load_qrels(root, split, query_ids=all_queries).relevance
  if not relevance:
    raise ValueError(f"{path}: no judgments (the file has no data rows)")
  known = {q: docs for q, docs in relevance.items() if q in all_queries}
  if not known:
    example = next(iter(relevance))
    raise ValueError(f"{path}: none of its {len(relevance)} query ids is in {root}/queries.jsonl (e.g. "
                     f"{example!r}); the qrels belong to another dataset or the ids are mangled")
  if len(known) < len(relevance):
    logging.warning("%s: %d of %d judged queries are not in queries.jsonl and are left out", path,
                    len(relevance) - len(known), len(relevance))
  if not any(r > 0 for docs in known.values() for r in docs.values()):
    raise ValueError(f"{path}: no judgment has relevance > 0; every metric would be 0")
  return {q: all_queries[q] for q in known}, known


def load_split(root: str, split: str):
  """(corpus {doc_id: BeirDoc}, queries {qid: text}, qrels {qid: {doc_id: rel}}) of a checked split."""
  from xtr_jax.data import beir  # pylint: disable=g-import-not-at-top
  queries, qrels = check_split(root, split)
  corpus = beir.load_corpus(os.path.join(root, "corpus.jsonl"))
  unknown_docs = sum(d not in corpus for docs in qrels.values() for d in docs)
  if unknown_docs:  # kept, as official BEIR scoring does: they lower recall as they would for any system
    logging.warning("%s: %d qrels rows name documents not in the corpus", beir.qrels_path(root, split),
                    unknown_docs)
  return corpus, queries, qrels


# ----------------------------------------------------------------------------------------------- output dir


def prepare_output_dir(output_dir: str, *, overwrite: bool, keep: Sequence[str] = (INDEX_DIRNAME,)) -> None:
  """Refuses an OUTPUT_DIR holding a previous evaluation unless `overwrite`, which then deletes all of it but `keep`.

  Results of two runs are never mixed: either the directory has no results or they are all removed first.
  """
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise FileExistsError(f"OUTPUT_DIR {output_dir!r} exists and is not a directory")
  if os.path.isdir(output_dir):
    previous = sorted(e for e in os.listdir(output_dir) if e not in keep)
    if previous:
      if not overwrite:
        raise FileExistsError(
            f"OUTPUT_DIR {output_dir!r} already holds a previous evaluation ({', '.join(previous[:6])}"
            f"{', ...' if len(previous) > 6 else ''}); pass --overwrite (gin: xtr_eval.overwrite=True) to replace it, "
            "or choose a new OUTPUT_DIR")
      for entry in previous:
        path = os.path.join(output_dir, entry)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
  os.makedirs(output_dir, exist_ok=True)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- index


def ensure_token_store(encoder, dataset_root: str, store_dir: str, corpus_ids: Sequence[str], *,
                       index_backend: str = "scann", dtype: str = "float16", batch_size: int = 32,
                       rebuild: bool = False):
  """Reuses the exported corpus + token index in `store_dir` when it matches; otherwise exports and builds it.

  A store written by another model (identity differs) or for another corpus (document ids differ) is refused with
  ValueError unless `rebuild`, which re-exports it; so is a token index built with other `xtr_build_index` settings
  than the configured ones (`index.build_settings_mismatch`), which `rebuild` rebuilds from the kept export.
  Returns (TokenStore, TokenIndex, info dict with timings).
  """
  want = export.document_identity(json.loads(json.dumps(encoder.identity())))
  manifest_path = os.path.join(store_dir, export.MANIFEST)
  info: dict[str, Any] = {"store_dir": store_dir, "reused": False, "export_s": 0.0, "index_build_s": 0.0}
  if os.path.isfile(manifest_path):
    store = export.TokenStore.open(store_dir)
    problem = None
    stored = export.document_identity(store.identity)
    if stored != want:
      diff = sorted(k for k in set(want) | set(stored) if want.get(k) != stored.get(k))
      stored_sha, this_sha = (str(x.get("model_sha256"))[:12] for x in (stored, want))
      problem = (f"was built by another model (differs in {diff}; stored model_sha256 {stored_sha}..., "
                 f"this model {this_sha}...)")
    elif list(store.doc_ids) != list(corpus_ids):
      problem = f"holds another corpus ({len(store.doc_ids)} documents vs {len(corpus_ids)} in {dataset_root})"
    if problem:
      if not rebuild:
        raise ValueError(f"token index {store_dir!r} {problem}; refusing to use it. Delete it, point "
                         "xtr_eval.index_root elsewhere, or set xtr_eval.rebuild_index=True")
      logging.warning("rebuilding %s: it %s", store_dir, problem)
      shutil.rmtree(store_dir)
    else:
      info["reused"] = True
  if not info["reused"]:
    t0 = time.perf_counter()
    export.export_corpus(encoder, dataset_root, store_dir, dtype=dtype, batch_size=batch_size)
    info["export_s"] = time.perf_counter() - t0
    store = export.TokenStore.open(store_dir)
    if list(store.doc_ids) != list(corpus_ids):
      raise RuntimeError(f"{store_dir}: the export's document ids differ from the loaded corpus")
  idx_dir = os.path.join(store_dir, export.INDEX_SUBDIR)
  expect = dict(want, num_docs=store.manifest["num_docs"], num_tokens=store.num_tokens)
  token_index = None
  if os.path.isfile(os.path.join(idx_dir, index_lib.INDEX_MANIFEST)):
    token_index = index_lib.load_index(idx_dir, expect_identity=expect)
    if token_index.backend != index_backend:
      raise ValueError(f"token index {idx_dir!r} is a {token_index.backend} index but index_backend="
                       f"{index_backend!r} was asked; delete it or use another index_root")
    what = _index_settings_mismatch(idx_dir, token_index.backend, token_index.params, token_index.num_tokens,
                                    token_index.dim, rebuild=rebuild)
    if what:
      logging.warning("rebuilding the token index in %s: %s", idx_dir, what)
      shutil.rmtree(idx_dir)
      token_index = None
  if token_index is None:
    t0 = time.perf_counter()
    export.build_store_index(store_dir, backend=index_backend)
    info["index_build_s"] = time.perf_counter() - t0
    token_index = index_lib.load_index(idx_dir, expect_identity=expect)
  info.update(num_docs=int(store.manifest["num_docs"]), num_tokens=int(store.num_tokens),
              backend=token_index.backend, params=dict(token_index.params), dtype=store.manifest["dtype"])
  return store, token_index, info


def _index_settings_mismatch(idx_dir: str, backend: str, params: Mapping[str, Any], num_tokens: int, dim: int, *,
                             rebuild: bool) -> str:
  """An index built with other `xtr_build_index` settings than the configured ones is never used silently: raises
  ValueError naming each differing setting, or (rebuild) returns them as text ('' when none differ)."""
  mismatch = index_lib.build_settings_mismatch(backend, params, num_tokens, dim)
  what = ", ".join(f"{k}: index {have!r}, configured {want!r}" for k, (have, want) in mismatch.items())
  if what and not rebuild:
    raise ValueError(f"token index {idx_dir!r} was built with other settings ({what}); refusing to use it. Set "
                     "xtr_eval.rebuild_index=True to rebuild the index (the export is kept), point "
                     "xtr_eval.index_root elsewhere, or (leaves searched only) use xtr_eval.leaves_to_search")
  return what


# ---------------------------------------------------------------------------------------------- retrieval


@dataclasses.dataclass
class Retrieved:
  """Token hits of every query: scores f32 [Nq, n, k'], tokens int32 [Nq, n, k'] (global token row, -1 none),
  docs int32 [Nq, n, k'] (document index, -1 none), and the wall-clock seconds the search took."""
  scores: np.ndarray
  tokens: np.ndarray
  docs: np.ndarray
  seconds: float


def _batches(n: int, size: int) -> list[slice]:
  return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def encode_queries(encoder, texts: Sequence[str], *, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(q f32 [Nq, n, D], q_mask bool [Nq, n], seconds); one warm-up batch first so compilation is not timed."""
  spans = _batches(len(texts), batch_size)
  encoder.encode_queries(list(texts[spans[0]]), batch_size=batch_size)  # warm-up (compile)
  outs, masks = [], []
  t0 = time.perf_counter()
  for span in tqdm(spans, desc="encode queries", unit="batch", leave=False):
    q, m = encoder.encode_queries(list(texts[span]), batch_size=batch_size)
    outs.append(q)
    masks.append(m)
  return np.concatenate(outs), np.concatenate(masks), time.perf_counter() - t0


def retrieve_tokens(token_index, q: np.ndarray, q_mask: np.ndarray, token_doc: np.ndarray, k_prime: int, *,
                    batch_size: int, desc: str = "token retrieval", leaves_to_search: int | None = None
                    ) -> Retrieved:
  """k' nearest document tokens of every valid query token (q f32 [Nq, n, D], q_mask bool [Nq, n]); a ScaNN index
  searches `leaves_to_search` leaves (FAISS: inverted lists) instead of its built-in number when given."""
  nq, n, _ = q.shape
  scores = np.zeros((nq, n, k_prime), np.float32)
  tokens = np.full((nq, n, k_prime), -1, np.int32)
  spans = _batches(nq, batch_size)
  if q_mask[spans[0]].any():  # warm-up (jit compilation of the brute-force index, caches)
    token_index.search_padded(q[spans[0]], q_mask[spans[0]], k_prime, leaves_to_search=leaves_to_search)
  t0 = time.perf_counter()
  for span in tqdm(spans, desc=f"{desc} k'={k_prime}", unit="batch", leave=False):
    if not q_mask[span].any():
      continue
    scores[span], tokens[span] = token_index.search_padded(q[span], q_mask[span], k_prime,
                                                           leaves_to_search=leaves_to_search, missing_score=0.0)
  seconds = time.perf_counter() - t0
  docs = index_lib.lookup_tokens(token_doc, tokens).astype(np.int32, copy=False)
  return Retrieved(scores=scores, tokens=tokens, docs=docs, seconds=seconds)


def _pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
  if a.shape[0] == rows:
    return a
  pad = np.full((rows - a.shape[0],) + a.shape[1:], fill, a.dtype)
  return np.concatenate([a, pad])


def score_xtr(ret: Retrieved, q_mask: np.ndarray, top_k: int, *, imputation: str, constant: float,
              batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """XTR scoring in fixed-size query batches -> (doc_idx int32 [Nq, top_k], scores f32 [Nq, top_k], seconds)."""
  nq = q_mask.shape[0]
  spans = _batches(nq, batch_size)

  def run(span):
    b = batch_size
    out = scoring.xtr_score(_pad_rows(ret.scores[span], b, 0.0), _pad_rows(ret.docs[span], b, -1),
                            _pad_rows(q_mask[span], b, False), top_k, imputation=imputation, constant=constant)
    d, s = (np.asarray(x) for x in out)  # blocks until computed
    return d[:span.stop - span.start], s[:span.stop - span.start]

  run(spans[0])  # warm-up (compile)
  docs, scores = [], []
  t0 = time.perf_counter()
  for span in tqdm(spans, desc=f"xtr scoring ({imputation})", unit="batch", leave=False):
    d, s = run(span)
    docs.append(d)
    scores.append(s)
  return np.concatenate(docs), np.concatenate(scores), time.perf_counter() - t0


def candidate_docs(ret: Retrieved, q_mask: np.ndarray) -> np.ndarray:
  """Distinct retrieved documents per query, int32 [Nq, C] padded with -1 (C = the largest count)."""
  per_query = [np.unique(ret.docs[i][(ret.docs[i] >= 0) & q_mask[i][:, None]]) for i in range(len(q_mask))]
  width = max([len(c) for c in per_query] + [1])
  out = np.full((len(per_query), width), -1, np.int32)
  for i, c in enumerate(per_query):
    out[i, :len(c)] = c
  return out


def score_colbert(q: np.ndarray, q_mask: np.ndarray, cands: np.ndarray, embeddings, doc_offsets: np.ndarray,
                  top_k: int, *, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
  """ColBERT rescoring of the candidates with all their tokens -> (doc_idx [Nq, top_k'], scores, seconds)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  embeddings = jnp.asarray(embeddings)  # once, untimed: the stored index is already resident for ColBERT
  spans = _batches(len(q), batch_size)

  def run(span):
    b = batch_size
    d, s = scoring.colbert_rescore(_pad_rows(q[span], b, 0.0), _pad_rows(q_mask[span], b, False),
                                   _pad_rows(cands[span], b, -1), embeddings, doc_offsets, top_k)
    d, s = np.asarray(d), np.asarray(s)
    return d[:span.stop - span.start], s[:span.stop - span.start]

  run(spans[0])
  docs, scores = [], []
  t0 = time.perf_counter()
  for span in tqdm(spans, desc="colbert rescoring", unit="batch", leave=False):
    d, s = run(span)
    docs.append(d)
    scores.append(s)
  return np.concatenate(docs), np.concatenate(scores), time.perf_counter() - t0


def to_rankings(qids: Sequence[str], doc_idx: np.ndarray, scores: np.ndarray, doc_ids: Sequence[str],
                top_k: int, *, drop_self: bool) -> dict[str, list[tuple[str, float]]]:
  """Index results (-1 padded) -> {qid: [(doc_id, score), ...]} of at most top_k, optionally without self-hits."""
  rankings = {}
  for row, qid in enumerate(qids):
    ranking = [(doc_ids[int(d)], float(s)) for d, s in zip(doc_idx[row], scores[row]) if d >= 0]
    rankings[qid] = ranking
  if drop_self:
    rankings = drop_self_hits(rankings)
  return {q: r[:top_k] for q, r in rankings.items()}


def drop_self_hits(rankings: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, list[tuple[str, float]]]:
  """Removes a query's own id from its ranking (ArguAna / Quora, where queries are corpus documents), as BEIR's
  `ignore_identical_ids`. Retrieve one extra document per query so that top_k are left."""
  return {q: [(d, s) for d, s in r if d != q] for q, r in rankings.items()}


# ---------------------------------------------------------------------------------------------- reporting


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> str:
  """nDCG@10 and ms/query vs k' (log axis), one line per system family; rows need system, k_prime, nDCG@10, ms."""
  # An explicit Figure with an Agg canvas: no pyplot state and no global backend switch (which would break inline
  # plots in a notebook that calls this).
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  ax1, ax2 = fig.subplots(1, 2)
  families = sorted({r["family"] for r in rows})
  for fam in families:
    pts = sorted((r["k_prime"], r["nDCG@10"], r["ms_per_query"]) for r in rows if r["family"] == fam)
    ks = [p[0] for p in pts]
    ax1.plot(ks, [p[1] for p in pts], marker="o", label=fam)
    ax2.plot(ks, [p[2] for p in pts], marker="o", label=fam)
  for ax, label in ((ax1, "nDCG@10"), (ax2, "ms / query")):
    ax.set_xscale("log")
    ax.set_xlabel("k' (tokens retrieved per query token)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """Fixed-width table: dataset, system, k', the four metrics (x100), ms/query."""
  header = ["dataset", "system", "k'", *SUMMARY_COLUMNS, "ms/query"]
  body = []
  for r in rows:
    body.append([r["dataset"], r["system"], str(r.get("k_prime") or "-"),
                 *(f"{100 * r[c]:.1f}" for c in SUMMARY_COLUMNS), f"{r['ms_per_query']:.1f}"])
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

  def fmt(cells):
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


# ---------------------------------------------------------------------------------------------- one dataset


def _system_name(mode: str, imputation: str | None, k_prime: int) -> str:
  return f"{mode}-{imputation}-k{k_prime}" if imputation else f"{mode}-k{k_prime}"


def evaluate_dataset(encoder, root: str, split: str, out_dir: str, *, index_dir: str, modes: Sequence[str],
                     imputations: Sequence[str], constant: float, k_primes: Sequence[int], top_k: int,
                     run_analysis: bool, drop_self: bool, run_bm25: bool, query_batch_size: int,
                     index_backend: str, export_dtype: str, doc_batch_size: int, rebuild_index: bool,
                     max_queries: int | None, leaves_to_search: int | None = None) -> dict[str, Any]:
  """Evaluates every system on one BEIR split; writes out_dir/{metrics.json, runs/, per_query/, sweep.*}."""
  name = dataset_name(root)
  corpus, queries, qrels = load_split(root, split)
  qids = list(queries)
  if max_queries is not None:
    qids = qids[:max_queries]
    qrels = {q: qrels[q] for q in qids}
  texts = np.array([tokenization.preprocess_query(queries[q]) for q in qids], dtype=object)
  corpus_ids = list(corpus)
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  os.makedirs(os.path.join(out_dir, "per_query"), exist_ok=True)
  print(f"[{name}/{split}] {len(corpus_ids)} documents, {len(qids)} judged queries", flush=True)

  store, token_index, index_info = ensure_token_store(
      encoder, root, index_dir, corpus_ids, index_backend=index_backend, dtype=export_dtype,
      batch_size=doc_batch_size, rebuild=rebuild_index)
  doc_lengths = np.diff(store.doc_offsets)
  q, q_mask, encode_s = encode_queries(encoder, list(texts), batch_size=query_batch_size)
  nq = len(qids)
  k_ret = top_k + 1 if drop_self else top_k
  result: dict[str, Any] = {
      "dataset": name, "root": os.path.abspath(root), "split": split, "num_queries": nq,
      "num_docs": len(corpus_ids), "model_identity": encoder.identity(), "index": index_info, "top_k": top_k,
      "leaves_to_search": leaves_to_search or index_info["params"].get("num_leaves_to_search"),
      "drop_self_hits": drop_self, "query_encoding_ms_per_query": 1000 * encode_s / nq, "systems": {},
      "analysis": {}, "notes": "ms per query = wall clock after an untimed warm-up batch; machine may be shared"}

  def record(system: str, rankings, timing: dict[str, float], family: str, k_prime: int | None):
    run_path = os.path.join(out_dir, "runs", f"{system}.trec")
    runfiles.write_run(run_path, rankings, tag=system)
    agg, per_query = metrics.evaluate(qrels, metrics.run_from_rankings(rankings))
    metrics.write_per_query(os.path.join(out_dir, "per_query", f"{system}.tsv"), per_query, list(agg))
    timing = dict(timing, total_ms_per_query=sum(v for k, v in timing.items() if k.endswith("_ms_per_query")))
    result["systems"][system] = {"family": family, "k_prime": k_prime, "metrics": agg, "timing": timing,
                                 "run_file": os.path.relpath(run_path, out_dir)}
    return agg

  exact_index = None
  if "exact" in modes:
    exact_index = index_lib.build_index(np.asarray(store.embeddings), backend="bruteforce")
  enc_ms = 1000 * encode_s / nq
  for k_prime in k_primes:
    ret = retrieve_tokens(token_index, q, q_mask, store.token_doc, k_prime, batch_size=query_batch_size,
                          leaves_to_search=leaves_to_search)
    ret_ms = 1000 * ret.seconds / nq
    if "xtr" in modes:
      for imp in imputations:
        d, s, sec = score_xtr(ret, q_mask, k_ret, imputation=imp, constant=constant, batch_size=query_batch_size)
        record(_system_name("xtr", imp, k_prime),
               to_rankings(qids, d, s, store.doc_ids, top_k, drop_self=drop_self),
               {"query_encoding_ms_per_query": enc_ms, "token_retrieval_ms_per_query": ret_ms,
                "scoring_ms_per_query": 1000 * sec / nq}, f"xtr-{imp}", k_prime)
    colbert_s = None
    if "colbert" in modes or run_analysis:
      cands = candidate_docs(ret, q_mask)
      d, s, colbert_s = score_colbert(q, q_mask, cands, store.embeddings, store.doc_offsets, k_ret,
                                      batch_size=query_batch_size)
      if "colbert" in modes:
        record(_system_name("colbert", None, k_prime),
               to_rankings(qids, d, s, store.doc_ids, top_k, drop_self=drop_self),
               {"query_encoding_ms_per_query": enc_ms, "token_retrieval_ms_per_query": ret_ms,
                "scoring_ms_per_query": 1000 * colbert_s / nq}, "colbert", k_prime)
    ex = None
    if exact_index is not None:
      ex = retrieve_tokens(exact_index, q, q_mask, store.token_doc, k_prime, batch_size=query_batch_size,
                           desc="exact token retrieval")
      for imp in imputations:
        d, s, sec = score_xtr(ex, q_mask, k_ret, imputation=imp, constant=constant, batch_size=query_batch_size)
        record(_system_name("exact", imp, k_prime),
               to_rankings(qids, d, s, store.doc_ids, top_k, drop_self=drop_self),
               {"query_encoding_ms_per_query": enc_ms, "token_retrieval_ms_per_query": 1000 * ex.seconds / nq,
                "scoring_ms_per_query": 1000 * sec / nq}, f"exact-{imp}", k_prime)
    if run_analysis:
      result["analysis"][str(k_prime)] = token_analyses(
          ret, q_mask, encoder.model.tokenize_queries(list(texts))[0], store, qids, qrels, doc_lengths,
          k_prime=k_prime, imputations=imputations, constant=constant, colbert_seconds=colbert_s,
          top_k=k_ret, batch_size=query_batch_size, exact=ex)

  if run_bm25:
    rankings, t = bm25_lib.bm25_rankings(
        corpus_ids, [tokenization.preprocess_document(corpus[i].title, corpus[i].text) for i in corpus_ids],
        {qid: queries[qid] for qid in qids}, k=k_ret, show_progress=True)
    if drop_self:
      rankings = drop_self_hits(rankings)
    rankings = {qq: r[:top_k] for qq, r in rankings.items()}
    record("bm25", rankings, {"retrieval_ms_per_query": 1000 * t["retrieve_s"] / nq,
                              "index_build_s": t["index_s"]}, "bm25", None)

  sweep_rows = [dict(system=s, family=v["family"], k_prime=v["k_prime"], **v["metrics"],
                     ms_per_query=v["timing"]["total_ms_per_query"])
                for s, v in result["systems"].items() if v["k_prime"] is not None]
  if len(k_primes) > 1:
    with open(os.path.join(out_dir, "sweep.tsv"), "w", encoding="utf-8") as f:
      f.write("\t".join(["system", "k_prime", *SUMMARY_COLUMNS, "ms_per_query"]) + "\n")
      for r in sweep_rows:
        f.write("\t".join([r["system"], str(r["k_prime"]), *(f"{r[c]:.6f}" for c in SUMMARY_COLUMNS),
                           f"{r['ms_per_query']:.3f}"]) + "\n")
    result["sweep_plot"] = plot_sweep(sweep_rows, os.path.join(out_dir, "sweep.png"), f"{name} ({split})")
  _write_json(os.path.join(out_dir, "metrics.json"), result)
  return result


def token_analyses(ret: Retrieved, q_mask: np.ndarray, q_ids: np.ndarray, store, qids: Sequence[str],
                   qrels: Mapping[str, Mapping[str, int]], doc_lengths: np.ndarray, *, k_prime: int,
                   imputations: Sequence[str], constant: float, colbert_seconds: float | None, top_k: int,
                   batch_size: int, exact: Retrieved | None = None) -> dict[str, Any]:
  """Gold-token and lexical-token ratios and the cost analysis of one k' (see `xtr_jax.analysis`); with `exact`
  (the exact search's hits for the same queries and k'), the token recall of `ret` against it."""
  index_of = {d: i for i, d in enumerate(store.doc_ids)}
  relevant = [{index_of[d] for d, r in qrels[q].items() if r > 0 and d in index_of} for q in qids]
  hit_vocab = np.where(ret.tokens >= 0, store.token_ids[np.maximum(ret.tokens, 0)], -1)
  gold = analysis.gold_token_ratio(ret.docs, q_mask, relevant)
  lexical = analysis.lexical_token_ratio(ret.docs, hit_vocab, q_ids, q_mask)
  lexical_same = analysis.lexical_token_ratio(ret.docs, hit_vocab, q_ids, q_mask, same_position=True)
  cost = analysis.cost_analysis(ret.docs, q_mask, doc_lengths, token_dim=int(store.embeddings.shape[1]),
                                k_prime=k_prime, embedding_bytes=int(np.dtype(store.embeddings.dtype).itemsize))
  imp = imputations[0]
  _, _, xtr_s = score_xtr(ret, q_mask, top_k, imputation=imp, constant=constant, batch_size=batch_size)
  nq = len(qids)
  cost.update(xtr_scoring_ms_per_query=1000 * xtr_s / nq, xtr_scoring_imputation=imp,
              colbert_scoring_ms_per_query=1000 * colbert_seconds / nq if colbert_seconds is not None else None)
  if colbert_seconds:
    cost["measured_time_ratio"] = colbert_seconds / max(xtr_s, 1e-12)
  cost["bytes_ratio"] = cost["colbert_bytes_per_query"] / max(cost["xtr_bytes_per_query"], 1e-12)
  return {"gold_token_ratio": gold["mean"], "lexical_token_ratio": lexical["mean"],
          "lexical_token_ratio_same_position": lexical_same["mean"],
          "queries_without_hits": gold["queries_without_hits"], "cost": cost,
          "token_recall_vs_exact": (analysis.token_recall(ret.tokens, exact.tokens, q_mask)["mean"]
                                    if exact is not None else None)}


# ---------------------------------------------------------------------------------------------- entry point


def _as_list(value, kind=str) -> list:
  if isinstance(value, (list, tuple)):
    return [kind(v) for v in value]
  return [kind(value)]


@gin.configurable("xtr_eval")
def evaluate(*, model: str = gin.REQUIRED, dataset: str | Sequence[str] = gin.REQUIRED, split: str = gin.REQUIRED,
             output_dir: str = gin.REQUIRED, overwrite: bool = False, scoring: str | Sequence[str] = "xtr",
             imputation: str | Sequence[str] = "kth", imputation_constant: float = 0.0,
             token_top_k: int | Sequence[int] = 1000, top_k: int = 100, analysis: bool = False,
             drop_self_hits: bool = False, bm25: bool = True, index_root: str | None = None,
             index_backend: str = "scann", rebuild_index: bool = False, export_dtype: str = "float16",
             query_batch_size: int = 32, doc_batch_size: int = 32, query_max_len: int | None = None,
             doc_max_len: int | None = None, max_queries: int | None = None,
             score_special_tokens: bool | None = None, leaves_to_search: int | None = None) -> dict[str, Any]:
  """Evaluates `model` on one or more BEIR datasets; returns {"datasets": [...], "summary": [...]}.

  Args:
    model: xtr_jax model dir or Hugging Face XTR / T5 / BERT dir (`xtr_jax.load_pretrained`).
    dataset: BEIR dataset directory, or a list of them (one summary table for all).
    split: qrels split (`qrels/<split>.tsv`).
    output_dir: results directory; a previous evaluation there is refused unless `overwrite`.
    scoring: "xtr", "colbert", "exact" or a list of them.
    imputation: XTR missing-similarity imputation(s): "kth", "zero", "none", "constant" (value
      `imputation_constant`).
    token_top_k: k' (tokens retrieved per query token), or a list for a k' sweep (table + PNG).
    top_k: documents ranked per query (the run file depth).
    analysis: gold-token / lexical-token ratios and the cost analysis per k'.
    drop_self_hits: remove a query's own id from its ranking (ArguAna-style datasets).
    bm25: also evaluate a bm25s baseline.
    index_root: where exported token stores + indexes live, one subdirectory per dataset (default
      OUTPUT_DIR/index, kept across --overwrite and reused when it matches model and corpus).
    index_backend: "scann" (paper setting), "faiss" (IVF + PQ fast-scan, `faiss_index`) or "bruteforce"; index
      parameters come from gin `xtr_build_index.*`.
    rebuild_index: re-export an index that belongs to another model / corpus, and rebuild a token index built with
      other `xtr_build_index` settings than the configured ones, instead of refusing them.
    max_queries: evaluate only the first N judged queries (smoke runs).
    score_special_tokens: override the model's setting (None = as saved; see `models.XTRModel`), e.g. False to
      evaluate an untrained model the way a model trained without scoring special tokens is evaluated.
    leaves_to_search: ScaNN leaves (FAISS inverted lists) searched per query token (None = the index's
      `num_leaves_to_search`, the notebook's 100): a search-time setting, the index is not rebuilt. With `scoring`
      including "exact" and `analysis`, the token recall against exact search shows what it buys.
  """
  modes = _as_list(scoring)
  for m in modes:
    if m not in SCORING_MODES:
      raise ValueError(f"xtr_eval.scoring: unknown mode {m!r}; expected one of {SCORING_MODES}")
  imputations = _as_list(imputation)
  for imp in imputations:
    if imp not in scoring_lib_imputations():
      raise ValueError(f"xtr_eval.imputation: unknown {imp!r}; expected one of {scoring_lib_imputations()}")
  if leaves_to_search is not None and (index_backend not in ("scann", "faiss") or leaves_to_search < 1):
    raise ValueError(f"xtr_eval.leaves_to_search={leaves_to_search}: needs index_backend 'scann' or 'faiss' and a "
                     f"value >= 1 (index_backend={index_backend!r})")
  k_primes = _as_list(token_top_k, int)
  if any(k < 1 for k in k_primes) or top_k < 1:
    raise ValueError(f"token_top_k and top_k must be >= 1, got {k_primes} and {top_k}")
  roots = _as_list(dataset)
  names = [dataset_name(r) for r in roots]
  if len(set(names)) != len(names):
    raise ValueError(f"datasets must have distinct directory names, got {names}")
  for root in roots:  # bad dataset input fails before any model loading or output is written
    check_split(root, split)
  index_root = index_root or os.path.join(output_dir, INDEX_DIRNAME)
  for name in names:  # ... and so does an index built with other settings (its manifest only is read here)
    idx_dir = os.path.join(index_root, name, export.INDEX_SUBDIR)
    if os.path.isfile(os.path.join(idx_dir, index_lib.INDEX_MANIFEST)):
      manifest = index_lib.read_manifest(idx_dir)
      _index_settings_mismatch(idx_dir, manifest["backend"], manifest["params"], manifest["num_tokens"],
                               manifest["dim"], rebuild=rebuild_index)
  prepare_output_dir(output_dir, overwrite=overwrite)

  gin_utils.write_operative_config(output_dir)
  encoder = models.load_pretrained(model, query_max_len=query_max_len, doc_max_len=doc_max_len,
                                   score_special_tokens=score_special_tokens)
  datasets, summary = [], []
  for root, name in zip(roots, names):
    res = evaluate_dataset(
        encoder, root, split, os.path.join(output_dir, name), index_dir=os.path.join(index_root, name),
        modes=modes, imputations=imputations, constant=imputation_constant, k_primes=k_primes, top_k=top_k,
        run_analysis=analysis, drop_self=drop_self_hits, run_bm25=bm25, query_batch_size=query_batch_size,
        index_backend=index_backend, export_dtype=export_dtype, doc_batch_size=doc_batch_size,
        rebuild_index=rebuild_index, max_queries=max_queries,
        leaves_to_search=leaves_to_search)
    datasets.append(res)
    for system, v in res["systems"].items():
      summary.append({"dataset": name, "system": system, "k_prime": v["k_prime"], **v["metrics"],
                      "ms_per_query": v["timing"]["total_ms_per_query"]})
    for kp, a in res["analysis"].items():
      c = a["cost"]
      print(f"[{name}] k'={kp}: gold-token ratio {a['gold_token_ratio']:.3f}, lexical-token ratio "
            f"{a['lexical_token_ratio']:.3f}; n={c['n_bar']:.1f} m={c['m_bar']:.1f} r={c['r_bar']:.2f}; "
            f"ops ColBERT/XTR {c['op_ratio']:.0f}x, bytes {c['bytes_ratio']:.0f}x, measured time "
            f"{c.get('measured_time_ratio', float('nan')):.1f}x")
  table = format_table(summary)
  with open(os.path.join(output_dir, "summary.tsv"), "w", encoding="utf-8") as f:
    f.write("\t".join(["dataset", "system", "k_prime", *SUMMARY_COLUMNS, "ms_per_query"]) + "\n")
    for r in summary:
      f.write("\t".join([r["dataset"], r["system"], str(r["k_prime"] or ""), *(f"{r[c]:.6f}" for c in SUMMARY_COLUMNS),
                         f"{r['ms_per_query']:.3f}"]) + "\n")
  _write_json(os.path.join(output_dir, "summary.json"), {"model": model, "split": split, "rows": summary})
  print(f"\n{split} split, metrics x100 (ir-measures / pytrec_eval); ms/query wall clock, shared CPU\n{table}",
        flush=True)
  return {"datasets": datasets, "summary": summary, "table": table}


def scoring_lib_imputations() -> tuple[str, ...]:
  return scoring.IMPUTATIONS


_FLAG_BINDINGS = {"--overwrite": "--gin.xtr_eval.overwrite=True", "--analysis": "--gin.xtr_eval.analysis=True",
                  "--drop_self_hits": "--gin.xtr_eval.drop_self_hits=True"}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """`--overwrite`, `--analysis`, `--drop_self_hits` are shorthands for the xtr_eval gin bindings."""
  argv = list(sys.argv[1:] if argv is None else argv)
  return gin_utils.run(evaluate, [_FLAG_BINDINGS.get(a, a) for a in argv])


if __name__ == "__main__":
  main()
