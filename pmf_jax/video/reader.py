"""Reading a video frame by frame (PyAV): RGB uint8 [H, W, 3] per frame, with errors that name the file and the
frame."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from pmf_jax.errors import PMFInputError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif", ".mpg", ".mpeg")


def import_av():
    """The PyAV module, or an input error that says how to install it."""
    try:
        import av
    except ImportError:
        raise PMFInputError("reading and writing videos needs PyAV: pip install 'pmf_jax[video]'") from None
    return av


def _open(path: Path):
    av = import_av()
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise PMFInputError(f"{str(path)!r}: cannot read the video ({err})") from None
    if not container.streams.video:
        container.close()
        raise PMFInputError(f"{str(path)!r}: the file has no video stream")
    return container


def video_info(path) -> Tuple[Optional[float], Tuple[int, int]]:
    """``(frames per second or None, (height, width))`` of a video's first video stream."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return (float(rate) if rate else None), (int(stream.height), int(stream.width))


def read_video_frames(path) -> Iterator[np.ndarray]:
    """Every frame of the first video stream as uint8 [H, W, 3] RGB, decoded one at a time. A file that cannot be
    opened or decoded is a :class:`PMFInputError` naming it and the frame index."""
    av = import_av()
    path = Path(path)
    index = 0
    with _open(path) as container:
        frames = container.decode(video=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except (av.FFmpegError, OSError, ValueError) as err:
                raise PMFInputError(f"{str(path)!r}: cannot decode frame {index} ({err})") from None
            yield frame.to_ndarray(format="rgb24")
            index += 1
    if index == 0:
        raise PMFInputError(f"{str(path)!r}: the video has no frames")
