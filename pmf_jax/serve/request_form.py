"""The fields of a ``POST /api/retarget`` request -> a checked :class:`RetargetRequest`, or one
:class:`~pmf_jax.errors.PMFInputError` message (the server answers 400 with it).

Uploads are read by the same readers as the CLI's files (:mod:`pmf_jax.image_reading`: the pixel limit from the
header before anything is decoded; :mod:`pmf_jax.pose.openpose_json`): each is written into a private temporary
folder under a name the server chooses, read, and deleted. The names the browser sends are never used, and the one
field that refers to a server file, ``example``, is a key of the server's own list, so nothing a request holds can
name a path on the server. Messages name the field, not the temporary file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from pmf_jax import constants
from pmf_jax.errors import PMFInputError
from pmf_jax.image_reading import read_image_file
from pmf_jax.pose.inputs import FIT_MODES, pose_pixels
from pmf_jax.pose.keypoints import KEYPOINT_NAMES
from pmf_jax.pose.openpose_json import read_canvas_size, read_openpose_json

MAX_STEPS = 200
MAX_IMAGES = 4
MAX_SIDE = 1024       # the largest output height / width a request may ask for
MAX_PROMPT_CHARS = 1000
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
TRUE, FALSE = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")

FILE_FIELDS = ("source", "pose")
TEXT_FIELDS = ("example", "pose_kind", "prompt", "negative_prompt", "mode", "steps", "scheduler", "seed",
               "num_images", "guidance_scale", "appearance_guidance_scale", "controlnet_scale", "align_skeleton",
               "pose_fit", "height", "width", "job")

FieldValue = Union[str, bytes]  # a text field, or the bytes of an uploaded file


@dataclasses.dataclass(frozen=True)
class RetargetRequest:
    """One checked request. ``None``: the server's default.

    Attributes:
      source: uint8 ``[H, W, 3]`` source photo.
      pose: float32 keypoints ``[P, 18, 3]`` in pixels of ``pose_frame``, or a uint8 ``[h, w, 3]`` pose image.
      pose_frame: ``(height, width)`` the keypoints are in (the JSON's canvas, else the source image); None for
        images.
    """

    source: np.ndarray
    pose: np.ndarray
    pose_frame: Optional[Tuple[int, int]]
    pose_kind: str = "auto"
    prompt: str = ""
    negative_prompt: str = ""
    mode: Optional[str] = None
    steps: Optional[int] = None
    scheduler: Optional[str] = None
    seed: Optional[int] = None
    num_images: int = 1
    guidance_scale: Optional[float] = None
    appearance_guidance_scale: Optional[float] = None
    controlnet_scale: float = 1.0
    align_skeleton: bool = False
    pose_fit: str = "pad"
    height: Optional[int] = None
    width: Optional[int] = None
    job: Optional[str] = None

    @property
    def keypoints(self) -> Optional[np.ndarray]:
        """The pose's keypoints ``[P, 18, 3]`` as received, or None for a pose image."""
        return self.pose if self.pose.dtype != np.uint8 else None


def parse_request(fields: Mapping[str, FieldValue], examples: Mapping[str, Path]) -> RetargetRequest:
    """Checks the fields (text values as str, uploaded files as bytes) of a retarget request.

    Args:
      examples: name -> image file of the sources the server offers (the ``example`` field picks one).
    """
    unknown = sorted(set(fields) - set(FILE_FIELDS) - set(TEXT_FIELDS))
    if unknown:
        raise PMFInputError(f"unknown field {unknown[0]!r} (the fields are {', '.join(FILE_FIELDS + TEXT_FIELDS)})")
    for name in TEXT_FIELDS:
        if isinstance(fields.get(name), bytes):
            raise PMFInputError(f"{name}: expected a text field, got a file")
    text = {name: str(fields[name]).strip() for name in TEXT_FIELDS if name in fields}
    source = read_source(fields, examples)
    with upload_folder() as folder:
        pose, frame = _pose(fields.get("pose"), source.shape[:2], folder)
    choice = _choice(text)
    number = _number(text)
    height, width = number("height", int, 8, MAX_SIDE), number("width", int, 8, MAX_SIDE)
    if (height is None) != (width is None):
        raise PMFInputError("give both height and width, or neither (the model's size)")
    for key, value in (("height", height), ("width", width)):
        if value is not None and value % 8:
            raise PMFInputError(f"{key}={value} must be a multiple of 8")
    job = text.get("job") or None
    if job is not None and not JOB_ID.fullmatch(job):
        raise PMFInputError("job: 1 to 64 letters, digits, '-' or '_'")
    prompts = {key: text.get(key, "") for key in ("prompt", "negative_prompt")}
    for key, value in prompts.items():
        if len(value) > MAX_PROMPT_CHARS:
            raise PMFInputError(f"{key}: at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    return RetargetRequest(
        source=source, pose=pose, pose_frame=frame, pose_kind=choice("pose_kind", constants.POSE_KINDS) or "auto",
        mode=choice("mode", constants.MODES), steps=number("steps", int, 1, MAX_STEPS),
        scheduler=choice("scheduler", constants.SCHEDULER_NAMES), seed=number("seed", int, 0, 2 ** 32 - 1),
        num_images=number("num_images", int, 1, MAX_IMAGES) or 1,
        guidance_scale=number("guidance_scale", float, -100.0, 100.0),
        appearance_guidance_scale=number("appearance_guidance_scale", float, -100.0, 100.0),
        controlnet_scale=_default(number("controlnet_scale", float, -10.0, 10.0), 1.0),
        align_skeleton=_flag(text.get("align_skeleton", "")), pose_fit=choice("pose_fit", FIT_MODES) or "pad",
        height=height, width=width, job=job, **prompts)


def check_in_frame(points: np.ndarray, frame: Tuple[int, int], what: str, names=None) -> None:
    """PMFInputError when a visible point (confidence > 0, or every point of ``[n, 2]``) lies outside the
    ``(height, width)`` frame: x in [-0.5, width - 0.5), y likewise (pixel centres at integers)."""
    points = np.asarray(points, np.float64)
    visible = points[..., 2] > 0 if points.shape[-1] == 3 else np.ones(points.shape[:-1], bool)
    x, y = points[..., 0], points[..., 1]
    outside = visible & ((x < -0.5) | (x >= frame[1] - 0.5) | (y < -0.5) | (y >= frame[0] - 0.5))
    if outside.any():
        index = tuple(int(i) for i in np.argwhere(outside)[0])
        label = repr(names[index[-1]]) if names is not None else f"point {index}"
        raise PMFInputError(f"{what}: {label} at ({x[index]:.1f}, {y[index]:.1f}) lies outside the "
                            f"{frame[1]}x{frame[0]} image it belongs to")


# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def upload_folder() -> Iterator[Path]:
    """A private temporary folder for uploads, deleted after the block; PMFInputError messages raised in the block
    name the files by their names in it (the field), not by the folder."""
    with tempfile.TemporaryDirectory(prefix="pmf-serve-") as tmp:
        try:
            yield Path(tmp)
        except PMFInputError as err:
            raise PMFInputError(str(err).replace(f"{tmp}/", "")) from None


def read_source(fields: Mapping[str, FieldValue], examples: Mapping[str, Path]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of the request's source: the uploaded file ``source`` or the server's ``example``."""
    example = fields.get("example", "")
    if not isinstance(example, str):
        raise PMFInputError("example: expected a text field, got a file")
    with upload_folder() as folder:
        return _source(fields, example.strip(), examples, folder)


def _source(fields, example: str, examples: Mapping[str, Path], folder: Path) -> np.ndarray:
    upload = fields.get("source")
    if isinstance(upload, str) and not upload:
        upload = None
    if (upload is None) == (not example):
        raise PMFInputError("give the source photo as the file field 'source' or one of the server's examples as "
                            "'example', not both or neither")
    if example:
        if example not in examples:
            offered = f"one of {', '.join(examples)}" if examples else "none"
            raise PMFInputError(f"example {example!r} is not one of the server's examples ({offered})")
        return read_image_file(examples[example], f"example {example!r}")
    if not isinstance(upload, bytes):
        raise PMFInputError("source: expected an image file upload")
    path = folder / "source"
    path.write_bytes(upload)
    return read_image_file(path, "source")


def _pose(value, source_size: Tuple[int, int], folder: Path):
    """(keypoints float32 [P, 18, 3] and their frame, or a uint8 image and None)."""
    if value is None or value == "" or value == b"":
        raise PMFInputError("pose: give the target pose: OpenPose JSON keypoints (text or a .json file) or an image")
    data = value.encode() if isinstance(value, str) else value
    if not data.lstrip()[:1] in (b"{", b"["):
        if isinstance(value, str):
            raise PMFInputError("pose: a text pose must be OpenPose JSON ({\"people\": [{\"pose_keypoints_2d\": "
                                "[x, y, c, ...]}], \"canvas_width\": W, \"canvas_height\": H})")
        path = folder / "pose"
        path.write_bytes(data)
        return pose_pixels(path, "pose"), None
    path = folder / "pose.json"
    path.write_bytes(data)
    people = read_openpose_json(path)
    if not (people[..., 2] > 0).any():
        raise PMFInputError("pose: no person with any visible joint")
    frame = _canvas(path) or tuple(source_size)
    check_in_frame(people, frame, "pose", KEYPOINT_NAMES)
    return people, frame


def _canvas(path: Path):
    data = json.loads(path.read_text())
    given = isinstance(data, dict) and ("canvas_width" in data or "canvas_height" in data)
    size = read_canvas_size(path)
    if given and size is None:
        raise PMFInputError("pose: canvas_width and canvas_height must both be positive integers")
    return size


def _choice(text: Dict[str, str]):
    def choice(name: str, allowed):
        value = text.get(name, "")
        if value and value not in allowed:
            raise PMFInputError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        return value or None

    return choice


def _number(text: Dict[str, str]):
    def number(name: str, kind, low, high):
        value = text.get(name, "")
        if not value:
            return None
        try:
            parsed = kind(value)
        except ValueError:
            raise PMFInputError(f"{name}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(parsed) or not low <= parsed <= high:
            raise PMFInputError(f"{name}={value} must lie in [{low}, {high}]")
        return parsed

    return number


def _default(value, default):
    return default if value is None else value


def _flag(value: str) -> bool:
    if value.lower() not in TRUE + FALSE:
        raise PMFInputError(f"align_skeleton: {value!r} is not true or false")
    return value.lower() in TRUE


__all__ = ["FILE_FIELDS", "MAX_IMAGES", "MAX_SIDE", "MAX_STEPS", "RetargetRequest", "TEXT_FIELDS",
           "check_in_frame", "parse_request", "read_source", "upload_folder"]
