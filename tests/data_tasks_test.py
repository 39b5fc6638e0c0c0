"""seqio Tasks / Mixture / feature converter: documented shapes, dtypes, EOS and padding; same tokens as TrainInput."""

import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from xtr_jax import tokenization  # noqa: E402
from xtr_jax.data import input_pipeline as ip  # noqa: E402
from xtr_jax.data import tasks  # noqa: E402

LQ, LD, NEG = 16, 48, 2


@pytest.fixture(scope="module")
def registered(data_dir, t5_vocab):
  return tasks.register_xtr_tasks(data_dir=str(data_dir), vocab_path=t5_vocab, vocab_name="t5test",
                                  num_negatives=NEG, seed=0)


def _first_batch(name, batch_size=4, **kw):
  ds = seqio.get_dataset(name, {"query": LQ, "docs": LD}, tasks.XTRFeatureConverter(), **kw)
  return next(iter(ds.batch(batch_size, drop_remainder=True).as_numpy_iterator()))


def test_registered_names_and_mixture_rates(registered):
  assert registered.tasks == ("xtr_squad_t5test", "xtr_medquad_t5test", "xtr_msmarco_t5test",
                              "xtr_scifact_bm25_t5test")
  mix = seqio.get_mixture_or_task(registered.mixture)
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert rates == {"xtr_squad_t5test": 1.0, "xtr_medquad_t5test": 1.0, "xtr_msmarco_t5test": 0.1,
                   "xtr_scifact_bm25_t5test": 0.5}


def test_seqio_batch_shapes_eos_padding_and_same_tokens_as_train_input(registered, data_dir, t5_vocab):
  batch = _first_batch("xtr_msmarco_t5test", shuffle=False)
  assert set(batch) == {"query_tokens", "query_mask", "doc_tokens", "doc_mask"}
  assert batch["query_tokens"].shape == (4, LQ) and batch["query_tokens"].dtype == np.int32
  assert batch["doc_tokens"].shape == (4, 1 + NEG, LD) and batch["doc_tokens"].dtype == np.int32
  assert batch["query_mask"].dtype == bool and batch["doc_mask"].shape == (4, 1 + NEG, LD)
  for toks, mask in ((batch["query_tokens"], batch["query_mask"]), (batch["doc_tokens"], batch["doc_mask"])):
    np.testing.assert_array_equal(mask, toks != 0)
    lengths = mask.sum(-1)
    assert (np.take_along_axis(toks, (lengths - 1)[..., None], -1) == 1).all()  # EOS last
    assert ((toks == 1).sum(-1) == 1).all()
    assert (np.diff(mask.astype(np.int8), axis=-1) <= 0).all()  # padding only after the sequence
  assert (batch["doc_mask"].sum(-1) == LD).any()  # some MS MARCO passages are truncated, EOS kept
  # Reference: the Python SentencePiece tokenizer on the same XTR-preprocessed texts (TrainInput's encoder).
  tok = tokenization.SentencePieceTokenizer(t5_vocab)
  src = ip.tsv_triples_source(path=str(data_dir / "train" / "msmarco-triples-first100.tsv"), name="msmarco")
  examples = src.load()
  pool = [e.positive for e in examples]
  for row in range(4):
    q, docs = ip.example_texts(examples[row], NEG, pool, seed=0, source_name="msmarco")
    np.testing.assert_array_equal(batch["query_tokens"][row], tok.batch_encode([q], LQ)[0][0])
    np.testing.assert_array_equal(batch["doc_tokens"][row], tok.batch_encode(docs, LD)[0])


def test_mixture_dataset_and_seeded_shuffle(tmp_path, data_dir, t5_vocab):
  path = tmp_path / "small.jsonl"
  path.write_text("".join(json.dumps({"query": f"q {i}", "positive": f"passage {i}"}) + "\n" for i in range(40)),
                  encoding="utf-8")
  sources = [ip.jsonl_source(path=str(path), name="small", rate=1.0),
             ip.tsv_triples_source(path=str(data_dir / "train" / "msmarco-triples-first100.tsv"), name="ms",
                                   rate=1.0)]
  names = tasks.register_xtr_tasks(data_dir=str(data_dir), vocab_path=t5_vocab, vocab_name="t5mini",
                                   num_negatives=NEG, sources=sources)
  a = _first_batch(names.mixture, batch_size=16, shuffle=True, seed=5)
  b = _first_batch(names.mixture, batch_size=16, shuffle=True, seed=5)
  c = _first_batch(names.mixture, batch_size=16, shuffle=True, seed=6)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["query_tokens"], c["query_tokens"])
  assert a["doc_tokens"].shape == (16, 1 + NEG, LD)
  # both tasks contribute: the small source's queries are 4 pieces long ("q", " ", digits, EOS) or so
  short = (a["query_mask"].sum(-1) <= 5).sum()
  assert 0 < short < 16


def test_wordpiece_vocabulary(tmp_path, bert_vocab):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"query": "Hello World", "positive": "a b c d e f g h", "negative": "x"}) + "\n",
                  encoding="utf-8")
  vocab = tasks.make_vocabulary(bert_vocab)
  assert vocab.eos_id == 102 and vocab.vocab_size == 30522
  assert vocab.encode("hello world") == [101, 7592, 2088]
  tasks.register_task("xtr_wordpiece_test", ip.jsonl_source(path=str(path), name="wp"), vocab, num_negatives=1)
  ds = seqio.get_dataset("xtr_wordpiece_test", {"query": 8, "docs": 6}, tasks.XTRFeatureConverter(), shuffle=False)
  ex = next(iter(ds.as_numpy_iterator()))
  np.testing.assert_array_equal(ex["query_tokens"], [101, 7592, 2088, 102, 0, 0, 0, 0])
  np.testing.assert_array_equal(ex["doc_tokens"][0], [101, 1037, 1038, 1039, 1040, 102])  # truncated, [SEP] kept
  np.testing.assert_array_equal(ex["doc_tokens"][1], [101, 1060, 102, 0, 0, 0])


def test_bad_vocabulary_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tasks.make_vocabulary(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"\x00junk")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tasks.make_vocabulary(str(bad))
  with pytest.raises(ValueError, match="does not pack"):
    tasks.XTRFeatureConverter(pack=True)
