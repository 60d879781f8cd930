"""The device mesh: axes ("data", "fsdp", "tensor") with sizes from the config's ``mesh`` section.

* ``data``   — pure data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   — the batch is split *and* every large parameter is sharded (gathered just before use).
* ``tensor`` — attention heads and MLP hidden units are split (Megatron style); the batch is not.

A size of ``-1`` (at most one axis) takes all the devices the other axes leave.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from pmf_jax.errors import PMFInputError

MESH_AXES: Tuple[str, str, str] = ("data", "fsdp", "tensor")
_NON_AXIS_KEYS = frozenset({"min_shard_size"})  # other fields of the config's `mesh` section


def _sizes_as_dict(sizes: Any) -> dict:
    """Accepts a mapping, a dataclass / object with data/fsdp/tensor attributes, or a 3-sequence."""
    if isinstance(sizes, Mapping):
        unknown = sorted(set(sizes) - set(MESH_AXES) - _NON_AXIS_KEYS)
        if unknown:
            raise PMFInputError(f"mesh sizes name unknown axes {unknown}; the axes are {list(MESH_AXES)}")
        return {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if isinstance(sizes, Sequence) and not isinstance(sizes, str):
        if len(sizes) != len(MESH_AXES):
            raise PMFInputError(f"mesh sizes {tuple(sizes)} must give one size per axis {MESH_AXES}")
        return dict(zip(MESH_AXES, sizes))
    if all(hasattr(sizes, axis) for axis in MESH_AXES):
        return {axis: getattr(sizes, axis) for axis in MESH_AXES}
    raise PMFInputError(f"mesh sizes {sizes!r}: expected a mapping or an object with fields {MESH_AXES}")


def resolve_mesh_shape(sizes: Any, num_devices: int) -> Tuple[int, int, int]:
    """Returns (data, fsdp, tensor) with a ``-1`` filled in; their product equals ``num_devices``.

    Raises:
      PMFInputError: naming the sizes, when a size is invalid, more than one is -1, or the product does not match.
    """
    named = _sizes_as_dict(sizes)
    shown = ", ".join(f"{k}={v}" for k, v in named.items())
    for axis, size in named.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise PMFInputError(f"mesh size {axis}={size!r} must be a positive integer or -1 (mesh: {shown})")
    fill = [axis for axis, size in named.items() if size == -1]
    if len(fill) > 1:
        raise PMFInputError(f"mesh ({shown}): only one axis may be -1, got {fill}")
    fixed = math.prod(int(size) for size in named.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise PMFInputError(f"mesh ({shown}): {num_devices} devices are not divisible by the fixed sizes' "
                                f"product {fixed}, so {fill[0]}=-1 cannot be filled")
        named[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise PMFInputError(f"mesh ({shown}) has {fixed} slots but there are {num_devices} devices; the product of "
                            f"the sizes must equal the device count (use -1 on one axis to fill)")
    return tuple(int(named[axis]) for axis in MESH_AXES)  # type: ignore[return-value]


def make_mesh(sizes: Any, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh.

    Args:
      sizes: the config's ``mesh`` section (fields data/fsdp/tensor), a dict with those keys (missing → 1), or a
        3-tuple. One size may be -1: it takes the remaining devices.
      devices: the devices to lay out (default ``jax.devices()``, all processes).
    Returns:
      A ``jax.sharding.Mesh`` with ``Auto`` axis types (XLA's sharding propagation fills in what the rules leave
      open), shape ``{"data": d, "fsdp": f, "tensor": t}``.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    try:
        # Lays the devices out along the physical interconnect (TPU torus / GPU NVLink islands) where it knows how.
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_axis_sizes(mesh_or_sizes: Any) -> dict:
    """{"data": d, "fsdp": f, "tensor": t} from a Mesh / AbstractMesh, or a copy of a mapping axis → size."""
    if isinstance(mesh_or_sizes, Mapping):
        return dict(mesh_or_sizes)
    if hasattr(mesh_or_sizes, "axis_names") and hasattr(mesh_or_sizes, "shape"):  # Mesh or AbstractMesh
        return dict(mesh_or_sizes.shape)
    raise TypeError(f"expected a Mesh or a mapping of axis sizes, got {type(mesh_or_sizes).__name__}")
