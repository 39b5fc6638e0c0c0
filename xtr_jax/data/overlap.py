"""Train/eval contamination check: refuse to train when an evaluation query also appears as a training query.

Queries are compared after normalisation (Unicode NFKC, lowercase, whitespace collapsed, surrounding punctuation
stripped), so trivial rewrites of the same question are caught; the error names every overlapping row.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")


def normalize_query(text: str) -> str:
  text = unicodedata.normalize("NFKC", text).lower()
  return _SPACE.sub(" ", text).strip().strip(" .?!;:,\"'")


@dataclass(frozen=True)
class QueryRow:
  """Where a query text came from: `source` (file or dataset name), `row` (1-based line or query id), the text."""
  source: str
  row: str
  text: str


@dataclass(frozen=True)
class Overlap:
  train: QueryRow
  eval: QueryRow


class TrainEvalOverlapError(ValueError):
  """Raised when evaluation queries occur in the training data; `.overlaps` lists them."""

  def __init__(self, overlaps: list[Overlap], max_listed: int = 20):
    self.overlaps = overlaps
    lines = [f"  train {o.train.source}:{o.train.row} == eval {o.eval.source}:{o.eval.row}: {o.eval.text!r}"
             for o in overlaps[:max_listed]]
    more = f"\n  ... and {len(overlaps) - max_listed} more" if len(overlaps) > max_listed else ""
    super().__init__(f"{len(overlaps)} evaluation queries also occur in the training data (by normalised query "
                     f"text); remove them from training or choose another evaluation set:\n" + "\n".join(lines) + more)


def find_overlaps(train_rows: Iterable[QueryRow], eval_rows: Iterable[QueryRow]) -> list[Overlap]:
  """Every (train, eval) pair of rows whose normalised query texts are equal, in training-row order."""
  by_text: dict[str, list[QueryRow]] = {}
  for row in eval_rows:
    key = normalize_query(row.text)
    if key:
      by_text.setdefault(key, []).append(row)
  found = []
  for row in train_rows:
    for match in by_text.get(normalize_query(row.text), ()):
      found.append(Overlap(train=row, eval=match))
  return found


def check_no_overlap(train_rows: Iterable[QueryRow], eval_rows: Iterable[QueryRow]) -> None:
  """Raises TrainEvalOverlapError naming the rows when any evaluation query is also a training query."""
  overlaps = find_overlaps(train_rows, eval_rows)
  if overlaps:
    raise TrainEvalOverlapError(overlaps)
