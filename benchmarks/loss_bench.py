"""Benchmark of the XTR loss: simple vs chunked vs sharded path, per-device memory as devices grow, and the cost
relative to an xtr_base encoder forward+backward at the same batch.

    python benchmarks/loss_bench.py                      # paper-like shapes, 8 simulated CPU devices
    python benchmarks/loss_bench.py --reps 1 --k 32      # quicker
    python benchmarks/loss_bench.py --memory_only --B 320 --Bd 640 --m 256 --k 320 --devices 1,8   # paper's batch

What is measured (all printed as tables):
  1. forward+backward wall time (median of --reps after one warm-up) of `jax.value_and_grad(xtr_loss)` w.r.t. the
     query and document embeddings on a data=8 mesh, each implementation, for each k_train; with the compiled
     per-device memory (`Compiled.memory_analysis()`: temp + argument + output bytes) and per-device FLOPs
     (`Compiled.cost_analysis()`).
  2. per-device compiled memory (memory_analysis, compile only) as the data axis goes 1 -> 2 -> 4 -> 8, next to the
     analytic size of one device's block of the f32 score matrix (B*n*Bd*m*4/D bytes).
  3. the loss against the xtr_base encoder (T5 v1.1 base: 12 layers, d_model 768, 12 heads x 64, gated-gelu d_ff
     2048) forward+backward over the same B queries x n tokens and Bd documents x m tokens: analytic FLOPs, XLA
     cost_analysis FLOPs, and wall time of the encoder measured at a small batch on one device and scaled linearly
     by the number of sequences (the loss is timed on 8 simulated devices that share the same CPU cores, so both
     wall times are total CPU work).
Numbers from a shared machine are noisy; ratios measured in the same run are the meaningful part.
"""

from __future__ import annotations

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from xtr_jax import losses, partitioning  # noqa: E402

MiB = 2**20


def _cost(compiled: Any) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _memory(compiled: Any) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {"temp": stats.temp_size_in_bytes, "args": stats.argument_size_in_bytes,
          "out": stats.output_size_in_bytes,
          "total": stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes}


def _loss_step(k_train: int, implementation: str, mesh):
  def loss_fn(q, q_mask, p, d_mask, labels):
    return losses.xtr_loss(q, q_mask, p, d_mask, labels, k_train=k_train, implementation=implementation,
                           mesh=mesh)[0]
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2)))


def _abstract_args(shape: dict[str, int], mesh) -> list[jax.ShapeDtypeStruct]:
  b, n, bd, m, d = (shape[x] for x in ("B", "n", "Bd", "m", "d"))
  sh = lambda ndim: NamedSharding(mesh, partitioning.batch_spec(ndim))
  return [jax.ShapeDtypeStruct((b, n, d), jnp.float32, sharding=sh(3)),
          jax.ShapeDtypeStruct((b, n), jnp.bool_, sharding=sh(2)),
          jax.ShapeDtypeStruct((bd, m, d), jnp.float32, sharding=sh(3)),
          jax.ShapeDtypeStruct((bd, m), jnp.bool_, sharding=sh(2)),
          jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh(1))]


def _concrete_args(shape: dict[str, int], mesh, seed: int = 0) -> list[jax.Array]:
  b, n, bd, m, d = (shape[x] for x in ("B", "n", "Bd", "m", "d"))
  rng = np.random.default_rng(seed)

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  # Realistic padding: queries 8..n tokens, documents 32..m tokens (fewer for tiny shapes); padding rows zero.
  q_len = rng.integers(min(8, n), n + 1, size=b)
  d_len = rng.integers(min(32, m), m + 1, size=bd)
  q_mask = np.arange(n)[None] < q_len[:, None]
  d_mask = np.arange(m)[None] < d_len[:, None]
  q = unit(rng.normal(size=(b, n, d)).astype(np.float32)) * q_mask[..., None]
  p = unit(rng.normal(size=(bd, m, d)).astype(np.float32)) * d_mask[..., None]
  labels = (np.arange(b) * (bd // b)).astype(np.int32)  # positive first, then its hard negatives
  out = []
  for x in (q, q_mask, p, d_mask, labels):
    out.append(jax.device_put(x, NamedSharding(mesh, partitioning.batch_spec(x.ndim))))
  return out


def _time(fn, args, reps: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_paths(shape, ks, reps):
  mesh = partitioning.make_mesh(data=8)
  args = _concrete_args(shape, mesh)
  rows = []
  print(f"\n## 1. forward+backward on {dict(mesh.shape)} (8 simulated CPU devices), median of {reps}")
  print(f"{'k_train':>8} {'path':>8} {'time s':>8} {'loss':>10} {'mem/dev MiB':>12} {'temp MiB':>9} "
        f"{'GFLOP/dev':>10} {'|dloss| diff':>12}")
  for k in ks:
    results = {}
    for implementation in losses.IMPLEMENTATIONS:
      step = _loss_step(k, implementation, mesh)
      compiled = step.lower(*args).compile()
      mem, cost = _memory(compiled), _cost(compiled)
      seconds = _time(step, args, reps)
      loss, grads = step(*args)
      results[implementation] = (loss, grads)
      rows.append(dict(k=k, path=implementation, seconds=seconds, mem=mem, flops=cost.get("flops", float("nan"))))
      diff = ""
      if implementation != "simple":  # max |difference| of loss and gradients from the reference path
        ref_loss, ref_grads = results["simple"]
        worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(grads, ref_grads))
        diff = f"{max(worst, abs(float(loss) - float(ref_loss))):.1e}"
      print(f"{k:>8} {implementation:>8} {seconds:>8.2f} {float(loss):>10.5f} {mem.get('total', 0) / MiB:>12.1f} "
            f"{mem.get('temp', 0) / MiB:>9.1f} {rows[-1]['flops'] / 1e9:>10.2f} {diff:>12}", flush=True)
  return rows


def bench_scaling(shape, k, device_counts):
  b, n, bd, m = shape["B"], shape["n"], shape["Bd"], shape["m"]
  print(f"\n## 2. per-device compiled memory (memory_analysis temp+args+out) vs data-parallel devices, k_train={k}")
  print(f"{'devices':>8} {'score block MiB':>15} {'simple MiB':>11} {'chunked MiB':>12} {'sharded MiB':>12} "
        f"{'sharded temp':>12} {'simple GFLOP/dev':>16} {'sharded GFLOP/dev':>17}")
  rows = []
  for count in device_counts:
    mesh = partitioning.make_mesh(data=count, devices=jax.devices()[:count])
    args = _abstract_args(shape, mesh)
    row = {"devices": count, "score_block": b * n * bd * m * 4 / count}
    for implementation in losses.IMPLEMENTATIONS:
      compiled = _loss_step(k, implementation, mesh).lower(*args).compile()
      row[implementation] = _memory(compiled)
      row[implementation + "_flops"] = _cost(compiled).get("flops", float("nan"))
    rows.append(row)
    print(f"{count:>8} {row['score_block'] / MiB:>15.1f} {row['simple']['total'] / MiB:>11.1f} "
          f"{row['chunked']['total'] / MiB:>12.1f} {row['sharded']['total'] / MiB:>12.1f} "
          f"{row['sharded']['temp'] / MiB:>12.1f} "
          f"{row['simple_flops'] / 1e9:>16.2f} {row['sharded_flops'] / 1e9:>17.2f}", flush=True)
  base = rows[0]
  print("memory relative to 1 device (ideal 1/D): " + ", ".join(
      f"D={r['devices']}: simple {r['simple']['total'] / base['simple']['total']:.3f}, "
      f"chunked {r['chunked']['total'] / base['chunked']['total']:.3f}, "
      f"sharded {r['sharded']['total'] / base['sharded']['total']:.3f}" for r in rows))
  return rows


def _comm_bytes(shape, k, d_count):
  """Analytic bytes each device sends per step (forward + backward) on a data axis of d_count devices."""
  b, n, bd, m, d = (shape[x] for x in ("B", "n", "Bd", "m", "d"))
  frac = (d_count - 1) / d_count
  sharded = frac * b * n * d * 4 * 2 + frac * b * n * min(k, bd * m // d_count) * 8 + b * n * 8 * frac
  simple = frac * bd * m * d * 4 * 2  # all-gather documents; reduce-scatter their gradient
  return simple, sharded


def encoder_flops(seq_len: int, *, d_model=768, heads=12, d_kv=64, d_ff=2048, layers=12, gated=True, token_dim=128):
  """Analytic forward FLOPs of one T5 encoder sequence (matmuls only; 2 FLOPs per multiply-add)."""
  inner = heads * d_kv
  per_layer = 2 * seq_len * (4 * d_model * inner) + 2 * seq_len * ((3 if gated else 2) * d_model * d_ff)
  per_layer += 2 * 2 * seq_len * seq_len * inner  # QK^T and attention-weighted values
  return layers * per_layer + 2 * seq_len * d_model * token_dim


def bench_encoder(shape, loss_rows, measure: bool, q_batch: int, d_batch: int):
  b, n, bd, m, d = (shape[x] for x in ("B", "n", "Bd", "m", "d"))
  loss_flops_analytic = 3 * 2 * b * n * bd * m * d  # forward einsum + two backward einsums
  enc_fwd = b * encoder_flops(n) + bd * encoder_flops(m)
  enc_flops_analytic = 3 * enc_fwd  # backward ~ 2x forward
  print("\n## 3. loss vs xtr_base encoder forward+backward at the same batch "
        f"({b} queries x {n} tokens + {bd} documents x {m} tokens)")
  print(f"analytic: loss {loss_flops_analytic / 1e9:.1f} GFLOP, encoder {enc_flops_analytic / 1e12:.2f} TFLOP "
        f"-> loss/encoder = {loss_flops_analytic / enc_flops_analytic:.2%}")
  if not measure:
    return
  from xtr_jax import network  # pylint: disable=g-import-not-at-top
  module = network.XTREncoder(network.T5EncoderConfig(dropout_rate=0.0), token_dim=128)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), bool))

  def fwd_bwd(params, ids, mask):
    return jax.value_and_grad(lambda prm: jnp.sum(module.apply(prm, ids, mask)))(params)

  step = jax.jit(fwd_bwd)
  measured = {}
  for name, count, length, full in (("queries", q_batch, n, b), ("documents", d_batch, m, bd)):
    ids = jnp.ones((count, length), jnp.int32)
    mask = jnp.ones((count, length), bool)
    compiled = step.lower(params, ids, mask).compile()
    flops = _cost(compiled).get("flops", float("nan"))
    seconds = _time(step, (params, ids, mask), 2)
    measured[name] = (seconds * full / count, flops * full / count)
    print(f"encoder {name}: batch {count} x {length}: {seconds:.2f} s, {flops / 1e9:.1f} GFLOP (cost_analysis) "
          f"-> scaled to {full}: {seconds * full / count:.1f} s, {flops * full / count / 1e12:.2f} TFLOP")
  enc_seconds = sum(v[0] for v in measured.values())
  enc_flops = sum(v[1] for v in measured.values())
  print(f"encoder fwd+bwd at the full batch (scaled): {enc_seconds:.1f} s, {enc_flops / 1e12:.2f} TFLOP")
  print(f"{'k_train':>8} {'path':>8} {'loss s':>8} {'loss/encoder time':>18} {'loss/encoder FLOPs':>19}")
  for row in loss_rows:
    total_flops = row["flops"] * 8  # cost_analysis of an SPMD program is per device
    print(f"{row['k']:>8} {row['path']:>8} {row['seconds']:>8.2f} {row['seconds'] / enc_seconds:>18.2%} "
          f"{total_flops / enc_flops:>19.2%}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--B", type=int, default=128)
  parser.add_argument("--n", type=int, default=32)
  parser.add_argument("--Bd", type=int, default=256)
  parser.add_argument("--m", type=int, default=180)
  parser.add_argument("--d", type=int, default=128)
  parser.add_argument("--k", type=str, default="32,128,320")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--devices", type=str, default="1,2,4,8")
  parser.add_argument("--skip_encoder_measure", action="store_true", help="analytic encoder FLOPs only")
  parser.add_argument("--memory_only", action="store_true",
                      help="only table 2 (compile, no run): for shapes too large to run here, e.g. the paper's batch")
  parser.add_argument("--encoder_query_batch", type=int, default=8)
  parser.add_argument("--encoder_doc_batch", type=int, default=2)
  args = parser.parse_args()
  shape = {"B": args.B, "n": args.n, "Bd": args.Bd, "m": args.m, "d": args.d}
  ks = [int(k) for k in args.k.split(",")]
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices; shapes {shape}; "
        f"k_train {ks}")
  if args.memory_only:
    bench_scaling(shape, max(ks), [int(x) for x in args.devices.split(",")])
    return
  rows = bench_paths(shape, ks, args.reps)
  bench_scaling(shape, max(ks), [int(x) for x in args.devices.split(",")])
  print("\nanalytic bytes sent per device per step (fwd+bwd), data=8: " + ", ".join(
      "k={}: simple {:.1f} MiB, sharded {:.1f} MiB".format(k, *(x / MiB for x in _comm_bytes(shape, k, 8)))
      for k in ks))
  bench_encoder(shape, rows, not args.skip_encoder_measure, args.encoder_query_batch, args.encoder_doc_batch)


if __name__ == "__main__":
  main()
