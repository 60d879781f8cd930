"""deepfashion_pairs: DeepFashion In-shop pose-transfer pairs (the PATN / GFLA / PIDM / CFLD / PCDMs protocol).

Reads a manual download (see README.md): the image tree and PATN's pair and keypoint CSVs. Images are stored at the
config's size (256x176 or 512x352) and the 256x176 keypoints are rescaled to it. Square low-resolution ``img/``
images (256x256 with white side margins) are first cropped to the central 176/256 of their width, as PATN did.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

import pairs_common
from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import read_image_file
from pmf_jax.pose.keypoints import affine_keypoints

from . import annotations as ann

IMAGE_FOLDERS = ("img_highres", "img")  # the first one present is used


@dataclasses.dataclass
class DeepFashionConfig(tfds.core.BuilderConfig):
    height: int = 256
    width: int = 176


class Builder(pairs_common.PairsBuilder):
    """DeepFashion In-shop Clothes Retrieval pose-transfer pairs (train 101,966 / test 8,570 with PATN's files)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        DeepFashionConfig(name="256x176", height=256, width=176, description="256x176 (the usual benchmark size)"),
        DeepFashionConfig(name="512x352", height=512, width=352, description="512x352 from img_highres"),
    ]
    DEFAULT_CONFIG_NAME = "256x176"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put into the manual dir (see data/deepfashion_pairs/README.md):
      img_highres/ or img/        the In-shop image tree, e.g. img/MEN/Denim/id_00000080/01_1_front.jpg
      fasion-resize-pairs-train.csv, fasion-resize-pairs-test.csv
      fasion-resize-annotation-train.csv, fasion-resize-annotation-test.csv
    """

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return self.dataset_info_from_configs(
            features=pairs_common.pair_features(config.height, config.width, encoding_format="jpeg"),
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
            citation="""@inproceedings{liu2016deepfashion,
  title={DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich Annotations},
  author={Liu, Ziwei and Luo, Ping and Qiu, Shi and Wang, Xiaogang and Tang, Xiaoou},
  booktitle={CVPR}, year={2016}}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        image_root = next((manual_dir / f for f in IMAGE_FOLDERS if (manual_dir / f).is_dir()), None)
        if image_root is None:
            raise PMFInputError(f"{manual_dir}: no image folder ({' or '.join(IMAGE_FOLDERS)}); see the README")
        images = ann.index_images(image_root)
        # Everything is checked before anything is written, so a bad file fails in seconds.
        return {split: self._generate_examples(resolve_pairs(manual_dir, split, images)) for split in ("train", "test")}

    def _generate_examples(self, pairs):
        size = (self.builder_config.height, self.builder_config.width)
        load = functools.lru_cache(maxsize=64)(lambda path: load_image(path, size))  # pairs reuse images
        for lineno, (source, target) in pairs:
            example = {"person_id": ann.person_id(source["name"])}
            for part, item in (("source", source), ("target", target)):
                example[f"{part}_image"] = pairs_common.jpeg_file(load(item["path"]))
                example[f"{part}_keypoints"] = scale_keypoints(item["keypoints"], size)
                example[f"{part}_name"] = item["name"]
            yield f"{lineno:07d}", example


def resolve_pairs(manual_dir: Path, split: str, images: dict[str, Path]):
    """``[(line number, (source, target))]``, each ``{"name", "path", "keypoints" [18, 3] in 256x176}``."""
    pairs_file = manual_dir / f"fasion-resize-pairs-{split}.csv"
    annotation_file = manual_dir / f"fasion-resize-annotation-{split}.csv"
    keypoints = ann.read_annotations(annotation_file)
    resolved = []
    for lineno, *names in ann.read_pairs(pairs_file):
        items = []
        for name in names:
            if name not in keypoints:
                raise PMFInputError(f"{pairs_file}:{lineno}: {name} has no keypoints in {annotation_file.name}")
            if name not in images:
                where = f"the image tree under {manual_dir}"
                raise PMFInputError(f"{pairs_file}:{lineno}: image {name} not found in {where}")
            items.append({"name": name, "path": str(images[name]), "keypoints": keypoints[name][1]})
        resolved.append((lineno, tuple(items)))
    return resolved


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[H, W, 3]``: the image, centre-cropped to the 176:256 aspect if wider than that, resized to ``size``."""
    image = Image.fromarray(read_image_file(path, "image"))
    ann_h, ann_w = ann.ANNOTATION_SIZE
    w, h = image.size
    keep = round(h * ann_w / ann_h)
    if w > keep + 2:  # e.g. 256x256 img/ -> the central 176 columns
        left = (w - keep) // 2
        image = image.crop((left, 0, left + keep, h))
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def scale_keypoints(keypoints: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """256x176 keypoints -> pixels of a ``size`` image (float32 ``[18, 3]``)."""
    ann_h, ann_w = ann.ANNOTATION_SIZE
    return affine_keypoints(keypoints, scale=(size[1] / ann_w, size[0] / ann_h), offset=(0.0, 0.0), size=size)
