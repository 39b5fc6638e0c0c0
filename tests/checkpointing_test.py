"""Orbax training checkpoints: re-sharding restores, shape errors, keep/period, data state, pretrained starts with
skip rules, and an exact resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xtr_jax import checkpointing, losses, models, network, partitioning, trainer

REPO = pathlib.Path(__file__).resolve().parent.parent


def _model(*, d_ff: int = 64, vocab_size: int = 256, dropout: float = 0.0, vocab_path: str | None = None):
  enc = network.T5EncoderConfig(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=d_ff, num_layers=2, num_heads=4,
                                dropout_rate=dropout)
  return models.XTRModel(encoder_config=enc, token_dim=16, query_max_len=8, doc_max_len=16, vocab_path=vocab_path,
                         loss=lambda *a: losses.xtr_loss(*a, k_train=16))


def _trainer(model, data: int, model_axis: int) -> trainer.Trainer:
  part = partitioning.Partitioner(mesh=partitioning.make_mesh(data=data, model=model_axis))
  return trainer.Trainer(model=model, partitioner=part, optimizer=optax.adamw(1e-3))


def _random_batch(b: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"query_tokens": rng.integers(2, vocab, (b, 8)).astype(np.int32), "query_mask": np.ones((b, 8), bool),
          "doc_tokens": rng.integers(2, vocab, (b, 2, 16)).astype(np.int32), "doc_mask": np.ones((b, 2, 16), bool)}


def test_checkpoint_written_on_8x1_restores_on_4x2(tmp_path):
  model = _model()
  tr8 = _trainer(model, 8, 1)
  state = tr8.init_state(jax.random.PRNGKey(0))
  state, _ = tr8.train_step(state, tr8.global_batch(_random_batch(8, 256)), jax.random.PRNGKey(1))
  expected = jax.device_get(state)
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1, keep=2))
  ck.save(1, state, {"position": 7})
  ck.close()

  tr42 = _trainer(model, 4, 2)
  ck2 = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1, keep=2))
  assert ck2.latest_step() == 1
  restored, data_state = ck2.restore(1, tr42.abstract_state)
  assert data_state == {"position": 7}
  got = jax.device_get(restored)
  for (name, a), b in zip(checkpointing.flatten_with_names(expected).items(), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=name)
  # Laid out for the new mesh: the vocab embedding is split over the 2-way model axis now.
  shardings = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored))
  assert all(s == e for s, e in zip(shardings, jax.tree.leaves(tr42.state_shardings)))
  specs = [s.spec for s in shardings]
  assert any("model" in str(sp) for sp in specs), specs
  # And it trains on the new mesh.
  state42, metrics = tr42.train_step(restored, tr42.global_batch(_random_batch(8, 256, 1)), jax.random.PRNGKey(1))
  assert int(state42.step) == 2 and np.isfinite(float(metrics["loss"]))
  ck2.close()


def test_shape_mismatch_names_the_parameters(tmp_path):
  tr = _trainer(_model(d_ff=64), 8, 1)
  state = tr.init_state(jax.random.PRNGKey(0))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1))
  ck.save(3, state, {})
  ck.close()
  other = _trainer(_model(d_ff=96), 8, 1)
  differing = [n for (n, a), b in zip(checkpointing.flatten_with_names(tr.abstract_state).items(),
                                       jax.tree.leaves(other.abstract_state)) if a.shape != b.shape]
  assert differing  # the MLP kernels and their Adam moments
  ck2 = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1))
  with pytest.raises(ValueError) as e:
    ck2.restore(3, other.abstract_state)
  for name in differing:
    assert name in str(e.value)
  assert "(32, 64)" in str(e.value) and "(32, 96)" in str(e.value)
  ck2.close()


def test_period_keep_and_data_state_per_step(tmp_path):
  tr = _trainer(_model(), 8, 1)
  state = tr.init_state(jax.random.PRNGKey(0))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=3, keep=2))
  saved = [s for s in range(1, 10) if ck.save(s, state, {"step": s})]
  assert saved == [3, 6, 9]
  assert ck.save(10, state, {"step": 10}, force=True)
  ck.wait()
  assert ck.all_steps() == [9, 10]
  _, data_state = ck.restore(9, tr.abstract_state)
  assert data_state == {"step": 9}
  ck.close()


def test_process_count_change_is_refused_unless_data_state_is_dropped(tmp_path):
  tr = _trainer(_model(), 8, 1)
  state = tr.init_state(jax.random.PRNGKey(0))
  ck = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1))
  ck.save(1, state, {"a": 1})
  ck.close()
  # Pretend the checkpoint came from a 2-process job.
  data_dir = tmp_path / "ck" / "1" / "data"
  json_file = next(p for p in data_dir.rglob("*") if p.is_file() and "process_0" in p.read_text(errors="ignore"))
  json_file.write_text('{"process_0": {"a": 1}, "process_1": {"a": 2}}')
  ck2 = checkpointing.Checkpointer(str(tmp_path / "ck"), checkpointing.CheckpointConfig(period=1))
  with pytest.raises(ValueError, match="input state of 2 processes but this job has 1"):
    ck2.restore(1, tr.abstract_state)
  ck3 = checkpointing.Checkpointer(str(tmp_path / "ck"),
                                   checkpointing.CheckpointConfig(period=1, restore_data_state=False))
  _, data_state = ck3.restore(1, tr.abstract_state)
  assert data_state is None
  ck2.close()
  ck3.close()


def _tiny_hf_t5(directory: pathlib.Path, vocab: str) -> dict[str, np.ndarray]:
  """A random tiny HF T5 encoder saved with save_pretrained; returns its torch weights as numpy."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)
  hf = transformers.T5EncoderModel(config)
  hf.save_pretrained(directory)
  shutil.copyfile(vocab, directory / "spiece.model")
  return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def test_start_from_converted_hf_checkpoint_skips_head(tmp_path, t5_vocab):
  from xtr_jax import convert  # pylint: disable=g-import-not-at-top
  hf_weights = _tiny_hf_t5(tmp_path / "hf", t5_vocab)
  convert.convert_xtr_checkpoint(source=str(tmp_path / "hf"), output_dir=str(tmp_path / "converted"))
  converted = models.load_pretrained(str(tmp_path / "converted"))
  source = checkpointing.load_source_tree(str(tmp_path / "converted"))

  tr = trainer.Trainer(model=converted.model, optimizer=optax.adamw(1e-3),
                       partitioner=partitioning.Partitioner(mesh=partitioning.make_mesh(data=4, model=2)))
  fresh = tr.init_state(jax.random.PRNGKey(123))
  fresh_host = checkpointing.flatten_with_names(jax.device_get(fresh))
  cfg = checkpointing.RestoreConfig(path=str(tmp_path / "converted"),
                                    rules=(("params/token_proj/.*", None), ("opt_state/.*", None)))
  state, loaded, skipped = checkpointing.apply_restore_rules(fresh, source, cfg)
  got = checkpointing.flatten_with_names(jax.device_get(state))

  assert "params/token_proj/kernel" in skipped and not any(n.startswith("opt_state") for n in loaded)
  np.testing.assert_array_equal(got["params/token_proj/kernel"], fresh_host["params/token_proj/kernel"])
  assert not np.allclose(got["params/token_proj/kernel"], source["params/token_proj/kernel"])
  assert int(got["step"]) == 0
  encoder_names = [n for n in got if n.startswith("params/encoder/")]
  assert encoder_names and all(n in loaded for n in encoder_names)
  for n in encoder_names:
    np.testing.assert_array_equal(got[n], source[n], err_msg=n)
  # Independent of the converter's naming: the token embedding is HF's `shared.weight`, byte for byte.
  shared = hf_weights["shared.weight"]
  assert any(v.shape == shared.shape and np.array_equal(v, shared) for n, v in got.items()
             if n.startswith("params/encoder/"))
  for n in got:
    if n.startswith("opt_state/"):
      np.testing.assert_array_equal(got[n], fresh_host[n], err_msg=n)
  # The state lands on the mesh layout the trainer expects.
  assert all(a.sharding == s for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(tr.state_shardings)))

  # Without the head rule the converter's head is loaded instead: the rule is what keeps the fresh head.
  no_head_rule = checkpointing.RestoreConfig(path=cfg.path, rules=(("opt_state/.*", None),))
  state2, _, _ = checkpointing.apply_restore_rules(tr.init_state(jax.random.PRNGKey(123)), source, no_head_rule)
  np.testing.assert_array_equal(jax.device_get(state2.params["token_proj"]["kernel"]),
                                source["params/token_proj/kernel"])

  # A model whose shapes differ from the source: error naming the parameters.
  small = trainer.Trainer(model=_model(d_ff=48, vocab_size=32128), optimizer=optax.adamw(1e-3),
                          partitioner=partitioning.Partitioner(mesh=partitioning.make_mesh(data=8)))
  with pytest.raises(ValueError, match=r"params/encoder/.*needs \(32, 48\)"):
    checkpointing.apply_restore_rules(small.init_state(jax.random.PRNGKey(0)), source, no_head_rule)


def test_relayout_layers_round_trip_and_errors():
  rng = np.random.default_rng(0)
  per_layer = {f"{root}/encoder/layers_{i}/attention/{w}": rng.normal(size=(3, 4)).astype(np.float32)
               for root in ("params", "opt_state/0/mu") for i in range(3) for w in ("q", "k")}
  per_layer["params/encoder/token_embedder/embedding"] = rng.normal(size=(5, 4)).astype(np.float32)
  per_layer["opt_state/0/count"] = np.array(7, np.int32)
  scanned = network.relayout_layers(per_layer, scan_layers=True)
  assert set(scanned) == {"params/encoder/layers/attention/q", "params/encoder/layers/attention/k",
                          "opt_state/0/mu/encoder/layers/attention/q", "opt_state/0/mu/encoder/layers/attention/k",
                          "params/encoder/token_embedder/embedding", "opt_state/0/count"}
  np.testing.assert_array_equal(scanned["opt_state/0/mu/encoder/layers/attention/k"][2],
                                per_layer["opt_state/0/mu/encoder/layers_2/attention/k"])
  assert network.relayout_layers(scanned, scan_layers=True).keys() == scanned.keys()  # already scanned
  back = network.relayout_layers(scanned, scan_layers=False)
  assert back.keys() == per_layer.keys()
  for k, v in per_layer.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  gap = {k: v for k, v in per_layer.items() if "layers_1/" not in k}
  with pytest.raises(ValueError, match=r"params/encoder/layers_<i>/attention/q: layers \[0, 2\] are not numbered"):
    network.relayout_layers(gap, scan_layers=True)


def test_scanned_remat_model_starts_from_per_layer_checkpoint(tmp_path, t5_vocab):
  """A run with scan_layers + remat (the low-memory layout) starts from a per-layer converted checkpoint and computes
  the same loss as the per-layer model started from it."""
  from xtr_jax import convert  # pylint: disable=g-import-not-at-top
  _tiny_hf_t5(tmp_path / "hf", t5_vocab)
  convert.convert_xtr_checkpoint(source=str(tmp_path / "hf"), output_dir=str(tmp_path / "converted"))
  cfg = checkpointing.RestoreConfig(path=str(tmp_path / "converted"), rules=(("opt_state/.*", None),))
  base = models.load_pretrained(str(tmp_path / "converted")).model
  losses_by_layout, params_by_layout = {}, {}
  for scan in (False, True):
    enc = dataclasses.replace(base.encoder_config, scan_layers=scan, remat=scan)
    model = models.XTRModel(encoder_config=enc, token_dim=base.token_dim, query_max_len=8, doc_max_len=16,
                            loss=lambda *a: losses.xtr_loss(*a, k_train=16))
    tr = trainer.Trainer(model=model, optimizer=optax.adamw(1e-3),
                         partitioner=partitioning.Partitioner(mesh=partitioning.make_mesh(data=8)))
    source = checkpointing.load_source_tree(cfg.path, scan_layers=scan)
    state, loaded, skipped = checkpointing.apply_restore_rules(tr.init_state(jax.random.PRNGKey(0)), source, cfg)
    assert all(n in loaded for n in source), sorted(set(source) - set(loaded))
    assert any("/encoder/layers/" in n for n in loaded) == scan
    params_by_layout[scan] = network.relayout_layers(
        checkpointing.flatten_with_names(jax.device_get(state.params)), scan_layers=False)
    batch = _random_batch(8, base.encoder_config.vocab_size)
    losses_by_layout[scan] = float(model.loss_fn(state.params, batch, None)[0])
  assert params_by_layout[True].keys() == params_by_layout[False].keys()
  for k, v in params_by_layout[False].items():
    np.testing.assert_array_equal(params_by_layout[True][k], v, err_msg=k)
  assert losses_by_layout[True] == pytest.approx(losses_by_layout[False], rel=1e-5)


# ------------------------------------------------------------------------------------------ SIGKILL and resume

TINY_GIN = """
include 'experiments/xtr_tiny_squad.gin'
VOCAB_PATH = '{vocab}'
SQUAD_PAIRS = '{pairs}'
TRAIN_STEPS = 12
BATCH_SIZE = 16
QUERY_MAX_LEN = 8
DOC_MAX_LEN = 24
WARMUP_STEPS = 2
train.log_period = 1
CheckpointConfig.period = 4
CheckpointConfig.keep = 2
make_mesh.data = 4
make_mesh.model = 2
"""

# Runs the real `train()` on the gin config, but SIGKILLs its own process when the input pipeline is asked for
# batch `kill_at` (i.e. in the middle of training, possibly while an async checkpoint is being written).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from xtr_jax import gin_utils, train
    from xtr_jax.data import input_pipeline
    gin_file, model_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    gin_utils.parse_gin([gin_file], [f"MODEL_DIR = '{model_dir}'"])
    class KillAt:
      def __init__(self, inner): self.inner, self.n = inner, 0
      def __iter__(self): return self
      def __next__(self):
        self.n += 1
        if self.n == kill_at:
          os.kill(os.getpid(), signal.SIGKILL)
        return next(self.inner)
      def get_state(self): return self.inner.get_state()
      def set_state(self, s): self.inner.set_state(s)
    train.train(train_data=KillAt(input_pipeline.TrainInput()))
""")


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _final_params(model_dir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
  flat = checkpointing.load_source_tree(str(model_dir / "checkpoints" / str(step)))
  return {k: v for k, v in flat.items() if k.startswith("params/")}


def test_sigkill_then_restart_resumes_exactly(tmp_path, data_dir):
  gin_file = tmp_path / "tiny.gin"
  gin_file.write_text(TINY_GIN.format(vocab=data_dir / "vocab" / "t5_spiece.model",
                                      pairs=data_dir / "train" / "squad-v1.1-dev-pairs.jsonl"))
  cli = [sys.executable, "-m", "xtr_jax.train", f"--gin_file={gin_file}"]
  ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"

  ref = subprocess.run(cli + [f"--gin.MODEL_DIR='{ref_dir}'"], capture_output=True, text=True, env=_env(),
                       cwd=REPO, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]

  killed = subprocess.run([sys.executable, "-c", KILLER, str(gin_file), str(run_dir), "10"], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert "step 9/12" in killed.stdout and "step 10/12" not in killed.stdout
  committed = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert committed and max(committed) in (4, 8)
  assert not (run_dir / "model").exists()

  resumed = subprocess.run(cli + [f"--gin.MODEL_DIR='{run_dir}'"], capture_output=True, text=True, env=_env(),
                           cwd=REPO, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {run_dir / 'checkpoints'}/{max(committed)}" in resumed.stdout
  assert f"step {max(committed) + 1}/12" in resumed.stdout and f"step {max(committed)}/12" not in resumed.stdout

  a, b = _final_params(ref_dir, 12), _final_params(run_dir, 12)
  assert a.keys() == b.keys() and len(a) > 5
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
  # The run really moved away from its starting point (the comparison is not between two initialisations).
  start = _final_params(ref_dir, 8)
  assert max(float(np.abs(a[k] - start[k]).max()) for k in a) > 1e-3
  # Both wrote a loadable final model dir with the same parameters.
  m_ref = models.load_pretrained(str(ref_dir / "model"))
  m_run = models.load_pretrained(str(run_dir / "model"))
  assert m_ref.fingerprint() == m_run.fingerprint()
