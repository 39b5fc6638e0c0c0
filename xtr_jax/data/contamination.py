"""Refusing to train when the evaluation sets overlap the training data: the hook between `TrainInput` and
`overlap.check_no_overlap`.

An experiment wraps its input pipeline so that the check runs before any step (after the sources are read, before
the model is initialised or a checkpoint written):

    train.train_data = @xtr_overlap_checked_input()
    xtr_overlap_checked_input.train_data = @TrainInput()
    xtr_overlap_checked_input.eval_datasets = ["../shared/data/beir/scifact", "../shared/data/beir/cranfield"]
    xtr_overlap_checked_input.eval_split = "test"

Every training query this process reads (its shard of every source; together the processes cover all of them) is
compared with the queries judged in `qrels/<eval_split>.tsv` of each evaluation dataset, by normalised text
(`overlap.normalize_query`). A match raises `overlap.TrainEvalOverlapError` naming the training source and row
(`<file>:<line>` or the example id) and the evaluation dataset, split and query id.

The remedy is explicit: list the offending training rows in `xtr_source_excluding` around their source, so the
config says what was removed (BEIR SciFact, for instance, has two train queries that are verbatim copies of test
queries with the same gold document: train 871 = test 870, train 1291 = test 1292).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import gin

from xtr_jax.data import beir, overlap
from xtr_jax.data.input_pipeline import TrainingSource


def training_query_rows(train_input: Any) -> list[overlap.QueryRow]:
  """The query of every example `train_input` (a `TrainInput`) holds, as `QueryRow(source name, example id, text)`.

  Example ids name the row: `<file name>:<line>` for TSV / JSONL rows without an id, the file's `query_id`
  otherwise, `<query id>/<positive id>` for BEIR-mined examples.
  """
  sources = getattr(train_input, "sources", None)
  examples = getattr(train_input, "examples", None)
  if sources is None or examples is None:
    raise TypeError(f"expected a TrainInput (with .sources and .examples), got {type(train_input).__name__}")
  return [overlap.QueryRow(source.name, ex.example_id, ex.query)
          for source, rows in zip(sources, examples) for ex in rows]


def beir_query_rows(root: str, split: str) -> list[overlap.QueryRow]:
  """The queries judged in `root/qrels/<split>.tsv`, as `QueryRow("<dataset>/<split>", query id, text)`."""
  root = os.fspath(root)
  qrels = beir.load_qrels(root, split)
  queries = beir.load_queries(os.path.join(root, "queries.jsonl"), ids=qrels.relevance)
  name = f"{os.path.basename(os.path.normpath(root))}/{split}"
  return [overlap.QueryRow(name, qid, text) for qid, text in queries.items()]


@gin.configurable("xtr_source_excluding")
def source_excluding(*, source: TrainingSource = gin.REQUIRED,
                     example_ids: Sequence[str] = gin.REQUIRED) -> TrainingSource:
  """`source` without the examples whose id is in `example_ids` (ids as the overlap error prints them after
  `<source>:`, e.g. "871/195689316" for a BEIR-mined SciFact example, "train.jsonl:12" for a row without an id).

  Same name and rate as `source`. Reading the whole source (one shard), an id that matches no example raises
  ValueError, so a stale exclusion list cannot silently do nothing.
  """
  if isinstance(example_ids, str):
    example_ids = [example_ids]
  excluded = frozenset(str(i) for i in example_ids)

  def load(shard_index: int, shard_count: int) -> list:
    examples = source.load(shard_index, shard_count)
    kept = [ex for ex in examples if ex.example_id not in excluded]
    if shard_count == 1:
      unknown = sorted(excluded - {ex.example_id for ex in examples})
      if unknown:
        raise ValueError(f"xtr_source_excluding: source {source.name!r} has no examples with ids {unknown}; "
                         f"ids look like {[ex.example_id for ex in examples[:3]]}")
    logging.info("source %s: %d examples excluded by id", source.name, len(examples) - len(kept))
    return kept

  return TrainingSource(source.name, source.rate, load)


@gin.configurable("xtr_overlap_checked_input")
def overlap_checked_input(*, train_data: Any = gin.REQUIRED, eval_datasets: Sequence[str] = gin.REQUIRED,
                          eval_split: str = "test") -> Any:
  """Returns `train_data` unchanged after checking that none of its queries is an evaluation query.

  Args:
    train_data: a `data.input_pipeline.TrainInput` (its sources are already read).
    eval_datasets: BEIR dataset dirs (corpus.jsonl, queries.jsonl, qrels/<eval_split>.tsv) the model will be
      evaluated on.
    eval_split: the qrels split evaluated, e.g. "test".

  Raises:
    overlap.TrainEvalOverlapError: naming every overlapping (training row, evaluation query) pair.
    FileNotFoundError: an evaluation dataset lacks queries.jsonl or the qrels split.
  """
  if isinstance(eval_datasets, str):
    eval_datasets = [eval_datasets]
  if not eval_datasets:
    raise ValueError("xtr_overlap_checked_input.eval_datasets is empty: name the datasets the model is evaluated on")
  eval_rows: list[overlap.QueryRow] = []
  for root in eval_datasets:
    for name in ("queries.jsonl", os.path.join("qrels", f"{eval_split}.tsv")):
      if not os.path.isfile(os.path.join(root, name)):
        raise FileNotFoundError(f"evaluation dataset {root!r} has no {name}")
    eval_rows += beir_query_rows(root, eval_split)
  train_rows = training_query_rows(train_data)
  overlap.check_no_overlap(train_rows, eval_rows)
  logging.info("overlap check: %d training queries vs %d evaluation queries (%s, split %s): none shared",
               len(train_rows), len(eval_rows), ", ".join(eval_datasets), eval_split)
  print(f"[overlap] {len(train_rows):,} training queries checked against {len(eval_rows):,} {eval_split} queries "
        f"of {len(eval_datasets)} evaluation datasets: no overlap", flush=True)
  return train_data
