"""Cluster discovery of distributed.initialize (the multi-process run itself is exercised by the trainer tests)."""

from xtr_jax import distributed


def test_xtr_env():
  env = {"XTR_COORDINATOR_ADDRESS": "10.0.0.1:1234", "XTR_NUM_PROCESSES": "4", "XTR_PROCESS_ID": "2"}
  assert distributed.cluster_env(env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                          "process_id": 2}


def test_slurm_env():
  env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_JOB_NODELIST": "gpu[003-006,9],cpu1"}
  assert distributed.cluster_env(env) == {"coordinator_address": "gpu003:12345", "num_processes": 16,
                                          "process_id": 3}
  assert distributed._slurm_first_host("node7") == "node7"


def test_no_cluster():
  assert distributed.cluster_env({}) is None
