"""``pmf convert from-diffusers``: diffusers/transformers folders -> one orbax checkpoint folder training starts from.

Reading SD1.5 from torch safetensors means re-laying out every tensor (OIHW -> HWIO, transposes) on every host of
every run; this converts once. The output mirrors a diffusers pipeline folder, with orbax instead of safetensors::

    CKPT_DIR/pmf_pretrained.json      the marker: format, parts, where each came from, dtype
    CKPT_DIR/<part>/config.json       the source's config, unchanged
    CKPT_DIR/<part>/orbax_params/     the Flax parameter tree (pmf_jax.io.orbax_params)
    CKPT_DIR/tokenizer/ scheduler/    copied as they are
    (parts: unet, vae, text_encoder, controlnet, reference_unet; whichever the sources have)

How training uses it: ``model.base=CKPT_DIR`` (unet/, vae/, text_encoder/, tokenizer/, scheduler/ as from an SD
folder), ``model.controlnet=CKPT_DIR`` and ``model.reference_unet=CKPT_DIR`` (a folder with the marker stands for
its controlnet/ and reference_unet/ subfolders; ``CKPT_DIR/controlnet`` works too).

``CKPT_DIR`` and the source folders may be URLs (``gs://bucket/...``): the sources are read through cached local
copies (:func:`pmf_jax.io.hub.resolve_folder`), the output is written in a local stage and uploaded with
``pmf_pretrained.json`` and the other top-level index files last (:mod:`pmf_jax.out_folder`).
:func:`pmf_jax.io.from_pretrained` reads any ``<part>`` folder (it sees ``orbax_params/``), so do the pipelines.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from pmf_jax.convert.folders import copy_model_folder, model_folder, parse_dtype
from pmf_jax.errors import PMFInputError
from pmf_jax.io import from_pretrained
from pmf_jax.io.hub import resolve_folder
from pmf_jax.io.orbax_params import save_params
from pmf_jax.out_folder import check_out_folder, staged_folder

MARKER = "pmf_pretrained.json"
MARKER_FORMAT = "pmf_jax.pretrained"
MODEL_PARTS = ("unet", "vae", "text_encoder", "controlnet", "reference_unet")
EXPECTED_CLASS = {"unet": "UNet2DConditionModel", "reference_unet": "UNet2DConditionModel",
                  "controlnet": "ControlNetModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel"}
COPIED_FOLDERS = ("tokenizer", "scheduler")
COPIED_FILES = ("model_index.json", "pmf_config.json")


def import_from_diffusers(model, out, *, controlnet=None, reference_unet=None, dtype=None,
                          revision: Optional[str] = None, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Writes ``out`` (see the module docstring) from an SD/PMF pipeline folder and optional separate models.

    Args:
      model: a pipeline folder or cached Hub repo id with unet/ (and vae/, text_encoder/, tokenizer/, scheduler/,
        controlnet/, reference_unet/ when it has them: a `pmf convert to-diffusers` export has all it needs).
      controlnet, reference_unet: a model folder (or a pipeline folder holding that subfolder); they replace the
        ones of ``model``.
      dtype: "fp32" (default), "fp16" or "bf16": the stored parameters (training casts them as configured).
    Raises:
      PMFInputError: missing folders, a model that does not match its config, ``out`` exists. Nothing is left under
        ``out`` then.
    """
    out = check_out_folder(out, overwrite)  # a URL as an epath.Path, checked on its storage server
    store_dtype = parse_dtype(dtype)
    root = resolve_folder(model, revision=revision)
    if not (root / "unet" / "config.json").is_file():
        raise PMFInputError(f"--model {str(model)!r} is not a pipeline folder: it has no unet/config.json")
    sources: Dict[str, Path] = {p: root / p for p in MODEL_PARTS if (root / p / "config.json").is_file()}
    for part, given in (("controlnet", controlnet), ("reference_unet", reference_unet)):
        if given is not None:
            sources[part] = model_folder(given, part)

    with staged_folder(out, overwrite) as tmp:
        parts = {}
        for part, folder in sources.items():
            module, params = from_pretrained(folder, param_dtype=np.float32, allow_pickle=allow_pickle)
            if type(module).__name__ != EXPECTED_CLASS[part]:
                raise PMFInputError(f"{folder} holds a {type(module).__name__}, expected a {EXPECTED_CLASS[part]} "
                                    f"for {part}")
            (tmp / part).mkdir()
            shutil.copyfile(folder / "config.json", tmp / part / "config.json")
            save_params(tmp / part, params, dtype=store_dtype)
            del params
            parts[part] = {"class": EXPECTED_CLASS[part], "source": str(folder)}
        for name in COPIED_FOLDERS:
            if (root / name).is_dir():
                copy_model_folder(root / name, tmp / name, weights=False)
        for name in COPIED_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        (tmp / MARKER).write_text(json.dumps({
            "format": MARKER_FORMAT, "version": 1, "parts": parts, "dtype": str(store_dtype),
            "copied": [n for n in COPIED_FOLDERS + COPIED_FILES if (tmp / n).exists()]}, indent=2) + "\n")
    return out


def is_pretrained_checkpoint(path) -> bool:
    """Whether ``path`` (a local folder or a URL) was written by :func:`import_from_diffusers` (it holds the marker
    file)."""
    from pmf_jax.storage import as_path

    return (as_path(path) / MARKER).is_file()


__all__ = ["import_from_diffusers", "is_pretrained_checkpoint", "MARKER"]
