"""Principal-directions token head: eigenvectors vs a NumPy SVD, the sharded moments vs NumPy on the backbone states,
the rewound training input, `train(head_init=...)`, and the bad-input errors."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from xtr_jax import head_init, losses, models, network, partitioning, train, trainer


def _model(token_dim: int = 16, vocab_size: int = 128, **kw):
  enc = network.T5EncoderConfig(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.0)
  return models.XTRModel(encoder_config=enc, token_dim=token_dim, query_max_len=8, doc_max_len=16,
                         loss=functools.partial(losses.xtr_loss, k_train=8), **kw)


class Batches:
  """Deterministic random-token batches with the TrainInput interface (state = step)."""

  def __init__(self, batch_size: int = 8):
    self.batch_size, self.step = batch_size, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([7, self.step])
    self.step += 1
    b = self.batch_size
    q_mask = np.arange(8)[None, :] < rng.integers(2, 9, (b, 1))
    d_mask = np.arange(16)[None, None, :] < rng.integers(3, 17, (b, 2, 1))
    q_tok = np.where(q_mask, rng.integers(2, 128, (b, 8)), 0).astype(np.int32)
    d_tok = np.where(d_mask, rng.integers(2, 128, (b, 2, 16)), 0).astype(np.int32)
    # The T5 EOS (id 1) closes every text, as the tokenizer writes it.
    q_tok[np.arange(b), q_mask.sum(-1) - 1] = 1
    np.put_along_axis(d_tok, d_mask.sum(-1, keepdims=True) - 1, 1, axis=-1)
    return {"query_tokens": q_tok, "query_mask": q_mask, "doc_tokens": d_tok, "doc_mask": d_mask}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])


def _trainer(model, data: int = 4, mp: int = 2) -> trainer.Trainer:
  part = partitioning.Partitioner(mesh=partitioning.make_mesh(data=data, model=mp))
  return trainer.Trainer(model=model, partitioner=part, optimizer=optax.sgd(0.1))


def _numpy_states(model, params, batches) -> np.ndarray:
  """Unit-norm backbone states of every valid query and document token, float64 [T, d_model]."""
  backbone = models.XTRModel(encoder_config=model.encoder_config, token_dim=0, query_max_len=8, doc_max_len=16)
  enc = {"encoder": jax.device_get(params["encoder"])}
  rows = []
  for b in batches:
    q = np.asarray(backbone.encode(enc, b["query_tokens"], b["query_mask"]))
    eos_scored = model.score_special_tokens
    rows.append(q[b["query_mask"] & (eos_scored | (b["query_tokens"] != 1))])
    bsz, g, ld = b["doc_tokens"].shape
    d_tok, d_mask = b["doc_tokens"].reshape(bsz * g, ld), b["doc_mask"].reshape(bsz * g, ld)
    p = np.asarray(backbone.encode(enc, d_tok, d_mask))
    rows.append(p[d_mask & (eos_scored | (d_tok != 1))])
  return np.concatenate(rows).astype(np.float64)


def _same_subspace_and_order(kernel: np.ndarray, reference: np.ndarray, atol: float) -> None:
  # Columns equal up to sign (eigenvalues are distinct for random data).
  overlap = np.abs(kernel.T @ reference)
  np.testing.assert_allclose(overlap, np.eye(kernel.shape[1]), atol=atol)


# ------------------------------------------------------------------------------------------------ eigenvectors

def test_principal_directions_match_numpy_svd():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 12)) * np.linspace(3, 0.5, 12)[None, :] @ np.linalg.qr(rng.normal(size=(12, 12)))[0]
  kernel, retained = head_init.principal_directions(x.T @ x, 5)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  assert kernel.shape == (12, 5) and kernel.dtype == np.float32
  _same_subspace_and_order(kernel.astype(np.float64), vt[:5].T, atol=1e-5)
  np.testing.assert_allclose(kernel.T @ kernel, np.eye(5), atol=1e-5)
  assert retained == pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
  # Deterministic sign (every process derives the same head): each column's largest-magnitude entry is positive.
  pivots = kernel[np.argmax(np.abs(kernel), axis=0), np.arange(5)]
  assert np.all(pivots > 0)


@pytest.mark.parametrize("gram, dim, message", [
    (np.ones((3, 4)), 2, "square"),
    (np.eye(4), 0, "token_dim"),
    (np.eye(4), 5, "token_dim"),
    (np.zeros((4, 4)), 2, "no valid token states"),
    (np.full((4, 4), np.nan), 2, "non-finite"),
])
def test_principal_directions_bad_input(gram, dim, message):
  with pytest.raises(ValueError, match=message):
    head_init.principal_directions(gram, dim)


# ------------------------------------------------------------------------------------------------ on the mesh

@pytest.mark.parametrize("center,unscored_eos", [(False, False), (True, False), (False, True)])
def test_head_is_top_eigenvectors_of_backbone_states_and_input_is_rewound(center, unscored_eos, t5_vocab):
  # unscored_eos: a model that does not score special tokens takes its head from the scored tokens only.
  model = (_model(vocab_size=32128, vocab_path=t5_vocab, score_special_tokens=False) if unscored_eos
           else _model())
  tr = _trainer(model)
  state = tr.init_state(jax.random.PRNGKey(0))
  data = Batches()
  first = next(data)
  data.set_state({"step": 0})
  init = head_init.PrincipalHeadInit(num_batches=3, center=center)
  params, info = init(tr, state.params, data)

  np.testing.assert_array_equal(next(data)["query_tokens"], first["query_tokens"])  # rewound
  x = _numpy_states(model, state.params, [b for b, _ in zip(Batches(), range(3))])
  assert info["tokens"] == x.shape[0]
  m = x.T @ x
  if center:
    mean = x.mean(axis=0)
    m = m / x.shape[0] - np.outer(mean, mean)
  values, vectors = np.linalg.eigh(m)
  reference = vectors[:, ::-1][:, :16]
  kernel = np.asarray(jax.device_get(params["token_proj"]["kernel"]), np.float64)
  _same_subspace_and_order(kernel, reference, atol=1e-3)
  assert info["retained"] == pytest.approx(values[::-1][:16].sum() / values.sum(), rel=1e-4)
  # Same sharding as the fresh head; the encoder is untouched.
  assert params["token_proj"]["kernel"].sharding == state.params["token_proj"]["kernel"].sharding
  for a, b in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(state.params["encoder"])):
    assert a is b


def test_train_with_head_init_starts_from_the_principal_head(tmp_path, capsys):
  model = _model()
  state = train.train(model=model, partitioner=partitioning.Partitioner(mesh=partitioning.make_mesh(data=8)),
                      train_data=Batches(), optimizer=optax.sgd(0.0), model_dir=str(tmp_path / "run"),
                      total_steps=1, head_init=head_init.PrincipalHeadInit(num_batches=2), export=False)
  out = capsys.readouterr().out
  assert "token head set to the principal directions of" in out
  tr = _trainer(model, data=8, mp=1)
  init_rng, _ = jax.random.split(jax.random.PRNGKey(0))  # as train() derives it from seed 0
  expected, _ = head_init.PrincipalHeadInit(num_batches=2)(tr, tr.init_state(init_rng).params, Batches())
  # lr 0: the trained head is exactly the initial one.
  np.testing.assert_allclose(np.asarray(jax.device_get(state.params["token_proj"]["kernel"])),
                             np.asarray(jax.device_get(expected["token_proj"]["kernel"])), atol=1e-6)


def test_bad_configuration():
  with pytest.raises(ValueError, match="num_batches"):
    head_init.PrincipalHeadInit(num_batches=0)
  model = _model(token_dim=0)
  tr = _trainer(model)
  with pytest.raises(ValueError, match="token head"):
    head_init.PrincipalHeadInit()(tr, tr.init_state(jax.random.PRNGKey(0)).params, Batches())
