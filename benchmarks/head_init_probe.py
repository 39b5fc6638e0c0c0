"""How good is an experiment's starting point? In-batch loss / accuracy of the restored encoder with its fresh random
token head vs the principal-directions head (`head_init.PrincipalHeadInit`), on training batches.

    python benchmarks/head_init_probe.py [--gin_file experiments/xtr_minilm_cpu.gin] [--batches 4] [--gin.X=V ...]

The batches are the ones right AFTER those the head is estimated from (the head sees `PrincipalHeadInit.num_batches`
batches, default 4), so the figures are not measured on the estimation data. Both losses are reported (XTR with the
experiment's k_train and temperature; ColBERT with its temperature), without dropout. Training data only: nothing here
looks at an evaluation set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _experiment  # noqa: E402  pylint: disable=g-import-not-at-top


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", default="experiments/xtr_minilm_cpu.gin")
  ap.add_argument("--batches", type=int, default=4)
  args, rest = ap.parse_known_args()

  import gin  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from xtr_jax import checkpointing, head_init, losses  # pylint: disable=g-import-not-at-top

  exp = _experiment.load_experiment(args.gin_file, rest)
  model, data, tr = exp["model"], exp["data"], exp["trainer"]
  restore = gin.get_configurable("RestoreConfig")()
  init = head_init.PrincipalHeadInit()
  state = tr.init_state(jax.random.PRNGKey(int(gin.query_parameter("%SEED"))))
  source = checkpointing.load_source_tree(restore.path, vocab_path=restore.vocab_path)
  state, _, _ = checkpointing.apply_restore_rules(state, source, restore)

  principal, info = init(tr, state.params, data)  # rewinds `data`
  centered, cinfo = head_init.PrincipalHeadInit(num_batches=init.num_batches, center=True)(tr, state.params, data)
  it = iter(data)
  for _ in range(init.num_batches):
    next(it)
  batches = [tr.global_batch(next(it)) for _ in range(args.batches)]
  print(f"principal head: {100 * info['retained']:.1f}% of the second moment of {int(info['tokens']):,} token "
        f"states kept (centered: {100 * cinfo['retained']:.1f}% of the covariance); evaluated on {args.batches} "
        f"later batches of {batches[0]['query_tokens'].shape[0]}")
  print(f"{'head':<12}{'loss':<8}{'loss value':>12}{'accuracy':>10}")
  for loss_name, loss_fn in (("xtr", losses.xtr_loss), ("colbert", losses.colbert_loss)):
    model._loss = loss_fn  # pylint: disable=protected-access
    tr._eval_jit = None  # pylint: disable=protected-access
    for head, params in (("random", state.params), ("principal", principal), ("centered", centered)):
      ms = [jax.device_get(tr.eval_step(state.replace(params=params), b)) for b in batches]
      print(f"{head:<12}{loss_name:<8}{statistics.mean(float(m['loss']) for m in ms):>12.4f}"
            f"{statistics.mean(float(m['accuracy']) for m in ms):>10.4f}", flush=True)

  special_share(model, state.params, batches, int(gin.query_parameter("xtr_loss.k_train")))


def special_share(model, params, batches, k_train: int) -> None:
  """How much of the XTR top-k_train (per query token, over the global batch's document tokens) the tokenizer's
  special tokens take, vs their share of the document tokens: why `XTRModel.score_special_tokens` matters."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  special_ids = np.asarray(model.tokenizer.special_ids)
  taken, share = [], []
  for b in batches:
    b = jax.device_get(b)
    bsz, g, ld = b["doc_tokens"].shape
    d_tok, d_mask = b["doc_tokens"].reshape(bsz * g, ld), b["doc_mask"].reshape(bsz * g, ld)
    q = model.encode(params, b["query_tokens"], b["query_mask"])
    p = model.encode(params, d_tok, d_mask)
    scored = model.scoring_mask(d_tok, d_mask).reshape(-1)
    sims = jnp.einsum("qnd,td->qnt", q, p.reshape(-1, p.shape[-1]))
    sims = jnp.where(jnp.asarray(scored)[None, None], sims, -jnp.inf)
    top = np.asarray(jax.lax.top_k(sims, k_train)[1])[np.asarray(model.scoring_mask(b["query_tokens"],
                                                                                     b["query_mask"]))]
    is_special = np.isin(d_tok.reshape(-1), special_ids)
    taken.append(is_special[top].mean())
    share.append(is_special[scored].mean())
  print(f"special tokens: {100 * np.mean(share):.1f}% of the scored document tokens, {100 * np.mean(taken):.1f}% of "
        f"the top-{k_train} selections (random head, score_special_tokens={model.score_special_tokens})")


if __name__ == "__main__":
  main()
