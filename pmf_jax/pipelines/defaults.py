"""What a model folder says about how to sample it, read from its JSON files only (no weights, no JAX), so the CLI
knows it before loading anything:

  * :func:`native_size`: the resolution the model was trained at, as diffusers defines it: the UNet config's
    ``sample_size`` times the autoencoder's downscale factor (``2 ** (len(vae block_out_channels) - 1)``, or the
    patch size p of the identity autoencoder of a pixel-space UNet with 3·p² channels); an export's training
    resolution (``pmf_config.json`` "resolution") comes first.
  * :func:`sampling_defaults`: scheduler, steps and text guidance scale: an export's ``pmf_config.json`` "sampling"
    (its training config's sampling section), else the built-in defaults of :mod:`pmf_jax.constants`.
  * :func:`resolve_sampling`: what a call uses: the value given > the model's default > the built-in default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from pmf_jax import constants
from pmf_jax.errors import PMFInputError

# The sampling settings an export carries (pmf_config.json "sampling"), with their built-in defaults.
BUILTIN_SAMPLING = {"scheduler": constants.DEFAULT_SCHEDULER, "steps": constants.DEFAULT_STEPS,
                    "guidance_scale": constants.DEFAULT_GUIDANCE_SCALE}


def _json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON: {err}") from None


def _pair(value) -> Tuple[int, int]:
    """An int or a [H, W] list -> (H, W)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def size_of(unet_sample_size, factor: int) -> Optional[Tuple[int, int]]:
    """(H, W) in pixels of a UNet ``sample_size`` (int, [h, w] or None: unknown) in latents of ``factor`` pixels."""
    if unet_sample_size is None:
        return None
    h, w = _pair(unet_sample_size)
    return h * factor, w * factor


def autoencoder_factor(folder: Path, unet_config: dict) -> Optional[int]:
    """Pixels per latent of an SD folder's autoencoder: its vae/config.json, else the identity autoencoder's patch
    size for a pixel-space UNet (None: neither)."""
    vae = _json(folder / "vae" / "config.json")
    if vae is not None:
        return 2 ** (len(vae.get("block_out_channels", (0,))) - 1)
    from pmf_jax.models.identity_vae import patch_size_for_channels

    return patch_size_for_channels(int(unet_config.get("out_channels", 4)))


def export_config(folder: Path) -> Optional[Dict[str, Any]]:
    from pmf_jax.convert.folders import read_pmf_config

    return read_pmf_config(folder)


def native_size(folder) -> Optional[Tuple[int, int]]:
    """(H, W) the model in ``folder`` (an SD folder or export) was trained at; None when it does not say."""
    folder = Path(folder)
    export = export_config(folder) or {}
    if export.get("resolution"):
        return _pair(export["resolution"])
    unet = _json(folder / "unet" / "config.json")
    if unet is None:
        return None
    factor = autoencoder_factor(folder, unet)
    return None if factor is None else size_of(unet.get("sample_size"), factor)


def sampling_defaults(folder) -> Dict[str, Any]:
    """{"scheduler", "steps", "guidance_scale"}: the export's (pmf_config.json "sampling"), else built in."""
    export = export_config(Path(folder)) or {}
    given = export.get("sampling") or {}
    return {key: value if given.get(key) is None else given[key] for key, value in BUILTIN_SAMPLING.items()}


def resolve_sampling(folder, **given) -> Dict[str, Any]:
    """The sampling settings of a call: each of ``given`` (scheduler=, steps=, guidance_scale=; None: not given)
    over the model's :func:`sampling_defaults`."""
    unknown = set(given) - set(BUILTIN_SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}")
    defaults = sampling_defaults(folder)
    return {key: given[key] if given.get(key) is not None else defaults[key] for key in BUILTIN_SAMPLING}


__all__ = ["BUILTIN_SAMPLING", "autoencoder_factor", "export_config", "native_size", "resolve_sampling",
           "sampling_defaults", "size_of"]
