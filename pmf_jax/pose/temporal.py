"""Keypoints over time ``[F, 18, 3]`` (one person per frame, pixels of one canvas): Gaussian smoothing of the joint
tracks (``--smooth-keypoints``) and skeleton alignment of a whole sequence from its first frame
(``--align-skeleton``)."""

from __future__ import annotations

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.align import BONES, PARENTS, align_skeleton, overall_scale
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, clear_missing


def smooth_keypoints(keypoints: np.ndarray, sigma: float) -> np.ndarray:
    """Every joint's track ``[F, 2]`` convolved with a Gaussian of ``sigma`` frames (truncated at 3 sigma), averaging
    only the frames where the joint is present (a missing joint stays missing and pulls nothing to 0). sigma 0: as
    is. Returns float32 [F, 18, 3]."""
    keypoints = np.asarray(keypoints, np.float32)
    if not sigma >= 0:
        raise PMFInputError(f"--smooth-keypoints {sigma} must be a number of frames >= 0")
    if sigma == 0 or len(keypoints) < 2:
        return keypoints.copy()
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    present = (keypoints[..., 2] > 0).astype(np.float64)                      # [F, 18]
    frames = len(keypoints)
    total = np.zeros(keypoints.shape[:2] + (2,))
    norm = np.zeros(keypoints.shape[:2])
    for offset, w in zip(offsets, weights):
        index = np.clip(np.arange(frames) + offset, 0, frames - 1)           # edges repeat the end frames
        total += w * present[index, :, None] * keypoints[index, :, :2]
        norm += w * present[index]
    out = keypoints.copy()
    seen = present > 0
    out[..., :2][seen] = (total[seen] / norm[seen][:, None]).astype(np.float32)
    return clear_missing(out)


def _depth_order():
    depth = []
    for j in range(NUM_KEYPOINTS):
        d, p = 0, PARENTS[j]
        while p >= 0:
            d, p = d + 1, PARENTS[p]
        depth.append(d)
    return sorted(range(NUM_KEYPOINTS), key=lambda j: depth[j])


ORDER = _depth_order()   # every joint after its parent


def bone_scales(first: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Per bone (:data:`pmf_jax.pose.align.BONES`) source length / first-frame length, [17]; bones missing in either
    get the median ratio (:func:`pmf_jax.pose.align.overall_scale`)."""
    default = overall_scale(first, source)
    scales = np.full(len(BONES), default)
    for b, (p, j) in enumerate(BONES):
        if min(first[p, 2], first[j, 2], source[p, 2], source[j, 2]) > 0:
            length = np.linalg.norm(first[j, :2] - first[p, :2])
            if length > 1e-6:
                scales[b] = np.linalg.norm(source[j, :2] - source[p, :2]) / length
    return scales


def _proportions(frame: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The frame with every present bone scaled (walked from the neck): the body whose proportions it gets."""
    by_child = {j: b for b, (_, j) in enumerate(BONES)}
    out = frame.astype(np.float64, copy=True)
    for j in ORDER:
        p = PARENTS[j]
        if p >= 0 and frame[j, 2] > 0 and frame[p, 2] > 0:
            out[j, :2] = out[p, :2] + scales[by_child[j]] * (frame[j, :2] - frame[p, :2])
    return out.astype(np.float32)


def align_sequence(keypoints: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``--align-skeleton`` for a sequence: the per-bone scales of the *first* frame to the source person
    (:func:`bone_scales`) applied to every frame, each frame then re-drawn by
    :func:`pmf_jax.pose.align.align_skeleton` (its joint angles, root and missing joints kept). Bones keep their
    changes over time (foreshortening), only the body's proportions change. [F, 18, 3] float32."""
    keypoints = np.asarray(keypoints, np.float32)
    scales = bone_scales(keypoints[0], np.asarray(source, np.float32))
    return np.stack([align_skeleton(frame, _proportions(frame, scales)) for frame in keypoints])
