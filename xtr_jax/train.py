"""`python -m xtr_jax.train`: gin-configured XTR training with sharded steps, orbax checkpoints and exact resume.

    python -m xtr_jax.train --gin_file=experiments/xtr_tiny_scifact.gin --gin.MODEL_DIR="'/tmp/xtr_tiny'"

A restart with the same MODEL_DIR resumes from its latest checkpoint (parameters, optimizer state, step and the input
pipeline's position), so a preempted job is simply relaunched. Multi-host jobs start every process with the same
command; `distributed.initialize()` picks up the cluster (TPU pod, SLURM, or XTR_COORDINATOR_ADDRESS /
XTR_NUM_PROCESSES / XTR_PROCESS_ID), each process feeds only its shard of the global batch, and process 0 writes
metrics, config and the final model directory.

Outputs in MODEL_DIR: `config.gin` (operative gin config), `checkpoints/<step>/` (orbax), TensorBoard event files
under `train/` and `eval/`, and `model/` (a `models.load_pretrained`-loadable model directory) at the end.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import gin
import jax
import numpy as np
import optax

from xtr_jax import checkpointing, distributed, gin_utils, optimizers, partitioning, train_metrics, trainer
# Imported for their gin configurables (XTRModel, xtr_loss, TrainInput and its sources), which gin files reference;
# `convert` also because `models.load_pretrained` imports it lazily, which gin forbids once the config is locked.
from xtr_jax import convert, losses, models  # noqa: F401  pylint: disable=unused-import
from xtr_jax import head_init as _head_init  # noqa: F401  pylint: disable=unused-import  (PrincipalHeadInit)
from xtr_jax.data import input_pipeline  # noqa: F401  pylint: disable=unused-import

_WINDOW_KEYS_SUM = ("examples", "tokens", "step_time")


def check_model_dir_writable(model_dir: str) -> None:
  """Creates MODEL_DIR and proves it is writable, before any compute is spent.

  Raises:
    PermissionError: naming the directory when it cannot be created or written.
  """
  try:
    os.makedirs(model_dir, exist_ok=True)
    probe = os.path.join(model_dir, f".write_probe_{jax.process_index()}_{uuid.uuid4().hex}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"MODEL_DIR {model_dir!r} is not writable ({e.__class__.__name__}: {e}); "
                          "choose a directory this job can write to") from e


def _host_params(params: Any) -> Any:
  """Numpy copy of the (sharded, possibly multi-host) parameters on every process."""
  if jax.process_count() == 1:
    return jax.device_get(params)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(params, tiled=True)


def export_model(model: Any, params: Any, out_dir: str) -> str:
  """Writes the trained model as a `models.load_pretrained`-loadable directory (process 0); returns its path."""
  host = _host_params(params)
  if distributed.is_coordinator():
    models.PretrainedXTR(model, host).save(out_dir)
  return out_dir


def _unpack_optimizer(optimizer: Any) -> tuple[optax.GradientTransformation, Any]:
  if optimizer is None:
    return optimizers.xtr_optimizer()
  if isinstance(optimizer, optax.GradientTransformation):
    return optimizer, None
  if isinstance(optimizer, tuple) and len(optimizer) == 2 and isinstance(optimizer[0], optax.GradientTransformation):
    return optimizer
  raise TypeError(f"train.optimizer must be an optax GradientTransformation or (transformation, schedule) as "
                  f"returned by xtr_optimizer(), got {type(optimizer).__name__}")


def _mean_window(window: list[dict[str, float]]) -> dict[str, float]:
  keys = window[0].keys()
  return {k: float(np.mean([w[k] for w in window])) for k in keys}


def run_eval(tr: trainer.Trainer, state: trainer.TrainState, batches: Iterable[dict[str, np.ndarray]],
             num_steps: int) -> dict[str, float]:
  """Mean eval metrics over `num_steps` batches (fewer if the iterable ends)."""
  results = []
  for i, local in enumerate(batches):
    if i >= num_steps:
      break
    results.append({k: float(v) for k, v in tr.eval_step(state, tr.global_batch(local)).items()})
  if not results:
    raise ValueError("eval_data produced no batches")
  return _mean_window(results)


@gin.configurable
def train(*, model: Any = gin.REQUIRED, partitioner: partitioning.Partitioner | None = None,
          train_data: Any = gin.REQUIRED, eval_data: Iterable[dict[str, np.ndarray]] | None = None,
          optimizer: Any = None, checkpoint_cfg: checkpointing.CheckpointConfig | None = None,
          restore_cfg: checkpointing.RestoreConfig | None = None, head_init: Any = None,
          model_dir: str = gin.REQUIRED,
          total_steps: int = gin.REQUIRED, eval_period: int = 0, eval_steps: int = 10, log_period: int = 10,
          num_microbatches: int = 1, seed: int = 0, export: bool = True,
          stop_after_steps: int | None = None) -> trainer.TrainState:
  """Trains `model` on `train_data` until step `total_steps`; resumes from MODEL_DIR's latest checkpoint if any.

  Args:
    model: `models.XTRModel`.
    partitioner: mesh + rules (default: all devices on the data axis).
    train_data: iterator of this process's rows of the global batch ({query_tokens int32 [b, Lq], query_mask bool
      [b, Lq], doc_tokens int32 [b, G, Ld], doc_mask bool [b, G, Ld]}) with `get_state()` / `set_state()`
      (`data.input_pipeline.TrainInput`).
    eval_data: optional iterable of batches of the same form; evaluated every `eval_period` steps for `eval_steps`
      batches (0 = never).
    optimizer: `(transformation, schedule)` from `optimizers.xtr_optimizer()` (default) or an optax transformation.
    checkpoint_cfg: save period / keep / async (`CheckpointConfig()` by default).
    restore_cfg: start a new run from pretrained weights (ignored when MODEL_DIR already has a checkpoint).
    head_init: optional `head_init.PrincipalHeadInit`: on a new run, after `restore_cfg`, the token head is set to
      the principal directions of the (restored) encoder's token states on the first training batches.
    model_dir: output directory (checked writable before anything else).
    total_steps: number of optimizer updates of the whole run.
    log_period: steps between TensorBoard / console metrics.
    num_microbatches: gradient accumulation with the XTR top-k over the full global batch (see `trainer`).
    seed: parameter initialisation and dropout.
    export: write `MODEL_DIR/model` at the end.
    stop_after_steps: stop (after checkpointing) once this many steps were run in THIS invocation, as a planned
      preemption would; the run can then be resumed. None = run to `total_steps`.

  Returns:
    the final TrainState.

  Raises:
    PermissionError: MODEL_DIR not writable. ValueError: batch size vs mesh, checkpoint shape mismatch (naming the
    parameters). FloatingPointError: a non-finite loss or gradient (the last good checkpoint is kept).
  """
  distributed.initialize()
  check_model_dir_writable(model_dir)
  if total_steps < 1:
    raise ValueError(f"train.total_steps must be >= 1, got {total_steps}")
  partitioner = partitioning.Partitioner() if partitioner is None else partitioner
  checkpoint_cfg = checkpointing.CheckpointConfig() if checkpoint_cfg is None else checkpoint_cfg
  tx, schedule = _unpack_optimizer(optimizer)
  tr = trainer.Trainer(model=model, partitioner=partitioner, optimizer=tx, schedule=schedule,
                       num_microbatches=num_microbatches)
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), checkpoint_cfg)
  is_chief = distributed.is_coordinator()
  writer = train_metrics.MetricsWriter(os.path.join(model_dir, "train"), active=is_chief)
  eval_writer = train_metrics.MetricsWriter(os.path.join(model_dir, "eval"), active=is_chief and bool(eval_period))
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))

  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, tr.abstract_state)
    if data_state is not None:
      train_data.set_state(data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
    if is_chief:
      print(f"[train] resumed from {ckpt.directory}/{latest}", flush=True)
  else:
    state = tr.init_state(init_rng)
    if restore_cfg is not None:
      source = checkpointing.load_source_tree(
          restore_cfg.path, vocab_path=restore_cfg.vocab_path,
          scan_layers=model.encoder_config.scan_layers)
      state, loaded, skipped = checkpointing.apply_restore_rules(state, source, restore_cfg)
      if is_chief:
        fresh = [n for n in skipped if n.startswith("params/")]  # the rest: optimizer state and the step counter
        shown = ", ".join(fresh[:6]) + (f" and {len(fresh) - 6} more" if len(fresh) > 6 else "") or "none"
        print(f"[train] started from {restore_cfg.path}: {len(loaded)} arrays loaded; parameters left at their "
              f"initialisation: {shown} (+ {len(skipped) - len(fresh)} optimizer-state / step arrays)", flush=True)
    if head_init is not None:
      params, info = head_init(tr, state.params, train_data)
      state = state.replace(params=params)
      if is_chief:
        print(f"[train] token head set to the principal directions of {int(info['tokens']):,} token states "
              f"({100 * info['retained']:.1f}% of their second moment kept)", flush=True)
  if is_chief:
    print(f"[train] {tr.params_count():,} parameters; mesh {dict(partitioner.mesh.shape)}; "
          f"{jax.process_count()} processes, {jax.device_count()} devices", flush=True)

  step = int(jax.device_get(state.step))
  start_step = step
  data_iter = iter(train_data)
  eval_iter = iter(eval_data) if (eval_data is not None and eval_period) else None
  window: list[dict[str, float]] = []
  config_written = False
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      local = next(data_iter)
      batch = tr.global_batch(local)
      state, metrics = tr.train_step(state, batch, dropout_rng)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
      step_time = time.perf_counter() - t0
      if metrics["finite"] < 1:
        ckpt.wait()
        raise FloatingPointError(
            f"non-finite loss or gradient at step {step + 1} (loss={metrics['loss']}, "
            f"grad_norm={metrics['grad_norm']}); training stopped without applying it. Last good checkpoint: "
            f"{ckpt.latest_step()} in {ckpt.directory}")
      step += 1
      metrics["step_time"] = step_time
      metrics["examples"] = float(batch["query_tokens"].shape[0])
      window.append(metrics)
      if not config_written:
        # After the first step every configurable has been called, so the operative config is complete.
        if is_chief:
          text = gin_utils.write_operative_config(model_dir)
          writer.text(step, "config/operative_gin", open(text, encoding="utf-8").read())
        config_written = True
      if step % log_period == 0 or step == total_steps:
        _log(writer, window, step, total_steps)
        window = []
      if eval_iter is not None and step % eval_period == 0:
        ev = run_eval(tr, state, eval_iter, eval_steps)
        eval_writer.scalars(step, ev)
        eval_writer.progress(step, total_steps, {"eval_" + k: v for k, v in ev.items() if k in ("loss", "accuracy")})
      last = step == total_steps or (stop_after_steps is not None and step - start_step >= stop_after_steps)
      ckpt.save(step, state, train_data.get_state(), force=last)
      if last:
        break
    ckpt.wait()
    if export and step == total_steps:
      out = export_model(model, state.params, os.path.join(model_dir, "model"))
      if is_chief:
        print(f"[train] wrote {out}", flush=True)
  finally:
    ckpt.close()
    writer.close()
    eval_writer.close()
  return state


def _log(writer: train_metrics.MetricsWriter, window: list[dict[str, float]], step: int, total: int) -> None:
  mean = _mean_window(window)
  seconds = sum(w["step_time"] for w in window)
  examples = sum(w["examples"] for w in window)
  tokens = sum(w["tokens"] for w in window)
  scalars = {k: v for k, v in mean.items() if k not in ("finite", "examples", "tokens")}
  scalars["examples_per_second"] = examples / seconds
  scalars["tokens_per_second"] = tokens / seconds
  writer.scalars(step, scalars)
  shown = {k: scalars[k] for k in ("loss", "accuracy", "mean_z", "grad_norm", "learning_rate", "step_time",
                                   "examples_per_second", "tokens_per_second") if k in scalars}
  writer.progress(step, total, shown)
  writer.flush()


def main(argv: Sequence[str] | None = None) -> None:
  # distributed.initialize() must run before gin builds anything that touches devices (the mesh).
  distributed.initialize()
  gin_utils.run(train, argv)


if __name__ == "__main__":
  main()
