"""Writes dummy_data/: a tiny fake TikTok download in the real layout (NNNNN/images/*.png + openpose_json/).

    python data/tiktok_pairs/make_dummy_data.py [OUT_DIR]

Videos 00001 and 00002 (train) and 00335 (test by default), 3 portrait 40x24 frames each, a flat colour per video.
The JSON files use both namings (``0001.json``, ``0002_keypoints.json``); frame 0001 of video 00002 holds two
people (the second, more confident one is the dancer) and frame 0003 of video 00335 holds nobody.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pmf_jax.pose.openpose_json import write_openpose_json

VIDEOS = {"00001": (200, 40, 40), "00002": (40, 200, 40), "00335": (40, 40, 200)}
FRAMES = ("0001", "0002", "0003")
HEIGHT, WIDTH = 40, 24


def person(video: str, frame: int, confidence: float = 0.9) -> np.ndarray:
    """Deterministic keypoints ``[18, 3]`` in pixels of a 40x24 frame; ears missing."""
    rng = np.random.default_rng([int(video), frame])
    keypoints = np.zeros((18, 3), np.float32)
    keypoints[:, 0] = rng.integers(1, WIDTH - 1, 18)
    keypoints[:, 1] = rng.integers(1, HEIGHT - 1, 18)
    keypoints[:, 2] = confidence
    keypoints[16:] = 0.0
    return keypoints


def people(video: str, frame: int) -> np.ndarray:
    if video == "00335" and frame == 3:
        return np.zeros((0, 18, 3), np.float32)
    if video == "00002" and frame == 1:
        return np.stack([person("9", 9, confidence=0.2), person(video, frame)])
    return person(video, frame)[None]


def main(out: Path) -> None:
    for video, colour in VIDEOS.items():
        (out / video / "images").mkdir(parents=True, exist_ok=True)
        (out / video / "openpose_json").mkdir(parents=True, exist_ok=True)
        for f, frame in enumerate(FRAMES, start=1):
            image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            image[:] = colour
            image[10:30, 8:16] = (255, 255, 255)
            Image.fromarray(image).save(out / video / "images" / f"{frame}.png")
            name = f"{frame}.json" if f % 2 else f"{frame}_keypoints.json"
            write_openpose_json(out / video / "openpose_json" / name, people(video, f), HEIGHT, WIDTH)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "dummy_data")
