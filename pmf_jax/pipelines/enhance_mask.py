"""Where a masked enhancement may edit (host side: PIL, numpy, OpenCV; no JAX, so the CLI checks a mask fast).

A mask is a boolean ``[H, W]`` at the enhancement's size, True (white) = edit. Modes (:data:`MASK_MODES`):

  * ``"none"``: the whole image (no mask);
  * ``"person"``: the target pose's skeleton (its non-black pixels), dilated by :data:`PERSON_DILATION` of the
    image's long side (:func:`person_mask`): the person is edited, the background kept;
  * ``"attention"``: where the instruction's words attend in InstructPix2Pix's cross-attention
    (:mod:`pmf_jax.pipelines.cross_attention`), normalised by its maximum and thresholded at
    :data:`ATTENTION_THRESHOLD` (:func:`threshold_map`);
  * a user mask: a path, PIL image or array (white = edit; :func:`read_user_mask`).

The sampler edits latents, so a mask is applied on the latent grid: a latent cell is edited when any of its
``f × f`` pixels is (:func:`latent_mask`, a max-pool), and the mask a run reports is that grid back in pixels
(:func:`pixel_mask`): exactly what was edited.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple, Union

import numpy as np

from pmf_jax.errors import PMFInputError

MASK_MODES = ("none", "person", "attention")
PERSON_DILATION = 1 / 16        # the person mask's dilation radius, a fraction of the image's long side
SKELETON_LEVEL = 16             # a skeleton pixel: any channel above this (rendered limbs are saturated colours)
ATTENTION_THRESHOLD = 0.3       # the attention mask: the map scaled to [0, 1] at least this (as prompt-to-prompt)
WHITE_LEVEL = 128               # a user mask's pixel is white (edit) when its mean over RGB is at least this


def mask_kind(mask) -> str:
    """``"none"``, ``"person"``, ``"attention"`` or ``"user"`` (a path, PIL image or array, or a list of them: one
    per image) for a ``mask`` argument (None: ``"none"``)."""
    if mask is None:
        return "none"
    if isinstance(mask, str) and mask in MASK_MODES:
        return mask
    if isinstance(mask, str) and not Path(mask).suffix:
        raise PMFInputError(f"mask {mask!r} is neither a mode ({', '.join(MASK_MODES)}) nor an image file")
    return "user"


def check_mask_argument(text: str, name: str = "--mask") -> Union[str, Path]:
    """A command line's mask (a mode or a PNG path), checked before any model loads: the mode, or the path of a
    readable, non-empty mask image."""
    if text in MASK_MODES:
        return text
    path = Path(text).expanduser()
    if not path.suffix:
        raise PMFInputError(f"{name} {text!r}: give one of {', '.join(MASK_MODES)} or a mask image (white = edit)")
    white = user_mask_pixels(path, name)
    if not white.any():
        raise PMFInputError(f"{name} {str(path)!r} is all black: nothing would be edited (white = edit)")
    return path


def user_mask_pixels(mask, name: str = "mask") -> np.ndarray:
    """bool [H0, W0] of a user mask (path, PIL image or array; gray, RGB or with alpha: transparent = keep)."""
    from pmf_jax.image_reading import BLACK
    from pmf_jax.pipelines.images import load_image

    if isinstance(mask, np.ndarray) and mask.dtype == bool and mask.ndim == 2:
        return mask
    if isinstance(mask, (str, os.PathLike)) and not Path(mask).expanduser().is_file():
        raise PMFInputError(f"{name}: file {str(mask)!r} does not exist")
    return load_image(mask, name, background=BLACK).mean(axis=-1) >= WHITE_LEVEL


def read_user_mask(mask, image_shape: Tuple[int, int], size: Tuple[int, int], fit: str = "pad",
                   name: str = "mask") -> np.ndarray:
    """A user mask brought to ``size`` (H, W) as its image of shape ``image_shape`` (H0, W0) is (``fit``): bool
    [H, W]. The mask has the image's size, or its aspect ratio (resized, nearest); letterbox bars are kept."""
    from pmf_jax.pose.inputs import fit_transform

    white = user_mask_pixels(mask, name)
    (mh, mw), (ih, iw) = white.shape, tuple(image_shape[:2])
    if (mh, mw) != (ih, iw) and abs(mh * iw - mw * ih) > 0.01 * mw * ih:
        raise PMFInputError(f"{name} is {mw}x{mh} pixels but its image is {iw}x{ih}: give a mask of the image's size "
                            f"(or its aspect ratio)")
    fitted = fit_transform((mh, mw), size, fit).image(white.astype(np.uint8) * 255, pad=0, nearest=True)
    fitted = fitted >= WHITE_LEVEL
    if not fitted.any():
        raise PMFInputError(f"{name} is all black: nothing would be edited (white = edit)")
    return fitted


def person_mask(pose_image: np.ndarray, dilation: float = PERSON_DILATION) -> np.ndarray:
    """The person's region from a pose skeleton (uint8 [H, W, 3], black background): its pixels dilated by a disc
    of radius ``dilation`` · max(H, W) (at least 1 pixel) -> bool [H, W]."""
    import cv2

    pose_image = np.asarray(pose_image)
    skeleton = (pose_image.max(axis=-1) if pose_image.ndim == 3 else pose_image) > SKELETON_LEVEL
    if not skeleton.any():
        raise PMFInputError("the person mask needs a pose with a skeleton: this pose has no visible joints")
    radius = max(1, round(dilation * max(skeleton.shape)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(skeleton.astype(np.uint8), disc) > 0


def latent_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """bool [H, W] pixels -> float32 [H/f, W/f, 1] latent cells, 1 where any of the cell's f × f pixels is edited."""
    h, w = mask.shape[0] // factor, mask.shape[1] // factor
    cells = mask[:h * factor, :w * factor].reshape(h, factor, w, factor).any(axis=(1, 3))
    return cells.astype(np.float32)[..., None]


def pixel_mask(cells: np.ndarray, factor: int) -> np.ndarray:
    """[h, w] or [h, w, 1] latent cells (> 0.5 = edited) -> bool [h·f, w·f] pixels (each cell's f × f block)."""
    cells = np.asarray(cells).reshape(np.shape(cells)[:2]) > 0.5
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1)


def threshold_map(maps: np.ndarray, threshold: float = ATTENTION_THRESHOLD) -> np.ndarray:
    """Attention maps float [N, h, w] -> latent masks float32 [N, h, w, 1]: each map scaled to [0, 1] by its own
    minimum and maximum, 1 where at least ``threshold``. The maximum's cell always is, so a mask is never empty; a
    flat map (no cell stands out) edits the whole image."""
    maps = np.asarray(maps, np.float64)
    flat = maps.reshape(len(maps), -1)
    low, high = flat.min(axis=1).reshape(-1, 1, 1), flat.max(axis=1).reshape(-1, 1, 1)
    span = np.where(high > low, high - low, 1.0)
    return ((maps - low) / span >= np.where(high > low, threshold, 0.0)).astype(np.float32)[..., None]


__all__ = ["ATTENTION_THRESHOLD", "MASK_MODES", "PERSON_DILATION", "check_mask_argument", "latent_mask", "mask_kind",
           "person_mask", "pixel_mask", "read_user_mask", "threshold_map", "user_mask_pixels"]
