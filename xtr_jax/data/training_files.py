"""Training examples `(query, positive, negatives...)` from MS MARCO-style triples TSV and JSONL pair/triple files.

Texts are returned as written in the file; XTR preprocessing (lowercasing) happens where they are tokenized
(`xtr_jax.data.examples`). Bad lines raise `TrainingFileError` naming file, line and field, or -- with
`skip_bad_lines=True` -- are skipped and counted in the returned `ReadReport` (and logged).

Reading can be restricted to one shard of the lines (`shard_index`, `shard_count`: line i, 0-based, belongs to shard
i % shard_count): other lines are not parsed, so each training process only parses and holds its own part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

from xtr_jax.data import beir


class TrainingFileError(ValueError):
  """A malformed training file line; the message names file, line and field."""


@dataclasses.dataclass(frozen=True)
class TrainingExample:
  """One training example. `negatives` may be empty (the input pipeline fills missing negatives)."""
  example_id: str
  query: str
  positive: str
  negatives: tuple[str, ...] = ()
  positive_id: str | None = None
  negative_ids: tuple[str, ...] | None = None


@dataclasses.dataclass
class ReadReport:
  path: str
  rows: int = 0  # examples returned
  skipped: int = 0  # bad lines skipped (skip_bad_lines=True)
  skipped_lines: list[int] = dataclasses.field(default_factory=list)  # first 20 skipped line numbers
  without_negative: int = 0

  def skip(self, line_no: int, reason: str) -> None:
    self.skipped += 1
    if len(self.skipped_lines) < 20:
      self.skipped_lines.append(line_no)
      logging.warning("%s:%d skipped: %s", self.path, line_no, reason)


def _lines(path: str, shard_index: int, shard_count: int) -> Iterator[tuple[int, bytes]]:
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
  with open(path, "rb") as f:
    for i, raw in enumerate(f):
      if i % shard_count == shard_index:
        yield i + 1, raw


def _decode(path: str, line_no: int, raw: bytes) -> str:
  try:
    return raw.decode("utf-8").rstrip("\r\n")
  except UnicodeDecodeError as e:
    raise TrainingFileError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line") from None


def read_triples_tsv(path: str | os.PathLike, *, skip_bad_lines: bool = False, shard_index: int = 0,
                     shard_count: int = 1) -> tuple[list[TrainingExample], ReadReport]:
  """MS MARCO `triples.train.small.tsv` style: `query TAB positive TAB negative` per line.

  A line with a number of fields other than 3, or an empty query/positive, is bad. Example ids are
  `"<file name>:<line>"`.
  """
  path = os.fspath(path)
  report = ReadReport(path)
  out = []
  base = os.path.basename(path)
  for line_no, raw in _lines(path, shard_index, shard_count):
    try:
      line = _decode(path, line_no, raw)
      if not line.strip():
        continue
      fields = line.split("\t")
      if len(fields) != 3:
        raise TrainingFileError(f"{path}:{line_no}: expected 3 tab-separated fields (query, positive, negative), "
                                f"got {len(fields)}")
      query, positive, negative = fields
      for name, value in (("query", query), ("positive", positive)):
        if not value.strip():
          raise TrainingFileError(f"{path}:{line_no}: field {name!r} is empty")
    except TrainingFileError as e:
      if not skip_bad_lines:
        raise
      report.skip(line_no, str(e))
      continue
    negatives = (negative,) if negative.strip() else ()
    report.without_negative += not negatives
    out.append(TrainingExample(f"{base}:{line_no}", query, positive, negatives))
  report.rows = len(out)
  return out, report


def _string_field(path: str, line_no: int, obj: dict, field: str, *, required: bool) -> str | None:
  value = obj.get(field)
  if value is None:
    if required:
      raise TrainingFileError(f"{path}:{line_no}: missing field {field!r} (got fields {sorted(obj)})")
    return None
  if not isinstance(value, str):
    raise TrainingFileError(f"{path}:{line_no}: field {field!r} must be a string, got {type(value).__name__}")
  if required and not value.strip():
    raise TrainingFileError(f"{path}:{line_no}: field {field!r} is empty")
  return value


def read_jsonl_examples(path: str | os.PathLike, *, query_field: str = "query", positive_field: str = "positive",
                        negative_field: str = "negative", id_field: str | None = "query_id",
                        skip_bad_lines: bool = False, shard_index: int = 0,
                        shard_count: int = 1) -> tuple[list[TrainingExample], ReadReport]:
  """JSONL pairs/triples: one object per line with `query`, `positive` and optionally `negative`.

  `negative` may be a string, a list of strings, null or absent (no negative). The example id is the `id_field`
  value when present (e.g. SQuAD/MedQuAD `query_id`), else `"<file name>:<line>"`. A line is bad when it is not a
  JSON object, lacks a non-empty string query/positive, or has a negative of another type.
  """
  path = os.fspath(path)
  report = ReadReport(path)
  out = []
  base = os.path.basename(path)
  for line_no, raw in _lines(path, shard_index, shard_count):
    try:
      line = _decode(path, line_no, raw)
      if not line.strip():
        continue
      obj = beir.parse_json_object(path, line_no, line, TrainingFileError)
      query = _string_field(path, line_no, obj, query_field, required=True)
      positive = _string_field(path, line_no, obj, positive_field, required=True)
      neg = obj.get(negative_field)
      if neg is None:
        negatives: tuple[str, ...] = ()
      elif isinstance(neg, str):
        negatives = (neg,) if neg.strip() else ()
      elif isinstance(neg, list) and all(isinstance(n, str) for n in neg):
        negatives = tuple(n for n in neg if n.strip())
      else:
        raise TrainingFileError(f"{path}:{line_no}: field {negative_field!r} must be a string, a list of strings "
                                f"or null, got {type(neg).__name__}")
      ex_id = obj.get(id_field) if id_field else None
      ex_id = str(ex_id) if isinstance(ex_id, (str, int)) and not isinstance(ex_id, bool) else f"{base}:{line_no}"
      pos_id = obj.get("positive_id")
      neg_id = obj.get("negative_id")
    except TrainingFileError as e:
      if not skip_bad_lines:
        raise
      report.skip(line_no, str(e))
      continue
    report.without_negative += not negatives
    out.append(TrainingExample(ex_id, query, positive, negatives,
                               positive_id=str(pos_id) if pos_id is not None else None,
                               negative_ids=(str(neg_id),) if neg_id is not None and negatives else None))
  report.rows = len(out)
  return out, report
