"""The OpenPose COCO-18 body layout: joint order, left/right swap, limbs and colours, and keypoint geometry.

A keypoint array is float32 ``[..., 18, 3]``: ``x`` (column) and ``y`` (row) in pixels of its image with pixel centres
at integers, and a confidence in ``[0, 1]``. Confidence 0 marks a missing joint, whose ``x, y`` are stored as 0.
"""

from __future__ import annotations

import numpy as np

from pmf_jax.errors import PMFInputError

# OpenPose body order (the "COCO" model with a neck joint); the person's right is on the image left when facing us.
KEYPOINT_NAMES = (
    "nose", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)  # fmt: skip
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

# FLIP_PERMUTATION[i] is the joint that takes the place of joint i after a horizontal flip.
FLIP_PERMUTATION = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)

# The 17 limbs OpenPose draws (0-based joint pairs), in its drawing order; limb i is drawn in COLORS[i] * 0.6.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip

# RGB; joint j is drawn in COLORS[j] (the palette of the OpenPose / ControlNet skeleton images).
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


def check_keypoints(keypoints, name: str = "keypoints") -> np.ndarray:
    """Validates and returns keypoints as float32 ``[..., 18, 3]``; raises PMFInputError naming ``name`` if not."""
    array = np.asarray(keypoints, dtype=np.float32)
    if array.ndim < 2 or array.shape[-2:] != (NUM_KEYPOINTS, 3):
        raise PMFInputError(f"{name}: expected keypoints of shape [..., {NUM_KEYPOINTS}, 3], got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise PMFInputError(f"{name}: keypoints contain NaN or infinite values")
    return array


def clear_missing(keypoints: np.ndarray) -> np.ndarray:
    """Sets ``x, y`` of joints with confidence <= 0 to 0 (and their confidence to exactly 0). Returns a new array."""
    keypoints = np.array(keypoints, dtype=np.float32, copy=True)
    missing = keypoints[..., 2] <= 0
    keypoints[missing] = 0.0
    return keypoints


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Keypoints of the horizontally mirrored image (``image[:, ::-1]``) of width ``width``.

    Mirrors ``x -> width - 1 - x`` and swaps left and right joints, so that joint 2 (right shoulder) of the result is
    the mirrored joint 5 (left shoulder) of the input. Shape ``[..., 18, 3]`` in and out.
    """
    keypoints = check_keypoints(keypoints)
    flipped = keypoints[..., FLIP_PERMUTATION, :].copy()
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return clear_missing(flipped)


def affine_keypoints(
    keypoints: np.ndarray,
    scale: tuple[float, float],
    offset: tuple[float, float],
    size: tuple[int, int],
) -> np.ndarray:
    """Maps keypoints through an axis-aligned resize / crop / pad of their image.

    In pixel-centre coordinates ``x' = (x + 0.5) * scale_x - 0.5 + offset_x`` (same for y), which is what resizing by
    ``scale``, then shifting by ``offset`` (a crop at x0 is ``offset_x = -x0 * scale_x``, a pad is ``+pad``) does to
    pixel positions. Joints that leave the ``size = (height, width)`` frame become missing.

    Args:
      keypoints: float32 ``[..., 18, 3]``.
      scale: ``(scale_x, scale_y)``.
      offset: ``(offset_x, offset_y)`` in output pixels.
      size: ``(height, width)`` of the output image.
    Returns:
      float32 ``[..., 18, 3]``.
    """
    keypoints = check_keypoints(keypoints)
    out = keypoints.copy()
    for axis in (0, 1):
        out[..., axis] = (keypoints[..., axis] + 0.5) * scale[axis] - 0.5 + offset[axis]
    height, width = size
    inside = (out[..., 0] >= -0.5) & (out[..., 0] < width - 0.5) & (out[..., 1] >= -0.5) & (out[..., 1] < height - 0.5)
    out[..., 2] = np.where(inside, out[..., 2], 0.0)
    return clear_missing(out)


def select_person(people: np.ndarray) -> np.ndarray:
    """The main person of ``[P, 18, 3]`` keypoints: the one with the largest summed confidence. ``[18, 3]``;
    all-missing when P is 0."""
    people = check_keypoints(people)
    if people.ndim != 3:
        raise PMFInputError(f"keypoints: expected [P, {NUM_KEYPOINTS}, 3], got {people.shape}")
    if len(people) == 0:
        return np.zeros((NUM_KEYPOINTS, 3), np.float32)
    return clear_missing(people[int(np.argmax(np.clip(people[..., 2], 0, None).sum(-1)))])
