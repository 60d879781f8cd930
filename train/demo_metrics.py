"""The demo's scores of generated images against the ground truth: SSIM, PSNR and the colour error on the person.

synthetic_pairs draws each person on a plain background of one colour, so the person's pixels in a ground-truth
image are those whose colour differs from its most frequent colour. The colour error is the mean CIE76 ΔE (Euclidean
distance in CIE-Lab, D65) between generated and true pixels over that mask: 0 is exact; about 2 is the smallest
difference people notice; above about 20 the colours read as different colours.

Pixel by pixel, that error also counts every blurred or shifted edge of a thin limb as a wrong colour. The clothing
colour error asks only whether the clothes have the right colours: per garment region placed by the target's
keypoints — the shirt (the torso's quadrilateral: shoulders and hips) and each trouser leg (its centre line, hip to
knee to ankle) — the ΔE between the mean colour of the generated pixels and the mean colour of the true pixels of
that region, averaged over the regions.
"""

from __future__ import annotations

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[..., 3] in [-1, 1] -> uint8 [..., 3] (clipped, rounded)."""
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8)


def person_mask(truth: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels of uint8 ``truth`` [H, W, 3] whose colour is not the image's most frequent one (the
    background)."""
    colours, counts = np.unique(truth.reshape(-1, 3), axis=0, return_counts=True)
    return np.any(truth != colours[np.argmax(counts)], axis=-1)


def person_colour_error(generated: np.ndarray, truth: np.ndarray) -> float:
    """Mean CIE76 ΔE over the person mask of ``truth``; uint8 [H, W, 3] each. NaN when the mask is empty."""
    from skimage.color import rgb2lab

    mask = person_mask(truth)
    if not mask.any():
        return float("nan")
    delta = rgb2lab(generated[mask][None]) - rgb2lab(truth[mask][None])  # [1, P, 3] Lab
    return float(np.mean(np.linalg.norm(delta, axis=-1)))


SHIRT_CORNERS = (2, 5, 11, 8)             # COCO-18: right shoulder, left shoulder, left hip, right hip
LEGS = ((8, 9, 10), (11, 12, 13))         # hip, knee, ankle


def clothing_regions(keypoints: np.ndarray, size) -> list:
    """bool ``[H, W]`` masks of the garments placed by ``keypoints`` (float ``[18, 3]``: x, y, confidence; pixels of
    an image of ``size`` (H, W)): the shirt, then each trouser leg whose joints are all present."""
    import cv2

    h, w = size
    present = lambda joints: all(keypoints[j, 2] > 0 for j in joints)  # noqa: E731
    point = lambda j: (int(round(float(keypoints[j, 0]))), int(round(float(keypoints[j, 1]))))  # noqa: E731
    regions = []
    if present(SHIRT_CORNERS):
        shirt = np.zeros((h, w), np.uint8)
        cv2.fillPoly(shirt, [np.array([point(j) for j in SHIRT_CORNERS], np.int32)], 1)
        regions.append(shirt.astype(bool))
    for leg in LEGS:
        if present(leg):
            line = np.zeros((h, w), np.uint8)
            for a, b in zip(leg, leg[1:]):
                cv2.line(line, point(a), point(b), 1, 1)
            regions.append(line.astype(bool))
    return [r for r in regions if r.sum() >= 3]


def clothing_colour_error(generated: np.ndarray, truth: np.ndarray, keypoints: np.ndarray) -> float:
    """Mean over :func:`clothing_regions` of the CIE76 ΔE between the region's mean Lab colour in ``generated`` and
    in ``truth`` (uint8 [H, W, 3] each). NaN when no region is placed."""
    from skimage.color import rgb2lab

    regions = clothing_regions(keypoints, truth.shape[:2])
    if not regions:
        return float("nan")
    gen_lab, true_lab = rgb2lab(generated), rgb2lab(truth)
    return float(np.mean([np.linalg.norm(gen_lab[r].mean(0) - true_lab[r].mean(0)) for r in regions]))


def score(generated: np.ndarray, truth: np.ndarray, keypoints=None) -> dict:
    """Per-image SSIM (scikit-image, RGB, data_range 255, 7x7 window), PSNR and person colour error (ΔE), and with
    the targets' ``keypoints`` ([B, 18, 3] in pixels) the clothing colour error, averaged over the images; images
    [B, H, W, 3] in [-1, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g, t = to_uint8(generated), to_uint8(truth)
    ssim = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(g, t)]
    psnr = [peak_signal_noise_ratio(b, a, data_range=255) for a, b in zip(g, t)]
    colour = [person_colour_error(a, b) for a, b in zip(g, t)]
    result = {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr)),
              "person_colour_error": float(np.nanmean(colour))}
    if keypoints is not None:
        result["clothing_colour_error"] = float(np.nanmean(
            [clothing_colour_error(a, b, k) for a, b, k in zip(g, t, keypoints)]))
    return result
