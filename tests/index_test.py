"""xtr_jax.index: exact brute force, ScaNN recall against it, save -> load, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest

from xtr_jax import index


def clustered(n_tokens=12000, dim=32, n_clusters=150, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((n_clusters, dim))
  x = centers[rng.integers(0, n_clusters, n_tokens)] + 0.35 * rng.standard_normal((n_tokens, dim))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q = centers[rng.integers(0, n_clusters, 40)] + 0.35 * rng.standard_normal((40, dim))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  return x.astype(np.float32), q.astype(np.float32)


@pytest.fixture(scope="module")
def data():
  return clustered()


def test_bruteforce_is_exact_with_ties_to_lower_id(data):
  x, q = data
  x = np.concatenate([x, x[:50]])  # exact duplicates: the lower token id must come first
  idx = index.build_index(x, backend="bruteforce", chunk_size=1000, query_batch=16)  # several chunks and batches
  s, i = idx.search(q, 64)
  sims = q @ x.T
  want = np.argsort(-sims, axis=1, kind="stable")[:, :64]
  np.testing.assert_array_equal(i, want)
  np.testing.assert_allclose(s, np.take_along_axis(sims, want, 1), atol=1e-5)


def test_scann_recall_and_notebook_defaults(data):
  x, q = data
  exact = index.build_index(x, backend="bruteforce")
  recall = lambda got, want: np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)])  # noqa
  # Notebook-style AH without reordering: accurate at XTR's k' (hundreds+), where near-ties matter little.
  idx = index.build_index(x, backend="scann", num_leaves=200, num_leaves_to_search=40, training_sample_size=5000)
  for k in (60, 100):
    assert recall(idx.search(q, k)[1], exact.search(q, k)[1]) >= 0.9, k
  # At small k the 4-bit AH scores mis-order near-ties; exact reordering of AH candidates restores recall.
  reordered = index.build_index(x, backend="scann", num_leaves=200, num_leaves_to_search=40,
                                training_sample_size=5000, reorder_k=300)
  assert recall(reordered.search(q, 10)[1], exact.search(q, 10)[1]) >= 0.9
  # Notebook defaults, clamped to the corpus size.
  small = index.build_index(x[:1500], backend="scann")
  assert small.params["num_leaves"] == 1500 and small.params["training_sample_size"] == 1500
  assert small.params["num_leaves_to_search"] == 100 and small.params["dimensions_per_block"] == 1
  assert small.params["anisotropic_quantization_threshold"] == 0.1 and small.params["reorder_k"] == 0


@pytest.mark.parametrize("backend", ["bruteforce", "scann"])
def test_save_load_identical_and_corruption_refused(data, tmp_path, backend):
  x, q = data
  ident = {"model_sha256": "abc", "token_dim": 32}
  idx = index.build_index(x[:3000], backend=backend, identity=ident, num_leaves=50, num_leaves_to_search=10)
  s, i = idx.search(q, 20)
  idx.save(str(tmp_path))
  back = index.load_index(str(tmp_path), expect_identity=ident)
  s2, i2 = back.search(q, 20)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(s, s2)
  assert back.params == idx.params and back.identity == ident
  with pytest.raises(ValueError, match="model_sha256='abc'.*'xyz'"):
    index.load_index(str(tmp_path), expect_identity={"model_sha256": "xyz"})
  # Flip a byte in the largest file: the sha256 check refuses it.
  files = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path) for f in fs if f != index.INDEX_MANIFEST]
  victim = max(files, key=os.path.getsize)
  data_bytes = bytearray(open(victim, "rb").read())
  data_bytes[len(data_bytes) // 2] ^= 0xFF
  open(victim, "wb").write(bytes(data_bytes))
  with pytest.raises(ValueError, match="sha256 mismatch"):
    index.load_index(str(tmp_path))


def test_k_larger_than_corpus_is_clamped(data):
  x, q = data
  idx = index.build_index(x[:30], backend="bruteforce")
  s, i = idx.search(q[:3], 50)
  assert s.shape == (3, 50)
  assert np.all(i[:, 30:] == -1) and np.all(np.isneginf(s[:, 30:]))
  assert sorted(i[0, :30]) == list(range(30))


def test_bad_inputs(data):
  x, q = data
  idx = index.build_index(x[:100], backend="bruteforce")
  with pytest.raises(ValueError, match="query dimension 16 does not match the index dimension 32"):
    idx.search(q[:, :16], 5)
  with pytest.raises(ValueError, match="empty corpus"):
    index.build_index(np.zeros((0, 32), np.float32), backend="bruteforce")
  with pytest.raises(ValueError, match="backend"):
    index.build_index(x, backend="faiss")
  with pytest.raises(ValueError, match="float16 or float32"):
    index.build_index(x.astype(np.float64), backend="bruteforce")
  with pytest.raises(ValueError, match="k must be"):
    idx.search(q, 0)
  with pytest.raises(FileNotFoundError, match="token_index.json"):
    index.load_index("/nonexistent_dir")


def test_scann_saved_compactly_and_reloads_identically(data, tmp_path):
  x, q = data
  idx = index.build_index(x[:4000], backend="scann", num_leaves=60, num_leaves_to_search=15)
  s, i = idx.search(q, 50)
  idx.save(str(tmp_path))
  names = set(os.listdir(tmp_path / "scann"))
  # Two 4-bit codes per byte and uint16 leaf ids instead of ScaNN's one byte per code and int32 leaves.
  assert "hashed_dataset.npy" not in names and "datapoint_to_token.npy" not in names
  packed = np.load(tmp_path / "scann" / "hashed_dataset.nibbles.npy", allow_pickle=False)
  assert packed.dtype == np.uint8 and packed.shape == (4000, x.shape[1] // 2)
  assert np.load(tmp_path / "scann" / "datapoint_to_token.uint16.npy", allow_pickle=False).dtype == np.uint16
  assert idx.index_bytes(str(tmp_path)) / 4000 < x.shape[1] / 2 + 2 + 20  # codes + leaf + shared tables
  back = index.load_index(str(tmp_path))
  s2, i2 = back.search(q, 50)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(s, s2)
  # The loader still reads ScaNN's own (uncompacted) layout.
  raw = tmp_path / "raw"
  raw.mkdir()
  idx.searcher.serialize(str(raw), relative_path=True)
  np.testing.assert_array_equal(index._load_scann_searcher(str(raw)).search_batched(q, final_num_neighbors=50)[0],
                                i)


def test_nibble_packing_roundtrip():
  rng = np.random.default_rng(0)
  for width in (1, 7, 64):
    codes = rng.integers(0, 16, (33, width)).astype(np.uint8)
    packed = index.pack_nibbles(codes)
    assert packed.shape == (33, (width + 1) // 2)
    np.testing.assert_array_equal(index.unpack_nibbles(packed, width), codes)
  with pytest.raises(ValueError, match="codes >= 16"):
    index.pack_nibbles(np.full((2, 2), 16, np.uint8))
