"""The one place that starts multi-process JAX (`jax.distributed.initialize`); nothing else calls it.

TPU pods: no arguments (the TPU runtime knows the topology). GPU/CPU: the coordinator address, process count and
process index come from arguments, from `XTR_COORDINATOR_ADDRESS` / `XTR_NUM_PROCESSES` / `XTR_PROCESS_ID`, or from
SLURM (`SLURM_NTASKS`, `SLURM_PROCID`, first host of `SLURM_JOB_NODELIST`).
"""

from __future__ import annotations

import logging
import os
import re

import jax

_INITIALIZED = False
DEFAULT_PORT = 12345


def _slurm_first_host(nodelist: str) -> str:
  """First host of a SLURM nodelist such as `gpu[003-005,9],cpu1` -> `gpu003`."""
  m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
  if not m:
    raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
  prefix, _, ranges = m.groups()
  if not ranges:
    return prefix
  return prefix + ranges.split(",")[0].split("-")[0]


def cluster_env(environ: dict[str, str] | None = None) -> dict[str, object] | None:
  """Coordinator address / process count / process id from XTR_* or SLURM variables; None if neither is set."""
  env = os.environ if environ is None else environ
  if "XTR_COORDINATOR_ADDRESS" in env:
    return {"coordinator_address": env["XTR_COORDINATOR_ADDRESS"],
            "num_processes": int(env.get("XTR_NUM_PROCESSES", "1")),
            "process_id": int(env.get("XTR_PROCESS_ID", "0"))}
  if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and "SLURM_JOB_NODELIST" in env:
    port = env.get("XTR_COORDINATOR_PORT", str(DEFAULT_PORT))
    return {"coordinator_address": f"{_slurm_first_host(env['SLURM_JOB_NODELIST'])}:{port}",
            "num_processes": int(env["SLURM_NTASKS"]),
            "process_id": int(env["SLURM_PROCID"])}
  return None


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, backend: str | None = None,
               local_device_ids: list[int] | None = None) -> None:
  """Starts jax.distributed once, aware of the backend. Single-process runs with no cluster info are a no-op.

  Args:
    coordinator_address: `host:port` of process 0 (GPU/CPU); None = from env vars / SLURM.
    num_processes, process_id: as for jax.distributed.initialize; None = from env vars / SLURM.
    backend: 'tpu', 'gpu' or 'cpu'; None = read the JAX_PLATFORMS env var, else auto. On CPU, cross-process
      collectives use gloo.
  """
  global _INITIALIZED
  if _INITIALIZED:
    return
  backend = (backend or os.environ.get("JAX_PLATFORMS", "").split(",")[0] or "").lower() or None
  if coordinator_address is None and num_processes is None and process_id is None:
    found = cluster_env()
    if found is not None:
      coordinator_address = found["coordinator_address"]
      num_processes = found["num_processes"]
      process_id = found["process_id"]
  if backend == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if backend == "tpu" and coordinator_address is None:
    logging.info("jax.distributed.initialize() with TPU auto-detection")
    jax.distributed.initialize()
  elif coordinator_address is None:
    logging.info("no coordinator given: single-process run")
    _INITIALIZED = True
    return
  else:
    logging.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
                 coordinator_address, num_processes, process_id)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
  _INITIALIZED = True


def is_coordinator() -> bool:
  """True on process 0, the one that writes metrics and logs."""
  return jax.process_index() == 0
