"""pmf_jax.pose.align: the aligned pose has the source's bone lengths and the target's bone directions and root."""

import numpy as np
import pytest

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.align import BONES, PARENTS, align_skeleton, overall_scale

NECK, R_SHOULDER, R_ELBOW, R_WRIST, R_HIP, R_KNEE, L_HIP = 1, 2, 3, 4, 8, 9, 11


def _random_pose(rng, center=(128.0, 128.0), scale=1.0):
    """A full pose built along the kinematic tree: random bone directions, bone lengths 10-40 px times ``scale``."""
    kps = np.zeros((18, 3), np.float32)
    kps[NECK] = (*center, 1.0)
    for j in (1, 2, 5, 8, 11, 0, 3, 6, 9, 12, 14, 15, 4, 7, 10, 13, 16, 17):
        if j == NECK:
            continue
        angle, length = rng.uniform(-np.pi, np.pi), rng.uniform(10, 40) * scale
        kps[j, :2] = kps[PARENTS[j], :2] + length * np.array([np.cos(angle), np.sin(angle)])
        kps[j, 2] = rng.uniform(0.3, 1.0)
    return kps


def _length(kps, a, b):
    return float(np.linalg.norm(kps[b, :2].astype(np.float64) - kps[a, :2]))


def _angle(kps, a, b):
    d = kps[b, :2].astype(np.float64) - kps[a, :2]
    return np.arctan2(d[1], d[0])


def _angle_diff(x, y):
    return abs((x - y + np.pi) % (2 * np.pi) - np.pi)


def _check_bone(aligned, target, a, b, length):
    assert abs(_length(aligned, a, b) - length) <= 1.0, f"bone {a}->{b}"
    assert _angle_diff(_angle(aligned, a, b), _angle(target, a, b)) <= 1e-3, f"bone {a}->{b} direction"


@pytest.mark.parametrize("seed", range(5))
def test_full_poses_get_source_lengths_and_target_angles(seed):
    rng = np.random.default_rng(seed)
    target = _random_pose(rng, center=(100.0, 60.0), scale=1.0)
    source = _random_pose(rng, center=(300.0, 200.0), scale=rng.uniform(0.5, 3.0))
    aligned = align_skeleton(target, source)
    assert aligned.dtype == np.float32 and aligned.shape == (18, 3)
    np.testing.assert_array_equal(aligned[:, 2], target[:, 2])  # the target's confidences
    np.testing.assert_allclose(aligned[NECK, :2], target[NECK, :2])  # root position kept
    for a, b in BONES:
        _check_bone(aligned, target, a, b, _length(source, a, b))
    # Aligning a pose to itself changes nothing.
    np.testing.assert_allclose(align_skeleton(target, target), target, atol=1e-3)


def test_source_bone_missing_uses_median_ratio():
    rng = np.random.default_rng(10)
    target = _random_pose(rng)
    source = _random_pose(rng, scale=2.0)
    source[R_ELBOW] = 0  # upper arm and forearm of the source unknown
    aligned = align_skeleton(target, source)
    present = [(a, b) for a, b in BONES if R_ELBOW not in (a, b)]
    ratio = np.median([_length(source, a, b) / _length(target, a, b) for a, b in present])
    assert overall_scale(target, source) == pytest.approx(ratio)
    for a, b in present:
        _check_bone(aligned, target, a, b, _length(source, a, b))
    for a, b in ((R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST)):
        _check_bone(aligned, target, a, b, ratio * _length(target, a, b))
    assert aligned[R_ELBOW, 2] > 0  # present in the target, so present in the result


def test_target_missing_joints_stay_missing():
    rng = np.random.default_rng(11)
    target, source = _random_pose(rng), _random_pose(rng, scale=1.5)
    target[[R_WRIST, 16]] = 0
    aligned = align_skeleton(target, source)
    assert np.all(aligned[[R_WRIST, 16]] == 0)
    assert np.all(aligned[[a for a in range(18) if a not in (R_WRIST, 16)], 2] > 0)
    for a, b in BONES:
        if target[a, 2] > 0 and target[b, 2] > 0:
            _check_bone(aligned, target, a, b, _length(source, a, b))


def test_target_without_neck_roots_at_hip_midpoint():
    rng = np.random.default_rng(12)
    target, source = _random_pose(rng), _random_pose(rng, scale=0.7)
    target[NECK] = 0
    aligned = align_skeleton(target, source)
    assert np.all(aligned[NECK] == 0)
    mid = lambda k: (k[R_HIP, :2].astype(np.float64) + k[L_HIP, :2]) / 2  # noqa: E731
    np.testing.assert_allclose(mid(aligned), mid(target), atol=1e-3)  # the root stays
    _check_bone(aligned, target, R_HIP, L_HIP, _length(source, R_HIP, L_HIP))  # the source's hip width
    for a, b in BONES:
        if a != NECK:
            _check_bone(aligned, target, a, b, _length(source, a, b))
    # Joints hanging from the missing neck keep their offset from the root, scaled by the overall ratio.
    scale = overall_scale(target, source)
    for j in (R_SHOULDER, 5, 0):
        np.testing.assert_allclose(aligned[j, :2], mid(target) + scale * (target[j, :2] - mid(target)), atol=1e-3)


def test_no_root_and_no_common_bones():
    rng = np.random.default_rng(13)
    target, source = _random_pose(rng), _random_pose(rng, scale=2.0)
    only_arm = np.zeros_like(target)
    only_arm[[R_SHOULDER, R_ELBOW, R_WRIST]] = target[[R_SHOULDER, R_ELBOW, R_WRIST]]
    aligned = align_skeleton(only_arm, source)
    assert np.all(aligned[[j for j in range(18) if j not in (R_SHOULDER, R_ELBOW, R_WRIST)]] == 0)
    for a, b in ((R_SHOULDER, R_ELBOW), (R_ELBOW, R_WRIST)):
        _check_bone(aligned, target, a, b, _length(source, a, b))
    # A source without any bone in common: lengths kept (scale 1).
    legs_only = np.zeros_like(source)
    legs_only[[R_HIP, R_KNEE]] = source[[R_HIP, R_KNEE]]
    np.testing.assert_allclose(align_skeleton(only_arm, legs_only), only_arm, atol=1e-3)
    assert np.all(align_skeleton(np.zeros((18, 3)), source) == 0)


def test_several_people_and_bad_shapes():
    rng = np.random.default_rng(14)
    targets = np.stack([_random_pose(rng), _random_pose(rng, center=(40.0, 40.0))])
    faint, source = _random_pose(rng, scale=3.0), _random_pose(rng, scale=1.5)
    faint[:, 2] = 0.05
    aligned = align_skeleton(targets, np.stack([faint, source]))  # the most confident source person is used
    assert aligned.shape == (2, 18, 3)
    for person in range(2):
        np.testing.assert_allclose(aligned[person], align_skeleton(targets[person], source))
        for a, b in BONES:
            _check_bone(aligned[person], targets[person], a, b, _length(source, a, b))
    with pytest.raises(PMFInputError, match="target keypoints"):
        align_skeleton(np.zeros((17, 3)), source)
    with pytest.raises(PMFInputError, match="source keypoints"):
        align_skeleton(targets[0], np.zeros((18, 2)))
