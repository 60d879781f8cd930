"""CLIP score of generated images against their text prompt (torchmetrics' ``CLIPScore``), for prompted runs.

``100 * max(cos(E_image, E_text), 0)`` averaged over the images, with a transformers CLIP model read from a local
folder or the Hugging Face cache only (``local_files_only``); nothing is downloaded. The default model is
``openai/clip-vit-base-patch16`` (the one diffusers' evaluation guide uses); any CLIP folder works.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.metrics.availability import MetricUnavailable, require_modules

DEFAULT_CLIP = "openai/clip-vit-base-patch16"


class CLIPScore:
    """Accumulates ``update(images, prompts)``; ``compute()`` gives the mean CLIP score (0-100, higher is better).

    Raises:
      MetricUnavailable: on construction, when the packages or the model folder are missing.
    """

    name = "clip_score"

    def __init__(self, model: Union[str, os.PathLike] = DEFAULT_CLIP, device: Optional[str] = None):
        require_modules("CLIP score", ("torch", "torchmetrics", "transformers"))
        from pmf_jax.io.hub import resolve_folder

        try:
            folder = resolve_folder(model)
        except PMFInputError as err:
            raise MetricUnavailable("CLIP score", f"CLIP model not available locally: {err}") from None
        import torch
        from torchmetrics.multimodal.clip_score import CLIPScore as _CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        try:
            clip = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MetricUnavailable("CLIP score", f"{folder} is not a usable CLIP model folder ({err})") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        adapter = _feature_adapter(clip.eval())
        self.metric = _CLIPScore(model_name_or_path=lambda: (adapter, processor)).to(self.device)
        self.model = str(folder)

    def update(self, images: np.ndarray, prompts: Sequence[str]) -> None:
        """uint8 ``[B, H, W, 3]`` images and their ``B`` prompts."""
        import torch

        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)
        self.metric.update(pixels, list(prompts))

    def compute(self) -> float:
        return float(self.metric.compute())


def _feature_adapter(clip):
    """``clip`` whose ``get_image_features``/``get_text_features`` return the projected embeddings as tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (embeddings in ``pooler_output``) where torchmetrics
    (<= 1.9) expects the tensor that transformers 4 returned.
    """
    import torch

    def tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip
            self.config = clip.config

        def get_image_features(self, *args, **kwargs):
            return tensor(self.clip.get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return tensor(self.clip.get_text_features(*args, **kwargs))

    return Adapter()
