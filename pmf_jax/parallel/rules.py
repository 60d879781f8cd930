"""Partitioning rules: parameter path + shape → logical axis names → mesh axes → ``PartitionSpec``.

Layers never see a mesh. Two tables, both in :class:`ShardingRules`, decide everything:

1. ``param_roles``: regex on the parameter path (``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q/kernel``)
   → one *logical* name per dimension. Dense kernels are (in, out), conv kernels HWIO, embeddings (vocab, embed).
2. ``logical_axes``: logical name → mesh axis (or None). Tensor parallelism lives here: ``heads`` (the out dim of
   to_q/to_k/to_v, the in dim of to_out_0) and ``mlp`` (the hidden dim of the feed-forward) go to ``"tensor"``.

Then two shape rules apply to every parameter of every model, whatever its name:

* small parameters (fewer than ``min_shard_size`` elements) and all 0-/1-D ones (biases, norm scales) are replicated;
* FSDP: the largest dimension not already sharded whose size divides by the ``fsdp`` axis size goes to ``"fsdp"``.

A dimension that does not divide by its mesh axis size stays unsharded (the divisibility fallback), and mesh axes of
size 1 are left out of the specs, so a (N, 1, 1) mesh replicates all parameters (pure data parallelism).

All functions take concrete arrays or ``jax.ShapeDtypeStruct`` leaves alike (e.g. ``jax.eval_shape(model.init, ...)``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pmf_jax.parallel.mesh import mesh_axis_sizes

MeshAxes = Union[None, str, Tuple[str, ...]]

# to_k_ip/to_v_ip: IP-Adapter's image key/value projections in attn2, sharded exactly as to_k/to_v
_QKV = r"(to_q|to_k|to_v|to_k_ip|to_v_ip|q_proj|k_proj|v_proj)"
_OUT = r"(to_out_0|out_proj)"
_FF_IN = r"(ff/net_0/proj|mlp/fc1)"
_FF_OUT = r"(ff/net_2|mlp/fc2)"

# (path regex, logical name per dimension). The first pattern whose regex matches (re.search) *and* whose rank equals
# the parameter's rank wins; a parameter that matches none gets no logical names (FSDP may still shard it).
PARAM_ROLES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (rf"(^|/){_QKV}/kernel$", ("embed", "heads")),          # attention projections, UNet/VAE and CLIP: [D, H*Dh]
    (rf"(^|/){_OUT}/kernel$", ("heads", "embed")),          # attention output: [H*Dh, D]
    (rf"(^|/){_FF_IN}/kernel$", ("embed", "mlp")),          # GEGLU / CLIP fc1: [D, F]
    (rf"(^|/){_FF_OUT}/kernel$", ("mlp", "embed")),         # [F, D]
    (r"(^|/)embedding$", ("vocab", "embed")),               # nn.Embed tables: [V, D]
    (r"(^|/)kernel$", ("conv_height", "conv_width", "conv_in", "conv_out")),  # every nn.Conv: HWIO
    (r"(^|/)kernel$", ("embed_in", "embed_out")),           # every other nn.Dense: [in, out]
)

# Logical name → mesh axes. Names not listed map to None (unsharded unless FSDP picks that dimension).
LOGICAL_AXIS_RULES: Tuple[Tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),   # activations: the leading [B, ...] axis
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """The whole sharding policy. Replace a table with ``dataclasses.replace`` to change it (e.g. no tensor MLP:
    ``logical_axes=(("batch", ("data", "fsdp")), ("heads", "tensor"))``)."""

    param_roles: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = PARAM_ROLES
    logical_axes: Tuple[Tuple[str, MeshAxes], ...] = LOGICAL_AXIS_RULES
    fsdp_axis: Optional[str] = "fsdp"   # None turns the FSDP shape rule off
    min_shard_size: int = 2**14         # parameters with fewer elements are replicated

    def mesh_axes_for(self, logical: Optional[str]) -> MeshAxes:
        """The mesh axes a logical name maps to (None when unlisted)."""
        for name, axes in self.logical_axes:
            if name == logical:
                return axes
        return None


DEFAULT_RULES = ShardingRules()


def rules_from_config(mesh_config: Any) -> ShardingRules:
    """The default tables with the config's ``mesh.min_shard_size`` (a section object or a dict)."""
    size = mesh_config["min_shard_size"] if isinstance(mesh_config, dict) else mesh_config.min_shard_size
    return dataclasses.replace(DEFAULT_RULES, min_shard_size=int(size))


# ------------------------------------------------------------------------------------------------ paths and shapes

def path_to_str(path: Sequence[Any]) -> str:
    """A ``tree_flatten_with_path`` key path → ``"a/b/c"`` (dict keys, attribute names and list indices alike)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _shape(leaf: Any) -> Tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def _as_tuple(axes: MeshAxes) -> Tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


# ------------------------------------------------------------------------------------------------ parameters

def logical_axes(path: str, shape: Sequence[int], rules: ShardingRules = DEFAULT_RULES) -> Tuple[Optional[str], ...]:
    """Logical name per dimension of the parameter at ``path`` (``None`` for unnamed dimensions)."""
    for pattern, roles in rules.param_roles:
        if len(roles) == len(shape) and re.search(pattern, path):
            return tuple(roles)
    return (None,) * len(shape)


def param_spec(path: str, shape: Sequence[int], mesh_sizes: Any, rules: ShardingRules = DEFAULT_RULES) -> P:
    """The ``PartitionSpec`` of one parameter.

    Args:
      path: ``"a/b/kernel"`` (see :func:`path_to_str`).
      shape: the parameter's shape.
      mesh_sizes: a Mesh or a mapping axis → size.
    Returns:
      A spec with one entry per dimension (``P()`` for scalars).
    """
    sizes = mesh_axis_sizes(mesh_sizes)
    shape = tuple(int(d) for d in shape)
    spec: list = [None] * len(shape)
    if len(shape) <= 1 or math.prod(shape) < rules.min_shard_size:
        return P(*spec)
    used: set = set()
    # Tensor (and any other table-driven) sharding first: it is tied to the layer's meaning.
    for dim, logical in enumerate(logical_axes(path, shape, rules)):
        axes = tuple(a for a in _as_tuple(rules.mesh_axes_for(logical)) if a in sizes and sizes[a] > 1)
        if not axes or used & set(axes) or shape[dim] % math.prod(sizes[a] for a in axes):
            continue
        spec[dim] = axes[0] if len(axes) == 1 else axes
        used.update(axes)
    # FSDP: the largest still-free dimension that divides (first one on ties).
    fsdp = rules.fsdp_axis
    if fsdp and sizes.get(fsdp, 1) > 1 and fsdp not in used:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % sizes[fsdp] == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = fsdp
    return P(*spec)


def param_partition_specs(params: Any, mesh_sizes: Any, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """``param_spec`` over a parameter pytree (arrays or ShapeDtypeStructs) → a pytree of ``PartitionSpec``."""
    sizes = mesh_axis_sizes(mesh_sizes)
    return jax.tree_util.tree_map_with_path(lambda p, x: param_spec(path_to_str(p), _shape(x), sizes, rules), params)


def param_shardings(params: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """A pytree of ``NamedSharding`` for ``params`` (usable as ``out_shardings`` of a jitted init)."""
    specs = param_partition_specs(params, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def mirrored_partition_specs(tree: Any, params: Any, param_specs: Any) -> Any:
    """Specs for a tree that mirrors the params (an optax state, EMA params, a whole train state).

    A leaf whose key path *ends with* a parameter's path and whose shape equals that parameter's shape gets the
    parameter's spec (optax's ``mu``/``nu``/trace leaves sit at ``.../mu/<param path>``); every other leaf (step
    counts, scalars, schedule state) gets ``P()`` (replicated).

    Args:
      tree: e.g. ``jax.eval_shape(optimizer.init, abstract_params)``.
      params: the parameter tree (arrays or ShapeDtypeStructs) the specs belong to.
      param_specs: a ``PartitionSpec`` per leaf of ``params`` (e.g. :func:`param_partition_specs`).
    """
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda s: isinstance(s, P))
    if len(flat_params) != len(flat_specs):
        raise ValueError(f"params have {len(flat_params)} leaves but the specs {len(flat_specs)}")
    table = {tuple(path_to_str(path).split("/")): (_shape(leaf), spec)
             for (path, leaf), spec in zip(flat_params, flat_specs)}
    lengths = sorted({len(k) for k in table}, reverse=True)

    def pick(path, leaf):
        parts = tuple(path_to_str(path).split("/"))
        for n in lengths:  # the longest matching suffix wins
            hit = table.get(parts[-n:]) if len(parts) >= n else None
            if hit is not None and hit[0] == _shape(leaf):
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(pick, tree)


def opt_state_shardings(opt_state: Any, params: Any, param_shardings_tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding``s for an optax state (or any params-mirroring tree) from the params' shardings; see
    :func:`mirrored_partition_specs`. ``param_shardings_tree`` holds ``NamedSharding``s (or ``PartitionSpec``s)."""
    specs = jax.tree.map(lambda s: s.spec if isinstance(s, NamedSharding) else s, param_shardings_tree,
                         is_leaf=lambda s: isinstance(s, (NamedSharding, P)))
    mirrored = mirrored_partition_specs(opt_state, params, specs)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), mirrored, is_leaf=lambda s: isinstance(s, P))


# ------------------------------------------------------------------------------------------------ activations

def logical_spec(names: Sequence[Optional[str]], rules: ShardingRules = DEFAULT_RULES) -> P:
    """Logical names of an activation's axes, e.g. ``("batch", None, None)`` → ``P(("data", "fsdp"), None, None)``."""
    return P(*(rules.mesh_axes_for(n) for n in names))


def batch_spec(ndim: Optional[int] = None, rules: ShardingRules = DEFAULT_RULES) -> P:
    """``P(("data", "fsdp"), None, ...)`` for a [B, ...] array of rank ``ndim``.

    With ``ndim=None`` the spec has one entry, which JAX pads with ``None`` for any rank ≥ 1 — handy as a pytree
    prefix for a whole batch dict. ``ndim=0`` (scalars) gives the replicated ``P()``.
    """
    if ndim == 0:
        return P()
    return logical_spec(("batch",) + (None,) * ((ndim or 1) - 1), rules)


def batch_sharding(mesh: Mesh, ndim: Optional[int] = None, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """``NamedSharding`` splitting the leading axis over ("data", "fsdp"); see :func:`batch_spec`."""
    return NamedSharding(mesh, batch_spec(ndim, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def with_logical_constraint(x: jax.Array, names: Sequence[Optional[str]],
                            rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """Pins an activation's sharding by logical names inside a model; a no-op when no mesh is set.

    Layers call this (e.g. on the reference bank's [B, L, C] hidden states with ``("batch", None, None)``) without
    knowing the mesh; the mesh comes from ``jax.set_mesh(mesh)`` around the call (:func:`jit_sharded` sets it).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_spec(names, rules)
    # Drop axes this mesh lacks, so a model traced under a smaller mesh (e.g. no "tensor") still works.
    keep = set(mesh.axis_names)
    spec = P(*(None if a is None else (tuple(b for b in _as_tuple(a) if b in keep) or None) for a in spec))
    return jax.lax.with_sharding_constraint(x, spec)
