"""What both converters share: ``pmf_config.json``, dtypes, copying parts of a base folder. Their output folders are
written with :func:`pmf_jax.out_folder.staged_folder`, as every command's are."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from pmf_jax.constants import DTYPE_SHORT_NAMES, DTYPES
from pmf_jax.errors import PMFInputError
from pmf_jax.io.pretrained import PICKLE_SUFFIXES

PMF_CONFIG = "pmf_config.json"
PMF_CONFIG_FORMAT = "pmf_jax.export"


def parse_dtype(name: Optional[str]):
    """"fp32"/"fp16"/"bf16" (or the long names of ``constants.DTYPES``; None = fp32) -> a numpy/ml_dtypes dtype."""
    import jax.numpy as jnp

    if name is None:
        return jnp.dtype("float32")
    long_name = DTYPE_SHORT_NAMES.get(str(name), str(name))
    if long_name not in DTYPES:
        raise PMFInputError(f"dtype {name!r} must be one of {', '.join(DTYPE_SHORT_NAMES)}")
    return jnp.dtype(long_name)


# ------------------------------------------------------------------------------------------------ pmf_config.json

def write_pmf_config(folder: Path, config: Dict[str, Any]) -> None:
    body = dict(format=PMF_CONFIG_FORMAT, version=1, **config)
    (folder / PMF_CONFIG).write_text(json.dumps(body, indent=2) + "\n")


def read_pmf_config(folder) -> Optional[Dict[str, Any]]:
    """The ``pmf_config.json`` of an exported folder (None when the folder has none)."""
    path = Path(folder) / PMF_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON: {err}") from None
    if config.get("format") != PMF_CONFIG_FORMAT:
        raise PMFInputError(f"{path} is not a pmf_jax export config (format {config.get('format')!r})")
    return config


def reference_config_of(pmf_config: Optional[Dict[str, Any]]):
    """The :class:`~pmf_jax.reference.ReferenceConfig` an export was trained with (defaults without one)."""
    from pmf_jax.reference import ReferenceConfig

    if not pmf_config or not pmf_config.get("reference"):
        return ReferenceConfig()
    names = {f.name for f in dataclasses.fields(ReferenceConfig)}
    return ReferenceConfig(**{k: v for k, v in pmf_config["reference"].items() if k in names})


# ------------------------------------------------------------------------------------------------ copying

def model_folder(path_or_id, part: str) -> Path:
    """The folder of one model: ``path_or_id`` itself (it holds config.json), or its ``part`` subfolder (a pipeline
    folder, a PMF export, a `pmf convert from-diffusers` checkpoint)."""
    from pmf_jax.io.hub import resolve_folder

    folder = resolve_folder(path_or_id)
    if not (folder / "config.json").is_file() and (folder / part / "config.json").is_file():
        folder = folder / part
    if not (folder / "config.json").is_file():
        raise PMFInputError(f"{part}: {str(path_or_id)!r} has no config.json (nor {part}/config.json)")
    return folder


def _is_default_weights(name: str) -> bool:
    """Weight files of the default variant: ``stem.safetensors``, ``stem-0000x-of-0000y.safetensors`` and
    ``stem.safetensors.index.json`` (not ``stem.fp16.safetensors`` & co)."""
    if name.endswith(".safetensors"):
        return name.count(".") == 1
    if name.endswith(".safetensors.index.json"):
        return name.count(".") == 3
    return False


def copy_model_folder(src: Path, dst: Path, *, link: bool = False, weights: bool = True) -> None:
    """Copies (or symlinks) a diffusers/transformers folder: configs, tokenizer files and the default safetensors
    weights; pickle weights and other variants are left out.

    Raises:
      PMFInputError: ``weights`` and the folder holds no safetensors weights (pickle only).
    """
    src = Path(src)
    files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.endswith(PICKLE_SUFFIXES)
             and (_is_default_weights(p.name) or ".safetensors" not in p.name)]
    if weights and not any(_is_default_weights(p.name) for p in files):
        raise PMFInputError(f"{src} holds no safetensors weights (pickle only?); convert it to safetensors first")
    dst.mkdir(parents=True)
    for path in files:
        target = dst / path.name
        if link:
            os.symlink(path.resolve(), target)
        else:
            shutil.copyfile(path.resolve(), target)
