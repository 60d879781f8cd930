"""The demo's scores of generated images against the ground truth: SSIM, PSNR and the colour error on the person.

synthetic_pairs draws each person on a plain background of one colour, so the person's pixels in a ground-truth
image are those whose colour differs from its most frequent colour. The colour error is the mean CIE76 ΔE (Euclidean
distance in CIE-Lab, D65) between generated and true pixels over that mask: 0 is exact; about 2 is the smallest
difference people notice; above about 20 the colours read as different colours.
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


def score(generated: np.ndarray, truth: np.ndarray) -> dict:
    """Per-image SSIM (scikit-image, RGB, data_range 255, 7x7 window), PSNR and person colour error (ΔE), averaged
    over the images; inputs [B, H, W, 3] in [-1, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g, t = to_uint8(generated), to_uint8(truth)
    ssim = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(g, t)]
    psnr = [peak_signal_noise_ratio(b, a, data_range=255) for a, b in zip(g, t)]
    colour = [person_colour_error(a, b) for a, b in zip(g, t)]
    return {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr)),
            "person_colour_error": float(np.nanmean(colour))}
