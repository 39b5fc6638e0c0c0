"""Optimizer and learning-rate schedule for training, built from optax: AdamW or Adafactor, warmup then decay,
global-norm gradient clipping.
"""

from __future__ import annotations

import gin
import jax
import optax

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
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, its learning-rate schedule).

  Gradients are clipped to global norm `clip_norm` (None = no clipping) before the optimizer. AdamW's decoupled
  weight decay skips 1-d parameters (biases, layer-norm scales). Adafactor uses factored second moments (t5x's
  default for T5) with the same schedule.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"xtr_optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
  schedule = xtr_lr_schedule() if schedule is None else schedule
  if name == "adamw":
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask)
  else:
    core = optax.adafactor(schedule, weight_decay_rate=weight_decay or None)
  parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
  return optax.chain(*parts, core), schedule


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)
