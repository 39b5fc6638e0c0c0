"""BEIR datasets without TensorFlow: streaming, validated readers of corpus.jsonl / queries.jsonl / qrels/<split>.tsv.

Layout (https://github.com/beir-cellar/beir): `corpus.jsonl` lines `{"_id", "title"?, "text", ...}`, `queries.jsonl`
lines `{"_id", "text", ...}`, `qrels/<split>.tsv` with header `query-id<TAB>corpus-id<TAB>score` and integer scores.

Every malformed input raises `BeirFormatError` naming the file, the 1-based line, the field, and what was expected
versus found. Empty texts are kept (a document may legitimately be empty) with one warning per file. Qrels rows that
point at documents or queries absent from the dataset are kept (official BEIR scoring keeps them) but counted and
reported. `download_beir` fetches the public zip into a cache and checks its published md5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable, Iterator

BEIR_BASE_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
# md5 of the public zips as published in the BEIR README ("Available Datasets" table).
BEIR_ZIP_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}

QRELS_HEADER = ("query-id", "corpus-id", "score")


class BeirFormatError(ValueError):
  """A BEIR file that does not follow the format; the message names file, line and field."""


class BeirDownloadError(RuntimeError):
  """The dataset could not be fetched or failed its checksum."""


@dataclasses.dataclass(frozen=True)
class BeirDoc:
  doc_id: str
  title: str
  text: str


@dataclasses.dataclass
class Qrels:
  """Relevance judgments of one split: `relevance[query_id][doc_id] = int score`.

  `unknown_docs` / `unknown_queries` count rows whose ids are not in the corpus / queries given to `load_qrels`
  (None when those ids were not given); such rows are kept in `relevance`.
  """
  path: str
  relevance: dict[str, dict[str, int]]
  num_rows: int
  unknown_docs: int | None = None
  unknown_queries: int | None = None
  duplicate_rows: int = 0

  @property
  def num_queries(self) -> int:
    return len(self.relevance)


def _where(path: str | os.PathLike, line_no: int) -> str:
  return f"{os.fspath(path)}:{line_no}"


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
  """(1-based line number, decoded line without the newline), streaming; invalid UTF-8 names line and byte column."""
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise BeirFormatError(f"{_where(path, line_no)}: invalid UTF-8 at byte {e.start} of the line "
                              f"(expected UTF-8 text, got {raw[e.start:e.start + 4]!r})") from None
      yield line_no, line.rstrip("\r\n")


def parse_json_object(path, line_no: int, line: str, error: type[ValueError] = BeirFormatError) -> dict:
  """One JSONL line as a dict; `error` (naming file:line and the problem) on malformed JSON or a non-object.

  Shared by every JSONL reader of `xtr_jax.data` so all of them report bad lines the same way.
  """
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise error(f"{_where(path, line_no)}: malformed JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise error(f"{_where(path, line_no)}: expected a JSON object, got {type(obj).__name__}")
  return obj


def _get_id(path, line_no: int, obj: dict, field: str = "_id") -> str:
  if field not in obj:
    raise BeirFormatError(f"{_where(path, line_no)}: missing field {field!r} (got fields {sorted(obj)})")
  value = obj[field]
  # Some BEIR exports write numeric ids; they are the same id as their decimal string.
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise BeirFormatError(f"{_where(path, line_no)}: field {field!r} must be a string, got "
                          f"{type(value).__name__} {value!r}")
  value = str(value)
  if not value:
    raise BeirFormatError(f"{_where(path, line_no)}: field {field!r} is empty")
  return value


def _get_text(path, line_no: int, obj: dict, field: str, *, required: bool) -> str:
  if field not in obj or obj[field] is None:
    if required:
      raise BeirFormatError(f"{_where(path, line_no)}: missing field {field!r} (got fields {sorted(obj)})")
    return ""
  value = obj[field]
  if not isinstance(value, str):
    raise BeirFormatError(f"{_where(path, line_no)}: field {field!r} must be a string, got "
                          f"{type(value).__name__}")
  return value


def _warn_empty(path, kind: str, empty_ids: list[str], count: int) -> None:
  if count:
    msg = (f"{os.fspath(path)}: {count} {kind} with empty text kept (they encode to special tokens only); "
           f"first ids: {empty_ids}")
    logging.warning(msg)
    warnings.warn(msg, stacklevel=3)


def _first_line_of(path, wanted_id: str) -> int:
  """Line of the first record with `_id == wanted_id` (rescans the file; only used to report a duplicate)."""
  for line_no, line in iter_lines(path):
    if line.strip():
      try:
        if str(json.loads(line).get("_id")) == wanted_id:
          return line_no
      except (json.JSONDecodeError, AttributeError):
        continue
  return -1


def iter_corpus(path: str | os.PathLike) -> Iterator[BeirDoc]:
  """Streams `BeirDoc`s from corpus.jsonl in file order, validating each line.

  Only the set of ids seen so far is held (to reject duplicates; ~0.1 GB per million ids), never the texts, so an
  8.8M-passage corpus can be streamed into an encoder without being held in memory at all.
  Blank lines are skipped. Raises BeirFormatError on malformed JSON, missing/non-string `_id` or `text`, a
  non-string `title`, duplicate `_id`, or invalid UTF-8.
  """
  seen: set[str] = set()  # ids only (no line numbers): the smallest thing that detects duplicates
  empty_ids: list[str] = []
  empty = 0
  for line_no, line in iter_lines(path):
    if not line.strip():
      continue
    obj = parse_json_object(path, line_no, line)
    doc_id = _get_id(path, line_no, obj)
    text = _get_text(path, line_no, obj, "text", required=True)
    title = _get_text(path, line_no, obj, "title", required=False)
    if doc_id in seen:
      raise BeirFormatError(f"{_where(path, line_no)}: duplicate document id {doc_id!r} in field '_id' "
                            f"(first seen on line {_first_line_of(path, doc_id)})")
    seen.add(doc_id)
    if not text.strip() and not title.strip():
      empty += 1
      if len(empty_ids) < 5:
        empty_ids.append(doc_id)
    yield BeirDoc(doc_id, title, text)
  _warn_empty(path, "documents", empty_ids, empty)


def load_corpus(path: str | os.PathLike) -> dict[str, BeirDoc]:
  """doc_id -> BeirDoc in file order (validated as `iter_corpus`)."""
  return {d.doc_id: d for d in iter_corpus(path)}


def load_queries(path: str | os.PathLike, ids: Iterable[str] | None = None) -> dict[str, str]:
  """query_id -> text in file order; with `ids`, only those queries are kept (all lines are still validated)."""
  wanted = None if ids is None else set(ids)
  out: dict[str, str] = {}
  seen: dict[str, int] = {}
  empty_ids: list[str] = []
  empty = 0
  for line_no, line in iter_lines(path):
    if not line.strip():
      continue
    obj = parse_json_object(path, line_no, line)
    qid = _get_id(path, line_no, obj)
    text = _get_text(path, line_no, obj, "text", required=True)
    if qid in seen:
      raise BeirFormatError(f"{_where(path, line_no)}: duplicate query id {qid!r} in field '_id' "
                            f"(first seen on line {seen[qid]})")
    seen[qid] = line_no
    if not text.strip():
      empty += 1
      if len(empty_ids) < 5:
        empty_ids.append(qid)
    if wanted is None or qid in wanted:
      out[qid] = text
  _warn_empty(path, "queries", empty_ids, empty)
  return out


def qrels_path(root: str | os.PathLike, split: str) -> str:
  return os.path.join(os.fspath(root), "qrels", f"{split}.tsv")


def load_qrels(root_or_file: str | os.PathLike, split: str = "test", *, corpus_ids: Iterable[str] | None = None,
               query_ids: Iterable[str] | None = None) -> Qrels:
  """Reads `qrels/<split>.tsv` of a dataset root (or a .tsv path directly).

  Each row is `query-id TAB corpus-id TAB score` with an integer score (the header row is optional). Rows with the
  wrong number of fields or a non-integer score raise BeirFormatError. A repeated (query, doc) pair keeps the last
  score and is counted in `duplicate_rows` with a warning. With `corpus_ids` / `query_ids`, rows pointing at unknown
  ids are counted in `unknown_docs` / `unknown_queries` and reported with a warning, not dropped.
  """
  path = os.fspath(root_or_file)
  if not path.endswith(".tsv"):
    path = qrels_path(path, split)
  docs = None if corpus_ids is None else (corpus_ids if isinstance(corpus_ids, (set, dict)) else set(corpus_ids))
  queries = None if query_ids is None else (query_ids if isinstance(query_ids, (set, dict)) else set(query_ids))
  relevance: dict[str, dict[str, int]] = {}
  rows = duplicates = 0
  unknown_docs = 0 if docs is not None else None
  unknown_queries = 0 if queries is not None else None
  for line_no, line in iter_lines(path):
    if not line.strip():
      continue
    fields = line.split("\t")
    if line_no == 1 and tuple(f.strip().lower() for f in fields) == QRELS_HEADER:
      continue
    if len(fields) != 3:
      raise BeirFormatError(f"{_where(path, line_no)}: expected 3 tab-separated fields "
                            f"(query-id, corpus-id, score), got {len(fields)}: {line[:80]!r}")
    qid, did, score_s = (f.strip() for f in fields)
    if not qid or not did:
      field = "query-id" if not qid else "corpus-id"
      raise BeirFormatError(f"{_where(path, line_no)}: field {field!r} is empty")
    try:
      score = int(score_s)
    except ValueError:
      raise BeirFormatError(f"{_where(path, line_no)}: field 'score' must be an integer, got {score_s!r}") from None
    rows += 1
    per_query = relevance.setdefault(qid, {})
    if did in per_query:
      duplicates += 1
    per_query[did] = score
    if docs is not None and did not in docs:
      unknown_docs += 1
    if queries is not None and qid not in queries:
      unknown_queries += 1
  if duplicates:
    warnings.warn(f"{path}: {duplicates} repeated (query-id, corpus-id) rows; the last score wins", stacklevel=2)
  if unknown_docs or unknown_queries:
    msg = (f"{path}: {unknown_docs or 0} qrels rows point at documents not in the corpus and "
           f"{unknown_queries or 0} at queries not in queries.jsonl; they are kept (as official BEIR scoring does)")
    logging.warning(msg)
    warnings.warn(msg, stacklevel=2)
  return Qrels(path=path, relevance=relevance, num_rows=rows, unknown_docs=unknown_docs,
               unknown_queries=unknown_queries, duplicate_rows=duplicates)


@dataclasses.dataclass
class BeirDataset:
  """A loaded split: corpus (all documents), the queries that have judgments in this split, and its qrels."""
  root: str
  split: str
  corpus: dict[str, BeirDoc]
  queries: dict[str, str]
  qrels: Qrels


def load_beir(root: str | os.PathLike, split: str = "test") -> BeirDataset:
  """Loads a BEIR dataset directory for one split, checking that the three files exist first."""
  root = os.fspath(root)
  for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", f"{split}.tsv")):
    if not os.path.isfile(os.path.join(root, name)):
      raise FileNotFoundError(f"BEIR dataset at {root!r} has no {name} (expected corpus.jsonl, queries.jsonl, "
                              f"qrels/{split}.tsv)")
  corpus = load_corpus(os.path.join(root, "corpus.jsonl"))
  all_queries = load_queries(os.path.join(root, "queries.jsonl"))
  qrels = load_qrels(root, split, corpus_ids=corpus, query_ids=all_queries)
  queries = {q: all_queries[q] for q in qrels.relevance if q in all_queries}
  return BeirDataset(root=root, split=split, corpus=corpus, queries=queries, qrels=qrels)


def file_md5(path: str | os.PathLike) -> str:
  h = hashlib.md5()  # the checksum BEIR publishes
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify_md5(path: str | os.PathLike, expected: str) -> None:
  got = file_md5(path)
  if got != expected.lower():
    raise BeirDownloadError(f"checksum mismatch for {os.fspath(path)}: expected md5 {expected}, got {got} "
                            "(truncated or tampered download; delete it and retry)")


def _safe_extract(zip_path: str, dest: str) -> None:
  dest_real = os.path.realpath(dest)
  with zipfile.ZipFile(zip_path) as zf:
    for member in zf.namelist():
      target = os.path.realpath(os.path.join(dest, member))
      if not (target == dest_real or target.startswith(dest_real + os.sep)):
        raise BeirDownloadError(f"{zip_path}: archive member {member!r} escapes the target directory")
    zf.extractall(dest)


def download_beir(name: str, cache_dir: str | os.PathLike, *, base_url: str = BEIR_BASE_URL,
                  md5: str | None = None, timeout_s: float = 30.0) -> str:
  """Fetches `<base_url>/<name>.zip` into `cache_dir`, verifies its md5, extracts it; returns `cache_dir/name`.

  A dataset already extracted in the cache is returned without network access. `md5` defaults to the checksum BEIR
  publishes for `name`; a dataset without a known checksum needs `md5` passed explicitly. When the server cannot be
  reached, BeirDownloadError says to download the zip elsewhere and pass the local dataset directory instead.
  """
  cache_dir = os.fspath(cache_dir)
  root = os.path.join(cache_dir, name)
  if os.path.isfile(os.path.join(root, "corpus.jsonl")):
    return root
  expected = md5 or BEIR_ZIP_MD5.get(name)
  if expected is None:
    raise BeirDownloadError(f"no published checksum known for BEIR dataset {name!r} (known: "
                            f"{sorted(BEIR_ZIP_MD5)}); pass md5=... or a local dataset directory")
  os.makedirs(cache_dir, exist_ok=True)
  url = f"{base_url.rstrip('/')}/{name}.zip"
  zip_path = os.path.join(cache_dir, f"{name}.zip")
  part = zip_path + ".part"
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(part, "wb") as out:
      shutil.copyfileobj(resp, out, 1 << 20)
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    if os.path.exists(part):
      os.remove(part)
    raise BeirDownloadError(
        f"could not download BEIR dataset {name!r} from {url}: {e}. Without network access, download {name}.zip "
        f"on another machine (md5 {expected}), unzip it, and pass the local dataset directory (the folder with "
        f"corpus.jsonl, queries.jsonl and qrels/) instead of a dataset name.") from e
  try:
    verify_md5(part, expected)
  except BeirDownloadError:
    os.remove(part)
    raise
  os.replace(part, zip_path)
  _safe_extract(zip_path, cache_dir)
  if not os.path.isfile(os.path.join(root, "corpus.jsonl")):
    raise BeirDownloadError(f"{zip_path} did not contain {name}/corpus.jsonl")
  return root


def resolve_beir(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
  """A local dataset directory as is; otherwise a BEIR name downloaded into `cache_dir` (default ~/.cache/xtr_jax)."""
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.sep in name_or_path or name_or_path.startswith("."):
    raise FileNotFoundError(f"BEIR dataset directory {name_or_path!r} does not exist")
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "xtr_jax", "beir")
  return download_beir(name_or_path, cache_dir)
