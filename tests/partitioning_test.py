"""Meshes, the logical rules table and NamedSharding on 8 simulated CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xtr_jax import partitioning


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"data": 8, "fsdp": 1, "model": 1}, (8, 1, 1)),
    ({"data": 4, "model": 2}, (4, 1, 2)),
    ({"data": -1, "model": 2}, (4, 1, 2)),
    ({"data": 2, "fsdp": 2, "model": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": -1, "model": 2}, (1, 4, 2)),
])
def test_mesh_shapes(sizes, expected):
  mesh = partitioning.make_mesh(**sizes)
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert tuple(mesh.devices.shape) == expected
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_hybrid_mesh_for_multislice():
  # 2 "slices" of 4 devices each; data spans the slices.
  mesh = partitioning.make_mesh(data=2, model=2, dcn_data=2)
  assert tuple(mesh.devices.shape) == (4, 1, 2)
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, 0, :]
  # Rows 0-1 (the first slice) hold devices 0-3, rows 2-3 hold devices 4-7: `model` never crosses a slice.
  np.testing.assert_array_equal(ids, [[0, 1], [2, 3], [4, 5], [6, 7]])
  with pytest.raises(ValueError, match="3 slices"):
    partitioning.make_mesh(data=-1, dcn_data=3)


@pytest.mark.parametrize("sizes", [{"data": 3}, {"data": 4, "model": 4}, {"data": -1, "model": 3}])
def test_bad_mesh_sizes(sizes):
  with pytest.raises(ValueError, match="8"):
    partitioning.make_mesh(**sizes)
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    partitioning.make_mesh(data=-1, model=-1)


class _Tiny(nn.Module):
  """A small annotated module: embedding (vocab, embed), mlp (embed, mlp), out (mlp, embed), head (embed, proj)."""

  @nn.compact
  def __call__(self, ids):
    emb = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(), ("vocab", "embed")),
                     (16, 8))
    x = emb[ids]
    x = nn.Dense(32, use_bias=False, name="wi",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
    x = nn.relu(x)
    x = nn.Dense(8, use_bias=False, name="wo",
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")))(x)
    return nn.Dense(4, use_bias=False, name="head",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "proj")))(x)


def test_rules_give_expected_partition_specs():
  abstract = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((2, 3), jnp.int32))
  logical = partitioning.params_logical_specs(abstract)["params"]
  assert logical["embedding"] == P("vocab", "embed")
  mesh = partitioning.make_mesh(data=2, fsdp=2, model=2)
  shardings = partitioning.params_shardings(abstract, mesh)["params"]
  assert shardings["embedding"].spec == P("model", "fsdp")
  assert shardings["wi"]["kernel"].spec == P("fsdp", "model")
  assert shardings["wo"]["kernel"].spec == P("model", "fsdp")
  assert shardings["head"]["kernel"].spec == P("fsdp", None)
  assert partitioning.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, "fsdp") or \
      partitioning.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)


@pytest.mark.parametrize("sizes", [{"data": 8}, {"data": 4, "model": 2}, {"data": 2, "fsdp": 2, "model": 2}])
def test_jit_with_named_shardings_matches_unsharded(sizes):
  mesh = partitioning.make_mesh(**sizes)
  module = _Tiny()
  ids = jax.random.randint(jax.random.key(1), (8, 5), 0, 16)
  boxed = module.init(jax.random.key(0), ids)
  params = nn.unbox(boxed)
  expected = module.apply(params, ids)

  param_sh = partitioning.params_shardings(jax.eval_shape(module.init, jax.random.key(0), ids), mesh)
  batch_sh = NamedSharding(mesh, partitioning.batch_spec(2))
  out_sh = NamedSharding(mesh, partitioning.batch_spec(3))
  sharded_params = jax.device_put(params, param_sh)
  sharded_ids = jax.device_put(ids, batch_sh)
  fn = jax.jit(module.apply, in_shardings=(param_sh, batch_sh), out_shardings=out_sh)
  got = fn(sharded_params, sharded_ids)
  assert got.sharding.spec == out_sh.spec
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6)
  wi = sharded_params["params"]["wi"]["kernel"]
  # Each device holds exactly its shard of the (embed, mlp) kernel.
  shard_shape = wi.addressable_shards[0].data.shape
  assert shard_shape == (8 // mesh.shape["fsdp"], 32 // mesh.shape["model"])


def test_partitioner_batch_checks():
  part = partitioning.Partitioner(mesh=partitioning.make_mesh(data=2, fsdp=2, model=2))
  assert part.data_parallel_size == 4
  part.check_batch_size(8)
  with pytest.raises(ValueError, match=r"10 is not divisible by the data-parallel size 4"):
    part.check_batch_size(12 - 2)  # 10 is not divisible by 4
  assert part.batch_sharding(3).spec == P(("data", "fsdp"), None, None)
