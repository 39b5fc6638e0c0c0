"""The token analyses equal hand-computed values on a toy; padding and missing hits never count."""

from __future__ import annotations

import numpy as np
import pytest

from xtr_jax import analysis

# Query 0: tokens 0, 1 valid, token 2 is padding (its hits must be ignored). Query 1: three valid tokens.
HIT_DOCS = np.array([
    [[0, 1], [1, -1], [2, 2]],
    [[3, 3], [0, -1], [-1, -1]],
], dtype=np.int32)
Q_MASK = np.array([[True, True, False], [True, True, True]])
Q_IDS = np.array([[5, 7, 9], [1, 2, 3]], dtype=np.int32)
HIT_VOCAB = np.array([
    [[5, 9], [5, 0], [9, 9]],
    [[2, 2], [2, 8], [0, 0]],
], dtype=np.int32)


def test_gold_token_ratio_by_hand():
  out = analysis.gold_token_ratio(HIT_DOCS, Q_MASK, [{1}, {0}])
  # query 0: valid hits are docs 0, 1, 1 -> 2 of 3 in relevant {1}; query 1: docs 3, 3, 0 -> 1 of 3 in {0}
  np.testing.assert_allclose(out["per_query"], [2 / 3, 1 / 3])
  assert out["mean"] == pytest.approx(0.5)
  assert out["queries_without_hits"] == 0


def test_gold_token_ratio_no_relevant_and_no_hits():
  hit_docs = np.concatenate([HIT_DOCS, np.full((1, 3, 2), -1, np.int32)])
  q_mask = np.concatenate([Q_MASK, np.ones((1, 3), bool)])
  out = analysis.gold_token_ratio(hit_docs, q_mask, [set(), {3}, {0}])
  np.testing.assert_allclose(out["per_query"][:2], [0.0, 2 / 3])
  assert np.isnan(out["per_query"][2])
  assert out["mean"] == pytest.approx(1 / 3)  # the query without hits is left out of the mean ...
  assert out["queries_without_hits"] == 1  # ... and counted


def test_lexical_token_ratio_by_hand():
  # query 0 valid hits have vocab ids 5, 9, 5; query ids {5, 7} (9 belongs to the padding token) -> 2/3.
  # query 1 valid hits 2, 2, 2; query ids {1, 2, 3} -> 3/3.
  out = analysis.lexical_token_ratio(HIT_DOCS, HIT_VOCAB, Q_IDS, Q_MASK)
  np.testing.assert_allclose(out["per_query"], [2 / 3, 1.0])
  assert out["mean"] == pytest.approx(5 / 6)
  # same position: q0 token 0 (id 5) hits 5, 9 -> 1; token 1 (id 7) hits 5 -> 0: 1/3.
  # q1 token 0 (id 1) hits 2, 2 -> 0; token 1 (id 2) hits 2 -> 1: 1/3.
  same = analysis.lexical_token_ratio(HIT_DOCS, HIT_VOCAB, Q_IDS, Q_MASK, same_position=True)
  np.testing.assert_allclose(same["per_query"], [1 / 3, 1 / 3])


def test_token_recall_by_hand():
  # Exact top-2 vs approximate top-2 token rows; query 0 token 2 is padding, query 1 token 2 has no exact hits.
  exact = np.array([[[4, 5], [6, -1], [1, 2]], [[7, 8], [9, 3], [-1, -1]]], np.int32)
  approx = np.array([[[5, 0], [-1, -1], [1, 2]], [[8, 7], [9, 2], [3, 4]]], np.int32)
  out = analysis.token_recall(approx, exact, Q_MASK)
  # q0: exact hits 4, 5, 6 -> only 5 found (padding token's perfect match ignored): 1/3
  # q1: exact hits 7, 8, 9, 3 -> 7, 8, 9 found (3 came back for another query token, which does not count): 3/4
  np.testing.assert_allclose(out["per_query"], [1 / 3, 3 / 4])
  assert out["mean"] == pytest.approx((1 / 3 + 3 / 4) / 2)
  same = analysis.token_recall(exact, exact, Q_MASK)
  np.testing.assert_allclose(same["per_query"], [1.0, 1.0])
  with pytest.raises(ValueError, match="approx_tokens shape"):
    analysis.token_recall(approx[:, :, :1], exact, Q_MASK)


def test_cost_analysis_by_hand():
  out = analysis.cost_analysis(HIT_DOCS, Q_MASK, np.array([10, 20, 30, 40]), token_dim=4, k_prime=2)
  assert out["n_bar"] == pytest.approx(2.5)  # 2 and 3 valid query tokens
  assert out["m_bar"] == pytest.approx(25.0)
  # candidates: q0 {0, 1} (doc 2 only through padding), q1 {0, 3}; 6 valid hits over 4 candidates
  assert out["candidates_per_query"] == pytest.approx(2.0)
  assert out["r_bar"] == pytest.approx(1.5)
  assert out["m_bar_candidates"] == pytest.approx((10 + 20 + 10 + 40) / 4)
  assert out["colbert_ops"] == pytest.approx(2.5**2 * 2 * (2 * 25 * 4 + 25 + 1))
  assert out["xtr_ops"] == pytest.approx(2.5**2 * 2 * (1.5 + 1))
  assert out["op_ratio"] == pytest.approx(226 / 2.5)
  assert out["colbert_bytes_per_query"] == pytest.approx((30 + 50) * 4 * 4 / 2)
  assert out["xtr_bytes_per_query"] == pytest.approx(6 * 8 / 2)


def test_analysis_shape_errors():
  with pytest.raises(ValueError, match="q_mask shape"):
    analysis.gold_token_ratio(HIT_DOCS, Q_MASK[:, :2], [set(), set()])
  with pytest.raises(ValueError, match="relevant_docs has 1"):
    analysis.gold_token_ratio(HIT_DOCS, Q_MASK, [set()])
  with pytest.raises(ValueError, match="hit_vocab shape"):
    analysis.lexical_token_ratio(HIT_DOCS, HIT_VOCAB[:, :, :1], Q_IDS, Q_MASK)
  with pytest.raises(ValueError, match="doc_lengths has 3"):
    analysis.cost_analysis(HIT_DOCS, Q_MASK, np.array([1, 2, 3]), token_dim=4, k_prime=2)
