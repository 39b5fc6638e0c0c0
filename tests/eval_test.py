"""`python -m xtr_jax.eval` end to end on a SciFact subset with a tiny random model, plus its refusals.

The run file, metrics.json and per-query metrics are checked against independent computations: pytrec_eval on the
written run file, and a NumPy ColBERT (mean over query tokens of the max similarity) over the model's own document
and query embeddings, which the `colbert` system and the `exact` system with k' >= every token must reproduce.
"""

from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
import pytest
import pytrec_eval

from xtr_jax import eval as xeval
from xtr_jax import models, network, runfiles

N_QUERIES = 20
N_DOCS = 200


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_beir(root, docs, queries, qrels_rows, split="test"):
  os.makedirs(os.path.join(root, "qrels"), exist_ok=True)
  with open(os.path.join(root, "corpus.jsonl"), "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d) + "\n")
  with open(os.path.join(root, "queries.jsonl"), "w", encoding="utf-8") as f:
    for q in queries:
      f.write(json.dumps(q) + "\n")
  with open(os.path.join(root, "qrels", f"{split}.tsv"), "w", encoding="utf-8") as f:
    f.write("query-id\tcorpus-id\tscore\n")
    for q, d, r in qrels_rows:
      f.write(f"{q}\t{d}\t{r}\n")
  return str(root)


@pytest.fixture(scope="module")
def scifact_subset(beir_subset):
  """First 20 SciFact test queries, their relevant documents, and other documents up to 200, as a BEIR dir."""
  return beir_subset("scifact", queries=N_QUERIES, docs=N_DOCS)


def _tiny_model_dir(path, vocab, seed=0):
  cfg = network.BertEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
  model = models.XTRModel(encoder_config=cfg, token_dim=16, query_max_len=16, doc_max_len=48, vocab_path=vocab)
  pre = models.PretrainedXTR(model, model.init(jax.random.key(seed))["params"])
  return pre.save(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bert_vocab):
  return _tiny_model_dir(tmp_path_factory.mktemp("model"), bert_vocab)


def _cli(model, dataset, out, *extra):
  gin.clear_config()  # one process, several command lines
  return xeval.main(["--gin_file=runs/eval_beir.gin", f"--gin.MODEL='{model}'", f"--gin.DATASET='{dataset}'",
                     "--gin.SPLIT='test'", f"--gin.OUTPUT_DIR='{out}'", "--gin.xtr_build_index.num_leaves=40",
                     "--gin.xtr_build_index.num_leaves_to_search=40", "--gin.xtr_eval.query_batch_size=10", *extra])


def _numpy_colbert(model_path, dataset):
  """Reference: every (query, doc) ColBERT score from the model's own embeddings, in NumPy."""
  from xtr_jax.data import beir  # pylint: disable=g-import-not-at-top
  from xtr_jax import tokenization  # pylint: disable=g-import-not-at-top
  data = beir.load_beir(dataset, "test")
  pre = models.load_pretrained(model_path)
  doc_ids = list(data.corpus)
  d, dm = pre.encode_documents([tokenization.preprocess_document(data.corpus[i].title, data.corpus[i].text)
                                for i in doc_ids])
  qids = list(data.queries)
  q, qm = pre.encode_queries([data.queries[i] for i in qids])
  sims = np.einsum("qnd,cmd->qcnm", q, d.astype(np.float16).astype(np.float32))  # the export stores float16
  sims = np.where(dm[None, :, None, :], sims, -np.inf).max(axis=3)  # [Q, C, n]
  scores = np.where(qm[:, None, :], sims, 0.0).sum(axis=2) / qm.sum(axis=1)[:, None]
  return {qid: dict(zip(doc_ids, scores[i])) for i, qid in enumerate(qids)}


def test_end_to_end_scifact_subset(tmp_path, scifact_subset, model_dir, capsys):
  out = tmp_path / "eval"
  res = _cli(model_dir, scifact_subset, out, "--gin.xtr_eval.scoring=['xtr', 'colbert', 'exact']",
             "--gin.xtr_eval.token_top_k=[8, 10000]", "--gin.xtr_eval.imputation=['kth', 'zero']",
             "--gin.xtr_eval.top_k=20", "--analysis")
  printed = capsys.readouterr().out
  ds = out / "scifact"
  metrics = json.loads((ds / "metrics.json").read_text())
  systems = metrics["systems"]
  assert set(systems) == {"xtr-kth-k8", "xtr-zero-k8", "colbert-k8", "exact-kth-k8", "exact-zero-k8",
                          "xtr-kth-k10000", "xtr-zero-k10000", "colbert-k10000", "exact-kth-k10000",
                          "exact-zero-k10000", "bm25"}
  assert metrics["num_queries"] == N_QUERIES and metrics["num_docs"] == N_DOCS

  qrels = {}
  for line in open(os.path.join(scifact_subset, "qrels", "test.tsv")).read().splitlines()[1:]:
    q, d, r = line.split("\t")
    qrels.setdefault(q, {})[d] = int(r)
  corpus_ids = {d["_id"] for d in _read_jsonl(os.path.join(scifact_subset, "corpus.jsonl"))}
  for name, sys_ in systems.items():
    run = runfiles.read_run(str(ds / sys_["run_file"]))  # valid TREC format, ranks consecutive
    assert set(run) <= set(qrels)
    assert all(0 < len(r) <= 20 and {d for d, _ in r} <= corpus_ids for r in run.values()), name
    # metrics.json equals pytrec_eval run directly on the written file
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"}).evaluate(
        {q: dict(r) for q, r in run.items()})
    ndcg = sum(ev.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels) / len(qrels)
    assert sys_["metrics"]["nDCG@10"] == pytest.approx(ndcg, abs=1e-5), name
    per_query = (ds / "per_query" / f"{name}.tsv").read_text().splitlines()
    assert per_query[0].split("\t") == ["query_id", "nDCG@10", "Recall@100", "MRR@10", "MAP@100"]
    assert len(per_query) == 1 + N_QUERIES
    t = sys_["timing"]
    assert t["total_ms_per_query"] > 0
    if name != "bm25":
      assert t["total_ms_per_query"] == pytest.approx(
          t["query_encoding_ms_per_query"] + t["token_retrieval_ms_per_query"] + t["scoring_ms_per_query"])
  # BM25 on real SciFact text finds relevant documents among 200 (a random encoder would not be a sanity check)
  assert systems["bm25"]["metrics"]["nDCG@10"] > 0.3

  # ColBERT rescoring and exact XTR with k' >= every token both equal the NumPy ColBERT reference
  ref = _numpy_colbert(model_dir, scifact_subset)
  for name in ("colbert-k10000", "exact-kth-k10000", "colbert-k8"):
    run = runfiles.read_run(str(ds / systems[name]["run_file"]))
    for q, ranking in run.items():
      got = np.array([s for _, s in ranking])
      want = np.array([ref[q][d] for d, _ in ranking])
      np.testing.assert_allclose(got, want, atol=2e-3, err_msg=f"{name} {q}")
      if name != "colbert-k8":  # over every document, the top score is the reference maximum
        assert got[0] == pytest.approx(max(ref[q].values()), abs=2e-3)
  # with every token retrieved, the imputed value is never used: kth and zero rank identically
  assert systems["exact-kth-k10000"]["metrics"] == pytest.approx(systems["exact-zero-k10000"]["metrics"])

  # k' sweep: table + PNG
  png = (ds / "sweep.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  sweep = (ds / "sweep.tsv").read_text().splitlines()
  assert len(sweep) == 1 + 10 and {line.split("\t")[1] for line in sweep[1:]} == {"8", "10000"}

  # analyses are present per k', in range, and the cost analysis has the paper's quantities
  for kp in ("8", "10000"):
    a = metrics["analysis"][kp]
    assert 0.0 <= a["gold_token_ratio"] <= 1.0 and 0.0 <= a["lexical_token_ratio"] <= 1.0
    c = a["cost"]
    assert c["colbert_ops"] == pytest.approx(c["n_bar"] ** 2 * int(kp) * (2 * c["m_bar"] * 16 + c["m_bar"] + 1))
    assert c["colbert_scoring_ms_per_query"] > 0 and c["xtr_scoring_ms_per_query"] > 0
  # with every token retrieved, each candidate's retrieved tokens are all of its tokens times the query length
  c = metrics["analysis"]["10000"]["cost"]
  assert c["candidates_per_query"] == N_DOCS
  # ... so the ScaNN index found every exact hit; at k'=8 it is measured against the exact search of the same run
  assert metrics["analysis"]["10000"]["token_recall_vs_exact"] == pytest.approx(1.0)
  assert 0.5 <= metrics["analysis"]["8"]["token_recall_vs_exact"] <= 1.0
  assert c["r_bar"] == pytest.approx(c["n_bar"] * c["m_bar"], rel=1e-6)

  # printed summary table and summary files
  assert "nDCG@10" in printed and "bm25" in printed and "xtr-kth-k8" in printed
  summary = json.loads((out / "summary.json").read_text())
  assert len(summary["rows"]) == len(systems)
  assert (out / "config.gin").is_file()

  # OUTPUT_DIR with a previous run is refused ...
  with pytest.raises(FileExistsError, match="previous evaluation"):
    _cli(model_dir, scifact_subset, out, "--gin.xtr_eval.bm25=False")
  # ... and --overwrite replaces every previous result (no stale files) while reusing the matching index
  (ds / "stale.txt").write_text("old")
  res = _cli(model_dir, scifact_subset, out, "--overwrite", "--gin.xtr_eval.bm25=False",
             "--gin.xtr_eval.token_top_k=8", "--gin.xtr_eval.top_k=20")
  assert not (ds / "stale.txt").exists() and not (ds / "sweep.png").exists()
  assert set(os.listdir(ds / "runs")) == {"xtr-kth-k8.trec"}
  assert res["datasets"][0]["index"]["reused"] is True
  # the same index and settings give the same results (ScaNN search is deterministic for a given index)
  assert res["datasets"][0]["systems"]["xtr-kth-k8"]["metrics"] == pytest.approx(systems["xtr-kth-k8"]["metrics"])


def test_index_of_another_model_is_refused(tmp_path, scifact_subset, model_dir, bert_vocab):
  other = _tiny_model_dir(tmp_path / "other_model", bert_vocab, seed=1)
  index_root = tmp_path / "shared_index"
  common = ("--gin.xtr_eval.bm25=False", "--gin.xtr_eval.token_top_k=4", f"--gin.xtr_eval.index_root='{index_root}'",
            "--gin.xtr_eval.max_queries=4", "--gin.xtr_eval.index_backend='bruteforce'")
  _cli(model_dir, scifact_subset, tmp_path / "a", *common)
  with pytest.raises(ValueError, match="built by another model"):
    _cli(other, scifact_subset, tmp_path / "b", *common)
  # Only the query length differs: the document export and index are reused.
  res = _cli(model_dir, scifact_subset, tmp_path / "q", *common, "--gin.xtr_eval.query_max_len=12")
  assert res["datasets"][0]["index"]["reused"] is True
  res = _cli(other, scifact_subset, tmp_path / "c", *common, "--gin.xtr_eval.rebuild_index=True")
  assert res["datasets"][0]["index"]["reused"] is False and res["datasets"][0]["index"]["backend"] == "bruteforce"
  assert res["datasets"][0]["num_queries"] == 4


def test_leaves_to_search_is_a_search_time_setting(tmp_path, scifact_subset, model_dir):
  """Searching 1 of the 40 leaves reuses the index, is recorded, and finds fewer of the exact search's tokens."""
  index_root = tmp_path / "shared_index"
  common = ("--gin.xtr_eval.bm25=False", "--gin.xtr_eval.token_top_k=8", f"--gin.xtr_eval.index_root='{index_root}'",
            "--gin.xtr_eval.max_queries=10", "--gin.xtr_eval.scoring=['xtr', 'exact']", "--analysis")
  full = _cli(model_dir, scifact_subset, tmp_path / "all", *common)["datasets"][0]
  few = _cli(model_dir, scifact_subset, tmp_path / "few", *common, "--gin.xtr_eval.leaves_to_search=1")["datasets"][0]
  assert few["index"]["reused"] is True
  assert (full["leaves_to_search"], few["leaves_to_search"]) == (40, 1)
  recall_all, recall_few = (r["analysis"]["8"]["token_recall_vs_exact"] for r in (full, few))
  # (AH codes of a random tiny model: near-ties, so even all 40 leaves find ~0.7 of the exact tokens)
  assert recall_few < recall_all - 0.2, (recall_all, recall_few)
  # the exact search does not depend on it
  assert few["systems"]["exact-kth-k8"]["metrics"] == full["systems"]["exact-kth-k8"]["metrics"]
  with pytest.raises(ValueError, match="leaves_to_search=2: needs index_backend 'scann' or 'faiss'"):
    _cli(model_dir, scifact_subset, tmp_path / "bf", *common, "--gin.xtr_eval.leaves_to_search=2",
         "--gin.xtr_eval.index_backend='bruteforce'")
  assert not (tmp_path / "bf").exists()
  # A build setting differs from the stored index: refused (never silently reused), rebuilt on request from the kept
  # export; exact search does not depend on it.
  with pytest.raises(ValueError, match=r"built with other settings \(center: index False, configured True\)"):
    _cli(model_dir, scifact_subset, tmp_path / "centered", *common, "--gin.xtr_build_index.center=True")
  assert not (tmp_path / "centered").exists()  # refused before anything is written
  centered = _cli(model_dir, scifact_subset, tmp_path / "centered", *common, "--gin.xtr_build_index.center=True",
                  "--gin.xtr_eval.rebuild_index=True")["datasets"][0]
  assert centered["index"]["reused"] is True and centered["index"]["export_s"] == 0.0  # the export is kept
  assert centered["index"]["params"]["center"] is True and centered["index"]["index_build_s"] > 0
  assert centered["systems"]["exact-kth-k8"]["metrics"] == full["systems"]["exact-kth-k8"]["metrics"]


def test_faiss_index_backend(tmp_path, scifact_subset, model_dir):
  """The FAISS backend end to end: built, recorded, reused with fewer lists probed, a changed setting refused."""
  index_root = tmp_path / "faiss_index"
  common = ("--gin.xtr_eval.bm25=False", "--gin.xtr_eval.token_top_k=8", f"--gin.xtr_eval.index_root='{index_root}'",
            "--gin.xtr_eval.max_queries=10", "--gin.xtr_eval.scoring=['xtr', 'exact']", "--analysis",
            "--gin.xtr_eval.index_backend='faiss'")
  full = _cli(model_dir, scifact_subset, tmp_path / "all", *common)["datasets"][0]
  assert full["index"]["backend"] == "faiss" and full["index"]["params"]["num_leaves"] == 40
  few = _cli(model_dir, scifact_subset, tmp_path / "few", *common, "--gin.xtr_eval.leaves_to_search=1")["datasets"][0]
  assert few["index"]["reused"] is True and (full["leaves_to_search"], few["leaves_to_search"]) == (40, 1)
  recall_all, recall_few = (r["analysis"]["8"]["token_recall_vs_exact"] for r in (full, few))
  # (4-bit PQ codes of a random tiny model: near-ties, so all 40 lists find ~0.6 of the exact tokens)
  assert recall_few < recall_all - 0.1, (recall_all, recall_few)
  assert few["systems"]["exact-kth-k8"]["metrics"] == full["systems"]["exact-kth-k8"]["metrics"]
  with pytest.raises(ValueError, match=r"built with other settings \(reorder_k: index 0, configured 1, "
                                       r"reorder_dtype: index 'none', configured 'int8'"):
    _cli(model_dir, scifact_subset, tmp_path / "refined", *common, "--gin.xtr_build_index.reorder_k=1",
         "--gin.xtr_build_index.reorder_dtype='int8'")
  assert not (tmp_path / "refined").exists()
  with pytest.raises(ValueError, match=r"built with other settings \(probe_gap: index 0.0, configured 0.2, "
                                       r"min_leaves_to_search: index 1, configured 3"):
    _cli(model_dir, scifact_subset, tmp_path / "adaptive", *common, "--gin.xtr_build_index.probe_gap=0.2",
         "--gin.xtr_build_index.min_leaves_to_search=3")
  assert not (tmp_path / "adaptive").exists()


def test_self_hits_dropped(tmp_path, model_dir):
  words = "protein cell gene virus vaccine brain cancer tumor dose trial mouse human blood heart lung".split()
  rng = np.random.default_rng(0)
  docs = [{"_id": f"d{i}", "title": "", "text": " ".join(rng.choice(words, size=8))} for i in range(30)]
  # ArguAna-style: the queries are corpus documents (same id, same text) and their judged answers are others
  queries = [{"_id": d["_id"], "text": d["text"]} for d in docs[:6]]
  rows = [(f"d{i}", f"d{i + 10}", 1) for i in range(6)]
  root = _write_beir(tmp_path / "selfhits", docs, queries, rows)
  # a second dataset in the same call: one summary table covers both
  other = _write_beir(tmp_path / "second", docs[10:], [{"_id": "q1", "text": docs[12]["text"]}], [("q1", "d12", 1)])
  gin.clear_config()
  kept = xeval.main(["--gin_file=runs/eval_beir.gin", f"--gin.MODEL='{model_dir}'",
                     f"--gin.DATASET=['{root}', '{other}']", "--gin.SPLIT='test'",
                     f"--gin.OUTPUT_DIR='{tmp_path / 'kept'}'", "--gin.xtr_eval.token_top_k=64",
                     "--gin.xtr_eval.top_k=5", "--gin.xtr_eval.scoring='exact'"])
  assert [(r["dataset"], r["system"]) for r in kept["summary"]] == [
      ("selfhits", "exact-kth-k64"), ("selfhits", "bm25"), ("second", "exact-kth-k64"), ("second", "bm25")]
  table = kept["table"].splitlines()
  assert len(table) == 2 + 4 and table[2].startswith("selfhits") and table[4].startswith("second")
  assert table[4].split()[3] == "100.0"  # identical text: the query finds d12 first (nDCG@10 = 100)
  assert (tmp_path / "kept" / "second" / "metrics.json").is_file()
  dropped = _cli(model_dir, root, tmp_path / "dropped", "--gin.xtr_eval.token_top_k=64", "--gin.xtr_eval.top_k=5",
                 "--gin.xtr_eval.scoring='exact'", "--drop_self_hits")
  for system in ("exact-kth-k64", "bm25"):
    before = runfiles.read_run(str(tmp_path / "kept" / "selfhits" / "runs" / f"{system}.trec"))
    after = runfiles.read_run(str(tmp_path / "dropped" / "selfhits" / "runs" / f"{system}.trec"))
    # identical text: the query's own document is its best match before dropping
    assert all(before[q][0][0] == q for q in before), system
    for q, ranking in after.items():
      ids = [d for d, _ in ranking]
      assert q not in ids and len(ids) == 5
      assert ids == [d for d, _ in before[q] if d != q][:4] + ids[4:]  # the rest keeps its order
  assert kept["datasets"][0]["drop_self_hits"] is False and dropped["datasets"][0]["drop_self_hits"] is True


def test_drop_self_hits_function():
  rankings = {"a": [("a", 3.0), ("b", 2.0)], "b": [("c", 1.0)]}
  assert xeval.drop_self_hits(rankings) == {"a": [("b", 2.0)], "b": [("c", 1.0)]}


def test_bad_dataset_input(tmp_path, scifact_subset):
  with pytest.raises(FileNotFoundError, match=r"unknown split 'dev'.*available splits: test"):
    xeval.load_split(scifact_subset, "dev")
  root = _write_beir(tmp_path / "noqrels", [{"_id": "d", "text": "x"}], [{"_id": "q", "text": "y"}], [])
  os.remove(os.path.join(root, "qrels", "test.tsv"))
  os.rmdir(os.path.join(root, "qrels"))
  with pytest.raises(FileNotFoundError, match="no qrels/ directory"):
    xeval.load_split(root, "test")
  root = _write_beir(tmp_path / "wrongids", [{"_id": "d", "text": "x"}], [{"_id": "q", "text": "y"}],
                     [("Q-7", "d", 1), ("Q-8", "d", 1)])
  with pytest.raises(ValueError, match=r"test.tsv: none of its 2 query ids is in .*queries.jsonl"):
    xeval.load_split(root, "test")


def test_bad_options_fail_before_any_output(tmp_path, scifact_subset, model_dir):
  with pytest.raises(ValueError, match="unknown mode 'bm42'"):
    _cli(model_dir, scifact_subset, tmp_path / "x", "--gin.xtr_eval.scoring='bm42'")
  with pytest.raises(ValueError, match="imputation: unknown 'mean'"):
    _cli(model_dir, scifact_subset, tmp_path / "x", "--gin.xtr_eval.imputation='mean'")
  gin.clear_config()
  with pytest.raises(FileNotFoundError, match="unknown split"):
    xeval.main(["--gin_file=runs/eval_beir.gin", f"--gin.MODEL='{model_dir}'", f"--gin.DATASET='{scifact_subset}'",
                "--gin.SPLIT='dev'", f"--gin.OUTPUT_DIR='{tmp_path / 'x'}'"])
  assert not (tmp_path / "x").exists()


def test_prepare_output_dir(tmp_path):
  out = tmp_path / "o"
  xeval.prepare_output_dir(str(out), overwrite=False)  # new: created
  (out / "index").mkdir()
  xeval.prepare_output_dir(str(out), overwrite=False)  # only the index cache: not a previous evaluation
  (out / "summary.json").write_text("{}")
  with pytest.raises(FileExistsError, match="--overwrite"):
    xeval.prepare_output_dir(str(out), overwrite=False)
  xeval.prepare_output_dir(str(out), overwrite=True)
  assert os.listdir(out) == ["index"]
