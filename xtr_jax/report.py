"""Comparison tables (Markdown) from several `python -m xtr_jax.eval` output directories.

    python -m xtr_jax.report \
      --gin.xtr_report.evals="[('untrained', '/tmp/untrained/eval'), ('XTR-trained', '/tmp/xtr/eval')]" \
      --gin.xtr_report.output="'/tmp/results.md'"

Tables 1-3 read every number from the evaluations' `<dataset>/metrics.json` (nothing is recomputed); 4-5 test
per-query differences from `<dataset>/per_query/*.tsv`:
  1. metrics: one row per (model, system), nDCG@10 and Recall@100 (x100) per dataset; BM25 once (it does not
     depend on the model).
  2. XTR scoring vs full ColBERT rescoring: nDCG@10 of XTR (k'-th-score imputation) at each k' minus the ColBERT
     pipeline's at the largest k' evaluated (the paper's "does XTR lose anything by scoring only retrieved tokens").
  3. token analyses (evaluations run with --analysis): gold-token and lexical-token ratios per k'.
  4. with `baseline` (one of the labels): every other model against it query by query, for each dataset and system
     both evaluated: mean nDCG@10 difference and the paired t-test's p (scipy), from `<dataset>/per_query/*.tsv`.
  5. with `baseline`, also XTR scoring's loss against full rescoring query by query, per model and k': its mean and
     p (is it a loss at all), and its difference from the baseline model's loss with p (does this model lose less:
     the paper's XTR-trained vs ColBERT-trained claim, with the ColBERT-trained model as baseline).
  6. with `groups`: groups of models (a recipe at several seeds) against the first group: XTR over exact token
     search, ColBERT rescoring and their per-query gap, per member and per group, tested over the members (seed
     to seed) and over queries.
A label may name several output dirs of one model (a dataset or k' evaluated later); they are merged.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

import gin
import numpy as np

from xtr_jax import gin_utils

_SYSTEM = re.compile(r"^(?P<family>xtr|exact|colbert)(?:-(?P<imp>[a-z]+))?-k(?P<k>\d+)$")
_FAMILY_ORDER = {"colbert": 0, "xtr": 1, "exact": 2}
_FAMILY_LABEL = {"colbert": "ColBERT rescoring (all tokens of candidates)", "xtr": "XTR scoring",
                 "exact": "XTR scoring, exact token search"}


def read_eval_dir(eval_dir: str) -> dict[str, dict[str, Any]]:
  """{dataset name: metrics.json dict} for every dataset evaluated in `eval_dir` (its summary.json order).

  An evaluation stopped before writing summary.json (killed after some datasets) contributes the datasets whose
  metrics.json exists: `xtr_jax.eval` writes a dataset's metrics.json once, after every system of it is scored.
  Each system's record gains `per_query_dir` (where its per-query file is) and `token_search` ("exact" for exact
  token search: an `exact-*` system, or any system of an evaluation whose token index is the brute-force backend;
  else the index backend, "" when the evaluation does not say).
  """
  summary_path = os.path.join(eval_dir, "summary.json")
  if os.path.isfile(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    names = list(dict.fromkeys(r["dataset"] for r in summary.get("rows", [])))
    if not names:
      raise ValueError(f"{summary_path}: no rows")
  else:
    names = sorted(d for d in (os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
                   if os.path.isfile(os.path.join(eval_dir, d, "metrics.json")))
    if not names:
      raise FileNotFoundError(f"{summary_path} not found and no <dataset>/metrics.json beside it: {eval_dir!r} is not "
                              "a finished `xtr_jax.eval` output dir")
  out = {}
  for name in names:
    path = os.path.join(eval_dir, name, "metrics.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found (listed in {summary_path})")
    with open(path, encoding="utf-8") as f:
      out[name] = json.load(f)
    if "systems" not in out[name]:
      raise ValueError(f"{path}: missing field 'systems'")
    backend = (out[name].get("index") or {}).get("backend", "")
    for system, record in out[name]["systems"].items():
      record["per_query_dir"] = os.path.join(eval_dir, name, "per_query")
      record["token_search"] = "exact" if system.startswith("exact-") or backend == "bruteforce" else backend
  return out


_SAME_EVALUATION_SETUP = ("model_identity", "split", "num_queries", "num_docs")


def read_evaluation(eval_dirs: str | Sequence[str]) -> dict[str, dict[str, Any]]:
  """One model's evaluation from one or several `xtr_jax.eval` output dirs (say, a k' or a dataset evaluated
  later), merged into {dataset: metrics dict} as `read_eval_dir` returns it.

  The dirs must agree on a dataset's model, split and query / document counts; a system (or an analysis k')
  evaluated in two of them is refused rather than picked.
  """
  dirs = [eval_dirs] if isinstance(eval_dirs, str) else list(eval_dirs)
  if not dirs:
    raise ValueError("an evaluation needs at least one output dir")
  merged: dict[str, dict[str, Any]] = {}
  origin: dict[str, str] = {}
  for d in dirs:
    for name, res in read_eval_dir(d).items():
      if name not in merged:
        merged[name], origin[name] = res, d
        continue
      into = merged[name]
      for key in _SAME_EVALUATION_SETUP:
        if key in into and key in res and into[key] != res[key]:
          raise ValueError(f"{name}: {origin[name]} and {d} disagree on {key!r} ({into[key]!r} vs {res[key]!r}): "
                           "not one model's evaluation of one dataset")
      for part in ("systems", "analysis"):
        twice = sorted(set(into.get(part, {})) & set(res.get(part, {})))
        if twice:
          raise ValueError(f"{name}: {part} {twice} evaluated in both {origin[name]} and {d}; give each once")
        into.setdefault(part, {}).update(res.get(part, {}))
  return merged


def _system_key(name: str) -> tuple:
  m = _SYSTEM.match(name)
  if not m:
    return (9, name, 0)
  return (_FAMILY_ORDER[m["family"]], m["imp"] or "", int(m["k"]))


def _describe(name: str) -> str:
  m = _SYSTEM.match(name)
  if not m:
    return name
  imp = "" if m["family"] == "colbert" or m["imp"] in (None, "kth") else f", {m['imp']} imputation"
  return f"{_FAMILY_LABEL[m['family']]}{imp}, k'={m['k']}"


def _cell(value: float | None) -> str:
  return "–" if value is None else f"{100 * value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def metrics_table(evals: Sequence[tuple[str, Mapping[str, dict]]], metrics: Sequence[str]) -> str:
  """Table 1: rows (model, system), columns dataset x metric (x100); BM25 once, from the first eval that has it."""
  datasets = list(dict.fromkeys(d for _, e in evals for d in e))
  header = ["model", "system"] + [f"{d} {m}" for d in datasets for m in metrics]
  rows = []
  bm25_done = False
  for label, per_dataset in evals:
    systems = sorted({s for res in per_dataset.values() for s in res["systems"]}, key=_system_key)
    for system in systems:
      if system == "bm25":
        if bm25_done:
          continue
        bm25_done = True
      cells = []
      for d in datasets:
        sysres = per_dataset.get(d, {}).get("systems", {}).get(system)
        cells += [_cell(sysres["metrics"].get(m) if sysres else None) for m in metrics]
      rows.append(["BM25 (bm25s)" if system == "bm25" else label,
                   "" if system == "bm25" else _describe(system), *cells])
  return _table(header, rows)


def _k_primes(systems: Mapping[str, Any], family: str) -> list[int]:
  """Sorted k' of the systems evaluated in `family`: 'colbert' (rescoring) or 'xtr' (k'-th-score imputation only)."""
  return sorted(int(m["k"]) for s in systems if (m := _SYSTEM.match(s)) and m["family"] == family
                and (family != "xtr" or m["imp"] == "kth"))


def _with_baseline(evals: Sequence[tuple[str, Mapping[str, dict]]], baseline: str) -> Mapping[str, dict]:
  """The loaded evaluation of the `baseline` label; a clear error when it is not one of the labels."""
  by_label = dict(evals)
  if baseline not in by_label:
    raise ValueError(f"xtr_report.baseline {baseline!r} is not one of the labels {list(by_label)}")
  return by_label[baseline]


def xtr_vs_colbert(evals: Sequence[tuple[str, Mapping[str, dict]]], metric: str = "nDCG@10") -> str:
  """Table 2: XTR (kth imputation) at each k' minus ColBERT rescoring at the largest k', in `metric` points."""
  rows = []
  for label, per_dataset in evals:
    for d, res in per_dataset.items():
      colbert, xtr = _k_primes(res["systems"], "colbert"), _k_primes(res["systems"], "xtr")
      if not colbert or not xtr:
        continue
      kc = colbert[-1]
      ref = res["systems"][f"colbert-k{kc}"]["metrics"][metric]
      value = {k: res["systems"][f"xtr-kth-k{k}"]["metrics"][metric] for k in xtr}
      cells = [f"{100 * value[k]:.1f} ({100 * (value[k] - ref):+.1f})" for k in xtr]
      rows.append([label, d, f"{100 * ref:.1f} (k'={kc})", ", ".join(f"k'={k}" for k in xtr), " / ".join(cells)])
  return _table(["model", "dataset", f"ColBERT rescoring {metric}", "XTR at", f"XTR {metric} (Δ vs ColBERT)"], rows)


def analysis_table(evals: Sequence[tuple[str, Mapping[str, dict]]]) -> str:
  """Table 3: gold-token and lexical-token ratios per (model, dataset, k') where --analysis was run, and the token
  index's recall against exact search where the evaluation also ran exact search."""
  rows = []
  for label, per_dataset in evals:
    for d, res in per_dataset.items():
      for kp, a in sorted(res.get("analysis", {}).items(), key=lambda kv: int(kv[0])):
        recall = a.get("token_recall_vs_exact")  # absent from evaluations without exact search (or older ones)
        rows.append([label, d, str(kp), f"{a['gold_token_ratio']:.3f}", f"{a['lexical_token_ratio']:.3f}",
                     f"{a['cost']['candidates_per_query']:.0f}", "–" if recall is None else f"{recall:.3f}"])
  return _table(["model", "dataset", "k'", "gold-token ratio", "lexical-token ratio", "candidate docs / query",
                 "token recall vs exact"], rows)


def _per_query(res: Mapping[str, Any], system: str, metric: str) -> dict[str, float]:
  """Per-query `metric` of `system` in one dataset's (merged) metrics, from the dir that evaluated it."""
  return read_per_query_file(os.path.join(res["systems"][system]["per_query_dir"], f"{system}.tsv"), metric)


def read_per_query_file(path: str, metric: str = "nDCG@10") -> dict[str, float]:
  """{query id: `metric`} from one per-query TSV (header `query_id<TAB><metric>...`); errors name file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: the paired comparison needs the evaluation's per-query file")
  with open(path, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    if header[:1] != ["query_id"] or metric not in header:
      raise ValueError(f"{path}:1: expected a header 'query_id<TAB>...' with column {metric!r}, got {header}")
    col = header.index(metric)
    out = {}
    for lineno, line in enumerate(f, start=2):
      fields = line.rstrip("\n").split("\t")
      if len(fields) != len(header):
        raise ValueError(f"{path}:{lineno}: expected {len(header)} fields, got {len(fields)}")
      try:
        out[fields[0]] = float(fields[col])
      except ValueError as e:
        raise ValueError(f"{path}:{lineno}: field {metric!r}: expected a number, got {fields[col]!r}") from e
  return out


def paired_table(evals: Sequence[tuple[str, Mapping[str, dict]]], baseline: str, metric: str = "nDCG@10") -> str:
  """Table 4: each model minus `baseline`, query by query, per dataset and system evaluated by both: mean difference
  (x100), paired t-test p (two-sided), number of queries. `evals` holds (label, loaded evaluation)."""
  base = _with_baseline(evals, baseline)
  rows = []
  for label, loaded in evals:
    if label == baseline:
      continue
    for d, res in loaded.items():
      shared = sorted((set(res["systems"]) & set(base.get(d, {}).get("systems", {}))) - {"bm25"}, key=_system_key)
      for system in shared:
        x, y = _per_query(res, system, metric), _per_query(base[d], system, metric)
        if set(x) != set(y):
          raise ValueError(f"{d}/{system}: {label!r} and {baseline!r} were evaluated on different queries "
                           f"({len(set(x) ^ set(y))} not in both)")
        a = np.array([x[q] for q in sorted(x)])
        b = np.array([y[q] for q in sorted(x)])
        p = _paired_p(a, b)
        rows.append([label, d, _describe(system), f"{100 * (a - b).mean():+.2f}", f"{p:.3f}", str(len(a))])
  return _table(["model", "dataset", "system", f"{metric} minus {baseline} (x100)", "paired t-test p", "queries"],
                rows)


def _paired_p(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sided paired t-test p of a vs b (1.0 when they are equal everywhere: no test to run)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.ttest_rel(a, b).pvalue) if np.any(a != b) else 1.0


def gap_table(evals: Sequence[tuple[str, Mapping[str, dict]]], baseline: str, metric: str = "nDCG@10") -> str:
  """Table 5: XTR scoring's loss against full rescoring, query by query (the paper's claim is about its size after
  XTR training vs ColBERT training). Per (model, dataset, k'): per-query gap g = XTR (k'-th imputation) at k' minus
  ColBERT rescoring at the model's largest k'; mean g (x100) and the paired t-test p of g != 0; then g minus the
  baseline model's g for the same queries (x100) and its p. `evals` holds (label, loaded evaluation)."""
  base_loaded = _with_baseline(evals, baseline)

  def gaps(res: Mapping[str, Any], d: str) -> dict[int, tuple[list[str], np.ndarray]]:
    colbert, xtr = _k_primes(res["systems"], "colbert"), _k_primes(res["systems"], "xtr")
    if not colbert or not xtr:
      return {}
    ref = _per_query(res, f"colbert-k{colbert[-1]}", metric)
    out = {}
    for k in xtr:
      x = _per_query(res, f"xtr-kth-k{k}", metric)
      if set(x) != set(ref):
        raise ValueError(f"{res['systems'][f'xtr-kth-k{k}']['per_query_dir']}: xtr-kth-k{k} and "
                         f"colbert-k{colbert[-1]} per-query files hold different queries "
                         f"({len(set(x) ^ set(ref))} not in both)")
      qids = sorted(ref)
      out[k] = (qids, np.array([x[q] - ref[q] for q in qids]))
    return out

  base_gaps = {d: gaps(res, d) for d, res in base_loaded.items()}
  rows = []
  for label, loaded in evals:
    for d, res in loaded.items():
      for k, (qids, g) in gaps(res, d).items():
        row = [label, d, str(k), f"{100 * g.mean():+.2f}", f"{_paired_p(g, np.zeros_like(g)):.3f}"]
        if label != baseline and k in base_gaps.get(d, {}):
          bq, bg = base_gaps[d][k]
          if bq != qids:
            raise ValueError(f"{d}: {label!r} and {baseline!r} were evaluated on different queries "
                             f"({len(set(bq) ^ set(qids))} not in both)")
          row += [f"{100 * (g - bg).mean():+.2f}", f"{_paired_p(g, bg):.3f}"]
        else:
          row += ["", ""]
        rows.append(row + [str(len(g))])
  return _table(["model", "dataset", "k'", f"XTR minus rescoring, {metric} (x100)", "p (≠ 0)",
                 f"minus {baseline}'s (x100)", "p (paired)", "queries"], rows)


def _exact_xtr(res: Mapping[str, Any], k: int) -> str | None:
  """The system holding XTR (k'-th imputation) over exact token search at k' = `k` in one dataset's evaluation:
  `exact-kth-k<k>`, or `xtr-kth-k<k>` of an evaluation whose token index is the brute-force backend."""
  for name in (f"exact-kth-k{k}", f"xtr-kth-k{k}"):
    record = res["systems"].get(name)
    if record is not None and record.get("token_search") == "exact":
      return name
  return None


def _exact_k_primes(res: Mapping[str, Any]) -> set[int]:
  return {int(m["k"]) for s in res["systems"] if (m := _SYSTEM.match(s)) and m["family"] in ("xtr", "exact")
          and m["imp"] == "kth" and _exact_xtr(res, int(m["k"])) is not None}


def _welch_p(x: Sequence[float], y: Sequence[float]) -> float | None:
  from scipy import stats  # pylint: disable=g-import-not-at-top
  if len(x) < 2 or len(y) < 2:
    return None
  return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def seed_table(evals: Sequence[tuple[str, Mapping[str, dict]]], groups: Sequence[tuple[str, Sequence[str]]],
               metric: str = "nDCG@10") -> str:
  """Table 6: groups of models (one recipe at several seeds, say) compared as groups, per dataset every group
  member evaluated.

  Quantities, where every member has them: XTR (k'-th imputation) over EXACT token search at each k' (the index
  backends' own errors vary with each build, so only exact search is compared across models); ColBERT rescoring at
  R, the largest k' every member rescored; and the per-query gap XTR exact at k' minus that rescoring. Per group:
  each member's mean (x100), their mean and standard deviation. Each later group against the first: difference of
  the group means, Welch's t-test over the members' means (the seed-to-seed spread; needs two members a side), and
  a paired t-test over queries of the per-query values averaged over each group's members (all members must hold
  the same queries).
  """
  by_label = dict(evals)
  seen: set[str] = set()
  for name, members in groups:
    if not members:
      raise ValueError(f"xtr_report.groups: group {name!r} has no members")
    for m in members:
      if m not in by_label:
        raise ValueError(f"xtr_report.groups: {m!r} (group {name!r}) is not one of the labels {list(by_label)}")
      if m in seen:
        raise ValueError(f"xtr_report.groups: {m!r} is in two groups")
      seen.add(m)
  if len(groups) < 2:
    raise ValueError(f"xtr_report.groups: needs at least two groups to compare, got {len(groups)}")
  everyone = [by_label[m] for _, members in groups for m in members]
  datasets = [d for d in dict.fromkeys(d for e in everyone for d in e) if all(d in e for e in everyone)]
  rows = []
  for d in datasets:
    results = [e[d] for e in everyone]
    kx = sorted(set.intersection(*(_exact_k_primes(r) for r in results)))
    kc = sorted(set.intersection(*(set(_k_primes(r["systems"], "colbert")) for r in results)))
    quantities = [(f"XTR, exact token search, k'={k}", (f"x{k}",)) for k in kx]
    if kc:
      quantities.append((f"ColBERT rescoring, k'={kc[-1]}", ("c",)))
      quantities += [(f"XTR exact k'={k} minus rescoring k'={kc[-1]}", (f"x{k}", "c")) for k in kx]

    def per_query(res: Mapping[str, Any], parts: Sequence[str]) -> dict[str, float]:
      names = [f"colbert-k{kc[-1]}" if p == "c" else _exact_xtr(res, int(p[1:])) for p in parts]
      values = [_per_query(res, n, metric) for n in names]
      if any(set(v) != set(values[0]) for v in values):
        raise ValueError(f"{d}: {names} per-query files hold different queries")
      return {q: values[0][q] - (values[1][q] if len(values) > 1 else 0.0) for q in values[0]}

    for label, parts in quantities:
      stats_by_group = []
      for name, members in groups:
        pq = [per_query(by_label[m][d], parts) for m in members]
        qids = sorted(pq[0])
        for m, v in zip(members, pq):
          if sorted(v) != qids:
            raise ValueError(f"{d}: {m!r} and {members[0]!r} (group {name!r}) were evaluated on different queries")
        matrix = np.array([[v[q] for q in qids] for v in pq])  # [members, queries]
        stats_by_group.append((name, members, qids, matrix))
      first_name, _, first_q, first = stats_by_group[0]
      for i, (name, members, qids, matrix) in enumerate(stats_by_group):
        means = 100 * matrix.mean(axis=1)
        row = [d, label, name, str(len(members)), " / ".join(f"{v:.1f}" for v in means), f"{means.mean():.2f}",
               f"{means.std(ddof=1):.2f}" if len(means) > 1 else "–"]
        if i == 0:
          row += ["", "", ""]
        else:
          if qids != first_q:
            raise ValueError(f"{d}: groups {name!r} and {first_name!r} were evaluated on different queries")
          welch = _welch_p(list(means), list(100 * first.mean(axis=1)))
          row += [f"{means.mean() - 100 * first.mean(axis=1).mean():+.2f}", "–" if welch is None else f"{welch:.3f}",
                  f"{_paired_p(matrix.mean(axis=0), first.mean(axis=0)):.3f}"]
        rows.append(row)
  return _table(["dataset", f"{metric} (x100)", "group", "members", "per member", "mean", "sd",
                 f"minus {groups[0][0]}", "p (Welch, members)", "p (paired, queries)"], rows)


@gin.configurable("xtr_report")
def report(*, evals: Sequence[tuple[str, str | Sequence[str]]] | Mapping[str, str | Sequence[str]] = gin.REQUIRED,
           metrics: Sequence[str] = ("nDCG@10", "Recall@100"), baseline: str | None = None,
           groups: Sequence[tuple[str, Sequence[str]]] | None = None, output: str | None = None) -> str:
  """Writes (to `output`, if given) and returns the Markdown tables comparing the evaluations `evals`.

  Args:
    evals: [(label, eval output dir or list of dirs), ...] (or a {label: dir(s)} mapping), in table order; a list
      merges one model's evaluations made in parts (`read_evaluation`).
    metrics: metric names as written by `xtr_jax.eval` (columns of table 1).
    baseline: a label of `evals`: adds tables 4 and 5, every other model against it query by query (both need the
      evaluations' per_query files).
    groups: [(group name, [label, ...]), ...], two or more: adds table 6, the groups compared as groups (one
      recipe at several seeds against another; `seed_table`).
    output: Markdown file to write.
  """
  pairs = list(evals.items()) if isinstance(evals, Mapping) else [tuple(p) for p in evals]
  for p in pairs:
    if len(p) != 2:
      raise ValueError(f"xtr_report.evals: expected (label, directory) pairs, got {p!r}")
  twice = sorted({label for label, _ in pairs if [l for l, _ in pairs].count(label) > 1})
  if twice:
    raise ValueError(f"xtr_report.evals: labels {twice} name more than one evaluation (a model evaluated in parts is "
                     "one label with a list of dirs)")
  loaded = [(label, read_evaluation(path)) for label, path in pairs]
  sources = []
  for label, path in pairs:
    for d in [path] if isinstance(path, str) else path:
      early = "" if os.path.isfile(os.path.join(d, "summary.json")) else " (stopped before its summary.json: the " \
          "datasets whose metrics.json was written)"
      sources.append(f"- {label}: `{d}`{early}")
  text = (f"## Retrieval quality (x100)\n\n{metrics_table(loaded, metrics)}\n\n"
          f"## XTR scoring vs full ColBERT rescoring\n\n{xtr_vs_colbert(loaded)}\n\n"
          f"## Token analyses\n\n{analysis_table(loaded)}\n\n")
  if baseline is not None:
    text += (f"## Against {baseline}, query by query\n\n{paired_table(loaded, baseline)}\n\n"
             f"## XTR scoring minus full rescoring, query by query\n\n{gap_table(loaded, baseline)}\n\n")
  if groups is not None:
    text += f"## Groups of models (seeds)\n\n{seed_table(loaded, [tuple(g) for g in groups])}\n\n"
  text += "Evaluations:\n" + "\n".join(sources) + "\n"
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      f.write(text)
  print(text, flush=True)
  return text


def main(argv: Sequence[str] | None = None) -> str:
  return gin_utils.run(report, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
  main()
