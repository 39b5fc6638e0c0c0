"""`TrainInput`: the trainer's per-process, deterministic, exactly resumable stream of XTR training batches.

Each call to `next()` returns this process's rows of the global batch as NumPy arrays:

    query_tokens int32 [b, Lq], query_mask bool [b, Lq], doc_tokens int32 [b, G, Ld], doc_mask bool [b, G, Ld]

with b = global_batch_size // process_count and G = 1 + num_negatives (positive FIRST). Tokens follow the T5
convention (pieces then EOS=1, padding 0; BERT: [CLS] pieces [SEP], padding 0) with XTR preprocessing (lowercase;
documents are `title text`).

Design (why NumPy and not a tf.data graph): the state of a NumPy stream is a handful of integers, so resuming is
exact by construction and costs nothing, with no TensorFlow in the training process. The seqio Tasks in
`xtr_jax.data.tasks` read the same sources through the same `example_texts` function and the same vocabulary, and
a test checks they produce identical tokens.

* Sharding: process p parses only the lines / queries i with i % process_count == p of every source.
* Order: each source is read in epochs; epoch e of process p is the permutation
  `default_rng([seed, source, p, e])` of its shard. Every example of the shard appears once per epoch.
* Mixture: the source of each row of step s is drawn from `default_rng([seed, MIX, p, s])` with the sources' rates.
* State: `{"step", per-source (epoch, position)}` plus the configuration it belongs to; `set_state` refuses a state
  saved under another seed, process layout, batch size or source list (that would silently change the data).
* Missing negatives (e.g. SQuAD rows without one) are filled with positives of other examples of the same source
  shard, drawn with `default_rng([seed, crc32(source), crc32(example_id)])`: fixed for an example across epochs and
  independent of the read order (with another process_count the pool, hence the filler, differs).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np

from xtr_jax import tokenization
from xtr_jax.data import mining, training_files
from xtr_jax.data.training_files import TrainingExample

BATCH_KEYS = ("query_tokens", "query_mask", "doc_tokens", "doc_mask")
_MIX_STREAM = 0x5EED
_STATE_FORMAT = "xtr_jax.TrainInput/1"


@dataclasses.dataclass(frozen=True)
class TrainingSource:
  """A named training source with a mixture rate; `load(shard_index, shard_count)` reads that shard."""
  name: str
  rate: float
  loader: Callable[[int, int], list[TrainingExample]]

  def load(self, shard_index: int = 0, shard_count: int = 1) -> list[TrainingExample]:
    return self.loader(shard_index, shard_count)


@gin.configurable("xtr_jsonl_source")
def jsonl_source(*, path: str = gin.REQUIRED, name: str | None = None, rate: float = 1.0,
                 query_field: str = "query", positive_field: str = "positive", negative_field: str = "negative",
                 skip_bad_lines: bool = False) -> TrainingSource:
  """JSONL pairs/triples (`{query, positive, negative?}`), e.g. the SQuAD and MedQuAD files."""
  def load(shard_index: int, shard_count: int) -> list[TrainingExample]:
    examples, report = training_files.read_jsonl_examples(
        path, query_field=query_field, positive_field=positive_field, negative_field=negative_field,
        skip_bad_lines=skip_bad_lines, shard_index=shard_index, shard_count=shard_count)
    _log_report(report)
    return examples
  return TrainingSource(name or _stem(path), rate, load)


@gin.configurable("xtr_tsv_triples_source")
def tsv_triples_source(*, path: str = gin.REQUIRED, name: str | None = None, rate: float = 1.0,
                       skip_bad_lines: bool = False) -> TrainingSource:
  """MS MARCO-style `query TAB positive TAB negative` lines."""
  def load(shard_index: int, shard_count: int) -> list[TrainingExample]:
    examples, report = training_files.read_triples_tsv(path, skip_bad_lines=skip_bad_lines,
                                                       shard_index=shard_index, shard_count=shard_count)
    _log_report(report)
    return examples
  return TrainingSource(name or _stem(path), rate, load)


@gin.configurable("xtr_beir_bm25_source")
def beir_bm25_source(*, root: str = gin.REQUIRED, split: str = "train", name: str | None = None, rate: float = 1.0,
                     num_bm25_negatives: int = 4, num_random_negatives: int = 0, seed: int = 0) -> TrainingSource:
  """BEIR train qrels + corpus with BM25 hard negatives (bm25s) and random negatives (see `mining`)."""
  def load(shard_index: int, shard_count: int) -> list[TrainingExample]:
    return mining.load_beir_training_examples(root, split, num_bm25_negatives=num_bm25_negatives,
                                              num_random_negatives=num_random_negatives, seed=seed,
                                              shard_index=shard_index, shard_count=shard_count)
  return TrainingSource(name or f"{_stem(root)}_{split}_bm25", rate, load)


def _log_report(report: training_files.ReadReport) -> None:
  logging.info("%s: %d examples (%d without a negative), %d bad lines skipped%s", report.path, report.rows,
               report.without_negative, report.skipped,
               f" (first: lines {report.skipped_lines})" if report.skipped else "")


def _stem(path: str) -> str:
  base = path.rstrip("/").rsplit("/", 1)[-1]
  return base.split(".", 1)[0] or base


def _crc(s: str) -> int:
  return zlib.crc32(s.encode("utf-8"))


def example_texts(example: TrainingExample, num_negatives: int, pool: Sequence[str], *, seed: int,
                  source_name: str) -> tuple[str, list[str]]:
  """XTR-preprocessed (query, [positive, negative_1..negative_N]) of one example.

  The example's own negatives come first (mined ones are best-first); missing ones are filled from `pool` (the
  positives of the source) with a generator seeded by (seed, source, example id), skipping texts equal to the
  positive or already chosen.
  """
  query = tokenization.preprocess_query(example.query)
  positive = tokenization.preprocess_document(None, example.positive)
  docs = [positive] + [tokenization.preprocess_document(None, n) for n in example.negatives[:num_negatives]]
  if len(docs) < 1 + num_negatives:
    rng = np.random.default_rng([seed, _crc(source_name), _crc(example.example_id)])
    chosen = set(docs)
    for _ in range(64 * (1 + num_negatives)):
      if len(docs) == 1 + num_negatives:
        break
      cand = tokenization.preprocess_document(None, pool[int(rng.integers(len(pool)))])
      if cand not in chosen:
        chosen.add(cand)
        docs.append(cand)
    if len(docs) < 1 + num_negatives:
      raise ValueError(f"source {source_name!r}: cannot fill {num_negatives} negatives for example "
                       f"{example.example_id!r}; the source has too few distinct documents ({len(pool)})")
  return query, docs


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  return process_index, process_count


@gin.configurable
class TrainInput:
  """Per-process iterator over XTR training batches; see the module docstring for order, sharding and state.

  Args:
    sources: training sources (`xtr_jsonl_source`, `xtr_tsv_triples_source`, `xtr_beir_bm25_source`), mixed by rate.
    global_batch_size: rows over all processes; must be divisible by process_count.
    vocab_path: T5/mT5 SentencePiece `.model` or BERT WordPiece `.txt` (or pass `tokenizer`).
    query_max_len / doc_max_len: Lq / Ld.
    num_negatives: N; documents per example G = 1 + N.
    seed: the whole stream is a function of (seed, sources, process layout).
    process_index / process_count: default `jax.process_index()` / `jax.process_count()`.
    include_example_ids: also return "example_id" (object [b]) and "source" (int32 [b]) for inspection.
    token_cache_size: tokenized texts kept (LRU, per max length); repeated passages (SQuAD paragraphs, MedQuAD
      answers, later epochs) skip SentencePiece. 0 disables it. The cache never changes the output.
  """

  def __init__(self, *, sources: Sequence[TrainingSource] = gin.REQUIRED, global_batch_size: int = gin.REQUIRED,
               vocab_path: str | None = None, tokenizer: tokenization.Tokenizer | None = None,
               query_max_len: int = 32, doc_max_len: int = 512, num_negatives: int = 1, seed: int = 0,
               process_index: int | None = None, process_count: int | None = None,
               include_example_ids: bool = False, token_cache_size: int = 65536):
    if not sources:
      raise ValueError("TrainInput needs at least one source")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
      raise ValueError(f"source names must be unique, got {names}")
    rates = np.asarray([s.rate for s in sources], dtype=np.float64)
    if np.any(rates < 0) or rates.sum() <= 0:
      raise ValueError(f"source rates must be >= 0 with a positive sum, got {rates.tolist()}")
    self.process_index, self.process_count = _process_layout(process_index, process_count)
    if global_batch_size % self.process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count "
                       f"{self.process_count}")
    if num_negatives < 0:
      raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    if tokenizer is None:
      if vocab_path is None:
        raise ValueError("TrainInput needs vocab_path (SentencePiece .model or WordPiece .txt) or tokenizer")
      tokenizer = tokenization.load_tokenizer(vocab_path)
    self.tokenizer = tokenizer
    self.sources = list(sources)
    self.rates = rates / rates.sum()
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // self.process_count
    self.query_max_len, self.doc_max_len = query_max_len, doc_max_len
    self.num_negatives = num_negatives
    self.seed = seed
    self.include_example_ids = include_example_ids
    self.examples = [s.load(self.process_index, self.process_count) for s in self.sources]
    for s, ex in zip(self.sources, self.examples):
      if not ex and s.rate > 0:
        raise ValueError(f"source {s.name!r} has no examples in shard {self.process_index}/{self.process_count}")
    self._pools = [[e.positive for e in ex] for ex in self.examples]
    self._step = 0
    self._cursors = [[0, 0] for _ in self.sources]  # (epoch, position) per source
    self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}
    self._token_cache: collections.OrderedDict[tuple[int, str], np.ndarray] = collections.OrderedDict()
    self._token_cache_size = int(token_cache_size)

  @property
  def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of a batch of this process."""
    g = 1 + self.num_negatives
    b, lq, ld = self.batch_size, self.query_max_len, self.doc_max_len
    return {"query_tokens": ((b, lq), np.dtype(np.int32)), "query_mask": ((b, lq), np.dtype(bool)),
            "doc_tokens": ((b, g, ld), np.dtype(np.int32)), "doc_mask": ((b, g, ld), np.dtype(bool))}

  def _permutation(self, source: int, epoch: int) -> np.ndarray:
    cached = self._perm_cache.get(source)
    if cached is None or cached[0] != epoch:
      rng = np.random.default_rng([self.seed, source, self.process_index, epoch])
      cached = (epoch, rng.permutation(len(self.examples[source])))
      self._perm_cache[source] = cached
    return cached[1]

  def _take(self, source: int) -> TrainingExample:
    epoch, pos = self._cursors[source]
    perm = self._permutation(source, epoch)
    ex = self.examples[source][int(perm[pos])]
    pos += 1
    if pos == len(perm):
      epoch, pos = epoch + 1, 0
    self._cursors[source] = [epoch, pos]
    return ex

  def _encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """As `tokenizer.batch_encode` (int32 [N, max_len], bool [N, max_len]), through the LRU token cache."""
    if self._token_cache_size <= 0:
      return self.tokenizer.batch_encode(texts, max_len)
    ids = np.full((len(texts), max_len), self.tokenizer.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    cache = self._token_cache
    for row, text in enumerate(texts):
      key = (max_len, text)
      toks = cache.get(key)
      if toks is None:
        toks = np.asarray(self.tokenizer.truncate(self.tokenizer.tokenize(text), max_len), dtype=np.int32)
        cache[key] = toks
        if len(cache) > self._token_cache_size:
          cache.popitem(last=False)
      else:
        cache.move_to_end(key)
      ids[row, :len(toks)] = toks
      mask[row, :len(toks)] = True
    return ids, mask

  def __iter__(self) -> TrainInput:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch (keys and shapes as `shapes`)."""
    rng = np.random.default_rng([self.seed, _MIX_STREAM, self.process_index, self._step])
    choice = rng.choice(len(self.sources), size=self.batch_size, p=self.rates)
    queries, docs, ids = [], [], []
    for src in choice:
      src = int(src)
      ex = self._take(src)
      q, d = example_texts(ex, self.num_negatives, self._pools[src], seed=self.seed,
                           source_name=self.sources[src].name)
      queries.append(q)
      docs.extend(d)
      ids.append(ex.example_id)
    self._step += 1
    g = 1 + self.num_negatives
    q_tok, q_mask = self._encode(queries, self.query_max_len)
    d_tok, d_mask = self._encode(docs, self.doc_max_len)
    batch = {"query_tokens": q_tok, "query_mask": q_mask,
             "doc_tokens": d_tok.reshape(self.batch_size, g, self.doc_max_len),
             "doc_mask": d_mask.reshape(self.batch_size, g, self.doc_max_len)}
    if self.include_example_ids:
      batch["example_id"] = np.asarray(ids, dtype=object)
      batch["source"] = choice.astype(np.int32)
    return batch

  def _config_fingerprint(self) -> dict[str, Any]:
    return {"format": _STATE_FORMAT, "seed": self.seed, "process_index": self.process_index,
            "process_count": self.process_count, "global_batch_size": self.global_batch_size,
            "num_negatives": self.num_negatives,
            "sources": [[s.name, len(ex)] for s, ex in zip(self.sources, self.examples)]}

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable state; `set_state` of it makes the next batches those an uninterrupted run would see."""
    return {**self._config_fingerprint(), "step": self._step, "cursors": [list(c) for c in self._cursors]}

  def set_state(self, state: dict[str, Any]) -> None:
    expected = self._config_fingerprint()
    for key, want in expected.items():
      got = state.get(key)
      if isinstance(want, list):
        got = [list(x) for x in got] if isinstance(got, list) else got
      if got != want:
        raise ValueError(f"input state does not belong to this pipeline: {key!r} is {got!r} in the state but "
                         f"{want!r} here (resume with the same data config, seed and process layout)")
    cursors = state["cursors"]
    for (epoch, pos), ex in zip(cursors, self.examples):
      if not (0 <= int(pos) < max(len(ex), 1) and int(epoch) >= 0):
        raise ValueError(f"input state cursor {(epoch, pos)} is out of range for a source of {len(ex)} examples")
    self._step = int(state["step"])
    self._cursors = [[int(e), int(p)] for e, p in cursors]
