"""``from_pretrained`` / ``save_pretrained`` for diffusers and transformers model folders (safetensors, no torch)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pmf_jax.errors import PMFInputError
from pmf_jax.file_modes import give_user_modes
from pmf_jax.io.finite import check_finite, describe_names, in_range
from pmf_jax.io.hub import resolve_folder
from pmf_jax.io.naming import params_to_state_dict, state_dict_to_params
from pmf_jax.io.orbax_params import PARAMS_DIR, has_orbax_params, restore_params
from pmf_jax.io.registry import model_class_for_config

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise PMFInputError(f"{folder} has no config.json: not a diffusers/transformers model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON: {err}") from err


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PMFInputError(f"cannot read weights file {path}: {err} (corrupted or truncated safetensors?)") from err


def _weight_files(folder: Path, stem: str, variant: Optional[str]) -> Tuple[list, Optional[Path]]:
    """Returns (safetensors files, pickle file if that is all there is)."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    if single.is_file():
        return [single], None
    index = folder / f"{stem}{suffix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise PMFInputError(f"{index} is not a safetensors index (needs a 'weight_map'): {err}") from err
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise PMFInputError(f"{index} names shards that are missing: {', '.join(absent)}")
        return shards, None
    pickles = [folder / f"{stem}{suffix}{ext}" for ext in PICKLE_SUFFIXES]
    pickles = [p for p in pickles if p.is_file()]
    if pickles:
        return [], pickles[0]
    raise PMFInputError(f"{folder} holds no weights: expected {single.name} or {index.name}")


def load_state_dict(folder: Path, stem: str, *, variant: Optional[str] = None,
                    allow_pickle: bool = False) -> Dict[str, np.ndarray]:
    """Reads every tensor of a model folder into numpy (torch naming and layout)."""
    files, pickle_file = _weight_files(folder, stem, variant)
    if pickle_file is not None:
        from pmf_jax.torch_compat.pickle_weights import check_pickle_allowed, load_pickle_state_dict

        check_pickle_allowed(pickle_file, allow_pickle)
        return load_pickle_state_dict(pickle_file)
    state = {}
    for path in files:
        state.update(_read_safetensors(path))
    return state


def from_pretrained(path_or_repo_id, subfolder: Optional[str] = None, dtype=jnp.float32, *,
                    param_dtype=None, attention_backend: str = "auto", variant: Optional[str] = None,
                    allow_pickle: bool = False, revision: Optional[str] = None, **module_kwargs):
    """Loads a diffusers (UNet2DConditionModel, ControlNetModel, AutoencoderKL) or transformers (CLIPTextModel) folder.

    A folder with ``orbax_params/`` in place of the weight files (``pmf convert from-diffusers``) is read from orbax.

    Args:
      path_or_repo_id: a local folder, a pipeline folder with ``subfolder``, or a Hub repo id already in the local
        Hugging Face cache.
      dtype: the compute dtype of the returned module; ``param_dtype`` (default: ``dtype``) is the params' dtype.
      attention_backend: see :mod:`pmf_jax.models.attention`.
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``.
      module_kwargs: other module settings, e.g. ``gradient_checkpointing=True`` for the UNet and ControlNet.
      allow_pickle: also read pickled torch weights (``.bin``, ``.ckpt``, ``.pt``, ``.pth``), which can run arbitrary
        code when loaded (the CLI's ``--allow-pickle``).
    Returns:
      ``(module, params)``: a Flax module and its parameter tree (``{"params": ...}`` is *not* wrapped).
    Raises:
      PMFInputError: a missing or unreadable folder or weight file, a refused pickle file, weights that do not fit
        the model, or weights holding NaN or Inf, or values the cast to ``param_dtype`` would make Inf (checked on
        the host before the cast; the message names the file and the tensors: :func:`pmf_jax.io.finite.check_finite`).
    """
    folder = resolve_folder(path_or_repo_id, subfolder, revision)
    config = read_config(folder)
    cls = model_class_for_config(config, folder)
    module = cls.from_config(config, dtype=dtype, attention_backend=attention_backend, **module_kwargs)
    abstract = module.abstract_params()
    state = None
    if has_orbax_params(folder):  # written by `pmf convert from-diffusers`: already a Flax tree
        params = restore_params(folder, abstract)
    else:
        state = load_state_dict(folder, cls.WEIGHTS_STEM, variant=variant, allow_pickle=allow_pickle)
        params = state_dict_to_params(cls.normalize_state_dict(state), abstract, source=str(folder),
                                      ignore_unexpected=cls.IGNORE_UNEXPECTED)
    target = jnp.dtype(param_dtype or dtype)
    check_finite(params, str(folder / PARAMS_DIR) if state is None else str(folder), target,
                 lambda: _locate_nonfinite(folder, cls.WEIGHTS_STEM, variant, state))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=target), params)
    return module, params


def _locate_nonfinite(folder: Path, stem: str, variant: Optional[str], state) -> Optional[str]:
    """The weight file and its tensor names holding NaN or Inf (called only when :func:`check_finite` failed); None
    when the files hold none (orbax folders; values the cast would overflow): the parameter paths name them."""
    if state is None:
        return None
    files, pickle_file = _weight_files(folder, stem, variant)
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            bad = [key for key in f.keys() if not in_range(f.get_tensor(key))]
        if bad:
            return f"weights file {path}: {describe_names(bad)}"
    if pickle_file is not None:
        bad = [key for key, value in state.items() if not in_range(value)]
        if bad:
            return f"weights file {pickle_file}: {describe_names(bad)}"
    return None


def save_pretrained(module, params, path, *, dtype=None, overwrite: bool = False) -> Path:
    """Writes ``config.json`` + safetensors that diffusers/transformers ``from_pretrained`` open.

    The folder is written under a temporary name beside ``path`` and renamed at the end, so an interrupted save
    never leaves a partial folder under ``path``; its files and folder get the user's modes
    (:func:`pmf_jax.file_modes.give_user_modes`).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PMFInputError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = params_to_state_dict(jax.device_get(params))
    if dtype is not None:
        state = {k: v.astype(jnp.dtype(dtype)) for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(module.to_config(), indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / f"{type(module).WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
        give_user_modes(tmp)  # tempfile's folder is 0700, safetensors' file 0600
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
