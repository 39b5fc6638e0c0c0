"""seqio Tasks, a Mixture and a feature converter for XTR training data (imports TensorFlow; eval never needs it).

Task features (after the preprocessors): `query` int32 [<=Lq] and `docs` int32 [G, <=Ld] (G = 1 + negatives,
positive first), each sequence trimmed to its length minus one and closed by EOS (T5: pieces + EOS=1; BERT via
`WordPieceVocabulary`: [CLS] pieces + [SEP]). `XTRFeatureConverter` pads them to the trainer's fixed shapes:

    query_tokens int32 [Lq], query_mask bool [Lq], doc_tokens int32 [G, Ld], doc_mask bool [G, Ld]   (per example)

with padding id 0 and mask = token != 0 (0 is never a real piece in the T5 or BERT vocabularies).

The texts come from the same sources and the same `input_pipeline.example_texts` as `TrainInput`, so a seqio batch
and a TrainInput batch of the same examples hold the same tokens (tested).

    from xtr_jax.data import tasks
    names = tasks.register_xtr_tasks(data_dir="../shared/data", vocab_path=".../t5_spiece.model")
    ds = seqio.get_dataset(names.mixture, {"query": 32, "docs": 512}, tasks.XTRFeatureConverter(), seed=0)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from xtr_jax import tokenization
from xtr_jax.data import input_pipeline


class WordPieceVocabulary(seqio.Vocabulary):
  """seqio adapter around `tokenization.WordPieceTokenizer` (BERT): encode = [CLS] pieces; EOS = [SEP]; pad 0."""

  def __init__(self, vocab_path: str):
    self.vocab_path = vocab_path
    self._tok = tokenization.WordPieceTokenizer(vocab_path)
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int:
    return self._tok.sep_id

  @property
  def unk_id(self) -> int:
    return self._tok._tok.get_vocab()["[UNK]"]  # pylint: disable=protected-access

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.vocab_size

  def _encode(self, s: str) -> list[int]:
    return [self._tok.cls_id] + self._tok.pieces(s)

  def _decode(self, ids) -> str:
    specials = {self._tok.cls_id, self._tok.sep_id, self._tok.pad_id}
    return self._tok._tok.decode([int(i) for i in ids if int(i) not in specials])  # pylint: disable=protected-access

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """Scalar string -> int32 [n] (through the Rust tokenizer in a py_function: exact BERT WordPiece)."""
    def enc(x):
      return np.asarray(self._encode(x.numpy().decode("utf-8")), dtype=np.int32)
    out = tf.py_function(enc, [s], tf.int32)
    out.set_shape([None])
    return out

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    def dec(x):
      return np.asarray(self._decode(x.numpy().tolist()).encode("utf-8"), dtype=object)
    return tf.py_function(dec, [ids], tf.string)

  def __eq__(self, other) -> bool:
    return isinstance(other, WordPieceVocabulary) and other.vocab_path == self.vocab_path

  def __hash__(self) -> int:
    return hash(self.vocab_path)


def make_vocabulary(vocab_path: str) -> seqio.Vocabulary:
  """`seqio.SentencePieceVocabulary` for a T5/mT5 `.model`, `WordPieceVocabulary` for a BERT `.txt`.

  The file is loaded once here so that a missing file or a file that is not a SentencePiece model fails now with a
  clear message (seqio itself loads lazily, inside the tf.data graph).
  """
  if vocab_path.endswith(".txt"):
    return WordPieceVocabulary(vocab_path)
  tokenization.SentencePieceTokenizer(vocab_path)  # raises FileNotFoundError / ValueError naming the file
  return seqio.SentencePieceVocabulary(vocab_path)


def _trim_with_eos(ids: tf.Tensor, length: int, eos_id: int) -> tf.Tensor:
  return tf.concat([ids[:length - 1], tf.constant([eos_id], tf.int32)], axis=0)


def tokenize_trim_append_eos(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                             sequence_length: Mapping[str, int]) -> tf.data.Dataset:
  """Tokenizes `query` (scalar) and `docs` ([G] strings); trims each to length-1 and appends EOS (as T5 does)."""
  qvocab, dvocab = output_features["query"].vocabulary, output_features["docs"].vocabulary
  lq, ld = sequence_length["query"], sequence_length["docs"]
  if lq < 2 or ld < 2:
    raise ValueError(f"sequence lengths must be >= 2 (room for EOS), got query={lq} docs={ld}")

  def fn(ex):
    query = _trim_with_eos(tf.cast(qvocab.encode_tf(ex["query"]), tf.int32), lq, qvocab.eos_id)
    docs = tf.map_fn(lambda s: _trim_with_eos(tf.cast(dvocab.encode_tf(s), tf.int32), ld, dvocab.eos_id),
                     ex["docs"], fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))
    return {**ex, "query": query, "docs": docs.to_tensor(0)}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


class XTRFeatureConverter(seqio.FeatureConverter):
  """Task features {query [<=Lq], docs [G, <=Ld]} -> fixed-shape model features with boolean masks (no packing)."""

  TASK_FEATURES = {
      "query": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "docs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=2, sequence_dim=1),
  }
  MODEL_FEATURES = {
      "query_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      "query_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.bool),
      "doc_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=2, sequence_dim=1),
      "doc_mask": seqio.FeatureConverter.FeatureSpec(dtype=tf.bool, rank=2, sequence_dim=1),
  }
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, pack: bool = False, **kwargs):
    if pack:
      raise ValueError("XTRFeatureConverter does not pack: each query/document is its own sequence")
    super().__init__(pack=False, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    lq, ld = task_feature_lengths["query"], task_feature_lengths["docs"]

    def fn(ex):
      q = tf.pad(ex["query"], [[0, lq - tf.shape(ex["query"])[0]]])
      q = tf.ensure_shape(q, [lq])
      d = tf.pad(ex["docs"], [[0, 0], [0, ld - tf.shape(ex["docs"])[1]]])
      d.set_shape([None, ld])
      return {"query_tokens": q, "query_mask": tf.not_equal(q, 0), "doc_tokens": d, "doc_mask": tf.not_equal(d, 0)}

    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lq, ld = task_feature_lengths["query"], task_feature_lengths["docs"]
    return {"query_tokens": lq, "query_mask": lq, "doc_tokens": ld, "doc_mask": ld}


def source_dataset_fn(source: input_pipeline.TrainingSource, num_negatives: int, seed: int):
  """A seqio `dataset_fn(split, shuffle_files, seed=None)` over a TrainingSource (read once, then cached).

  Elements: {"query": string scalar, "docs": string [1 + num_negatives], "example_id": string}, XTR-preprocessed by
  `input_pipeline.example_texts` (negatives filled from the source's positives exactly as TrainInput does).
  """

  @functools.lru_cache(maxsize=1)
  def texts():
    examples = source.load(0, 1)
    pool = [e.positive for e in examples]
    queries, docs = [], []
    for ex in examples:
      q, d = input_pipeline.example_texts(ex, num_negatives, pool, seed=seed, source_name=source.name)
      queries.append(q)
      docs.append(d)
    return queries, np.asarray(docs, dtype=object).reshape(len(examples), 1 + num_negatives), [
        e.example_id for e in examples]

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del split  # the sources are training files; one split
    queries, docs, ids = texts()
    ds = tf.data.Dataset.from_tensor_slices({"query": queries, "docs": docs, "example_id": ids})
    if shuffle_files:
      ds = ds.shuffle(len(queries), seed=seed, reshuffle_each_iteration=True)
    return ds

  return dataset_fn


@dataclasses.dataclass(frozen=True)
class RegisteredNames:
  tasks: tuple[str, ...]
  mixture: str


def register_task(name: str, source: input_pipeline.TrainingSource, vocabulary: seqio.Vocabulary, *,
                  num_negatives: int = 1, seed: int = 0) -> seqio.Task:
  """Registers (replacing any task of that name) a seqio Task reading `source`."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(source_dataset_fn(source, num_negatives, seed), splits=("train",)),
      preprocessors=[tokenize_trim_append_eos],
      output_features={"query": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
                       "docs": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32, rank=2)},
      metric_fns=[])


def default_sources(data_dir: str, *, rates: Mapping[str, float] | None = None,
                    num_bm25_negatives: int = 4, seed: int = 0) -> list[input_pipeline.TrainingSource]:
  """The public training sources of `../shared/data`: SQuAD, MedQuAD, MS MARCO triples, SciFact train + BM25."""
  rates = dict(rates or {})
  train = os.path.join(data_dir, "train")
  return [
      input_pipeline.jsonl_source(path=os.path.join(train, "squad-v1.1-dev-pairs.jsonl"), name="squad",
                                  rate=rates.get("squad", 1.0)),
      input_pipeline.jsonl_source(path=os.path.join(train, "medquad-pairs.jsonl"), name="medquad",
                                  rate=rates.get("medquad", 1.0)),
      input_pipeline.tsv_triples_source(path=os.path.join(train, "msmarco-triples-first100.tsv"), name="msmarco",
                                        rate=rates.get("msmarco", 0.1)),
      input_pipeline.beir_bm25_source(root=os.path.join(data_dir, "beir", "scifact"), split="train",
                                      name="scifact_bm25", rate=rates.get("scifact_bm25", 0.5),
                                      num_bm25_negatives=num_bm25_negatives, seed=seed),
  ]


@gin.configurable("xtr_register_seqio_tasks")
def register_xtr_tasks(*, data_dir: str = gin.REQUIRED, vocab_path: str = gin.REQUIRED, vocab_name: str = "t5",
                       num_negatives: int = 1, seed: int = 0, rates: Mapping[str, float] | None = None,
                       sources: Sequence[input_pipeline.TrainingSource] | None = None) -> RegisteredNames:
  """Registers `xtr_<source>_<vocab_name>` Tasks and the Mixture `xtr_train_mix_<vocab_name>` (rates = sources').

  Sources default to `default_sources(data_dir)`; nothing is read until a dataset is requested.
  """
  vocabulary = make_vocabulary(vocab_path)
  sources = list(sources) if sources is not None else default_sources(data_dir, rates=rates, seed=seed)
  names = []
  for src in sources:
    name = f"xtr_{src.name}_{vocab_name}"
    register_task(name, src, vocabulary, num_negatives=num_negatives, seed=seed)
    names.append(name)
  mixture = f"xtr_train_mix_{vocab_name}"
  if mixture in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [(n, s.rate) for n, s in zip(names, sources) if s.rate > 0])
  return RegisteredNames(tuple(names), mixture)
