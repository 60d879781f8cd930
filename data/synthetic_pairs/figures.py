"""Synthetic people: a 2D kinematic skeleton with joint-angle limits and a per-identity flat-colour appearance.

A pose is sampled as joint angles (torso lean, head tilt, shoulder/elbow/hip/knee angles) within limits, turned into
the 18 OpenPose COCO joints by forward kinematics, then scaled and placed inside the image. A figure is drawn from
those 18 keypoints only (thick limbs, a patterned shirt on the torso, a head with hair), in the identity's colours:
so what a pair's target image looks like is fixed by the source image (appearance) and the target keypoints (pose).
Everything is numpy + OpenCV and takes well under a millisecond per 64 px image.
"""

from __future__ import annotations

import colorsys
import dataclasses

import cv2
import numpy as np

# Body proportions in units of the standing body height (image y points down).
_TORSO, _SHOULDER, _HIP = 0.30, 0.10, 0.07
_UPPER_ARM, _FOREARM, _THIGH, _SHIN = 0.16, 0.15, 0.23, 0.22
_NECK_TO_NOSE, _HEAD_RADIUS = 0.10, 0.065
_ARM_WIDTH, _LEG_WIDTH = 0.055, 0.075

# Joint-angle limits in radians. Limb angles are measured from the torso's down direction, positive away from the
# body's midline; elbow and knee angles are relative to the upper limb.
LIMITS = {
    "torso_lean": (-0.25, 0.25),
    "head_tilt": (-0.3, 0.3),
    "shoulder": (-0.3, 2.9),
    "elbow": (-2.4, 0.4),
    "hip": (-0.2, 1.1),
    "knee": (-1.2, 0.4),
}

PATTERNS = ("plain", "horizontal_stripes", "vertical_stripes", "checker", "dots")


@dataclasses.dataclass(frozen=True)
class Appearance:
    """One identity's look; colours are RGB uint8 triples."""

    background: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    shirt: tuple[int, int, int]
    shirt_pattern: tuple[int, int, int]
    pants: tuple[int, int, int]
    shoes: tuple[int, int, int]
    pattern: str
    pattern_period: float  # in units of body height


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """A random identity: saturated clothes whose hues are spread apart, a pale or dark plain background."""
    hue = rng.random()
    shirt_hue, pants_hue, background_hue = hue, hue + rng.uniform(0.25, 0.45), hue + rng.uniform(0.55, 0.75)
    background_value = rng.choice([rng.uniform(0.15, 0.3), rng.uniform(0.8, 0.95)])
    return Appearance(
        background=_hsv(background_hue, rng.uniform(0.15, 0.45), background_value),
        skin=_hsv(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.45, 0.95)),
        hair=_hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.6)),
        shirt=_hsv(shirt_hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)),
        shirt_pattern=_hsv(shirt_hue + 0.5, rng.uniform(0.5, 1.0), rng.uniform(0.2, 0.55)),
        pants=_hsv(pants_hue, rng.uniform(0.6, 1.0), rng.uniform(0.4, 0.8)),
        shoes=_hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.35)),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        pattern_period=float(rng.uniform(0.035, 0.06)),
    )


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _skeleton(angles: dict[str, float]) -> np.ndarray:
    """Forward kinematics in body units: ``[18, 2]`` (x, y), pelvis at the origin."""
    lean = angles["torso_lean"]
    up = np.array([np.sin(lean), -np.cos(lean)])  # torso axis, pelvis -> neck
    right = np.array([np.cos(lean), np.sin(lean)])  # image right = the person's left (they face us)
    neck = _TORSO * up
    head_up = _rotate(up, angles["head_tilt"])
    head_right = _rotate(right, angles["head_tilt"])
    nose = neck + _NECK_TO_NOSE * head_up
    joints = np.zeros((18, 2))
    joints[0], joints[1] = nose, neck
    for side, sign in (("right", -1.0), ("left", 1.0)):  # the person's right is on the image left
        shoulder = neck + sign * _SHOULDER * right
        hip = sign * _HIP * right
        # A positive angle turns a limb away from the midline: clockwise on the image-right side.
        upper = _rotate(-up, -sign * angles[f"{side}_shoulder"])
        fore = _rotate(upper, -sign * angles[f"{side}_elbow"])
        thigh = _rotate(-up, -sign * angles[f"{side}_hip"])
        shin = _rotate(thigh, -sign * angles[f"{side}_knee"])
        elbow = shoulder + _UPPER_ARM * upper
        knee = hip + _THIGH * thigh
        base = 2 if side == "right" else 5
        joints[base : base + 3] = shoulder, elbow, elbow + _FOREARM * fore
        base = 8 if side == "right" else 11
        joints[base : base + 3] = hip, knee, knee + _SHIN * shin
        eye, ear = (14, 16) if side == "right" else (15, 17)
        joints[eye] = nose + 0.02 * head_up + sign * 0.025 * head_right
        joints[ear] = nose + 0.005 * head_up + sign * 0.055 * head_right
    return joints


def forward_kinematics(angles: dict[str, float]) -> np.ndarray:
    """The 18 joints ``[18, 2]`` of joint ``angles`` (the names of LIMITS, per side) in body units, pelvis at the
    origin, image y down."""
    return _skeleton(angles)


def sample_angles(rng: np.random.Generator) -> dict[str, float]:
    """Joint angles drawn uniformly within LIMITS (each side independently)."""
    angles = {name: rng.uniform(*LIMITS[name]) for name in ("torso_lean", "head_tilt")}
    for side in ("right", "left"):
        for joint in ("shoulder", "elbow", "hip", "knee"):
            angles[f"{side}_{joint}"] = rng.uniform(*LIMITS[joint])
    return angles


def sample_pose(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random pose placed in a ``size x size`` image: float32 ``[18, 3]`` (x, y pixels, confidence 1).

    The figure (with its head and limb widths) fills 65-90 % of the image height or width and is shifted at random
    inside the frame.
    """
    joints = _skeleton(sample_angles(rng))
    margin = _HEAD_RADIUS + 0.02
    lo, hi = joints.min(0) - margin, joints.max(0) + margin
    extent = (hi - lo).max()
    scale = size * rng.uniform(0.65, 0.9) / extent
    room = size - (hi - lo) * scale  # free pixels per axis
    offset = rng.uniform(0.0, 1.0, 2) * room - lo * scale
    keypoints = np.ones((18, 3), np.float32)
    keypoints[:, :2] = joints * scale + offset
    return keypoints


def body_scale(keypoints: np.ndarray) -> float:
    """Pixels per body unit, recovered from the keypoints (neck to mid-hip is ``_TORSO``)."""
    mid_hip = (keypoints[8, :2] + keypoints[11, :2]) / 2
    return float(np.linalg.norm(keypoints[1, :2] - mid_hip) / _TORSO)


def _pattern_mask(appearance: Appearance, keypoints: np.ndarray, size: int, unit: float) -> np.ndarray:
    """Where the shirt shows its second colour: ``[size, size]`` bool, in the torso's own frame (moves with it)."""
    if appearance.pattern == "plain":
        return np.zeros((size, size), bool)
    neck, mid_hip = keypoints[1, :2], (keypoints[8, :2] + keypoints[11, :2]) / 2
    down = (mid_hip - neck) / max(np.linalg.norm(mid_hip - neck), 1e-6)
    across = np.array([-down[1], down[0]])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rel_x, rel_y = xx - neck[0], yy - neck[1]
    u = (rel_x * across[0] + rel_y * across[1]) / (appearance.pattern_period * unit)  # across the torso
    v = (rel_x * down[0] + rel_y * down[1]) / (appearance.pattern_period * unit)  # along the torso
    if appearance.pattern == "horizontal_stripes":
        return np.floor(v) % 2 == 1
    if appearance.pattern == "vertical_stripes":
        return np.floor(u) % 2 == 1
    if appearance.pattern == "checker":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.35**2  # dots


def _point(xy) -> tuple[int, int]:
    return int(round(float(xy[0]))), int(round(float(xy[1])))


def draw_figure(keypoints: np.ndarray, appearance: Appearance, size: int) -> np.ndarray:
    """Draws the person with these keypoints: uint8 ``[size, size, 3]`` RGB."""
    unit = body_scale(keypoints)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = appearance.background

    def width(w: float) -> int:  # body units -> pixels
        return max(1, int(round(w * unit)))

    def limb(a: int, b: int, color, w: float) -> None:
        cv2.line(image, _point(keypoints[a]), _point(keypoints[b]), color, width(w), cv2.LINE_AA)

    def disc(xy, radius: float, color) -> None:
        cv2.circle(image, _point(xy), width(radius), color, -1, cv2.LINE_AA)

    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        limb(hip, knee, appearance.pants, _LEG_WIDTH)
        limb(knee, ankle, appearance.pants, _LEG_WIDTH * 0.85)
        disc(keypoints[ankle], 0.035, appearance.shoes)
    # Torso: shoulders and slightly widened hips, filled with the shirt and its pattern.
    mid_hip = (keypoints[8, :2] + keypoints[11, :2]) / 2
    corners = [keypoints[2, :2], keypoints[5, :2]] + [keypoints[j, :2] * 1.4 - mid_hip * 0.4 for j in (11, 8)]
    mask = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(mask, np.round(np.stack(corners)).astype(np.int32), 1, cv2.LINE_8)
    cv2.line(mask, _point(keypoints[2]), _point(keypoints[5]), 1, width(_ARM_WIDTH))  # round the shoulders
    torso = mask.astype(bool)
    image[torso] = appearance.shirt
    image[torso & _pattern_mask(appearance, keypoints, size, unit)] = appearance.shirt_pattern
    for shoulder, elbow, wrist in ((2, 3, 4), (5, 6, 7)):
        limb(shoulder, elbow, appearance.shirt, _ARM_WIDTH)
        limb(elbow, wrist, appearance.skin, _ARM_WIDTH * 0.8)
        disc(keypoints[wrist], 0.03, appearance.skin)
    # Head: a neck, then a hair disc shifted up behind the face disc.
    nose = keypoints[0, :2]
    head_up = (keypoints[14, :2] + keypoints[15, :2]) / 2 - nose
    head_up = head_up / max(np.linalg.norm(head_up), 1e-6)
    center = nose - 0.01 * unit * head_up
    limb(1, 0, appearance.skin, 0.04)
    disc(center + 0.025 * unit * head_up, _HEAD_RADIUS, appearance.hair)
    disc(center, _HEAD_RADIUS * 0.85, appearance.skin)
    return image
