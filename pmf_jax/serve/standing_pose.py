"""The pose the page's joint editor starts from when the source's own pose is not detected: a person standing and
facing us, arms a little away from the body; also the pose of the server's warm-up generation."""

from __future__ import annotations

import numpy as np

# (x, y) of each COCO-18 joint in a unit square around the figure (pmf_jax.pose.keypoints.KEYPOINT_NAMES order).
UNIT_POSE = np.array([
    (0.50, 0.12), (0.50, 0.22),
    (0.40, 0.23), (0.36, 0.38), (0.34, 0.52),
    (0.60, 0.23), (0.64, 0.38), (0.66, 0.52),
    (0.44, 0.52), (0.43, 0.72), (0.42, 0.92),
    (0.56, 0.52), (0.57, 0.72), (0.58, 0.92),
    (0.48, 0.10), (0.52, 0.10), (0.46, 0.11), (0.54, 0.11),
], np.float32)  # fmt: skip
FILL = 0.9  # the square's side, as a fraction of the image's shorter side


def standing_pose(height: int, width: int) -> np.ndarray:
    """float32 ``[18, 3]`` in pixels of a ``height x width`` image: :data:`UNIT_POSE` in a centred square of
    :data:`FILL` times the shorter side; every joint visible."""
    side = FILL * min(height, width)
    origin = np.array([(width - side) / 2.0, (height - side) / 2.0], np.float32)
    xy = origin + UNIT_POSE * side - 0.5  # pixel centres at integers
    return np.concatenate([xy, np.ones((len(xy), 1), np.float32)], axis=1)


__all__ = ["FILL", "UNIT_POSE", "standing_pose"]
