"""Placing parameters and compiling functions with shardings from the rules.

The fixed init pattern (STYLE.md): ``jax.eval_shape(init)`` → :func:`~pmf_jax.parallel.rules.param_shardings` →
``jax.jit(init, out_shardings=...)`` — :func:`init_sharded` does exactly that, so full-size parameters never exist
unsharded on one device. :func:`jit_sharded` compiles a forward / loss-and-grad / train step with explicit in/out
shardings, written with the words ``"batch"`` and ``"replicated"`` where a sharding tree would be tedious::

    params = init_sharded(model.init, mesh, rng, x)                      # placed by the rules
    p_sh = jax.tree.map(lambda a: a.sharding, params)
    fwd = jit_sharded(model.apply, mesh, in_shardings=(p_sh, "batch"), out_shardings="batch")
    grad = jit_sharded(jax.value_and_grad(loss), mesh, (p_sh, "batch"), ("replicated", p_sh))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Union

import jax
from jax.sharding import Mesh

from pmf_jax.parallel.rules import DEFAULT_RULES, ShardingRules, batch_sharding, param_shardings, replicated

ShardingLike = Union[str, None, Any]


def shard_params(params: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Places an existing parameter tree (host or single-device arrays) on ``mesh`` by the rules.

    Every process must hold the same full ``params`` (e.g. all loaded from the same checkpoint). Read the shardings
    back with ``jax.tree.map(lambda a: a.sharding, placed)``.
    """
    return jax.device_put(params, param_shardings(params, mesh, rules))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args: Any, rules: ShardingRules = DEFAULT_RULES,
                 **kwargs: Any) -> Any:
    """Runs ``init_fn(*args, **kwargs)`` under jit with its outputs sharded by the rules.

    Args:
      init_fn: e.g. ``model.init`` (returns ``{"params": ...}``) or a function returning a train state; every
        output leaf is treated as a parameter (step counters and other scalars end up replicated by the size rule).
      args: traced inputs (rng keys, dummy input arrays).
      kwargs: static inputs (Python values), bound with ``functools.partial``.
    Returns:
      The initialized tree, each leaf a ``jax.Array`` already laid out on ``mesh``.
    """
    fn = functools.partial(init_fn, **kwargs)
    abstract = jax.eval_shape(fn, *args)
    return jax.jit(fn, out_shardings=param_shardings(abstract, mesh, rules))(*args)


def resolve_shardings(spec: ShardingLike, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """Turns the words of :func:`jit_sharded` into shardings: ``"batch"`` → leading axis over the batch axes (a
    pytree prefix for any tree of rank ≥ 1 arrays), ``"replicated"`` → ``P()``; a tuple/list is resolved per entry;
    anything else (a sharding, a pytree of shardings, None) is returned unchanged."""
    if isinstance(spec, str):
        if spec == "batch":
            return batch_sharding(mesh, None, rules)
        if spec == "replicated":
            return replicated(mesh)
        raise ValueError(f"unknown sharding word {spec!r}; use 'batch', 'replicated' or a sharding pytree")
    if isinstance(spec, (tuple, list)) and not hasattr(spec, "_fields"):
        return tuple(resolve_shardings(s, mesh, rules) for s in spec)
    return spec


def jit_sharded(fn: Callable[..., Any], mesh: Mesh, in_shardings: Sequence[ShardingLike],
                out_shardings: ShardingLike, *, static_argnums: Sequence[int] = (),
                donate_argnums: Sequence[int] = (), rules: ShardingRules = DEFAULT_RULES) -> Any:
    """``jax.jit(fn)`` with explicit shardings, traced with ``mesh`` as the abstract mesh.

    Args:
      fn: ``fn(params, batch, ...)`` — any pure function.
      in_shardings: one entry per positional (non-static) argument: a pytree (prefix) of shardings, ``"batch"``,
        ``"replicated"``, or None (keep the argument's own sharding).
      out_shardings: the same words for the output; a tuple for a tuple output (e.g. ``("replicated", p_sh)`` for
        ``value_and_grad``).
      static_argnums, donate_argnums: as for ``jax.jit`` (donate the train state: ``(0,)``).
    Returns:
      The ``jax.jit`` object (call it, or ``.lower(...).compile()`` for ahead-of-time compilation and
      ``memory_analysis()``). Inside ``fn``, :func:`~pmf_jax.parallel.rules.with_logical_constraint` sees the mesh.
    """

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return jax.jit(traced, in_shardings=resolve_shardings(tuple(in_shardings), mesh, rules),
                   out_shardings=resolve_shardings(out_shardings, mesh, rules),
                   static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums))
