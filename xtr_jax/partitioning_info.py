"""`python -m xtr_jax.partitioning_info`: prints the devices, the mesh and the rules table a gin config gives.

The quickest check that a launch sees the devices it expects before a long job starts:

    python -m xtr_jax.partitioning_info --gin.make_mesh.data=4 --gin.make_mesh.model=2
"""

from __future__ import annotations

import gin
import jax

from xtr_jax import distributed, gin_utils, partitioning


@gin.configurable
def partitioning_info(*, model_dir: str | None = None) -> partitioning.Partitioner:
  """Starts distributed JAX, builds the gin-configured mesh, prints it; writes config.gin when model_dir is set."""
  distributed.initialize()
  part = partitioning.Partitioner()
  print(f"jax {jax.__version__}; backend {jax.default_backend()}; processes {jax.process_count()}; "
        f"devices {jax.device_count()} ({jax.local_device_count()} local)")
  print(f"mesh {dict(part.mesh.shape)}; batch axes {part.batch_axes}; data-parallel size {part.data_parallel_size}")
  for logical, mesh_axes in part.rules:
    print(f"  {logical:>16} -> {mesh_axes}")
  if model_dir:
    print("operative config:", gin_utils.write_operative_config(model_dir))
  return part


if __name__ == "__main__":
  gin_utils.run(partitioning_info, allow_empty=True)
