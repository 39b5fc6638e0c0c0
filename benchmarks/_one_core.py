"""One thread for every numerical library a timing script uses (BLAS, OpenMP / FAISS, XLA).

They read these settings when first imported, so a script calls `single_thread_env()` before importing numpy, jax or
faiss (and only when run as a script: another benchmark importing it keeps its own threads).
"""

import os


def single_thread_env() -> None:
  for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pin_to_one_core() -> None:
  """Run the rest of this process on one CPU core (the lowest-numbered it may use)."""
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
