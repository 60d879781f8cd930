"""Model folders whose weights are an orbax checkpoint of the Flax parameter tree instead of torch safetensors.

``pmf convert from-diffusers`` writes them (:mod:`pmf_jax.convert.from_diffusers`): a folder with the model's
``config.json`` and ``orbax_params/`` (the parameter tree, already in Flax layout). :func:`pmf_jax.io.from_pretrained`
reads such a folder like a diffusers one, so training starts from it without converting torch files on every host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from pmf_jax.errors import PMFInputError
from pmf_jax.io.naming import check_match
from pmf_jax.io.process_local import host_sharding, this_process_only

PARAMS_DIR = "orbax_params"


def has_orbax_params(folder) -> bool:
    return (Path(folder) / PARAMS_DIR).is_dir()


def save_params(folder, params, dtype=None) -> Path:
    """Writes ``params`` (a Flax tree of arrays) as ``folder/orbax_params`` (folder created; must not hold one)."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    cpu = host_sharding()
    tree = jax.tree_util.tree_map(
        lambda a: jax.device_put(np.asarray(a, dtype=dtype) if dtype is not None else np.asarray(a), cpu), params)
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(folder / PARAMS_DIR, args=ocp.args.PyTreeSave(tree))
    checkpointer.close()
    return folder / PARAMS_DIR


def restore_params(folder, abstract_params, *, source: Optional[str] = None) -> Dict[str, Any]:
    """The parameter tree of ``folder/orbax_params`` on the host (CPU), checked against the model's tree.

    Args:
      abstract_params: the model's tree (``jax.ShapeDtypeStruct`` leaves): names and shapes must match.
    Raises:
      ConversionError listing missing, unexpected and mis-shaped parameters; PMFInputError for an unreadable one.
    """
    path = Path(folder).absolute() / PARAMS_DIR
    source = source or str(folder)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=this_process_only()),
                                    multiprocessing_options=this_process_only())
    try:
        metadata = checkpointer.metadata(path)
        metadata = getattr(metadata, "item_metadata", metadata)
        metadata = getattr(metadata, "tree", metadata)
        stored = traverse_util.flatten_dict(_plain(metadata))
        wanted = traverse_util.flatten_dict(abstract_params)
        _check(stored, wanted, source)
        cpu = host_sharding()
        target = traverse_util.unflatten_dict(
            {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu) for k, m in stored.items()})
        restore_args = jax.tree_util.tree_map(
            lambda s: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=s.shape, dtype=s.dtype), target)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
    except (FileNotFoundError, ValueError, KeyError, TypeError, OSError) as err:
        if isinstance(err, PMFInputError):
            raise
        raise PMFInputError(f"{path} is not a readable orbax parameter checkpoint: {err}") from err
    finally:
        checkpointer.close()
    return jax.tree_util.tree_map(np.asarray, restored)


def _plain(tree):
    """Orbax metadata trees (dict subclasses) -> plain nested dicts."""
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _check(stored: Dict, wanted: Dict, source: str) -> None:
    name = "/".join
    missing = sorted(name(k) for k in wanted if k not in stored)
    unexpected = sorted(name(k) for k in stored if k not in wanted)
    misshaped = sorted(f"{name(k)}: {tuple(stored[k].shape)} stored, model expects {tuple(wanted[k].shape)}"
                       for k in wanted if k in stored and tuple(stored[k].shape) != tuple(wanted[k].shape))
    check_match(source, missing, unexpected, misshaped, "parameters")
