"""Does the training input pipeline outrun the xtr_small training step (>= 10x)? Examples/s of both, side by side.

    python benchmarks/input_bench.py                    # T5 vocab, Ld=512, Lq=32, 1 negative, the public mixture
    python benchmarks/input_bench.py --negatives 3 --no-seqio --step_batch 2

Measures, in one run on this machine:
  * TrainInput (NumPy pipeline the trainer uses): setup time, then examples/s over `--batches` batches of
    `--batch` rows (median of per-batch rates; the first epoch, so the token cache only helps repeated passages);
  * the seqio Mixture of the same sources through tf.data + XTRFeatureConverter (same tokens), for comparison;
  * one xtr_small training step (forward + backward of the XTR loss + AdamW update, jitted) at Ld=512 on CPU:
    median step time over `--step_repeats` steps after compilation, as examples/s. xtr_small is
    gin_configs/models/xtr_small.gin when it exists, else T5 v1.1-small (8 layers, d_model 512, d_ff 1024, 6 heads);
  * an analytic FLOP count of that step and the measured matmul FLOP/s of this CPU, as a cross-check.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources(data_dir: str):
  from xtr_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  train = os.path.join(data_dir, "train")
  return [
      ip.jsonl_source(path=os.path.join(train, "squad-v1.1-dev-pairs.jsonl"), name="squad", rate=1.0),
      ip.jsonl_source(path=os.path.join(train, "medquad-pairs.jsonl"), name="medquad", rate=1.0),
      ip.tsv_triples_source(path=os.path.join(train, "msmarco-triples-first100.tsv"), name="msmarco", rate=0.1),
      ip.beir_bm25_source(root=os.path.join(data_dir, "beir", "scifact"), name="scifact_bm25", rate=0.5),
  ]


def bench_train_input(args) -> dict:
  from xtr_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  ti = ip.TrainInput(sources=_sources(args.data_dir), global_batch_size=args.batch, vocab_path=args.vocab,
                     query_max_len=args.query_len, doc_max_len=args.doc_len, num_negatives=args.negatives,
                     seed=0, process_index=0, process_count=1)
  setup = time.perf_counter() - t0
  rates = []
  for _ in range(args.batches):
    t = time.perf_counter()
    batch = next(ti)
    rates.append(args.batch / (time.perf_counter() - t))
  assert batch["doc_tokens"].shape == (args.batch, 1 + args.negatives, args.doc_len)
  return {"setup_s": setup, "ex_per_s": statistics.median(rates), "min_ex_per_s": min(rates)}


def bench_seqio(args) -> dict:
  import seqio  # pylint: disable=g-import-not-at-top
  from xtr_jax.data import tasks  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  names = tasks.register_xtr_tasks(data_dir=args.data_dir, vocab_path=args.vocab, vocab_name="bench",
                                   num_negatives=args.negatives, sources=_sources(args.data_dir))
  ds = seqio.get_dataset(names.mixture, {"query": args.query_len, "docs": args.doc_len},
                         tasks.XTRFeatureConverter(), shuffle=True, seed=0, num_epochs=None)
  it = ds.batch(args.batch, drop_remainder=True).prefetch(2).as_numpy_iterator()
  next(it)
  setup = time.perf_counter() - t0
  rates = []
  for _ in range(args.batches):
    t = time.perf_counter()
    next(it)
    rates.append(args.batch / (time.perf_counter() - t))
  return {"setup_s": setup, "ex_per_s": statistics.median(rates), "min_ex_per_s": min(rates)}


def _small_model(args):
  import gin  # pylint: disable=g-import-not-at-top
  from xtr_jax import losses, models, network  # pylint: disable=g-import-not-at-top
  loss = functools.partial(losses.xtr_loss, k_train=args.k_train)
  gin_file = os.path.join(REPO, "gin_configs", "models", "xtr_small.gin")
  if os.path.isfile(gin_file):
    from xtr_jax import gin_utils  # pylint: disable=g-import-not-at-top
    gin_utils.parse_gin([gin_file], [f"XTRModel.doc_max_len = {args.doc_len}",
                                     f"XTRModel.query_max_len = {args.query_len}"], finalize=False)
    model = models.XTRModel(loss=loss)
    gin.clear_config()
    return model, "gin_configs/models/xtr_small.gin"
  cfg = network.T5EncoderConfig(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0)
  return (models.XTRModel(encoder_config=cfg, query_max_len=args.query_len, doc_max_len=args.doc_len, loss=loss),
          "T5 v1.1-small (built-in fallback)")


def step_flops(model, b: int, g: int, lq: int, ld: int) -> float:
  """Forward + backward FLOPs (3x forward) of the encoder on b queries and b*g documents; matmuls only."""
  c = model.encoder_config
  d, h, dkv, dff, layers = c.d_model, c.num_heads, c.d_kv, c.d_ff, c.num_layers
  n_ff = 3 if c.feed_forward_proj.startswith("gated") else 2
  per_token = layers * (2 * 4 * d * h * dkv + 2 * n_ff * d * dff) + 2 * d * model.token_dim
  per_seq_attn = lambda l: layers * 2 * 2 * l * l * h * dkv
  fwd = b * (lq * per_token + per_seq_attn(lq)) + b * g * (ld * per_token + per_seq_attn(ld))
  return 3.0 * fwd


def cpu_matmul_flops() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 1024
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / statistics.median(times)


def bench_train_step(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from xtr_jax import models  # pylint: disable=g-import-not-at-top
  from xtr_jax.data import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  model, which = _small_model(args)
  params = models.unbox_params(model.init(jax.random.key(0)))
  opt = optax.adamw(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  ti = ip.TrainInput(sources=_sources(args.data_dir)[:2], global_batch_size=args.step_batch, vocab_path=args.vocab,
                     query_max_len=args.query_len, doc_max_len=args.doc_len, num_negatives=args.negatives,
                     process_index=0, process_count=1)
  batches = [next(ti) for _ in range(args.step_repeats + 1)]
  t = time.perf_counter()
  params, opt_state, loss = step(params, opt_state, batches[0], jax.random.key(1))
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t
  times = []
  for i, batch in enumerate(batches[1:]):
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batch, jax.random.key(2 + i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t)
  med = statistics.median(times)
  flops = step_flops(model, args.step_batch, 1 + args.negatives, args.query_len, args.doc_len)
  return {"model": which, "compile_s": compile_s, "step_s": med, "ex_per_s": args.step_batch / med,
          "flops": flops, "loss": float(loss)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", default=os.environ.get("XTR_JAX_DATA_DIR",
                                                           os.path.join(os.path.dirname(REPO), "shared", "data")))
  parser.add_argument("--vocab", default=None, help="default: <data_dir>/vocab/t5_spiece.model")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--query_len", type=int, default=32)
  parser.add_argument("--doc_len", type=int, default=512)
  parser.add_argument("--negatives", type=int, default=1)
  parser.add_argument("--step_batch", type=int, default=4)
  parser.add_argument("--step_repeats", type=int, default=3)
  parser.add_argument("--k_train", type=int, default=128)
  parser.add_argument("--no-seqio", dest="seqio", action="store_false")
  parser.add_argument("--no-step", dest="step", action="store_false")
  args = parser.parse_args(argv)
  args.vocab = args.vocab or os.path.join(args.data_dir, "vocab", "t5_spiece.model")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  print(f"# input_bench: T5 vocab, Lq={args.query_len}, Ld={args.doc_len}, negatives={args.negatives}, "
        f"batch={args.batch}; cpus={os.cpu_count()}; python {sys.version.split()[0]}")
  rows = []
  ti = bench_train_input(args)
  rows.append(("TrainInput (NumPy, T5 spm)", f"{ti['ex_per_s']:.0f}", f"min {ti['min_ex_per_s']:.0f}; "
               f"setup {ti['setup_s']:.1f}s (reading + BM25 mining)"))
  if args.seqio:
    sq = bench_seqio(args)
    rows.append(("seqio Mixture (tf.data)", f"{sq['ex_per_s']:.0f}", f"min {sq['min_ex_per_s']:.0f}; "
                 f"setup {sq['setup_s']:.1f}s"))
  if args.step:
    st = bench_train_step(args)
    peak = cpu_matmul_flops()
    rows.append((f"xtr_small train step (B={args.step_batch})", f"{st['ex_per_s']:.2f}",
                 f"{st['step_s']:.2f}s/step; compile {st['compile_s']:.0f}s; {st['model']}"))
    rows.append(("  FLOP estimate of that step", f"{args.step_batch * peak / st['flops']:.2f}",
                 f"{st['flops'] / 1e12:.2f} TFLOP/step at measured matmul {peak / 1e9:.0f} GFLOP/s "
                 f"(upper bound on ex/s)"))
  width = max(len(r[0]) for r in rows)
  print(f"{'what':<{width}}  {'examples/s':>10}  notes")
  for name, rate, note in rows:
    print(f"{name:<{width}}  {rate:>10}  {note}")
  if args.step:
    print(f"ratio TrainInput / xtr_small step: {ti['ex_per_s'] / st['ex_per_s']:.0f}x (needs >= 10x)")


if __name__ == "__main__":
  main()
