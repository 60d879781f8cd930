"""OpenPose detection through controlnet_aux, and telling skeleton images from photos.

Weights are the ``lllyasviel/Annotators`` files that controlnet_aux's ``OpenposeDetector`` reads:
``body_pose_model.pth`` (body, required), ``hand_pose_model.pth`` (hands) and ``facenet.pth`` (face), in one folder
(the ``lllyasviel/ControlNet`` layout, ``annotator/ckpts/*.pth``, is found too). They come from a local folder or a
repo already in the Hugging Face cache — nothing is downloaded. ``OpenposeDetector.from_pretrained`` is not used
because it insists on all three files; the models are built from controlnet_aux's ``Body``/``Hand``/``Face`` classes
directly, the optional ones only when asked for.

controlnet_aux (and with it torch) is imported on first use only: it is the ``pose`` extra, and importing it takes
seconds.
"""

from __future__ import annotations

import colorsys
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, clear_missing
from pmf_jax.pose.render import line_widths_for, render_pose

DEFAULT_DETECTOR_WEIGHTS = "lllyasviel/Annotators"
BODY_FILE, HAND_FILE, FACE_FILE = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
# Where the files sit inside a weights folder: lllyasviel/Annotators, then lllyasviel/ControlNet.
_WEIGHT_SUBDIRS = ("", "annotator/ckpts")
NUM_HAND_KEYPOINTS, NUM_FACE_KEYPOINTS = 21, 70
# controlnet_aux detects at a short side of 512 px (its ``detect_resolution``); full-size photos would make the body
# model's float64 heatmaps [H, W, 57] take gigabytes.
DETECT_RESOLUTION = 512

_WHERE = (
    f"put {BODY_FILE} (and {HAND_FILE} / {FACE_FILE} for hands / face) from the Hugging Face repo "
    f"{DEFAULT_DETECTOR_WEIGHTS} in a folder and pass it with --detector-weights FOLDER, or fetch the repo into the "
    f"Hugging Face cache where you have network access (`hf download {DEFAULT_DETECTOR_WEIGHTS} {BODY_FILE}`)"
)


def controlnet_aux_open_pose():
    """The ``controlnet_aux.open_pose`` module (its detector, models and result formats), imported quietly; a
    PMFInputError naming the extra to install when it is missing."""
    try:
        with warnings.catch_warnings():  # controlnet_aux's package import warns about every optional annotator
            warnings.simplefilter("ignore")
            from controlnet_aux import open_pose
    except ImportError as err:
        raise PMFInputError(f"pose detection needs controlnet_aux: pip install 'pmf_jax[pose]' ({err})") from None
    return open_pose


# ----------------------------------------------------------------------------------------------------------------
# Weights


def find_detector_weights(weights: str | Path | None = None, hands: bool = False, face: bool = False) -> dict:
    """Locates the OpenPose weight files.

    Args:
      weights: a folder, a ``body_pose_model.pth`` file (its folder is used), or a Hub repo id in the local cache;
        default ``lllyasviel/Annotators``.
      hands, face: also require ``hand_pose_model.pth`` / ``facenet.pth``.
    Returns:
      ``{"body": Path, "hand": Path | None, "face": Path | None}``; hand/face are filled in whenever present.
    Raises:
      PMFInputError: a required file is missing; the message says where to put it.
    """
    text = str(weights if weights is not None else DEFAULT_DETECTOR_WEIGHTS)
    path = Path(text).expanduser()
    names = {"body": BODY_FILE, "hand": HAND_FILE, "face": FACE_FILE}
    if path.is_file():
        folder, names["body"] = path.parent, path.name
    elif path.is_dir():
        folder = path
    else:
        from pmf_jax.io.hub import resolve_folder  # only here: importing pmf_jax.io loads flax

        try:
            folder = resolve_folder(text)
        except PMFInputError as err:
            raise PMFInputError(f"OpenPose detector weights {text!r} not found ({err}); {_WHERE}") from None
    found = {}
    for part, name in names.items():
        candidates = [folder / sub / name for sub in _WEIGHT_SUBDIRS]
        found[part] = next((c for c in candidates if c.is_file()), None)
    for part, needed in (("body", True), ("hand", hands), ("face", face)):
        if needed and found[part] is None:
            raise PMFInputError(f"OpenPose detector weights {text!r}: no {names[part]} in {folder}; {_WHERE}")
    return found


def load_detector(weights: str | Path | None = None, hands: bool = False, face: bool = False, device: str = "cpu"):
    """Builds controlnet_aux's ``OpenposeDetector`` from local weights (see ``find_detector_weights``).

    The hand / face models are loaded when asked for (``hands``/``face``), otherwise left out. ``device`` is a torch
    device string. Returns the ``OpenposeDetector``.
    """
    files = find_detector_weights(weights, hands=hands, face=face)
    open_pose = controlnet_aux_open_pose()

    def build(cls, path):
        try:
            return cls(str(path))
        except Exception as err:  # torch.load / load_state_dict errors: a corrupt or foreign file
            raise PMFInputError(f"{path}: not loadable as OpenPose weights ({type(err).__name__}: {err})") from None

    detector = open_pose.OpenposeDetector(
        build(open_pose.Body, files["body"]),
        build(open_pose.Hand, files["hand"]) if hands else None,
        build(open_pose.Face, files["face"]) if face else None,
    )
    for model in (detector.body_estimation, detector.hand_estimation, detector.face_estimation):
        if model is not None and device != "cpu":
            model.to(device)
    return detector


# ----------------------------------------------------------------------------------------------------------------
# Detection


@dataclasses.dataclass(frozen=True)
class PoseDetection:
    """People found in one image; coordinates in pixels of that image, confidence 0 = missing.

    Attributes:
      body: float32 ``[P, 18, 3]`` COCO-18 keypoints (confidence = OpenPose heatmap peak, clipped to (0, 1]).
      left_hand, right_hand: float32 ``[P, 21, 3]`` (the person's left / right; confidence 1 or 0), or None when hands
        were not detected.
      face: float32 ``[P, 70, 3]`` (confidence 1 or 0), or None when faces were not detected.
      height, width: the image size.
    """

    body: np.ndarray
    left_hand: np.ndarray | None
    right_hand: np.ndarray | None
    face: np.ndarray | None
    height: int
    width: int

    @property
    def num_people(self) -> int:
        return int(self.body.shape[0])


def _points(keypoints, count: int, width: int, height: int, scored: bool) -> np.ndarray:
    """controlnet_aux ``Keypoint`` list (x, y normalised, or pixels with width = height = 1; None or negative when
    missing) -> ``[count, 3]`` pixels."""
    out = np.zeros((count, 3), np.float32)
    for i, kp in enumerate(keypoints or ()):
        if kp is None or kp.x < 0 or kp.y < 0:
            continue
        score = float(np.clip(kp.score, 1e-3, 1.0)) if scored else 1.0
        out[i] = (kp.x * width, kp.y * height, score)
    return out


def _detect_at_size(detector, image: np.ndarray, hands: bool, face: bool) -> PoseDetection:
    """OpenPose on ``image`` as is. The steps of controlnet_aux's ``OpenposeDetector.detect_poses``, called one by
    one because that method drops the body keypoints' scores (it rebuilds every Keypoint with the default 1.0)."""
    height, width = image.shape[:2]
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # the OpenPose models take BGR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy / torch deprecation noise from inside controlnet_aux
        candidate, subset = detector.body_estimation(bgr)
        bodies = detector.body_estimation.format_body_result(candidate, subset)
        body = np.zeros((len(bodies), NUM_KEYPOINTS, 3), np.float32)
        left = np.zeros((len(bodies), NUM_HAND_KEYPOINTS, 3), np.float32)
        right, faces = np.zeros_like(left), np.zeros((len(bodies), NUM_FACE_KEYPOINTS, 3), np.float32)
        for p, person in enumerate(bodies):
            body[p] = _points(person.keypoints[:NUM_KEYPOINTS], NUM_KEYPOINTS, 1, 1, scored=True)  # already pixels
            if hands:
                left_hand, right_hand = detector.detect_hands(person, bgr)
                left[p] = _points(left_hand, NUM_HAND_KEYPOINTS, width, height, scored=False)
                right[p] = _points(right_hand, NUM_HAND_KEYPOINTS, width, height, scored=False)
            if face:
                faces[p] = _points(detector.detect_face(person, bgr), NUM_FACE_KEYPOINTS, width, height, scored=False)
    return PoseDetection(clear_missing(body), left if hands else None, right if hands else None,
                         faces if face else None, height, width)  # fmt: skip


def detect_poses(
    image: np.ndarray,
    detector: Any,
    hands: bool = False,
    face: bool = False,
    detect_resolution: int = DETECT_RESOLUTION,
) -> PoseDetection:
    """Runs OpenPose on an RGB image (a photo or a doodled stick figure).

    The image is resized so that its short side is ``detect_resolution`` (as controlnet_aux does), detected there,
    and the keypoints are mapped back to the pixels of ``image``.

    Args:
      image: uint8 ``[H, W, 3]`` RGB.
      detector: from ``load_detector`` (``hands``/``face`` need it built with those models).
      hands, face: also detect hand / face keypoints.
    Returns:
      ``PoseDetection`` in pixels of ``image``.
    """
    image = check_rgb_image(image, "pose image")
    if (hands and detector.hand_estimation is None) or (face and detector.face_estimation is None):
        raise PMFInputError("hand / face detection needs a detector loaded with hands=True / face=True")
    height, width = image.shape[:2]
    k = detect_resolution / min(height, width)
    size = (max(1, round(width * k)), max(1, round(height * k)))  # cv2 order (w, h)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    found = _detect_at_size(detector, small, hands, face)
    sx, sy = width / size[0], height / size[1]  # back to the pixels of ``image``
    parts = (found.body, found.left_hand, found.right_hand, found.face)
    return PoseDetection(*(None if p is None else _rescale_points(p, sx, sy) for p in parts), height, width)


def _rescale_points(points: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Points ``[..., 3]`` of an image resized by ``(sx, sy)``: pixel centres move as ``(x + 0.5) * s - 0.5``
    (the convention of ``affine_keypoints`` and cv2.resize). Missing points stay all-zero."""
    out = points.astype(np.float32, copy=True)
    out[..., 0] = (points[..., 0] + 0.5) * sx - 0.5
    out[..., 1] = (points[..., 1] + 0.5) * sy - 0.5
    out[points[..., 2] <= 0] = 0.0
    return out


def render_detection(detection: PoseDetection) -> np.ndarray:
    """The skeleton image of a detection at its size: the OpenPose body drawing (line widths for the canvas size),
    plus hands and face when they were detected (as in controlnet_aux's ``openpose_full`` images).
    uint8 ``[H, W, 3]``. To draw at another size, move the detection first (``FitTransform.detection``)."""
    height, width = detection.height, detection.width
    stick, radius = line_widths_for(height, width)
    canvas = render_pose(detection.body, height, width, stick_width=stick, radius=radius)
    for hand in (detection.left_hand, detection.right_hand):
        for person in () if hand is None else hand:
            _draw_hand(canvas, person, thickness=max(1, stick // 2), radius=radius)
    for person in () if detection.face is None else detection.face:
        for x, y, c in person:
            if c > 0:
                cv2.circle(canvas, (int(x), int(y)), max(1, radius - 1), (255, 255, 255), thickness=-1)
    return canvas


# The OpenPose hand: wrist (0) to each finger's four joints; edge i is drawn in hue i / 20, joints in blue, and the
# face as white dots (the look of controlnet_aux's openpose_full images; 2 / 4 / 3 px at 256 px and up).
HAND_EDGES = tuple((0 if k % 4 == 0 else k, k + 1) for k in range(20))
_HAND_COLORS = tuple(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
                     for i in range(len(HAND_EDGES)))  # fmt: skip


def _draw_hand(canvas: np.ndarray, points: np.ndarray, thickness: int, radius: int) -> None:
    visible = points[:, 2] > 0
    for (a, b), color in zip(HAND_EDGES, _HAND_COLORS):
        if visible[a] and visible[b]:
            cv2.line(canvas, (int(points[a, 0]), int(points[a, 1])), (int(points[b, 0]), int(points[b, 1])), color,
                     thickness=thickness)  # fmt: skip
    for x, y, c in points:
        if c > 0:
            cv2.circle(canvas, (int(x), int(y)), radius, (0, 0, 255), thickness=-1)


# ----------------------------------------------------------------------------------------------------------------
# Is it already a skeleton image?

# A pixel is background when its brightest channel is below this, and is judged for colour from _BRIGHT up.
_DARK, _BRIGHT = 40, 80
# Thresholds of is_skeleton_image (see its docstring); checked against rendered skeletons, photos and doodles in
# tests/test_pose_inputs.py.
MIN_DARK_FRACTION = 0.6
MIN_DRAWN_FRACTION = 0.002
MIN_SATURATED_FRACTION = 0.75
MIN_HUES = 3


def check_rgb_image(image, name: str) -> np.ndarray:
    """Returns ``image`` as a uint8 ``[H, W, 3]`` array; PMFInputError naming ``name`` otherwise."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise PMFInputError(f"{name}: expected a uint8 RGB image [H, W, 3], got {image.dtype} {image.shape}")
    return image


def skeleton_image_stats(image: np.ndarray) -> dict:
    """Colour statistics that separate OpenPose skeleton images from photos and doodles.

    Returns a dict: ``dark`` (fraction of pixels with max channel < 40), ``drawn`` (fraction with max channel >= 80),
    ``saturated`` (fraction of the drawn pixels with (max - min) / max >= 0.6), ``hues`` (number of 30-degree hue bins
    holding at least 3 % of the saturated drawn pixels).
    """
    image = check_rgb_image(image, "pose image")
    scale = 256 / max(image.shape[:2])
    if scale < 1:  # statistics only: a 256 px thumbnail is plenty and keeps this fast on big photos
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    pixels = image.reshape(-1, 3).astype(np.int32)
    high, low = pixels.max(-1), pixels.min(-1)
    drawn = high >= _BRIGHT
    saturated = drawn & ((high - low) >= 0.6 * high)
    hues_of_saturated = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3)[saturated, 0]  # 0..255
    counts = np.bincount((hues_of_saturated.astype(np.int32) * 12) // 256, minlength=12)
    total = max(int(saturated.sum()), 1)
    return {
        "dark": float((high < _DARK).mean()),
        "drawn": float(drawn.mean()),
        "saturated": float(saturated.sum() / max(int(drawn.sum()), 1)),
        "hues": int((counts >= 0.03 * total).sum()),
    }


def is_skeleton_image(image: np.ndarray) -> bool:
    """Whether an RGB image already is an OpenPose skeleton drawing (then it is used as the pose condition as is).

    A skeleton image is a black canvas (>= 60 % dark pixels) with some drawing on it (>= 0.2 % bright pixels) that
    is almost all fully saturated colour (>= 75 % of the bright pixels; the palette has a zero channel in every
    colour, and resizing or JPEG only blends it with black or a neighbouring limb) spread over several hues (>= 3
    bins of 30 degrees; OpenPose gives every limb its own hue). Photos fail on darkness or saturation, doodles (dark
    strokes on paper) on darkness, a single-colour stick figure on black on the hue count.
    """
    stats = skeleton_image_stats(image)
    return (
        stats["dark"] >= MIN_DARK_FRACTION
        and stats["drawn"] >= MIN_DRAWN_FRACTION
        and stats["saturated"] >= MIN_SATURATED_FRACTION
        and stats["hues"] >= MIN_HUES
    )
