"""xtr_jax.index: exact brute force, ScaNN and FAISS recall against it, save -> load, bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import gin
import numpy as np
import pytest

from xtr_jax import faiss_kernels
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


@pytest.mark.parametrize("backend", ["bruteforce", "scann", "faiss"])
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


@pytest.mark.parametrize("backend", ["bruteforce", "scann", "faiss"])
def test_search_padded_equals_per_row_search_with_padding_and_missing(data, backend):
  x, q = data
  kw = {} if backend == "bruteforce" else dict(num_leaves=100, num_leaves_to_search=2, training_sample_size=5000)
  idx = index.build_index(x, backend=backend, **kw)
  rng = np.random.default_rng(3)
  qq = q[:36].reshape(4, 9, -1).copy()
  mask = rng.random((4, 9)) < 0.6
  mask[2] = False  # a query with no valid token
  qq[~mask] = 7.0  # padding rows hold garbage: never searched
  k = 2000  # more than 2 of 100 lists hold (~240 tokens): the approximate backends return missing entries
  for leaves, missing in ((None, -np.inf), (None, 0.0), (1, 0.5)):
    if leaves is not None and backend == "bruteforce":
      continue
    s, t = idx.search_padded(qq, mask, k, leaves_to_search=leaves, missing_score=missing)
    assert s.shape == t.shape == (4, 9, k) and s.dtype == np.float32 and t.dtype == np.int32
    want_s, want_t = (idx.search(qq[mask], k) if leaves is None
                      else idx.search_with(qq[mask], k, leaves_to_search=leaves))
    np.testing.assert_array_equal(t[mask], want_t)
    np.testing.assert_array_equal(s[mask], np.where(want_t < 0, np.float32(missing), want_s))
    assert np.all(t[~mask] == -1) and np.all(s[~mask] == np.float32(missing))
    if backend != "bruteforce":
      assert (want_t < 0).any()  # the missing-result path is exercised
  with pytest.raises(ValueError, match=r"q must be \[N, n, D\] with q_mask \[N, n\]"):
    idx.search_padded(qq, mask[:, :5], 10)


def test_lookup_tokens_maps_ids_and_keeps_missing():
  table = np.array([5, 5, 6, 9, 9, 9], np.int32)
  ids = np.array([[[0, 3, -1], [5, -1, -1]], [[-1, -1, -1], [2, 1, 4]]], np.int32)
  got = index.lookup_tokens(table, ids)
  want = np.where(ids >= 0, table[np.maximum(ids, 0)], -1)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == np.int32
  assert index.lookup_tokens(table, ids, missing=-7)[0, 0, 2] == -7


def test_bad_inputs(data):
  x, q = data
  idx = index.build_index(x[:100], backend="bruteforce")
  with pytest.raises(ValueError, match="query dimension 16 does not match the index dimension 32"):
    idx.search(q[:, :16], 5)
  with pytest.raises(ValueError, match="empty corpus"):
    index.build_index(np.zeros((0, 32), np.float32), backend="bruteforce")
  with pytest.raises(ValueError, match="backend must be one of"):
    index.build_index(x, backend="annoy")
  with pytest.raises(ValueError, match="needs a partitioned index"):
    idx.search_with(q, 5, leaves_to_search=3)
  with pytest.raises(ValueError, match="float16 or float32"):
    index.build_index(x.astype(np.float64), backend="bruteforce")
  with pytest.raises(ValueError, match="k must be"):
    idx.search(q, 0)
  bad = q.copy()
  bad[3, 5], bad[7, 0] = np.nan, np.inf
  with pytest.raises(ValueError, match=r"2 of 40 query rows hold NaN or inf \(first: row 3, \[nan\]\)"):
    idx.search(bad, 5)
  with pytest.raises(FileNotFoundError, match="token_index.json"):
    index.load_index("/nonexistent_dir")


def test_scann_saved_compactly_and_reloads_identically(data, tmp_path):
  x, q = data
  idx = index.build_index(x[:4000], backend="scann", num_leaves=60, num_leaves_to_search=15)
  s, i = idx.search(q, 50)
  idx.save(str(tmp_path))
  names = set(os.listdir(tmp_path / "scann"))
  # Two 4-bit codes per byte and 6-bit leaf ids (60 leaves) instead of ScaNN's byte per code and int32 leaves.
  assert "hashed_dataset.npy" not in names and "datapoint_to_token.npy" not in names
  packed = np.load(tmp_path / "scann" / "hashed_dataset.nibbles.npy", allow_pickle=False)
  assert packed.dtype == np.uint8 and packed.shape == (4000, x.shape[1] // 2)
  leaf_bits = np.load(tmp_path / "scann" / "datapoint_to_token.bits.npy", allow_pickle=False)
  assert leaf_bits.dtype == np.uint8 and leaf_bits.shape == (4000 * 6 // 8,)
  assert idx.index_bytes(str(tmp_path)) / 4000 < x.shape[1] / 2 + 0.75 + 20  # codes + leaf + shared tables
  back = index.load_index(str(tmp_path))
  s2, i2 = back.search(q, 50)
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(s, s2)
  # The previous layout (uint16 leaf ids) still loads, with the same results.
  meta = json.loads((tmp_path / "scann" / "datapoint_to_token.bits.npy.json").read_text())
  leaves = index.unpack_bits(leaf_bits, meta["count"], meta["bits"])
  old = tmp_path / "old"
  shutil.copytree(tmp_path / "scann", old)
  (old / "datapoint_to_token.bits.npy").unlink()
  (old / "datapoint_to_token.bits.npy.json").unlink()
  np.save(old / "datapoint_to_token.uint16.npy", leaves.astype(np.uint16), allow_pickle=False)
  np.testing.assert_array_equal(index._load_scann_searcher(str(old)).search_batched(q, final_num_neighbors=50)[0],
                                i)
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


def test_bit_packing_roundtrip():
  rng = np.random.default_rng(0)
  for high, bits in ((1, 1), (2, 1), (2000, 11), (2048, 11), (2049, 12), (70000, 17)):
    values = rng.integers(0, high, 1001)
    values[0] = high - 1  # the largest value sets the width
    packed, got_bits = index.pack_bits(values)
    assert got_bits == bits and packed.dtype == np.uint8 and packed.shape == (-(-1001 * bits // 8),)
    np.testing.assert_array_equal(index.unpack_bits(packed, 1001, bits), values)
  with pytest.raises(ValueError, match="non-negative"):
    index.pack_bits(np.array([3, -1]))
  with pytest.raises(ValueError, match="expected uint8"):
    index.unpack_bits(np.zeros(5, np.uint8), 1001, 11)


def test_principal_rotation_is_orthogonal_with_the_low_variance_directions_last():
  rng = np.random.default_rng(0)
  scales = np.geomspace(3.0, 0.01, 16)
  basis, _ = np.linalg.qr(rng.standard_normal((16, 16)))
  sample = (rng.standard_normal((20000, 16)) * scales) @ basis.T  # known principal directions: basis columns
  r = index.principal_rotation(sample, 6)
  assert r.dtype == np.float32 and r.shape == (16, 16)
  np.testing.assert_allclose(r @ r.T, np.eye(16), atol=1e-5)
  # The last 6 rows span the 6 lowest-variance directions (each is one of them up to sign, in descending order).
  np.testing.assert_allclose(np.abs(np.sum(r[10:] * basis[:, 10:].T, axis=1)), 1.0, atol=1e-3)
  # The leading 10 axes share the variance of the leading 10 directions, far more evenly than those directions do.
  var = np.var(sample @ r[:10].T, axis=0)
  assert var.max() / var.min() < 0.2 * (scales[0] / scales[9]) ** 2
  np.testing.assert_allclose(var.sum(), np.sum(scales[:10] ** 2), rtol=0.03)
  for bad in (-2, 3, 16):
    with pytest.raises(ValueError, match="paired_dims must be even"):
      index.principal_rotation(sample, bad)


def _reloads_identically_and_refuses_a_corrupted(directory, side_file, q, scores, ids):
  """A saved index gives the same top-100 after load_index; its `side_file` altered by one value is refused."""
  s, i = index.load_index(str(directory)).search(q, 100)
  np.testing.assert_array_equal(i, ids)
  np.testing.assert_array_equal(s, scores)
  f = directory / side_file
  f.write_bytes(f.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
  with pytest.raises(ValueError, match=f"{side_file}: sha256 mismatch"):
    index.load_index(str(directory))


def test_paired_dims_index_is_smaller_with_the_same_recall(data, tmp_path):
  x, q = data
  x, q = np.tile(x, (1, 4)) / 2.0, np.tile(q, (1, 4)) / 2.0  # 128-d, unit norm
  x = x + 0.02 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
  exact = index.build_index(x, backend="bruteforce")
  recall = lambda got, want: np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)])  # noqa
  kw = dict(num_leaves=200, num_leaves_to_search=40, training_sample_size=5000)
  plain = index.build_index(x, backend="scann", **kw)
  paired = index.build_index(x, backend="scann", paired_dims=32, **kw)
  assert paired.params["paired_dims"] == 32 and paired.rotation.shape == (128, 128)
  want = exact.search(q, 100)[1]
  r_plain, r_paired = recall(plain.search(q, 100)[1], want), recall(paired.search(q, 100)[1], want)
  assert r_paired >= 0.9 and r_paired >= r_plain - 0.03, (r_plain, r_paired)
  # Scores are inner products with the un-rotated queries (the rotation is orthogonal): close to the exact ones.
  s, i = paired.search(q, 100)
  exact_s = np.take_along_axis(q @ x.T, np.maximum(i, 0), 1)
  assert np.abs(s - exact_s).mean() < 0.05
  plain.save(str(tmp_path / "plain"))
  paired.save(str(tmp_path / "paired"))
  codes = np.load(tmp_path / "paired" / "scann" / "hashed_dataset.nibbles.npy", allow_pickle=False)
  assert codes.shape == (len(x), (128 - 16) // 2)  # 96 one-dim + 16 two-dim blocks, two codes per byte
  saved = lambda name: plain.index_bytes(str(tmp_path / name)) / len(x)  # noqa
  rotation_bytes = os.path.getsize(tmp_path / "paired" / "rotation.npy")  # shared: 64 KiB whatever the corpus size
  assert rotation_bytes < 128 * 128 * 4 + 200
  assert saved("paired") - rotation_bytes / len(x) < saved("plain") - 7.0  # 8 fewer code bytes per token
  _reloads_identically_and_refuses_a_corrupted(tmp_path / "paired", "rotation.npy", q, s, i)
  with pytest.raises(ValueError, match="hash_type='lut16' and dimensions_per_block=1"):
    index.build_index(x, backend="scann", paired_dims=32, dimensions_per_block=2, **kw)
  with pytest.raises(ValueError, match="paired_dims must be even"):
    index.build_index(x, backend="scann", paired_dims=31, **kw)


def test_centered_index_returns_true_scores_and_round_trips(data, tmp_path):
  x, q = data
  # Trained token embeddings (queries' and documents') share a common direction: give the tokens one.
  offset = 0.8 * np.ones(x.shape[1]) / np.sqrt(x.shape[1])
  x, q = ((v + offset) / np.linalg.norm(v + offset, axis=1, keepdims=True) for v in (x, q))
  x, q = x.astype(np.float32), q.astype(np.float32)
  kept = x.copy()
  kw = dict(num_leaves=200, num_leaves_to_search=40, training_sample_size=5000)
  centered = index.build_index(x, backend="scann", center=True, **kw)
  np.testing.assert_array_equal(x, kept)  # the caller's array is not shifted in place
  np.testing.assert_allclose(centered.center, x.mean(axis=0), atol=1e-6)
  assert centered.params["center"] is True and index.build_index(x[:500], backend="scann").params["center"] is False
  exact = index.build_index(x, backend="bruteforce")
  s, i = centered.search(q, 100)
  want = exact.search(q, 100)[1]
  assert np.mean([len(set(a) & set(b)) / 100 for a, b in zip(i, want)]) >= 0.9
  # Scores are inner products with the tokens themselves: q . mean is added back (it is large here, so a missing
  # shift would fail this by far).
  exact_s = np.take_along_axis(q @ x.T, i, 1)
  assert np.abs(q @ centered.center).mean() > 0.2
  assert np.abs(s - exact_s).mean() < 0.03, np.abs(s - exact_s).mean()
  # With paired dims too (the mean is removed before the rotation is fitted).
  both = index.build_index(x, backend="scann", center=True, paired_dims=8, **kw)
  s2, i2 = both.search(q, 100)
  assert np.abs(s2 - np.take_along_axis(q @ x.T, i2, 1)).mean() < 0.03
  centered.save(str(tmp_path / "c"))
  manifest = json.loads((tmp_path / "c" / index.INDEX_MANIFEST).read_text())
  assert "center.npy" in manifest["files"] and manifest["params"]["center"] is True
  _reloads_identically_and_refuses_a_corrupted(tmp_path / "c", "center.npy", q, s, i)


def test_quantized_reordering_rescores_k_times_factor_candidates_and_round_trips(data, tmp_path):
  x, q = data
  kw = dict(num_leaves=200, num_leaves_to_search=20, training_sample_size=5000)
  plain = index.build_index(x, backend="scann", **kw)
  sims = q @ x.T
  err = lambda s, i: np.abs(s - np.take_along_axis(sims, i, 1)).max()  # noqa: E731
  assert err(*plain.search(q, 100)) > 0.05  # 4-bit AH scores
  assert plain.params["reorder_dtype"] == "none"
  plain.save(str(tmp_path / "plain"))
  plain_bytes = plain.index_bytes(str(tmp_path / "plain")) / len(x)
  for dtype, bytes_per_dim, tol in (("int8", 1, 0.01), ("bfloat16", 2, 0.004), ("float32", 4, 1e-5)):
    idx = index.build_index(x, backend="scann", reorder_k=1, reorder_dtype=dtype, reorder_factor=2.0, **kw)
    assert idx.params["reorder_dtype"] == dtype and idx.params["reorder_factor"] == 2.0
    s, i = idx.search(q, 100)
    assert err(s, i) < tol, (dtype, err(s, i))  # the returned scores are the reordering's
    assert np.all(np.diff(s, axis=1) <= 0)
    idx.save(str(tmp_path / dtype))
    extra = idx.index_bytes(str(tmp_path / dtype)) / len(x) - plain_bytes
    assert bytes_per_dim * x.shape[1] <= extra <= bytes_per_dim * x.shape[1] + 8, (dtype, extra)
    _reloads_identically_and_refuses_a_corrupted(tmp_path / dtype, "scann/scann_config.pb", q, s, i)
  # How many AH candidates are rescored: max(reorder_k, ceil(reorder_factor x k)).
  calls = []

  class Recorder:
    def __init__(self, searcher):
      self.searcher = searcher

    def search_batched(self, queries, **kwargs):
      calls.append(kwargs)
      return self.searcher.search_batched(queries, **kwargs)

  idx.searcher = Recorder(idx.searcher)
  idx.search(q, 100)
  idx.params["reorder_k"] = 500
  idx.search(q, 100)
  idx.params.update(reorder_k=1, reorder_factor=1.5)
  idx.search(q, 7)
  assert [c["pre_reorder_num_neighbors"] for c in calls] == [200, 500, 11]
  with pytest.raises(ValueError, match="reorder_dtype must be one of"):
    index.build_index(x, backend="scann", reorder_k=10, reorder_dtype="float8", **kw)
  with pytest.raises(ValueError, match="reorder_factor >= 1"):
    index.build_index(x, backend="scann", reorder_k=10, reorder_factor=0.5, **kw)


def test_soar_index_spills_each_token_returns_distinct_tokens_and_round_trips(data, tmp_path):
  x, q = data
  kw = dict(num_leaves=200, num_leaves_to_search=10, training_sample_size=5000)
  plain = index.build_index(x, backend="scann", **kw)
  soar = index.build_index(x, backend="scann", soar_lambda=1.5, **kw)
  assert soar.params["soar_lambda"] == 1.5 and soar.params["overretrieve_factor"] == 2.0
  assert plain.params["soar_lambda"] == 0.0 and plain.params["overretrieve_factor"] == 0.0
  exact = index.build_index(x, backend="bruteforce").search(q, 100)[1]
  s, i = soar.search(q, 100)
  # A token found through both of its leaves is returned once, and k distinct tokens still come back.
  assert (i >= 0).all() and all(len(set(row)) == 100 for row in i)
  assert np.all(np.diff(s, axis=1) <= 1e-6)
  assert np.mean([len(set(a) & set(b)) / 100 for a, b in zip(i, exact)]) >= 0.85
  soar.save(str(tmp_path / "soar"))
  plain.save(str(tmp_path / "plain"))
  names = set(os.listdir(tmp_path / "soar" / "scann"))
  # Both code sets (the secondary one is quantized against the second leaf) two per byte; leaf ids bit-packed
  # with ScaNN's -1 (no second leaf) shifted to 0: the spilled index holds 2T leaf ids of 8 bits (200 leaves + 1).
  assert {"hashed_dataset.nibbles.npy", "hashed_dataset_soar.nibbles.npy"} <= names
  assert not names & {"hashed_dataset.npy", "hashed_dataset_soar.npy", "datapoint_to_token.npy"}
  meta = json.loads((tmp_path / "soar" / "scann" / "datapoint_to_token.bits.npy.json").read_text())
  assert meta["count"] == 2 * len(x) and meta["offset"] == 1 and meta["bits"] == 8
  leaves = index.unpack_bits(np.load(tmp_path / "soar" / "scann" / "datapoint_to_token.bits.npy"), meta["count"],
                             meta["bits"]) - 1
  assert leaves.min() == -1 and leaves.max() < 200
  plain_bytes = plain.index_bytes(str(tmp_path / "plain")) / len(x)
  soar_bytes = soar.index_bytes(str(tmp_path / "soar")) / len(x)
  assert x.shape[1] / 2 <= soar_bytes - plain_bytes <= x.shape[1] / 2 + 2, (plain_bytes, soar_bytes)
  _reloads_identically_and_refuses_a_corrupted(tmp_path / "soar", "scann/hashed_dataset_soar.nibbles.npy", q, s, i)
  with pytest.raises(ValueError, match="soar_lambda must be >= 0"):
    index.build_index(x, backend="scann", soar_lambda=-1.0, **kw)
  with pytest.raises(ValueError, match="overretrieve_factor >= 1"):
    index.build_index(x, backend="scann", soar_lambda=1.0, overretrieve_factor=0.5, **kw)


def test_build_settings_mismatch_names_each_differing_setting(data):
  x = data[0][:3000]
  try:
    gin.parse_config(["xtr_build_index.num_leaves = 50", "xtr_build_index.num_leaves_to_search = 10"])
    idx = index.build_index(x)  # the gin-configured build
    mismatch = lambda: index.build_settings_mismatch(idx.backend, idx.params, idx.num_tokens)  # noqa: E731
    assert mismatch() == {}
    gin.parse_config(["xtr_build_index.center = True", "xtr_build_index.num_leaves = 60"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60)}
    del idx.params["center"]  # an index saved before the setting existed was built without it
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60)}
    for key in ("soar_lambda", "overretrieve_factor"):
      del idx.params[key]
    gin.parse_config(["xtr_build_index.soar_lambda = 1.5"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60), "soar_lambda": (0.0, 1.5),
                          "overretrieve_factor": (0.0, 2.0)}
    gin.parse_config(["xtr_build_index.soar_lambda = 0.0", "xtr_build_index.overretrieve_factor = 3.0"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60)}  # without spilling it is not used
    gin.parse_config(["xtr_build_index.reorder_k = 100"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60), "reorder_k": (0, 100),
                          "reorder_dtype": ("none", "float32")}
    idx.params["reorder_k"] = 100
    del idx.params["reorder_dtype"]  # saved before the setting existed: float32 was the only reordering
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60)}
    gin.parse_config(["xtr_build_index.reorder_dtype = 'int8'", "xtr_build_index.reorder_factor = 3.0"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60), "reorder_dtype": ("float32", "int8"),
                          "reorder_factor": (1.0, 3.0)}
    idx.params["reorder_factor"] = 3.0
    gin.parse_config(["xtr_build_index.reorder_k = 0", "xtr_build_index.reorder_factor = 1.0"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60), "reorder_k": (100, 0),
                          "reorder_dtype": ("float32", "none"), "reorder_factor": (3.0, 1.0)}
    idx.params["reorder_k"] = 0  # the factor counts only with reordering (an old index recorded it anyway)
    gin.parse_config(["xtr_build_index.reorder_factor = 2.0"])
    assert mismatch() == {"center": (False, True), "num_leaves": (50, 60)}
    gin.parse_config(["xtr_build_index.reorder_factor = 1.0"])
    gin.parse_config(["xtr_build_index.reorder_k = 0", "xtr_build_index.reorder_dtype = 'float32'"])
    idx.params["reorder_k"] = 0
    # Sizes are compared as clamped to the corpus, as built: 250,000 sampled of 3,000 tokens is all 3,000.
    gin.parse_config(["xtr_build_index.center = False", "xtr_build_index.num_leaves = 50",
                      "xtr_build_index.training_sample_size = 1000000"])
    assert mismatch() == {}
    # Search-time and build-speed settings never count.
    gin.parse_config(["xtr_build_index.search_threads = 2", "xtr_build_index.training_threads = 3",
                      "xtr_build_index.num_neighbors = 7"])
    assert mismatch() == {}
    assert index.build_settings_mismatch("bruteforce", {}, len(x)) == {}
  finally:
    gin.clear_config()


def test_faiss_fast_scan_recall_refinement_and_settings(data, tmp_path, monkeypatch):
  x, q = data
  exact = index.build_index(x, backend="bruteforce")
  recall = lambda got, want: np.mean([len(set(a) & set(b)) / want.shape[1] for a, b in zip(got, want)])  # noqa
  sims = q @ x.T
  err = lambda s, i: np.abs(s - np.take_along_axis(sims, i, 1)).max()  # noqa: E731
  kw = dict(num_leaves=200, num_leaves_to_search=40, training_sample_size=5000)
  plain = index.build_index(x, backend="faiss", **kw)
  assert plain.params == {"num_leaves": 200, "num_leaves_to_search": 40, "training_sample_size": 5000,
                          "dimensions_per_block": 1, "hash_type": "lut16", "reorder_k": 0, "reorder_dtype": "none",
                          "reorder_factor": 1.0, "probe_gap": 0.0, "min_leaves_to_search": 1,
                          "training_threads": 0, "search_threads": 1}
  s, i = plain.search(q, 100)
  assert recall(i, exact.search(q, 100)[1]) >= 0.9
  assert 0.01 < err(s, i) < 0.2  # 4-bit PQ scores: approximate, not garbage
  assert np.all(np.diff(s, axis=1) <= 1e-6)
  # Probing fewer inverted lists (a search-time setting) finds fewer of the true neighbours.
  assert recall(plain.search_with(q, 100, leaves_to_search=1)[1], exact.search(q, 100)[1]) < 0.8
  # Refinement rescores the PQ candidates against stored copies: the returned scores are those copies' products.
  for dtype, tol in (("int8", 0.01), ("float16", 1e-3), ("bfloat16", 0.01), ("float32", 1e-5)):
    idx = index.build_index(x, backend="faiss", reorder_k=300, reorder_dtype=dtype, reorder_factor=2.0, **kw)
    s, i = idx.search(q, 10)
    assert err(s, i) < tol, (dtype, err(s, i))
    # at small k the 4-bit PQ mis-orders near-ties; refining 300 candidates restores recall
    assert recall(i, exact.search(q, 10)[1]) >= 0.9, dtype
  # How many PQ candidates are refined: max(reorder_k, ceil(reorder_factor x k)), as for ScaNN; through FAISS's
  # IndexRefine (16-bit codes) and through xtr_jax's own refinement (int8 / float32) alike.
  calls = []

  class Recorder:
    def __init__(self, inner):
      self.inner, self.ntotal, self.d = inner, inner.ntotal, inner.d

    def search(self, queries, k, params):
      calls.append(int(k * params.k_factor))
      return self.inner.search(queries, k, params=params)

  def recording(kernel):
    def run(codes, cand, w, b, k):
      calls.append(cand.shape[1])
      return kernel(codes, cand, w, b, k)
    return run

  monkeypatch.setattr(faiss_kernels, "rescore_serial", recording(faiss_kernels.rescore_serial))
  half = index.build_index(x, backend="faiss", reorder_k=300, reorder_dtype="float16", reorder_factor=2.0, **kw)
  half.index = Recorder(half.index)
  for searcher in (half, idx):
    searcher.params.update(reorder_k=1, reorder_factor=2.0)
    searcher.search(q, 100)
    searcher.params["reorder_k"] = 500
    searcher.search(q, 100)
    searcher.params.update(reorder_k=1, reorder_factor=1.5)
    searcher.search(q, 7)
  assert calls == [200, 500, 11] * 2
  # FAISS seeds its k-means: the same settings over the same tokens build the same index.
  again = index.build_index(x, backend="faiss", **kw)
  np.testing.assert_array_equal(again.search(q, 100)[1], plain.search(q, 100)[1])
  # 8-bit PQ (lut256) with 2 dims per code; the saved file round-trips.
  pq8 = index.build_index(x, backend="faiss", hash_type="lut256", dimensions_per_block=2, **kw)
  s, i = pq8.search(q, 100)
  assert recall(i, exact.search(q, 100)[1]) >= 0.9
  pq8.save(str(tmp_path / "pq8"))
  back = index.load_index(str(tmp_path / "pq8"))
  assert back.backend == "faiss" and back.params == pq8.params
  np.testing.assert_array_equal(back.search(q, 100)[1], i)
  # Lists holding fewer than k tokens: padded with -1 / -inf, like the other backends.
  tiny = index.build_index(x[:30], backend="faiss", num_leaves=4, num_leaves_to_search=4)
  s, i = tiny.search(q[:3], 50)
  assert np.all(i[:, 30:] == -1) and np.all(np.isneginf(s[:, 30:])) and sorted(i[0, :30]) == list(range(30))
  s, i = tiny.search_with(q[:3], 50, leaves_to_search=1)
  assert np.all((i >= 0) == np.isfinite(s)) and (i < 0).any()
  with pytest.raises(ValueError, match=r"\{'paired_dims': 16\} are ScaNN settings"):
    index.build_index(x, backend="faiss", paired_dims=16, **kw)
  with pytest.raises(ValueError, match="dimensions_per_block must divide the embedding dimension 32"):
    index.build_index(x, backend="faiss", dimensions_per_block=3, **kw)
  with pytest.raises(ValueError, match="training_sample_size=100 is smaller than num_leaves=200"):
    index.build_index(x, backend="faiss", num_leaves=200, training_sample_size=100)
  with pytest.raises(ValueError, match="reorder_dtype must be one of"):
    index.build_index(x, backend="faiss", reorder_k=1, reorder_dtype="float8", **kw)
  with pytest.raises(ValueError, match="hash_type must be one of"):
    index.build_index(x, backend="faiss", hash_type="lut64", **kw)


def test_faiss_adaptive_probe_equals_numpy_reference(data, tmp_path):
  import faiss  # pylint: disable=g-import-not-at-top
  x, q = data
  x = x[:3000]
  kw = dict(num_leaves=60, num_leaves_to_search=12, training_sample_size=3000)
  # xtr_jax runs FAISS's steps itself (coarse search, search_preassigned, its own refinement kernel): a fixed probe
  # gives what FAISS's own Index.search (IVF, or IndexRefine over it) gives, and so does the adaptive path with every
  # list within the gap and min = the most probed.
  for reorder in ({}, {"reorder_k": 1, "reorder_dtype": "int8", "reorder_factor": 1.5},
                  {"reorder_k": 1, "reorder_dtype": "float32", "reorder_factor": 1.5}):
    fixed = index.build_index(x, backend="faiss", **reorder, **kw)
    every = index.build_index(x, backend="faiss", probe_gap=10.0, min_leaves_to_search=12, **reorder, **kw)
    params = faiss.SearchParametersIVF(nprobe=12)
    if reorder:
      params = faiss.IndexRefineSearchParameters(k_factor=60.5 / 40, base_index_params=params)
    s_faiss, i_faiss = fixed.index.search(q, 40, params=params)
    for own in (fixed, every):
      s1, i1 = own.search(q, 40)
      np.testing.assert_allclose(s1, s_faiss, atol=1e-5)
      assert np.mean(i1 == i_faiss) > 0.999, reorder  # (float rounding may swap a near-tie)
  # NumPy reference for the probe rule: with every probed token refined in float32 (reorder_k >= tokens), the result
  # is the exact top-k over the tokens of the lists within the gap of each query token's best (at least min of them).
  idx = index.build_index(x, backend="faiss", probe_gap=0.5, min_leaves_to_search=3, reorder_k=len(x),
                          reorder_dtype="float32", **kw)
  ivf = faiss.downcast_index(idx.index.base_index)
  centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
  home = np.argmax(x @ centroids.T, axis=1)  # the list each token was added to (inner-product assignment)
  cs = q @ centroids.T
  order = np.argsort(-cs, axis=1, kind="stable")[:, :12]
  best = np.take_along_axis(cs, order, 1)
  probed_counts = []
  s, i = idx.search(q, 40)
  for r in range(len(q)):
    keep = (best[r] >= best[r, 0] - 0.5) | (np.arange(12) < 3)
    probed_counts.append(int(keep.sum()))
    cand = np.flatnonzero(np.isin(home, order[r, keep]))
    sims = x[cand] @ q[r]
    top = cand[np.argsort(-sims, kind="stable")[:40]]
    assert set(i[r][i[r] >= 0]) == set(top[:len(i[r][i[r] >= 0])]) and (i[r] >= 0).sum() == min(40, len(cand)), r
    np.testing.assert_allclose(s[r][:len(top)], np.sort(sims)[::-1][:40], atol=1e-5)
  assert min(probed_counts) == 3 and max(probed_counts) == 12 and len(set(probed_counts)) > 5  # adaptive
  # int8 refinement: the scores are the int8 copies' products, the same FAISS's IndexRefine gives its candidates.
  i8 = index.build_index(x, backend="faiss", probe_gap=0.5, min_leaves_to_search=3, reorder_k=1,
                         reorder_dtype="int8", reorder_factor=2.0, **kw)
  s8, t8 = i8.search(q, 40)
  assert np.abs(s8 - np.take_along_axis(q @ x.T, np.maximum(t8, 0), 1))[t8 >= 0].max() < 0.01
  assert np.all(np.diff(s8, axis=1)[np.isfinite(s8[:, 1:])] <= 1e-6)
  # Threads, a smaller leaves_to_search (min lowered to it), save -> load.
  two = index.build_index(x, backend="faiss", probe_gap=0.5, min_leaves_to_search=3, reorder_k=1,
                          reorder_dtype="int8", reorder_factor=2.0, search_threads=2, **kw)
  np.testing.assert_array_equal(two.search(q, 40)[1], t8)
  s2, t2 = i8.search_with(q, 40, leaves_to_search=2)
  one_list = i8.search_with(q, 40, leaves_to_search=1)[1]
  assert np.all((t2 >= 0) == np.isfinite(s2)) and (t2 >= 0).sum() >= (one_list >= 0).sum()
  i8.save(str(tmp_path / "gap"))
  back = index.load_index(str(tmp_path / "gap"))
  assert back.params == i8.params and back.params["probe_gap"] == 0.5
  np.testing.assert_array_equal(back.search(q, 40)[1], t8)
  # Bad settings.
  with pytest.raises(ValueError, match="probe_gap must be >= 0"):
    index.build_index(x, backend="faiss", probe_gap=-0.1, **kw)
  with pytest.raises(ValueError, match="probe_gap must be >= 0"):
    index.build_index(x, backend="faiss", probe_gap=float("nan"), **kw)
  with pytest.raises(ValueError, match=r"min_leaves_to_search must lie in \[1, num_leaves_to_search=12\]"):
    index.build_index(x, backend="faiss", probe_gap=0.1, min_leaves_to_search=13, **kw)
  with pytest.raises(ValueError, match="probe_gap > 0 refines with reorder_dtype in"):
    index.build_index(x, backend="faiss", probe_gap=0.1, reorder_k=1, reorder_dtype="float16", **kw)
  with pytest.raises(ValueError, match=r"\{'probe_gap': 0.1\} are faiss-backend settings ScaNN does not have"):
    index.build_index(x, backend="scann", probe_gap=0.1, **kw)


def test_faiss_build_settings_mismatch(data):
  x = data[0][:3000]
  try:
    gin.parse_config(["xtr_build_index.backend = 'faiss'", "xtr_build_index.num_leaves = 50",
                      "xtr_build_index.num_leaves_to_search = 10"])
    idx = index.build_index(x)
    assert idx.backend == "faiss"
    mismatch = lambda: index.build_settings_mismatch(idx.backend, idx.params, idx.num_tokens, idx.dim)  # noqa
    assert mismatch() == {}
    gin.parse_config(["xtr_build_index.num_leaves_to_search = 12", "xtr_build_index.reorder_k = 1",
                      "xtr_build_index.reorder_dtype = 'int8'", "xtr_build_index.reorder_factor = 2.0"])
    assert mismatch() == {"num_leaves_to_search": (10, 12), "reorder_k": (0, 1), "reorder_dtype": ("none", "int8"),
                          "reorder_factor": (1.0, 2.0)}
    gin.parse_config(["xtr_build_index.probe_gap = 0.1", "xtr_build_index.min_leaves_to_search = 5"])
    assert mismatch()["probe_gap"] == (0.0, 0.1) and mismatch()["min_leaves_to_search"] == (1, 5)
    gin.parse_config(["xtr_build_index.probe_gap = 0.0"])  # off: min_leaves_to_search is unused, not a mismatch
    assert "probe_gap" not in mismatch() and "min_leaves_to_search" not in mismatch()
    # ScaNN-only settings are no part of a FAISS index; threads never count.
    gin.parse_config(["xtr_build_index.num_leaves_to_search = 10", "xtr_build_index.reorder_k = 0",
                      "xtr_build_index.search_threads = 2", "xtr_build_index.anisotropic_quantization_threshold = 0.2"])
    assert mismatch() == {}
    with pytest.raises(ValueError, match="needs the index's dim"):
      index.build_settings_mismatch(idx.backend, idx.params, idx.num_tokens)
  finally:
    gin.clear_config()


def test_faiss_refinement_kernel_equals_numpy_reference():
  """`faiss_kernels.rescore_*` (prefetching, radix-sorted) against a NumPy rescoring with a stable argsort."""
  rng = np.random.default_rng(7)
  codes8 = rng.integers(0, 256, (500, 24), dtype=np.uint8)
  codes8[10:20] = codes8[5]  # identical rows: equal scores, kept in candidate order
  codes32 = rng.standard_normal((500, 24)).astype(np.float32)
  codes32[0] = 0.0  # score = b: -0.0 in the rows where b is, which must tie with 0.0
  for codes in (codes8, codes32):
    for c, k in ((40, 25), (40, 40), (10, 25), (300, 100), (1, 1)):
      cand = rng.integers(0, 500, (30, c)).astype(np.int64)
      cand[::4, c // 2:] = -1  # missing candidates, mid-row too
      cand[1::4, :3] = [5, 12, 0][:min(3, c)]
      cand[2, :] = -1
      w = rng.standard_normal((30, 24)).astype(np.float32)
      b = np.where(np.arange(30) % 3 == 0, -0.0, rng.standard_normal(30)).astype(np.float32)
      got_s, got_i = faiss_kernels.rescore_serial(codes, cand, w, b, k)
      par_s, par_i = faiss_kernels.rescore_parallel(codes, cand, w, b, k)
      np.testing.assert_array_equal(par_i, got_i)
      np.testing.assert_array_equal(par_s, got_s)
      for r in range(30):
        valid = cand[r] >= 0
        sc = np.full(c, -np.inf, np.float32)
        sc[valid] = codes[cand[r][valid]].astype(np.float32) @ w[r] + b[r]
        order = np.argsort(-sc, kind="stable")[:k]
        order = order[np.isfinite(sc[order])]
        want_i = np.full(k, -1)
        want_i[:len(order)] = cand[r][order]
        np.testing.assert_array_equal(got_i[r], want_i, err_msg=f"row {r}, C={c}, k={k}")
        # (summed in another order: float32 rounding of terms up to |w| x 255)
        np.testing.assert_allclose(got_s[r][:len(order)], sc[order], atol=1e-6 * np.abs(w[r]).sum() * codes.max())
        assert np.all(np.isneginf(got_s[r][len(order):]))
  # The radix sort alone: the stable ascending order of uint32 keys, duplicates and every byte in play.
  for size in (0, 1, 7, 256, 3000):
    keys = rng.integers(0, 2 ** 32, size, dtype=np.uint64).astype(np.uint32)
    if size:
      keys[::3] = keys[0]
    keys[1::5] &= np.uint32(0xFF00)
    np.testing.assert_array_equal(faiss_kernels._stable_order(keys.copy()), np.argsort(keys, kind="stable"))
  vals = np.array([0.5, -0.0, 0.0, -np.inf, np.inf, -1e-30, 1e-30, 3.0, -3.0], np.float32)
  keys = np.array([faiss_kernels._descending_key(v) for v in vals], np.uint32)
  np.testing.assert_array_equal(faiss_kernels._stable_order(keys), np.argsort(-vals, kind="stable"))
  assert all(faiss_kernels._descending_key(v) < faiss_kernels._LAST for v in vals)
