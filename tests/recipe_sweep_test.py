"""benchmarks/recipe_sweep.py: the held-out SciFact-train split it tunes on, and its recipes as gin."""

import csv
import importlib.util
import json
import os
import pathlib
import signal
import time

import gin
import numpy as np
import pytest
from scipy import stats

from xtr_jax import gin_utils, train  # noqa: F401  (registers the configurables the recipes bind)
from xtr_jax.data import overlap

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_sweep.py"


@pytest.fixture(scope="module")
def sweep():
  spec = importlib.util.spec_from_file_location("recipe_sweep", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _qrels(path):
  with open(path, encoding="utf-8") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def _queries(path):
  with open(path, encoding="utf-8") as f:
    return {q["_id"]: q["text"] for q in map(json.loads, f)}


def test_heldout_queries_never_reach_training(sweep, data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "SCIFACT", str(data_dir / "beir" / "scifact"))
  root, drop, n = sweep.make_heldout(str(tmp_path), every=4)
  root = pathlib.Path(root)
  train_rows = _qrels(data_dir / "beir" / "scifact" / "qrels" / "train.tsv")
  all_queries = _queries(data_dir / "beir" / "scifact" / "queries.jsonl")
  held_rows = _qrels(root / "qrels" / "test.tsv")
  held = {r["query-id"] for r in held_rows}
  assert len(held) == n and 150 < n < 260  # about a quarter of the 809 train queries
  assert set(_queries(root / "queries.jsonl")) == held
  assert (root / "corpus.jsonl").resolve() == (data_dir / "beir" / "scifact" / "corpus.jsonl").resolve()
  # every judged row of a held-out query is kept, and every positive one is dropped from training
  assert sorted((r["query-id"], r["corpus-id"]) for r in held_rows) == sorted(
      (r["query-id"], r["corpus-id"]) for r in train_rows if r["query-id"] in held)
  assert {f"{r['query-id']}/{r['corpus-id']}" for r in train_rows
          if r["query-id"] in held and int(r["score"]) > 0} <= set(drop)
  assert set(sweep.ALWAYS_EXCLUDED) <= set(drop)
  # no training query repeats a held-out query's text under another id (SciFact train has such repeats: 85/86)
  kept_texts = {overlap.normalize_query(all_queries[r["query-id"]]) for r in train_rows
                if r["query-id"] not in held}
  assert not kept_texts & {overlap.normalize_query(all_queries[q]) for q in held}
  assert {"85", "86"} <= held or not {"85", "86"} & held


def test_smoke_corpus_keeps_every_judged_document(sweep, data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "SCIFACT", str(data_dir / "beir" / "scifact"))
  root, _, _ = sweep.make_heldout(str(tmp_path), every=8, corpus_docs=20)
  judged = {r["corpus-id"] for r in _qrels(pathlib.Path(root) / "qrels" / "test.tsv")}
  docs = set(_queries(pathlib.Path(root) / "corpus.jsonl"))  # same {"_id": ...} rows
  assert judged <= docs and len(docs) == len(judged) + 20


def test_every_recipe_is_valid_gin_with_the_experiments_example_budget(sweep):
  assert {"xtr_b256", "colbert_b256", "xtr_b32", "colbert_b32"} <= set(sweep.RECIPES)
  for name, (experiment, overrides) in sweep.RECIPES.items():
    gin.clear_config()
    gin_utils.parse_gin([f"experiments/{experiment}.gin"], ["MODEL_DIR = '/tmp/unused'", *overrides],
                        finalize=False)
    examples = gin.query_parameter("%BATCH_SIZE") * gin.query_parameter("%TRAIN_STEPS")
    times = 10 if name.endswith("_x10") else 1  # the _x10 recipes are GPU questions, named so
    assert 7900 * times <= examples <= 8064 * times, (name, examples)  # ~8,000: the 60-minute experiment's examples
    assert gin.query_parameter("XTRModel.score_special_tokens") is False, name
    assert gin.query_parameter("XTRModel.loss").selector == f"{name.split('_')[0]}_loss", name
    gin.clear_config()


def test_gin_flag_replaces_a_recipes_binding_of_the_same_name(sweep):
  base = ["TRAIN_STEPS=310", "xtr_loss.k_train=256"]
  assert sweep._with(base, "TRAIN_STEPS=2", "BATCH_SIZE=8") == ["xtr_loss.k_train=256", "TRAIN_STEPS=2", "BATCH_SIZE=8"]
  assert sweep._with(base) == base
  with pytest.raises(ValueError, match="NAME=value"):
    sweep._with(base, "TRAIN_STEPS")


def test_paired_tests_against_the_baseline(sweep, tmp_path):
  rng = np.random.default_rng(0)
  queries = [str(i) for i in range(40)]
  ndcg = {"untrained": rng.uniform(0, 1, 40), "a": None}
  ndcg["a"] = np.clip(ndcg["untrained"] + rng.normal(0.05, 0.1, 40), 0, 1)
  results = []
  for name, values in ndcg.items():
    d = tmp_path / name
    d.mkdir()
    for system in sweep.SYSTEMS:
      order = rng.permutation(40)  # rows in any order: matched by query id
      (d / f"{system}.tsv").write_text("query_id\tnDCG@10\n" + "".join(
          f"{queries[i]}\t{values[i]:.6f}\n" for i in order))
    results.append({"name": name, "per_query_dir": str(d)})
  rows = sweep.paired_tests(results, "untrained")
  diff = ndcg["a"] - ndcg["untrained"]
  t = diff.mean() / (diff.std(ddof=1) / np.sqrt(40))
  p = 2 * stats.t.sf(abs(t), df=39)
  assert rows[1] == ["a", "untrained", sweep.SYSTEMS[0], f"{100 * diff.mean():+.2f}", f"{p:.3f}", "40"]
  assert len(rows) == 1 + len(sweep.SYSTEMS)
  (tmp_path / "a" / f"{sweep.SYSTEMS[0]}.tsv").write_text("query_id\tnDCG@10\n0\t1.0\n")
  with pytest.raises(ValueError, match="different queries"):
    sweep.paired_tests(results, "untrained")


def test_a_model_of_another_recipe_is_never_reused(sweep, tmp_path, monkeypatch):
  ran = []
  monkeypatch.setattr(sweep, "_run", lambda cmd, *a, **k: ran.append(cmd))
  (tmp_path / "xtr_b256" / "train" / "model").mkdir(parents=True)
  for recipe_json in (None, {"experiment": "xtr_minilm_cpu_b256", "overrides": ["xtr_loss.k_train=256"],
                             "heldout_drop": ["1/2"]}):
    if recipe_json is not None:
      (tmp_path / "xtr_b256" / "recipe.json").write_text(json.dumps(recipe_json))
    with pytest.raises(ValueError, match="another recipe or held-out split"):
      sweep.run_recipe("xtr_b256", out=str(tmp_path), heldout="unused", drop=["1/2"], env={}, max_queries=None)
  assert not ran  # neither training nor evaluation started


def test_a_second_sigterm_during_the_cleanup_is_ignored(sweep):
  # `timeout` sends SIGTERM to the sweep and then to its whole process group: the sweep must stop once, cleanly
  # (a second KeyboardInterrupt in the middle of killing its commands lost the table on the GPU run of session 11).
  saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    sweep._interrupt_on_signals()
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
    os.kill(os.getpid(), signal.SIGTERM)  # the second one: ignored, neither raises nor ends pytest
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
  finally:
    for s, handler in saved.items():
      signal.signal(s, handler)
