"""Video files in and out (PyAV, whose wheels carry ffmpeg; the ``video`` extra): :func:`read_video_frames` /
:func:`video_info` read a driving clip frame by frame, :class:`VideoWriter` streams frames into a file."""

from pmf_jax.video.reader import VIDEO_SUFFIXES, read_video_frames, video_info
from pmf_jax.video.writer import VideoWriter, write_gif

__all__ = ["VIDEO_SUFFIXES", "VideoWriter", "read_video_frames", "video_info", "write_gif"]
