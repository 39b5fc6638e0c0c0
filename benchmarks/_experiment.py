"""Builds a training experiment's pieces from its gin file, for the benchmarks that probe an experiment without
running `python -m xtr_jax.train` (experiment_step_time.py, head_init_probe.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def load_experiment(gin_file: str, gin_args: Sequence[str]) -> dict[str, Any]:
  """Parses `gin_file` plus `--gin.X=V` / `--gin_bindings=...` args (MODEL_DIR is bound to an unused path) and
  returns {"model": XTRModel, "data": TrainInput, "trainer": trainer.Trainer (default partitioner, the experiment's
  optimizer)}."""
  import gin  # pylint: disable=g-import-not-at-top

  from xtr_jax import gin_utils, optimizers, partitioning, trainer  # pylint: disable=g-import-not-at-top
  from xtr_jax import train as _train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import  (configurables)
  from xtr_jax.data import contamination  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import

  bindings = [b.split("=", 1)[1] for b in gin_utils.rewrite_gin_args(list(gin_args))
              if b.startswith("--gin_bindings=")]
  gin_utils.parse_gin([gin_file], ["MODEL_DIR = '/tmp/unused_benchmark_model_dir'"] + bindings)
  model = gin.get_configurable("XTRModel")()
  data = gin.get_configurable("TrainInput")()
  tx, schedule = optimizers.xtr_optimizer()
  tr = trainer.Trainer(model=model, partitioner=partitioning.Partitioner(), optimizer=tx, schedule=schedule)
  return {"model": model, "data": data, "trainer": tr}
