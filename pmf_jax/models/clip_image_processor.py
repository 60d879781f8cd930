"""transformers' ``CLIPImageProcessor`` in numpy: images -> the ``pixel_values`` a CLIP image encoder reads.

:func:`preprocess` follows the settings of a ``preprocessor_config.json`` (:class:`ImageProcessorConfig`): resize
(the shortest side to ``size["shortest_edge"]``, the other ``int(short · long / short_in)``, or to
``size["height"] × size["width"]``), centre crop to ``crop_size`` (top-left at ``int((H - h) / 2)``; zero padding
where the crop is larger), rescale (``rescale_factor``), normalise (``image_mean`` / ``image_std``); NHWC float32 out.

Resampling is Pillow's ``Image.resize`` (bicubic, a = -0.5, or bilinear; the kernel widened by the downscale factor
— antialiasing — and its taps renormalised, horizontal pass first):

* uint8 images go through Pillow's 8-bit arithmetic exactly (22-bit fixed-point weights, each pass rounded and
  clipped to uint8): the result equals transformers 4.x's ``CLIPImageProcessor`` and 5.x's ``CLIPImageProcessorPil``
  (the processor the IP-Adapter image encoders were trained with) to float32 rounding. transformers 5.x's default
  ``CLIPImageProcessor`` resizes with torchvision instead, whose uint8 arithmetic rounds differently: it differs
  from Pillow (and from this function) by one uint8 level (two at most, after both passes) on about 0.4–0.6 % of
  the output pixels (measured on noisy smooth images, 50–640 px sides, 224 px out): up to 0.03 in normalised units,
  ~1.3e-3 relative (‖Δ‖/‖x‖) over an image.
* float images (values in [0, 1], as :mod:`pmf_jax.image_reading`'s float arrays) are resampled in float64 with the
  same weights, no rounding: equal to torchvision's float resize (and so to transformers 5.x's ``CLIPImageProcessor``
  given the same floats × 255) to ~1e-12.

Host-side numpy (no JAX), like :mod:`pmf_jax.image_reading`: each pass sums its taps (4·scale per output pixel)
one at a time, ~10–50 ms for a 640×480 photo to 224 px.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from pmf_jax.errors import PMFInputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BILINEAR, BICUBIC = 2, 3  # PIL.Image.Resampling values, as preprocessor_config.json stores them
PROCESSOR_FILE = "preprocessor_config.json"
PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images (libImaging/Resample.c)
# Processor classes whose settings mean what this file implements.
PROCESSOR_CLASSES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor")
# Keys with no effect on the pixels of an RGB image (metadata, output format, the RGB conversion this module's
# callers already did through pmf_jax.image_reading).
IGNORED_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class", "do_convert_rgb",
                "default_to_square", "return_tensors", "data_format", "input_data_format", "device",
                "disable_grouping", "_processor_class")


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The settings of a ``CLIPImageProcessor`` (defaults as transformers': OpenAI CLIP at 224 px).

    size: ``(shortest_edge,)`` or ``(height, width)``; crop_size: ``(height, width)``.
    """

    do_resize: bool = True
    size: Tuple[int, ...] = (224,)
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: Tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: Tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def for_image_size(cls, image_size: int) -> "ImageProcessorConfig":
        """What diffusers builds for an IP-Adapter whose pipeline has no feature extractor:
        ``CLIPImageProcessor(size=image_size, crop_size=image_size)``."""
        return cls(size=(image_size,), crop_size=(image_size, image_size))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], source: str = "image processor config") -> "ImageProcessorConfig":
        """A parsed ``preprocessor_config.json`` (``size``/``crop_size`` as ints or dicts, as any transformers
        version writes them). Raises PMFInputError naming ``source`` and every setting not implemented."""
        kind = config.get("image_processor_type", config.get("feature_extractor_type"))
        problems = []
        if kind is not None and kind not in PROCESSOR_CLASSES:
            problems.append(f"image_processor_type={kind!r} (only {' / '.join(PROCESSOR_CLASSES)} are implemented)")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in config.items():
            if key in IGNORED_KEYS:
                continue
            if key == "do_pad":
                if value:
                    problems.append("do_pad=True (not implemented)")
            elif key not in fields:
                problems.append(f"unknown key {key!r}")
            elif key == "size":
                kwargs[key] = _size(value, problems, key)
            elif key == "crop_size":
                crop = _size(value, problems, key)
                kwargs[key] = crop * 2 if len(crop) == 1 else crop
            elif key in ("image_mean", "image_std"):
                values = (value,) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
                if len(values) != 3:
                    problems.append(f"{key}={value!r} (needs 3 values, one per RGB channel)")
                kwargs[key] = values
            else:
                kwargs[key] = value
        if kwargs.get("resample", BICUBIC) not in (BILINEAR, BICUBIC):
            problems.append(f"resample={kwargs['resample']!r} (only {BICUBIC} bicubic and {BILINEAR} bilinear are "
                            f"implemented)")
        if problems:
            raise PMFInputError(f"{source}: " + "; ".join(problems))
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, folder, image_size: Optional[int] = None) -> "ImageProcessorConfig":
        """``folder/preprocessor_config.json``; without one, :meth:`for_image_size` (``image_size`` given: the
        encoder's, as diffusers does), else PMFInputError."""
        path = Path(folder) / PROCESSOR_FILE
        if not path.is_file():
            if image_size is None:
                raise PMFInputError(f"{folder} has no {PROCESSOR_FILE}")
            return cls.for_image_size(image_size)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PMFInputError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(config, str(path))

    @property
    def output_size(self) -> Optional[Tuple[int, int]]:
        """(height, width) of every processed image, when the settings fix it (a crop or a fixed resize)."""
        if self.do_center_crop:
            return tuple(self.crop_size)
        if self.do_resize and len(self.size) == 2:
            return tuple(self.size)
        return None


def _size(value, problems: list, key: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, Mapping):
        if set(value) == {"shortest_edge"}:
            return (int(value["shortest_edge"]),)
        if set(value) == {"height", "width"}:
            return (int(value["height"]), int(value["width"]))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    problems.append(f"{key}={value!r} (only an int, {{'shortest_edge': n}} or {{'height', 'width'}} are "
                    f"implemented)")
    return (0,)


def resize_size(height: int, width: int, size: Sequence[int]) -> Tuple[int, int]:
    """transformers' output size: (height, width) for ``size`` = (shortest_edge,) or (height, width)."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(size[0]), int(size[0] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _bicubic(x, a: float = -0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x):
    return np.maximum(1.0 - np.abs(x), 0.0)


FILTERS = {BICUBIC: (_bicubic, 2.0), BILINEAR: (_triangle, 1.0)}  # kernel, support


def resample_taps(in_size: int, out_size: int, resample: int = BICUBIC) -> Tuple[np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs``: for each output pixel, the input indices [out, K] and their weights
    [out, K] (float64, summing to 1; padded taps have weight 0 and index 0)."""
    kernel, support = FILTERS[resample]
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = support * filter_scale
    centers = (np.arange(out_size) + 0.5) * scale
    lo = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C's (int) truncates; arguments are >= -0.5
    hi = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((hi - lo).max())
    index = lo[:, None] + np.arange(taps)[None]
    valid = index < hi[:, None]
    weights = np.where(valid, kernel((index - centers[:, None] + 0.5) / filter_scale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total == 0, 1.0, total), weights)
    return np.where(valid, index, 0), weights


def _fixed_point(weights: np.ndarray) -> np.ndarray:
    """Pillow's ``normalize_coeffs_8bpc``: round half away from zero to PRECISION_BITS fractional bits."""
    scaled = weights * (1 << PRECISION_BITS)
    return np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)


def _resample_axis(image: np.ndarray, out_size: int, axis: int, resample: int, exact_uint8: bool) -> np.ndarray:
    """One pass along ``axis`` (0: rows, 1: columns) of [H, W, C], one tap at a time (no [.., out, K, ..]
    temporary). The 8-bit path sums integers (pixel × fixed-point weight < 2^31, K of them) in float64, which holds
    them exactly, then shifts as Pillow does (floor, clip to 0..255)."""
    index, weights = resample_taps(image.shape[axis], out_size, resample)
    if exact_uint8:
        weights = _fixed_point(weights).astype(np.float64)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    total = None
    for k in range(index.shape[1]):
        term = np.take(image, index[:, k], axis=axis).astype(np.float64) * weights[:, k].reshape(shape)
        total = term if total is None else total + term
    if exact_uint8:
        total = np.floor((total + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS))
        return np.clip(total, 0, 255).astype(np.uint8)
    return total


def resize(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Pillow's ``Image.resize`` of [H, W, C]: uint8 in -> uint8 out with Pillow's 8-bit arithmetic; float in ->
    float64 out (same weights, no rounding). Horizontal pass first, each pass only when that side changes."""
    exact = image.dtype == np.uint8
    out = image if exact else image.astype(np.float64)
    if width != image.shape[1]:
        out = _resample_axis(out, width, 1, resample, exact)
    if height != image.shape[0]:
        out = _resample_axis(out, height, 0, resample, exact)
    return out


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C]: top-left at int((H - height) / 2), zeros around an image smaller than the
    crop (torchvision's padding: the extra pixel of an odd difference at the bottom/right)."""
    h, w = image.shape[:2]
    if height > h or width > w:
        top, left = max(height - h, 0) // 2, max(width - w, 0) // 2
        padded = np.zeros((max(h, height), max(w, width), image.shape[2]), image.dtype)
        padded[top:top + h, left:left + w] = image
        image, (h, w) = padded, padded.shape[:2]
    top, left = int((h - height) / 2), int((w - width) / 2)
    return image[top:top + height, left:left + width]


def _as_images(images) -> list:
    """[H, W, 3] / [B, H, W, 3] array or a sequence of [H, W, 3] arrays -> list of arrays (uint8 or float)."""
    if not isinstance(images, (list, tuple)):
        array = np.asarray(images)
        images = [array] if array.ndim == 3 else list(array) if array.ndim == 4 else [array]
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise PMFInputError(f"image {i} has shape {image.shape}; preprocess takes RGB [H, W, 3] images (read "
                                f"files and other modes with pmf_jax.image_reading)")
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
            raise PMFInputError(f"image {i} has dtype {image.dtype}; preprocess takes uint8 or float in [0, 1]")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise PMFInputError(f"image {i} is empty ({image.shape})")
        out.append(image)
    if not out:
        raise PMFInputError("preprocess got no images")
    return out


def preprocess(images, config: Optional[ImageProcessorConfig] = None) -> np.ndarray:
    """CLIPImageProcessor's ``pixel_values``, NHWC: [B, h, w, 3] float32 (h, w = ``crop_size`` by default).

    images: uint8 [H, W, 3] (0..255) or float [H, W, 3] (0..1), one, a [B, H, W, 3] batch, or a list of any sizes.
    config: :class:`ImageProcessorConfig` (default: transformers' defaults, 224 px).
    """
    config = config or ImageProcessorConfig()
    out = []
    for image in _as_images(images):
        # A float [0, 1] image is brought to the uint8 scale, so both dtypes meet the same rescale_factor.
        image = image if image.dtype == np.uint8 else image.astype(np.float64) * 255.0
        if config.do_resize:
            image = resize(image, *resize_size(image.shape[0], image.shape[1], config.size), config.resample)
        if config.do_center_crop:
            image = center_crop(image, *config.crop_size)
        image = image.astype(np.float64)
        if config.do_rescale:
            image = image * config.rescale_factor
        if config.do_normalize:
            image = (image - np.asarray(config.image_mean)) / np.asarray(config.image_std)
        out.append(image.astype(np.float32))
    if len({im.shape for im in out}) > 1:
        raise PMFInputError(f"the processed images differ in size ({sorted({im.shape[:2] for im in out})}): these "
                            f"settings crop nothing; pass images of one size or set do_center_crop")
    return np.stack(out)
