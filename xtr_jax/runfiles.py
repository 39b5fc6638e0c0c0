"""TREC run files: `qid Q0 docid rank score tag`, one line per retrieved document, ranks 1.. per query.

Written from rankings in order (best first, the order the retriever produced); read back with validation so that a
malformed file fails with its path, line number and field rather than scoring silently wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

_NO_SPACE = re.compile(r"^\S+$")


def write_run(path: str, rankings: Mapping[str, Sequence[tuple[str, float]]], tag: str) -> int:
  """Writes {query_id: [(doc_id, score), ...] best first}; returns the number of lines written.

  Scores must be non-increasing within a query (the rank order is the file's meaning; trec_eval re-sorts by score,
  so a run whose ranks and scores disagree would be evaluated differently from how it reads).
  """
  if not _NO_SPACE.match(tag):
    raise ValueError(f"run tag must be one non-empty word without whitespace, got {tag!r}")
  lines = 0
  with open(path, "w", encoding="utf-8") as f:
    for qid in sorted(rankings):
      if not _NO_SPACE.match(qid):
        raise ValueError(f"query id {qid!r} is empty or has whitespace; it cannot go in a TREC run file")
      previous = math.inf
      seen = set()
      for rank, (doc_id, score) in enumerate(rankings[qid], start=1):
        score = float(score)
        if not _NO_SPACE.match(doc_id):
          raise ValueError(f"query {qid!r}: document id {doc_id!r} is empty or has whitespace")
        if doc_id in seen:
          raise ValueError(f"query {qid!r}: document {doc_id!r} appears twice")
        if not math.isfinite(score):
          raise ValueError(f"query {qid!r}: document {doc_id!r} has non-finite score {score}")
        if score > previous:
          raise ValueError(f"query {qid!r}: rank {rank} ({doc_id!r}) has score {score} above rank {rank - 1}'s "
                           f"{previous}; rankings must be sorted best first")
        seen.add(doc_id)
        previous = score
        f.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")
        lines += 1
  return lines


def read_run(path: str) -> dict[str, list[tuple[str, float]]]:
  """Reads a TREC run file into {query_id: [(doc_id, score), ...] in rank order}.

  Errors name the file and line: wrong column count, Q0 field, non-integer or non-consecutive rank, non-numeric
  score, or a document listed twice for one query.
  """
  out: dict[str, list[tuple[str, float]]] = {}
  seen: dict[str, set[str]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      fields = line.split()
      where = f"{path}:{lineno}"
      if len(fields) != 6:
        raise ValueError(f"{where}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}: {line!r}")
      qid, q0, doc_id, rank_s, score_s, _ = fields
      if q0 != "Q0":
        raise ValueError(f"{where}: field 2 must be 'Q0', got {q0!r}")
      try:
        rank = int(rank_s)
      except ValueError:
        raise ValueError(f"{where}: field 4 (rank) must be an integer, got {rank_s!r}") from None
      try:
        score = float(score_s)
      except ValueError:
        raise ValueError(f"{where}: field 5 (score) must be a number, got {score_s!r}") from None
      ranking = out.setdefault(qid, [])
      if rank != len(ranking) + 1:
        raise ValueError(f"{where}: query {qid!r} rank {rank}, expected {len(ranking) + 1} (ranks are 1, 2, ... "
                         "consecutive per query)")
      if doc_id in seen.setdefault(qid, set()):
        raise ValueError(f"{where}: query {qid!r} lists document {doc_id!r} twice")
      seen[qid].add(doc_id)
      ranking.append((doc_id, score))
  return out
