"""``train_and_evaluate``: the PMF trainer, top to bottom in sections (mesh, models, shardings, input, checkpoint,
compile, loop)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Dict, Optional

import jax

from pmf_jax import input_pipeline, runtime, storage
from pmf_jax.progress import bar as progress_bar
from pmf_jax.config import Config, dump_yaml, to_dict
from pmf_jax.errors import PMFInputError
from pmf_jax.parallel import distributed
from pmf_jax.parallel import (batch_sharding, jit_sharded, make_global_batch, make_mesh, num_batch_shards,
                              param_shardings, replicated, rules_from_config)
from pmf_jax.training import components as components_lib
from train import checkpointing
from train.logs import MetricWriter, Throughput, log
from train.previews import Previews
from train.startup import check_output_dir, phase, watch_compilation_cache
from pmf_jax.training.state import bind_step, init_state, make_optimizer, state_shardings


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the last good checkpoint (the last one followed by a finite loss)."""


def diverged_message(step: int, metrics: Dict[str, float], checkpoints, last_finite: Optional[int]) -> str:
    """``last_finite``: the last step whose loss was finite (this call or the kept rows of metrics.jsonl). A
    checkpoint is good when a finite loss followed it: it was saved before ``last_finite``."""
    steps = checkpoints.all_steps()
    good = [s for s in steps if last_finite is not None and s < last_finite]
    later = [s for s in steps if s not in good]
    text = f"loss became non-finite at step {step} ({metrics}); "
    if good:
        text += (f"the last good checkpoint is {checkpoints.directory}/{good[-1]} (the last one followed by a "
                 f"finite loss)")
    else:
        text += f"no checkpoint in {checkpoints.directory} is known good (none was followed by a finite loss)"
    if later:
        text += f"; the loss was not finite after checkpoint(s) {later}"
    return text


def write_run_info(run_dir, cfg: Config, comps) -> None:
    """Writes ``run_dir/config.yaml`` and ``run_dir/components.json`` (trained parts, reference settings, base, model
    configs: what ``pmf convert to-diffusers`` reads), on process 0 only."""
    if jax.process_index() != 0:
        return
    storage.makedirs(run_dir)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    info = {"trainable": list(comps.trainable), "reference": dataclasses.asdict(cfg.reference),
            "base": cfg.model.base, "autoencoder": cfg.model.autoencoder,
            "models": {"unet": comps.unet.to_config(), "reference_unet": comps.reference_unet.to_config(),
                       "controlnet": comps.controlnet.to_config() if comps.controlnet is not None else None}}
    if comps.image_prompt is not None:  # what `pmf convert to-diffusers` needs to write the trained adapter back
        info["ip_adapter"] = {"kind": comps.image_prompt.kind, "file": cfg.model.ip_adapter,
                              "image_encoder": cfg.model.image_encoder}
    (run_dir / "components.json").write_text(json.dumps(info, indent=2) + "\n")


def train_and_evaluate(cfg: Config, *, max_steps: Optional[int] = None, devices=None) -> Dict[str, float]:
    """Trains until ``cfg.train.steps`` (or ``max_steps`` more steps this call); resumes from the latest checkpoint.

    ``devices``: the devices of the mesh (default: all). Returns the last logged metrics. Returns early (after
    saving) when SIGTERM reaches any process (all processes save the same step). Multi-process when the launch
    variables say so (:mod:`pmf_jax.parallel.distributed`); every process must run the same config and code. The trainer is an entry point: it sets the process's runtime state
    (:func:`pmf_jax.runtime.setup`; the persistent compilation cache when ``train.compilation_cache``).
    """
    if distributed.initialize_from_environment():
        phase(f"joined the cluster: {distributed.process_summary()}")
        distributed.check_same_run(to_dict(cfg))  # every process has process 0's config and code, or all stop
    tc = cfg.train
    run_dir = storage.as_path(tc.output_dir)
    check_output_dir(run_dir)  # inputs are checked before anything is built or written to the run folder
    cache = runtime.setup(None if tc.compilation_cache else False)  # before anything compiles

    # ---- Mesh ----------------------------------------------------------------------------------------------------
    mesh = make_mesh(cfg.mesh, devices=devices)
    rules = rules_from_config(cfg.mesh)
    shards = num_batch_shards(mesh, rules)
    if cfg.data.batch_size % shards or cfg.data.batch_size % jax.process_count():
        raise PMFInputError(f"config data.batch_size={cfg.data.batch_size} must divide by the data-parallel size "
                            f"({shards} = data x fsdp) and the process count ({jax.process_count()})")
    local_batch = cfg.data.batch_size // jax.process_count()

    # ---- Input pipeline (first: a missing dataset is reported before the models are built) -------------------
    phase(f"opening dataset {cfg.data.name}/{cfg.data.builder_config} in {cfg.data.data_dir}")
    loader = input_pipeline.make_loader(
        cfg.data.name, cfg.data.split, cfg.data.data_dir, local_batch, cfg.data.height_width,
        config=cfg.data.builder_config, seed=tc.seed, shuffle=True, augment=cfg.data.augment,
        worker_count=cfg.data.workers)

    # ---- Models ----------------------------------------------------------------------------------------------------
    phase("building the models")
    rng = jax.random.key(tc.seed)
    init_rng, state_rng = jax.random.split(rng)
    comps, params, frozen = components_lib.build(cfg, init_rng)
    write_run_info(run_dir, cfg, comps)
    trainable = {part: params[part] for part in comps.trainable}
    frozen_params = {part: p for part, p in params.items() if part not in comps.trainable}
    reference_cfg = cfg.reference.to_reference_config()

    # ---- Shardings: eval_shape -> rules -> jit(init, out_shardings) ---------------------------------------------
    phase("initialising the train state")
    tx = make_optimizer(tc)
    abstract = jax.eval_shape(lambda p: init_state(p, tx, tc, state_rng), trainable)
    state_sh = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda p: init_state(p, tx, tc, state_rng), out_shardings=state_sh)(trainable)
    del trainable
    frozen_params_sh = param_shardings(frozen_params, mesh, rules)
    frozen_params = jax.device_put(frozen_params, frozen_params_sh)
    # The image encoder (mode ip_adapter, ~0.6 B parameters for ViT-H) is sharded like parameters; the rest is small.
    frozen_sh = {name: param_shardings(tree, mesh, rules) if name == "image_encoder" else
                 jax.tree_util.tree_map(lambda _: replicated(mesh), tree) for name, tree in frozen.items()}
    frozen = jax.device_put(frozen, frozen_sh)
    iterator = iter(loader)

    # ---- Checkpoint: resume from the latest one ------------------------------------------------------------------
    checkpoints = checkpointing.RunCheckpoints(run_dir, tc.keep_checkpoints)
    start = 0
    if checkpoints.latest_step() is not None:
        phase(f"restoring the latest intact checkpoint of {checkpoints.directory}")
        target = checkpointing.abstract_like(state, state_sh)
        state, iterator_state, start = checkpoints.restore(target)
        if iterator_state is not None:
            iterator.set_state(iterator_state)
        log(f"resumed from {checkpoints.directory}/{start}")
    end = tc.steps if max_steps is None else min(tc.steps, start + max_steps)

    # ---- Compile the update step ahead of time ---------------------------------------------------------------------
    step_fn = bind_step(comps, tx, tc, reference_cfg)
    batch_sh = batch_sharding(mesh, None, rules)
    jitted = jit_sharded(step_fn, mesh, (state_sh, frozen_params_sh, frozen_sh, batch_sh),
                         (state_sh, "replicated"), donate_argnums=(0,), rules=rules)
    first = make_global_batch(next(iterator), mesh, rules) if start < end else None
    compiled = None
    if first is not None:
        phase(f"compiling the train step ({f'compilation cache {cache}' if cache else 'no persistent cache'})")
        began = time.perf_counter()
        lowered = jitted.lower(state, frozen_params, frozen, first)
        traced = time.perf_counter()
        with watch_compilation_cache() as outcome:
            compiled = lowered.compile()
        memory = compiled.memory_analysis()
        sizes = "" if memory is None else (
            f": arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, temporaries "
            f"{memory.temp_size_in_bytes / 2**20:.1f} MiB, outputs {memory.output_size_in_bytes / 2**20:.1f} MiB")
        log(f"train step traced in {traced - began:.1f} s, compiled in {time.perf_counter() - traced:.1f} s "
            f"({outcome}){sizes}")

    # ---- Loop ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(run_dir)
    writer.drop_rows_after(start)
    last_finite = writer.last_step()
    previews = Previews(cfg, comps, frozen, writer, run_dir) if start < end else None
    preemption = distributed.Preemption().install()
    speed = Throughput()
    last: Dict[str, float] = {}
    bar = progress_bar(total=end, initial=start, desc="train", disable=jax.process_index() != 0)
    step = start
    if first is not None:
        distributed.barrier("train step compiled")  # the processes start the first step together
        phase(f"first step (training steps {start + 1}-{end})")
    try:
        batch = first
        while step < end:
            state, metrics = compiled(state, frozen_params, frozen, batch)
            if step == start:
                jax.block_until_ready(metrics)
                phase("first step done; training")
            step += 1
            speed.add(cfg.data.batch_size)
            bar.update(1)
            stop = preemption.reached(step)  # every process gets the same answer at the same step
            must_save = step % tc.checkpoint_every == 0 or step == end or stop
            if step % tc.log_every == 0 or must_save:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in last.values()):
                    raise TrainingDiverged(diverged_message(step, last, checkpoints, last_finite))
                last_finite = step
                rate = speed.rate()
                if rate:
                    last["images_per_s"] = rate
                writer.scalars(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last.get('images_per_s', 0):.1f}")
            if must_save:
                checkpoints.save(step, state, iterator.get_state())
            checkpoints.seal()  # the checksums of a save that has finished (no wait)
            if previews is not None and step % tc.eval_every == 0:
                previews(step, state.params, frozen_params)
            if stop:
                log(f"SIGTERM: saved step {step}, exiting")
                break
            if step < end:
                batch = make_global_batch(next(iterator), mesh, rules)
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
        preemption.uninstall()
    last["step"] = step
    return last
