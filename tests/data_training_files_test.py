"""Training-file readers on the real SQuAD / MedQuAD / MS MARCO files and on malformed fixtures."""

import json

import pytest

from xtr_jax.data import training_files as tf


def test_squad_pairs(data_dir):
  examples, report = tf.read_jsonl_examples(data_dir / "train" / "squad-v1.1-dev-pairs.jsonl")
  assert report.rows == len(examples) == 10570
  assert report.without_negative == 5 and report.skipped == 0
  assert sum(1 for e in examples if not e.negatives) == 5
  first = examples[0]
  assert first.example_id == "56be4db0acb8001400a502ec"
  assert first.query == "Which NFL team represented the AFC at Super Bowl 50?"
  assert first.positive.startswith("Super Bowl 50 was an American football game")
  assert first.positive_id == "Super_Bowl_50_0" and first.negative_ids == ("Super_Bowl_50_19",)
  assert all(e.negatives[0] != e.positive for e in examples if e.negatives)


def test_medquad_pairs(data_dir):
  examples, report = tf.read_jsonl_examples(data_dir / "train" / "medquad-pairs.jsonl")
  assert report.rows == 16359
  assert sum(1 for e in examples if e.negatives) == 15083
  assert report.without_negative == 16359 - 15083


def test_msmarco_triples(data_dir):
  examples, report = tf.read_triples_tsv(data_dir / "train" / "msmarco-triples-first100.tsv")
  assert report.rows == 100 and report.skipped == 0
  assert examples[0].query == "is a little caffeine ok during pregnancy"
  assert all(len(e.negatives) == 1 for e in examples)
  assert examples[99].example_id == "msmarco-triples-first100.tsv:100"


def test_shards_partition_lines_exactly(data_dir):
  path = data_dir / "train" / "squad-v1.1-dev-pairs.jsonl"
  full, _ = tf.read_jsonl_examples(path)
  parts = [tf.read_jsonl_examples(path, shard_index=i, shard_count=3)[0] for i in range(3)]
  assert sum(len(p) for p in parts) == len(full)
  assert [e.example_id for e in parts[1]] == [e.example_id for e in full[1::3]]


def test_triples_wrong_field_count(tmp_path):
  path = tmp_path / "triples.tsv"
  path.write_text("q1\tp1\tn1\nq2\tp2\nq3\tp3\tn3\textra\n\tp4\tn4\nq5\tp5\t\n", encoding="utf-8")
  with pytest.raises(tf.TrainingFileError, match=r"triples.tsv:2: expected 3 tab-separated fields .*got 2"):
    tf.read_triples_tsv(path)
  examples, report = tf.read_triples_tsv(path, skip_bad_lines=True)
  assert [e.query for e in examples] == ["q1", "q5"]
  assert report.skipped == 3 and report.skipped_lines == [2, 3, 4]
  assert examples[1].negatives == () and report.without_negative == 1


@pytest.mark.parametrize("line, pattern", [
    ('{"query": "q", "positive": "p"', r"bad.jsonl:2: malformed JSON"),
    ('{"positive": "p"}', r"bad.jsonl:2: missing field 'query'"),
    ('{"query": "q", "positive": 3}', r"bad.jsonl:2: field 'positive' must be a string, got int"),
    ('{"query": "q", "positive": "  "}', r"bad.jsonl:2: field 'positive' is empty"),
    ('{"query": "q", "positive": "p", "negative": {"x": 1}}', r"bad.jsonl:2: field 'negative' must be a string"),
    ('"just a string"', r"bad.jsonl:2: expected a JSON object, got str"),
])
def test_jsonl_bad_lines(tmp_path, line, pattern):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"query": "Q", "positive": "P", "negative": ["N1", "N2"]})
  path.write_text(good + "\n" + line + "\n" + good + "\n", encoding="utf-8")
  with pytest.raises(tf.TrainingFileError, match=pattern):
    tf.read_jsonl_examples(path)
  examples, report = tf.read_jsonl_examples(path, skip_bad_lines=True)
  assert len(examples) == 2 and report.skipped == 1 and report.skipped_lines == [2]
  assert examples[0].negatives == ("N1", "N2") and examples[0].example_id == "bad.jsonl:1"


def test_jsonl_invalid_utf8(tmp_path):
  path = tmp_path / "u.jsonl"
  path.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "\xff", "positive": "p"}\n')
  with pytest.raises(tf.TrainingFileError, match=r"u.jsonl:2: invalid UTF-8"):
    tf.read_jsonl_examples(path)
