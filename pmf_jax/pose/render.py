"""Keypoints -> the coloured OpenPose skeleton image that the OpenPose ControlNet is conditioned on.

The drawing is pixel-identical to ``controlnet_aux.open_pose.util.draw_bodypose`` (the annotator used to make the
ControlNet training data): limbs are filled ellipses of half-width ``stick_width`` in 60 % of the limb colour, joints
are discs of ``radius`` in the joint colour, on black, RGB. It is re-implemented with OpenCV here rather than
imported because importing ``controlnet_aux`` pulls in torch and every annotator (seconds per input worker);
``tests/test_pose_render.py`` checks the two against each other.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import check_pixel_count
from pmf_jax.pose.keypoints import COLORS, LIMBS, check_keypoints

# controlnet_aux draws at the detector resolution (512 for ControlNet); these are its widths.
STICK_WIDTH = 4
RADIUS = 4


def line_widths_for(height: int, width: int) -> tuple[int, int]:
    """``(stick_width, radius)`` for a canvas: OpenPose's 4 px from a long side of 256 up (DeepFashion 256x176 and
    ControlNet 512 images), scaled down below that (a 64 px canvas gets 1 px) so that small skeletons are not blobs."""
    side = max(height, width)
    if side >= 256:
        return STICK_WIDTH, RADIUS
    w = max(1, round(STICK_WIDTH * side / 256))
    return w, w


def render_pose(
    keypoints: np.ndarray,
    height: int,
    width: int,
    stick_width: int = STICK_WIDTH,
    radius: int = RADIUS,
    canvas: np.ndarray | None = None,
) -> np.ndarray:
    """Draws one or more skeletons.

    Args:
      keypoints: float ``[18, 3]`` or ``[P, 18, 3]``: x, y in pixels of the ``height x width`` canvas, confidence
        (joints with confidence <= 0 are not drawn, nor are limbs touching them).
      height, width: canvas size in pixels (at most the pixel limit, :func:`pmf_jax.image_reading.max_image_pixels`).
      stick_width: half-width of the limb ellipses in pixels.
      radius: joint disc radius in pixels.
      canvas: optional uint8 ``[height, width, 3]`` to draw on (copied, not modified).
    Returns:
      uint8 ``[height, width, 3]`` RGB.
    """
    keypoints = check_keypoints(keypoints)
    if keypoints.ndim == 2:
        keypoints = keypoints[None]
    if keypoints.ndim != 3:
        raise PMFInputError(f"keypoints: expected [18, 3] or [P, 18, 3], got {keypoints.shape}")
    if canvas is None:
        check_pixel_count(height, width, "the skeleton image")
        canvas = np.zeros((height, width, 3), np.uint8)
    else:
        if canvas.shape != (height, width, 3) or canvas.dtype != np.uint8:
            raise PMFInputError(f"canvas: expected uint8 [{height}, {width}, 3], got {canvas.dtype} {canvas.shape}")
        canvas = canvas.copy()
    for person in keypoints:
        # The same float64 path as controlnet_aux (which stores x / W and multiplies back), so that every int() cut
        # lands on the same pixel.
        xs = person[:, 0].astype(np.float64) / float(width) * float(width)
        ys = person[:, 1].astype(np.float64) / float(height) * float(height)
        visible = person[:, 2] > 0
        for (a, b), color in zip(LIMBS, COLORS):
            if not (visible[a] and visible[b]):
                continue
            dy, dx = ys[a] - ys[b], xs[a] - xs[b]
            length = (dy**2 + dx**2) ** 0.5
            angle = math.degrees(math.atan2(dy, dx))
            center = (int(np.mean(xs[[a, b]])), int(np.mean(ys[[a, b]])))
            polygon = cv2.ellipse2Poly(center, (int(length / 2), stick_width), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
        for j, color in enumerate(COLORS):
            if visible[j]:
                cv2.circle(canvas, (int(xs[j]), int(ys[j])), radius, color, thickness=-1)
    return canvas
