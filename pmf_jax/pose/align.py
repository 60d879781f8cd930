"""Skeleton alignment: the target pose re-drawn with the source person's body proportions.

A target pose taken from someone else (a reference photo, a doodle) has that person's limb lengths; conditioning on it
asks the model to stretch the source person's body, which is what distorts bodies in pose-driven generation. Here the
target keeps its *joint angles* (the direction of every bone) and its *root position*, while every bone gets the
length it has on the source person, walking the COCO-18 kinematic tree outwards from the neck:

    neck -> shoulders -> elbows -> wrists
    neck -> hips -> knees -> ankles
    neck -> nose -> eyes -> ears

Missing joints (confidence 0) are handled as follows:
- a joint missing in the target stays missing;
- a bone missing in the source (either end undetected) keeps the target's length times the *overall scale*: the
  median of source / target length over the 17 tree bones both poses have (1 when they share none);
- the root is the target's neck; without a neck it is the midpoint of the target's hips (the hips then hang from it,
  with the source's half hip width), and without those the mean of the target's joints;
- a target joint whose parent is missing (a shoulder without a neck) cannot inherit a bone direction: it is placed at
  the root plus the overall scale times its target offset from the root, and its own children chain from it again.
Both poses must be in the same pixel frame (the output canvas; see ``pmf_jax.pose.inputs``), or the lengths are
meaningless.
"""

from __future__ import annotations

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import NUM_KEYPOINTS, check_keypoints, clear_missing, select_person

NECK, RIGHT_HIP, LEFT_HIP = 1, 8, 11
# Index of the virtual hip-midpoint joint appended after the 18 real ones while aligning.
_HIP_MID = NUM_KEYPOINTS

# PARENTS[j] is joint j's parent in the kinematic tree rooted at the neck (-1 for the neck itself).
PARENTS = (1, -1, 1, 2, 3, 1, 5, 6, 1, 8, 9, 1, 11, 12, 0, 0, 14, 15)
# The 17 bones (parent, child) of that tree.
BONES = tuple((p, j) for j, p in enumerate(PARENTS) if p >= 0)
# Breadth-first order from the neck, so that a joint always comes after its parent.
_ORDER = (1, 2, 5, 8, 11, 0, 3, 6, 9, 12, 14, 15, 4, 7, 10, 13, 16, 17)
_EPS = 1e-6


def _with_hip_mid(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``[19, 2]`` (joint 18 = hip midpoint) and visibility ``[19]``."""
    xy = np.zeros((NUM_KEYPOINTS + 1, 2), np.float64)
    xy[:NUM_KEYPOINTS] = keypoints[:, :2]
    visible = np.zeros(NUM_KEYPOINTS + 1, bool)
    visible[:NUM_KEYPOINTS] = keypoints[:, 2] > 0
    if visible[RIGHT_HIP] and visible[LEFT_HIP]:
        xy[_HIP_MID] = (xy[RIGHT_HIP] + xy[LEFT_HIP]) / 2
        visible[_HIP_MID] = True
    return xy, visible


def overall_scale(target: np.ndarray, source: np.ndarray) -> float:
    """Median over the bones present in both ``[18, 3]`` poses of source length / target length (1.0 if none)."""
    t_xy, t_vis = _with_hip_mid(check_keypoints(target, "target keypoints"))
    s_xy, s_vis = _with_hip_mid(check_keypoints(source, "source keypoints"))
    return _median_ratio(t_xy, t_vis, s_xy, s_vis, BONES)


def _median_ratio(t_xy, t_vis, s_xy, s_vis, bones) -> float:
    ratios = []
    for p, j in bones:
        if t_vis[p] and t_vis[j] and s_vis[p] and s_vis[j]:
            t_len = np.linalg.norm(t_xy[j] - t_xy[p])
            if t_len > _EPS:
                ratios.append(np.linalg.norm(s_xy[j] - s_xy[p]) / t_len)
    return float(np.median(ratios)) if ratios else 1.0


def align_skeleton(target_kpts: np.ndarray, source_kpts: np.ndarray) -> np.ndarray:
    """Retargets the target pose onto the source person's bone lengths, keeping its joint angles and root.

    Args:
      target_kpts: float ``[18, 3]`` or ``[P, 18, 3]`` (every person is aligned to the same source).
      source_kpts: float ``[18, 3]``, or ``[P, 18, 3]`` of which the most confident person is used.
      Both in the same pixel frame.
    Returns:
      float32 with the shape of ``target_kpts``; confidences are the target's, missing joints stay missing.
    """
    target = check_keypoints(target_kpts, "target keypoints")
    source = check_keypoints(source_kpts, "source keypoints")
    if source.ndim == 3:
        source = select_person(source)
    if source.ndim != 2:
        raise PMFInputError(f"source keypoints: expected [18, 3] or [P, 18, 3], got {source.shape}")
    if target.ndim == 3:
        return np.stack([_align_one(person, source) for person in target]).reshape(target.shape)
    if target.ndim != 2:
        raise PMFInputError(f"target keypoints: expected [18, 3] or [P, 18, 3], got {target.shape}")
    return _align_one(target, source)


def _align_one(target: np.ndarray, source: np.ndarray) -> np.ndarray:
    t_xy, t_vis = _with_hip_mid(target)
    s_xy, s_vis = _with_hip_mid(source)
    if not t_vis[:NUM_KEYPOINTS].any():
        return clear_missing(target)

    parents = list(PARENTS) + [-1]
    order = list(_ORDER)
    if t_vis[NECK]:
        root, root_xy = NECK, t_xy[NECK]
    elif t_vis[_HIP_MID]:
        # Re-root at the hip midpoint: the hips hang from it, everything above floats (no neck to hang from).
        root, root_xy = _HIP_MID, t_xy[_HIP_MID]
        parents[RIGHT_HIP] = parents[LEFT_HIP] = _HIP_MID
        order = [_HIP_MID] + order
    else:
        root, root_xy = None, t_xy[:NUM_KEYPOINTS][t_vis[:NUM_KEYPOINTS]].mean(axis=0)
    scale = _median_ratio(t_xy, t_vis, s_xy, s_vis, BONES)

    out = np.zeros_like(t_xy)
    placed = np.zeros(len(t_xy), bool)
    if root is not None:
        out[root], placed[root] = root_xy, True
    for j in order:
        if j == root or not t_vis[j]:
            continue
        p = parents[j]
        if p >= 0 and placed[p]:
            bone = t_xy[j] - t_xy[p]
            t_len = np.linalg.norm(bone)
            length = np.linalg.norm(s_xy[j] - s_xy[p]) if (s_vis[j] and s_vis[p]) else scale * t_len
            # A zero-length target bone has no direction: the joint stays on its parent.
            out[j] = out[p] + (bone / t_len * length if t_len > _EPS else 0.0)
        else:
            out[j] = root_xy + scale * (t_xy[j] - root_xy)
        placed[j] = True

    aligned = target.astype(np.float32, copy=True)
    aligned[:, :2] = out[:NUM_KEYPOINTS]
    return clear_missing(aligned)
