"""launch/seeds_one_gpu.sh: trainings + exact-search evaluations side by side, a follower waiting for its leader,
bad run specs refused before anything starts, the deadline stopping what is left; and the report over its outputs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

from xtr_jax import report

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = "launch/seeds_one_gpu.sh"


def _env(data_dir: pathlib.Path, dataset: str | pathlib.Path, **extra: str) -> dict[str, str]:
  train, beir = data_dir / "train", data_dir / "beir"
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", PYTHON="python",
      # the experiment files' relative data paths made absolute, and 2-step sizes (no spaces: the script splits
      # TRAIN_ARGS / EVAL_ARGS into words)
      TRAIN_ARGS=" ".join([
          f"--gin.squad/xtr_jsonl_source.path='{train / 'squad-v1.1-dev-pairs.jsonl'}'",
          f"--gin.medquad/xtr_jsonl_source.path='{train / 'medquad-pairs.jsonl'}'",
          f"--gin.msmarco/xtr_tsv_triples_source.path='{train / 'msmarco-triples-first100.tsv'}'",
          f"--gin.scifact/xtr_beir_bm25_source.root='{beir / 'scifact'}'",
          f"--gin.EVAL_DATASETS=['{beir / 'scifact'}','{beir / 'cranfield'}']",
          "--gin.TRAIN_STEPS=2", "--gin.WARMUP_STEPS=1", "--gin.BATCH_SIZE=8", "--gin.QUERY_MAX_LEN=8",
          "--gin.DOC_MAX_LEN=16", "--gin.xtr_loss.k_train=8", "--gin.CheckpointConfig.async_save=False"]),
      EVAL_ARGS=f"--gin.DATASET=['{dataset}'] --gin.xtr_eval.token_top_k=[100,1000] --gin.xtr_eval.doc_max_len=32",
      **extra)
  return env


def test_runs_train_and_evaluate_exactly_and_a_follower_waits_for_its_leader(data_dir, beir_subset, tmp_path):
  dataset = beir_subset("cranfield", queries=4, docs=40)
  out = tmp_path / "seeds"
  proc = subprocess.run(["bash", SCRIPT, str(out), "lead:xtr_minilm_cpu_b256:0",
                         "follow:colbert_minilm_cpu_b256:1:lead"], cwd=REPO, env=_env(data_dir, dataset),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  progress = (out / "progress.txt").read_text().splitlines()
  events = [line.split("] ", 1)[1] for line in progress]
  # 2 steps never log step 10: the follower starts once the leader's training has stopped
  assert events.index("lead: trained; evaluating") < events.index("follow: training colbert_minilm_cpu_b256 at seed 1")
  assert events[-1] == "done (exit 0)"
  for name, loss, seed in (("lead", "xtr_loss", 0), ("follow", "colbert_loss", 1)):
    config = (out / name / "train" / "config.gin").read_text()
    assert f"XTRModel.loss = @{loss}" in config and f"SEED = {seed}" in config
    metrics = json.loads((out / name / "eval" / "cranfield" / "metrics.json").read_text())
    assert metrics["index"]["backend"] == "bruteforce"
    assert sorted(metrics["systems"]) == ["colbert-k100", "colbert-k1000", "xtr-kth-k100", "xtr-kth-k1000"]
  text = report.report(evals=[("XTR", str(out / "lead" / "eval")), ("ColBERT", str(out / "follow" / "eval"))],
                       groups=[("XTR loss", ["XTR"]), ("ColBERT loss", ["ColBERT"])])
  assert "| cranfield | XTR exact k'=100 minus rescoring k'=1000 | ColBERT loss | 1 |" in text


def test_bad_runs_are_refused_before_anything_starts(data_dir, tmp_path):
  env = _env(data_dir, tmp_path)
  for runs, message in ((["a:xtr_minilm_cpu_b256:x"], "integer SEED"),
                        (["a:no_such_experiment:0"], "no_such_experiment.gin not found"),
                        (["b:xtr_minilm_cpu_b256:1:a", "a:xtr_minilm_cpu_b256:0"], "leader 'a' is not a run given before"),
                        ([], "no runs given")):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), *runs], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "progress.txt").exists()


def test_the_deadline_stops_what_is_still_running(data_dir, tmp_path):
  out = tmp_path / "seeds"
  proc = subprocess.run(["bash", SCRIPT, str(out), "slow:xtr_minilm_cpu_b256:0"], cwd=REPO,
                        env=_env(data_dir, tmp_path, DEADLINE="3"), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "deadline (3 s): stopping 1 runs" in (out / "progress.txt").read_text()
  left = subprocess.run(["pgrep", "-f", f"xtr_jax.train .*{out}/"], capture_output=True, text=True)
  assert left.stdout == "", f"still running: {left.stdout}"
  assert not (out / "slow" / "train" / "model").exists()
