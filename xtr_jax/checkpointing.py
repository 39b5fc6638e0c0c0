"""Orbax checkpoints of training: periodic async saves with the data-iterator state, automatic resume, re-sharding
restores, and starting from a pretrained encoder with regex skip rules.

Layout of `MODEL_DIR/checkpoints/<step>/`: `state/` (the TrainState pytree, one orbax array per leaf, written by all
processes in parallel) and `data/` (JSON: every process's input-pipeline state, keyed `process_<i>`).

Restores always go through abstract targets (`jax.ShapeDtypeStruct` with the *current* mesh's `NamedSharding`), so a
checkpoint written on one mesh (say data 8 x model 1) loads on another (data 4 x model 2): orbax reads each device's
slice straight from storage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from xtr_jax import network

STATE_ITEM = "state"
DATA_ITEM = "data"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """How training checkpoints are written.

  Attributes:
    period: save every `period` steps (and always at the last step and on preemption).
    keep: how many most recent checkpoints to keep (None = all).
    async_save: write in a background thread while training continues (orbax async checkpointing).
    restore_data_state: on resume, put the input pipeline back where it was (exact resume). Set False only to resume
      with a different process count, whose data shards differ (the pipeline then restarts from its seed).
  """
  period: int = 1000
  keep: int | None = 3
  async_save: bool = True
  restore_data_state: bool = True


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  """Start a NEW run from pretrained weights (not a resume: the step counter starts at 0).

  Attributes:
    path: a model directory `models.load_pretrained` reads (xtr_jax model dir, converted HF XTR / T5 / BERT dir), or
      an orbax checkpoint of an earlier run (`MODEL_DIR/checkpoints/<step>` or `MODEL_DIR/checkpoints` = its latest).
    rules: `(regex, replacement)` pairs tried in order on each target path of the TrainState (`params/...`,
      `opt_state/...`, '/'-separated); the first regex that fully matches decides: `None` = keep the fresh
      initialisation (e.g. optimizer state, a new 128-d head), a string = load from the source path `re.sub(regex,
      replacement, path)`. Paths no rule matches load from the same path in the source.
    strict: a target path that is neither skipped nor found in the source is an error (else it keeps its init).
    vocab_path: vocabulary for HF directories that do not ship one (passed to `models.load_pretrained`).
  """
  path: str = gin.REQUIRED
  rules: Sequence[tuple[str, str | None]] = ((r"opt_state/.*", None),)
  strict: bool = True
  vocab_path: str | None = None


def path_str(key_path: Sequence[Any]) -> str:
  """'/'-joined name of a pytree key path: ('params', 'encoder', 'kernel') -> 'params/encoder/kernel'."""
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten_with_names(tree: Any) -> dict[str, Any]:
  """{'/'-joined path: leaf} of a pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): v for p, v in leaves}


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (same structure) for restoring into `tree`'s shapes."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def check_shapes(expected: Any, stored: Mapping[str, Any], *, source: str) -> None:
  """ValueError naming every parameter whose stored shape differs from the model's, or that is missing.

  Args:
    expected: pytree of arrays / ShapeDtypeStructs the model needs.
    stored: {path: object with `.shape`} read from the checkpoint.
    source: checkpoint path, for the message.
  """
  problems = []
  for name, leaf in flatten_with_names(expected).items():
    if name not in stored:
      problems.append(f"  {name}: missing in checkpoint (model needs {tuple(leaf.shape)})")
    elif tuple(stored[name].shape) != tuple(leaf.shape):
      problems.append(f"  {name}: checkpoint has {tuple(stored[name].shape)}, model needs {tuple(leaf.shape)}")
  if problems:
    raise ValueError(f"checkpoint {source} does not match the model ({len(problems)} parameters):\n" +
                     "\n".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))


def _gather_process_json(obj: Any) -> dict[str, Any]:
  """Every process's JSON-serialisable `obj`, as {'process_<i>': obj_i} (identical on all processes)."""
  text = json.dumps(obj, sort_keys=True)
  if jax.process_count() == 1:
    return {"process_0": json.loads(text)}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
  lengths = np.asarray(lengths).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return {f"process_{i}": json.loads(bytes(everything[i, :lengths[i]]).decode("utf-8"))
          for i in range(len(lengths))}


def _any_on_cpu(tree: Any) -> bool:
  return any(isinstance(x, jax.Array) and any(d.platform == "cpu" for d in x.sharding.device_set)
             for x in jax.tree.leaves(tree))


class Checkpointer:
  """Orbax `CheckpointManager` for TrainState + data-iterator state under `directory`."""

  def __init__(self, directory: str, config: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    self.config = config
    if config.period < 1:
      raise ValueError(f"CheckpointConfig.period must be >= 1, got {config.period}")
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.period, max_to_keep=config.keep,
        enable_async_checkpointing=config.async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    # Every `period` steps counted from 0 (orbax's own policy would also save the first step it sees).
    return step % self.config.period == 0 or self.manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_state: Any, *, force: bool = False) -> bool:
    """Saves (asynchronously if configured) when `step` is due, on preemption, or when `force`; returns whether it did.

    All processes must call this (orbax writes each process's array shards and synchronises the commit).
    """
    if not force and not self.should_save(step):
      return False
    gathered = _gather_process_json(data_state)
    if self.config.async_save and _any_on_cpu(state):
      # On CPU orbax's "device-to-host copy" is a zero-copy numpy view of the device buffer; the next train step
      # donates (overwrites) that buffer while the background write may still be reading it, so the checkpoint could
      # hold a later step's values. A private copy, never donated, keeps the saved step exact.
      state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    return self.manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: ocp.args.JsonSave(gathered)}), force=True)

  def stored_shapes(self, step: int) -> dict[str, Any]:
    meta = self.manager.item_metadata(step)[STATE_ITEM]
    tree = getattr(meta, "tree", meta)
    return flatten_with_names(tree)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
    """(state laid out as `abstract_state`'s shardings, this process's data state or None).

    Raises:
      ValueError: naming the parameters whose shapes differ from the checkpoint's, or a process-count change when
        `restore_data_state` is on.
    """
    source = os.path.join(self.directory, str(step))
    check_shapes(abstract_state, self.stored_shapes(step), source=source)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        DATA_ITEM: ocp.args.JsonRestore()}))
    data = restored[DATA_ITEM]
    data_state = None
    if self.config.restore_data_state and data is not None:
      if len(data) != jax.process_count():
        raise ValueError(
            f"checkpoint {source} holds the input state of {len(data)} processes but this job has "
            f"{jax.process_count()}; the data shards differ, so set CheckpointConfig.restore_data_state = False to "
            "resume with a fresh input pipeline")
      data_state = data[f"process_{jax.process_index()}"]
    return restored[STATE_ITEM], data_state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _read_orbax_state(path: str) -> dict[str, np.ndarray] | None:
  """{name: numpy array} of the TrainState in an orbax checkpoint dir (a step dir or a manager dir), else None."""
  step_dir = path
  if not os.path.isdir(os.path.join(step_dir, STATE_ITEM)):
    steps = [int(d) for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d, STATE_ITEM))] \
        if os.path.isdir(path) else []
    if not steps:
      return None
    step_dir = os.path.join(path, str(max(steps)))
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.join(step_dir, STATE_ITEM))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    # Restore every array as a host numpy array: the source mesh need not exist here.
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
    restored = ckptr.restore(os.path.join(step_dir, STATE_ITEM), target)
  return {k: np.asarray(v) for k, v in flatten_with_names(restored).items()}


def load_source_tree(path: str, *, vocab_path: str | None = None,
                     scan_layers: bool | None = None) -> dict[str, np.ndarray]:
  """{'/'-path: numpy array} of pretrained weights for `RestoreConfig.path`: `params/...` (and `opt_state/...` for
  orbax checkpoints of earlier runs). `scan_layers` (the target model's setting; None = as stored) converts the
  encoder layers to that layout (`network.relayout_layers`), so a run with `scan_layers=True` starts from per-layer
  weights."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"RestoreConfig.path {path!r} does not exist")
  flat = _read_orbax_state(path)
  if flat is not None:
    flat = {k: v for k, v in flat.items() if k != "step"}
    return flat if scan_layers is None else network.relayout_layers(flat, scan_layers)
  from xtr_jax import models  # pylint: disable=g-import-not-at-top  (heavy; only for pretrained starts)
  pretrained = models.load_pretrained(path, vocab_path=vocab_path)
  params = pretrained.params
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    params = params["params"]
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.meta.unbox(params)
  flat = {"params/" + k: np.asarray(v) for k, v in flatten_with_names(params).items()}
  return flat if scan_layers is None else network.relayout_layers(flat, scan_layers)


def apply_restore_rules(target: Any, source: Mapping[str, np.ndarray], config: RestoreConfig
                        ) -> tuple[Any, list[str], list[str]]:
  """Fills `target` (pytree of arrays, the fresh init) from `source` under `config.rules`.

  Returns:
    (new tree with the same structure, loaded target paths, skipped target paths).
  Raises:
    ValueError: naming every parameter whose source shape differs, or (strict) that the source lacks.
  """
  compiled = [(re.compile(p), r) for p, r in config.rules]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  out, loaded, skipped, problems = [], [], [], []
  for kp, leaf in leaves:
    name = path_str(kp)
    src_name = name
    skip = False
    for pattern, repl in compiled:
      if pattern.fullmatch(name):
        if repl is None:
          skip = True
        else:
          src_name = pattern.sub(repl, name)
        break
    if name == "step" or skip:
      skipped.append(name)
      out.append(leaf)
      continue
    if src_name not in source:
      if config.strict:
        problems.append(f"  {name}: not in the source (looked for {src_name!r})")
      else:
        skipped.append(name)
      out.append(leaf)
      continue
    value = source[src_name]
    if tuple(value.shape) != tuple(leaf.shape):
      problems.append(f"  {name}: source {src_name} has {tuple(value.shape)}, model needs {tuple(leaf.shape)}")
      out.append(leaf)
      continue
    sharding = getattr(leaf, "sharding", None)
    value = np.asarray(value, dtype=leaf.dtype)
    out.append(jax.make_array_from_callback(leaf.shape, sharding, lambda idx, v=value: v[idx])
               if sharding is not None else value)
    loaded.append(name)
  if problems:
    raise ValueError(f"cannot start from {config.path}: {len(problems)} parameters do not match "
                     "(add a RestoreConfig.rules entry mapping them to None to keep their initialisation):\n" +
                     "\n".join(problems[:50]) + ("\n  ..." if len(problems) > 50 else ""))
  logging.info("restored %d arrays from %s; kept the initialisation of %d", len(loaded), config.path, len(skipped))
  return jax.tree_util.tree_unflatten(treedef, out), loaded, skipped
