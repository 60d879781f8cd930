"""``pmf pose extract|render``: OpenPose keypoints from a photo or doodle, and skeleton images from keypoints.

Also home of the pose-input flags shared with ``pmf retarget`` (``add_pose_input_arguments`` /
``pose_condition_from_args``), so both commands spell and treat them the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pmf_jax.commands.options import positive_int
from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import check_pixel_count
from pmf_jax.out_folder import check_out_file, staged_file
from pmf_jax.pose import detect, inputs
from pmf_jax.pose.openpose_json import read_canvas_size, read_openpose_json, write_openpose_json

# OpenPose JSON keys of the optional parts, with their point counts.
_EXTRA_PARTS = {
    "left_hand": ("hand_left_keypoints_2d", detect.NUM_HAND_KEYPOINTS),
    "right_hand": ("hand_right_keypoints_2d", detect.NUM_HAND_KEYPOINTS),
    "face": ("face_keypoints_2d", detect.NUM_FACE_KEYPOINTS),
}


def _output_path(path: str, name: str) -> Path:
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise PMFInputError(f"{name} {str(path)!r}: folder {str(path.parent)!r} does not exist")
    return check_out_file(path, name)  # a folder or a read-only location fails here, before any work


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    with staged_file(path) as tmp:  # written whole or not at all
        Image.fromarray(array).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# Flags shared with `pmf retarget`


def add_pose_input_arguments(parser) -> None:
    """Adds the target-pose options (besides ``--pose`` itself): ``--align-skeleton``, ``--detector-weights``,
    ``--hands``, ``--face``. ``add_fit_argument`` adds ``--pose-fit``."""
    parser.add_argument("--align-skeleton", action="store_true",
                        help="redraw the target pose with the source person's bone lengths (keeps the target's joint "
                             "angles and position); runs the OpenPose detector on the source image")  # fmt: skip
    add_detector_arguments(parser)


def add_fit_argument(parser) -> None:
    parser.add_argument("--pose-fit", choices=inputs.FIT_MODES, default="pad",
                        help="how inputs of another aspect ratio are brought to the output size: 'pad' (resize to fit, "
                             "letterbox) or 'crop' (resize to cover, centre-crop); default pad")  # fmt: skip


def add_detector_arguments(parser) -> None:
    parser.add_argument("--detector-weights", default=detect.DEFAULT_DETECTOR_WEIGHTS, metavar="PATH|ID",
                        help=f"folder (or cached Hub repo id) with the OpenPose weights {detect.BODY_FILE} "
                             f"(+ {detect.HAND_FILE}, {detect.FACE_FILE} for --hands/--face); "
                             f"default {detect.DEFAULT_DETECTOR_WEIGHTS} from the Hugging Face cache")  # fmt: skip
    parser.add_argument("--hands", action="store_true", help="also detect and draw hands")
    parser.add_argument("--face", action="store_true", help="also detect and draw the face")


def pose_condition_from_args(args, source_image: np.ndarray, size: tuple[int, int]) -> inputs.PoseCondition:
    """The target pose ``args.pose`` on the ``size`` canvas, per ``--pose-kind`` (if the command has it) and the
    ``add_pose_input_arguments`` / ``add_fit_argument`` options: :func:`pmf_jax.pose.inputs.resolve_pose`.
    ``source_image`` (uint8 ``[H, W, 3]``, before fitting) is what ``--align-skeleton`` aligns to."""
    return inputs.resolve_pose(args.pose, size, getattr(args, "pose_fit", "pad"), getattr(args, "pose_kind", "auto"),
                               align_to=source_image if args.align_skeleton else None,
                               detector_weights=args.detector_weights, hands=args.hands, face=args.face)


# ----------------------------------------------------------------------------------------------------------------
# pmf pose extract / render


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pose", help="extract OpenPose keypoints from an image, or render keypoints as a skeleton image",
        description="OpenPose keypoints (COCO-18) <-> skeleton images.",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="pose_command", metavar="{extract,render}", required=True)

    extract = commands.add_parser(
        "extract", help="detect people in a photo or doodle and write their keypoints as OpenPose JSON",
        description="Detect people in a reference photo or a doodled stick figure with the OpenPose detector "
                    "(controlnet_aux) and write their COCO-18 keypoints, in pixels of the image, as OpenPose JSON.",
    )  # fmt: skip
    extract.add_argument("--image", required=True, metavar="IMG", help="the photo or stick-figure doodle")
    extract.add_argument("--out", required=True, metavar="JSON", help="OpenPose JSON file to write")
    extract.add_argument("--render", metavar="PNG", help="also write the skeleton image (the image's size)")
    add_detector_arguments(extract)
    extract.add_argument("--device", default="cpu", help="torch device for the detector (default cpu)")

    render = commands.add_parser(
        "render", help="draw OpenPose JSON keypoints as the coloured skeleton image ControlNet reads",
        description="Draw the people of an OpenPose JSON file as an OpenPose skeleton image (black background, "
                    "coloured limbs). The size defaults to the file's canvas_width/canvas_height; another size "
                    "is reached with --pose-fit.",
    )  # fmt: skip
    render.add_argument("--json", required=True, metavar="JSON", help="OpenPose JSON file (COCO-18 or BODY_25)")
    render.add_argument("--out", required=True, metavar="PNG", help="skeleton image to write")
    render.add_argument("--width", type=positive_int, help="output width (default: the JSON's canvas_width)")
    render.add_argument("--height", type=positive_int, help="output height (default: the JSON's canvas_height)")
    add_fit_argument(render)
    return parser


def run(args) -> int:
    if args.pose_command == "extract":
        return run_extract(args)
    return run_render(args)


def run_extract(args) -> int:
    out = _output_path(args.out, "--out")
    render_path = _output_path(args.render, "--render") if args.render else None
    image = inputs.read_image(args.image, "--image")
    if detect.is_skeleton_image(image):
        print(f"note: {args.image} looks like an OpenPose skeleton image already; it can be passed as a pose as is",
              file=sys.stderr)  # fmt: skip
    detector = detect.load_detector(args.detector_weights, hands=args.hands, face=args.face, device=args.device)
    found = detect.detect_poses(image, detector, hands=args.hands, face=args.face)
    with staged_file(out) as tmp:
        write_detection_json(tmp, found)
    if render_path is not None:
        _save_png(detect.render_detection(found), render_path)
    visible = int((found.body[..., 2] > 0).sum())
    print(f"{found.num_people} {'person' if found.num_people == 1 else 'people'} ({visible} joints) -> {out}"
          + (f", {render_path}" if render_path else ""))  # fmt: skip
    return 0


def write_detection_json(path: Path, found: detect.PoseDetection) -> None:
    """OpenPose JSON with the body keypoints, plus ``hand_*_keypoints_2d`` / ``face_keypoints_2d`` when detected."""
    write_openpose_json(path, found.body, height=found.height, width=found.width)
    extras = {key: getattr(found, part) for part, (key, _) in _EXTRA_PARTS.items() if getattr(found, part) is not None}
    if not extras:
        return
    data = json.loads(path.read_text())
    for p, person in enumerate(data["people"]):
        for key, points in extras.items():
            person[key] = [round(float(v), 3) for v in points[p].reshape(-1)]
    path.write_text(json.dumps(data))


def _read_extra_parts(path: Path, people: int) -> dict:
    """Hand / face keypoints stored next to the body in an OpenPose JSON file (None for absent parts)."""
    data = json.loads(path.read_text())
    parts = {}
    for part, (key, count) in _EXTRA_PARTS.items():
        values = [person.get(key) for person in data["people"]]
        if not any(values):
            parts[part] = None
            continue
        array = np.zeros((people, count, 3), np.float32)
        for p, v in enumerate(values):
            if v:
                if len(v) != 3 * count:
                    raise PMFInputError(f"{path}: people[{p}].{key} has {len(v)} numbers, expected {3 * count}")
                array[p] = np.asarray(v, np.float32).reshape(count, 3)
        parts[part] = array
    return parts


def run_render(args) -> int:
    out = _output_path(args.out, "--out")
    path = Path(args.json)
    people = read_openpose_json(path)
    canvas = read_canvas_size(path)
    if (args.width is None) != (args.height is None):
        raise PMFInputError("give both --width and --height, or neither (then the JSON's canvas size is used)")
    size = (args.height, args.width) if args.width is not None else canvas
    if size is None:
        raise PMFInputError(f"{path} has no canvas_width/canvas_height; give --width and --height")
    check_pixel_count(*size, "the skeleton image (--height x --width, default the JSON's canvas)")
    frame = canvas or size
    found = detect.PoseDetection(people, height=frame[0], width=frame[1], **_read_extra_parts(path, len(people)))
    # Drawn on the output canvas after the fit, so the line widths suit the output size.
    image = detect.render_detection(inputs.fit_transform(frame, size, args.pose_fit).detection(found))
    _save_png(image, out)
    print(f"{len(people)} {'person' if len(people) == 1 else 'people'} -> {out} ({size[1]}x{size[0]})")
    return 0
