"""Synthetic pose sequences: a figure of the synthetic_pairs kinematics (``figures.py``) dancing — every joint angle
swings smoothly within its limits — for ``pmf animate`` demos, tests and benchmarks.

    python -m data.synthetic_pairs.motion OUT_DIR [--frames 24] [--size 64] [--seed 0]

writes ``source.png`` (the person, standing), ``poses.json`` (the sequence: one OpenPose object per frame with the
canvas size), ``truth/frame_XXXXX.png`` (the same person drawn in every pose: the ground truth) and
``driving/frame_XXXXX.png`` (another person dancing: what a driving video shows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data.synthetic_pairs import figures

SIDES = ("right", "left")


def dance_angles(phase: float, rng_phases: np.ndarray) -> dict:
    """Joint angles at ``phase`` (cycles; one full dance per 1.0): each angle is the middle of its LIMITS plus a
    sine of 40 % of the range, with its own phase offset."""
    angles, k = {}, 0
    names = ["torso_lean", "head_tilt"] + [f"{s}_{j}" for s in SIDES for j in ("shoulder", "elbow", "hip", "knee")]
    for name in names:
        lo, hi = figures.LIMITS[name.split("_", 1)[1] if name.startswith(SIDES) else name]
        mid, amp = (lo + hi) / 2, 0.4 * (hi - lo)
        angles[name] = mid + amp * np.sin(2 * np.pi * (phase + rng_phases[k]))
        k += 1
    return angles


def dance(frames: int = 24, size: int = 64, seed: int = 0) -> np.ndarray:
    """One dance cycle of ``frames`` poses in a ``size`` x ``size`` image: float32 [frames, 18, 3] (pixels,
    confidence 1). One scale and offset for the whole clip, so the figure fills about 80 % of the frame."""
    rng = np.random.default_rng(seed)
    offsets = rng.random(10)
    joints = np.stack([figures.forward_kinematics(dance_angles(i / frames, offsets)) for i in range(frames)])
    lo, hi = joints.reshape(-1, 2).min(0) - 0.09, joints.reshape(-1, 2).max(0) + 0.09
    scale = 0.8 * size / (hi - lo).max()
    centre = (lo + hi) / 2
    keypoints = np.ones((frames, 18, 3), np.float32)
    keypoints[..., :2] = (joints - centre) * scale + size / 2
    return keypoints


def write_clip(folder, frames: int = 24, size: int = 64, seed: int = 0) -> dict:
    """Writes the files of the module docstring into ``folder``; returns their paths."""
    from PIL import Image

    from pmf_jax.pose.sequence import write_sequence_json

    folder = Path(folder)
    (folder / "truth").mkdir(parents=True, exist_ok=True)
    (folder / "driving").mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    person, dancer = figures.sample_appearance(rng), figures.sample_appearance(rng)
    poses = dance(frames, size, seed)
    standing = dance(1, size, seed + 1000)[0]
    Image.fromarray(figures.draw_figure(standing, person, size)).save(folder / "source.png")
    for i, kps in enumerate(poses):
        Image.fromarray(figures.draw_figure(kps, person, size)).save(folder / "truth" / f"frame_{i:05d}.png")
        Image.fromarray(figures.draw_figure(kps, dancer, size)).save(folder / "driving" / f"frame_{i:05d}.png")
    write_sequence_json(folder / "poses.json", poses, size, size, fps=12)
    return {"source": folder / "source.png", "poses": folder / "poses.json", "truth": folder / "truth",
            "driving": folder / "driving"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_clip(args.out, args.frames, args.size, args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
