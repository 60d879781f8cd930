"""tiktok_pairs: frame pairs from the TikTok dancing dataset (one dancer per video; pairs never cross videos).

Manual dir: one folder per video, ``NNNNN/images/*.png``, optionally ``NNNNN/openpose_json/<frame>.json`` (or
``<frame>_keypoints.json``, OpenPose's own naming). Frames without a JSON file get keypoints from the controlnet_aux
OpenPose body model at build time (weights: the ``openpose_weights`` builder argument, else the
``PMF_OPENPOSE_WEIGHTS`` environment variable, else ``<manual_dir>/body_pose_model.pth``).
Frames are resized to fit the config size and zero-padded to it (keypoints follow). Per video, ``pairs_per_video``
(source, target) frame pairs are drawn from ``numpy.random.default_rng([seed, video number])`` among frames with at
least ``min_joints`` detected joints. Videos are split by id (``test_videos``; train = every other video).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

import pairs_common
from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import read_image_file
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, affine_keypoints, select_person
from pmf_jax.pose.openpose_json import read_openpose_json

# Our default held-out videos; override with a TikTokConfig(test_videos=...) to follow another protocol.
TEST_VIDEOS = tuple(range(335, 341))


@dataclasses.dataclass
class TikTokConfig(tfds.core.BuilderConfig):
    size: int = 256
    pairs_per_video: int = 50
    min_joints: int = 4
    seed: int = 0
    test_videos: tuple[int, ...] = TEST_VIDEOS


class Builder(pairs_common.PairsBuilder):
    """TikTok dancing videos (Jafarian & Park, CVPR 2021) as same-person frame pairs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        TikTokConfig(name="256x256", size=256, description="frames fitted into 256x256"),
        TikTokConfig(name="512x512", size=512, description="frames fitted into 512x512"),
    ]
    DEFAULT_CONFIG_NAME = "256x256"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Put the video folders of the TikTok dataset into the manual dir: NNNNN/images/*.png, and optionally
    NNNNN/openpose_json/<frame>.json. See data/tiktok_pairs/README.md.
    """

    def __init__(self, *, openpose_weights: str | None = None, **kwargs):
        self._openpose_weights = openpose_weights or os.environ.get("PMF_OPENPOSE_WEIGHTS")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            features=pairs_common.pair_features(size, size, encoding_format="jpeg"),
            homepage="https://www.yasamin.page/hdnet_tiktok",
            citation="""@inproceedings{jafarian2021tiktok,
  title={Learning High Fidelity Depths of Dressed Humans by Watching Social Media Dance Videos},
  author={Jafarian, Yasamin and Park, Hyun Soo}, booktitle={CVPR}, year={2021}}""",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual_dir = Path(dl_manager.manual_dir)
        videos = sorted(p for p in manual_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if not videos:
            raise PMFInputError(f"{manual_dir}: no video folders (NNNNN/images/*.png); see data/tiktok_pairs/README.md")
        test = set(self.builder_config.test_videos)
        weights = self._openpose_weights or _default_weights(manual_dir)
        return {
            "train": self._generate_examples([v for v in videos if int(v.name) not in test], weights),
            "test": self._generate_examples([v for v in videos if int(v.name) in test], weights),
        }

    def _generate_examples(self, videos: list[Path], weights: str | None):
        config = self.builder_config
        detector = _Detector(weights)
        for video in videos:
            frames = sorted((video / "images").glob("*.png"))
            keypoints = [frame_keypoints(frame, detector) for frame in frames]
            usable = [i for i, k in enumerate(keypoints) if (k[:, 2] > 0).sum() >= config.min_joints]
            if len(usable) < 2:
                continue
            rng = np.random.default_rng([config.seed, int(video.name)])
            for k in range(config.pairs_per_video):
                i, j = rng.choice(usable, size=2, replace=False)
                example = {"person_id": video.name}
                for part, f in (("source", i), ("target", j)):
                    image, kps = fit_frame(frames[f], keypoints[f], config.size)
                    example[f"{part}_image"] = pairs_common.jpeg_file(image)
                    example[f"{part}_keypoints"] = kps
                    example[f"{part}_name"] = f"{video.name}/{frames[f].name}"
                yield f"{video.name}_{k:04d}", example


def _default_weights(manual_dir: Path) -> str | None:
    path = manual_dir / "body_pose_model.pth"
    return str(path) if path.is_file() else None


class _Detector:
    """The controlnet_aux OpenPose body model, loaded on first use (importing it pulls in torch)."""

    def __init__(self, weights: str | None):
        self.weights, self.body = weights, None

    def __call__(self, image: np.ndarray, frame: Path) -> np.ndarray:
        if self.body is None:
            if not self.weights or not Path(self.weights).is_file():
                raise PMFInputError(
                    f"{frame}: no OpenPose JSON beside it and no body_pose_model.pth to detect keypoints; pass "
                    "openpose_weights=..., set PMF_OPENPOSE_WEIGHTS, or put body_pose_model.pth in the manual dir"
                )
            from controlnet_aux.open_pose.body import Body

            self.body = Body(self.weights)
        candidate, subset = self.body(np.ascontiguousarray(image[:, :, ::-1]))  # the model takes BGR
        people = np.zeros((len(subset), NUM_KEYPOINTS, 3), np.float32)
        for p, person in enumerate(self.body.format_body_result(candidate, subset)):
            for j, kp in enumerate(person.keypoints):
                if kp is not None:
                    people[p, j] = (kp.x, kp.y, kp.score)
        return select_person(people)


def frame_keypoints(frame: Path, detector: _Detector) -> np.ndarray:
    """float32 ``[18, 3]`` for a frame, in its pixels: from its OpenPose JSON if present, else detected."""
    json_dir = frame.parent.parent / "openpose_json"
    for candidate in (json_dir / f"{frame.stem}.json", json_dir / f"{frame.stem}_keypoints.json"):
        if candidate.is_file():
            return select_person(read_openpose_json(candidate))
    return detector(_read(frame), frame)


def _read(frame: Path) -> np.ndarray:
    return read_image_file(frame, "frame")


def fit_frame(frame: Path, keypoints: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a frame to fit ``size x size`` (aspect kept), pad with black, centred. uint8 image, ``[18, 3]``."""
    image = _read(frame)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    kps = affine_keypoints(keypoints, scale=(new_w / w, new_h / h), offset=(left, top), size=(size, size))
    return canvas, kps
