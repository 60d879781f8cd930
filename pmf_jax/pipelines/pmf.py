"""PoseMaster Fusion end to end: the retarget (:class:`~pmf_jax.pipelines.RetargetPipeline`), then the text-guided
enhancement of every result (:class:`~pmf_jax.pipelines.EnhancePipeline`, InstructPix2Pix), optionally masked
(:mod:`pmf_jax.pipelines.enhance_mask`) — what ``pmf retarget --enhance`` runs.

    pmf = PMFPipeline(RetargetPipeline.from_pretrained(...), EnhancePipeline.from_pretrained(...))
    out = pmf(source, pose, prompt="a man", num_images=2, enhance="make it a watercolor", enhance_mask="person")
    out.images, out.enhanced, out.masks          # N retarget results, N enhanced images, N masks

The enhancement edits the results as their PNGs hold them (rounded to uint8), at the retarget's size, each with the
retarget's seed (image n with ``seed`` or ``seed[n]`` as a call of its own: ``enhanced[n]`` equals
``EnhancePipeline(result_n.png, seed=seed)`` with the same mask). Its mask "person" is the target pose of the
result's pair. Where the enhancement model comes from on the command line: :func:`find_enhance_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
from PIL import Image

from pmf_jax import constants
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.enhance_mask import mask_kind
from pmf_jax.pipelines.images import load_image, resolve_size, to_pil

ENHANCE_SUBFOLDER = "enhance"   # an InstructPix2Pix folder inside a model folder: the enhancement's default model


def find_enhance_model(model_folder, enhance_model=None) -> Path:
    """The InstructPix2Pix folder of an enhancement: ``enhance_model`` (a folder or cached Hub repo id) when given,
    else ``<model_folder>/enhance/`` when it holds a UNet; otherwise a one-line :class:`PMFInputError`."""
    from pmf_jax.io.hub import resolve_folder

    if enhance_model is not None:
        folder = resolve_folder(enhance_model)
        if not (folder / "unet").is_dir():
            raise PMFInputError(f"--enhance-model {str(enhance_model)!r} is not an InstructPix2Pix folder (no unet/)")
        return folder
    inside = Path(model_folder) / ENHANCE_SUBFOLDER
    if not (inside / "unet").is_dir():
        raise PMFInputError(f"--enhance needs an InstructPix2Pix model: give --enhance-model FOLDER, or put one in "
                            f"{ENHANCE_SUBFOLDER}/ inside the --model folder")
    return inside


@dataclasses.dataclass(frozen=True)
class PMFOutput:
    """What :class:`PMFPipeline` returns (lists of N, pair-major as the retarget's; PIL images, or float32
    [H, W, 3] arrays in [0, 1] for output_type "np").

    images: the retarget results; poses: the P target poses on the output canvas (``PoseCondition``s, pair order);
    enhanced: the enhanced results (None without an enhancement); masks: where each was edited (PIL "L", 255 =
    edited, or bool [H, W]; all edited for mask "none"; None without an enhancement)."""

    images: List[Any]
    poses: List[Any]
    enhanced: Optional[List[Any]] = None
    masks: Optional[List[Any]] = None


class PMFPipeline:
    """``PMFPipeline(retarget, enhance=None)``: a :class:`~pmf_jax.pipelines.RetargetPipeline` and, for calls with
    ``enhance=``, an :class:`~pmf_jax.pipelines.EnhancePipeline`; both keep their compiled programs between calls."""

    def __init__(self, retarget, enhance=None):
        self.retarget, self.enhance = retarget, enhance

    def __call__(self, source_image, pose, prompt="", *, enhance: Optional[str] = None, enhance_mask=None,
                 enhance_negative_prompt="", enhance_guidance_scale: float = constants.DEFAULT_GUIDANCE_SCALE,
                 image_guidance_scale: float = 1.5, enhance_steps: Optional[int] = None,
                 enhance_scheduler: Optional[str] = None, output_type: str = "pil", progress=False,
                 **retarget_kwargs) -> PMFOutput:
        """Retargets, then (with ``enhance``) enhances every result.

        Args:
          source_image, pose, prompt, retarget_kwargs: as :meth:`RetargetPipeline.__call__` (negative_prompt,
            num_inference_steps, guidance_scale, appearance_guidance_scale, controlnet_conditioning_scale, scheduler,
            height, width, num_images, seed, reference_config, fit, pose_kind, pose_options, latents).
          enhance: the instruction (None: retarget only).
          enhance_mask: as ``mask`` of :meth:`EnhancePipeline.__call__`: None / "none", "person" (each result's
            target pose), "attention", or a user mask (one for all results, or a list of N).
          enhance_negative_prompt, enhance_guidance_scale, image_guidance_scale: the enhancement's.
          enhance_steps, enhance_scheduler: the enhancement's sampling (default: the retarget's).
          output_type: "pil" or "np".
          progress: a progress bar per stage (pmf_jax.progress), or a callable ``(steps done, steps)``.
        """
        from pmf_jax.pipelines.retarget import pairs
        from pmf_jax.pose.inputs import resolve_pose

        if output_type not in ("pil", "np"):
            raise PMFInputError(f"output_type={output_type!r} must be 'pil' or 'np'")
        if enhance is None and mask_kind(enhance_mask) != "none":
            raise PMFInputError("enhance_mask needs an enhancement (enhance=)")
        if enhance is not None:
            if not isinstance(enhance, str) or not enhance.strip():
                raise PMFInputError("enhance: give the instruction, e.g. 'make it a watercolor'")
            if self.enhance is None:
                raise PMFInputError("enhance= needs an EnhancePipeline: PMFPipeline(retarget, enhance)")
        for name in ("output_type", "pose"):
            retarget_kwargs.pop(name, None)
        fit, pose_kind = retarget_kwargs.pop("fit", "pad"), retarget_kwargs.pop("pose_kind", "auto")
        pose_options = retarget_kwargs.pop("pose_options", None) or {}
        sources, poses = pairs(source_image, pose)
        first = load_image(sources[0], "source image")
        size = resolve_size(first.shape, retarget_kwargs.pop("height", None), retarget_kwargs.pop("width", None),
                            self.retarget.native_size)
        resolved = {}  # each distinct pose once (a pose shared by the pairs is read, or detected, once)
        for p in poses:
            if id(p) not in resolved:
                resolved[id(p)] = resolve_pose(p, size, fit, pose_kind, **pose_options)
        conditions = [resolved[id(p)] for p in poses]
        results = self.retarget([first] + sources[1:], conditions, prompt, height=size[0], width=size[1], fit=fit,
                                output_type="np", progress=progress, **retarget_kwargs)
        pixels = [np.asarray(to_pil(image)) for image in results]   # what result_XX.png holds
        images = [Image.fromarray(p) for p in pixels] if output_type == "pil" else results
        if enhance is None:
            return PMFOutput(images, conditions)

        num_images = retarget_kwargs.get("num_images", 1)
        seed = retarget_kwargs.get("seed", 0)
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed] * len(pixels)
        person = mask_kind(enhance_mask) == "person"
        enhanced, masks = self.enhance(
            pixels, enhance, negative_prompt=enhance_negative_prompt,
            num_inference_steps=enhance_steps or retarget_kwargs.get("num_inference_steps", constants.DEFAULT_STEPS),
            guidance_scale=enhance_guidance_scale, image_guidance_scale=image_guidance_scale,
            scheduler=enhance_scheduler or retarget_kwargs.get("scheduler", constants.DEFAULT_SCHEDULER),
            height=size[0], width=size[1], seed=seeds, mask=enhance_mask,
            pose=[conditions[n // num_images] for n in range(len(pixels))] if person else None,
            output_type=output_type, return_mask=True, progress=progress)
        return PMFOutput(images, conditions, list(enhanced), list(masks))


__all__ = ["ENHANCE_SUBFOLDER", "PMFOutput", "PMFPipeline", "find_enhance_model"]
