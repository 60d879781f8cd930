"""pmf_jax.pose.render: pixel-identical to controlnet_aux's draw_bodypose, joints in their colours."""

import numpy as np
import pytest

from pmf_jax.errors import PMFInputError
from pmf_jax.pose import COLORS, LIMBS, line_widths_for, render_pose


def _random_keypoints(rng, height, width, people=1, missing=0.2, integer=False):
    kps = np.zeros((people, 18, 3), np.float32)
    kps[..., 0] = rng.uniform(0, width - 1, (people, 18))
    kps[..., 1] = rng.uniform(0, height - 1, (people, 18))
    if integer:
        kps[..., :2] = np.round(kps[..., :2])
    kps[..., 2] = (rng.random((people, 18)) > missing).astype(np.float32)
    kps[kps[..., 2] == 0] = 0
    return kps


def test_matches_controlnet_aux_draw_bodypose():
    from controlnet_aux.open_pose import util
    from controlnet_aux.open_pose.body import Keypoint

    rng = np.random.default_rng(0)
    for case in range(24):
        height, width = (int(v) for v in rng.integers(48, 320, 2))
        people = _random_keypoints(rng, height, width, people=1 + case % 3, integer=case % 2 == 0)
        ours = render_pose(people, height, width)
        theirs = np.zeros((height, width, 3), np.uint8)
        for person in people:
            # controlnet_aux takes coordinates normalised to [0, 1] and None for missing joints.
            body = [Keypoint(float(x) / width, float(y) / height) if c > 0 else None for x, y, c in person]
            theirs = util.draw_bodypose(theirs, body)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"case {case}: {height}x{width}")
        assert ours.any()


def test_joint_pixels_have_joint_colours_and_limbs_are_dimmed():
    height, width = 96, 80
    kps = np.zeros((18, 3), np.float32)
    # Joints on a well separated grid, so no disc covers another joint.
    for j in range(18):
        kps[j] = (8 + (j % 6) * 12, 10 + (j // 6) * 30, 1.0)
    pose = render_pose(kps, height, width, stick_width=2, radius=3)
    assert pose.dtype == np.uint8 and pose.shape == (height, width, 3)
    for j in range(18):
        np.testing.assert_array_equal(pose[int(kps[j, 1]), int(kps[j, 0])], COLORS[j], err_msg=f"joint {j}")
    # Limb neck(1) -> right hip(8): the middle of the segment has 0.6 x colour of limb 6 unless another limb crosses.
    (a, b) = LIMBS[6]
    mid = ((kps[a, :2] + kps[b, :2]) / 2).astype(int)
    drawn = {tuple(int(c * 0.6) for c in color) for color in COLORS}
    assert tuple(pose[mid[1], mid[0]]) in drawn


def test_missing_joints_are_not_drawn():
    kps = np.zeros((18, 3), np.float32)
    assert not render_pose(kps, 32, 32).any()
    kps[0] = (10, 10, 1.0)  # a nose alone: one disc, no limb
    pose = render_pose(kps, 32, 32, radius=2)
    assert set(map(tuple, pose.reshape(-1, 3))) == {(0, 0, 0), COLORS[0]}
    assert (pose.any(-1)).sum() <= 25


def test_line_widths_and_bad_input():
    assert line_widths_for(512, 512) == (4, 4)
    assert line_widths_for(256, 176) == (4, 4)
    assert line_widths_for(128, 128) == (2, 2)
    assert line_widths_for(64, 64) == (1, 1)
    with pytest.raises(PMFInputError, match="keypoints"):
        render_pose(np.zeros((17, 3)), 8, 8)
    with pytest.raises(PMFInputError, match="canvas"):
        render_pose(np.zeros((18, 3)), 8, 8, canvas=np.zeros((8, 8), np.uint8))
