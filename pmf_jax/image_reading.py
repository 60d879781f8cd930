"""Images from outside (files, PIL images, arrays) -> the uint8 RGB ``[H, W, 3]`` the models read, and the pixel limit.

The one place that reads an image: :func:`pmf_jax.pipelines.images.load_image` (sources, poses, ``pmf enhance``),
``pmf pose extract``, ``pmf eval score`` and the dataset builders all come here. PIL and numpy only (no JAX).

Every PIL mode is read with its own meaning, never clipped:

- ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's conversion to RGB;
- ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit gray, e.g. a 16-bit PNG): ``round(v · 255 / 65535)``, so the
  16-bit value ``257 · k`` reads as ``k``; uint16 arrays likewise;
- ``I`` (32-bit integers): read as 16-bit data (16-bit PNG and TIFF files decode to it in some Pillow versions),
  clipped to [0, 65535];
- ``F`` (32-bit float): in [0, 1], like float arrays (clipped; NaN reads as 0);
- alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, a palette with alpha, or a transparent colour key in ``P`` /
  ``L`` / ``RGB``): composited onto **white**. A transparent cut-out is meant to be seen on a page, and white is the
  background of the studio photos the models learn from (DeepFashion); black would turn dark clothes into the
  background. Pose images pass ``background=BLACK`` first: an OpenPose skeleton is drawn on black
  (:func:`pmf_jax.pose.inputs.resolve_pose`).

16-bit RGB(A) PNG files are decoded to 8 bits by Pillow itself (the high byte of each sample, so ``257 · k`` -> ``k``
as above).

The pixel limit (:func:`max_image_pixels`: ``constants.MAX_IMAGE_PIXELS``, or ``$PMF_MAX_IMAGE_PIXELS``) is checked
from a file's header, before anything is decoded (:func:`read_image_file`; PIL's own decompression-bomb check is off
while the header is read, so that this is the one limit), and by whatever allocates an image of a size the user asked
for (:func:`check_pixel_count`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pmf_jax import constants
from pmf_jax.errors import PMFInputError

WHITE = 255  # the background that transparent pixels are composited onto (module docstring)
BLACK = 0    # ... for OpenPose skeleton images, whose background is black
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_PIL_LIMIT_LOCK = threading.Lock()


def max_image_pixels() -> int:
    """The pixel limit: ``$PMF_MAX_IMAGE_PIXELS`` if set (a positive integer), else ``constants.MAX_IMAGE_PIXELS``."""
    text = os.environ.get(constants.MAX_IMAGE_PIXELS_ENV)
    if text is None or not text.strip():
        return constants.MAX_IMAGE_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise PMFInputError(f"${constants.MAX_IMAGE_PIXELS_ENV}={text!r} must be a positive number of pixels")
    return value


def check_pixel_count(height: int, width: int, what: str) -> None:
    """PMFInputError naming ``what`` when a ``height x width`` image would exceed :func:`max_image_pixels`."""
    limit = max_image_pixels()
    if int(height) * int(width) > limit:
        raise PMFInputError(
            f"{what} is {int(width)}x{int(height)} = {int(width) * int(height):,} pixels, more than the limit of "
            f"{limit:,} (set ${constants.MAX_IMAGE_PIXELS_ENV} to raise it)")


def read_image_file(path, name: str = "image", background: int = WHITE) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of an image file: size checked against the pixel limit from the header, then decoded,
    EXIF rotation applied, every mode converted as the module docstring says.

    Raises:
      PMFInputError: naming ``name`` and the path when the file is missing, over the pixel limit or not a readable
        image.
    """
    path = Path(path).expanduser()
    where = f"{name} {str(path)!r}"
    if not path.is_file():
        raise PMFInputError(f"{where} not found" if not path.exists() else f"{where} is not a file")
    try:
        with _PIL_LIMIT_LOCK:  # PIL's own check off while it reads the header: ours, with the size, is the one
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        with image:
            check_pixel_count(image.height, image.width, where)  # the header's size; nothing decoded yet
            return pil_to_rgb8(ImageOps.exif_transpose(image), name, background)
    except PMFInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:  # what PIL raises for damaged files
        raise PMFInputError(f"{where} is not a readable image ({err})") from None


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparency: an alpha band, a palette with alpha or a transparent colour key."""
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def pil_to_rgb8(image: Image.Image, name: str = "image", background: int = WHITE) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a PIL image of any mode (module docstring)."""
    if image.mode == "F" or image.mode in SIXTEEN_BIT_MODES:
        array = np.asarray(image)
        if image.mode != "F":
            array = np.clip(array, 0, 65535).astype(np.uint16)
        return array_to_rgb8(array, name, background)
    if has_alpha(image):
        return array_to_rgb8(np.asarray(image.convert("LA" if image.mode in ("LA", "La") else "RGBA")), name, background)
    return np.asarray(image.convert("RGB"))


def array_to_rgb8(array, name: str = "image", background: int = WHITE) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of an array ``[H, W]``, ``[H, W, 1]`` (gray), ``[H, W, 2]`` (gray + alpha),
    ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA) of uint8, uint16 (16-bit: ``round(v · 255 / 65535)``) or float in
    [0, 1]; alpha composited onto white."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16 or array.dtype == np.dtype(">u2"):
        array = ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        array = np.round(np.clip(np.nan_to_num(array.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise PMFInputError(f"{name}: arrays must be uint8, uint16 or float in [0, 1], got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise PMFInputError(f"{name}: expected an image array [H, W, 3] (or [H, W], [H, W, 1|2|4]), got shape "
                            f"{array.shape}")
    color = array[..., :-1] if array.shape[-1] in (2, 4) else array
    if color.shape[-1] == 1:
        color = np.repeat(color, 3, axis=-1)
    if array.shape[-1] in (2, 4):
        alpha = array[..., -1:].astype(np.uint32)
        color = ((color.astype(np.uint32) * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(color)
