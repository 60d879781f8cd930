"""Writing videos frame by frame (PyAV): H.264 MP4 (``yuv420p``, playable everywhere) streamed as frames arrive,
and animated GIFs (Pillow, one adaptive palette per frame). Callers write into a stage and move the file into place
when complete (:mod:`pmf_jax.out_folder`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from pmf_jax.video.reader import import_av


class VideoWriter:
    """``with VideoWriter(path, fps) as w: w.write(frame)`` for uint8 [H, W, 3] RGB frames of one size (the size of
    the first; H.264 with yuv420p needs even sides, so an odd side is padded by one row/column of its edge pixels).

    codec: "libx264" (default; ``crf`` quality, 0 = lossless luma) or any PyAV encoder with ``pix_fmt``."""

    def __init__(self, path, fps: float, codec: str = "libx264", pix_fmt: str = "yuv420p", crf: Optional[int] = 17):
        self.av = import_av()
        self.path, self.fps, self.codec, self.pix_fmt, self.crf = Path(path), fps, codec, pix_fmt, crf
        self.container = self.stream = None
        self.size = None
        self.count = 0

    def _open(self, height: int, width: int) -> None:
        from fractions import Fraction

        even = self.pix_fmt == "yuv420p"
        self.size = (height, width)
        self.container = self.av.open(str(self.path), "w")
        options = {"crf": str(self.crf)} if self.crf is not None and "264" in self.codec else {}
        self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001),
                                                options=options)
        self.stream.height, self.stream.width = (height + height % 2, width + width % 2) if even else (height, width)
        self.stream.pix_fmt = self.pix_fmt

    def write(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(frame, np.uint8)
        if self.container is None:
            self._open(*frame.shape[:2])
        if frame.shape[:2] != self.size:
            raise ValueError(f"frame {self.count} is {frame.shape[:2]}, the video is {self.size}")
        pad = (self.stream.height - frame.shape[0], self.stream.width - frame.shape[1])
        if any(pad):
            frame = np.pad(frame, ((0, pad[0]), (0, pad[1]), (0, 0)), mode="edge")
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.container = None

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_gif(path, frames: Iterable[np.ndarray], fps: float) -> None:
    """An endlessly looping GIF of uint8 [H, W, 3] frames (read lazily from the iterable)."""
    from PIL import Image

    images = (Image.fromarray(np.asarray(f, np.uint8)) for f in frames)
    first = next(images)
    first.save(path, format="GIF", save_all=True, append_images=images, duration=round(1000 / fps), loop=0)
