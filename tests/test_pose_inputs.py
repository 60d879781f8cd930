"""pmf_jax.pose.inputs / detect: fitting images and keypoints together, skeleton-image detection, the OpenPose
detector wrapper (real controlnet_aux models with random weights), and target-pose preparation."""

import json

import cv2
import numpy as np
import pytest

from pmf_jax.errors import PMFInputError
from pmf_jax.pose import COLORS, render_pose, write_openpose_json
from pmf_jax.pose import detect, inputs
from pmf_jax.pose.align import PARENTS, align_skeleton
from pmf_jax.pose.inputs import fit_transform
from pose_fixtures import fake_detector, spread_joints

# ----------------------------------------------------------------------------------------------------- helpers


def _pose(rng, height, width, spread=0.25):
    """A plausible-looking random person: bones of ~``spread`` of the short side along the kinematic tree."""
    kps = np.zeros((18, 3), np.float32)
    kps[1] = (width * rng.uniform(0.4, 0.6), height * rng.uniform(0.3, 0.5), 1.0)
    for j in (2, 5, 8, 11, 0, 3, 6, 9, 12, 14, 15, 4, 7, 10, 13, 16, 17):
        angle = rng.uniform(-np.pi, np.pi)
        length = min(height, width) * spread * rng.uniform(0.3, 0.7) * (0.4 if j in (14, 15, 16, 17) else 1.0)
        kps[j, :2] = np.clip(kps[PARENTS[j], :2] + length * np.array([np.cos(angle), np.sin(angle)]), 2,
                             (width - 3, height - 3))  # fmt: skip
        kps[j, 2] = 1.0
    return kps


def _doodle(rng, size=256, color=(0, 0, 0), paper=(255, 255, 255)):
    """A stick figure drawn with one pen on paper."""
    kps = _pose(rng, size, size)
    image = np.full((size, size, 3), paper, np.uint8)
    for a, b in ((1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13)):
        cv2.line(image, tuple(int(v) for v in kps[a, :2]), tuple(int(v) for v in kps[b, :2]), color, 3)
    cv2.circle(image, tuple(int(v) for v in kps[0, :2]), size // 16, color, 3)
    return image


def _jpeg(image, quality=70):
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


# ------------------------------------------------------------------------------------------------------ fitting


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_image_and_keypoints_fit_agree(mode):
    """A dot drawn at a keypoint lands on the transformed keypoint (within 1 px) after the same fit_transform."""
    rng = np.random.default_rng(0 if mode == "pad" else 1)
    checked = 0
    for case in range(12):
        src = tuple(int(v) for v in rng.integers(40, 400, 2))
        out = tuple(int(v) for v in rng.integers(32, 300, 2))
        transform = fit_transform(src, out, mode)
        x, y = (int(rng.integers(src[1] // 4, 3 * src[1] // 4)), int(rng.integers(src[0] // 4, 3 * src[0] // 4)))
        image = np.zeros((*src, 3), np.uint8)
        image[y - 2 : y + 3, x - 2 : x + 3] = 255  # a 5x5 dot centred on pixel (x, y)
        kps = np.zeros((18, 3), np.float32)
        kps[4] = (x, y, 0.8)
        moved, fitted = transform.keypoints(kps), transform.image(image).astype(np.float64)
        assert fitted.shape == (*out, 3)
        assert np.all(moved[[j for j in range(18) if j != 4]] == 0)  # missing joints stay missing
        (sx, sy), (ox, oy) = transform.scale, transform.offset
        unclipped = ((x + 0.5) * sx - 0.5 + ox, (y + 0.5) * sy - 0.5 + oy)
        if moved[4, 2] == 0:  # cropped away (crop mode only)
            assert mode == "crop" and not (0 <= unclipped[0] < out[1] - 0.5 and 0 <= unclipped[1] < out[0] - 0.5)
            continue
        assert moved[4, 2] == pytest.approx(0.8)
        np.testing.assert_allclose(moved[4, :2], unclipped, atol=1e-3)
        margin = 3 * max(sx, sy) + 1
        if not (margin <= unclipped[0] <= out[1] - margin and margin <= unclipped[1] <= out[0] - margin):
            continue  # the dot is partly cut off: its centroid would be biased
        weight = fitted[..., 0]
        rows, cols = np.indices(weight.shape)
        centre = ((cols * weight).sum() / weight.sum(), (rows * weight).sum() / weight.sum())
        assert np.hypot(centre[0] - moved[4, 0], centre[1] - moved[4, 1]) <= 1.0, (case, src, out, centre, moved[4])
        checked += 1
    assert checked >= 6


def test_fit_geometry_pad_and_crop():
    image = np.full((100, 50, 3), 200, np.uint8)
    pad = fit_transform((100, 50), (64, 64), "pad")
    assert pad.resized == (64, 32) and pad.offset == (16, 0) and pad.scale == (0.64, 0.64)
    padded = pad.image(image, pad=(0, 0, 255))
    assert np.all(padded[:, :16] == (0, 0, 255)) and np.all(padded[:, 48:] == (0, 0, 255))
    assert np.all(padded[:, 16:48] == 200)
    edge = image.copy()
    edge[:, 0], edge[:, -1] = 10, 250
    edged = pad.image(edge, pad="edge")
    assert np.all(edged[:, :16] == edged[:, 16:17]) and np.all(edged[:, 48:] == edged[:, 47:48])
    assert edged[0, 0, 0] < 100 and edged[0, -1, 0] > 200
    crop = fit_transform((100, 50), (64, 64), "crop")
    assert crop.resized == (128, 64) and crop.offset == (0, -32)
    assert np.all(crop.image(image) == 200)  # no bars
    # A joint in the cut-away top part of the image becomes missing; one in the middle survives.
    kps = np.zeros((18, 3), np.float32)
    kps[0], kps[1] = (25, 5, 1), (25, 50, 1)
    moved = crop.keypoints(kps)
    assert np.all(moved[0] == 0) and moved[1, 2] == 1
    np.testing.assert_allclose(moved[1, :2], ((25.5 * 1.28) - 0.5, (50.5 * 1.28) - 0.5 - 32))
    with pytest.raises(PMFInputError, match="fit mode"):
        fit_transform((10, 10), (8, 8), "stretch")
    with pytest.raises(PMFInputError, match="expected size"):
        pad.image(np.zeros((10, 10, 3), np.uint8))


# -------------------------------------------------------------------------------------- skeleton image detection


def _positives():
    rng = np.random.default_rng(2)
    from pmf_jax.pose import line_widths_for

    for size in ((64, 64), (256, 176), (512, 512), (768, 512)):
        kps = np.stack([_pose(rng, *size) for _ in range(1 + (size[0] == 768))])
        image = render_pose(kps, *size, *line_widths_for(*size))
        yield f"rendered {size}", image
        yield f"jpeg {size}", _jpeg(image)
        yield f"resized {size}", cv2.resize(image, (size[1] * 3 // 2, size[0] * 3 // 2), interpolation=cv2.INTER_LINEAR)
    # With hands and face, as in controlnet_aux's openpose_full images.
    body = _pose(rng, 512, 512)[None]
    hand = np.concatenate([rng.uniform(200, 300, (1, 21, 2)), np.ones((1, 21, 1))], -1).astype(np.float32)
    face = np.concatenate([rng.uniform(100, 140, (1, 70, 2)), np.ones((1, 70, 1))], -1).astype(np.float32)
    yield "hands and face", detect.render_detection(detect.PoseDetection(body, hand, hand + 40, face, 512, 512))


def _negatives():
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        yield name, getattr(data, name)()[..., :3]
    rng = np.random.default_rng(3)
    yield "pencil doodle", _doodle(rng)
    yield "jpeg doodle", _jpeg(_doodle(rng, 200))
    yield "marker doodle", _doodle(rng, color=(220, 30, 30))
    yield "chalk doodle on black", _doodle(rng, color=(255, 255, 255), paper=(0, 0, 0))
    yield "one-colour stick figure on black", _doodle(rng, color=(255, 0, 0), paper=(0, 0, 0))
    yield "black", np.zeros((64, 64, 3), np.uint8)
    # A flat-colour figure on a dark background (like the synthetic dataset's people).
    figure = np.full((128, 128, 3), (40, 30, 60), np.uint8)
    cv2.rectangle(figure, (50, 30), (78, 90), (200, 40, 40), -1)
    cv2.circle(figure, (64, 20), 10, (230, 190, 160), -1)
    yield "flat figure", figure


def test_skeleton_images_are_recognised():
    for name, image in _positives():
        assert detect.is_skeleton_image(image), (name, detect.skeleton_image_stats(image))


def test_photos_and_doodles_are_not_skeletons():
    for name, image in _negatives():
        assert not detect.is_skeleton_image(image), (name, detect.skeleton_image_stats(image))


def test_keypoints_from_skeleton_image():
    height, width = 240, 200
    kps = spread_joints(height, width)
    kps[[4, 16]] = 0
    recovered = inputs.keypoints_from_skeleton_image(render_pose(kps, height, width))
    np.testing.assert_array_equal(recovered[:, 2] > 0, kps[:, 2] > 0)
    np.testing.assert_allclose(recovered[:, :2], kps[:, :2], atol=1.0)


# -------------------------------------------------------------------------------------- detector weights and use


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A folder laid out like lllyasviel/Annotators holding controlnet_aux's body model with random weights, saved
    the way the real body_pose_model.pth is (keys without controlnet_aux's block prefix)."""
    import torch

    bodypose_model = detect.controlnet_aux_open_pose().model.bodypose_model  # imported quietly
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("Annotators")
    state = bodypose_model().state_dict()
    torch.save({key.split(".", 1)[1]: value for key, value in state.items()}, folder / detect.BODY_FILE)
    return folder


def test_detector_runs_end_to_end_with_random_weights(random_weights):
    files = detect.find_detector_weights(random_weights)
    assert files == {"body": random_weights / detect.BODY_FILE, "hand": None, "face": None}
    assert detect.find_detector_weights(random_weights / detect.BODY_FILE)["body"] == files["body"]
    detector = detect.load_detector(random_weights)
    assert type(detector).__name__ == "OpenposeDetector" and detector.hand_estimation is None
    image = np.random.default_rng(4).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    found = detect.detect_poses(image, detector)
    # Random weights find nothing meaningful; the structure is what is checked here.
    assert isinstance(found, detect.PoseDetection) and (found.height, found.width) == (120, 90)
    assert found.body.dtype == np.float32 and found.body.ndim == 3 and found.body.shape[1:] == (18, 3)
    assert found.left_hand is None and found.right_hand is None and found.face is None
    assert np.all((found.body[..., 2] >= 0) & (found.body[..., 2] <= 1))
    assert detect.render_detection(found).shape == (120, 90, 3)


def test_missing_or_bad_weights_are_clear_errors(tmp_path, random_weights):
    with pytest.raises(PMFInputError, match="body_pose_model.pth.*lllyasviel/Annotators"):
        detect.find_detector_weights(tmp_path)
    with pytest.raises(PMFInputError, match="not found.*body_pose_model.pth"):
        detect.load_detector("nobody/no-such-annotators")
    with pytest.raises(PMFInputError, match="hand_pose_model.pth"):
        detect.find_detector_weights(random_weights, hands=True)
    (tmp_path / detect.BODY_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(PMFInputError, match="not loadable as OpenPose weights"):
        detect.load_detector(tmp_path)
    # The lllyasviel/ControlNet layout is found too.
    nested = tmp_path / "ControlNet" / "annotator" / "ckpts"
    nested.mkdir(parents=True)
    (nested / detect.BODY_FILE).symlink_to(random_weights / detect.BODY_FILE)
    assert detect.find_detector_weights(tmp_path / "ControlNet")["body"] == nested / detect.BODY_FILE


def test_detect_poses_maps_back_to_input_pixels():
    detector = fake_detector()
    image = np.zeros((300, 1000, 3), np.uint8)
    found = detect.detect_poses(image, detector)
    assert detector.body_estimation.shapes == [(512, 1707, 3)]  # detected at a 512 px short side
    assert found.num_people == 1 and found.body.shape == (1, 18, 3)
    j = np.arange(18)
    sx, sy = 1000 / 1707, 300 / 512
    expected = np.stack([(10 + 20 * j + 0.5) * sx - 0.5, (40 + j + 0.5) * sy - 0.5, np.full(18, 0.5)], -1)
    expected[7] = 0  # not in the subset: missing
    np.testing.assert_allclose(found.body[0], expected, atol=1e-3)  # the heatmap scores are the confidences
    with pytest.raises(PMFInputError, match="hands=True"):
        detect.detect_poses(image, detector, hands=True)
    # Hands: controlnet_aux crops around each wrist it can place (only the right one here: joint 7 is missing) and
    # runs the hand model on the crop; a stand-in returns point k at (1 + k, 2 + k) of the crop, point 0 not found.
    detector.hand_estimation = lambda crop: np.array([[0, 0]] + [[1 + k, 2 + k] for k in range(1, 21)], np.float32)
    found = detect.detect_poses(image, detector, hands=True)
    assert found.left_hand.shape == found.right_hand.shape == (1, 21, 3) and found.face is None
    assert not found.left_hand.any()
    right = found.right_hand[0]
    assert np.all(right[0] == 0) and np.all(right[1:, 2] == 1)
    np.testing.assert_allclose(np.diff(right[1:, :2], axis=0), np.tile([[sx, sy]], (19, 1)), atol=1e-4)


# ----------------------------------------------------------------------------------------------- resolve_pose


def test_resolve_pose_from_json_and_arrays(tmp_path):
    kps = spread_joints(200, 100)
    path = write_openpose_json(tmp_path / "pose.json", kps, height=200, width=100)
    size = (64, 64)
    cond = inputs.resolve_pose(path, size, "pad")
    moved = fit_transform((200, 100), size, "pad").keypoints(kps[None])
    assert cond.kind == "json" and cond.image.shape == (64, 64, 3)
    np.testing.assert_allclose(cond.keypoints, moved)
    np.testing.assert_array_equal(cond.image, render_pose(moved, 64, 64, 1, 1))
    for j in range(18):  # every joint drawn at its place in its colour
        x, y = int(moved[0, j, 0]), int(moved[0, j, 1])
        assert tuple(cond.image[y, x]) == COLORS[j]
    # An array in the output frame needs no pose_size; a JSON file without a canvas is taken as the output frame.
    same = inputs.resolve_pose(moved[0], size)
    assert same.kind == "keypoints"
    np.testing.assert_array_equal(same.image, cond.image)
    data = json.loads(path.read_text())
    del data["canvas_width"], data["canvas_height"]
    (tmp_path / "nocanvas.json").write_text(json.dumps(data))
    np.testing.assert_allclose(inputs.resolve_pose(tmp_path / "nocanvas.json", (200, 100)).keypoints, kps[None])
    with pytest.raises(PMFInputError, match="no person"):
        inputs.resolve_pose(np.zeros((18, 3), np.float32), size)


def test_resolve_pose_from_skeleton_image_photo_and_alignment(tmp_path):
    size = (96, 64)
    kps = spread_joints(300, 200)
    skeleton = render_pose(kps, 300, 200)
    cv2.imwrite(str(tmp_path / "skeleton.png"), skeleton[..., ::-1])
    cond = inputs.resolve_pose(tmp_path / "skeleton.png", size, "crop")
    assert cond.kind == "skeleton" and cond.keypoints is None
    np.testing.assert_array_equal(cond.image, fit_transform((300, 200), size, "crop").image(skeleton))

    # Alignment: the target is re-proportioned to the source keypoints (already on the canvas).
    source = _pose(np.random.default_rng(5), *size)
    target = _pose(np.random.default_rng(6), *size)
    aligned = inputs.resolve_pose(target, size, source_keypoints=source)
    np.testing.assert_allclose(aligned.keypoints[0], align_skeleton(target, source), atol=1e-4)
    # A skeleton image being aligned gives up its joints first.
    from_skeleton = inputs.resolve_pose(skeleton, (300, 200), source_keypoints=source)
    assert from_skeleton.kind == "skeleton"
    np.testing.assert_allclose(from_skeleton.keypoints[0], align_skeleton(kps, source), atol=1.5)

    # A photo goes through the detector: a clear error without weights, detection with them.
    photo = np.random.default_rng(7).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    with pytest.raises(PMFInputError, match="body_pose_model.pth"):
        inputs.resolve_pose(photo, size, detector_weights=tmp_path)
    with pytest.raises(PMFInputError, match="no person found"):
        inputs.resolve_pose(photo, size, detector=fake_detector(people=0))
    found = inputs.resolve_pose(photo, (60, 60), detector=fake_detector())
    assert found.kind == "detected" and found.keypoints.shape == (1, 18, 3)
    with pytest.raises(PMFInputError, match="pose image"):
        inputs.resolve_pose(tmp_path / "missing.png", size)


def test_default_weights_come_from_the_hf_cache(tmp_path, random_weights, monkeypatch):
    """No --detector-weights: lllyasviel/Annotators is looked up in the local Hugging Face cache (no network)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--lllyasviel--Annotators"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / detect.BODY_FILE).symlink_to(random_weights / detect.BODY_FILE)  # the cache links to blobs too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert detect.find_detector_weights()["body"] == snapshot / detect.BODY_FILE
    with pytest.raises(PMFInputError, match="facenet.pth"):
        detect.find_detector_weights(face=True)


def test_transparent_pose_images_skeleton_on_black_doodle_on_white(tmp_path):
    from PIL import Image

    skeleton = render_pose(spread_joints(120, 80), 120, 80)
    alpha = np.where(skeleton.any(-1), 255, 0).astype(np.uint8)
    transparent = np.concatenate([skeleton, alpha[..., None]], -1)
    transparent[alpha == 0, :3] = 255  # what an editor may store under transparent pixels
    Image.fromarray(transparent, "RGBA").save(tmp_path / "skeleton.png")
    cond = inputs.resolve_pose(tmp_path / "skeleton.png", (120, 80))
    assert cond.kind == "skeleton"
    np.testing.assert_array_equal(cond.image, skeleton)
    assert inputs.resolve_pose(Image.open(tmp_path / "skeleton.png"), (120, 80)).kind == "skeleton"

    doodle = np.zeros((120, 80, 4), np.uint8)
    doodle[10:110, 38:42, 3] = 255  # black strokes on a transparent page
    doodle[40:44, 10:70, 3] = 255
    Image.fromarray(doodle, "RGBA").save(tmp_path / "doodle.png")
    pixels = inputs.pose_pixels(tmp_path / "doodle.png", "pose image")
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[50, 40].tolist() == [0, 0, 0]
