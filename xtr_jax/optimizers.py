"""Optimizer and learning-rate schedule for training, built from optax: AdamW or Adafactor, warmup then decay,
global-norm gradient clipping, optional per-parameter learning-rate multipliers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import gin
import jax
import optax

from xtr_jax import checkpointing

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adamw", "adafactor")


@gin.configurable
def xtr_lr_schedule(*, learning_rate: float = 1e-3, warmup_steps: int = 0, decay: str = "linear",
                    decay_steps: int | None = None, end_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay` until `decay_steps` (total steps).

  decay: 'constant'; 'linear' / 'cosine' to `end_ratio * learning_rate` at `decay_steps`; 'rsqrt' =
  learning_rate * sqrt(warmup / step) after warmup (T5's inverse square root).
  """
  if decay not in SCHEDULES:
    raise ValueError(f"xtr_lr_schedule.decay must be one of {SCHEDULES}, got {decay!r}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  if decay in ("linear", "cosine") and (decay_steps is None or decay_steps <= warmup_steps):
    raise ValueError(f"decay={decay!r} needs decay_steps > warmup_steps ({warmup_steps}), got {decay_steps}")
  end = learning_rate * end_ratio
  if decay == "constant":
    after = optax.constant_schedule(learning_rate)
  elif decay == "linear":
    after = optax.linear_schedule(learning_rate, end, decay_steps - warmup_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps - warmup_steps, alpha=end_ratio)
  else:
    w = max(warmup_steps, 1)
    after = lambda count: learning_rate * (w / (count + w)) ** 0.5
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


@gin.configurable
def xtr_optimizer(*, name: str = "adamw", schedule: optax.Schedule | None = None, weight_decay: float = 0.0,
                  clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  lr_multipliers: Sequence[tuple[str, float]] = (),
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, its learning-rate schedule).

  Gradients are clipped to global norm `clip_norm` (None = no clipping) before the optimizer. AdamW's decoupled
  weight decay skips 1-d parameters (biases, layer-norm scales). Adafactor uses factored second moments (t5x's
  default for T5) with the same schedule. `lr_multipliers`: (regex, factor) pairs over parameter names as
  checkpoints spell them without the leading "params/" (e.g. ("token_proj/.*", 30.0): a fresh head learning 30x
  faster than the pretrained encoder); the first full match wins, unmatched parameters keep factor 1. The reported
  schedule is the base one.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"xtr_optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
  schedule = xtr_lr_schedule() if schedule is None else schedule
  if name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
  else:
    core = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  parts.append(core)
  if lr_multipliers:
    parts.append(scale_by_name(lr_multipliers))
  return optax.chain(*parts), schedule


def scale_by_name(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the factor of the first (regex, factor) rule whose regex fully matches the
  parameter's '/'-joined name (unmatched: 1). Stateless; applied after the optimizer, so it scales that parameter's
  effective learning rate (and AdamW's decoupled weight decay with it).

  Raises:
    ValueError: a rule that is not a (str, positive number) pair or an invalid regex; at `init`, a rule that matches
      no parameter.
  """
  compiled = []
  for rule in rules:
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not isinstance(rule[1], (int, float)) or not rule[1] > 0):
      raise ValueError(f"lr_multipliers rules must be (regex, factor > 0) pairs, got {rule!r}")
    try:
      compiled.append((re.compile(rule[0]), float(rule[1])))
    except re.error as e:
      raise ValueError(f"lr_multipliers: invalid regex {rule[0]!r}: {e}") from e

  def factor(path) -> float:
    name = checkpointing.path_str(path)
    for pattern, value in compiled:
      if pattern.fullmatch(name):
        return value
    return 1.0

  def init_fn(params):
    # A misspelt rule would otherwise silently train everything at the base rate.
    names = [checkpointing.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    unused = [pattern.pattern for pattern, _ in compiled if not any(pattern.fullmatch(n) for n in names)]
    if unused:
      shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
      raise ValueError(f"lr_multipliers rules {unused} match no parameter; parameter names: {shown}")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)
