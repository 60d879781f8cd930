"""OpenPose detections cached by the content of the image they come from: a driving video's frames go through the
detector once, whatever path or clip they are read from again.

The key is the SHA-256 of the frame's pixels (uint8 [H, W, 3], its shape included) and the detector's settings; the
value, ``<cache>/<key[:2]>/<key>.npy``, is the body keypoints float32 [P, 18, 3] in pixels of the frame. The folder
is ``$PMF_POSE_CACHE_DIR``, else ``~/.cache/pmf_jax/poses``. Entries are written under a temporary name and renamed,
so a killed run never leaves a truncated one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

CACHE_ENV = "PMF_POSE_CACHE_DIR"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pmf_jax" / "poses").expanduser()


def frame_key(image: np.ndarray, settings: str) -> str:
    """The content hash of one frame under the detector ``settings`` (e.g. its weights and resolution)."""
    image = np.ascontiguousarray(image, np.uint8)
    digest = hashlib.sha256(f"{image.shape}|{settings}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def cached_body(image: np.ndarray, detect: Callable[[np.ndarray], np.ndarray], settings: str,
                folder: Optional[Path] = None) -> np.ndarray:
    """``detect(image)`` (body keypoints [P, 18, 3]) through the cache."""
    folder = Path(folder) if folder is not None else cache_dir()
    key = frame_key(image, settings)
    path = folder / key[:2] / f"{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # unreadable entry: detect again and replace it
    body = np.asarray(detect(image), np.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npy", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, body)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the detection next time
    return body
