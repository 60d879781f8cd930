"""A driving pose sequence (``pmf animate --poses DRIVING``) -> one person's keypoints per frame.

DRIVING is one of
  * a video file (:data:`pmf_jax.video.VIDEO_SUFFIXES`): every frame through the OpenPose detector, cached by the
    frame's content (:mod:`pmf_jax.pose.detection_cache`);
  * a folder of frames (images; sorted naturally: ``frame_2`` before ``frame_10``): the same per image;
  * a folder of OpenPose JSON files (sorted naturally);
  * one JSON file of a sequence: ``{"frames": [<OpenPose object>, ...], "canvas_height": H, "canvas_width": W,
    "fps": 24}`` or a list of OpenPose objects (a plain OpenPose object is a one-frame sequence).
An image that already is an OpenPose skeleton (:func:`pmf_jax.pose.detect.is_skeleton_image`) is read by its
joints' colours instead of the detector. Each frame gives the most confident person
(:func:`pmf_jax.pose.keypoints.select_person`) as float32 [18, 3] in pixels of the frame; every frame must have one
size. Errors name the file and the frame index.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, clear_missing, select_person
from pmf_jax.pose.openpose_json import openpose_people, read_openpose_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def natural_key(path: Path):
    """Sort key: digit runs compare as numbers (``frame_2`` < ``frame_10``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@dataclasses.dataclass(frozen=True)
class FrameRange:
    """``--frames A:B[:step]``: Python slice bounds over the driving frames (0-based; A or B may be empty)."""

    start: Optional[int] = None
    stop: Optional[int] = None
    step: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "FrameRange":
        parts = text.split(":")
        if not 2 <= len(parts) <= 3:
            raise PMFInputError(f"--frames {text!r} must be A:B or A:B:step (A or B may be empty)")
        try:
            values = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise PMFInputError(f"--frames {text!r}: A, B and step must be integers") from None
        if len(values) == 3 and values[2] is not None and values[2] <= 0:
            raise PMFInputError(f"--frames {text!r}: the step must be positive")
        return cls(*values)

    def indices(self, count: int) -> List[int]:
        return list(range(count))[slice(self.start, self.stop, self.step)]

    def wants(self, count: Optional[int] = None):
        """``i -> bool``: whether frame i is kept (``count`` needed only for bounds counted from the end)."""
        if count is not None:
            keep = set(self.indices(count))
            return keep.__contains__
        start, step = self.start or 0, self.step or 1
        return lambda i: i >= start and (self.stop is None or i < self.stop) and (i - start) % step == 0

    def __str__(self) -> str:
        text = lambda v: "" if v is None else str(v)  # noqa: E731
        return f"{text(self.start)}:{text(self.stop)}" + (f":{self.step}" if self.step else "")


@dataclasses.dataclass(frozen=True)
class DrivingSequence:
    """A read driving sequence.

    keypoints: float32 [F, 18, 3], one person per kept frame, pixels of the frame; frame_size: (H, W) of the frames
    (None: JSON without a canvas size: the keypoints are on the output canvas); indices: [F] each kept frame's index
    in DRIVING; fps: the video's or sequence file's rate, or None; kind: "video", "frames", "json_folder" or
    "json_sequence"; files: the per-frame files of a folder (all of them, in order).
    """

    path: Path
    kind: str
    keypoints: np.ndarray
    frame_size: Optional[Tuple[int, int]]
    indices: Tuple[int, ...]
    fps: Optional[float] = None
    files: Tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.keypoints)

    def driving_frames(self) -> Iterator[np.ndarray]:
        """The kept driving frames, uint8 [H, W, 3], read again one at a time (JSON sequences: their skeletons)."""
        from pmf_jax.pose.render import line_widths_for, render_pose

        if self.kind == "video":
            from pmf_jax.video import read_video_frames

            wanted = set(self.indices)
            for i, frame in enumerate(read_video_frames(self.path)):
                if i in wanted:
                    yield frame
                if i >= self.indices[-1]:
                    return
        elif self.kind == "frames":
            for i in self.indices:
                yield _read_frame(self.files[i], i)
        else:
            height, width = self.frame_size or _extent(self.keypoints)
            for kps in self.keypoints:
                yield render_pose(kps, height, width, *line_widths_for(height, width))


def _extent(keypoints: np.ndarray) -> Tuple[int, int]:
    seen = keypoints[..., 2] > 0
    far = keypoints[..., :2][seen].max(0) if seen.any() else np.ones(2)
    return int(np.ceil(far[1])) + 1, int(np.ceil(far[0])) + 1


def _read_frame(path: Path, index: int) -> np.ndarray:
    from pmf_jax.image_reading import read_image_file

    try:
        return read_image_file(path, f"--poses frame {index} {str(path)!r}")
    except PMFInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is the user's file
        raise PMFInputError(f"--poses frame {index} {str(path)!r}: cannot read the image ({err})") from None


def _one_person(people: np.ndarray, where: str) -> np.ndarray:
    people = clear_missing(np.asarray(people, np.float32).reshape(-1, NUM_KEYPOINTS, 3))
    if not (people[..., 2] > 0).any():
        raise PMFInputError(f"{where}: no person")
    return select_person(people)


def _check_size(sizes: dict, size: Tuple[int, int], where: str) -> None:
    first = next(iter(sizes.items()), None)
    if first is not None and first[1] != size:
        raise PMFInputError(f"{where} is {size[1]}x{size[0]} (WxH) but {first[0]} is {first[1][1]}x{first[1][0]}: "
                            f"every frame of --poses must have one size")
    sizes.setdefault(where, size)


class FrameDetector:
    """Keypoints of one driving image: a skeleton image by its colours, anything else by the OpenPose detector
    (loaded on first use, every detection cached by content)."""

    def __init__(self, detector: Any = None, detector_weights=None, cache: Optional[Path] = None):
        self.detector, self.weights, self.cache = detector, detector_weights, cache

    def __call__(self, image: np.ndarray, where: str) -> np.ndarray:
        from pmf_jax.pose import detect
        from pmf_jax.pose.detection_cache import cached_body
        from pmf_jax.pose.inputs import keypoints_from_skeleton_image

        image = detect.check_rgb_image(image, where)
        if detect.is_skeleton_image(image):
            return _one_person(keypoints_from_skeleton_image(image), where)

        def body(frame):
            if self.detector is None:
                self.detector = detect.load_detector(self.weights)
            return detect.detect_poses(frame, self.detector).body

        settings = f"openpose-body|{self.weights}|{detect.DETECT_RESOLUTION}"
        return _one_person(cached_body(image, body, settings, self.cache), f"{where} (OpenPose detector)")


def _json_frames(path: Path) -> Tuple[List[Any], Optional[Tuple[int, int]], Optional[float]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PMFInputError(f"--poses {str(path)!r}: not a readable JSON file ({err})") from None
    meta = data if isinstance(data, dict) else {}
    frames = data if isinstance(data, list) else meta.get("frames", [data])
    if not isinstance(frames, list):
        raise PMFInputError(f"--poses {str(path)!r}: 'frames' must be a list of OpenPose objects")
    try:
        size = (int(meta["canvas_height"]), int(meta["canvas_width"]))
    except (KeyError, TypeError, ValueError):
        size = None
    fps = meta.get("fps")
    return frames, size, (float(fps) if isinstance(fps, (int, float)) and fps > 0 else None)


def read_driving(path, frames: Optional[FrameRange] = None, *, detector: Any = None, detector_weights=None,
                 cache: Optional[Path] = None, progress: bool = False) -> DrivingSequence:
    """Reads DRIVING (the module docstring), keeping the frames ``frames`` selects (before any detection)."""
    from pmf_jax.progress import bar
    from pmf_jax.video import VIDEO_SUFFIXES

    path = Path(path).expanduser()
    frames = frames or FrameRange()
    if not path.exists():
        raise PMFInputError(f"--poses {str(path)!r} does not exist")
    files: Tuple[Path, ...] = ()
    fps, canvas = None, None
    if path.is_dir():
        entries = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=natural_key)
        jsons = [p for p in entries if p.suffix.lower() == ".json"]
        images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not jsons and not images:
            raise PMFInputError(f"--poses {str(path)!r}: the folder holds no frames (images) and no OpenPose .json "
                                f"files")
        kind, files = ("json_folder", tuple(jsons)) if jsons else ("frames", tuple(images))
        count = len(files)
    elif path.suffix.lower() == ".json":
        kind = "json_sequence"
        items, canvas, fps = _json_frames(path)
        count = len(items)
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        from pmf_jax.video import video_info

        kind = "video"
        fps, _ = video_info(path)
        count = None
    else:
        raise PMFInputError(f"--poses {str(path)!r}: expected a video ({', '.join(VIDEO_SUFFIXES)}), a folder of "
                            f"frames or OpenPose JSON files, or a sequence .json file")
    keep = frames.indices(count) if count is not None else None
    if keep is not None and not keep:
        raise PMFInputError(f"--poses {str(path)!r}: --frames {frames} keeps none of its {count} frames")
    sizes: dict = {}
    detect_frame = FrameDetector(detector, detector_weights, cache)
    out, kept = [], []
    if kind == "video":
        from pmf_jax.video import read_video_frames

        if any(v is not None and v < 0 for v in (frames.start, frames.stop)):  # counted from the end: count first
            count = sum(1 for _ in read_video_frames(path))
        wanted = frames.wants(count)
        with bar(total=len(keep) if keep is not None else None, desc="poses", unit="frame",
                 disable=not progress) as progress_bar:
            for i, image in enumerate(read_video_frames(path)):   # one decoded frame at a time
                if wanted(i):
                    where = f"--poses {str(path)!r} frame {i}"
                    _check_size(sizes, image.shape[:2], where)
                    out.append(detect_frame(image, where))
                    kept.append(i)
                    progress_bar.update(1)
        if not kept:
            raise PMFInputError(f"--poses {str(path)!r}: --frames {frames} keeps none of its frames")
    elif kind == "frames":
        with bar(total=len(keep), desc="poses", unit="frame", disable=not progress) as progress_bar:
            for i in keep:
                where = f"--poses frame {i} {str(files[i])!r}"
                image = _read_frame(files[i], i)
                _check_size(sizes, image.shape[:2], where)
                out.append(detect_frame(image, where))
                kept.append(i)
                progress_bar.update(1)
    else:
        from pmf_jax.pose.openpose_json import read_canvas_size

        for i in keep:
            if kind == "json_folder":
                where = f"--poses frame {i} {str(files[i])!r}"
                people = read_openpose_json(files[i])
                size = read_canvas_size(files[i])
            else:
                where = f"--poses {str(path)!r} frame {i}"
                people, size = openpose_people(items[i], where), canvas
            if size is not None or sizes:
                _check_size(sizes, size, where)
            out.append(_one_person(people, where))
            kept.append(i)
    frame_size = next(iter(sizes.values()), None)
    return DrivingSequence(path, kind, np.stack(out).astype(np.float32), frame_size, tuple(kept), fps, files)


def to_canvas(sequence: DrivingSequence, size: Tuple[int, int], fit: str = "pad") -> np.ndarray:
    """The keypoints [F, 18, 3] on the output canvas ``size`` (H, W), brought there as the source image is
    (:func:`pmf_jax.pose.inputs.fit_transform`)."""
    from pmf_jax.pose.inputs import fit_transform

    frame = sequence.frame_size or tuple(size)
    return np.asarray(fit_transform(frame, size, fit).keypoints(sequence.keypoints), np.float32)


def write_sequence_json(path, keypoints: np.ndarray, height: int, width: int, fps: Optional[float] = None) -> Path:
    """Writes keypoints [F, 18, 3] (one person per frame) as one sequence JSON file (the module docstring)."""
    frames = [{"people": [{"pose_keypoints_2d": [round(float(v), 3) for v in kps.reshape(-1)]}]}
              for kps in clear_missing(np.asarray(keypoints, np.float32))]
    data = {"canvas_height": int(height), "canvas_width": int(width), "frames": frames}
    if fps:
        data["fps"] = fps
    path = Path(path)
    path.write_text(json.dumps(data))
    return path


__all__ = ["DrivingSequence", "FrameDetector", "FrameRange", "IMAGE_SUFFIXES", "natural_key", "read_driving",
           "to_canvas", "write_sequence_json"]
