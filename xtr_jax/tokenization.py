"""Tokenizers and XTR text preprocessing (shared by the model, the data pipeline and retrieval).

XTR preprocessing, as the official release: text is lowercased; a document is `f"{title} {text}"`; no marker tokens.
T5/mT5: SentencePiece pieces followed by EOS (id 1), padding id 0. BERT: WordPiece with [CLS] ... [SEP], padding id 0.
Texts longer than `max_len` are truncated to `max_len` tokens (for T5 the EOS is kept as the last token; for BERT
the [SEP] is kept), as the Hugging Face tokenizers do with `truncation=True`.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from xtr_jax import checksums


def preprocess_query(text: str) -> str:
  return text.lower()


def preprocess_document(title: str | None, text: str) -> str:
  """`f"{title} {text}"` lowercased; an empty title gives the text alone (no leading space)."""
  title = (title or "").strip()
  return (f"{title} {text}" if title else text).lower()



class Tokenizer(Protocol):
  """What the model and the data pipeline need of a tokenizer."""

  vocab_size: int
  pad_id: int

  def tokenize(self, text: str) -> list[int]: ...

  def batch_encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]: ...

  def identity(self) -> dict[str, str]: ...

  @property
  def special_ids(self) -> tuple[int, ...]: ...


class _BaseTokenizer(abc.ABC):
  pad_id = 0

  @abc.abstractmethod
  def tokenize(self, text: str) -> list[int]:
    """Token ids of one (already preprocessed) text, special tokens included."""

  def batch_encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [N, max_len] (padded with pad_id) and mask bool [N, max_len].

    Empty or whitespace-only texts get only the special tokens (T5: just EOS) -- never an error.
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    for row, text in enumerate(texts):
      toks = self.truncate(self.tokenize(text), max_len)
      ids[row, :len(toks)] = toks
      mask[row, :len(toks)] = True
    return ids, mask

  @abc.abstractmethod
  def truncate(self, toks: list[int], max_len: int) -> list[int]:
    """At most max_len ids, keeping the closing special token."""


class SentencePieceTokenizer(_BaseTokenizer):
  """T5 / mT5 SentencePiece: pieces then EOS. `Hello world` -> [8774, 296] (+ EOS 1) with the T5 32k model."""

  eos_id = 1

  def __init__(self, model_path: str, *, add_eos: bool = True):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist")
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(model_path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{model_path!r} is not a SentencePiece model: {e}") from e
    self.vocab_size = int(self._sp.GetPieceSize())
    self.add_eos = add_eos

  def pieces(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def tokenize(self, text: str) -> list[int]:
    return self.pieces(text) + ([self.eos_id] if self.add_eos else [])

  def truncate(self, toks: list[int], max_len: int) -> list[int]:
    if len(toks) <= max_len:
      return toks
    return toks[:max_len - 1] + [self.eos_id] if self.add_eos else toks[:max_len]

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids `tokenize` adds around the pieces (EOS)."""
    return (self.eos_id,) if self.add_eos else ()

  def decode_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))

  def identity(self) -> dict[str, str]:
    return {"type": "sentencepiece", "vocab_size": str(self.vocab_size),
            "sha256": checksums.file_sha256(self.model_path)}


class WordPieceTokenizer(_BaseTokenizer):
  """BERT uncased WordPiece through the `tokenizers` library: [CLS] pieces [SEP]."""

  def __init__(self, vocab_path: str, *, lowercase: bool = True):
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(vocab_path):
      raise FileNotFoundError(f"WordPiece vocab {vocab_path!r} does not exist")
    self.vocab_path = vocab_path
    with open(vocab_path, encoding="utf-8") as f:
      present = {line.rstrip("\n") for line in f}
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
      if special not in present:
        raise ValueError(f"{vocab_path!r} is not a BERT WordPiece vocab: no {special} token")
    self._tok = BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
    self.vocab_size = int(self._tok.get_vocab_size())
    vocab = self._tok.get_vocab()
    self.cls_id, self.sep_id, self.pad_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"]

  def pieces(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def tokenize(self, text: str) -> list[int]:
    return [self.cls_id] + self.pieces(text) + [self.sep_id]

  def truncate(self, toks: list[int], max_len: int) -> list[int]:
    if len(toks) <= max_len:
      return toks
    if max_len < 2:
      return toks[:max_len]
    return toks[:max_len - 1] + [self.sep_id]

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids `tokenize` adds around the pieces ([CLS], [SEP])."""
    return (self.cls_id, self.sep_id)

  def decode_piece(self, token_id: int) -> str:
    return self._tok.id_to_token(int(token_id))

  def identity(self) -> dict[str, str]:
    return {"type": "wordpiece", "vocab_size": str(self.vocab_size), "sha256": checksums.file_sha256(self.vocab_path)}


def load_tokenizer(path: str) -> SentencePieceTokenizer | WordPieceTokenizer:
  """SentencePiece for `*.model` files (T5/mT5), WordPiece for `*.txt` vocab files (BERT)."""
  if path.endswith(".txt"):
    return WordPieceTokenizer(path)
  return SentencePieceTokenizer(path)
