"""The XTR trainer: TrainState, sharded jitted train / eval steps, and full-batch gradient accumulation.

Every step is `jax.jit` with `NamedSharding`s from the partitioning rules (parameters by their logical axes, batches
over the data-parallel axes), donates the old state, and runs under `jax.set_mesh(mesh)` so the sharded XTR loss finds
the ambient mesh.

Gradient accumulation keeps the paper's objective: XTR's in-batch top-k_train token retrieval is taken over the
document tokens of the FULL global batch, never per microbatch (a per-microbatch top-k would be a different loss:
fewer competing tokens, easier negatives). It is GradCache-style (Gao et al., 2021), in two passes:

  1. encode every microbatch's queries and documents WITHOUT gradients (`lax.scan`, one microbatch live at a time)
     and keep only the output token embeddings of the whole batch;
  2. compute the XTR loss on the full batch of embeddings and its gradient with respect to the embeddings;
  3. re-encode each microbatch with gradients and pull its slice of the embedding gradient back into the parameters
     with `jax.vjp`; parameter gradients are summed over microbatches.

Trade-off: activation memory is that of ONE microbatch (plus the full batch's [B, L, 128] output embeddings and
their gradients, which are small next to encoder activations), at the price of one extra forward pass of the encoder:
about 4/3 the FLOPs of a plain step (forward + forward + backward(=2 forwards) vs forward + backward). The resulting
update equals the full-batch update exactly (same global top-k, same loss), up to float summation order; dropout uses
the same per-microbatch random keys in both passes so the re-encoding reproduces pass 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from xtr_jax import checkpointing, partitioning

BATCH_KEYS = ("query_tokens", "query_mask", "doc_tokens", "doc_mask")


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds: step (int32 scalar), model params (pytree), optimizer state (pytree)."""
  step: jax.Array
  params: Any
  opt_state: Any


def check_batch(batch: Mapping[str, Any], *, where: str = "batch") -> tuple[int, int, int, int]:
  """(B, G, Lq, Ld) of a training batch; ValueError naming the field on a missing key / bad shape."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}; expected {list(BATCH_KEYS)}, got {sorted(batch)}")
  qt, qm, dt, dm = (batch[k] for k in BATCH_KEYS)
  if qt.ndim != 2 or qm.shape != qt.shape:
    raise ValueError(f"{where}: query_tokens/query_mask must be [B, Lq] alike, got {qt.shape} / {qm.shape}")
  if dt.ndim != 3 or dm.shape != dt.shape or dt.shape[0] != qt.shape[0]:
    raise ValueError(f"{where}: doc_tokens/doc_mask must be [B, G, Ld] with B={qt.shape[0]}, "
                     f"got {dt.shape} / {dm.shape}")
  return qt.shape[0], dt.shape[1], qt.shape[1], dt.shape[2]


def _plain_params(tree: Any) -> Any:
  """The parameter tree without the {"params": ...} collection wrapper (checkpoint paths read `params/encoder/...`)."""
  if isinstance(tree, Mapping) and set(tree.keys()) == {"params"}:
    return tree["params"]
  return tree


def _opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any,
                         replicated: NamedSharding) -> Any:
  """Optimizer-state leaves that mirror a parameter (AdamW's mu/nu) get its sharding; the rest (counts, Adafactor's
  factored row/column statistics) are replicated."""
  params_by_name = checkpointing.flatten_with_names(abstract_params)
  shard_by_name = checkpointing.flatten_with_names(param_shardings)

  def pick(kp, leaf):
    name = checkpointing.path_str(kp)
    for pname, p in params_by_name.items():
      if (name == pname or name.endswith("/" + pname)) and tuple(p.shape) == tuple(leaf.shape):
        return shard_by_name[pname]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


class Trainer:
  """Builds the sharded state and the jitted steps for one model on one mesh.

  Args:
    model: an `XTRModel` (or anything with `init`, `abstract_variables`, `encode`, `loss_fn`, `loss`).
    partitioner: mesh + logical-axis rules.
    optimizer: optax transformation (see `optimizers.xtr_optimizer`).
    schedule: learning-rate schedule, reported as a metric.
    num_microbatches: gradient-accumulation factor (1 = plain step); see the module docstring.
  """

  def __init__(self, *, model: Any, partitioner: partitioning.Partitioner, optimizer: optax.GradientTransformation,
               schedule: Callable[[Any], Any] | None = None, num_microbatches: int = 1):
    if num_microbatches < 1:
      raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    self.model = model
    self.partitioner = partitioner
    self.mesh = partitioner.mesh
    self.tx = optimizer
    self.schedule = schedule
    self.num_microbatches = num_microbatches

    boxed = model.abstract_variables()
    self._param_shardings = _plain_params(partitioner.params_shardings(boxed))
    abstract_params = _plain_params(nn.meta.unbox(boxed))
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    replicated = partitioner.replicated()
    self.state_shardings = TrainState(
        step=replicated, params=self._param_shardings,
        opt_state=_opt_state_shardings(abstract_opt, abstract_params, self._param_shardings, replicated))
    self.abstract_state = checkpointing.abstract_like(
        TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt),
        self.state_shardings)
    self._init_jit = jax.jit(self._init_fn, out_shardings=self.state_shardings)
    self._train_jit = None
    self._eval_jit = None

  # ---- state -------------------------------------------------------------------------------------------------
  def _init_fn(self, rng: jax.Array) -> TrainState:
    params = _plain_params(nn.meta.unbox(self.model.init(rng)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

  def init_state(self, rng: jax.Array) -> TrainState:
    """Fresh, sharded TrainState (parameters initialised from `rng`, step 0)."""
    with jax.set_mesh(self.mesh):
      return self._init_jit(rng)

  def params_count(self) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params))

  # ---- batches -----------------------------------------------------------------------------------------------
  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return {k: self.partitioner.batch_sharding(len(getattr(v, "shape", np.shape(v)))) for k, v in batch.items()}

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global sharded arrays from this process's rows (process i holds rows [i*b, (i+1)*b) of the global batch).

    Raises:
      ValueError: naming the global batch size and the data-parallel size when they do not divide.
    """
    b, _, _, _ = check_batch(local_batch, where="training batch")
    global_b = b * jax.process_count()
    self.partitioner.check_batch_size(global_b)
    if self.num_microbatches > 1:
      self._check_microbatches(global_b)
    out = {}
    for k in BATCH_KEYS:
      v = np.asarray(local_batch[k])
      sharding = self.partitioner.batch_sharding(v.ndim)
      out[k] = jax.make_array_from_process_local_data(sharding, v, (global_b,) + v.shape[1:])
    return out

  def _check_microbatches(self, global_b: int) -> None:
    m, d = self.num_microbatches, self.partitioner.data_parallel_size
    if global_b % (m * d):
      raise ValueError(f"global batch size {global_b} must be divisible by num_microbatches ({m}) x the "
                       f"data-parallel size ({d}) = {m * d}, so every microbatch splits evenly over the devices")

  # ---- steps -------------------------------------------------------------------------------------------------
  def _embed(self, params: Any, q_tokens, q_mask, d_tokens, d_mask, rng) -> tuple[jax.Array, jax.Array]:
    """(q [b, Lq, D], d [b*G, Ld, D]) for one (micro)batch, in training mode."""
    b, g, ld = d_tokens.shape
    rq, rd = jax.random.split(rng)
    q = self.model.encode(params, q_tokens, q_mask, deterministic=False, dropout_rng=rq)
    d = self.model.encode(params, d_tokens.reshape(b * g, ld), d_mask.reshape(b * g, ld), deterministic=False,
                          dropout_rng=rd)
    return q, d

  def _accumulated_grads(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
    """GradCache two-pass loss and gradients over the full batch (see module docstring)."""
    m = self.num_microbatches
    qt, qm, dt, dm = (batch[k] for k in BATCH_KEYS)
    b, g, _, ld = check_batch(batch)
    mb = b // m
    batch_axes = self.partitioner.batch_axes

    def split(x):
      # Row r goes to microbatch r % m: each microbatch keeps an even share of every device's rows, so no data moves.
      y = x.reshape((mb, m) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          y, NamedSharding(self.mesh, P(None, batch_axes, *([None] * (x.ndim - 1)))))

    def merge(y):  # inverse of split: [m, mb, ...] -> [b, ...] in the original row order
      return y.swapaxes(0, 1).reshape((b,) + y.shape[2:])

    micro = tuple(split(x) for x in (qt, qm, dt, dm))
    keys = jax.random.split(rng, m)
    frozen = jax.lax.stop_gradient(params)

    def pass1(carry, xs):
      qt_i, qm_i, dt_i, dm_i, key = xs
      q, d = self._embed(frozen, qt_i, qm_i, dt_i, dm_i, key)
      return carry, (q, d.reshape((mb, g) + d.shape[1:]))
    _, (q_all, d_all) = jax.lax.scan(pass1, None, micro + (keys,))
    q_full = merge(q_all)  # [B, Lq, D]
    d_full = merge(d_all).reshape((b * g,) + d_all.shape[3:])  # [B*G, Ld, D]
    labels = jnp.arange(b, dtype=jnp.int32) * g

    def loss_on_embeddings(q, d):
      return self.model.loss(q, qm, d, dm.reshape(b * g, ld), labels)
    (loss, metrics), (g_q, g_d) = jax.value_and_grad(loss_on_embeddings, argnums=(0, 1), has_aux=True)(
        q_full, d_full)
    g_q = split(g_q)
    g_d = split(g_d.reshape((b, g) + g_d.shape[1:]))

    def pass2(acc, xs):
      qt_i, qm_i, dt_i, dm_i, key, gq_i, gd_i = xs
      _, vjp = jax.vjp(lambda p: self._embed(p, qt_i, qm_i, dt_i, dm_i, key), params)
      (grads_i,) = vjp((gq_i, gd_i.reshape((mb * g,) + gd_i.shape[2:])))
      return jax.tree.map(jnp.add, acc, grads_i), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(pass2, zeros, micro + (keys, g_q, g_d))
    return (loss, metrics), grads

  def _train_fn(self, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    if self.num_microbatches == 1:
      (loss, metrics), grads = jax.value_and_grad(self.model.loss_fn, has_aux=True)(state.params, batch, step_rng)
    else:
      (loss, metrics), grads = self._accumulated_grads(state.params, batch, step_rng)
    grad_norm = optax.global_norm(grads)
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # NaN/Inf guard: a bad step leaves the state untouched; the host loop sees `finite == 0` and stops.
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, new_params, state.params),
                           opt_state=jax.tree.map(keep, new_opt, state.opt_state))
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out["loss"] = jnp.asarray(loss, jnp.float32)
    out["grad_norm"] = grad_norm.astype(jnp.float32)
    out["finite"] = ok.astype(jnp.float32)
    out["tokens"] = (jnp.sum(batch["query_mask"]) + jnp.sum(batch["doc_mask"])).astype(jnp.float32)
    if self.schedule is not None:
      out["learning_rate"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    return new_state, out

  def _train_step_jit(self, batch: Mapping[str, Any]):
    if self._train_jit is None:
      replicated = self.partitioner.replicated()
      self._train_jit = jax.jit(
          self._train_fn, in_shardings=(self.state_shardings, self.batch_shardings(batch), replicated),
          out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    return self._train_jit

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch; the input state is donated (do not reuse it)."""
    step = self._train_step_jit(batch)
    with jax.set_mesh(self.mesh):
      return step(state, batch, rng)

  def compile_train_step(self, batch: Mapping[str, Any]) -> Any:
    """The train step compiled for `batch`'s shapes (arrays or jax.ShapeDtypeStruct) without running it or
    allocating a state: `.memory_analysis()` / `.cost_analysis()` of exactly what `train_step` runs."""
    abstract_state = jax.eval_shape(self._init_fn, jax.random.PRNGKey(0))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    with jax.set_mesh(self.mesh):
      return self._train_step_jit(batch).lower(abstract_state, batch, rng).compile()

  def _eval_fn(self, params: Any, batch: Mapping[str, jax.Array]):
    loss, metrics = self.model.loss_fn(params, batch, None)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out["loss"] = jnp.asarray(loss, jnp.float32)
    return out

  def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Loss and metrics of the current parameters on a global batch, without dropout."""
    if self._eval_jit is None:
      self._eval_jit = jax.jit(self._eval_fn, in_shardings=(self._param_shardings, self.batch_shardings(batch)),
                               out_shardings=self.partitioner.replicated())
    with jax.set_mesh(self.mesh):
      return self._eval_jit(state.params, batch)
