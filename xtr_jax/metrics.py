"""Retrieval metrics through ir-measures (pytrec_eval / trec_eval underneath); no metric arithmetic of our own.

The standard BEIR set is nDCG@10, Recall@100, MRR@10 and MAP@100. ir-measures picks the provider per measure:
pytrec_eval for nDCG@10 (`ndcg_cut_10`), R@100 (`recall_100`) and AP@100 (`map_cut_100`); RR@10 goes to its MS MARCO
provider because trec_eval's `recip_rank` has no cutoff. Every judged query is counted: a judged query the run has
no ranking for scores 0 (trec_eval `-c`), so a retriever cannot look better by returning nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import ir_measures

# Display name -> ir-measures measure string.
BEIR_MEASURES: dict[str, str] = {
    "nDCG@10": "nDCG@10",
    "Recall@100": "R@100",
    "MRR@10": "RR@10",
    "MAP@100": "AP@100",
}

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def run_from_rankings(rankings: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, dict[str, float]]:
  """{qid: [(doc_id, score), ...]} -> {qid: {doc_id: score}}; a document listed twice for a query is an error."""
  run: dict[str, dict[str, float]] = {}
  for qid, ranking in rankings.items():
    scores: dict[str, float] = {}
    for doc_id, score in ranking:
      if doc_id in scores:
        raise ValueError(f"query {qid!r}: document {doc_id!r} appears twice in the ranking")
      scores[doc_id] = float(score)
    run[qid] = scores
  return run


def evaluate(qrels: Qrels, run: Run, measures: Mapping[str, str] | None = None
             ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Aggregate and per-query metrics of `run` against `qrels`.

  Args:
    qrels: {query_id: {doc_id: int relevance}} (relevance <= 0 = not relevant, as trec_eval).
    run: {query_id: {doc_id: float score}}; queries absent from qrels are ignored (as trec_eval).
    measures: {display name: ir-measures string}; default `BEIR_MEASURES`.

  Returns:
    (aggregate {name: float mean over all judged queries}, per_query {query_id: {name: float}}).
  """
  measures = dict(BEIR_MEASURES if measures is None else measures)
  if not qrels:
    raise ValueError("qrels are empty: nothing to evaluate")
  parsed = {name: ir_measures.parse_measure(s) for name, s in measures.items()}
  by_measure = {m: name for name, m in parsed.items()}
  qrels_str = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
  run_str = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if str(q) in qrels_str}
  for qid, docs in run_str.items():
    for doc_id, score in docs.items():
      if not math.isfinite(score):
        raise ValueError(f"run: query {qid!r}, document {doc_id!r} has a non-finite score {score}")
  evaluator = ir_measures.evaluator(list(parsed.values()), qrels_str)
  per_query: dict[str, dict[str, float]] = {qid: {} for qid in qrels_str}
  for metric in evaluator.iter_calc(run_str):
    per_query[metric.query_id][by_measure[metric.measure]] = float(metric.value)
  # The base evaluator reports 0 for judged queries the run lacks; check that nothing fell through anyway.
  for qid, values in per_query.items():
    missing = set(measures) - set(values)
    if missing:
      raise RuntimeError(f"ir-measures returned no {sorted(missing)} for query {qid!r}")
  aggregate = {name: float(v) for name, v in
               ((by_measure[m], v) for m, v in evaluator.calc_aggregate(run_str).items())}
  return {name: aggregate[name] for name in measures}, per_query


def write_per_query(path: str, per_query: Mapping[str, Mapping[str, float]], names: Sequence[str]) -> None:
  """TSV `query_id<TAB>name1<TAB>...`, one row per query, sorted by query id."""
  with open(path, "w", encoding="utf-8") as f:
    f.write("\t".join(["query_id", *names]) + "\n")
    for qid in sorted(per_query):
      f.write("\t".join([qid, *(f"{per_query[qid][n]:.6f}" for n in names)]) + "\n")
