"""Metrics agree with pytrec_eval (called directly) and with hand computation; run files round-trip and validate."""

from __future__ import annotations

import math

import ir_measures
import numpy as np
import pytest
import pytrec_eval

from xtr_jax import metrics, runfiles


def _pytrec_reference(qrels, run):
  """Means over ALL judged queries (a judged query missing from the run counts 0) computed by pytrec_eval itself.

  MRR@10 = trec_eval's recip_rank on the run cut to each query's 10 best scores (recip_rank has no cutoff).
  """
  ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100", "map_cut_100"})
  res = ev.evaluate(run)
  top10 = {q: dict(sorted(d.items(), key=lambda kv: -kv[1])[:10]) for q, d in run.items()}
  rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
  per_query = {}
  for q in qrels:
    per_query[q] = {
        "nDCG@10": res.get(q, {}).get("ndcg_cut_10", 0.0),
        "Recall@100": res.get(q, {}).get("recall_100", 0.0),
        "MAP@100": res.get(q, {}).get("map_cut_100", 0.0),
        "MRR@10": rr.get(q, {}).get("recip_rank", 0.0),
    }
  agg = {name: sum(v[name] for v in per_query.values()) / len(qrels) for name in metrics.BEIR_MEASURES}
  return agg, per_query


def _random_case(seed):
  rng = np.random.default_rng(seed)
  docs = [f"d{i}" for i in range(300)]
  qrels, run = {}, {}
  for q in range(25):
    qid = f"q{q}"
    rel_docs = rng.choice(docs, size=rng.integers(1, 6), replace=False)
    qrels[qid] = {d: int(rng.integers(0, 4)) for d in rel_docs}  # graded, including 0 = judged non-relevant
    if q % 7 == 3:
      continue  # judged but not retrieved
    ranked = rng.choice(docs, size=int(rng.integers(5, 150)), replace=False)
    scores = rng.permutation(len(ranked)).astype(float) + rng.random()  # distinct scores, no ties
    run[qid] = {d: float(s) for d, s in zip(ranked, scores)}
  run["unjudged"] = {"d1": 1.0}  # not in qrels: ignored by trec_eval and by us
  return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_pytrec_eval(seed):
  qrels, run = _random_case(seed)
  agg, per_query = metrics.evaluate(qrels, run)
  ref_agg, ref_per_query = _pytrec_reference(qrels, run)
  assert set(per_query) == set(qrels)
  for name in metrics.BEIR_MEASURES:
    assert agg[name] == pytest.approx(ref_agg[name], abs=1e-9), name
    for q in qrels:
      assert per_query[q][name] == pytest.approx(ref_per_query[q][name], abs=1e-9), (q, name)
  # the fixture exercises non-trivial values, not all zeros or ones
  assert 0.0 < agg["nDCG@10"] < 1.0 and 0.0 < agg["MRR@10"] < 1.0


def test_hand_computed_case():
  qrels = {"a": {"d1": 1, "d3": 1}, "b": {"x": 1}, "c": {"y": 1}}
  run = {"a": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "b": {"w": 2.0, "x": 1.0}}  # "c" retrieved nothing
  agg, per_query = metrics.evaluate(qrels, run)
  ndcg_a = (1.0 + 1.0 / math.log2(4)) / (1.0 + 1.0 / math.log2(3))
  ndcg_b = (1.0 / math.log2(3)) / 1.0
  assert per_query["a"]["nDCG@10"] == pytest.approx(ndcg_a)
  assert per_query["a"]["MAP@100"] == pytest.approx((1.0 + 2.0 / 3.0) / 2.0)
  assert per_query["a"]["MRR@10"] == pytest.approx(1.0)
  assert per_query["b"]["MRR@10"] == pytest.approx(0.5)
  assert per_query["b"]["MAP@100"] == pytest.approx(0.5)
  assert per_query["c"] == {"nDCG@10": 0.0, "Recall@100": 0.0, "MRR@10": 0.0, "MAP@100": 0.0}
  assert agg["nDCG@10"] == pytest.approx((ndcg_a + ndcg_b) / 3.0)
  assert agg["MRR@10"] == pytest.approx(1.5 / 3.0)
  assert agg["Recall@100"] == pytest.approx(2.0 / 3.0)


def test_mrr_cutoff_is_applied():
  # the relevant document sits at rank 11: MRR@10 is 0, while uncut recip_rank would be 1/11
  qrels = {"q": {"d10": 1}}
  run = {"q": {f"d{i}": 100.0 - i for i in range(20)}}
  agg, _ = metrics.evaluate(qrels, run)
  assert agg["MRR@10"] == 0.0
  assert agg["Recall@100"] == 1.0


def test_metric_errors():
  with pytest.raises(ValueError, match="qrels are empty"):
    metrics.evaluate({}, {"q": {"d": 1.0}})
  with pytest.raises(ValueError, match="non-finite"):
    metrics.evaluate({"q": {"d": 1}}, {"q": {"d": float("nan")}})
  with pytest.raises(ValueError, match="appears twice"):
    metrics.run_from_rankings({"q": [("d", 1.0), ("d", 0.5)]})


def test_per_query_tsv(tmp_path):
  path = tmp_path / "pq.tsv"
  metrics.write_per_query(str(path), {"b": {"nDCG@10": 0.5}, "a": {"nDCG@10": 1.0}}, ["nDCG@10"])
  assert path.read_text().splitlines() == ["query_id\tnDCG@10", "a\t1.000000", "b\t0.500000"]


def test_run_file_round_trip_and_external_reader(tmp_path):
  rankings = {"q2": [("d9", 3.5), ("d1", 1.25)], "q1": [("d3", 0.5), ("d4", 0.5), ("d2", -1.0)]}
  path = str(tmp_path / "run.trec")
  assert runfiles.write_run(path, rankings, tag="xtr") == 5
  lines = open(path).read().splitlines()
  assert lines[0] == "q1 Q0 d3 1 0.500000 xtr"
  assert lines[-1] == "q2 Q0 d1 2 1.250000 xtr"
  assert runfiles.read_run(path) == {q: list(r) for q, r in rankings.items()}
  # ir-measures' own TREC reader sees the same run
  external = {(s.query_id, s.doc_id): s.score for s in ir_measures.read_trec_run(path)}
  assert external == {(q, d): s for q, r in rankings.items() for d, s in r}


@pytest.mark.parametrize("body,message", [
    ("q1 Q0 d1 1 0.5\n", "expected 6 fields"),
    ("q1 X d1 1 0.5 t\n", "must be 'Q0'"),
    ("q1 Q0 d1 one 0.5 t\n", "rank"),
    ("q1 Q0 d1 1 high t\n", "score"),
    ("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 3 0.4 t\n", "expected 2"),
    ("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n", "twice"),
])
def test_run_file_reader_errors(tmp_path, body, message):
  path = tmp_path / "bad.trec"
  path.write_text(body)
  with pytest.raises(ValueError, match=message) as err:
    runfiles.read_run(str(path))
  assert "bad.trec:" in str(err.value)


def test_run_file_writer_errors(tmp_path):
  path = str(tmp_path / "r.trec")
  with pytest.raises(ValueError, match="sorted best first"):
    runfiles.write_run(path, {"q": [("a", 1.0), ("b", 2.0)]}, tag="t")
  with pytest.raises(ValueError, match="whitespace"):
    runfiles.write_run(path, {"q": [("a b", 1.0)]}, tag="t")
  with pytest.raises(ValueError, match="tag"):
    runfiles.write_run(path, {"q": [("a", 1.0)]}, tag="my tag")
