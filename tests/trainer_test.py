"""Trainer and `train()`: learning on real pairs, metrics and outputs, full-batch gradient accumulation, optimizer
builders, the NaN/Inf guard, and the bad-input errors."""

from __future__ import annotations

import functools
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xtr_jax import (checkpointing, gin_utils, losses, models, network, optimizers, partitioning, train,
                     train_metrics, trainer)


def _model(*, vocab_size: int = 256, k_train: int = 16, loss=None, vocab_path=None):
  enc = network.T5EncoderConfig(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.0)
  return models.XTRModel(encoder_config=enc, token_dim=16, query_max_len=8, doc_max_len=16, vocab_path=vocab_path,
                         loss=loss or functools.partial(losses.xtr_loss, k_train=k_train))


def _partitioner(data: int = 4, model: int = 2) -> partitioning.Partitioner:
  return partitioning.Partitioner(mesh=partitioning.make_mesh(data=data, model=model))


class RandomPairs:
  """Deterministic random-token batches with the TrainInput interface (state = step)."""

  def __init__(self, batch_size: int, vocab: int = 256, seed: int = 0):
    self.batch_size, self.vocab, self.seed, self.step = batch_size, vocab, seed, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    b = self.batch_size
    q_mask = np.arange(8)[None, :] < rng.integers(3, 9, (b, 1))
    d_mask = np.arange(16)[None, None, :] < rng.integers(5, 17, (b, 2, 1))
    return {"query_tokens": np.where(q_mask, rng.integers(2, self.vocab, (b, 8)), 0).astype(np.int32),
            "query_mask": q_mask, "doc_tokens": np.where(d_mask, rng.integers(2, self.vocab, (b, 2, 16)), 0
                                                         ).astype(np.int32), "doc_mask": d_mask}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = int(state["step"])


# ------------------------------------------------------------------------------------------------ real training

RUN_BINDINGS = """
VOCAB_PATH = '{vocab}'
SQUAD_PAIRS = '{pairs}'
MODEL_DIR = '{model_dir}'
TRAIN_STEPS = 40
BATCH_SIZE = 32
QUERY_MAX_LEN = 12
DOC_MAX_LEN = 32
WARMUP_STEPS = 4
LEARNING_RATE = 1e-2
T5EncoderConfig.dropout_rate = 0.0
train.log_period = 10
train.eval_period = 40
train.eval_steps = 2
CheckpointConfig.period = 20
make_mesh.data = 4
make_mesh.model = 2
"""


def test_train_on_real_pairs_learns_and_writes_everything(tmp_path, data_dir, capsys):
  model_dir = tmp_path / "run"
  gin_utils.parse_gin(["experiments/xtr_tiny_squad.gin"], RUN_BINDINGS.format(
      vocab=data_dir / "vocab" / "t5_spiece.model", pairs=data_dir / "train" / "squad-v1.1-dev-pairs.jsonl",
      model_dir=model_dir).strip().splitlines())
  from xtr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  # Held-out evaluation: MedQuAD pairs, never trained on here.
  eval_data = input_pipeline.TrainInput(
      sources=[input_pipeline.jsonl_source(path=str(data_dir / "train" / "medquad-pairs.jsonl"), name="medquad")],
      global_batch_size=32, vocab_path=str(data_dir / "vocab" / "t5_spiece.model"), query_max_len=12,
      doc_max_len=32, num_negatives=1, seed=1)
  state = train.train(eval_data=eval_data)
  assert int(state.step) == 40
  out = capsys.readouterr().out
  assert "[train] step 10/40 loss=" in out and "examples_per_second=" in out

  scalars = train_metrics.read_scalars(str(model_dir / "train"))
  for tag in ("loss", "accuracy", "mean_z", "grad_norm", "learning_rate", "step_time", "examples_per_second",
              "tokens_per_second"):
    assert tag in scalars and len(scalars[tag]) == 4, (tag, sorted(scalars))
  losses_by_window = [v for _, v in scalars["loss"]]
  print("training loss per 10-step window:", losses_by_window)
  # Training loss (mean over each 10-step window) goes down on real SQuAD pairs, window after window.
  assert all(b < a for a, b in zip(losses_by_window, losses_by_window[1:])), losses_by_window
  assert losses_by_window[-1] < losses_by_window[0] - 0.1, losses_by_window
  lr = dict(scalars["learning_rate"])
  assert lr[10] == pytest.approx(np.mean([1e-2 * (1 - (s - 4) / 36) for s in range(4, 10)] +
                                         [1e-2 * s / 4 for s in range(4)]), rel=1e-4)
  eval_scalars = train_metrics.read_scalars(str(model_dir / "eval"))
  assert [s for s, _ in eval_scalars["loss"]] == [40] and np.isfinite(eval_scalars["loss"][0][1])

  config = (model_dir / "config.gin").read_text()
  assert "TRAIN_STEPS = 40" in config and "train.total_steps = %TRAIN_STEPS" in config
  assert "xtr_loss.k_train = 64" in config
  assert sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 40]

  # The final model dir loads and its parameters are the trained ones.
  loaded = models.load_pretrained(str(model_dir / "model"))
  got = models.flatten_params(loaded.params)
  want = models.flatten_params(jax.device_get(state.params))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  q, q_mask = loaded.encode_queries(["who wrote the declaration of independence?"])
  assert q.shape[-1] == loaded.model.token_dim and np.allclose(np.linalg.norm(q[q_mask], axis=-1), 1, atol=1e-4)


# ------------------------------------------------------------------------------------------ gradient accumulation


def test_two_microbatches_give_the_full_batch_update():
  model = _model(k_train=16)
  part = _partitioner()
  sgd = optax.sgd(1.0)  # new params = params - grads: the update IS the gradient
  full = trainer.Trainer(model=model, partitioner=part, optimizer=sgd)
  accum = trainer.Trainer(model=model, partitioner=part, optimizer=sgd, num_microbatches=2)
  init = full.init_state(jax.random.PRNGKey(0))
  start = jax.device_get(init.params)
  local = next(RandomPairs(16))
  batch = full.global_batch(local)
  rng = jax.random.PRNGKey(3)
  s_full, m_full = full.train_step(init, batch, rng)
  s_acc, m_acc = accum.train_step(accum.init_state(jax.random.PRNGKey(0)), accum.global_batch(local), rng)
  for key in ("loss", "accuracy", "mean_z", "grad_norm"):
    assert float(m_acc[key]) == pytest.approx(float(m_full[key]), rel=1e-5, abs=1e-6), key
  g_full = jax.tree.map(lambda a, b: b - a, jax.device_get(s_full.params), start)
  g_acc = jax.tree.map(lambda a, b: b - a, jax.device_get(s_acc.params), start)
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_full))
  assert scale > 1e-4
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_acc)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * scale)

  # Negative control: a per-microbatch top-k (what naive accumulation computes) is a different objective.
  rows = np.arange(16)
  halves = [{k: jnp.asarray(v[rows % 2 == i]) for k, v in local.items()} for i in range(2)]
  naive = np.mean([float(model.loss_fn(start, h, None)[0]) for h in halves])
  assert abs(naive - float(m_full["loss"])) > 1e-3


def test_compile_train_step_is_the_step_train_step_runs():
  """Compiling from shapes alone allocates nothing, reports memory that grows with the batch, and is the same jitted
  function the training step then runs (one compile cache)."""
  tr = trainer.Trainer(model=_model(), partitioner=_partitioner(), optimizer=optax.sgd(1.0))
  local = next(RandomPairs(16))
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  temp_16 = tr.compile_train_step(shapes).memory_analysis().temp_size_in_bytes
  big = {k: jax.ShapeDtypeStruct((64,) + v.shape[1:], v.dtype) for k, v in local.items()}
  temp_64 = trainer.Trainer(model=_model(), partitioner=_partitioner(), optimizer=optax.sgd(1.0)
                            ).compile_train_step(big).memory_analysis().temp_size_in_bytes
  assert 0 < temp_16 < temp_64
  jitted = tr._train_jit  # pylint: disable=protected-access
  _, metrics = tr.train_step(tr.init_state(jax.random.PRNGKey(0)), tr.global_batch(local), jax.random.PRNGKey(1))
  assert tr._train_jit is jitted and np.isfinite(float(metrics["loss"]))  # pylint: disable=protected-access


def test_microbatches_must_split_over_devices():
  tr = trainer.Trainer(model=_model(), partitioner=_partitioner(), optimizer=optax.sgd(1.0), num_microbatches=3)
  with pytest.raises(ValueError, match=r"global batch size 16 must be divisible by num_microbatches \(3\)"):
    tr.global_batch(next(RandomPairs(16)))


# --------------------------------------------------------------------------------------------- optimizer builders


def test_schedule_warmup_then_decay_and_adafactor_step():
  sched = optimizers.xtr_lr_schedule(learning_rate=1e-3, warmup_steps=10, decay="linear", decay_steps=110)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3) and float(sched(60)) == pytest.approx(5e-4)
  assert float(sched(110)) == pytest.approx(0.0, abs=1e-12)
  cos = optimizers.xtr_lr_schedule(learning_rate=1.0, warmup_steps=0, decay="cosine", decay_steps=100, end_ratio=0.1)
  assert float(cos(50)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  rs = optimizers.xtr_lr_schedule(learning_rate=1.0, warmup_steps=100, decay="rsqrt")
  assert float(rs(100)) == pytest.approx(1.0) and float(rs(300)) == pytest.approx((100 / 300) ** 0.5, rel=1e-5)
  with pytest.raises(ValueError, match="decay_steps"):
    optimizers.xtr_lr_schedule(decay="linear", warmup_steps=10, decay_steps=5)
  with pytest.raises(ValueError, match="adafactor"):
    optimizers.xtr_optimizer(name="sgd")

  tx, sched = optimizers.xtr_optimizer(name="adafactor", clip_norm=1.0, schedule=optimizers.xtr_lr_schedule(
      learning_rate=1e-2, decay="constant"))
  tr = trainer.Trainer(model=_model(), partitioner=_partitioner(), optimizer=tx, schedule=sched)
  state = tr.init_state(jax.random.PRNGKey(0))
  before = jax.device_get(state.params)
  state, metrics = tr.train_step(state, tr.global_batch(next(RandomPairs(8))), jax.random.PRNGKey(0))
  assert float(metrics["finite"]) == 1.0 and float(metrics["learning_rate"]) == pytest.approx(1e-2)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before),
                                                          jax.tree.leaves(jax.device_get(state.params))))
  assert moved > 1e-4


def test_lr_multipliers_scale_matching_parameters_in_a_sharded_step():
  """AdamW with a 10x head multiplier equals, leaf by leaf, AdamW at the base rate for the encoder and at 10x the
  rate for the head (independent optax references), on a 4x2 mesh."""
  base = optax.constant_schedule(1e-3)
  tx, _ = optimizers.xtr_optimizer(schedule=base, clip_norm=None, lr_multipliers=[("token_proj/.*", 10.0)])
  tr = trainer.Trainer(model=_model(), partitioner=_partitioner(), optimizer=tx)
  state = tr.init_state(jax.random.PRNGKey(0))
  params = jax.device_get(state.params)
  batch = next(RandomPairs(8))
  grads = jax.grad(lambda p: tr.model.loss_fn(p, {k: jnp.asarray(v) for k, v in batch.items()}, None)[0])(params)
  state, _ = tr.train_step(state, tr.global_batch(batch), jax.random.PRNGKey(0))
  new = jax.device_get(state.params)
  for lr, part in ((1e-3, "encoder"), (1e-2, "token_proj")):
    ref_tx = optax.adamw(lr, weight_decay=0.0)
    upd, _ = ref_tx.update(grads[part], ref_tx.init(params[part]), params[part])
    expected = optax.apply_updates(params[part], upd)
    for a, b in zip(jax.tree.leaves(new[part]), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for bad in ([("x", 0.0)], [("(", 2.0)], ["token_proj"]):
    with pytest.raises(ValueError, match="lr_multipliers"):
      optimizers.xtr_optimizer(schedule=base, lr_multipliers=bad)
  misspelt, _ = optimizers.xtr_optimizer(schedule=base, lr_multipliers=[("token_prj/.*", 10.0)])
  with pytest.raises(ValueError, match=r"\['token_prj/\.\*'\] match no parameter; parameter names: encoder/"):
    misspelt.init(params)


# ----------------------------------------------------------------------------------------------- NaN/Inf guard


def _nan_on_empty_query_loss(q, q_mask, p, d_mask, labels):
  """XTR loss, made NaN when a query has no valid token (the test's way to inject a bad step)."""
  loss, metrics = losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=16)
  bad = jnp.any(~jnp.any(q_mask, axis=1))
  return jnp.where(bad, jnp.nan, loss), metrics


class PoisonAt(RandomPairs):
  def __init__(self, batch_size: int, poison_step: int):
    super().__init__(batch_size)
    self.poison_step = poison_step

  def __next__(self):
    batch = super().__next__()
    if self.step == self.poison_step:
      batch["query_mask"][0] = False
    return batch


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  model = _model(loss=_nan_on_empty_query_loss)
  cfg = checkpointing.CheckpointConfig(period=2, async_save=True)
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradient at step 5 .*Last good checkpoint: 4"):
    train.train(model=model, partitioner=_partitioner(), train_data=PoisonAt(8, 5), model_dir=str(tmp_path),
                total_steps=10, checkpoint_cfg=cfg, optimizer=optax.adam(1e-3), log_period=1)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  flat = checkpointing.load_source_tree(str(tmp_path / "checkpoints" / "4"))
  assert all(np.all(np.isfinite(v)) for v in flat.values())
  assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------------- bad input


def test_model_dir_not_writable_fails_before_compute(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")

  class Untouchable:
    def __getattr__(self, name):
      raise AssertionError(f"model.{name} used before MODEL_DIR was checked")

  with pytest.raises(PermissionError, match="MODEL_DIR .*a_file/run.* is not writable"):
    train.train(model=Untouchable(), train_data=Untouchable(), model_dir=str(blocker / "run"), total_steps=5)


def test_batch_not_divisible_by_data_axis_names_both_numbers():
  tr = trainer.Trainer(model=_model(), partitioner=_partitioner(4, 2), optimizer=optax.sgd(1.0))
  with pytest.raises(ValueError, match="global batch size 6 is not divisible by the data-parallel size 4"):
    tr.global_batch(next(RandomPairs(6)))
  with pytest.raises(ValueError, match=r"missing keys \['doc_mask'\]"):
    tr.global_batch({k: v for k, v in next(RandomPairs(8)).items() if k != "doc_mask"})


def test_required_gin_value_unset_names_it(tmp_path):
  train.train  # pylint: disable=pointless-statement  (its module registers every configurable the file references)
  bindings = [f"MODEL_DIR = '{tmp_path}'", "TRAIN_STEPS = 10", "BATCH_SIZE = 8", "VOCAB_PATH = 'v.model'"]
  with pytest.raises(ValueError, match="TRAIN_SOURCES.* set to `%gin.REQUIRED` but not subsequently overridden"):
    gin_utils.parse_gin(["runs/finetune.gin"], bindings)


def test_restart_with_mismatched_model_names_parameters(tmp_path):
  data = RandomPairs(8)
  train.train(model=_model(), partitioner=_partitioner(), train_data=data, model_dir=str(tmp_path), total_steps=2,
              checkpoint_cfg=checkpointing.CheckpointConfig(period=1), optimizer=optax.sgd(0.1), export=False)
  other = models.XTRModel(encoder_config=network.T5EncoderConfig(
      vocab_size=256, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0), token_dim=16)
  with pytest.raises(ValueError, match=r"params/encoder/layers_0/mlp/wi_0/kernel: checkpoint has \(32, 64\), model "
                                       r"needs \(32, 48\)"):
    train.train(model=other, partitioner=_partitioner(), train_data=RandomPairs(8), model_dir=str(tmp_path),
                total_steps=4, optimizer=optax.sgd(0.1))
