"""Temporal consistency of generated clips: the mean absolute difference between consecutive frames (uint8 scale),
compared with the ground truth's own. A clip that flickers more than its ground truth has a ratio above 1."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np


def consecutive_difference(frames: Iterable[np.ndarray]) -> Tuple[float, int]:
    """(sum of the per-pixel mean |frame[t+1] - frame[t]| over t, number of consecutive pairs) of uint8 [H, W, 3]
    frames, read one at a time."""
    total, count, previous = 0.0, 0, None
    for frame in frames:
        frame = np.asarray(frame, np.float32)
        if previous is not None:
            total += float(np.abs(frame - previous).mean())
            count += 1
        previous = frame
    return total, count


def mean_consecutive_difference(frames: Iterable[np.ndarray]) -> float:
    total, count = consecutive_difference(frames)
    return total / count if count else float("nan")


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def sequences(pairs: Sequence) -> List[List]:
    """The evaluation pairs as clips: per video (targets named ``video/frame``, TikTok's names) one pair per distinct
    target, in natural frame order; clips of at least 2 frames."""
    groups: Dict[str, Dict[str, object]] = {}
    for pair in pairs:
        if "/" in pair.target_name:
            groups.setdefault(pair.target_name.split("/")[0], {}).setdefault(pair.target_name, pair)
    clips = [sorted(g.values(), key=lambda p: _natural(p.target_name)) for g in groups.values()]
    return [clip for clip in clips if len(clip) >= 2]


def first_source(clip: Sequence):
    """The clip's pair whose source frame comes first: its person is animated along the clip."""
    return min(clip, key=lambda p: _natural(p.source_name))


def temporal_consistency(clips: Sequence[Sequence], load_generated, load_truth) -> Dict:
    """The figure over ``clips`` (lists of pairs): ``load_generated(pair)`` / ``load_truth(pair)`` -> uint8 frames."""
    if not clips:
        return {"available": False, "reason": "no clips: the pairs have no targets of one video (video/frame names) "
                                              "with one source"}
    gen, truth, n = 0.0, 0.0, 0
    for clip in clips:
        g, count = consecutive_difference(load_generated(p) for p in clip)
        t, _ = consecutive_difference(load_truth(p) for p in clip)
        gen, truth, n = gen + g, truth + t, n + count
    return {"available": True, "value": gen / n, "ground_truth": truth / n,
            "ratio": (gen / truth) if truth else None, "n": n, "clips": len(clips),
            "protocol": "mean |frame[t+1] - frame[t]| (uint8 scale) over consecutive frames of each clip"}
