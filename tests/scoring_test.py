"""xtr_jax.scoring against straightforward NumPy / per-query Python references."""

from __future__ import annotations

import numpy as np
import pytest

from xtr_jax import scoring


def reference_xtr(scores, docs, q_mask, top_k, imputation="kth", constant=0.0):
  """Dict-and-loop reference written from the definition (one query at a time)."""
  out_docs = np.full((scores.shape[0], top_k), -1, np.int64)
  out_scores = np.full((scores.shape[0], top_k), -np.inf, np.float64)
  for b in range(scores.shape[0]):
    toks = [i for i in range(scores.shape[1]) if q_mask[b, i]]
    best: dict[int, dict[int, float]] = {}
    imputed = {}
    for i in toks:
      got = [(float(s), int(d)) for s, d in zip(scores[b, i], docs[b, i]) if d >= 0]
      if not got:
        imputed[i] = 0.0
      elif imputation == "kth":
        imputed[i] = min(s for s, _ in got)
      elif imputation == "constant":
        imputed[i] = constant
      else:
        imputed[i] = 0.0
      for s, d in got:
        best.setdefault(d, {})
        best[d][i] = max(best[d].get(i, -np.inf), s)
    final = {}
    for d, per_tok in best.items():
      if imputation == "none":
        final[d] = sum(per_tok.values()) / len(per_tok)
      else:
        final[d] = sum(per_tok.get(i, imputed[i]) for i in toks) / len(toks)
    ranked = sorted(final.items(), key=lambda x: (-x[1], x[0]))[:top_k]
    for j, (d, s) in enumerate(ranked):
      out_docs[b, j], out_scores[b, j] = d, s
  return out_docs, out_scores


def _random_case(rng, nq=5, n=6, kp=9, n_docs=12, grid=True):
  if grid:  # multiples of 1/64: every sum below is exact in float32, so ties are real ties
    scores = rng.integers(-64, 65, size=(nq, n, kp)) / 64.0
  else:
    scores = rng.uniform(-1, 1, size=(nq, n, kp))
  scores = -np.sort(-scores, axis=-1)  # as a token index returns them
  docs = rng.integers(0, n_docs, size=(nq, n, kp))  # small doc range: many repeats within and across tokens
  docs[rng.uniform(size=docs.shape) < 0.2] = -1
  docs[0, 1] = -1  # a query token that retrieved nothing
  q_mask = rng.uniform(size=(nq, n)) < 0.8
  q_mask[:, 0] = True
  q_mask[0, 1] = True
  return scores.astype(np.float32), docs.astype(np.int32), q_mask


@pytest.mark.parametrize("strategy", ["dense", "sort"])
@pytest.mark.parametrize("imputation", ["kth", "zero", "none", "constant"])
def test_matches_reference_on_grid_values_exactly(imputation, strategy):
  rng = np.random.default_rng(0)
  for _ in range(3):
    scores, docs, q_mask = _random_case(rng)
    got_d, got_s = scoring.xtr_score(scores, docs, q_mask, 10, imputation=imputation, constant=0.25,
                                     strategy=strategy)
    want_d, want_s = reference_xtr(scores, docs, q_mask, 10, imputation, 0.25)
    np.testing.assert_array_equal(np.asarray(got_d), want_d)
    np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dense", "sort"])
def test_matches_reference_on_continuous_values(strategy):
  rng = np.random.default_rng(1)
  scores, docs, q_mask = _random_case(rng, nq=4, n=8, kp=40, n_docs=60, grid=False)
  got_d, got_s = scoring.xtr_score(scores, docs, q_mask, 25, strategy=strategy, num_docs=60)
  want_d, want_s = reference_xtr(scores, docs, q_mask, 25)
  np.testing.assert_array_equal(np.asarray(got_d), want_d)
  np.testing.assert_allclose(np.asarray(got_s), want_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dense", "sort"])
def test_ties_broken_by_document_index_and_padding(strategy):
  # Two tokens, every document scores exactly 0.5 -> order must be by document index; top_k beyond candidates pads.
  scores = np.array([[[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]], np.float32)
  docs = np.array([[[7, 3, 5], [5, 7, 3]]], np.int32)
  d, s = scoring.xtr_score(scores, docs, np.ones((1, 2), bool), 5, strategy=strategy)
  np.testing.assert_array_equal(np.asarray(d), [[3, 5, 7, -1, -1]])
  np.testing.assert_array_equal(np.asarray(s)[0, :3], [0.5, 0.5, 0.5])
  assert np.all(np.isneginf(np.asarray(s)[0, 3:]))


def test_imputation_hand_example():
  # token 0 retrieves d1 (0.9), d2 (0.4); token 1 retrieves d2 (0.8), d2 again (0.7), d3 (0.6).
  scores = np.array([[[0.9, 0.4, 0.0], [0.8, 0.7, 0.6]]], np.float32)
  docs = np.array([[[1, 2, -1], [2, 2, 3]]], np.int32)
  m = np.ones((1, 2), bool)
  d, s = scoring.xtr_score(scores, docs, m, 3)  # m_0 = 0.4, m_1 = 0.6
  np.testing.assert_array_equal(np.asarray(d), [[1, 2, 3]])  # d1: (0.9+0.6)/2 = .75, d2: .6, d3: (.4+.6)/2 = .5
  np.testing.assert_allclose(np.asarray(s), [[0.75, 0.6, 0.5]], atol=1e-6)
  d, s = scoring.xtr_score(scores, docs, m, 3, imputation="none")  # d1 .9, d2 .6, d3 .6 -> tie: 2 before 3
  np.testing.assert_array_equal(np.asarray(d), [[1, 2, 3]])
  np.testing.assert_allclose(np.asarray(s), [[0.9, 0.6, 0.6]], atol=1e-6)
  d, s = scoring.xtr_score(scores, docs, m, 3, imputation="zero")  # d1 .45, d2 .6, d3 .3
  np.testing.assert_array_equal(np.asarray(d), [[2, 1, 3]])
  np.testing.assert_allclose(np.asarray(s), [[0.6, 0.45, 0.3]], atol=1e-6)


def test_bad_inputs():
  s = np.zeros((2, 3, 4), np.float32)
  with pytest.raises(ValueError, match="ret_docs"):
    scoring.xtr_score(s, np.zeros((2, 3, 5), np.int32), np.ones((2, 3), bool), 3)
  with pytest.raises(ValueError, match="q_mask"):
    scoring.xtr_score(s, np.zeros((2, 3, 4), np.int32), np.ones((2, 4), bool), 3)
  with pytest.raises(ValueError, match="imputation"):
    scoring.xtr_score(s, np.zeros((2, 3, 4), np.int32), np.ones((2, 3), bool), 3, imputation="mean")
  with pytest.raises(ValueError, match="integer"):
    scoring.xtr_score(s, np.zeros((2, 3, 4), np.float32), np.ones((2, 3), bool), 3)
  with pytest.raises(ValueError, match="document index 9 >= num_docs=5"):
    scoring.xtr_score(s, np.full((2, 3, 4), 9, np.int32), np.ones((2, 3), bool), 3, num_docs=5)
  with pytest.raises(ValueError, match="strategy"):
    scoring.xtr_score(s, np.zeros((2, 3, 4), np.int32), np.ones((2, 3), bool), 3, strategy="hash")


def test_colbert_rescore_matches_numpy():
  rng = np.random.default_rng(2)
  lens = rng.integers(1, 9, size=20)
  offsets = np.concatenate([[0], np.cumsum(lens)])
  emb = rng.standard_normal((offsets[-1], 16)).astype(np.float32)
  q = rng.standard_normal((3, 5, 16)).astype(np.float32)
  q_mask = rng.uniform(size=(3, 5)) < 0.7
  q_mask[:, 0] = True
  cand = np.stack([rng.permutation(20)[:8] for _ in range(3)]).astype(np.int32)
  cand[1, 5:] = -1
  d, s = scoring.colbert_rescore(q, q_mask, cand, emb, offsets, 6, chunk=3)
  for b in range(3):
    ref = {}
    for c in cand[b]:
      if c < 0:
        continue
      sims = q[b][q_mask[b]] @ emb[offsets[c]:offsets[c + 1]].T
      ref[int(c)] = sims.max(1).mean()
    ranked = sorted(ref.items(), key=lambda x: (-x[1], x[0]))[:6]
    np.testing.assert_array_equal(np.asarray(d)[b, :len(ranked)], [r[0] for r in ranked])
    np.testing.assert_allclose(np.asarray(s)[b, :len(ranked)], [r[1] for r in ranked], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(d)[b, len(ranked):] == -1)
  with pytest.raises(ValueError, match="cand_docs entries"):
    scoring.colbert_rescore(q, q_mask, np.full((3, 2), 20, np.int32), emb, offsets, 2)
  with pytest.raises(ValueError, match="D=16"):
    scoring.colbert_rescore(q, q_mask, cand, emb[:, :8], offsets, 2)
