"""Ahead-of-time compilation of a run's programs for a mesh, from shapes alone (no arrays exist).

* :func:`compile_train_step` — :func:`pmf_jax.training.state.train_step` jitted exactly as ``train/loop.py`` does it:
  state shardings from the rules (:func:`~pmf_jax.training.state.state_shardings`), frozen UNet-like parts by the
  same rules, the autoencoder and the text context replicated, the batch split over ("data", "fsdp"),
  :func:`~pmf_jax.parallel.jit_sharded` with the state donated.
* :func:`compile_sampling_step` — one denoising step of :class:`pmf_jax.pipelines.RetargetPipeline` (its ``loop``
  program run over one step, as the pipeline runs it with a progress bar) with classifier-free guidance rows,
  and the pipeline's prologue (reference latents) and epilogue (VAE decode). The pipeline is data parallel: the
  batch is split over every device of the mesh, the parameters replicated.

The devices are whatever JAX has — on a CPU host, ``--xla_force_host_platform_device_count`` virtual devices (the
compiled program is the per-device SPMD program; it is never run here).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pmf_jax.errors import PMFInputError
from pmf_jax.parallel import (batch_sharding, jit_sharded, make_mesh, num_batch_shards, param_shardings, replicated,
                              rules_from_config)
from pmf_jax.scaling.abstract import AbstractRun, abstract_batch, per_device_bytes
from pmf_jax.training.state import bind_step, state_shardings


@dataclasses.dataclass
class CompiledProgram:
    """One compiled program and what the report needs of it.

    ``state_bytes``: per-device bytes of what the program keeps between steps, by kind (params, opt_state, ema,
    frozen, ...), from the argument shardings. ``batch_per_device``: examples per data-parallel shard.
    ``repeats``: how many times the program runs per unit of work (denoising steps for the sampling loop)."""

    name: str
    compiled: Any
    mesh_shape: Dict[str, int]
    devices: int
    global_batch: int
    batch_per_device: int
    state_bytes: Dict[str, int]
    lower_s: float
    compile_s: float
    repeats: int = 1
    args: Optional[tuple] = None  # the abstract arguments (for --measure)

    @property
    def hlo_text(self) -> str:
        return self.compiled.as_text()


def mesh_for(sizes: Dict[str, int], devices: Optional[Sequence[jax.Device]] = None):
    """``make_mesh`` over the first data×fsdp×tensor devices (all devices when ``devices`` is None)."""
    n = int(np.prod([sizes.get(a, 1) for a in ("data", "fsdp", "tensor")]))
    available = list(jax.devices() if devices is None else devices)
    if n > len(available):
        raise PMFInputError(f"mesh {sizes} needs {n} devices; this process has {len(available)}")
    return make_mesh(sizes, devices=available[:n])


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _timed_compile(jitted, *args):
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - lowered_at


def compile_train_step(run: AbstractRun, mesh, batch_per_device: int) -> CompiledProgram:
    """The real train step for ``mesh`` with ``batch_per_device`` examples per batch shard (data × fsdp)."""
    cfg = run.cfg
    rules = rules_from_config(cfg.mesh)
    shards = num_batch_shards(mesh, rules)
    global_batch = batch_per_device * shards
    state_sh = state_shardings(run.state, mesh, rules)
    frozen_params_sh = param_shardings(run.frozen_params, mesh, rules)
    frozen_sh = jax.tree.map(lambda _: replicated(mesh), run.frozen)
    batch_sh = batch_sharding(mesh, None, rules)
    step_fn = bind_step(run.components, run.tx, cfg.train, run.reference_cfg)
    jitted = jit_sharded(step_fn, mesh, (state_sh, frozen_params_sh, frozen_sh, batch_sh), (state_sh, "replicated"),
                         donate_argnums=(0,), rules=rules)
    batch = abstract_batch(cfg, global_batch)
    args = (run.state, run.frozen_params, run.frozen, batch)
    compiled, lower_s, compile_s = _timed_compile(jitted, *args)
    state = run.state
    opt_sh = state_sh.opt_state
    state_bytes = {
        "params": per_device_bytes(state.params, state_sh.params),
        "opt_state": per_device_bytes(state.opt_state, opt_sh),
        "ema": 0 if state.ema_params is None else per_device_bytes(state.ema_params, state_sh.ema_params),
        "frozen_params": per_device_bytes(run.frozen_params, frozen_params_sh),
        "frozen_other": per_device_bytes(run.frozen, frozen_sh),
    }
    sharded_args = (_with_shardings(state, state_sh), _with_shardings(run.frozen_params, frozen_params_sh),
                    _with_shardings(run.frozen, frozen_sh),
                    _with_shardings(batch, jax.tree.map(lambda x: batch_sharding(mesh, x.ndim, rules), batch)))
    return CompiledProgram("train_step", compiled, dict(mesh.shape), mesh.size, global_batch, batch_per_device,
                           state_bytes, lower_s, compile_s, args=sharded_args)


# ------------------------------------------------------------------------------------------------ sampling

def retarget_pipeline(run: AbstractRun):
    """The run's :class:`~pmf_jax.pipelines.RetargetPipeline` over its abstract parts
    (:func:`~pmf_jax.pipelines.from_run.pipeline_from_run`); its programs can be lowered, not run."""
    from pmf_jax.pipelines.from_run import RunParts, pipeline_from_run

    return pipeline_from_run(RunParts(run.cfg, run.components, run.all_params(), run.frozen))


def compile_sampling_step(run: AbstractRun, mesh, batch_per_device: int) -> Dict[str, CompiledProgram]:
    """{"sampling_prologue", "sampling_step", "sampling_epilogue"}: the retarget pipeline's three programs for
    ``batch_per_device`` images per device, every device of ``mesh`` data parallel (as the pipeline runs), with
    the config's sampling settings (:func:`~pmf_jax.pipelines.from_run.sampling_static`)."""
    from pmf_jax.pipelines import common
    from pmf_jax.pipelines.from_run import sampling_static

    pipe = retarget_pipeline(run)
    n = batch_per_device * mesh.size
    static = sampling_static(pipe, run.cfg, run.cfg.data.height_width, output_type="np")
    batch, scalars = pipe.abstract_inputs(static, n)
    sh_rep, sh_batch = replicated(mesh), batch_sharding(mesh)
    if num_batch_shards(mesh) != mesh.size:  # the pipeline puts every device on the batch
        sh_batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    params = _with_shardings(pipe.params, jax.tree.map(lambda _: sh_rep, pipe.params))
    batch = _with_shardings(batch, jax.tree.map(lambda _: sh_batch, batch))
    scalars = _with_shardings(scalars, jax.tree.map(lambda _: sh_rep, scalars))
    param_bytes = per_device_bytes(pipe.params, jax.tree.map(lambda _: sh_rep, pipe.params))
    programs = {}

    def add(name, fn, *args, repeats=1):
        compiled, lower_s, compile_s = _timed_compile(common.jit_on_mesh(fn, mesh), *args)
        programs[name] = CompiledProgram(name, compiled, dict(mesh.shape), mesh.size, n, batch_per_device,
                                         {"inference_params": param_bytes}, lower_s, compile_s, repeats, args)
        return compiled

    prologue, loop, epilogue = pipe.programs(static)
    compiled_prologue = add("sampling_prologue", prologue, params, batch, scalars)
    # The loop and the decode take what the prologue returns, laid out as the prologue's compiled program leaves it.
    carry, extras = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                 compiled_prologue.out_info)
    i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=sh_rep)
    add("sampling_step", loop, params, batch, scalars, extras, carry, i32, i32, repeats=static.steps)
    add("sampling_epilogue", epilogue, params, carry)
    return programs
