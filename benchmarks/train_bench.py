"""Training throughput: steps/s, examples/s, tokens/s (and achieved FLOP/s, MFU on a known accelerator).

    python benchmarks/train_bench.py                       # tiny and small on CPU, 8 simulated devices and 1
    python benchmarks/train_bench.py --configs base --dtype bfloat16 --devices 0 --batch 128 --doc_len 256
                                                           # on a GPU/TPU: all real devices (0 = leave as is)
    python benchmarks/train_bench.py --configs base --dtype bfloat16 --devices 0 --batch 320 --doc_len 256
                                                           # the paper's batch on one accelerator

Each (config, device count) runs in its own subprocess (the simulated CPU device count is fixed at start-up), with
the real `Trainer.train_step` (sharded jit, donated state, AdamW, XTR loss over the global batch) on random tokens of
fixed shapes, full masks. After 2 warm-up steps (compilation), `--steps` steps are timed one by one (blocking on the
result); the table shows medians. MFU is model FLOPs per second over the devices' peak (H100/H200/A100 bf16 dense,
TPU v4/v5e/v5p bf16), model FLOPs being 3x the forward matmul FLOPs of the encoder + head over every query and
document token (`network.matmul_flops_per_token`) plus the in-batch similarities of the loss. XLA's own count of
the compiled step (cost analysis, one device's share times the device count) is shown beside it: on GPU it leaves
out the library GEMM calls, so it is far below the model FLOPs there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {
    # name: T5 encoder config fields (vocab 32128 = the T5 vocabulary)
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": dict(d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8),
    "base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),
}

PEAK_FLOPS = {  # dense bf16, per device
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12,
}


def child(args: argparse.Namespace) -> dict:
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from xtr_jax import losses, models, network, partitioning, trainer  # pylint: disable=g-import-not-at-top

  enc = network.T5EncoderConfig(**CONFIGS[args.config], dropout_rate=0.1, dtype=args.dtype)
  b, g, lq, ld = args.batch, 2, args.query_len, args.doc_len
  model = models.XTRModel(encoder_config=enc, query_max_len=lq, doc_max_len=ld,
                          loss=lambda *a: losses.xtr_loss(*a, k_train=b, implementation=args.loss_impl))
  part = partitioning.Partitioner(mesh=partitioning.make_mesh(data=-1))
  tr = trainer.Trainer(model=model, partitioner=part, optimizer=optax.adamw(1e-4))
  rng = np.random.default_rng(0)
  local = {"query_tokens": rng.integers(2, 32000, (b, lq)).astype(np.int32), "query_mask": np.ones((b, lq), bool),
           "doc_tokens": rng.integers(2, 32000, (b, g, ld)).astype(np.int32), "doc_mask": np.ones((b, g, ld), bool)}
  batch = tr.global_batch(local)
  state = tr.init_state(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)
  for _ in range(2):
    state, m = tr.train_step(state, batch, key)
  jax.block_until_ready(m)
  flops = None
  try:
    with jax.set_mesh(part.mesh):
      cost = tr._train_jit.lower(state, batch, key).compile().cost_analysis()  # pylint: disable=protected-access
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except  (cost analysis is optional per backend)
    flops = None
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = tr.train_step(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  kind = jax.devices()[0].device_kind
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  n_dev = jax.device_count()
  dim = model.token_dim
  model_flops = 3 * (network.matmul_flops_per_token(enc, lq, dim) * b * lq
                     + network.matmul_flops_per_token(enc, ld, dim) * b * g * ld
                     + 2 * (b * lq) * (b * g * ld) * dim)
  return {"config": args.config, "devices": n_dev, "device_kind": kind, "params": tr.params_count(),
          "batch": b, "step_s": med, "steps_per_s": 1 / med, "examples_per_s": b / med,
          "tokens_per_s": (b * lq + b * g * ld) / med, "model_tflops_per_s": model_flops / med / 1e12,
          # XLA's cost analysis of an SPMD program counts ONE device's share: scale by the device count.
          "xla_tflops_per_s": None if flops is None else flops * n_dev / med / 1e12,
          "mfu": None if peak is None else model_flops / med / (peak * n_dev)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=sorted(CONFIGS))
  parser.add_argument("--devices", nargs="+", type=int, default=[8, 1],
                      help="simulated CPU device counts; 0 = the real devices as they are")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--query_len", type=int, default=32)
  parser.add_argument("--doc_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--loss_impl", default="chunked", choices=["simple", "chunked", "sharded"],
                      help="xtr_loss implementation (chunked, the default, never builds the [B, n, Bd, m] tensor)")
  parser.add_argument("--config", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.config:  # child mode
    print("RESULT " + json.dumps(child(args)), flush=True)
    return
  rows = []
  for config in args.configs:
    for n in args.devices:
      env = dict(os.environ)
      if n > 0:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
      cmd = [sys.executable, __file__, "--config", config, "--batch", str(args.batch), "--query_len",
             str(args.query_len), "--doc_len", str(args.doc_len), "--steps", str(args.steps), "--dtype", args.dtype,
             "--loss_impl", args.loss_impl]
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
      line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
      if proc.returncode or line is None:
        raise SystemExit(f"benchmark child failed ({config}, {n} devices):\n{proc.stderr[-3000:]}")
      rows.append(json.loads(line[len("RESULT "):]))
  print(f"batch {args.batch} (queries {args.query_len} tokens, 2 docs x {args.doc_len} tokens), dtype {args.dtype}, "
        f"XTR loss {args.loss_impl}, median of {args.steps} steps")
  header = f"{'config':>6} {'params':>11} {'devices':>7} {'kind':>12} {'step s':>8} {'steps/s':>8} " \
           f"{'examples/s':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'XLA TF/s':>8} {'MFU':>6}"
  print(header)
  print("-" * len(header))
  for r in rows:
    xla = "-" if r["xla_tflops_per_s"] is None else f"{r['xla_tflops_per_s']:.3f}"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{r['config']:>6} {r['params']:>11,} {r['devices']:>7} {r['device_kind'][:12]:>12} {r['step_s']:>8.3f} "
          f"{r['steps_per_s']:>8.2f} {r['examples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} "
          f"{r['model_tflops_per_s']:>8.3f} {xla:>8} {mfu:>6}")


if __name__ == "__main__":
  main()
