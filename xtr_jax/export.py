"""`python -m xtr_jax.export`: encode a BEIR corpus into on-disk token-embedding shards (+ optionally the token index).

    python -m xtr_jax.export --gin_file=runs/export.gin --gin.xtr_export.model_path="'/tmp/model'" \
        --gin.xtr_export.corpus="'../shared/data/beir/scifact'" --gin.xtr_export.output_dir="'/tmp/scifact_idx'"

Layout of `output_dir` (never JSONL of floats):
  shard_NNNNN.embeddings.npy  float16|float32 [t, D]  valid document tokens, documents contiguous, corpus order
  shard_NNNNN.token_doc.npy   int32 [t]               GLOBAL document index of each token
  shard_NNNNN.token_ids.npy   int32 [t]               vocabulary id of each token (for lexical analyses)
  shard_NNNNN.doc_lengths.npy int32 [n]               tokens per document (offsets are their cumulative sum)
  shard_NNNNN.doc_ids.json    list[str]               BEIR `_id` of each document
  shard_NNNNN.json            shard metadata: doc range, counts, sha256 of each file above; written LAST, so its
                              presence marks a finished shard (resume skips it after re-verifying the hashes)
  manifest.json               model / vocab identity, max lengths, dtype, counts, every shard's sha256s
  token_index/                the token index over all shards (`xtr_jax.index`), when index_backend is set

Documents are split into shards of `docs_per_shard` in corpus order; shard i belongs to process i % process_count,
so every process encodes only its own slice and writes its own shards (each reads the corpus file to count).
Within a process, batches are split over the local devices by the model's jit with a NamedSharding on the batch.
Process 0 writes the manifest once every shard is present.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import gin
import jax
import numpy as np

from xtr_jax import checksums, tokenization

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_SUBDIR = "token_index"
_SHARD_FILES = ("embeddings.npy", "token_doc.npy", "token_ids.npy", "doc_lengths.npy", "doc_ids.json")



def shard_name(i: int) -> str:
  return f"shard_{i:05d}"


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
  _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")))


def _read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e


def _verify_files(directory: str, files: dict[str, str], where: str) -> None:
  for fname, digest in files.items():
    path = os.path.join(directory, fname)
    if not os.path.isfile(path):
      raise ValueError(f"{path}: listed in {where} but missing")
    got = checksums.file_sha256(path)
    if got != digest:
      raise ValueError(f"{path}: sha256 {got[:16]}... does not match {where} ({digest[:16]}...): the shard is "
                       "corrupted or truncated; delete it (and its .json) and re-run the export to re-encode it")


def _load_npy(path: str, dtype, shape0: int | None, *, mmap: bool = False) -> np.ndarray:
  try:
    arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path}: unreadable .npy ({e})") from e
  if np.dtype(dtype) != arr.dtype:
    raise ValueError(f"{path}: dtype expected {np.dtype(dtype)}, got {arr.dtype}")
  if shape0 is not None and arr.shape[0] != shape0:
    raise ValueError(f"{path}: expected {shape0} rows, got {arr.shape[0]}")
  return arr


def write_shard(directory: str, index: int, *, doc_start: int, doc_ids: list[str], embeddings: np.ndarray,
                token_ids: np.ndarray, doc_lengths: np.ndarray, identity: dict[str, Any]) -> dict[str, Any]:
  """Writes one shard's files and then its metadata json (the completion marker); returns the metadata.

  embeddings: float16/float32 [t, D]; token_ids int32 [t]; doc_lengths int32 [n] with sum == t; doc_ids [n].
  """
  n, t = len(doc_ids), int(np.sum(doc_lengths))
  if embeddings.shape[0] != t or token_ids.shape[0] != t or doc_lengths.shape[0] != n:
    raise ValueError(f"shard {index}: inconsistent sizes: {n} docs, lengths sum {t}, embeddings "
                     f"{embeddings.shape}, token_ids {token_ids.shape}, doc_lengths {doc_lengths.shape}")
  name = shard_name(index)
  token_doc = np.repeat(np.arange(doc_start, doc_start + n, dtype=np.int32), doc_lengths)
  arrays = {"embeddings.npy": embeddings, "token_doc.npy": token_doc, "token_ids.npy": token_ids.astype(np.int32),
            "doc_lengths.npy": doc_lengths.astype(np.int32)}
  files = {}
  for suffix, arr in arrays.items():
    fname = f"{name}.{suffix}"
    _write_atomic(os.path.join(directory, fname), lambda f, a=arr: np.save(f, a, allow_pickle=False))
    files[fname] = checksums.file_sha256(os.path.join(directory, fname))
  fname = f"{name}.doc_ids.json"
  _write_json(os.path.join(directory, fname), list(doc_ids))
  files[fname] = checksums.file_sha256(os.path.join(directory, fname))
  meta = {"format_version": FORMAT_VERSION, "index": index, "doc_start": doc_start, "num_docs": n, "num_tokens": t,
          "dim": int(embeddings.shape[1]), "dtype": str(embeddings.dtype), "identity": identity, "files": files}
  _write_json(os.path.join(directory, f"{name}.json"), meta)
  return meta


# Document token embeddings do not depend on how long queries may be, so an export is shared by encoders that
# differ only in these identity keys.
QUERY_ONLY_KEYS = ("query_max_len",)
# Identity keys a model records only when they differ from these defaults (PretrainedXTR.identity), so exports and
# indexes written before a key existed still match a model at its default; absent means the default.
IDENTITY_DEFAULTS = {"score_special_tokens": True}


def document_identity(identity: dict[str, Any]) -> dict[str, Any]:
  """The part of a model identity (`PretrainedXTR.identity()`) that a document export depends on."""
  return {k: v for k, v in identity.items() if k not in QUERY_ONLY_KEYS}


def _finished_shard(directory: str, index: int, doc_start: int, doc_ids: list[str],
                    identity: dict[str, Any], dtype: str) -> dict[str, Any] | None:
  """Metadata of an already finished, verified, matching shard; None if not finished; error if it conflicts."""
  path = os.path.join(directory, f"{shard_name(index)}.json")
  if not os.path.isfile(path):
    return None
  meta = _read_json(path)
  want = {"doc_start": doc_start, "num_docs": len(doc_ids), "identity": document_identity(identity), "dtype": dtype}
  got = dict(meta, identity=document_identity(meta["identity"])) if isinstance(meta.get("identity"), dict) else meta
  for key, value in want.items():
    if got.get(key) != value:
      raise ValueError(f"{path}: field {key!r} is {meta.get(key)!r} but this export has {value!r}; the output dir "
                       "holds a different export (other model / corpus / settings): use a new output_dir or "
                       "overwrite=True")
  _verify_files(directory, meta["files"], path)
  stored_ids = _read_json(os.path.join(directory, f"{shard_name(index)}.doc_ids.json"))
  if stored_ids != list(doc_ids):
    raise ValueError(f"{path}: the stored document ids differ from the corpus' documents {doc_start}.."
                     f"{doc_start + len(doc_ids) - 1}: the corpus changed; use a new output_dir or overwrite=True")
  return meta


def _iter_docs(corpus: str, max_docs: int | None) -> Iterator[tuple[str, str]]:
  from xtr_jax.data import beir  # pylint: disable=g-import-not-at-top
  path = os.path.join(corpus, "corpus.jsonl") if os.path.isdir(corpus) else corpus
  for i, doc in enumerate(beir.iter_corpus(path)):
    if max_docs is not None and i >= max_docs:
      return
    yield doc.doc_id, tokenization.preprocess_document(doc.title, doc.text)


def _encode_shard(encoder, texts: list[str], batch_size: int, dtype: np.dtype, progress) -> tuple:
  ids, mask = encoder.model.tokenize_documents(texts)
  # The stored tokens are the scored ones (without special tokens when the model leaves them out).
  mask = encoder.model.scoring_mask(ids, mask)
  lengths = mask.sum(axis=1).astype(np.int32)
  # Length-sorted batches: the encoder pads each batch only to its longest document.
  order = np.argsort(-lengths, kind="stable")
  per_doc: list[np.ndarray | None] = [None] * len(texts)
  for start in range(0, len(texts), batch_size):
    rows = order[start:start + batch_size]
    emb, emb_mask = encoder.encode_documents([texts[r] for r in rows], batch_size=batch_size)
    if not np.array_equal(emb_mask, mask[rows]):
      raise RuntimeError("encoder.encode_documents tokenized differently from model.tokenize_documents")
    for j, r in enumerate(rows):
      per_doc[r] = emb[j][mask[r]].astype(dtype)
    progress(len(rows), int(lengths[rows].sum()))
  dim = encoder.model.output_dim
  embeddings = np.concatenate(per_doc) if per_doc else np.zeros((0, dim), dtype)
  token_ids = np.concatenate([ids[r][mask[r]] for r in range(len(texts))]).astype(np.int32)
  return embeddings.reshape(-1, dim), token_ids, lengths


def export_corpus(encoder, corpus: str, output_dir: str, *, docs_per_shard: int = 4096, batch_size: int = 32,
                  dtype: str = "float16", max_docs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None, overwrite: bool = False, finalize: bool = True) -> str | None:
  """Encodes `corpus` (BEIR dir or corpus.jsonl) with `encoder` (a `models.PretrainedXTR`) into `output_dir`.

  Resumable: finished shards (metadata present, sha256s verified, same documents and model) are skipped. Returns the
  manifest path when this process wrote it (process 0 with finalize=True), else None.
  """
  if dtype not in ("float16", "float32"):
    raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
  if docs_per_shard < 1 or batch_size < 1:
    raise ValueError(f"docs_per_shard and batch_size must be >= 1, got {docs_per_shard}, {batch_size}")
  pidx = jax.process_index() if process_index is None else int(process_index)
  pcount = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pidx < pcount:
    raise ValueError(f"process_index {pidx} is not in [0, process_count={pcount})")
  os.makedirs(output_dir, exist_ok=True)
  identity = json.loads(json.dumps(encoder.identity()))  # JSON-normalised, as stored
  if overwrite and pidx == 0:
    for fname in os.listdir(output_dir):
      if fname.startswith("shard_") or fname == MANIFEST:
        os.remove(os.path.join(output_dir, fname))
    shutil.rmtree(os.path.join(output_dir, INDEX_SUBDIR), ignore_errors=True)
  np_dtype = np.dtype(dtype)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(desc=f"export p{pidx}", unit="doc", dynamic_ncols=True, mininterval=2.0)
  t0 = time.perf_counter()
  totals = {"docs": 0, "tokens": 0}

  def progress(docs: int, tokens: int) -> None:
    totals["docs"] += docs
    totals["tokens"] += tokens
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.update(docs)
    bar.set_postfix(docs_s=f"{totals['docs'] / dt:.1f}", tokens_s=f"{totals['tokens'] / dt:.0f}", refresh=False)

  num_docs = 0
  shard_idx, shard_docs = 0, []
  skipped = encoded = 0

  def flush(i: int, docs: list[tuple[str, str]]) -> None:
    nonlocal skipped, encoded
    if i % pcount != pidx or not docs:
      return
    ids = [d for d, _ in docs]
    if _finished_shard(output_dir, i, i * docs_per_shard, ids, identity, dtype) is not None:
      skipped += 1
      return
    emb, tok, lengths = _encode_shard(encoder, [t for _, t in docs], batch_size, np_dtype, progress)
    write_shard(output_dir, i, doc_start=i * docs_per_shard, doc_ids=ids, embeddings=emb, token_ids=tok,
                doc_lengths=lengths, identity=identity)
    encoded += 1

  for doc_id, text in _iter_docs(corpus, max_docs):
    num_docs += 1
    if (num_docs - 1) // docs_per_shard != shard_idx:
      flush(shard_idx, shard_docs)
      shard_idx, shard_docs = shard_idx + 1, []
    if shard_idx % pcount == pidx:  # other processes' documents are only counted
      shard_docs.append((doc_id, text))
  flush(shard_idx, shard_docs)
  bar.close()
  if num_docs == 0:
    raise ValueError(f"corpus {corpus!r} has no documents: nothing to export")
  logging.info("process %d: encoded %d shards, skipped %d finished ones", pidx, encoded, skipped)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("xtr_export_shards_written")
  if pidx != 0 or not finalize:
    return None
  return write_manifest(output_dir, num_docs=num_docs, docs_per_shard=docs_per_shard, identity=identity,
                        dtype=dtype, corpus=corpus)


def write_manifest(output_dir: str, *, num_docs: int, docs_per_shard: int, identity: dict[str, Any], dtype: str,
                   corpus: str) -> str:
  """Collects every shard's metadata into manifest.json; error listing the shards that are not finished."""
  num_shards = -(-num_docs // docs_per_shard)
  metas, missing = [], []
  for i in range(num_shards):
    path = os.path.join(output_dir, f"{shard_name(i)}.json")
    if not os.path.isfile(path):
      missing.append(shard_name(i))
      continue
    metas.append(_read_json(path))
  if missing:
    raise ValueError(f"{output_dir}: shards not finished yet: {missing} (their processes have not completed)")
  manifest = {"format_version": FORMAT_VERSION, "identity": identity, "dtype": dtype,
              "dim": metas[0]["dim"], "num_docs": num_docs, "num_tokens": int(sum(m["num_tokens"] for m in metas)),
              "docs_per_shard": docs_per_shard, "corpus": os.path.abspath(corpus),
              "doc_max_len": identity.get("doc_max_len"), "query_max_len": identity.get("query_max_len"),
              "shards": [{"name": shard_name(m["index"]), "doc_start": m["doc_start"], "num_docs": m["num_docs"],
                          "num_tokens": m["num_tokens"], "files": m["files"]} for m in metas]}
  path = os.path.join(output_dir, MANIFEST)
  _write_json(path, manifest)
  return path


class TokenStore:
  """An exported corpus, read back and verified.

  Attributes:
    embeddings: float16/float32 [T, D] (a read-only memmap for a single shard; concatenated in memory otherwise).
    token_doc: int32 [T] document index of each token.
    doc_offsets: int64 [Ndocs + 1] first token of each document; doc_offsets[-1] == T.
    doc_ids: list[str] of length Ndocs.
    token_ids: int32 [T] vocabulary ids.
    manifest: the manifest dict (identity, dtype, counts, shards).
  """

  def __init__(self, directory: str, manifest: dict[str, Any], embeddings, token_doc, doc_offsets, doc_ids,
               token_ids):
    self.directory = directory
    self.manifest = manifest
    self.embeddings = embeddings
    self.token_doc = token_doc
    self.doc_offsets = doc_offsets
    self.doc_ids = doc_ids
    self.token_ids = token_ids

  @property
  def identity(self) -> dict[str, Any]:
    return self.manifest["identity"]

  @property
  def num_tokens(self) -> int:
    return int(self.token_doc.shape[0])

  @classmethod
  def open(cls, directory: str, *, verify: bool = True) -> TokenStore:
    """Reads manifest.json and every shard; `verify` re-hashes every file (corruption / truncation -> ValueError)."""
    mpath = os.path.join(directory, MANIFEST)
    manifest = _read_json(mpath)
    for field in ("format_version", "identity", "dtype", "dim", "num_docs", "num_tokens", "shards"):
      if field not in manifest:
        raise ValueError(f"{mpath}: missing field {field!r}")
    if manifest["format_version"] != FORMAT_VERSION:
      raise ValueError(f"{mpath}: format_version expected {FORMAT_VERSION}, got {manifest['format_version']}")
    embs, tdocs, lens, tids, dids = [], [], [], [], []
    next_doc = 0
    for shard in manifest["shards"]:
      name = shard["name"]
      if shard["doc_start"] != next_doc:
        raise ValueError(f"{mpath}: shard {name} starts at document {shard['doc_start']}, expected {next_doc}")
      if verify:
        _verify_files(directory, shard["files"], mpath)
      p = lambda suffix, n=name: os.path.join(directory, f"{n}.{suffix}")  # noqa: E731
      t, n = shard["num_tokens"], shard["num_docs"]
      emb = _load_npy(p("embeddings.npy"), manifest["dtype"], t, mmap=True)
      if emb.ndim != 2 or emb.shape[1] != manifest["dim"]:
        raise ValueError(f"{p('embeddings.npy')}: expected [{t}, {manifest['dim']}], got {emb.shape}")
      embs.append(emb)
      tdocs.append(_load_npy(p("token_doc.npy"), np.int32, t))
      tids.append(_load_npy(p("token_ids.npy"), np.int32, t))
      lens.append(_load_npy(p("doc_lengths.npy"), np.int32, n))
      ids = _read_json(p("doc_ids.json"))
      if not isinstance(ids, list) or len(ids) != n:
        raise ValueError(f"{p('doc_ids.json')}: expected a list of {n} ids")
      dids.extend(ids)
      next_doc += n
    if next_doc != manifest["num_docs"]:
      raise ValueError(f"{mpath}: shards hold {next_doc} documents, manifest num_docs says {manifest['num_docs']}")
    lengths = np.concatenate(lens) if lens else np.zeros((0,), np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    if offsets[-1] != manifest["num_tokens"]:
      raise ValueError(f"{mpath}: document lengths sum to {offsets[-1]}, manifest num_tokens says "
                       f"{manifest['num_tokens']}")
    embeddings = embs[0] if len(embs) == 1 else np.concatenate(embs)
    token_doc = np.concatenate(tdocs)
    if not np.array_equal(token_doc, np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)):
      raise ValueError(f"{directory}: token_doc disagrees with doc_lengths")
    return cls(directory, manifest, embeddings, token_doc, offsets, dids, np.concatenate(tids))


def build_store_index(directory: str, **index_kwargs: Any) -> str:
  """Builds the gin-configured token index (`xtr_build_index`) over an exported store; saves it in token_index/."""
  from xtr_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  store = TokenStore.open(directory)
  identity = dict(store.identity, num_docs=store.manifest["num_docs"], num_tokens=store.num_tokens)
  idx = index_lib.build_index(np.asarray(store.embeddings), identity=identity, **index_kwargs)
  out = os.path.join(directory, INDEX_SUBDIR)
  idx.save(out)
  logging.info("built %s index over %d tokens in %.1fs -> %s", idx.backend, store.num_tokens, idx.build_seconds, out)
  return out


def local_mesh():
  """A ("data", "fsdp", "model") mesh over this process's devices only: each process encodes its own documents."""
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from xtr_jax import partitioning  # pylint: disable=g-import-not-at-top
  return Mesh(np.asarray(jax.local_devices()).reshape(-1, 1, 1), partitioning.MESH_AXES)


@gin.configurable("xtr_export")
def export(*, model_path: str = gin.REQUIRED, corpus: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
           docs_per_shard: int = 4096, batch_size: int = 32, dtype: str = "float16", max_docs: int | None = None,
           doc_max_len: int | None = None, overwrite: bool = False,
           index_backend: str | None = "scann") -> str | None:
  """Loads the model (`xtr_jax.load_pretrained`), exports the corpus, and (process 0) builds the token index.

  index_backend: "scann", "faiss", "bruteforce", or None (no index); its parameters come from gin `xtr_build_index.*`.
  """
  from xtr_jax import distributed, models  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  encoder = models.load_pretrained(model_path, doc_max_len=doc_max_len, mesh=local_mesh())
  manifest = export_corpus(encoder, corpus, output_dir, docs_per_shard=docs_per_shard, batch_size=batch_size,
                           dtype=dtype, max_docs=max_docs, overwrite=overwrite)
  if manifest and index_backend:
    build_store_index(output_dir, backend=index_backend)
  return manifest


if __name__ == "__main__":
  from xtr_jax import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.run(export)
