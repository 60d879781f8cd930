"""The evaluation pairs of a prepared dataset split and the file names generated images get.

A generated image of the pair (source ``A``, target ``B``) is ``<A>___<B>.png`` with the stored names' image
extension dropped and ``/`` (TikTok's ``video/frame`` names) written as ``-``; e.g. DeepFashion's
``fashionWOMENTees_Tanksid0000637003_1front___fashionWOMENTees_Tanksid0000637003_7additional.png``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional, Tuple

from pmf_jax import input_pipeline
from pmf_jax.errors import PMFInputError

SEPARATOR = "___"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Pair:
    index: int          # position in the split (the data source index; seeds derive from it)
    source_name: str
    target_name: str

    @property
    def filename(self) -> str:
        return pair_filename(self.source_name, self.target_name)


def pair_filename(source_name: str, target_name: str) -> str:
    """``<source>___<target>.png`` (see the module docstring)."""

    def stem(name: str) -> str:
        base, ext = os.path.splitext(name)
        return (base if ext.lower() in IMAGE_EXTENSIONS else name).replace("/", "-")

    return f"{stem(source_name)}{SEPARATOR}{stem(target_name)}.png"


def parse_dataset(spec: str) -> Tuple[str, Optional[str]]:
    """``"deepfashion_pairs/256x176"`` -> ``("deepfashion_pairs", "256x176")``; no ``/``: the builder's default."""
    name, _, config = str(spec).partition("/")
    if name not in input_pipeline.DATASETS:
        known = ", ".join(input_pipeline.DATASETS)
        raise PMFInputError(f"--dataset {spec!r}: unknown dataset {name!r}; known: {known}")
    return name, config or None


def resolve_data_dir(data_dir) -> Path:
    """The TFDS data_dir: the given one, else TFDS's default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). A URL
    is kept as one (:func:`pmf_jax.input_pipeline.builder` stages the dataset's files locally)."""
    from pmf_jax import storage

    if data_dir and storage.is_url(data_dir):
        return storage.as_path(data_dir)
    if data_dir:
        return Path(data_dir).expanduser()
    from tensorflow_datasets.core import constants

    return Path(constants.DATA_DIR).expanduser()


def image_source(name: str, config: Optional[str], split: str, data_dir, images: bool = True):
    """A random-access source of the split's examples; ``images=False`` leaves the images undecoded (fast names)."""
    data_dir = resolve_data_dir(data_dir)
    source = input_pipeline.data_source(name, split, data_dir, config)  # checks: built, split exists
    if images:
        return source
    import tensorflow_datasets as tfds

    skip = {key: tfds.decode.SkipDecoding() for key in ("source_image", "target_image")}
    return input_pipeline.builder(name, data_dir, config).as_data_source(split=split, decoders=skip)


def read_pairs(name: str, config: Optional[str], split: str, data_dir) -> List[Pair]:
    """Every pair of the split in data-source order."""
    source = image_source(name, config, split, data_dir, images=False)
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return [Pair(i, text(source[i]["source_name"]), text(source[i]["target_name"])) for i in range(len(source))]


def dataset_size(name: str, config: Optional[str], data_dir) -> Tuple[int, int]:
    """(H, W) of the images the builder config stores."""
    shape = input_pipeline.builder(name, resolve_data_dir(data_dir), config).info.features["target_image"].shape
    return int(shape[0]), int(shape[1])
