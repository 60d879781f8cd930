"""Orbax checkpoints of a run: the train state (sharded arrays) and the input iterator's position.

Layout: ``<output_dir>/checkpoints/<step>/{state,data}``. Restoring builds the abstract target from the *current*
mesh's shardings, so a run saved on 8 devices resumes on 4 or on 1 (and export restores onto host memory).
"""

from __future__ import annotations

import base64
import signal
import threading
from pathlib import Path
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from pmf_jax.errors import PMFInputError


def checkpoint_dir(output_dir) -> Path:
    return Path(output_dir).absolute() / "checkpoints"


def make_manager(output_dir, keep: int, *, async_saves: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_saves, create=True)
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, iterator_state: Optional[bytes]) -> None:
    data = {"iterator": base64.b64encode(iterator_state).decode() if iterator_state is not None else None,
            "step": int(step)}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
                 force=True)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target for the current mesh."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state, step: Optional[int] = None) -> Tuple[Any, Optional[bytes], int]:
    """Returns (state, iterator state bytes or None, step) of ``step`` (default: the latest)."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise PMFInputError(f"no checkpoint in {manager.directory}")
    if step not in manager.all_steps():
        raise PMFInputError(f"checkpoint step {step} not found in {manager.directory}; "
                            f"available: {sorted(manager.all_steps())}")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore()))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise PMFInputError(f"checkpoint {manager.directory}/{step} is incomplete or corrupt: {err}") from err
    data = restored["data"] or {}
    iterator = data.get("iterator")
    return restored["state"], (base64.b64decode(iterator) if iterator else None), step


class PreemptionFlag:
    """Set by SIGTERM (a preempted VM, `kill`): the loop saves at the current step and exits 0."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())
        return self

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def __bool__(self):
        return self._event.is_set()
