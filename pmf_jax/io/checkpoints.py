"""Reading a training run's orbax checkpoints without the training code or its mesh.

A run directory (``train.output_dir``) holds ``config.yaml``, ``components.json`` (each trained model's config,
which parts trained, the reference settings) and ``checkpoints/<step>/{state,data}``. :func:`restore_trained_params`
restores the trained parameters (or their EMA) of any step onto host memory, whatever mesh saved them: the restore
target is built from the checkpoint's own metadata, and the optimizer state is skipped, not read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from pmf_jax.errors import PMFInputError


def resolve_run(path) -> Tuple[Path, Optional[int]]:
    """``RUN_DIR`` or ``RUN_DIR/checkpoints/STEP`` or ``RUN_DIR/STEP`` -> (run dir, step or None for the latest)."""
    path = Path(path)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if path.name.isdigit() and (path.parent / "checkpoints").is_dir():
        return path.parent, int(path.name)
    return path, None


def read_run_info(run_dir) -> Dict[str, Any]:
    info = Path(run_dir) / "components.json"
    if not info.is_file():
        raise PMFInputError(f"{run_dir} is not a pmf_jax training run (no components.json)")
    return json.loads(info.read_text())


def open_manager(run_dir) -> ocp.CheckpointManager:
    directory = Path(run_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise PMFInputError(f"{run_dir} has no checkpoints/ folder")
    options = ocp.CheckpointManagerOptions(read_only=True)
    return ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})


def restore_trained_params(run_dir, step: Optional[int] = None, *, ema: bool = True) -> Tuple[Dict[str, Any], int]:
    """Returns ({part: numpy param tree} of the trained parts, step). ``ema``: the EMA copy when the run kept one.

    Raises PMFInputError for a missing run/step and for an incomplete or corrupt checkpoint.
    """
    manager = open_manager(run_dir)
    steps = sorted(manager.all_steps())
    if not steps:
        raise PMFInputError(f"{run_dir} has no complete checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PMFInputError(f"{run_dir} has no checkpoint at step {step}; available: {steps}")
    try:
        tree = manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        key = "ema_params" if ema and tree.get("ema_params") is not None else "params"
        device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        item = {key: jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                            tree[key])}
        restore_args = jax.tree_util.tree_map(
            lambda s: ocp.ArrayRestoreArgs(sharding=device, global_shape=s.shape, dtype=s.dtype), item)
        # partial_restore: only the parameters are read; the optimizer state stays on disk.
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
    except Exception as err:  # noqa: BLE001 - orbax reports damage with many exception types
        raise PMFInputError(f"checkpoint {manager.directory}/{step} is incomplete or corrupt: {err}") from err
    finally:
        manager.close()
    params = jax.tree_util.tree_map(np.asarray, restored["state"][key])
    return params, step
