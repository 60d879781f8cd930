"""Body keypoints in the OpenPose COCO-18 layout: the joint table, OpenPose JSON files and skeleton rendering.

Keypoints are float32 arrays ``[18, 3]`` (or ``[P, 18, 3]`` for P people): ``x, y`` in pixels of the image they
belong to (column, row; pixel centres at integers) and a confidence; confidence 0 means the joint is missing.
"""

from pmf_jax.pose.keypoints import (
    COLORS,
    FLIP_PERMUTATION,
    KEYPOINT_NAMES,
    LIMBS,
    NUM_KEYPOINTS,
    affine_keypoints,
    check_keypoints,
    flip_keypoints,
    select_person,
)
from pmf_jax.pose.openpose_json import read_canvas_size, read_openpose_json, write_openpose_json
from pmf_jax.pose.render import line_widths_for, render_pose

__all__ = [
    "COLORS",
    "FLIP_PERMUTATION",
    "KEYPOINT_NAMES",
    "LIMBS",
    "NUM_KEYPOINTS",
    "affine_keypoints",
    "check_keypoints",
    "flip_keypoints",
    "line_widths_for",
    "read_canvas_size",
    "read_openpose_json",
    "render_pose",
    "select_person",
    "write_openpose_json",
]
