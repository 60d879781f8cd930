"""OpenPose JSON files: ``{"people": [{"pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...]}, ...]}``.

Coordinates are pixels of the image the file belongs to; a missing joint is ``0, 0, 0``. Files written by OpenPose
with the BODY_25 model (25 joints) are read too and mapped to COCO-18 (mid-hip and feet dropped).
Some editors write coordinates normalised to ``[0, 1]`` together with ``canvas_width``/``canvas_height``; pass
``normalized=True`` to read those.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, check_keypoints, clear_missing

# COCO-18 joint i is BODY_25 joint BODY25_TO_COCO18[i].
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def _person_keypoints(values, path: Path, index: int) -> np.ndarray:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise PMFInputError(f"{path}: people[{index}].pose_keypoints_2d must be a list of numbers")
    if len(values) == 3 * NUM_KEYPOINTS:
        return np.asarray(values, np.float32).reshape(NUM_KEYPOINTS, 3)
    if len(values) == 3 * 25:
        return np.asarray(values, np.float32).reshape(25, 3)[list(BODY25_TO_COCO18)]
    raise PMFInputError(
        f"{path}: people[{index}].pose_keypoints_2d has {len(values)} numbers; expected {3 * NUM_KEYPOINTS} "
        "(COCO-18) or 75 (BODY_25)"
    )


def read_openpose_json(path: str | Path, normalized: bool = False) -> np.ndarray:
    """Reads the body keypoints of every person in an OpenPose JSON file.

    Args:
      path: the ``.json`` file.
      normalized: coordinates in the file are in ``[0, 1]``; they are scaled by the file's ``canvas_width`` and
        ``canvas_height``.
    Returns:
      float32 ``[P, 18, 3]`` (``P`` may be 0): x, y in pixels, confidence; missing joints are all-zero.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PMFInputError(f"{path}: OpenPose JSON file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PMFInputError(f"{path}: not valid JSON ({e})") from None
    keypoints = openpose_people(data, path)
    if normalized:
        try:
            width, height = float(data["canvas_width"]), float(data["canvas_height"])
        except (KeyError, TypeError, ValueError):
            message = "normalized coordinates need numeric 'canvas_width' and 'canvas_height'"
            raise PMFInputError(f"{path}: {message}") from None
        keypoints[..., 0] *= width
        keypoints[..., 1] *= height
    return clear_missing(keypoints)


def openpose_people(data, where) -> np.ndarray:
    """The body keypoints ``[P, 18, 3]`` (``P`` may be 0; pixels as stored) of one OpenPose JSON object ``data``
    (already parsed: a file's, or one frame of a sequence file); ``where`` names it in errors."""
    if not isinstance(data, dict) or not isinstance(data.get("people"), list):
        raise PMFInputError(f"{where}: expected an OpenPose JSON object with a 'people' list")
    people = []
    for i, person in enumerate(data["people"]):
        if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
            raise PMFInputError(f"{where}: people[{i}] has no 'pose_keypoints_2d'")
        people.append(_person_keypoints(person["pose_keypoints_2d"], where, i))
    return np.stack(people) if people else np.zeros((0, NUM_KEYPOINTS, 3), np.float32)


def read_canvas_size(path: str | Path) -> tuple[int, int] | None:
    """``(height, width)`` stored in an OpenPose JSON file (``canvas_height``/``canvas_width``), if any: the frame its
    pixel coordinates are in. Call after ``read_openpose_json`` (which reports unreadable files)."""
    data = json.loads(Path(path).read_text())
    try:
        height, width = int(data["canvas_height"]), int(data["canvas_width"])
    except (KeyError, TypeError, ValueError):
        return None
    return (height, width) if height > 0 and width > 0 else None


def openpose_data(keypoints: np.ndarray, height: int | None = None, width: int | None = None,
                  name: str = "keypoints") -> dict:
    """The OpenPose JSON object of keypoints ``[18, 3]`` (one person) or ``[P, 18, 3]`` (pixel coordinates, rounded to
    3 decimals); ``height``/``width`` of the image, when given, as ``canvas_height``/``canvas_width``."""
    keypoints = clear_missing(check_keypoints(keypoints, name))
    if keypoints.ndim == 2:
        keypoints = keypoints[None]
    data = {
        "version": 1.3,
        "people": [{"person_id": [-1], "pose_keypoints_2d": [round(float(v), 3) for v in person.reshape(-1)]}
                   for person in keypoints],
    }  # fmt: skip
    if height is not None and width is not None:
        data["canvas_height"], data["canvas_width"] = int(height), int(width)
    return data


def write_openpose_json(
    path: str | Path, keypoints: np.ndarray, height: int | None = None, width: int | None = None
) -> Path:
    """Writes keypoints ``[18, 3]`` (one person) or ``[P, 18, 3]`` as an OpenPose JSON file (:func:`openpose_data`)."""
    path = Path(path)
    path.write_text(json.dumps(openpose_data(keypoints, height, width, str(path))))
    return path
