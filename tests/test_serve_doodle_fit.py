"""The stick-figure fit of `pmf serve`'s doodle panel (pmf_jax.pose.doodle_fit): joints land on the drawn strokes, at
their ends and bends, with OpenPose's left/right, whatever the drawing order and direction."""

import numpy as np
import pytest

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.doodle_fit import fit_doodle
from pmf_jax.pose.keypoints import KEYPOINT_NAMES

J = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
BODY = [name for name in KEYPOINT_NAMES if not name.endswith(("eye", "ear")) and name != "nose"]


def circle(centre, radius, count=20):
    angles = np.linspace(0.0, 2.0 * np.pi, count)
    return np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1).tolist()


def distance_to_strokes(point, strokes):
    """Distance from a point to the nearest segment of the polylines."""
    best = np.inf
    for stroke in strokes:
        s = np.asarray(stroke, float)
        for a, b in zip(s[:-1], s[1:]):
            t = np.clip(np.dot(point - a, b - a) / max(np.dot(b - a, b - a), 1e-12), 0.0, 1.0)
            best = min(best, float(np.linalg.norm(point - (a + t * (b - a)))))
    return best


# A figure facing us: its right arm and leg on the image's left. Bent elbows and knees.
HEAD = ((50.0, 12.0), 6.0)
TORSO = [[50, 18], [50, 50]]
RIGHT_ARM = [[50, 24], [36, 34], [30, 48]]     # elbow at (36, 34)
LEFT_ARM = [[50, 24], [64, 30], [72, 18]]      # raised forearm, elbow at (64, 30)
RIGHT_LEG = [[50, 50], [40, 66], [40, 86]]     # knee at (40, 66)
LEFT_LEG = [[50, 50], [60, 67], [64, 86]]      # knee at (60, 67)


def check_body(kp, strokes, tolerance=1.0):
    for name in BODY:
        assert kp[J[name], 2] == 1.0, name
        assert distance_to_strokes(kp[J[name], :2], strokes) <= tolerance, name


def test_a_stick_figure_with_a_head_circle():
    strokes = [circle(*HEAD), TORSO, RIGHT_ARM, LEFT_ARM, RIGHT_LEG, LEFT_LEG]
    kp = fit_doodle(strokes)
    check_body(kp, strokes)
    near = lambda name, xy, tol=1.5: np.linalg.norm(kp[J[name], :2] - np.asarray(xy)) <= tol  # noqa: E731
    assert near("nose", HEAD[0]) and near("neck", TORSO[0])
    assert near("right_wrist", RIGHT_ARM[-1]) and near("left_wrist", LEFT_ARM[-1])
    assert near("right_ankle", RIGHT_LEG[-1]) and near("left_ankle", LEFT_LEG[-1])
    assert near("right_elbow", RIGHT_ARM[1]) and near("left_elbow", LEFT_ARM[1])
    assert near("right_knee", RIGHT_LEG[1]) and near("left_knee", LEFT_LEG[1])
    # shoulders on the arms near the neck, hips on the legs near the torso's end
    assert 40 < kp[J["right_shoulder"], 0] < 50 < kp[J["left_shoulder"], 0] < 60
    assert 44 < kp[J["right_hip"], 0] < 50 < kp[J["left_hip"], 0] < 56 and 50 < kp[J["right_hip"], 1] < 60
    # the face inside the head circle, eyes above the ears, right on the image's left
    for name in ("right_eye", "left_eye", "right_ear", "left_ear"):
        assert kp[J[name], 2] == 1.0 and np.linalg.norm(kp[J[name], :2] - HEAD[0]) <= HEAD[1] + 0.5, name
    assert kp[J["right_eye"], 0] < 50 < kp[J["left_eye"], 0] and kp[J["right_eye"], 1] < kp[J["right_ear"], 1]


def test_any_order_and_direction_arms_across_the_torso_no_head_and_a_gap():
    arms = [[30, 30], [70, 30]]                        # one stroke crossing the torso
    torso = [[50, 4], [50, 50]][::-1]                  # drawn upwards; its top is the head
    right_leg = [list(p) for p in RIGHT_LEG[::-1]]     # drawn from the foot up
    left_leg = [[51.5, 52.5]] + LEFT_LEG[1:]           # starts 2.5 px off the torso's end
    strokes = [left_leg, arms, right_leg, torso]
    kp = fit_doodle(strokes)
    check_body(kp, strokes)
    assert np.allclose(kp[J["nose"], :2], [50, 4], atol=1.0)
    assert np.allclose(kp[J["neck"], :2], [50, 30], atol=1.0)   # where the arms part
    assert np.allclose(kp[J["right_wrist"], :2], [30, 30], atol=1.0)
    assert np.allclose(kp[J["left_wrist"], :2], [70, 30], atol=1.0)
    assert np.allclose(kp[J["right_ankle"], :2], RIGHT_LEG[-1], atol=1.0)
    assert np.allclose(kp[J["left_ankle"], :2], LEFT_LEG[-1], atol=1.0)
    assert np.allclose(kp[J["left_knee"], :2], LEFT_LEG[1], atol=1.5)
    assert (kp[[J["right_eye"], J["left_eye"], J["right_ear"], J["left_ear"]]] == 0).all()  # no head, no face


def test_missing_limbs_are_missing_and_bad_strokes_are_refused():
    kp = fit_doodle([circle(*HEAD), TORSO, RIGHT_ARM, RIGHT_LEG, LEFT_LEG])  # one arm only
    assert kp[J["left_wrist"], 2] == 0 and kp[J["left_elbow"], 2] == 0 and kp[J["left_shoulder"], 2] == 0
    assert np.allclose(kp[J["right_wrist"], :2], RIGHT_ARM[-1], atol=1.0)
    for strokes, message in (([], "non-empty list"), ([[[1, 2], [3]]], "stroke 0"),
                             ([[[1, float("nan")]]], "finite")):
        with pytest.raises(PMFInputError, match=message):
            fit_doodle(strokes)
