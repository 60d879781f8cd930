"""pmf_jax.pose.keypoints and openpose_json: flip table, geometry, person selection, JSON round trips."""

import json

import numpy as np
import pytest

from pmf_jax.errors import PMFInputError
from pmf_jax.pose import FLIP_PERMUTATION, KEYPOINT_NAMES, flip_keypoints, read_openpose_json, write_openpose_json
from pmf_jax.pose.keypoints import affine_keypoints, select_person


def test_flip_table_swaps_left_and_right_names():
    for i, j in enumerate(FLIP_PERMUTATION):
        expected = KEYPOINT_NAMES[i].replace("right", "@").replace("left", "right").replace("@", "left")
        assert KEYPOINT_NAMES[j] == expected
    assert sorted(FLIP_PERMUTATION) == list(range(18))


def test_flip_keypoints_values():
    kps = np.zeros((18, 3), np.float32)
    kps[2] = (10, 20, 0.9)  # right shoulder
    kps[5] = (30, 21, 0.8)  # left shoulder
    kps[0] = (19, 5, 1.0)
    out = flip_keypoints(kps, width=50)
    np.testing.assert_allclose(out[2], (49 - 30, 21, 0.8))  # the mirrored left shoulder is the new right one
    np.testing.assert_allclose(out[5], (49 - 10, 20, 0.9))
    np.testing.assert_allclose(out[0], (30, 5, 1.0))
    assert not out[16].any()  # missing stays missing (not moved to x = 49)
    np.testing.assert_allclose(flip_keypoints(out, 50), kps)


def test_affine_keypoints_resize_crop_and_leaving_the_frame():
    kps = np.zeros((18, 3), np.float32)
    kps[0] = (0, 0, 1)
    kps[1] = (9, 19, 1)
    kps[2] = (3, 3, 1)
    # Resize a 20x10 image to 40x20: pixel centres scale as (x + 0.5) * 2 - 0.5.
    out = affine_keypoints(kps, scale=(2, 2), offset=(0, 0), size=(40, 20))
    np.testing.assert_allclose(out[:3], [(0.5, 0.5, 1), (18.5, 38.5, 1), (6.5, 6.5, 1)])
    # Crop at x0 = y0 = 2 to 8x8 (no resize): joint 1 leaves the frame and becomes missing.
    out = affine_keypoints(kps, scale=(1, 1), offset=(-2, -2), size=(8, 8))
    np.testing.assert_allclose(out[2], (1, 1, 1))
    assert not out[0].any() and not out[1].any()


def test_select_person_takes_the_most_confident():
    people = np.zeros((3, 18, 3), np.float32)
    people[0, :5] = (1, 1, 0.9)
    people[1, :10] = (2, 2, 0.8)
    people[2, :3] = (3, 3, 1.0)
    np.testing.assert_array_equal(select_person(people), people[1])
    assert not select_person(np.zeros((0, 18, 3))).any()


def test_openpose_json_round_trip_and_body25(tmp_path):
    rng = np.random.default_rng(0)
    kps = np.round(rng.uniform(0, 100, (2, 18, 3)), 3).astype(np.float32)
    kps[0, 4] = 0
    path = write_openpose_json(tmp_path / "a.json", kps, height=100, width=90)
    data = json.loads(path.read_text())
    assert data["canvas_height"] == 100 and len(data["people"][1]["pose_keypoints_2d"]) == 54
    np.testing.assert_allclose(read_openpose_json(path), kps, atol=1e-4)

    body25 = np.arange(75, dtype=np.float32).reshape(25, 3) + 1
    (tmp_path / "b.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": body25.ravel().tolist()}]}))
    out = read_openpose_json(tmp_path / "b.json")
    assert out.shape == (1, 18, 3)
    np.testing.assert_array_equal(out[0, 8], body25[9])  # COCO right hip = BODY_25 joint 9 (8 is mid-hip)
    np.testing.assert_array_equal(out[0, 17], body25[18])

    normalized = {"canvas_width": 200, "canvas_height": 100, "people": [{"pose_keypoints_2d": [0.5, 0.5, 1] * 18}]}
    (tmp_path / "c.json").write_text(json.dumps(normalized))
    np.testing.assert_allclose(read_openpose_json(tmp_path / "c.json", normalized=True)[0, 0], (100, 50, 1))


def test_openpose_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PMFInputError, match="bad.json: not valid JSON"):
        read_openpose_json(bad)
    bad.write_text(json.dumps({"people": [{"pose_keypoints_2d": [1, 2, 3]}]}))
    with pytest.raises(PMFInputError, match=r"bad.json: people\[0\].pose_keypoints_2d has 3 numbers"):
        read_openpose_json(bad)
    with pytest.raises(PMFInputError, match="not found"):
        read_openpose_json(tmp_path / "missing.json")
