"""Host-side image handling for the pipelines (PIL + numpy + OpenCV, no JAX import, so the CLI checks inputs fast).

Conventions: images are uint8 ``[H, W, 3]`` RGB arrays (or PIL); float arrays are in [0, 1]. Resolutions are
multiples of 8; when the caller gives none, the model's **native resolution** is used (what it was trained at:
:func:`pmf_jax.pipelines.defaults.native_size`), and for models whose native long side is
:data:`BUCKETING_MIN_SIDE` or more the source image's aspect ratio picks one of a small set of **resolution buckets**
(every side one of :data:`BUCKETS` or the native long side), so a run compiles for a few shapes only.
Inputs of another aspect ratio are fitted with :func:`pmf_jax.pose.inputs.fit_transform` — ``"pad"`` (letterbox;
photos padded by repeating their border, skeletons with black) or ``"crop"`` — the same transform for the source
image and the pose, so they stay aligned.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import WHITE, array_to_rgb8, check_pixel_count, pil_to_rgb8, read_image_file

BUCKETS: Tuple[int, ...] = (256, 384, 512, 640, 768)  # allowed side lengths when the size is chosen for the user
DEFAULT_LONG_SIDE = 512  # the bucket's long side when the model's native resolution is unknown
BUCKETING_MIN_SIDE = 512  # models trained at a smaller size sample at their native size only
MULTIPLE = 8  # SD's VAE downscale factor: every height/width must be a multiple of it

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def load_image(image: ImageLike, name: str = "image", background: int = WHITE) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` from a path (size checked against the pixel limit before decoding, EXIF rotation
    applied), a PIL image of any mode, or an array (uint8, uint16 or float in [0, 1]; gray, gray + alpha, RGB or
    RGBA): :mod:`pmf_jax.image_reading` (16-bit scaled to 8 bits, alpha composited onto ``background``, white
    by default).

    Raises:
      PMFInputError: naming ``name`` and the path when the file is missing, too large or not a readable image.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        if not path.is_file():
            raise PMFInputError(f"{name}: file {str(path)!r} does not exist")
        return read_image_file(path, name, background)
    if isinstance(image, Image.Image):
        return pil_to_rgb8(image, name, background)
    return array_to_rgb8(image, name, background)


def check_resolution(height: Optional[int], width: Optional[int]) -> None:
    """Both or neither given; positive multiples of 8, within the pixel limit (:mod:`pmf_jax.image_reading`)."""
    if (height is None) != (width is None):
        raise PMFInputError("give both height and width, or neither (then a resolution bucket is chosen)")
    if height is None:
        return
    for key, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % MULTIPLE:
            raise PMFInputError(f"{key}={value!r} must be a positive multiple of {MULTIPLE}")
    check_pixel_count(height, width, "the requested size (height x width)")


def bucket_size(height: int, width: int, long_side: int = DEFAULT_LONG_SIDE,
                buckets: Sequence[int] = BUCKETS) -> Tuple[int, int]:
    """The bucket (H, W) for an image of ``height x width``: scaled so its long side is ``long_side``, then every
    side snapped to the nearest bucket value (ties to the smaller)."""
    scale = long_side / max(height, width)
    snap = lambda side: min(buckets, key=lambda b: (abs(b - side * scale), b))  # noqa: E731
    return snap(height), snap(width)


def resolve_size(image_shape: Sequence[int], height: Optional[int], width: Optional[int],
                 native: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """(H, W): the given size (checked); else the model's ``native`` (H, W) when its long side is below
    :data:`BUCKETING_MIN_SIDE`; else the bucket of an image of shape ``image_shape`` ([H0, W0, ...]) with the native
    long side (:data:`DEFAULT_LONG_SIDE` when ``native`` is None: unknown)."""
    check_resolution(height, width)
    if height is not None:
        return int(height), int(width)
    if native is not None and max(native) < BUCKETING_MIN_SIDE:
        return int(native[0]), int(native[1])
    long_side = int(max(native)) if native is not None else DEFAULT_LONG_SIDE
    return bucket_size(int(image_shape[0]), int(image_shape[1]), long_side, sorted(set(BUCKETS) | {long_side}))


def describe_size(size: Tuple[int, int], height: Optional[int], native: Optional[Tuple[int, int]]) -> str:
    """One line saying which size :func:`resolve_size` chose and why (the CLI prints it)."""
    if height is not None:
        why = "as given"
    elif native is not None and max(native) < BUCKETING_MIN_SIDE:
        why = "the model's native resolution"
    elif native is not None:
        why = f"the source's aspect-ratio bucket for the model's native {native[0]}x{native[1]}"
    else:
        why = f"the source's aspect-ratio bucket (long side {DEFAULT_LONG_SIDE}; the model records no native size)"
    return f"size: {size[0]}x{size[1]} ({why})"


def fit_image(image: np.ndarray, size: Tuple[int, int], fit: str = "pad"):
    """A photo brought to ``size`` (H, W): ``(uint8 [H, W, 3], FitTransform)``; letterbox bars repeat the border."""
    from pmf_jax.pose.inputs import fit_transform

    transform = fit_transform(image.shape[:2], size, fit)
    return transform.image(image, pad="edge"), transform


def content_box(transform) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of the fitted image's content on the canvas (letterbox bars excluded)."""
    (rh, rw), (oh, ow), (ox, oy) = transform.resized, transform.out_size, transform.offset
    return max(ox, 0), max(oy, 0), min(ox + rw, ow), min(oy + rh, oh)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 in [0, 1]."""
    return np.asarray(image, np.float32) / 255.0


def to_pil(image: np.ndarray) -> Image.Image:
    """float [H, W, 3] in [0, 1] -> PIL (rounded to uint8)."""
    return Image.fromarray(np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8))


def image_row(images: Sequence) -> Image.Image:
    """Images (PIL or uint8 arrays) side by side, each resized to the first one's height."""
    images = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    height = images[0].height
    resized = [im if im.height == height else im.resize((round(im.width * height / im.height), height))
               for im in images]
    grid = Image.new("RGB", (sum(im.width for im in resized), height))
    x = 0
    for im in resized:
        grid.paste(im, (x, 0))
        x += im.width
    return grid
