"""A run's trained IP-Adapter (the ``ip_adapter`` part of reference.mode=ip_adapter) back in the public file format.

In an export folder ``out``::

    ip_adapter/ip_adapter.safetensors   image_proj.* and ip_adapter.<n>.to_k_ip/to_v_ip.weight (torch layout), what
                                        diffusers' ``load_ip_adapter`` and :func:`pmf_jax.io.load_ip_adapter` read
    image_encoder/                      the run's CLIP image encoder (model.image_encoder), copied or linked: where
                                        :func:`pmf_jax.pipelines.loading.load_image_prompt` looks in an export

diffusers reads it with ``pipe.load_ip_adapter(out, subfolder="ip_adapter", weight_name="ip_adapter.safetensors",
image_encoder_folder="image_encoder/")`` (a name with a "/" is taken from ``out``, not from the subfolder), or, when
the pipeline already holds the image encoder (``CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder")``
passed as ``image_encoder=``), without ``image_encoder_folder``.

The trained tree (``{"image_proj": tree, "attn2": UNet-shaped tree of to_k_ip/to_v_ip kernels}``,
:func:`pmf_jax.training.components.ip_adapter_tree`) is checked against the adapter the run started from
(``model.ip_adapter``): the same kind, keys and shapes, only new values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict

import jax
import numpy as np
from safetensors.numpy import save_file

from pmf_jax.convert.folders import copy_model_folder
from pmf_jax.errors import PMFInputError
from pmf_jax.io.ip_adapter import IPAdapterWeights, load_ip_adapter

IP_ADAPTER_FOLDER = "ip_adapter"
WEIGHT_NAME = "ip_adapter.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"


def trained_adapter(start: IPAdapterWeights, trained: Dict[str, Any], source: str = "the trained ip_adapter"
                    ) -> IPAdapterWeights:
    """``start`` (the adapter the run began from) with the weights of ``trained`` (the run's ``ip_adapter`` part).

    Raises PMFInputError naming every key that is missing, unexpected or of another shape."""
    from pmf_jax.training.image_prompt import attention_params_by_index

    if not isinstance(trained, dict) or set(trained) != {"image_proj", "attn2"}:
        got = sorted(trained) if isinstance(trained, dict) else type(trained).__name__
        raise PMFInputError(f"{source}: expected the keys ['attn2', 'image_proj'], got {got}")
    trained = jax.tree_util.tree_map(np.asarray, trained)
    candidate = dataclasses.replace(start, image_proj_params=trained["image_proj"],
                                    attention_params=attention_params_by_index(trained["attn2"]))
    want = {k: v.shape for k, v in start.to_state_dict().items()}
    have = {k: v.shape for k, v in candidate.to_state_dict().items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: {have[k]}, the starting adapter's is {want[k]}" for k in sorted(set(want) & set(have))
                 if have[k] != want[k]]
    if problems:
        raise PMFInputError(f"{source} does not match the adapter it started from ({start.source}): "
                            + "; ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""))
    return dataclasses.replace(candidate, source=source)


def export_ip_adapter(trained: Dict[str, Any], cfg, out, *, dtype=None, link: bool = False,
                      allow_pickle: bool = False) -> Path:
    """Writes ``out/ip_adapter/ip_adapter.safetensors`` and ``out/image_encoder/`` (module docstring); returns the
    weight file. ``out`` may exist (an export being written); those two may not.

    Args:
      trained: the run's ``ip_adapter`` part (numpy or jax arrays): ``{"image_proj": ..., "attn2": ...}``; None:
        a run that sampled with ``model.ip_adapter`` without training it (the file is written as it was read).
      cfg: the run's :class:`~pmf_jax.config.Config` (``model.ip_adapter``: the starting adapter, for its kind and
        shapes; ``model.image_encoder``: the encoder folder to copy).
      dtype: of the written tensors (e.g. ``np.float16``); default the trained tree's (float32).
      link: symlink the image encoder's files instead of copying them.
      allow_pickle: read a starting adapter that is a torch pickle.
    Raises:
      PMFInputError: ``out/ip_adapter`` or ``out/image_encoder`` exists, the starting adapter or the image encoder cannot be found, or the
        trained tree does not match the starting adapter.
    """
    from pmf_jax.training.image_prompt import image_encoder_folder, ip_adapter_file

    m = cfg.model
    if not m.ip_adapter:
        raise PMFInputError("the run has no model.ip_adapter (it was not trained in reference.mode=ip_adapter)")
    start = load_ip_adapter(ip_adapter_file(m.ip_adapter), allow_pickle=allow_pickle)
    adapter = start if trained is None else trained_adapter(start, trained)
    encoder = image_encoder_folder(m)
    folder, encoder_out = Path(out) / IP_ADAPTER_FOLDER, Path(out) / IMAGE_ENCODER_FOLDER
    for path in (folder, encoder_out):
        if path.exists():
            raise PMFInputError(f"{path} already exists")
    folder.mkdir(parents=True)
    weights = folder / WEIGHT_NAME
    save_file(adapter.to_state_dict(None if dtype is None else np.dtype(dtype)), str(weights),
              metadata={"format": "pt"})
    copy_model_folder(encoder, encoder_out, link=link)
    return weights


__all__ = ["IMAGE_ENCODER_FOLDER", "IP_ADAPTER_FOLDER", "WEIGHT_NAME", "export_ip_adapter", "trained_adapter"]
