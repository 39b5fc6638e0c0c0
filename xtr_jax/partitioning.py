"""Device meshes, the one logical-axis rules table, and shardings for parameter trees and batches.

Mesh axes are `data` (pure data parallelism), `fsdp` (data parallelism with parameters sharded along `embed`) and
`model` (tensor parallelism). Parameters carry Flax logical axis names (`nn.with_logical_partitioning`); the
`LOGICAL_AXIS_RULES` table below is the only place that maps them to mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
# Batch dimensions are split over every data-parallel axis (pure data and FSDP), as MaxText does.
BATCH_AXES = ("data", "fsdp")

# The t5x standard rules plus the XTR token projection. Order matters: the first rule whose mesh axis is still free
# for a given array wins (flax.linen.logical_to_mesh_axes semantics).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("embed", "fsdp"),
    ("proj", None),  # XTR token head output (128-d): small, replicated
    ("relpos_buckets", None),
    ("length", None),
    ("layers", None),  # the stacked axis of nn.scan'd layers
    ("abspos_buckets", None),
    ("type_vocab", None),
)


def _fill_sizes(sizes: Sequence[int], num_devices: int, names: Sequence[str]) -> list[int]:
  sizes = list(sizes)
  if sum(1 for s in sizes if s == -1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(names, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh sizes {dict(zip(names, sizes))} cannot fill {num_devices} devices "
                       f"({num_devices} is not divisible by {known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh sizes {dict(zip(names, sizes))} multiply to {math.prod(sizes)}, "
                     f"but there are {num_devices} devices")
  return sizes


def _granule_mesh(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """Hybrid layout without TPU slice metadata: consecutive devices (by process, then id) form one granule.

  Granule g holds an ICI sub-mesh of shape `ici`; granules are tiled along each axis by `dcn`, so an axis of size
  dcn[a] * ici[a] crosses granules (slow links) only at its outer level.
  """
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  nd = len(ici)
  arr = np.asarray(ordered, dtype=object).reshape(*dcn, *ici)
  arr = arr.transpose([i for a in range(nd) for i in (a, nd + a)])
  return arr.reshape([dcn[a] * ici[a] for a in range(nd)])


@gin.configurable
def make_mesh(*, data: int = -1, fsdp: int = 1, model: int = 1, dcn_data: int = 1, dcn_fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` with axes (data, fsdp, model); one size may be -1 (= fill the remaining devices).

  `data`/`fsdp`/`model` are sizes within a slice (ICI). For multi-slice TPU or multi-node GPU jobs, `dcn_data` and
  `dcn_fsdp` give how many slices/nodes the data and fsdp axes additionally span; the layout keeps the `model` axis
  (and ICI-local parts) on fast interconnect, as `mesh_utils.create_hybrid_device_mesh` does.

  Raises:
    ValueError: naming the sizes and the device count when they do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  dcn = [dcn_data, dcn_fsdp, 1]
  if any(d < 1 for d in dcn):
    raise ValueError(f"dcn sizes must be >= 1, got dcn_data={dcn_data}, dcn_fsdp={dcn_fsdp}")
  num_dcn = math.prod(dcn)
  if n % num_dcn:
    raise ValueError(f"{n} devices cannot be split into {num_dcn} slices (dcn_data={dcn_data}, dcn_fsdp={dcn_fsdp})")
  ici = _fill_sizes([data, fsdp, model], n // num_dcn, MESH_AXES)
  if num_dcn > 1:
    if all(hasattr(d, "slice_index") for d in devices):
      device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
      device_array = _granule_mesh(ici, dcn, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):
      # Physical-topology-aware placement is unavailable (e.g. forced host devices): plain row-major layout.
      device_array = np.asarray(devices).reshape(ici)
  return Mesh(device_array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for one array's logical axis names under `rules`."""
  if logical_axes is None:
    return P()
  return nn.logical_to_mesh_axes(tuple(logical_axes), rules)


def logical_shardings(logical_specs: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """Maps a tree of logical PartitionSpecs (from `nn.get_partition_spec`) to a tree of NamedShardings."""
  mesh_specs = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
  return mesh_specs


def params_logical_specs(boxed_variables: Any) -> Any:
  """Tree of logical PartitionSpecs of a (possibly abstract) variable tree with `nn.Partitioned` leaves.

  Leaves without annotation get `P()` (replicated).
  """
  return nn.get_partition_spec(boxed_variables)


def params_shardings(boxed_variables: Any, mesh: Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a variable tree whose leaves carry Flax logical annotations."""
  return logical_shardings(params_logical_specs(boxed_variables), mesh, rules)


def batch_spec(ndim: int, batch_axes: Sequence[str] = BATCH_AXES) -> P:
  """PartitionSpec splitting the leading (batch) dimension over the data-parallel axes."""
  return P(tuple(batch_axes), *([None] * (ndim - 1)))


def data_parallel_size(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> int:
  """Number of shards the batch dimension is split into."""
  return math.prod(mesh.shape[a] for a in batch_axes)


@gin.configurable
class Partitioner:
  """Holds the mesh and the rules; everything that needs a sharding asks it.

  Attributes:
    mesh: the device mesh (axes `data`, `fsdp`, `model`).
    rules: the logical-axis rules table.
  """

  def __init__(self, *, mesh: Mesh | None = None, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
               batch_axes: Sequence[str] = BATCH_AXES):
    self.mesh = make_mesh() if mesh is None else mesh
    self.rules = tuple(rules)
    self.batch_axes = tuple(batch_axes)

  @property
  def data_parallel_size(self) -> int:
    return data_parallel_size(self.mesh, self.batch_axes)

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, batch_spec(ndim, self.batch_axes))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def params_shardings(self, boxed_variables: Any) -> Any:
    return params_shardings(boxed_variables, self.mesh, self.rules)

  def check_batch_size(self, global_batch_size: int) -> None:
    """ValueError naming both numbers when the batch does not split evenly over the data axes."""
    n = self.data_parallel_size
    if global_batch_size % n:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the data-parallel size {n} "
                       f"(mesh axes {self.batch_axes} of {dict(self.mesh.shape)})")

  def __repr__(self) -> str:
    return f"Partitioner(mesh={dict(self.mesh.shape)}, batch_axes={self.batch_axes})"
