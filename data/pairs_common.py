"""What every pose-pair builder in data/ stores: the feature spec and the array_record default.

Each builder folder imports this module by its bare name: `tfds build data/<name>` and
`pmf_jax.input_pipeline.builder` both put this folder (data/) on ``sys.path`` while importing a builder.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NUM_KEYPOINTS = 18
FILE_FORMAT = "array_record"  # grain reads these by index; tfrecord would need tf.data


def pair_features(height: int, width: int, encoding_format: str) -> tfds.features.FeaturesDict:
    """The common features.

    ``source_image``/``target_image``: uint8 ``[height, width, 3]``; ``source_keypoints``/``target_keypoints``:
    float32 ``[18, 3]`` (x, y in pixels of the stored image, confidence; missing joints 0, 0, 0); ``person_id``,
    ``source_name``, ``target_name``: strings.
    """
    image = lambda: tfds.features.Image(shape=(height, width, 3), encoding_format=encoding_format)  # noqa: E731
    keypoints = lambda: tfds.features.Tensor(shape=(NUM_KEYPOINTS, 3), dtype=np.float32)  # noqa: E731
    return tfds.features.FeaturesDict({
        "source_image": image(),
        "target_image": image(),
        "source_keypoints": keypoints(),
        "target_keypoints": keypoints(),
        "person_id": tfds.features.Text(),
        "source_name": tfds.features.Text(),
        "target_name": tfds.features.Text(),
    })  # fmt: skip


def jpeg_file(image: np.ndarray, quality: int = 95) -> io.BytesIO:
    """uint8 ``[H, W, 3]`` -> an in-memory JPEG file; TFDS stores file objects as they are (no second encode)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return buffer


class PairsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder that writes array_record unless a file format is asked for explicitly."""

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or FILE_FORMAT, **kwargs)
