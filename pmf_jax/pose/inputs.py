"""A user's target pose -> the skeleton image (and keypoints) at the output size: :func:`resolve_pose`, the one place
the commands and the pipelines read a pose, by its kind (``constants.POSE_KINDS``).

A target pose comes as an OpenPose JSON file, a keypoint array, a skeleton image (used as is), or a photo / doodled
stick figure (run through the OpenPose detector). Whatever it is, it is brought to the output canvas with the same
geometric transform the pipelines apply to the source image, ``fit_transform``:

- ``"pad"`` (letterbox): resize so that the whole image fits, keeping the aspect ratio, and pad the rest equally on
  both sides (black for skeletons);
- ``"crop"``: resize so that the canvas is covered, keeping the aspect ratio, and cut the overhang equally on both
  sides (joints cut away become missing).

``fit_transform`` returns one ``FitTransform`` whose ``.image`` and ``.keypoints`` apply the identical resize and
offset, so an image and its keypoints can never disagree. Missing joints (confidence 0) stay missing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from pmf_jax.constants import POSE_KINDS
from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import BLACK, WHITE, pil_to_rgb8, read_image_file
from pmf_jax.pose import detect
from pmf_jax.pose.align import align_skeleton
from pmf_jax.pose.keypoints import COLORS, NUM_KEYPOINTS, check_keypoints, select_person
from pmf_jax.pose.openpose_json import read_canvas_size, read_openpose_json
from pmf_jax.pose.render import line_widths_for, render_pose

FIT_MODES = ("pad", "crop")

# ----------------------------------------------------------------------------------------------------------------
# Geometry shared by images and keypoints


@dataclasses.dataclass(frozen=True)
class FitTransform:
    """Resize an ``src_size`` image to ``resized``, then place its top-left corner at ``offset`` (whole pixels,
    negative = cropped) on an ``out_size`` canvas. Sizes are ``(height, width)``, offset is ``(x, y)``."""

    src_size: tuple[int, int]
    out_size: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """``(scale_x, scale_y)``: exactly what cv2.resize to ``resized`` does (may differ by rounding per axis)."""
        return self.resized[1] / self.src_size[1], self.resized[0] / self.src_size[0]

    def image(self, image: np.ndarray, pad: int | tuple[int, int, int] | str = 0, nearest: bool = False) -> np.ndarray:
        """The transformed image: ``[out_h, out_w, C]`` of the input's dtype.

        Args:
          image: ``[src_h, src_w, C]`` (uint8 usually).
          pad: fill of the letterbox bars: a grey level or an RGB triple (0 = black, for skeletons), or ``"edge"`` to
            repeat the border pixels (photos: no hard frame for the VAE to encode).
          nearest: nearest-neighbour resampling (keeps exact colours); otherwise area when shrinking, bilinear when
            enlarging.
        """
        image = np.asarray(image)
        if tuple(image.shape[:2]) != tuple(self.src_size):
            raise PMFInputError(f"image: expected size {self.src_size}, got {tuple(image.shape[:2])}")
        (rh, rw), (oh, ow), (ox, oy) = self.resized, self.out_size, self.offset
        if nearest:
            interpolation = cv2.INTER_NEAREST
        else:
            interpolation = cv2.INTER_AREA if rh * rw < image.shape[0] * image.shape[1] else cv2.INTER_LINEAR
        resized = cv2.resize(image, (rw, rh), interpolation=interpolation) if (rh, rw) != image.shape[:2] else image
        resized = resized.reshape(rh, rw, *image.shape[2:])
        # Crop the overhang (negative offsets), then pad the bars (positive offsets).
        x0, y0 = max(-ox, 0), max(-oy, 0)
        visible = resized[y0 : y0 + oh - max(oy, 0), x0 : x0 + ow - max(ox, 0)]
        widths = [(max(oy, 0), oh - max(oy, 0) - visible.shape[0]), (max(ox, 0), ow - max(ox, 0) - visible.shape[1])]
        widths += [(0, 0)] * (image.ndim - 2)
        if isinstance(pad, str):
            if pad != "edge":
                raise PMFInputError(f"pad {pad!r}: expected a colour or 'edge'")
            return np.pad(visible, widths, mode="edge")
        out = np.empty((oh, ow, *image.shape[2:]), image.dtype)
        out[...] = np.asarray(pad, image.dtype)
        out[widths[0][0] : oh - widths[0][1], widths[1][0] : ow - widths[1][1]] = visible
        return out

    def points(self, points: np.ndarray) -> np.ndarray:
        """Transformed points ``[..., 3]`` (x, y, confidence; any number of points): pixel centres move as
        ``(x + 0.5) * scale - 0.5 + offset`` (the convention of cv2.resize, used by ``image``); points that leave the
        canvas, and missing ones (confidence <= 0), are missing (all zero). float32."""
        points = np.asarray(points, np.float32)
        out = points.copy()
        for axis in (0, 1):
            out[..., axis] = (points[..., axis] + 0.5) * self.scale[axis] - 0.5 + self.offset[axis]
        (oh, ow), x, y = self.out_size, out[..., 0], out[..., 1]
        inside = (x >= -0.5) & (x < ow - 0.5) & (y >= -0.5) & (y < oh - 0.5)
        out[~(inside & (points[..., 2] > 0))] = 0.0
        return out

    def keypoints(self, keypoints: np.ndarray) -> np.ndarray:
        """Transformed keypoints ``[..., 18, 3]`` (see ``points``)."""
        return self.points(check_keypoints(keypoints))

    def detection(self, found: detect.PoseDetection) -> detect.PoseDetection:
        """A detection (body, hands, face) moved onto the canvas."""
        if tuple(self.src_size) != (found.height, found.width):
            raise PMFInputError(f"detection: expected size {self.src_size}, got {(found.height, found.width)}")
        parts = (found.body, found.left_hand, found.right_hand, found.face)
        return detect.PoseDetection(*(None if p is None else self.points(p) for p in parts), *self.out_size)


def fit_transform(src_size: tuple[int, int], out_size: tuple[int, int], mode: str = "pad") -> FitTransform:
    """The transform from an ``src_size`` image to the ``out_size`` canvas (both ``(height, width)``).

    Args:
      mode: ``"pad"`` — fit inside and letterbox (nothing is lost); ``"crop"`` — cover and centre-crop (no bars).
    """
    if mode not in FIT_MODES:
        raise PMFInputError(f"fit mode {mode!r}: expected one of {', '.join(FIT_MODES)}")
    (h, w), (oh, ow) = (tuple(int(v) for v in s) for s in (src_size, out_size))
    if min(h, w, oh, ow) < 1:
        raise PMFInputError(f"fit: sizes must be positive, got source {src_size} and output {out_size}")
    if mode == "pad":
        s = min(oh / h, ow / w)
        rh, rw = min(oh, max(1, round(h * s))), min(ow, max(1, round(w * s)))
        offset = ((ow - rw) // 2, (oh - rh) // 2)
    else:
        s = max(oh / h, ow / w)
        rh, rw = max(oh, round(h * s)), max(ow, round(w * s))
        offset = (-((rw - ow) // 2), -((rh - oh) // 2))
    return FitTransform((h, w), (oh, ow), (rh, rw), offset)


# ----------------------------------------------------------------------------------------------------------------
# Files


def read_image(path: str | Path, name: str = "image") -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]``: :func:`pmf_jax.image_reading.read_image_file` (pixel limit checked
    from the header, EXIF rotation applied, every mode, alpha composited onto white); PMFInputError naming ``name``
    and the path when it is missing, too large or not an image."""
    return read_image_file(path, name)


def pose_pixels(image, name: str) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` of a pose image (a path or a PIL image): transparency composited onto black when that
    makes an OpenPose skeleton (drawn on black), else onto white (a doodle's strokes, a photo)."""
    def read(background):
        if isinstance(image, Image.Image):
            return pil_to_rgb8(image, name, background)
        return read_image_file(image, name, background)

    on_black = read(BLACK)
    return on_black if detect.is_skeleton_image(on_black) else read(WHITE)


# ----------------------------------------------------------------------------------------------------------------
# Skeleton image -> keypoints

# Joint discs are drawn in the full palette colour, limbs in 60 % of it: every joint colour has a 255 channel while
# limb colours stay <= 153, so a tolerance of 40 separates discs from limbs even after resampling.
_JOINT_COLOR_TOLERANCE = 40


def keypoints_from_skeleton_image(image: np.ndarray) -> np.ndarray:
    """Recovers one person's keypoints from an OpenPose skeleton image by finding each joint's coloured disc.

    Every joint colour's largest connected blob gives that joint (its centroid, confidence 1); colours with no blob
    are missing. Accurate to about a pixel for separated discs (the drawing truncates coordinates to whole pixels);
    meant for single-person skeletons (with several people, the largest blob of each colour wins).

    Args:
      image: uint8 ``[H, W, 3]`` RGB skeleton image.
    Returns:
      float32 ``[18, 3]`` in pixels of ``image``.
    """
    image = np.asarray(image)
    pixels = image.astype(np.int32)
    keypoints = np.zeros((NUM_KEYPOINTS, 3), np.float32)
    for j, color in enumerate(COLORS):
        mask = (np.abs(pixels - np.asarray(color)).max(-1) <= _JOINT_COLOR_TOLERANCE).astype(np.uint8)
        count, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        if count <= 1:
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        keypoints[j] = (*centroids[best], 1.0)
    return keypoints


# ----------------------------------------------------------------------------------------------------------------
# Target pose input


@dataclasses.dataclass(frozen=True)
class PoseCondition:
    """A target pose on the output canvas.

    Attributes:
      image: uint8 ``[H, W, 3]`` RGB OpenPose skeleton image (the ControlNet condition).
      keypoints: float32 ``[P, 18, 3]`` in pixels of ``image``, or None for a skeleton image used as is.
      kind: where it came from: ``"json"``, ``"keypoints"``, ``"skeleton"`` or ``"detected"``.
    """

    image: np.ndarray
    keypoints: np.ndarray | None
    kind: str


def _get_detector(detector, detector_weights, hands: bool, face: bool):
    return detector if detector is not None else detect.load_detector(detector_weights, hands=hands, face=face)


def resolve_pose(
    pose: str | Path | np.ndarray | Image.Image | PoseCondition,
    size: tuple[int, int],
    fit: str = "pad",
    pose_kind: str = "auto",
    *,
    align_to: np.ndarray | None = None,
    pose_size: tuple[int, int] | None = None,
    source_keypoints: np.ndarray | None = None,
    detector: Any = None,
    detector_weights: str | Path | None = None,
    hands: bool = False,
    face: bool = False,
) -> PoseCondition:
    """Turns a target pose, read as ``pose_kind`` says, into its skeleton image (and keypoints) at the output size.

    Args:
      pose: an OpenPose ``.json`` path; an image path, PIL image or uint8 ``[H, W, 3]`` array (a skeleton image is
        used as is, anything else goes through the OpenPose detector); float keypoints ``[18, 3]`` / ``[P, 18, 3]``;
        or a ``PoseCondition`` already of ``size`` (returned as is).
      size: output ``(height, width)``.
      fit: ``"pad"`` or ``"crop"`` (see ``fit_transform``): the same mode the source image is brought to ``size`` with.
      pose_kind: one of ``constants.POSE_KINDS``: ``"auto"`` as above; ``"image"`` the same for images only;
        ``"skeleton"`` an image used as the skeleton whatever it looks like (unless it is aligned); ``"keypoints"``
        OpenPose JSON (or a keypoint array) only.
      align_to: the source image (uint8 ``[H, W, 3]``, before fitting): the target is re-proportioned to the person in
        it (``--align-skeleton``); the OpenPose detector finds that person. One detector serves both images.
      pose_size: ``(height, width)`` of the frame a keypoint array / JSON file is in. Default: the JSON file's
        ``canvas_height``/``canvas_width`` if present, else ``size`` (the keypoints are already on the output canvas).
      source_keypoints: instead of ``align_to``, the source person's keypoints *on the output canvas* (see
        ``source_keypoints_on_canvas``): the target is re-proportioned to them with ``align_skeleton``.
      detector, detector_weights: a loaded ``OpenposeDetector``, or where to load one from (``load_detector``);
        needed only when something must be detected.
      hands, face: detect and draw hands / face too (detected poses only).
    Returns:
      ``PoseCondition``.
    Raises:
      PMFInputError: an unknown kind or an input of another kind, unreadable input, no person found, or alignment
        asked for a skeleton image without joints.
    """
    if pose_kind not in POSE_KINDS:
        raise PMFInputError(f"pose_kind={pose_kind!r} must be one of {', '.join(POSE_KINDS)}")
    size = (int(size[0]), int(size[1]))
    if isinstance(pose, PoseCondition):
        if pose.image.shape[:2] != size:
            raise PMFInputError(f"pose condition is {pose.image.shape[:2]}, the output size is {size}")
        return pose
    _check_kind(pose, pose_kind)
    if align_to is not None:
        if source_keypoints is not None:
            raise PMFInputError("give align_to (the source image) or source_keypoints, not both")
        detector = _get_detector(detector, detector_weights, hands, face)
        source_keypoints = source_keypoints_on_canvas(align_to, size, fit, detector=detector)
    if pose_kind == "skeleton" and source_keypoints is None:
        from pmf_jax.pipelines.images import load_image

        image = load_image(pose, "pose image", background=BLACK)
        return PoseCondition(fit_transform(image.shape[:2], size, fit).image(image), None, "skeleton")
    if isinstance(pose, Image.Image):
        pose = pose_pixels(pose, "pose image")
    name = "pose"
    if isinstance(pose, (str, Path)):
        name = f"pose {str(pose)!r}"
        path = Path(pose)
        if path.suffix.lower() == ".json":
            people = read_openpose_json(path)
            frame = pose_size or read_canvas_size(path) or size
            return _from_keypoints(people, frame, size, fit, source_keypoints, "json", name)
        pose = pose_pixels(path, "pose image")
    array = np.asarray(pose)
    if array.dtype != np.uint8:
        return _from_keypoints(check_keypoints(array, name), pose_size or size, size, fit, source_keypoints,
                               "keypoints", name)  # fmt: skip
    image = detect.check_rgb_image(array, name)
    transform = fit_transform(image.shape[:2], size, fit)
    if detect.is_skeleton_image(image):
        if source_keypoints is None:
            return PoseCondition(transform.image(image), None, "skeleton")
        people = keypoints_from_skeleton_image(image)[None]
        if (people[..., 2] > 0).sum() < 2:
            raise PMFInputError(f"{name}: too few joints found in this skeleton image to align it; pass an OpenPose "
                                "JSON or the reference photo instead")  # fmt: skip
        return _from_keypoints(people, image.shape[:2], size, fit, source_keypoints, "skeleton", name)
    found = detect.detect_poses(image, _get_detector(detector, detector_weights, hands, face), hands, face)
    if found.num_people == 0:
        raise PMFInputError(f"{name}: no person found by the OpenPose detector")
    if source_keypoints is not None or not (hands or face):
        return _from_keypoints(found.body, image.shape[:2], size, fit, source_keypoints, "detected", name)
    fitted = transform.detection(found)  # hands / face too
    return PoseCondition(detect.render_detection(fitted), fitted.body, "detected")


def _check_kind(pose, pose_kind: str) -> None:
    """PMFInputError when ``pose`` is not an input of ``pose_kind`` (JSON files are keypoints, not images)."""
    is_path = isinstance(pose, (str, Path))
    is_json = is_path and str(pose).lower().endswith(".json")
    is_keypoints = is_json or (isinstance(pose, np.ndarray) and pose.dtype != np.uint8)
    what = repr(str(pose)) if is_path else f"a {type(pose).__name__}"
    if pose_kind == "keypoints" and not is_keypoints:
        raise PMFInputError(f"pose_kind='keypoints' needs an OpenPose .json file (or a keypoint array), got {what}")
    if pose_kind in ("image", "skeleton") and is_json:
        raise PMFInputError(f"pose_kind={pose_kind!r} needs an image file, got {what}")


def _from_keypoints(people, frame, size, fit, source_keypoints, kind, name) -> PoseCondition:
    people = check_keypoints(people, name)
    people = people[None] if people.ndim == 2 else people
    if not (people[..., 2] > 0).any():
        raise PMFInputError(f"{name}: no person with any visible joint")
    people = fit_transform(frame, size, fit).keypoints(people)
    if source_keypoints is not None:
        # Aligned on the canvas, where source and target lengths are comparable; joints pushed off it go missing.
        people = fit_transform(size, size).keypoints(align_skeleton(people, source_keypoints))
    stick, radius = line_widths_for(*size)
    return PoseCondition(render_pose(people, size[0], size[1], stick, radius), people, kind)


def source_keypoints_on_canvas(
    image: np.ndarray,
    size: tuple[int, int],
    fit: str = "pad",
    *,
    detector: Any = None,
    detector_weights: str | Path | None = None,
) -> np.ndarray:
    """The source person's keypoints on the output canvas, for ``--align-skeleton``: OpenPose on the source image,
    then the source image's own ``fit_transform``. float32 ``[18, 3]`` (the most confident person).

    Raises:
      PMFInputError: no person found in the source image.
    """
    image = detect.check_rgb_image(image, "source image")
    found = detect.detect_poses(image, _get_detector(detector, detector_weights, False, False))
    if found.num_people == 0:
        raise PMFInputError("source image: no person found by the OpenPose detector, so the skeleton cannot be aligned")
    return fit_transform(image.shape[:2], size, fit).keypoints(select_person(found.body))
