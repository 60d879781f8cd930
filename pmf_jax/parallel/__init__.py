"""Sharding: the ("data", "fsdp", "tensor") mesh, partitioning rules, batch placement, sharded jit."""

from pmf_jax.parallel.arrays import make_global_batch, num_batch_shards, per_process_batch_size, shard_batch
from pmf_jax.parallel.hlo import collective_counts, param_piece_shapes, unexpected_all_gathers
from pmf_jax.parallel.mesh import MESH_AXES, make_mesh, mesh_axis_sizes, resolve_mesh_shape
from pmf_jax.parallel.rules import (DEFAULT_RULES, LOGICAL_AXIS_RULES, PARAM_ROLES, ShardingRules, batch_sharding,
                                    batch_spec, logical_axes, logical_spec, mirrored_partition_specs,
                                    opt_state_shardings, param_partition_specs, param_shardings, param_spec,
                                    replicated, rules_from_config, with_logical_constraint)
from pmf_jax.parallel.sharded_step import init_sharded, jit_sharded, resolve_shardings, shard_params

__all__ = [
    "DEFAULT_RULES", "LOGICAL_AXIS_RULES", "MESH_AXES", "PARAM_ROLES", "ShardingRules", "batch_sharding", "batch_spec",
    "collective_counts", "init_sharded", "jit_sharded", "logical_axes", "logical_spec", "make_global_batch",
    "make_mesh", "mesh_axis_sizes", "mirrored_partition_specs", "num_batch_shards", "opt_state_shardings",
    "param_partition_specs", "param_piece_shapes", "param_shardings", "param_spec", "per_process_batch_size",
    "replicated", "resolve_mesh_shape", "resolve_shardings", "rules_from_config", "shard_batch", "shard_params",
    "unexpected_all_gathers", "with_logical_constraint",
]
