"""`pmf pose extract|render` as a user runs them (subprocesses): outputs, help, and one-line errors (exit 2)."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pmf_jax.pose import COLORS, LIMBS

# A person facing the camera on a 192 x 256 canvas, limbs well apart (so every limb's middle shows its own colour).
POSE = {
    0: (96, 36), 1: (96, 60), 2: (66, 62), 3: (44, 100), 4: (30, 140), 5: (126, 62), 6: (148, 100), 7: (162, 140),
    8: (80, 140), 9: (76, 190), 10: (72, 240), 11: (112, 140), 12: (116, 190), 13: (120, 240),
    14: (88, 26), 15: (104, 26), 16: (76, 30), 17: (116, 30),
}  # fmt: skip
HEIGHT, WIDTH = 256, 192


def _pmf(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pmf_jax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def _read_png(path):
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def _check_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def pose_json(tmp_path):
    keypoints = [v for j in range(18) for v in (*POSE[j], 1.0)]
    path = tmp_path / "pose.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": keypoints}], "canvas_width": WIDTH,
                                "canvas_height": HEIGHT}))  # fmt: skip
    return path


def _check_drawing(image, points):
    for j, (x, y) in points.items():
        assert tuple(image[int(y), int(x)]) == COLORS[j], f"joint {j}"
    for i, (a, b) in enumerate(LIMBS):
        x, y = (np.asarray(points[a]) + points[b]) / 2
        assert tuple(image[int(y), int(x)]) == tuple(int(c * 0.6) for c in COLORS[i]), f"limb {a}-{b}"


def test_render_draws_limb_colours_in_place(tmp_path, pose_json):
    out = tmp_path / "skeleton.png"
    result = _pmf("pose", "render", "--json", pose_json, "--out", out)
    assert result.returncode == 0, result.stderr
    image = _read_png(out)
    assert image.shape == (HEIGHT, WIDTH, 3)
    _check_drawing(image, POSE)
    assert (image.max(-1) == 0).mean() > 0.8  # black background
    # Another size: letterboxed (bars left and right), everything moved by the same fit.
    result = _pmf("pose", "render", "--json", pose_json, "--out", out, "--width", 512, "--height", 512)
    assert result.returncode == 0, result.stderr
    image = _read_png(out)
    assert image.shape == (512, 512, 3)
    scale, offset = 2.0, (512 - 2 * WIDTH) // 2
    moved = {j: ((x + 0.5) * scale - 0.5 + offset, (y + 0.5) * scale - 0.5) for j, (x, y) in POSE.items()}
    _check_drawing(image, moved)
    assert not image[:, :offset].any() and not image[:, -offset:].any()


def test_extract_with_random_weights_folder(tmp_path):
    import torch

    from pmf_jax.pose import detect

    torch.manual_seed(0)
    model = detect.controlnet_aux_open_pose().model.bodypose_model()
    weights = tmp_path / "Annotators"
    weights.mkdir()
    torch.save({k.split(".", 1)[1]: v for k, v in model.state_dict().items()}, weights / detect.BODY_FILE)
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(photo), cv2.GaussianBlur(rng.integers(0, 256, (150, 110, 3), dtype=np.uint8), (9, 9), 3))
    out, render = tmp_path / "pose.json", tmp_path / "pose.png"

    result = _pmf("pose", "extract", "--image", photo, "--detector-weights", weights, "--out", out, "--render", render)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # Random weights: whatever was found, the file is OpenPose JSON of COCO-18 people in the photo's pixels.
    assert (data["canvas_height"], data["canvas_width"]) == (150, 110)
    assert isinstance(data["people"], list)
    assert all(len(p["pose_keypoints_2d"]) == 54 for p in data["people"])
    assert _read_png(render).shape == (150, 110, 3)
    assert f"-> {out}" in result.stdout

    # Missing weights: one line saying where to put them.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _pmf("pose", "extract", "--image", photo, "--detector-weights", empty, "--out", out)
    _check_one_line_error(result, "body_pose_model.pth", "lllyasviel/Annotators", "--detector-weights")


def test_help_and_bad_inputs(tmp_path, pose_json):
    for args in (("pose", "--help"), ("pose", "extract", "--help"), ("pose", "render", "--help")):
        result = _pmf(*args)
        assert result.returncode == 0 and "usage: pmf pose" in result.stdout, result.stderr
    out = tmp_path / "out.png"
    _check_one_line_error(_pmf("pose", "render", "--json", tmp_path / "nope.json", "--out", out), "nope.json")
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"people": []}))
    _check_one_line_error(_pmf("pose", "render", "--json", bare, "--out", out), "--width and --height")
    _check_one_line_error(_pmf("pose", "render", "--json", pose_json, "--out", out, "--width", 64),
                          "--width and --height")  # fmt: skip
    _check_one_line_error(_pmf("pose", "render", "--json", pose_json, "--out", tmp_path / "no" / "x.png"), "--out")
    _check_one_line_error(_pmf("pose", "extract", "--image", tmp_path / "nope.png", "--out", tmp_path / "p.json"),
                          "nope.png")  # fmt: skip
    not_image = tmp_path / "text.png"
    not_image.write_text("hello")
    _check_one_line_error(_pmf("pose", "extract", "--image", not_image, "--out", tmp_path / "p.json"), "text.png")
    result = _pmf("pose", "render", "--json", pose_json, "--out", out, "--width", "-3", "--height", 8)
    assert result.returncode == 2 and "must be positive" in result.stderr  # argparse's own usage error


def test_pose_flags_shared_with_retarget(tmp_path, pose_json):
    """The options `pmf retarget` takes over: --pose-fit / --align-skeleton / --detector-weights (in-process)."""
    import argparse

    from pmf_jax.commands import pose as pose_command
    from pmf_jax.errors import PMFInputError

    parser = argparse.ArgumentParser()
    parser.add_argument("--pose")
    pose_command.add_pose_input_arguments(parser)
    pose_command.add_fit_argument(parser)
    source = np.zeros((100, 80, 3), np.uint8)
    args = parser.parse_args(["--pose", str(pose_json), "--pose-fit", "crop"])
    cond = pose_command.pose_condition_from_args(args, source, (128, 96))
    assert cond.kind == "json" and cond.image.shape == (128, 96, 3)
    scale = 0.5  # 256 x 192 onto 128 x 96: the same aspect, so pad and crop agree
    x, y = ((np.asarray(POSE[4]) + 0.5) * scale - 0.5).astype(int)
    assert tuple(cond.image[y, x]) == COLORS[4]
    # Aligning needs the source person's joints, hence the detector: a clear error without its weights.
    args = parser.parse_args(["--pose", str(pose_json), "--align-skeleton", "--detector-weights", str(tmp_path)])
    with pytest.raises(PMFInputError, match="body_pose_model.pth"):
        pose_command.pose_condition_from_args(args, source, (128, 96))
