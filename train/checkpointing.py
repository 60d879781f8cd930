"""Orbax checkpoints of a run: the train state (sharded arrays) and the input iterator's position.

Layout: ``<output_dir>/checkpoints/<step>/{state,data,checksums.json}``; the checksum manifest is written once orbax
has committed the step and verified before it is restored (:mod:`pmf_jax.io.checkpoint_checksums`). Restoring
builds the abstract target from the *current* mesh's shardings, so a run saved on 8 devices resumes on 4 or on 1
(and export restores onto host memory).
"""

from __future__ import annotations

import base64
import threading
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from pmf_jax import storage
from pmf_jax.errors import PMFInputError
from pmf_jax.io import checkpoint_checksums as checksums
from pmf_jax.parallel import distributed
from train.logs import warn


def checkpoint_dir(output_dir) -> storage.Path:
    """``<output_dir>/checkpoints``, a local folder or a URL (``gs://bucket/run/checkpoints``)."""
    return storage.as_path(output_dir) / "checkpoints"


def make_manager(output_dir, keep: int, *, async_saves: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_saves, create=True)
    return ocp.CheckpointManager(checkpoint_dir(output_dir), options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, iterator_state: Optional[bytes]) -> None:
    """Saves ``state`` and every process's input-iterator position (gathered to the JSON item, which orbax writes on
    process 0: ``iterators[k]`` is process k's, ``iterator`` process 0's as single-process runs always had it)."""
    encoded = base64.b64encode(iterator_state).decode() if iterator_state is not None else ""
    states = distributed.all_gather_text(f"iterator/{step}", encoded)
    data = {"iterator": states[0] or None, "step": int(step)}
    if len(states) > 1:
        data["iterators"] = [text or None for text in states]
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
                 force=True)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target for the current mesh."""
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def this_process_iterator(data: dict, *, warn=warn) -> Optional[bytes]:
    """This process's input-iterator position from a checkpoint's JSON item, or None (with a warning) when the
    checkpoint was saved by another number of processes: the input order then restarts from the seed."""
    saved = data.get("iterators") or [data.get("iterator")]
    if len(saved) != jax.process_count():
        warn(f"the checkpoint was saved by {len(saved)} process(es) and is resumed by {jax.process_count()}: the "
             f"parameters and optimizer state are restored, the input order restarts from train.seed")
        return None
    text = saved[jax.process_index()]
    return base64.b64decode(text) if text else None


def restore(manager: ocp.CheckpointManager, abstract_state, steps=None, *,
            warn=warn) -> Tuple[Any, Optional[bytes], int]:
    """Returns (state, this process's iterator state bytes or None, step) of the newest intact step of ``steps``
    (default: all).

    A newer step that is corrupt or incomplete (checksum manifest, or orbax cannot read it) is skipped with a warning
    naming it (:func:`pmf_jax.io.checkpoint_checksums.restore_newest_intact`); when none restores, one
    PMFInputError line gives every step's reason.
    """
    steps = sorted(manager.all_steps()) if steps is None else list(steps)
    if not steps:
        raise PMFInputError(f"no checkpoint in {manager.directory}")
    missing = sorted(set(steps) - set(manager.all_steps()))
    if missing:
        raise PMFInputError(f"checkpoint step {missing[0]} not found in {manager.directory}; "
                            f"available: {sorted(manager.all_steps())}")

    def restore_step(step):
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))

    restored, step = checksums.restore_newest_intact(manager.directory, steps, restore_step, warn=warn)
    return restored["state"], this_process_iterator(restored["data"] or {}, warn=warn), step


class RunCheckpoints:
    """A run's checkpoints: async orbax saves, a checksum manifest for each once orbax has committed it, restoring
    the newest intact step, and setting aside the steps that must not be resumed from.

    :meth:`seal` is cheap and does not block: the loop calls it every step. Once a save has finished, process 0
    hashes its (no longer changing) step folder in a background thread; the next save waits for that thread.
    """

    def __init__(self, output_dir, keep: int, *, async_saves: bool = True):
        self.manager = make_manager(output_dir, keep, async_saves=async_saves)
        self.directory = storage.as_path(self.manager.directory)
        self._unsealed: list = []
        self._hashing: Optional[threading.Thread] = None

    def all_steps(self) -> list:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator_state: Optional[bytes]) -> None:
        self._join()
        save(self.manager, step, state, iterator_state)
        self._unsealed.append(int(step))
        self.seal()

    def seal(self, wait: bool = False) -> None:
        """Writes the manifests of the finished saves (``wait``: waits for the save in flight and the hashing)."""
        if wait:
            self.manager.wait_until_finished()
            self._join()
        hashing = self._hashing is not None and self._hashing.is_alive()
        if not self._unsealed or hashing or self.manager.is_saving_in_progress():
            return
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() == 0:
            folders = [self.directory / str(step) for step in steps]
            self._hashing = threading.Thread(target=_write_manifests, args=(folders,), name="checkpoint-checksums")
            self._hashing.start()
            if wait:
                self._join()

    def _join(self) -> None:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None

    def restore(self, abstract_state) -> Tuple[Any, Optional[bytes], int]:
        """:func:`restore` of the newest intact step; the newer ones it skipped are set aside as ``<step>.corrupt``
        (a later save of the same step must not collide with them)."""
        state, iterator_state, step = restore(self.manager, abstract_state, warn=warn)
        self.set_aside([s for s in self.all_steps() if s > step], "corrupt")
        return state, iterator_state, step

    def set_aside(self, steps, label: str) -> None:
        """Renames ``checkpoints/<step>`` to ``<step>.<label>``: orbax no longer lists it, its files stay."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                folder = self.directory / str(step)
                target, n = self.directory / f"{step}.{label}", 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}.{label}{n}"
                storage.move_tree(folder, target)
                warn(f"checkpoint {folder} set aside as {target.name}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pmf_jax checkpoints set aside")
        self.manager.reload()

    def close(self) -> None:
        try:
            self.seal(wait=True)
        finally:
            self.manager.close()


def _write_manifests(folders) -> None:
    for folder in folders:
        if folder.is_dir():  # max_to_keep may have removed it
            try:
                checksums.write_manifest(folder)
            except OSError as err:
                warn(f"could not write the checksums of {folder}: {err}")
