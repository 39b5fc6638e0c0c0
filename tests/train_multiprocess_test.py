"""The multi-host path: two processes on localhost, started through `distributed.initialize()` (gloo CPU collectives,
4 simulated devices each, each reading only its data shard) train the tiny config and end with the same parameters as
one process with 8 devices fed the same global batches."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import optax

from xtr_jax import checkpointing, gin_utils, train
from xtr_jax.data import input_pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 4

GIN = """
include 'experiments/xtr_tiny_squad.gin'
VOCAB_PATH = '{vocab}'
SQUAD_PAIRS = '{pairs}'
TRAIN_STEPS = {steps}
BATCH_SIZE = 16
QUERY_MAX_LEN = 8
DOC_MAX_LEN = 24
WARMUP_STEPS = 1
train.log_period = 1
CheckpointConfig.period = 100
make_mesh.data = 4
make_mesh.model = 2
# Gloo sums gradients across processes in another order than the in-process all-reduce (float rounding ~1e-7).
# Adam with eps 1e-8 turns such noise on near-zero gradients (rarely seen vocabulary rows) into full +-lr steps;
# eps 1e-3 keeps the update a smooth function of the gradient, so the comparison tests the multi-host plumbing.
xtr_optimizer.eps = 1e-3
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ConcatShards:
  """The global batch a 2-process job sees: process 0's rows then process 1's (`make_array_from_process_local_data`
  places process p's rows at the devices it owns, which are the p-th half of the data axis)."""

  def __init__(self, shards):
    self.shards = shards

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(s) for s in self.shards]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"shards": [s.get_state() for s in self.shards]}

  def set_state(self, state):
    for s, st in zip(self.shards, state["shards"]):
      s.set_state(st)


def test_two_processes_match_one_process_with_eight_devices(tmp_path, data_dir):
  gin_file = tmp_path / "tiny.gin"
  gin_file.write_text(GIN.format(vocab=data_dir / "vocab" / "t5_spiece.model",
                                 pairs=data_dir / "train" / "squad-v1.1-dev-pairs.jsonl", steps=STEPS))
  multi_dir = tmp_path / "two_processes"
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               XTR_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", XTR_NUM_PROCESSES="2", XTR_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "xtr_jax.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{multi_dir}'"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
  outputs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
    outputs.append((p.returncode, out, err))
  for i, (rc, out, err) in enumerate(outputs):
    assert rc == 0, f"process {i} failed:\n{err[-4000:]}"
  # Process 0 reports and sees the whole 2-process, 8-device job; process 1 stays quiet.
  assert "2 processes, 8 devices" in outputs[0][1] and f"step {STEPS}/{STEPS}" in outputs[0][1]
  assert "[train]" not in outputs[1][1]

  # Reference: one process, 8 devices, same mesh, fed the concatenation of the two processes' shards.
  ref_dir = tmp_path / "one_process"
  gin_utils.parse_gin([str(gin_file)], [f"MODEL_DIR = '{ref_dir}'"])
  assert jax.device_count() == 8 and jax.process_count() == 1
  shards = [input_pipeline.TrainInput(process_index=i, process_count=2) for i in range(2)]
  state = train.train(train_data=ConcatShards(shards), export=False)
  want = {k: np.asarray(v) for k, v in checkpointing.flatten_with_names(jax.device_get(state.params)).items()}

  got = checkpointing.load_source_tree(str(multi_dir / "checkpoints" / str(STEPS)))
  got = {k[len("params/"):]: v for k, v in got.items() if k.startswith("params/")}
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)
  # Training moved the parameters (the comparison is not between two initialisations).
  from xtr_jax import models, partitioning, trainer  # pylint: disable=g-import-not-at-top
  fresh = trainer.Trainer(model=models.XTRModel(), partitioner=partitioning.Partitioner(), optimizer=optax.sgd(0.0))
  start = checkpointing.flatten_with_names(jax.device_get(
      fresh.init_state(jax.random.split(jax.random.PRNGKey(0))[0]).params))
  assert max(float(np.abs(want[k] - start[k]).max()) for k in want) > 1e-3
  # The exported model dir of the 2-process job holds the same parameters (gathered across processes).
  exported = models.flatten_params(models.load_pretrained(str(multi_dir / "model")).params)
  for k in want:
    np.testing.assert_allclose(exported[k], want[k], rtol=0, atol=1e-6, err_msg=k)
