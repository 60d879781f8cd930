"""Pose test helpers: keypoints whose discs do not touch, and an OpenPose detector with a scripted body network."""

import numpy as np

from pmf_jax.pose import detect


def spread_joints(height, width):
    """Joints on a grid, far enough apart that no disc covers another."""
    kps = np.zeros((18, 3), np.float32)
    for j in range(18):
        kps[j] = (width * (0.1 + 0.16 * (j % 6)), height * (0.15 + 0.3 * (j // 6)), 1.0)
    return np.round(kps)


class FakeBody:
    """Stands in for controlnet_aux's Body network: one person with joint j at (10 + 20 j, 40 + j) in pixels of the
    image it is given (controlnet_aux's candidate / subset format), so the mapping back to the input is checkable."""

    def __init__(self, people=1):
        self.format_body_result = detect.controlnet_aux_open_pose().Body.format_body_result
        self.shapes, self.people = [], people

    def __call__(self, image):
        self.shapes.append(image.shape)
        if not self.people:
            return np.zeros((0, 4)), -np.ones((0, 20))
        candidate = np.array([[10 + 20 * j, 40 + j, 0.5, j] for j in range(18) if j != 7], np.float64)
        subset = -np.ones((1, 20))
        subset[0, [j for j in range(18) if j != 7]] = np.arange(17)
        subset[0, 18:] = (8.5, 17)
        return candidate, subset


def fake_detector(people=1):
    return detect.controlnet_aux_open_pose().OpenposeDetector(FakeBody(people))
