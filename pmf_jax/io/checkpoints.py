"""Reading a training run's orbax checkpoints without the training code or its mesh.

A run directory (``train.output_dir``) holds ``config.yaml``, ``components.json`` (each trained model's config,
which parts trained, the reference settings) and ``checkpoints/<step>/{state,data}``. :func:`restore_trained_params`
restores the trained parameters (or their EMA) of any step onto host memory, whatever mesh saved them: the restore
target is built from the checkpoint's own metadata, and the optimizer state is skipped, not read. The step's checksum
manifest is verified first (a corrupt step is an error naming an earlier step; only the trainer falls back on its own).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from pmf_jax import storage
from pmf_jax.errors import PMFInputError
from pmf_jax.io.checkpoint_checksums import restore_newest_intact
from pmf_jax.io.finite import check_finite
from pmf_jax.io.process_local import host_sharding, this_process_only


def resolve_run(path) -> Tuple[storage.Path, Optional[int]]:
    """``RUN_DIR`` or ``RUN_DIR/checkpoints/STEP`` or ``RUN_DIR/STEP`` -> (run dir, step or None for the latest);
    local paths or URLs (``gs://bucket/run``)."""
    path = storage.as_path(path)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name.isdigit() and (path.parent / "checkpoints").is_dir():
        return path.parent, int(path.name)
    return path, None


def read_run_info(run_dir) -> Dict[str, Any]:
    info = storage.as_path(run_dir) / "components.json"
    if not info.is_file():
        raise PMFInputError(f"{run_dir} is not a pmf_jax training run (no components.json)")
    return json.loads(info.read_text())


def open_manager(run_dir) -> ocp.CheckpointManager:
    directory = storage.as_path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise PMFInputError(f"{run_dir} has no checkpoints/ folder")
    local = this_process_only()  # a reader: no barrier with the other processes of a multi-process run
    options = ocp.CheckpointManagerOptions(read_only=True, multiprocessing_options=local)
    return ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
        "data": ocp.JsonCheckpointHandler(multiprocessing_options=local)})


def restore_trained_params(run_dir, step: Optional[int] = None, *, ema: bool = True) -> Tuple[Dict[str, Any], int]:
    """Returns ({part: numpy param tree} of the trained parts, step). ``ema``: the EMA copy when the run kept one.

    Raises PMFInputError for a missing run/step, for an incomplete or corrupt checkpoint and for parameters holding
    NaN or Inf (one reduction over the tree; the message names the checkpoint and the parameters).
    """
    manager = open_manager(run_dir)
    steps = sorted(manager.all_steps())
    if not steps:
        raise PMFInputError(f"{run_dir} has no complete checkpoint")
    if step is not None and step not in steps:
        raise PMFInputError(f"{run_dir} has no checkpoint at step {step}; available: {steps}")

    def restore_step(step):
        tree = manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        key = "ema_params" if ema and tree.get("ema_params") is not None else "params"
        device = host_sharding()
        item = {key: jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                            tree[key])}
        restore_args = jax.tree_util.tree_map(
            lambda s: ocp.ArrayRestoreArgs(sharding=device, global_shape=s.shape, dtype=s.dtype), item)
        # partial_restore: only the parameters are read; the optimizer state stays on disk.
        return key, manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))

    step = steps[-1] if step is None else step
    try:  # the step asked for, verified: a reader does not fall back to an older step on its own
        (key, restored), step = restore_newest_intact(manager.directory, [step], restore_step)
    except PMFInputError as err:
        earlier = [s for s in steps if s < step]
        raise PMFInputError(f"{err}" + (f"; an earlier step can be read: {run_dir}/checkpoints/{earlier[-1]}"
                                         if earlier else "")) from None
    finally:
        manager.close()
    params = jax.tree_util.tree_map(np.asarray, restored["state"][key])
    check_finite(params, f"checkpoint {manager.directory}/{step} ({key})")
    return params, step
