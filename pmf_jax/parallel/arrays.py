"""Putting batches on the mesh: host arrays → ``jax.Array``s split over ("data", "fsdp") along the leading axis.

* :func:`shard_batch` — the caller holds the *global* batch (single process, or every process holds all of it).
* :func:`make_global_batch` — each process holds only its own slice of the global batch (what a per-host input
  pipeline yields); the slices are stitched into one global array with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from pmf_jax.errors import PMFInputError
from pmf_jax.parallel.rules import DEFAULT_RULES, ShardingRules, batch_sharding, path_to_str


def num_batch_shards(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many pieces the batch axis is cut into (data × fsdp for the default rules)."""
    axes = rules.mesh_axes_for("batch")
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return math.prod(mesh.shape[a] for a in axes)


def per_process_batch_size(global_batch_size: int, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> int:
    """The batch each process's input pipeline must yield for ``global_batch_size``.

    Raises:
      PMFInputError: when the global batch does not divide into the batch shards.
    """
    shards = num_batch_shards(mesh, rules)
    if global_batch_size % shards or global_batch_size % jax.process_count():
        raise PMFInputError(f"batch size {global_batch_size} must be divisible by the {shards} batch shards of the "
                            f"mesh {dict(mesh.shape)} and by the {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def _check_leading(name: str, x: Any, total: int, shards: int, what: str) -> None:
    if np.ndim(x) == 0:
        return
    if total % shards:
        raise PMFInputError(f"batch entry {name!r} has {what} {total} (shape {tuple(np.shape(x))}), not divisible by "
                            f"the {shards} batch shards of the mesh")


def shard_batch(tree: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Places a global batch on ``mesh``: every [B, ...] leaf split along B over the batch axes; scalars replicated.

    Args:
      tree: a pytree (usually a dict) of arrays whose leading axis is the global batch B.
    Returns:
      The same pytree of ``jax.Array``s with ``batch_sharding(mesh, ndim)``.
    Raises:
      PMFInputError: naming the entry whose B does not divide into the batch shards.
    """
    shards = num_batch_shards(mesh, rules)

    def put(path, x):
        _check_leading(path_to_str(path), x, np.shape(x)[0] if np.ndim(x) else 0, shards, "batch size")
        return jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules))

    return jax.tree_util.tree_map_with_path(put, tree)


def make_global_batch(local: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Stitches each process's slice of the batch into global arrays.

    Args:
      local: a pytree of host (numpy) arrays [B_local, ...], this process's consecutive slice of the global batch;
        B_local equal on every process. Scalars must be equal on every process.
      mesh: the mesh; the global batch is B_local × ``jax.process_count()``.
    Returns:
      A pytree of global ``jax.Array`` [B_local × processes, ...] with ``batch_sharding(mesh, ndim)``.
    Raises:
      PMFInputError: naming the entry whose global batch does not divide into the batch shards.
    """
    shards = num_batch_shards(mesh, rules)
    processes = jax.process_count()

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(batch_sharding(mesh, 0, rules), x, x.shape)
        _check_leading(path_to_str(path), x, x.shape[0] * processes, shards, "global batch size")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)

    return jax.tree_util.tree_map_with_path(put, local)
