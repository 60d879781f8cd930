"""Model classes by the name a ``config.json`` gives them (diffusers ``_class_name``, transformers ``architectures``)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pmf_jax.errors import PMFInputError

# name -> (module, class); imported on first use.
MODEL_CLASSES = {
    "UNet2DConditionModel": ("pmf_jax.models.unet", "UNet2DConditionModel"),
    "ControlNetModel": ("pmf_jax.models.controlnet", "ControlNetModel"),
    "AutoencoderKL": ("pmf_jax.models.vae", "AutoencoderKL"),
    "CLIPTextModel": ("pmf_jax.models.clip_text", "CLIPTextModel"),
    "CLIPVisionModelWithProjection": ("pmf_jax.models.clip_vision", "CLIPVisionModelWithProjection"),
}


def model_class(name: str):
    if name not in MODEL_CLASSES:
        raise PMFInputError(f"model class {name!r} is not supported; supported: {', '.join(MODEL_CLASSES)}")
    module, attr = MODEL_CLASSES[name]
    return getattr(importlib.import_module(module), attr)


def model_class_for_config(config: dict, folder: Path | str = "<config>"):
    """The Flax class for a parsed config.json (diffusers ``_class_name`` or transformers ``architectures[0]``)."""
    name = config.get("_class_name")
    if name is None:
        archs = config.get("architectures") or []
        if config.get("model_type") == "clip_text_model" and not archs:
            archs = ["CLIPTextModel"]
        name = archs[0] if archs else None
    if name is None:
        raise PMFInputError(f"{folder}/config.json names no model class (_class_name or architectures)")
    if name not in MODEL_CLASSES:
        raise PMFInputError(f"{folder}: model class {name!r} is not supported; supported: {', '.join(MODEL_CLASSES)}")
    return model_class(name)
