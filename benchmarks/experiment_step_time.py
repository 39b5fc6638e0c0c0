"""Step time of a training experiment on this machine, and what it implies for the whole run.

    python benchmarks/experiment_step_time.py [--gin_file experiments/xtr_minilm_cpu.gin] [--steps 3] \
        [--gin.NAME=VALUE ...]

Builds the experiment's model, input pipeline (real batches of its training mixture) and optimizer from gin, runs the
real `Trainer.train_step` once to compile, then `--steps` more steps one by one (blocking on the result). CPU time is
`time.process_time()` (all threads of the process), so it stays meaningful on a machine shared with other jobs, where
wall time does not. The estimate for TRAIN_STEPS steps is given for an idle machine with all its cores busy (CPU time /
cores) and with one core (CPU time): the bounds of the wall time of `python -m xtr_jax.train` without setup.

`--memory_only` compiles the step for the experiment's batch shape (BATCH_SIZE, NUM_NEGATIVES, QUERY_MAX_LEN,
DOC_MAX_LEN) without data or parameters and prints XLA's memory analysis: the temporaries are what a step adds to the
resident parameters and optimizer state, e.g. `--gin.BertEncoderConfig.scan_layers=True
--gin.BertEncoderConfig.remat=True` vs the plain layer loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _experiment  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", default="experiments/xtr_minilm_cpu.gin")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--memory_only", action="store_true", help="compile one step and print its memory analysis")
  args, rest = ap.parse_known_args()

  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  exp = _experiment.load_experiment(args.gin_file, rest)
  if args.memory_only:
    compiled_memory(exp["trainer"], args.gin_file, rest)
    return
  total_steps = int(gin.query_parameter("%TRAIN_STEPS"))
  data, tr = exp["data"], exp["trainer"]
  state = tr.init_state(jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(1)
  batches = [tr.global_batch(b) for b, _ in zip(data, range(args.steps + 1))]

  rows = []
  for i, batch in enumerate(batches):
    w0, c0 = time.perf_counter(), time.process_time()
    state, metrics = tr.train_step(state, batch, rng)
    jax.block_until_ready(metrics)
    rows.append((time.perf_counter() - w0, time.process_time() - c0))
    print(f"step {i + 1}{' (compiles)' if i == 0 else ''}: wall {rows[-1][0]:.1f} s, cpu {rows[-1][1]:.1f} s",
          file=sys.stderr, flush=True)
  cores = os.cpu_count() or 1
  wall = statistics.median(r[0] for r in rows[1:])
  cpu = statistics.median(r[1] for r in rows[1:])
  shape = {k: tuple(v.shape) for k, v in batches[0].items()}
  print(f"\n{args.gin_file}: batch {shape}; {jax.device_count()} {jax.default_backend()} devices, {cores} cores "
        f"(machine possibly shared: compare CPU, not wall)")
  print(f"{'':<28}{'wall s':>10}{'cpu s':>10}")
  print(f"{'first step (compile)':<28}{rows[0][0]:>10.1f}{rows[0][1]:>10.1f}")
  print(f"{f'median of {len(rows) - 1} steps':<28}{wall:>10.1f}{cpu:>10.1f}")
  print(f"estimate for {total_steps} steps on an idle machine: {total_steps * cpu / cores / 60:.0f} min "
        f"({cores} cores busy) to {total_steps * cpu / 60:.0f} min (one core), plus setup")


def compiled_memory(tr, gin_file: str, gin_args: list[str]) -> None:
  """Prints the compiled train step's memory analysis for the experiment's batch shape (nothing is allocated)."""
  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  b, g = int(gin.query_parameter("%BATCH_SIZE")), 1 + int(gin.query_parameter("%NUM_NEGATIVES"))
  lq, ld = int(gin.query_parameter("%QUERY_MAX_LEN")), int(gin.query_parameter("%DOC_MAX_LEN"))
  batch = {"query_tokens": jax.ShapeDtypeStruct((b, lq), jnp.int32),
           "query_mask": jax.ShapeDtypeStruct((b, lq), jnp.bool_),
           "doc_tokens": jax.ShapeDtypeStruct((b, g, ld), jnp.int32),
           "doc_mask": jax.ShapeDtypeStruct((b, g, ld), jnp.bool_)}
  t0 = time.perf_counter()
  mem = tr.compile_train_step(batch).memory_analysis()
  gib = lambda x: f"{x / 2**30:.2f} GiB"
  print(f"{gin_file} {' '.join(gin_args)}\n  batch {b} x (1 query of {lq} + {g} documents of {ld} tokens); "
        f"compiled in {time.perf_counter() - t0:.0f} s\n  temporaries {gib(mem.temp_size_in_bytes)}, arguments "
        f"{gib(mem.argument_size_in_bytes)} (state donated: {gib(mem.alias_size_in_bytes)} aliased), outputs "
        f"{gib(mem.output_size_in_bytes)}")


if __name__ == "__main__":
  main()
