"""xtr_jax.report: tables read the evaluation outputs exactly; missing outputs are named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xtr_jax import report


def _write_eval(root, datasets: dict[str, dict[str, float]], analysis: dict | None = None, backend: str | None = None,
                model: str | None = None, summary: bool = True):
  rows = []
  for d, systems in datasets.items():
    os.makedirs(root / d, exist_ok=True)
    k_of = lambda s: int(s.rsplit("k", 1)[1]) if s != "bm25" else None  # noqa: E731
    res = {"systems": {s: {"k_prime": k_of(s), "metrics": {"nDCG@10": v, "Recall@100": v / 2}}
                       for s, v in systems.items()}, "analysis": analysis or {}}
    if backend is not None:
      res["index"] = {"backend": backend}
    if model is not None:
      res["model_identity"] = {"model_sha256": model}
    (root / d / "metrics.json").write_text(json.dumps(res))
    rows += [{"dataset": d, "system": s} for s in systems]
  if summary:
    (root / "summary.json").write_text(json.dumps({"rows": rows}))
  return str(root)


def test_tables_from_eval_outputs(tmp_path):
  a = _write_eval(tmp_path / "a", {"scifact": {"xtr-kth-k100": 0.70, "colbert-k1000": 0.72, "bm25": 0.66,
                                               "xtr-kth-k1000": 0.715}},
                  analysis={"100": {"gold_token_ratio": 0.25, "lexical_token_ratio": 0.5,
                                    "cost": {"candidates_per_query": 321.4}},
                            "1000": {"gold_token_ratio": 0.125, "lexical_token_ratio": 0.375,
                                     "cost": {"candidates_per_query": 900.0}, "token_recall_vs_exact": 0.9125}})
  b = _write_eval(tmp_path / "b", {"scifact": {"xtr-kth-k100": 0.74, "colbert-k100": 0.745, "bm25": 0.66},
                                   "cranfield": {"xtr-zero-k100": 0.30, "bm25": 0.35}})
  out = tmp_path / "r" / "results.md"
  text = report.report(evals=[("untrained", a), ("trained", b)], output=str(out))
  assert out.read_text() == text
  lines = text.splitlines()
  assert "| model | system | scifact nDCG@10 | scifact Recall@100 | cranfield nDCG@10 | cranfield Recall@100 |" in lines
  # ColBERT first, then XTR by k'; BM25 once (from the first evaluation that has it).
  colbert_row = "| untrained | ColBERT rescoring (all tokens of candidates), k'=1000 | 72.0 | 36.0 | – | – |"
  assert lines.index(colbert_row) < \
      lines.index("| untrained | XTR scoring, k'=100 | 70.0 | 35.0 | – | – |") < \
      lines.index("| untrained | XTR scoring, k'=1000 | 71.5 | 35.8 | – | – |")
  assert sum(line.startswith("| BM25") for line in lines) == 1
  assert "| trained | XTR scoring, zero imputation, k'=100 | – | – | 30.0 | 15.0 |" in lines
  # XTR vs ColBERT at the largest ColBERT k'; datasets without both are left out.
  assert "| untrained | scifact | 72.0 (k'=1000) | k'=100, k'=1000 | 70.0 (-2.0) / 71.5 (-0.5) |" in lines
  assert "| trained | scifact | 74.5 (k'=100) | k'=100 | 74.0 (-0.5) |" in lines
  assert not any(line.startswith("| trained | cranfield | ") and "(k'=" in line for line in lines)
  assert "| untrained | scifact | 100 | 0.250 | 0.500 | 321 | – |" in lines  # no exact search: no token recall
  assert "| untrained | scifact | 1000 | 0.125 | 0.375 | 900 | 0.912 |" in lines


def test_missing_eval_output_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a finished `xtr_jax.eval` output dir"):
    report.report(evals={"x": str(tmp_path)})
  d = _write_eval(tmp_path / "a", {"scifact": {"bm25": 0.5}})
  os.remove(os.path.join(d, "scifact", "metrics.json"))
  with pytest.raises(FileNotFoundError, match="scifact/metrics.json not found"):
    report.report(evals={"x": d})
  with pytest.raises(ValueError, match="pairs"):
    report.report(evals=[("x", d, "extra")])
  with pytest.raises(ValueError, match=r"labels \['x'\] name more than one evaluation"):
    report.report(evals=[("x", d), ("y", d), ("x", d)])


def test_cli(tmp_path):
  a = _write_eval(tmp_path / "a", {"scifact": {"xtr-kth-k100": 0.70, "colbert-k100": 0.72}})
  text = report.main([f"--gin.xtr_report.evals=[('m', '{a}')]", f"--gin.xtr_report.output='{tmp_path / 'o.md'}'"])
  assert "| m | scifact | 72.0 (k'=100) | k'=100 | 70.0 (-2.0) |" in text.splitlines()
  assert (tmp_path / "o.md").is_file()


def _write_per_query(root, dataset, system, values):
  os.makedirs(root / dataset / "per_query", exist_ok=True)
  lines = ["query_id\tnDCG@10\tRecall@100"] + [f"{q}\t{v:.6f}\t1.000000" for q, v in values.items()]
  (root / dataset / "per_query" / f"{system}.tsv").write_text("\n".join(lines) + "\n")


def test_paired_table_against_a_baseline(tmp_path):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  qids = [str(q) for q in rng.permutation(40)]
  base = {q: float(v) for q, v in zip(qids, rng.uniform(0, 1, 40))}
  trained = {q: min(1.0, v + float(d)) for (q, v), d in zip(base.items(), rng.normal(0.05, 0.1, 40))}
  a = _write_eval(tmp_path / "a", {"scifact": {"xtr-kth-k100": 0.5, "colbert-k100": 0.5, "bm25": 0.4}})
  b = _write_eval(tmp_path / "b", {"scifact": {"xtr-kth-k100": 0.55, "exact-kth-k100": 0.56, "bm25": 0.4}})
  _write_per_query(tmp_path / "a", "scifact", "xtr-kth-k100", base)
  _write_per_query(tmp_path / "a", "scifact", "colbert-k100", base)  # table 5 reads it
  _write_per_query(tmp_path / "b", "scifact", "xtr-kth-k100", dict(reversed(list(trained.items()))))  # any order
  text = report.report(evals=[("untrained", a), ("trained", b)], baseline="untrained")
  section = text.split("## Against untrained, query by query")[1].split("Evaluations:")[0]
  rows = [line for line in section.splitlines() if line.startswith("| trained")]
  # Only the system both evaluated (not colbert-k100, exact-kth-k100 or BM25), queries matched by id.
  assert len(rows) == 1 and "XTR scoring, k'=100" in rows[0]
  diff = np.array([trained[q] - base[q] for q in qids])
  t = diff.mean() / (diff.std(ddof=1) / np.sqrt(len(diff)))
  p = 2 * stats.t.sf(abs(t), df=len(diff) - 1)
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells[3] == f"{100 * diff.mean():+.2f}" and cells[4] == f"{p:.3f}" and cells[5] == "40"
  assert p < 0.05  # a real effect of +5 points over 40 queries
  with pytest.raises(ValueError, match="baseline 'nobody' is not one of the labels"):
    report.report(evals=[("untrained", a), ("trained", b)], baseline="nobody")
  _write_per_query(tmp_path / "b", "scifact", "xtr-kth-k100", dict(list(trained.items())[:-1]))
  with pytest.raises(ValueError, match="evaluated on different queries"):
    report.report(evals=[("untrained", a), ("trained", b)], baseline="untrained")
  path = tmp_path / "b" / "scifact" / "per_query" / "xtr-kth-k100.tsv"
  path.write_text("query_id\tnDCG@10\n1\tNaN?\n")
  with pytest.raises(ValueError, match=r"xtr-kth-k100.tsv:2: field 'nDCG@10': expected a number"):
    report.report(evals=[("untrained", a), ("trained", b)], baseline="untrained")
  path.unlink()
  with pytest.raises(FileNotFoundError, match="needs the evaluation's per-query file"):
    report.report(evals=[("untrained", a), ("trained", b)], baseline="untrained")


def test_gap_table_tests_xtr_minus_rescoring_per_model_and_against_the_baseline(tmp_path):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  qids = [f"q{i}" for i in range(60)]

  def t_test_p(diff):  # independent of report's scipy call: the t statistic by hand, its two-sided tail by scipy
    t = diff.mean() / (diff.std(ddof=1) / np.sqrt(len(diff)))
    return 2 * stats.t.sf(abs(t), df=len(diff) - 1)

  per_query = {}
  for label, loss in (("colbert", 0.08), ("xtr", 0.0)):  # XTR at k'=100 vs rescoring: the ColBERT model loses 8
    rescoring = rng.uniform(0.2, 1.0, len(qids))
    per_query[label] = {"colbert-k1000": rescoring, "xtr-kth-k100": rescoring - loss + rng.normal(0, 0.1, len(qids)),
                        "xtr-kth-k1000": rescoring + rng.normal(0, 0.05, len(qids))}
    per_query[label] = {s: np.round(v, 6) for s, v in per_query[label].items()}  # as the files hold them
    systems = {s: float(v.mean()) for s, v in per_query[label].items()}
    # colbert-k100 is not the reference (k'=1000 is the largest) and exact search is not in this table
    extra = {"colbert-k100": np.full(len(qids), 0.5), "exact-kth-k100": np.full(len(qids), 0.5)}
    _write_eval(tmp_path / label, {"scifact": {**systems, "colbert-k100": 0.5, "exact-kth-k100": 0.5}})
    for s, v in {**per_query[label], **extra}.items():
      order = qids if label == "xtr" else qids[::-1]  # matched by query id, not by line
      _write_per_query(tmp_path / label, "scifact", s, {q: float(v[qids.index(q)]) for q in order})
  text = report.report(evals=[("colbert", str(tmp_path / "colbert")), ("xtr", str(tmp_path / "xtr"))],
                       baseline="colbert")
  section = text.split("## XTR scoring minus full rescoring, query by query")[1].split("Evaluations:")[0]
  rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): [c.strip() for c in line.strip("|").split("|")]
          for line in section.splitlines() if line.startswith("| colbert") or line.startswith("| xtr")}
  assert set(rows) == {(m, "scifact", k) for m in ("colbert", "xtr") for k in ("100", "1000")}  # kth XTR only
  gap = {m: {k: per_query[m][f"xtr-kth-k{k}"] - per_query[m]["colbert-k1000"] for k in (100, 1000)}
         for m in per_query}
  for (m, _, k), cells in rows.items():
    g = gap[m][int(k)]
    assert cells[3] == f"{100 * g.mean():+.2f}" and cells[4] == f"{t_test_p(g):.3f}" and cells[7] == "60"
    if m == "colbert":
      assert cells[5] == cells[6] == ""
    else:
      d = g - gap["colbert"][int(k)]
      assert cells[5] == f"{100 * d.mean():+.2f}" and cells[6] == f"{t_test_p(d):.3f}"
  assert float(rows[("xtr", "scifact", "100")][6]) < 0.01  # 8 points less loss over 60 queries is detected
  _write_per_query(tmp_path / "xtr", "scifact", "xtr-kth-k100", {q: 0.5 for q in qids[1:]})
  evals = [(m, report.read_eval_dir(str(tmp_path / m))) for m in ("colbert", "xtr")]
  with pytest.raises(ValueError, match="xtr-kth-k100 and colbert-k1000 per-query files hold different queries"):
    report.gap_table(evals, "colbert")  # (report() stops earlier, at table 4, for the same file)


def test_one_model_evaluated_in_parts_is_merged_and_conflicts_are_refused(tmp_path):
  qids = [f"q{i}" for i in range(5)]
  a = _write_eval(tmp_path / "a", {"scifact": {"xtr-kth-k100": 0.5, "colbert-k100": 0.6}}, model="m1")
  b = _write_eval(tmp_path / "b", {"scifact": {"xtr-kth-k4000": 0.7}, "cranfield": {"xtr-kth-k100": 0.3}},
                  model="m1", summary=False)  # stopped before its summary.json: its finished datasets count
  _write_per_query(tmp_path / "a", "scifact", "xtr-kth-k100", {q: 0.1 for q in qids})
  _write_per_query(tmp_path / "b", "scifact", "xtr-kth-k4000", {q: 0.9 for q in qids})
  merged = report.read_evaluation([a, b])
  assert list(merged) == ["scifact", "cranfield"]
  assert sorted(merged["scifact"]["systems"]) == ["colbert-k100", "xtr-kth-k100", "xtr-kth-k4000"]
  assert report._per_query(merged["scifact"], "xtr-kth-k4000", "nDCG@10") == {q: 0.9 for q in qids}  # from b
  assert report._per_query(merged["scifact"], "xtr-kth-k100", "nDCG@10") == {q: 0.1 for q in qids}  # from a
  text = report.report(evals=[("m", [a, b])])
  assert "| m | XTR scoring, k'=4000 | 70.0 | 35.0 | – | – |" in text.splitlines()
  assert f"- m: `{b}` (stopped before its summary.json" in text
  c = _write_eval(tmp_path / "c", {"scifact": {"xtr-kth-k100": 0.55}}, model="m1")
  with pytest.raises(ValueError, match=r"systems \['xtr-kth-k100'\] evaluated in both"):
    report.read_evaluation([a, c])
  other = _write_eval(tmp_path / "o", {"scifact": {"xtr-kth-k1000": 0.55}}, model="m2")
  with pytest.raises(ValueError, match="disagree on 'model_identity'"):
    report.read_evaluation([a, other])


def _welch_p_by_hand(x, y):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  vx, vy = np.var(x, ddof=1) / len(x), np.var(y, ddof=1) / len(y)
  t = (np.mean(x) - np.mean(y)) / np.sqrt(vx + vy)
  df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
  return 2 * stats.t.sf(abs(t), df)


def test_seed_table_compares_groups_over_members_and_queries(tmp_path):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  qids = [f"q{i}" for i in range(50)]
  per_query, evals = {}, []
  for g, (loss, seeds) in {"xtr": (0.01, 3), "colbert": (0.06, 2)}.items():
    for s in range(seeds):
      label = f"{g}{s}"
      rescoring = np.round(rng.uniform(0.2, 1.0, len(qids)), 6)
      x100 = np.round(rescoring - loss + rng.normal(0, 0.05, len(qids)), 6)
      per_query[label] = {"x": x100, "c": rescoring}
      root = tmp_path / label
      # xtr0 ran exact search beside a ScaNN index; the others are brute-force evaluations (their xtr-kth IS exact);
      # colbert1 also rescored at k'=4000, which the others did not: rescoring is compared at k'=1000
      if label == "xtr0":
        systems = {"xtr-kth-k100": 0.1, "exact-kth-k100": float(x100.mean()), "colbert-k1000": float(rescoring.mean())}
        files = {"xtr-kth-k100": np.zeros(len(qids)), "exact-kth-k100": x100, "colbert-k1000": rescoring}
        backend = "scann"
      else:
        systems = {"xtr-kth-k100": float(x100.mean()), "colbert-k1000": float(rescoring.mean())}
        files = {"xtr-kth-k100": x100, "colbert-k1000": rescoring}
        backend = "bruteforce"
      if label == "colbert1":
        systems["colbert-k4000"] = 0.9
        files["colbert-k4000"] = np.ones(len(qids))
      _write_eval(root, {"scifact": systems}, backend=backend)
      for name, v in files.items():
        _write_per_query(root, "scifact", name, {q: float(v[i]) for i, q in enumerate(qids)})
      evals.append((label, str(root)))
  groups = [("XTR", ["xtr0", "xtr1", "xtr2"]), ("ColBERT", ["colbert0", "colbert1"])]
  text = report.report(evals=evals, groups=groups)
  section = text.split("## Groups of models (seeds)")[1].split("Evaluations:")[0]
  rows = {(c[1], c[2]): c for c in ([x.strip() for x in line.strip("|").split("|")] for line in section.splitlines()
                                    if line.startswith("| scifact"))}
  assert set(rows) == {(q, g) for q in ("XTR, exact token search, k'=100", "ColBERT rescoring, k'=1000",
                                        "XTR exact k'=100 minus rescoring k'=1000") for g in ("XTR", "ColBERT")}
  for quantity, value in (("XTR, exact token search, k'=100", lambda m: m["x"]),
                          ("ColBERT rescoring, k'=1000", lambda m: m["c"]),
                          ("XTR exact k'=100 minus rescoring k'=1000", lambda m: m["x"] - m["c"])):
    members = {g: [value(per_query[m]) for m in ms] for g, ms in groups}
    means = {g: [100 * v.mean() for v in vs] for g, vs in members.items()}
    for g, _ in groups:
      cells = rows[(quantity, g)]
      assert cells[3] == str(len(means[g])) and cells[4] == " / ".join(f"{v:.1f}" for v in means[g])
      assert cells[5] == f"{np.mean(means[g]):.2f}" and cells[6] == f"{np.std(means[g], ddof=1):.2f}"
    cells = rows[(quantity, "ColBERT")]
    assert cells[7] == f"{np.mean(means['ColBERT']) - np.mean(means['XTR']):+.2f}"
    assert cells[8] == f"{_welch_p_by_hand(means['ColBERT'], means['XTR']):.3f}"
    d = np.mean(members["ColBERT"], axis=0) - np.mean(members["XTR"], axis=0)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert cells[9] == f"{2 * stats.t.sf(abs(t), len(d) - 1):.3f}"
    assert rows[(quantity, "XTR")][7:] == ["", "", ""]
  # 5 points more loss for the ColBERT group over 50 queries is found query by query
  assert float(rows[("XTR exact k'=100 minus rescoring k'=1000", "ColBERT")][9]) < 0.01
  # a member whose only XTR rows come from an index (no exact search) leaves exact XTR out of the comparison
  scann_only = _write_eval(tmp_path / "s", {"scifact": {"xtr-kth-k100": 0.5, "colbert-k1000": 0.6}}, backend="scann")
  _write_per_query(tmp_path / "s", "scifact", "colbert-k1000", {q: 0.6 for q in qids})
  text = report.report(evals=evals + [("s", scann_only)], groups=[groups[0], ("S", ["s"])])
  section = text.split("## Groups of models (seeds)")[1]
  assert "ColBERT rescoring, k'=1000" in section and "exact token search" not in section
  assert "| S | 1 | 60.0 | 60.00 | – |" in section  # one member: no spread, no Welch test
  for bad, match in (([groups[0]], "at least two groups"), ([groups[0], ("E", [])], "has no members"),
                     ([groups[0], ("N", ["nobody"])], "'nobody' .* is not one of the labels"),
                     ([groups[0], ("D", ["xtr0"])], "'xtr0' is in two groups")):
    with pytest.raises(ValueError, match=match):
      report.report(evals=evals, groups=bad)
