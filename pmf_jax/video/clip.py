"""The files of one animated clip, written chunk by chunk into a resumable stage (:mod:`pmf_jax.out_folder`).

``pmf animate --out clip.mp4`` writes ``clip.mp4`` and, beside it, the folder ``clip/``: ``frames/frame_XXXXX.png``
(every frame), ``side_by_side.mp4`` (driving | pose | result), ``clip.gif`` (``--gif``) and ``settings.json``.
Everything is written into ``clip.partial/`` first (``staged_folder(..., partial="resume")``):

* after each chunk its PNGs are written, then ``progress.json`` records how many frames are done (written under a
  temporary name and renamed, so it never claims a frame that is not on disk) together with the run's fingerprint
  (everything the frames depend on);
* an interrupted run leaves ``clip.partial/``; the next run with the same fingerprint continues after the last
  written chunk (another fingerprint starts afresh);
* the videos are encoded as frames arrive (the frames already on disk are fed first on a resumed run) under
  temporary names in the stage; at the end ``clip.mp4`` is renamed to its final name and the stage becomes ``clip/``.
So neither ``clip.mp4`` nor ``clip/`` ever exists half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from pmf_jax.errors import PMFInputError
from pmf_jax.file_modes import FILE_MODE, umask
from pmf_jax.video.writer import VideoWriter, write_gif

VIDEO_OUT_SUFFIXES = (".mp4", ".mov", ".mkv")
PROGRESS = "progress.json"
FRAMES = "frames"


def companion_folder(out: Path) -> Path:
    """``clip.mp4`` -> ``clip/`` beside it: where the frames, the side-by-side video and the settings go."""
    return out.with_suffix("")


def check_video_out(out) -> Path:
    out = Path(out).expanduser().absolute()
    if out.suffix.lower() not in VIDEO_OUT_SUFFIXES:
        raise PMFInputError(f"--out {str(out)!r}: name a video file ending in {', '.join(VIDEO_OUT_SUFFIXES)}")
    return out


def fingerprint(settings: dict, *arrays: np.ndarray) -> str:
    """A hash of the settings (JSON) and arrays (e.g. the source pixels and the poses) the frames depend on."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def frame_name(index: int) -> str:
    return f"frame_{index:05d}.png"


class ClipStage:
    """The stage of one clip. ``start_frame``: where this run continues (0 for a fresh one)."""

    def __init__(self, stage: Path, out: Path, fps: float, key: str, count: int):
        self.stage, self.out, self.fps, self.key, self.count = Path(stage), Path(out), fps, key, count
        self.frames = self.stage / FRAMES
        self.start_frame = self._resume_point()
        if self.start_frame == 0:
            for entry in self.stage.iterdir():   # another run's leftovers
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.frames.mkdir(exist_ok=True)
        self.video = VideoWriter(self.stage / f".{out.stem}.tmp{out.suffix}", fps)
        self.side_by_side = VideoWriter(self.stage / ".side_by_side.tmp.mp4", fps)

    def _resume_point(self) -> int:
        try:
            state = json.loads((self.stage / PROGRESS).read_text())
        except (OSError, ValueError):
            return 0
        done = state.get("frames_done", 0) if state.get("fingerprint") == self.key else 0
        if not isinstance(done, int) or not 0 <= done <= self.count:
            return 0
        if any(not (self.frames / frame_name(i)).is_file() for i in range(done)):
            return 0
        return done

    def written_frame(self, index: int) -> np.ndarray:
        """A frame a previous run wrote, uint8 [H, W, 3]."""
        with Image.open(self.frames / frame_name(index)) as image:
            return np.asarray(image.convert("RGB"))

    def add(self, index: int, frame: np.ndarray, side_by_side: np.ndarray, new: bool = True) -> None:
        """Frame ``index`` into the videos (and, when ``new``, its PNG)."""
        if new:
            Image.fromarray(frame).save(self.frames / frame_name(index))
        self.video.write(frame)
        self.side_by_side.write(side_by_side)

    def chunk_done(self, frames_done: int) -> None:
        """Records ``frames_done`` frames as written (after their PNGs)."""
        tmp = self.stage / f".{PROGRESS}.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.key, "frames_done": frames_done}))
        os.replace(tmp, self.stage / PROGRESS)

    def finish(self, settings_path_writer, gif: bool = False) -> None:
        """Closes the videos, writes the GIF (``gif``) and the settings (``settings_path_writer(path)``), moves the
        clip to its final name; the caller's ``staged_folder`` then moves the stage into place."""
        self.video.close()
        self.side_by_side.close()
        os.replace(self.side_by_side.path, self.stage / "side_by_side.mp4")
        if gif:
            write_gif(self.stage / f"{self.out.stem}.gif",
                      (self.written_frame(i) for i in range(self.count)), self.fps)
        settings_path_writer(self.stage / "settings.json")
        (self.stage / PROGRESS).unlink(missing_ok=True)
        os.chmod(self.video.path, FILE_MODE & ~umask())
        os.replace(self.video.path, self.out)

    def close(self) -> None:
        self.video.close()
        self.side_by_side.close()


def read_back(path) -> Optional[tuple]:
    """(frame count, (H, W)) of a written video (for checks and tests)."""
    from pmf_jax.video.reader import read_video_frames

    count, size = 0, None
    for frame in read_video_frames(path):
        count, size = count + 1, frame.shape[:2]
    return count, size
