"""Tests of the XTR objective and the ColBERT baseline against an independent NumPy implementation of the formulas."""

from __future__ import annotations

import functools
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from xtr_jax import losses, partitioning

# ------------------------------------------------------------------------------------------- NumPy reference (loops)


def ref_xtr(q, q_mask, p, d_mask, k_train):
  """Straight transcription of the issue's formulas; ties broken by the global token index c*m + j."""
  q = np.asarray(q, np.float64)
  p = np.asarray(p, np.float64)
  num_q, n, _ = q.shape
  num_d, m, _ = p.shape
  scores = np.zeros((num_q, num_d))
  z = np.zeros((num_q, num_d), np.int64)
  for b in range(num_q):
    total = np.zeros(num_d)
    for i in range(n):
      if not q_mask[b, i]:
        continue
      candidates = []
      for c in range(num_d):
        for j in range(m):
          if d_mask[c, j]:
            candidates.append((float(q[b, i] @ p[c, j]), c * m + j, c))
      candidates.sort(key=lambda t: (-t[0], t[1]))
      best = {}
      for value, _, c in candidates[:k_train]:
        best[c] = max(best.get(c, -math.inf), value)
      for c, value in best.items():
        total[c] += value
        z[b, c] += 1
    for c in range(num_d):
      scores[b, c] = total[c] / z[b, c] if z[b, c] else 0.0
  return scores, z


def ref_colbert(q, q_mask, p, d_mask):
  q = np.asarray(q, np.float64)
  p = np.asarray(p, np.float64)
  scores = np.zeros((q.shape[0], p.shape[0]))
  for b in range(q.shape[0]):
    for c in range(p.shape[0]):
      maxima = [max(float(q[b, i] @ p[c, j]) for j in range(p.shape[1]) if d_mask[c, j])
                for i in range(q.shape[1]) if q_mask[b, i] and d_mask[c].any()]
      scores[b, c] = sum(maxima) / len(maxima) if maxima else 0.0
  return scores


def ref_loss(scores, labels, temperature=1.0):
  losses_ = []
  for b, label in enumerate(labels):
    logits = scores[b] / temperature
    top = logits.max()
    losses_.append(-(logits[label] - top - math.log(np.exp(logits - top).sum())))
  return float(np.mean(losses_))


def random_batch(seed, num_q=8, n=5, num_d=16, m=7, d=6, q_keep=0.8, d_keep=0.7):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(num_q, n, d)).astype(np.float32)
  p = rng.normal(size=(num_d, m, d)).astype(np.float32)
  q_mask = rng.random((num_q, n)) < q_keep
  d_mask = rng.random((num_d, m)) < d_keep
  # Padding rows are zero, as the encoder emits them.
  q *= q_mask[..., None]
  p *= d_mask[..., None]
  labels = rng.integers(0, num_d, size=num_q).astype(np.int32)
  return q, q_mask, p, d_mask, labels


# "chunked" streams 3 documents at a time here, so batches of 16 documents take 6 chunks, the last one padded.
@functools.partial(jax.jit, static_argnames=("k_train", "implementation", "mesh", "doc_chunk"))
def scores_and_z(q, q_mask, p, d_mask, *, k_train, implementation, mesh=None, doc_chunk=3):
  return losses._xtr_scores_and_z(q, q_mask, p, d_mask, k_train, implementation, mesh, doc_chunk)


@functools.partial(jax.jit, static_argnames=("k_train", "implementation", "mesh", "doc_chunk"))
def loss_and_grads(q, q_mask, p, d_mask, labels, *, k_train, implementation, mesh=None, doc_chunk=3):
  fn = lambda q_, p_: losses.xtr_loss(q_, q_mask, p_, d_mask, labels, k_train=k_train,
                                      implementation=implementation, mesh=mesh, doc_chunk=doc_chunk)
  return jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(q, p)


MESHES = {
    "8x1": dict(data=8),
    "4x2_fsdp": dict(data=4, fsdp=2),
    "4x2_model": dict(data=4, model=2),
}


def _mesh(name):
  return partitioning.make_mesh(**MESHES[name])


# ------------------------------------------------------------------------------------------------ reference parity


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), num_q=st.integers(1, 4), n=st.integers(1, 5), num_d=st.integers(1, 6),
       m=st.integers(1, 6), k_train=st.integers(1, 40), q_keep=st.sampled_from([0.0, 0.6, 1.0]),
       d_keep=st.sampled_from([0.3, 0.7, 1.0]))
def test_simple_matches_numpy_reference(seed, num_q, n, num_d, m, k_train, q_keep, d_keep):
  q, q_mask, p, d_mask, _ = random_batch(seed, num_q, n, num_d, m, 4, q_keep, d_keep)
  labels = np.random.default_rng(seed + 1).integers(0, num_d, size=num_q).astype(np.int32)
  want, want_z = ref_xtr(q, q_mask, p, d_mask, k_train)
  got, got_z = losses._xtr_scores_and_z(q, q_mask, p, d_mask, k_train, "simple", None)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_z), want_z)
  loss, metrics = losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=k_train)
  assert abs(float(loss) - ref_loss(want, labels)) < 1e-5
  assert np.isfinite(float(loss))
  assert float(metrics["mean_z"]) == pytest.approx(want_z.mean(), abs=1e-6)
  np.testing.assert_allclose(np.asarray(losses.colbert_scores(q, q_mask, p, d_mask)),
                             ref_colbert(q, q_mask, p, d_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mesh_name", "k_train"), [("8x1", 1), ("8x1", 30), ("8x1", 10_000), ("4x2_fsdp", 3)])
def test_both_paths_match_numpy_reference(mesh_name, k_train):
  q, q_mask, p, d_mask, labels = random_batch(k_train)
  d_mask[5] = False  # a document without tokens: Z = 0 for every query
  q_mask[3] = False  # a query without tokens: scores 0 everywhere
  p[5] = 0.0
  q[3] = 0.0
  want, want_z = ref_xtr(q, q_mask, p, d_mask, k_train)
  assert (want_z == 0).any() and (want_z > 0).any()
  if k_train == 1:
    assert ((want_z == 0) & d_mask.any(1)[None, :] & q_mask.any(1)[:, None]).any(), "want Z = 0 for real docs too"
  mesh = _mesh(mesh_name)
  for implementation in losses.IMPLEMENTATIONS:
    (loss, metrics), _ = loss_and_grads(q, q_mask, p, d_mask, labels, k_train=k_train,
                                        implementation=implementation, mesh=mesh)
    scores, z = scores_and_z(q, q_mask, p, d_mask, k_train=k_train, implementation=implementation, mesh=mesh)
    np.testing.assert_allclose(np.asarray(scores), want, atol=1e-5, rtol=1e-5, err_msg=implementation)
    np.testing.assert_array_equal(np.asarray(z), want_z)
    assert np.all(np.asarray(scores)[:, 5] == 0.0) and np.all(np.asarray(scores)[3] == 0.0)
    assert abs(float(loss) - ref_loss(want, labels)) < 1e-5, implementation
    assert float(metrics["zero_z_fraction"]) == pytest.approx((want_z == 0).mean(), abs=1e-6)
    assert float(metrics["mean_z_positive"]) == pytest.approx(want_z[np.arange(8), labels].mean(), abs=1e-6)
    want_acc = np.mean(np.argmax(want, axis=1) == labels)
    assert float(metrics["accuracy"]) == pytest.approx(want_acc)


def test_ties_are_broken_by_global_token_index_on_both_paths():
  # Small-integer embeddings make many exactly equal similarities (including +0 and -0).
  rng = np.random.default_rng(7)
  q = rng.integers(-1, 2, size=(8, 4, 3)).astype(np.float32)
  p = rng.integers(-1, 2, size=(16, 5, 3)).astype(np.float32)
  q_mask = np.ones((8, 4), bool)
  d_mask = rng.random((16, 5)) < 0.8
  runs = [("simple", "8x1"), ("chunked", "8x1"), ("sharded", "8x1"), ("sharded", "4x2_fsdp")]
  for k_train in (1, 7, 25):
    want, want_z = ref_xtr(q, q_mask, p, d_mask, k_train)
    for implementation, mesh_name in runs:
      got, got_z = scores_and_z(q, q_mask, p, d_mask, k_train=k_train, implementation=implementation,
                                mesh=_mesh(mesh_name))
      np.testing.assert_array_equal(np.asarray(got_z), want_z, err_msg=f"{implementation} {mesh_name} k={k_train}")
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  # Two documents equally similar, k_train = 1: the lower global token index (document 0) is retrieved.
  q1 = np.ones((8, 1, 2), np.float32)
  p1 = np.zeros((8, 2, 2), np.float32)
  p1[0, 1] = p1[1, 0] = [1.0, 0.0]
  ones = np.ones((8, 2), bool)
  for implementation in losses.IMPLEMENTATIONS:
    s, _ = scores_and_z(q1, np.ones((8, 1), bool), p1, ones, k_train=1, implementation=implementation,
                        mesh=_mesh("8x1"))
    s = np.asarray(s)
    assert np.all(s[:, 0] == 1.0) and np.all(s[:, 1:] == 0.0), implementation


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), num_q=st.integers(1, 4), n=st.integers(1, 5), num_d=st.integers(1, 7),
       m=st.integers(1, 6), k_train=st.integers(1, 40), doc_chunk=st.integers(1, 8),
       q_keep=st.sampled_from([0.0, 0.6, 1.0]), d_keep=st.sampled_from([0.3, 0.7, 1.0]))
def test_chunked_matches_numpy_reference_and_dense_gradients(seed, num_q, n, num_d, m, k_train, doc_chunk, q_keep,
                                                             d_keep):
  q, q_mask, p, d_mask, _ = random_batch(seed, num_q, n, num_d, m, 4, q_keep, d_keep)
  labels = np.random.default_rng(seed + 1).integers(0, num_d, size=num_q).astype(np.int32)
  want, want_z = ref_xtr(q, q_mask, p, d_mask, k_train)
  got, got_z = scores_and_z(q, q_mask, p, d_mask, k_train=k_train, implementation="chunked", doc_chunk=doc_chunk)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(got_z), want_z)
  (loss_c, _), grads_c = loss_and_grads(q, q_mask, p, d_mask, labels, k_train=k_train, implementation="chunked",
                                        doc_chunk=doc_chunk)
  (loss_d, _), grads_d = loss_and_grads(q, q_mask, p, d_mask, labels, k_train=k_train, implementation="simple")
  assert abs(float(loss_c) - ref_loss(want, labels)) < 1e-5
  assert abs(float(loss_c) - float(loss_d)) < 1e-6
  for gc, gd in zip(grads_c, grads_d):  # continuous random embeddings: no tied maxima, so identical gradients
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gd), atol=1e-6)
  # ColBERT streams the same way: equal to the NumPy reference and to the dense path, gradients included.
  chunked = lambda q_, p_: losses.colbert_scores(q_, q_mask, p_, d_mask, doc_chunk=doc_chunk)
  dense = lambda q_, p_: losses.colbert_scores_from_similarities(losses.token_similarities(q_, p_), q_mask, d_mask)
  np.testing.assert_allclose(np.asarray(chunked(q, p)), ref_colbert(q, q_mask, p, d_mask), atol=1e-5, rtol=1e-5)
  weights = np.random.default_rng(seed + 2).normal(size=(num_q, num_d)).astype(np.float32)
  for gc, gd in zip(jax.grad(lambda a, b: jnp.sum(chunked(a, b) * weights), argnums=(0, 1))(q, p),
                    jax.grad(lambda a, b: jnp.sum(dense(a, b) * weights), argnums=(0, 1))(q, p)):
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gd), atol=1e-6)


def test_chunked_memory_does_not_grow_with_the_similarity_tensor():
  # Compiled temp memory of loss + gradients on one device: the dense path holds several [B, n, Bd, m] tensors,
  # the chunked one a few [B, n, Bd] ones and a few chunks of similarities (here 1/16 of the tensor each).
  b, n, num_d, m, d = 32, 16, 64, 64, 16
  q = jnp.zeros((b, n, d)); p = jnp.zeros((num_d, m, d))
  qm, dm, labels = jnp.ones((b, n), bool), jnp.ones((num_d, m), bool), jnp.arange(b, dtype=jnp.int32) * 2
  temp = {}
  for implementation in ("simple", "chunked"):
    fn = lambda q_, p_, impl=implementation: losses.xtr_loss(q_, qm, p_, dm, labels, k_train=32,
                                                             implementation=impl, doc_chunk=4)[0]
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(q, p).compile()
    temp[implementation] = compiled.memory_analysis().temp_size_in_bytes
  sim_bytes = b * n * num_d * m * 4
  assert temp["simple"] >= 2 * sim_bytes
  assert temp["chunked"] < sim_bytes / 2 and temp["simple"] > 8 * temp["chunked"], temp


@pytest.mark.parametrize("implementation", losses.IMPLEMENTATIONS)
def test_retrieving_every_token_equals_colbert(implementation):
  q, q_mask, p, d_mask, _ = random_batch(3)
  num_valid = int(d_mask.sum())
  colbert = np.asarray(losses.colbert_scores(q, q_mask, p, d_mask))
  for k_train in (num_valid, 16 * 7 + 100):
    xtr, _ = scores_and_z(q, q_mask, p, d_mask, k_train=k_train, implementation=implementation, mesh=_mesh("8x1"))
    np.testing.assert_allclose(np.asarray(xtr), colbert, atol=1e-6)
  # Retrieving fewer tokens breaks it: the identity is about retrieving everything.
  xtr, _ = scores_and_z(q, q_mask, p, d_mask, k_train=num_valid // 4, implementation=implementation,
                        mesh=_mesh("8x1"))
  assert np.abs(np.asarray(xtr) - colbert).max() > 1e-2


# ------------------------------------------------------------------------------------- the paper's example, gradients


def _example_similarities():
  """B=1, n=2, documents [positive, negative], m=3 tokens each, similarities built directly."""
  s = np.zeros((1, 2, 2, 3), np.float32)
  s[0, :, 0, :] = 0.8  # every positive token is 0.8 to both query tokens
  s[0, 0, 1, 1] = 0.9  # the negative has one token at 0.9 for query token 1, 0 elsewhere
  return s, np.ones((1, 2), bool), np.ones((2, 3), bool), np.array([0], np.int32)


def test_motivating_example_numbers_and_gradient_signs():
  s, q_mask, d_mask, labels = _example_similarities()
  colbert = np.asarray(losses.colbert_scores_from_similarities(s, q_mask, d_mask))
  np.testing.assert_allclose(colbert, [[0.8, 0.45]], atol=1e-7)
  xtr, z = losses.xtr_scores_from_similarities(s, q_mask, d_mask, 1, return_z=True)
  np.testing.assert_allclose(np.asarray(xtr), [[0.8, 0.9]], atol=1e-7)
  np.testing.assert_array_equal(np.asarray(z), [[1, 1]])

  def xtr_loss_of(sim):
    return losses.softmax_cross_entropy(losses.xtr_scores_from_similarities(sim, q_mask, d_mask, 1), labels)

  def colbert_loss_of(sim):
    return losses.softmax_cross_entropy(losses.colbert_scores_from_similarities(sim, q_mask, d_mask), labels)

  assert float(xtr_loss_of(s)) == pytest.approx(math.log1p(math.exp(0.1)), abs=1e-6)
  assert float(colbert_loss_of(s)) == pytest.approx(math.log1p(math.exp(-0.35)), abs=1e-6)
  assert float(xtr_loss_of(s)) > math.log(2) > float(colbert_loss_of(s))

  g = np.asarray(jax.grad(xtr_loss_of)(jnp.asarray(s)))
  assert g[0, 0, 1, 1] > 0  # descent pushes the negative's 0.9 token down
  assert g[0, 1, 0, 0] < 0  # and the positive's token retrieved by query token 2 (lowest index of the tie) up
  mask = np.zeros_like(g, bool)
  mask[0, 0, 1, 1] = mask[0, 1, 0, 0] = True
  assert np.all(g[~mask] == 0.0)  # nothing else was retrieved, so nothing else moves

  # Gradient descent on the similarities: the 0.9 token falls until the positive's tokens are retrieved for query
  # token 1, after which the positive wins.
  sim = jnp.asarray(s)
  step = jax.jit(lambda x: x - 0.5 * jax.grad(xtr_loss_of)(x))
  for _ in range(200):
    sim = step(sim)
    _, z = losses.xtr_scores_from_similarities(sim, q_mask, d_mask, 1, return_z=True)
    if int(z[0, 0]) == 2:
      break
  assert int(z[0, 0]) == 2 and int(z[0, 1]) == 0
  assert float(sim[0, 0, 1, 1]) < 0.8 + 1e-6
  final = np.asarray(losses.xtr_scores_from_similarities(sim, q_mask, d_mask, 1))
  assert final[0, 0] > final[0, 1] == 0.0


def test_motivating_example_with_embeddings():
  # q1 = e1, q2 = e2; positive tokens 0.8 (e1 + e2); negative tokens 0.9 e1 and e3 (0 to both query tokens).
  q = np.eye(3, dtype=np.float32)[None, :2]  # [1, 2, 3]
  p = np.array([[[0.8, 0.8, 0.0]] * 3, [[0.0, 0.0, 1.0], [0.9, 0.0, 0.0], [0.0, 0.0, 1.0]]], np.float32)
  q_mask, d_mask, labels = np.ones((1, 2), bool), np.ones((2, 3), bool), np.array([0], np.int32)
  loss, metrics = losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=1)
  assert float(metrics["accuracy"]) == 0.0 and float(loss) == pytest.approx(math.log1p(math.exp(0.1)), abs=1e-6)
  _, cmetrics = losses.colbert_loss(q, q_mask, p, d_mask, labels)
  assert float(cmetrics["accuracy"]) == 1.0
  assert float(cmetrics["mean_negative_score"]) == pytest.approx(0.45, abs=1e-6)
  grad_p = np.asarray(jax.grad(lambda p_: losses.xtr_loss(q, q_mask, p_, d_mask, labels, k_train=1)[0])(p))
  assert grad_p[1, 1] @ q[0, 0] > 0  # the negative's 0.9 token moves away from query token 1
  assert grad_p[0, 0] @ q[0, 1] < 0  # the positive's retrieved token moves towards query token 2
  assert np.all(grad_p[1, [0, 2]] == 0) and np.all(grad_p[0, 1:] == 0)


def _random_similarities(seed, num_q=3, n=4, num_d=5, m=4):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(num_q, n, num_d, m)).astype(np.float32)
  q_mask = np.ones((num_q, n), bool)
  q_mask[0, -1] = False
  d_mask = np.ones((num_d, m), bool)
  d_mask[1, 2:] = False
  labels = rng.integers(0, num_d, size=num_q).astype(np.int32)
  return s, q_mask, d_mask, labels


@pytest.mark.parametrize("kind", ["xtr", "colbert"])
def test_gradient_matches_paper_analysis(kind):
  """dL/ds at each retrieved maximum = -(1 - p+)/(B Z+) for the positive and +p-/(B Z-) for a negative; 0 elsewhere."""
  s, q_mask, d_mask, labels = _random_similarities(11)
  num_q, n, num_d, m = s.shape
  k_train = 6

  def scores_of(sim):
    if kind == "xtr":
      return losses.xtr_scores_from_similarities(sim, q_mask, d_mask, k_train)
    return losses.colbert_scores_from_similarities(sim, q_mask, d_mask)

  grad = np.asarray(jax.grad(lambda x: losses.softmax_cross_entropy(scores_of(x), labels))(jnp.asarray(s)))
  scores = np.asarray(scores_of(s))
  prob = np.exp(scores - scores.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  want = np.zeros_like(s, np.float64)
  for b in range(num_q):
    for i in range(n):
      if not q_mask[b, i]:
        continue
      # The retrieved set of token i (XTR: global top-k_train; ColBERT: everything valid).
      flat = [(s[b, i, c, j], c, j) for c in range(num_d) for j in range(m) if d_mask[c, j]]
      flat.sort(key=lambda t: -t[0])
      chosen = flat[:k_train] if kind == "xtr" else flat
      best = {}
      for value, c, j in chosen:
        if c not in best or value > best[c][0]:
          best[c] = (value, j)
      for c, (_, j) in best.items():
        zc = sum(1 for ii in range(n) if q_mask[b, ii]) if kind == "colbert" else None
        if kind == "xtr":
          zc = 0
          for ii in range(n):
            if not q_mask[b, ii]:
              continue
            vals = sorted((s[b, ii, cc, jj] for cc in range(num_d) for jj in range(m) if d_mask[cc, jj]),
                          reverse=True)[:k_train]
            thr = vals[-1]
            zc += any(d_mask[c, jj] and s[b, ii, c, jj] >= thr for jj in range(m))
        if c == labels[b]:
          want[b, i, c, j] = -(1 - prob[b, c]) / (num_q * zc)
        else:
          want[b, i, c, j] = prob[b, c] / (num_q * zc)
  np.testing.assert_allclose(grad, want, atol=1e-7, rtol=1e-5)
  assert (want < 0).sum() > 0 and (want > 0).sum() > 0 and (want == 0).sum() > 0


@pytest.mark.parametrize("kind", ["xtr", "colbert"])
def test_grad_matches_finite_differences(kind):
  with jax.enable_x64(True):
    q, q_mask, p, d_mask, labels = random_batch(5, num_q=3, n=4, num_d=6, m=5, d=4)
    q = jnp.asarray(q, jnp.float64)
    p = jnp.asarray(p, jnp.float64)

    def loss_fn(q_, p_):
      if kind == "xtr":
        return losses.xtr_loss(q_, q_mask, p_, d_mask, labels, k_train=4, temperature=0.7)[0]
      return losses.colbert_loss(q_, q_mask, p_, d_mask, labels, temperature=0.7)[0]

    gq, gp = jax.grad(loss_fn, argnums=(0, 1))(q, p)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for _ in range(4):
      dq = rng.normal(size=q.shape) * q_mask[..., None]
      dp = rng.normal(size=p.shape) * d_mask[..., None]
      numeric = (loss_fn(q + eps * dq, p + eps * dp) - loss_fn(q - eps * dq, p - eps * dp)) / (2 * eps)
      analytic = jnp.sum(gq * dq) + jnp.sum(gp * dp)
      assert float(numeric) == pytest.approx(float(analytic), rel=1e-6, abs=1e-9)
    assert float(jnp.abs(gq).sum()) > 0 and float(jnp.abs(gp).sum()) > 0


# ------------------------------------------------------------------------------------------- sharded == unsharded


@pytest.mark.parametrize("mesh_name", ["8x1", "4x2_fsdp", "4x2_model"])
def test_sharded_equals_simple_loss_and_grads_under_jit(mesh_name):
  mesh = _mesh(mesh_name)
  q, q_mask, p, d_mask, labels = random_batch(21, num_q=8, n=6, num_d=16, m=9, d=8)
  q_mask[1] = False
  axes = partitioning.BATCH_AXES
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1)))))
  args = [put(x) for x in (q, q_mask, p, d_mask, labels)]

  def make(implementation):
    def loss_fn(q_, qm, p_, dm, lab):
      return losses.xtr_loss(q_, qm, p_, dm, lab, k_train=5, implementation=implementation,
                             doc_chunk=5)
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True))

  with jax.set_mesh(mesh):  # mesh=None: the ambient mesh
    (loss_d, metrics_d), grads_d = make("simple")(*args)
    for other in ("sharded", "chunked"):  # chunked: queries sharded by GSPMD, documents replicated and streamed
      (loss_s, metrics_s), grads_s = make(other)(*args)
      assert abs(float(loss_s) - float(loss_d)) <= 1e-6, other
      for key in metrics_d:
        assert float(metrics_s[key]) == pytest.approx(float(metrics_d[key]), abs=1e-6), (other, key)
      for gs, gd in zip(grads_s, grads_d):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), atol=1e-6, err_msg=other)
        assert np.abs(np.asarray(gd)).max() > 1e-4
      assert np.all(np.asarray(grads_s[0])[1] == 0.0)  # a query without tokens gets no gradient
      assert np.all(np.isfinite(np.asarray(grads_s[1])))


def test_jitted_step_compiles_once():
  mesh = _mesh("4x2_fsdp")
  traces = []

  def loss_fn(q_, qm, p_, dm, lab):
    traces.append(1)
    return losses.xtr_loss(q_, qm, p_, dm, lab, k_train=3, implementation="sharded")[0]

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2)))
  values = []
  with jax.set_mesh(mesh):
    for seed in range(3):
      q, q_mask, p, d_mask, labels = random_batch(seed)
      values.append(float(step(q, q_mask, p, d_mask, labels)[0]))
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert len(set(values)) == 3


# ------------------------------------------------------------------------------------------------------ bad input


def test_k_train_must_be_positive():
  q, q_mask, p, d_mask, labels = random_batch(0)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="k_train"):
      losses.xtr_scores(q, q_mask, p, d_mask, bad)
    with pytest.raises(ValueError, match="k_train"):
      losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=bad)


def test_shape_and_argument_errors():
  q, q_mask, p, d_mask, labels = random_batch(0)
  with pytest.raises(ValueError, match=r"document mask must be \[Bd, m\]"):
    losses.xtr_scores(q, q_mask, p, d_mask[:, :3], 2)
  with pytest.raises(ValueError, match="embedding sizes differ"):
    losses.colbert_scores(q, q_mask, p[..., :2], d_mask)
  with pytest.raises(ValueError, match="implementation"):
    losses.xtr_scores(q, q_mask, p, d_mask, 2, implementation="dense")
  with pytest.raises(ValueError, match="needs a mesh"):
    losses.xtr_scores(q, q_mask, p, d_mask, 2, implementation="sharded")
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
    losses.xtr_scores(q[:6], q_mask[:6], p, d_mask, 2, implementation="sharded", mesh=_mesh("8x1"))
  with pytest.raises(ValueError, match=r"labels must be \[B\]"):
    losses.xtr_loss(q, q_mask, p, d_mask, labels[:3], k_train=2)
  with pytest.raises(ValueError, match="temperature"):
    losses.colbert_loss(q, q_mask, p, d_mask, labels, temperature=0.0)


def test_labels_out_of_range():
  q, q_mask, p, d_mask, labels = random_batch(0)
  labels[2] = 16
  with pytest.raises(ValueError, match=r"labels out of range \[0, 16\): labels\[2\] = 16"):
    losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=2)
  with pytest.raises(ValueError, match="labels out of range"):
    losses.colbert_loss(q, q_mask, p, d_mask, -labels)
  # Under jit the values are unknown at trace time: unchecked mode gives a NaN loss and counts them ...
  loss, metrics = jax.jit(lambda lab: losses.xtr_loss(q, q_mask, p, d_mask, lab, k_train=2))(labels)
  assert np.isnan(float(loss)) and int(metrics["labels_out_of_range"]) == 1
  # ... and checked mode raises.
  checked = jax.jit(lambda lab: losses.xtr_loss(q, q_mask, p, d_mask, lab, k_train=2, checked=True))
  with pytest.raises(Exception, match="labels out of range"):
    jax.block_until_ready(checked(labels))
  labels[2] = 3
  assert np.isfinite(float(checked(labels)[0]))


@pytest.mark.parametrize("implementation", losses.IMPLEMENTATIONS)
def test_nonfinite_embeddings_are_detected(implementation):
  q, q_mask, p, d_mask, labels = random_batch(0)
  p[4, 2, 1] = np.nan
  q[1, 0, 0] = np.inf
  mesh = _mesh("8x1")

  def run(checked):
    fn = jax.jit(jax.value_and_grad(
        lambda q_, p_: losses.xtr_loss(q_, q_mask, p_, d_mask, labels, k_train=3, implementation=implementation,
                                       mesh=mesh, checked=checked), argnums=(0, 1), has_aux=True))
    return jax.block_until_ready(fn(q, p))

  with pytest.raises(Exception, match=r"2 non-finite \(NaN/Inf\) values"):
    run(True)
  (_, metrics), _ = run(False)
  assert int(metrics["nonfinite_embeddings"]) == 2
  q[1, 0, 0] = 0.5
  p[4, 2, 1] = 0.5
  (loss, metrics), _ = run(True)
  assert np.isfinite(float(loss)) and int(metrics["nonfinite_embeddings"]) == 0


def test_query_without_tokens_contributes_zero_and_no_nan():
  q, q_mask, p, d_mask, labels = random_batch(1)
  q_mask[:] = False
  q[:] = 0
  for implementation in losses.IMPLEMENTATIONS:
    (loss, metrics), (gq, gp) = loss_and_grads(q, q_mask, p, d_mask, labels, k_train=3,
                                               implementation=implementation, mesh=_mesh("8x1"))
    scores, _ = scores_and_z(q, q_mask, p, d_mask, k_train=3, implementation=implementation, mesh=_mesh("8x1"))
    assert np.all(np.asarray(scores) == 0.0)
    assert float(loss) == pytest.approx(math.log(16), abs=1e-6)
    assert np.all(np.asarray(gq) == 0) and np.all(np.asarray(gp) == 0)
    assert float(metrics["mean_z"]) == 0.0
  loss, _ = losses.colbert_loss(q, q_mask, p, d_mask, labels)
  assert float(loss) == pytest.approx(math.log(16), abs=1e-6)


def test_gin_selects_the_loss():
  q, q_mask, p, d_mask, labels = random_batch(2)
  gin.parse_config(["xtr_loss.k_train = 4", "xtr_loss.temperature = 0.5"])
  loss_fn = losses.xtr_loss  # what `XTRModel.loss = @xtr_loss` hands the model
  loss, _ = loss_fn(q, q_mask, p, d_mask, labels)
  want, _ = ref_xtr(q, q_mask, p, d_mask, 4)
  assert float(loss) == pytest.approx(ref_loss(want, labels, 0.5), abs=1e-5)
