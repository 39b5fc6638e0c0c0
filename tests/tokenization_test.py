"""Tokenizers and XTR preprocessing on the real T5 SentencePiece and BERT WordPiece vocabularies."""

import numpy as np
import pytest

from xtr_jax import tokenization


def test_preprocessing():
  assert tokenization.preprocess_query("What is XTR?") == "what is xtr?"
  assert tokenization.preprocess_document("The Title", "Body Text") == "the title body text"
  assert tokenization.preprocess_document("", "Body") == "body"
  assert tokenization.preprocess_document(None, "Body") == "body"


def test_t5_hello_world(t5_vocab):
  tok = tokenization.SentencePieceTokenizer(t5_vocab)
  assert tok.vocab_size == 32000
  assert tok.pieces("Hello world") == [8774, 296]
  assert tok.tokenize("Hello world") == [8774, 296, 1]
  assert tok.pieces("translate English to German:") == [13959, 1566, 12, 2968, 10]


def test_t5_batch_encode_pads_and_truncates_keeping_eos(t5_vocab):
  tok = tokenization.SentencePieceTokenizer(t5_vocab)
  ids, mask = tok.batch_encode(["Hello world", "", "   ", "translate English to German:"], max_len=4)
  assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (4, 4)
  np.testing.assert_array_equal(ids[0], [8774, 296, 1, 0])
  np.testing.assert_array_equal(mask[0], [True, True, True, False])
  np.testing.assert_array_equal(ids[1], [1, 0, 0, 0])  # empty text: EOS only
  assert mask[2].sum() == 1
  np.testing.assert_array_equal(ids[3], [13959, 1566, 12, 1])  # truncated, EOS kept


def test_wordpiece(bert_vocab):
  tok = tokenization.WordPieceTokenizer(bert_vocab)
  assert tok.vocab_size == 30522
  ids, mask = tok.batch_encode(["Hello World", "a b c d e f"], max_len=5)
  np.testing.assert_array_equal(ids[0], [101, 7592, 2088, 102, 0])
  np.testing.assert_array_equal(ids[1], [101, 1037, 1038, 1039, 102])
  assert mask.sum() == 9


def test_bad_vocab_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenization.SentencePieceTokenizer(str(tmp_path / "missing.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenization.SentencePieceTokenizer(str(bad))
  badtxt = tmp_path / "vocab.txt"
  badtxt.write_text("a\nb\n")
  with pytest.raises(ValueError, match="not a BERT WordPiece vocab"):
    tokenization.WordPieceTokenizer(str(badtxt))
