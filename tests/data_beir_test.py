"""BEIR reader: real SciFact / Cranfield counts, validation errors on malformed files, and the downloader."""

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from xtr_jax.data import beir


def test_scifact_counts(data_dir):
  root = data_dir / "beir" / "scifact"
  docs = list(beir.iter_corpus(root / "corpus.jsonl"))
  assert len(docs) == 5183
  assert len({d.doc_id for d in docs}) == 5183
  assert docs[0].doc_id == "4983" and docs[0].title.startswith("Microstructural development")
  queries = beir.load_queries(root / "queries.jsonl")
  assert len(queries) == 1109
  ids = {d.doc_id for d in docs}
  test = beir.load_qrels(root, "test", corpus_ids=ids, query_ids=queries)
  assert (test.num_rows, test.num_queries, test.unknown_docs, test.unknown_queries) == (339, 300, 0, 0)
  train = beir.load_qrels(root, "train", corpus_ids=ids, query_ids=queries)
  assert (train.num_rows, train.num_queries) == (919, 809)
  assert not set(test.relevance) & set(train.relevance)
  assert {s for rel in test.relevance.values() for s in rel.values()} == {1}
  ds = beir.load_beir(root, "test")
  assert len(ds.queries) == 300 and len(ds.corpus) == 5183


def test_cranfield_counts_and_empty_docs_kept_with_warning(data_dir):
  root = data_dir / "beir" / "cranfield"
  with pytest.warns(UserWarning, match="2 documents with empty text kept"):
    ds = beir.load_beir(root, "test")
  assert len(ds.corpus) == 1400 and len(ds.queries) == 225 and ds.qrels.num_rows == 1612
  assert ds.corpus["471"].text == ""  # kept, not dropped
  grades = {s for rel in ds.qrels.relevance.values() for s in rel.values()}
  assert grades <= {-1, 0, 1, 2, 3, 4} and max(grades) == 4


def _write(path, text: str | bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


GOOD = '{"_id": "d1", "title": "T", "text": "hello"}\n'


@pytest.mark.parametrize("content, pattern", [
    (GOOD + '{"_id": "d2", "text": "x"\n', r"corpus.jsonl:2: malformed JSON"),
    (GOOD + '{"title": "t", "text": "x"}\n', r"corpus.jsonl:2: missing field '_id'"),
    (GOOD + '{"_id": "d2", "title": "t"}\n', r"corpus.jsonl:2: missing field 'text'"),
    (GOOD + '{"_id": "d2", "text": 5}\n', r"corpus.jsonl:2: field 'text' must be a string, got int"),
    (GOOD + '{"_id": ["d2"], "text": "x"}\n', r"corpus.jsonl:2: field '_id' must be a string, got list"),
    (GOOD + '\n{"_id": "d1", "text": "again"}\n', r"corpus.jsonl:3: duplicate document id 'd1'.*first seen on line 1"),
    (GOOD + '[1, 2]\n', r"corpus.jsonl:2: expected a JSON object, got list"),
    (GOOD.encode() + b'{"_id": "d2", "text": "caf\xe9"}\n',
     r"corpus.jsonl:2: invalid UTF-8 at byte %d" % len(b'{"_id": "d2", "text": "caf')),
])
def test_malformed_corpus_errors_name_file_line_field(tmp_path, content, pattern):
  path = _write(tmp_path / "corpus.jsonl", content)
  with pytest.raises(beir.BeirFormatError, match=pattern):
    list(beir.iter_corpus(path))


def test_malformed_queries(tmp_path):
  path = _write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n')
  with pytest.raises(beir.BeirFormatError, match=r"queries.jsonl:2: duplicate query id 'q1'"):
    beir.load_queries(path)
  path = _write(tmp_path / "q2.jsonl", '{"_id": "q1", "text": ""}\n{"_id": "q2", "text": "b"}\n')
  with pytest.warns(UserWarning, match="1 queries with empty text kept"):
    assert beir.load_queries(path) == {"q1": "", "q2": "b"}


@pytest.mark.parametrize("rows, pattern", [
    ("q1\td1\t1.5\n", r"test.tsv:2: field 'score' must be an integer, got '1.5'"),
    ("q1\td1\n", r"test.tsv:2: expected 3 tab-separated fields .* got 2"),
    ("q1\td1\t1\textra\n", r"test.tsv:2: expected 3 tab-separated fields .* got 4"),
    ("q1\t\t1\n", r"test.tsv:2: field 'corpus-id' is empty"),
])
def test_malformed_qrels(tmp_path, rows, pattern):
  _write(tmp_path / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + rows)
  with pytest.raises(beir.BeirFormatError, match=pattern):
    beir.load_qrels(tmp_path, "test")


def test_qrels_unknown_ids_counted_and_kept(tmp_path):
  _write(tmp_path / "corpus.jsonl", GOOD + '{"_id": "d2", "text": "x"}\n')
  _write(tmp_path / "queries.jsonl", '{"_id": "q1", "text": "a"}\n')
  _write(tmp_path / "qrels" / "test.tsv",
         "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\tgone\t1\nq9\td2\t2\nq9\tgone2\t0\n")
  with pytest.warns(UserWarning, match="2 qrels rows point at documents not in the corpus and 2 at queries"):
    ds = beir.load_beir(tmp_path, "test")
  assert ds.qrels.num_rows == 4 and ds.qrels.unknown_docs == 2 and ds.qrels.unknown_queries == 2
  assert ds.qrels.relevance == {"q1": {"d1": 1, "gone": 1}, "q9": {"d2": 2, "gone2": 0}}
  assert list(ds.queries) == ["q1"]  # q9 has judgments but no text


def test_missing_files_named(tmp_path):
  _write(tmp_path / "corpus.jsonl", GOOD)
  with pytest.raises(FileNotFoundError, match="no queries.jsonl"):
    beir.load_beir(tmp_path, "test")


def _tiny_zip(tmp_path, name):
  src = tmp_path / "src"
  _write(src / name / "corpus.jsonl", GOOD)
  _write(src / name / "queries.jsonl", '{"_id": "q1", "text": "hello?"}\n')
  _write(src / name / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
  served = tmp_path / "served"
  served.mkdir()
  zpath = served / f"{name}.zip"
  with zipfile.ZipFile(zpath, "w") as zf:
    for f in sorted((src / name).rglob("*")):
      if f.is_file():
        zf.write(f, f.relative_to(src).as_posix())
  return served, hashlib.md5(zpath.read_bytes()).hexdigest()


def test_download_verifies_checksum_and_extracts(tmp_path):
  served, md5 = _tiny_zip(tmp_path, "tinyset")
  cache = tmp_path / "cache"
  bad = "0" * 32
  with pytest.raises(beir.BeirDownloadError, match=f"checksum mismatch .*expected md5 {bad}, got {md5}"):
    beir.download_beir("tinyset", cache, base_url=served.as_uri(), md5=bad)
  assert not (cache / "tinyset").exists()
  root = beir.download_beir("tinyset", cache, base_url=served.as_uri(), md5=md5)
  ds = beir.load_beir(root, "test")
  assert ds.qrels.relevance == {"q1": {"d1": 1}} and ds.corpus["d1"].text == "hello"
  # Cached: no network and no checksum needed the second time.
  assert beir.download_beir("tinyset", cache, base_url="http://127.0.0.1:9") == root


def test_download_unreachable_says_pass_local_path(tmp_path):
  with pytest.raises(beir.BeirDownloadError) as e:
    beir.download_beir("scifact", tmp_path, base_url="http://127.0.0.1:9/none", timeout_s=5)
  msg = str(e.value)
  assert "could not download BEIR dataset 'scifact'" in msg
  assert "pass the local dataset directory" in msg and beir.BEIR_ZIP_MD5["scifact"] in msg
  with pytest.raises(beir.BeirDownloadError, match="no published checksum known"):
    beir.download_beir("not-a-beir-set", tmp_path)


def test_beir_reader_does_not_import_tensorflow():
  code = ("import sys; import xtr_jax.data.beir, xtr_jax.data.mining, xtr_jax.data.training_files; "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "False"


def test_jsonl_round_trip_of_ids_as_numbers(tmp_path):
  path = _write(tmp_path / "corpus.jsonl", json.dumps({"_id": 12, "text": "x"}) + "\n")
  assert [d.doc_id for d in beir.iter_corpus(path)] == ["12"]


def test_resolve_beir_local_dir_or_name(tmp_path, data_dir):
  local = str(data_dir / "beir" / "scifact")
  assert beir.resolve_beir(local) == local  # a local directory is used as is, no network
  with pytest.raises(FileNotFoundError, match="does not exist"):
    beir.resolve_beir(str(tmp_path / "no" / "such"))
  # A name is looked up in the cache first.
  served, md5 = _tiny_zip(tmp_path, "scifact")
  beir.download_beir("scifact", tmp_path / "cache", base_url=served.as_uri(), md5=md5)
  assert beir.resolve_beir("scifact", tmp_path / "cache") == str(tmp_path / "cache" / "scifact")
