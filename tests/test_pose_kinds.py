"""pmf_jax.pose.inputs.resolve_pose by pose kind: the one place a target pose is read (CLI and pipelines alike)."""

import numpy as np
import pytest
from PIL import Image

from pmf_jax.constants import POSE_KINDS
from pmf_jax.errors import PMFInputError
from pmf_jax.pose import render_pose, write_openpose_json
from pmf_jax.pose.inputs import PoseCondition, fit_transform, resolve_pose, source_keypoints_on_canvas
from pose_fixtures import fake_detector, spread_joints

SIZE = (64, 48)


@pytest.fixture()
def poses(tmp_path):
    """A JSON file, a skeleton PNG and a noise "photo" PNG of the same person; the keypoints [18, 3]."""
    kps = spread_joints(128, 96)
    skeleton = render_pose(kps, 128, 96)
    photo = np.random.default_rng(0).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    Image.fromarray(skeleton).save(tmp_path / "skeleton.png")
    Image.fromarray(photo).save(tmp_path / "photo.png")
    return {"json": write_openpose_json(tmp_path / "pose.json", kps, height=128, width=96), "kps": kps,
            "skeleton": tmp_path / "skeleton.png", "photo": tmp_path / "photo.png", "photo_array": photo}


def test_every_kind_is_known_and_others_are_errors(poses):
    for kind in POSE_KINDS:
        path = poses["json"] if kind in ("auto", "keypoints") else poses["skeleton"]
        assert resolve_pose(path, SIZE, "pad", kind).image.shape == (*SIZE, 3)
    with pytest.raises(PMFInputError, match="pose_kind='doodle' must be one of auto, image, skeleton, keypoints"):
        resolve_pose(poses["json"], SIZE, "pad", "doodle")


def test_keypoints_kind_takes_json_or_arrays_only(poses):
    for pose in (poses["skeleton"], poses["photo_array"]):
        with pytest.raises(PMFInputError, match="needs an OpenPose .json file"):
            resolve_pose(pose, SIZE, pose_kind="keypoints")
    from_json = resolve_pose(poses["json"], SIZE, pose_kind="keypoints")
    assert from_json.kind == "json"
    from_array = resolve_pose(poses["kps"], SIZE, pose_kind="keypoints", pose_size=(128, 96))
    np.testing.assert_array_equal(from_array.image, from_json.image)


@pytest.mark.parametrize("kind", ["image", "skeleton"])
def test_image_kinds_refuse_json(poses, kind):
    with pytest.raises(PMFInputError, match=f"pose_kind='{kind}' needs an image file, got '.*pose.json'"):
        resolve_pose(poses["json"], SIZE, pose_kind=kind)


def test_image_kind_is_auto_for_images(poses):
    auto = resolve_pose(poses["skeleton"], SIZE, "crop")
    image = resolve_pose(poses["skeleton"], SIZE, "crop", "image")
    assert auto.kind == image.kind == "skeleton"
    np.testing.assert_array_equal(image.image, auto.image)


def test_skeleton_kind_takes_any_image_as_is(poses):
    """No detector is needed: the photo is the skeleton, fitted like the source; paths, arrays and PIL agree."""
    expected = fit_transform((80, 60), SIZE, "pad").image(poses["photo_array"])
    for pose in (poses["photo"], poses["photo_array"], Image.open(poses["photo"])):
        cond = resolve_pose(pose, SIZE, "pad", "skeleton")
        assert cond.kind == "skeleton" and cond.keypoints is None
        np.testing.assert_array_equal(cond.image, expected)
    with pytest.raises(PMFInputError, match="pose image"):
        resolve_pose(poses["photo"].with_name("missing.png"), SIZE, pose_kind="skeleton")


def test_a_pose_condition_passes_through_at_its_size(poses):
    cond = resolve_pose(poses["json"], SIZE)
    for kind in POSE_KINDS:
        assert resolve_pose(cond, SIZE, pose_kind=kind) is cond
    with pytest.raises(PMFInputError, match="the output size is"):
        resolve_pose(cond, (32, 32))
    assert isinstance(cond, PoseCondition)


def test_align_to_detects_the_source_with_the_same_detector(poses):
    """align_to= the source image is source_keypoints= its detected joints on the canvas; one detector for both."""
    detector = fake_detector()
    source = np.zeros((100, 80, 3), np.uint8)
    on_canvas = source_keypoints_on_canvas(source, SIZE, "pad", detector=detector)
    expected = resolve_pose(poses["json"], SIZE, source_keypoints=on_canvas)
    for kind in ("auto", "keypoints"):
        aligned = resolve_pose(poses["json"], SIZE, pose_kind=kind, align_to=source, detector=detector)
        np.testing.assert_array_equal(aligned.keypoints, expected.keypoints)
    # "skeleton" with alignment reads the joints of the skeleton image, like "auto"
    skeleton = resolve_pose(poses["skeleton"], SIZE, pose_kind="skeleton", align_to=source, detector=detector)
    assert skeleton.keypoints is not None
    with pytest.raises(PMFInputError, match="not both"):
        resolve_pose(poses["json"], SIZE, align_to=source, source_keypoints=on_canvas, detector=detector)
