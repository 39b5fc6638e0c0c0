"""The train/eval contamination check, on toys and on the real training and evaluation queries."""

import json

import pytest

from xtr_jax.data import overlap


def test_normalisation_catches_trivial_rewrites():
  assert overlap.normalize_query("  What is  XTR? ") == overlap.normalize_query("what is xtr")
  assert overlap.normalize_query("what is xtr") != overlap.normalize_query("what is colbert")


def test_overlap_names_rows():
  train = [overlap.QueryRow("train.jsonl", "1", "Who wrote Hamlet?"),
           overlap.QueryRow("train.jsonl", "2", "what is xtr"),
           overlap.QueryRow("train.jsonl", "3", "unrelated")]
  evals = [overlap.QueryRow("scifact/test", "q7", "What is XTR?"), overlap.QueryRow("scifact/test", "q8", "other")]
  with pytest.raises(overlap.TrainEvalOverlapError) as e:
    overlap.check_no_overlap(train, evals)
  assert len(e.value.overlaps) == 1
  assert "train train.jsonl:2 == eval scifact/test:q7" in str(e.value)
  overlap.check_no_overlap(train[:1], evals)  # no overlap: no error


def test_real_training_queries_do_not_overlap_scifact_test_or_cranfield(data_dir):
  train = []
  for name in ("squad-v1.1-dev-pairs.jsonl", "medquad-pairs.jsonl"):
    with open(data_dir / "train" / name, encoding="utf-8") as f:
      train += [overlap.QueryRow(name, str(i), json.loads(line)["query"]) for i, line in enumerate(f, 1)]
  with open(data_dir / "train" / "msmarco-triples-first100.tsv", encoding="utf-8") as f:
    train += [overlap.QueryRow("msmarco", str(i), line.split("\t")[0]) for i, line in enumerate(f, 1)]
  assert len(train) == 10570 + 16359 + 100
  evals = []
  for ds in ("scifact", "cranfield"):
    test_ids = {line.split("\t")[0] for line in open(data_dir / "beir" / ds / "qrels" / "test.tsv")}
    with open(data_dir / "beir" / ds / "queries.jsonl", encoding="utf-8") as f:
      for line in f:
        q = json.loads(line)
        if q["_id"] in test_ids:
          evals.append(overlap.QueryRow(ds, q["_id"], q["text"]))
  assert len(evals) == 300 + 225
  # SciFact train queries as training data vs SciFact test: disjoint by construction of the split.
  assert overlap.find_overlaps(train, evals) == []
