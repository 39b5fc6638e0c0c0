"""Initialising the XTR token head from the principal directions of the pretrained encoder's token states.

A fresh, random 384 -> 128 head throws away part of what a pretrained encoder knows before training starts: on
SciFact test the untrained all-MiniLM-L6-v2 loses 1.3 nDCG@10 points with a seeded random head (README, Results),
and a short fine-tune at a small learning rate barely moves the head (kernel std 0.0509 -> 0.0510 in 250 steps), so
the encoder has to bend itself around the random projection instead. The best rank-`token_dim` linear map for
preserving the inner products of unit vectors x (the cosine similarities every scorer here is built on) is the
projection onto the top eigenvectors of their second-moment matrix E[x x^T] (uncentered PCA: the similarity is not
translation invariant, so no mean is removed). `PrincipalHeadInit` estimates that matrix from the encoder's
L2-normalized last hidden states of the first training batches (queries and documents, padding excluded), on the
training mesh, and writes its top eigenvectors into `params/token_proj/kernel` [d_model, token_dim].

Measured on all-MiniLM-L6-v2 and training batches (`benchmarks/head_init_probe.py`): the principal head starts a
little better under the ColBERT loss (in-batch loss 0.49 vs 0.53 for a random head) but worse under the XTR loss
(accuracy 55% vs 71% at k_train 128), so the XTR experiments keep a random head; it is an option, off by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np

from xtr_jax import network


def principal_directions(gram: np.ndarray, token_dim: int) -> tuple[np.ndarray, float]:
  """Top-`token_dim` eigenvectors of a symmetric PSD matrix, with a deterministic sign.

  Args:
    gram: float [d, d], sum (or mean) of x x^T over token states.
    token_dim: number of directions kept, 1 <= token_dim <= d.

  Returns:
    (kernel float32 [d, token_dim] with orthonormal columns ordered by eigenvalue, descending; the largest-magnitude
    entry of each column is positive), retained = the kept eigenvalues' share of the trace (float in [0, 1]).

  Raises:
    ValueError: non-square or non-finite `gram`, token_dim out of range, or a zero matrix (no token states).
  """
  gram = np.asarray(gram, np.float64)
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"gram must be square [d, d], got shape {gram.shape}")
  d = gram.shape[0]
  if not 1 <= int(token_dim) <= d:
    raise ValueError(f"token_dim must be in [1, {d}], got {token_dim}")
  if not np.all(np.isfinite(gram)):
    raise ValueError("gram has non-finite entries (non-finite token states?)")
  trace = float(np.trace(gram))
  if trace <= 0:
    raise ValueError("gram is zero: no valid token states were seen")
  values, vectors = np.linalg.eigh((gram + gram.T) / 2)  # ascending
  order = np.argsort(values)[::-1][:token_dim]
  kernel = vectors[:, order]
  pivot = np.argmax(np.abs(kernel), axis=0)
  kernel = kernel * np.sign(kernel[pivot, np.arange(token_dim)])[None, :]
  retained = float(np.clip(values[order], 0, None).sum() / trace)
  return kernel.astype(np.float32), retained


def _masked_moments(states: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  x = jnp.where(mask[..., None], states, 0.0).reshape(-1, states.shape[-1])
  second = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)  # float32 sums on GPU/TPU too
  return second, x.sum(axis=0), jnp.sum(mask, dtype=jnp.float32)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PrincipalHeadInit:
  """Replaces the fresh token head by the principal directions of the backbone's token states (see module doc).

  Attributes:
    num_batches: training batches (global) whose query and document tokens are used. The batches are peeked: the
      training input is put back to where it was, so training still sees them.
    center: use the covariance (mean removed) instead of the second moment: the head then keeps the directions in
      which token states DIFFER, dropping the component they share (the anisotropy of BERT-like states), which
      discriminates between tokens rather than preserving raw cosine values.
  """
  num_batches: int = 4
  center: bool = False

  def __post_init__(self):
    if int(self.num_batches) < 1:
      raise ValueError(f"PrincipalHeadInit.num_batches must be >= 1, got {self.num_batches}")

  def peek_batches(self, train_data: Any) -> list[dict[str, np.ndarray]]:
    """The next `num_batches` local batches of `train_data`, which is then rewound (`get_state` / `set_state`)."""
    saved = train_data.get_state()
    it: Iterator[dict[str, np.ndarray]] = iter(train_data)
    batches = [next(it) for _ in range(self.num_batches)]
    train_data.set_state(saved)
    return batches

  def moments(self, tr: Any, params: Any, local_batches: list[Mapping[str, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum of x x^T float64 [d_model, d_model], sum of x float64 [d_model], number of tokens) over the unit-norm
    backbone states x of every scored query and document token of the global batches. Runs jitted on `tr`'s mesh
    (a `trainer.Trainer`)."""
    model = tr.model
    backbone = network.XTREncoder(model.encoder_config, token_dim=0)

    def fn(encoder_params, batch):
      q = backbone.apply({"params": {"encoder": encoder_params}}, batch["query_tokens"], batch["query_mask"],
                         deterministic=True)
      b, g, ld = batch["doc_tokens"].shape
      d_mask = batch["doc_mask"].reshape(b * g, ld)
      p = backbone.apply({"params": {"encoder": encoder_params}}, batch["doc_tokens"].reshape(b * g, ld), d_mask,
                         deterministic=True)
      # Only the tokens the head will score (model.scoring_mask drops special tokens when they are not scored).
      gq, sq, nq = _masked_moments(q, model.scoring_mask(batch["query_tokens"], batch["query_mask"]))
      gp, sp, npt = _masked_moments(p, model.scoring_mask(batch["doc_tokens"].reshape(b * g, ld), d_mask))
      return gq + gp, sq + sp, nq + npt

    encoder_params = params["encoder"]
    encoder_shardings = tr.state_shardings.params["encoder"]
    total, first, count = 0.0, 0.0, 0.0
    jitted = None
    for local in local_batches:
      batch = tr.global_batch(local)
      if jitted is None:
        jitted = jax.jit(fn, in_shardings=(encoder_shardings, tr.batch_shardings(batch)),
                         out_shardings=tr.partitioner.replicated())
      with jax.set_mesh(tr.mesh):
        g, s, n = jax.device_get(jitted(encoder_params, batch))
      total = total + np.asarray(g, np.float64)
      first = first + np.asarray(s, np.float64)
      count += float(n)
    return total, first, int(count)

  def __call__(self, tr: Any, params: Any, train_data: Any) -> tuple[Any, dict[str, float]]:
    """(params with `token_proj/kernel` replaced, {"retained": share of the second moment (covariance when
    `center`) kept, "tokens": count}).

    Raises:
      ValueError: the model has no token head (token_dim=0), or no valid tokens were seen.
    """
    if "token_proj" not in params:
      raise ValueError("PrincipalHeadInit needs a model with a token head (XTRModel.token_dim > 0)")
    leaf = params["token_proj"]["kernel"]
    gram, first, tokens = self.moments(tr, params, self.peek_batches(train_data))
    if self.center and tokens:
      mean = first / tokens
      gram = gram / tokens - np.outer(mean, mean)
    kernel, retained = principal_directions(gram, leaf.shape[1])
    if kernel.shape != tuple(leaf.shape):
      raise ValueError(f"token_proj/kernel is {tuple(leaf.shape)} but the backbone states give {kernel.shape}")
    kernel = kernel.astype(leaf.dtype)
    new_leaf = jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx: kernel[idx])
    new_params = dict(params)
    new_params["token_proj"] = {**params["token_proj"], "kernel": new_leaf}
    return new_params, {"retained": retained, "tokens": float(tokens)}
