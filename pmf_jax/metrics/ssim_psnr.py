"""SSIM and PSNR in JAX, with the pose-transfer protocol's settings (checked against scikit-image in the tests).

The protocol (PATN → GFLA → PIDM, CFLD; the numbers every DeepFashion paper reports as "SSIM") calls
``skimage.metrics.structural_similarity(gt, generated, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
channel_axis=-1, data_range=generated.max() - generated.min())`` on 256x176 RGB images with values in [0, 255], one
image at a time, and averages over the test pairs. So:

- an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma), population (not sample) covariances,
  K1 = 0.01, K2 = 0.03;
- ``data_range`` is the **generated image's** own max - min (over all channels), not 255 — a quirk of the original
  script that every later paper kept; ``data_range="dtype"`` gives the textbook 255 instead;
- SSIM is computed per channel and averaged; the 5-pixel border the window does not cover is left out (skimage's
  crop), so a "valid" separable filter gives exactly skimage's numbers.

PSNR is ``skimage.metrics.peak_signal_noise_ratio(gt, generated, data_range=255)`` on uint8 (CFLD's ``data_range=1``
on [0, 1] floats is the same), per image, then averaged.

PCDMs' released script uses sigma=1.2 for the same "SSIM_256"; pass ``sigma=1.2`` to reproduce it.
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

SIGMA = 1.5
TRUNCATE = 3.5  # skimage's value with gaussian_weights=True: an 11-tap window at sigma 1.5
K1, K2 = 0.01, 0.03
DataRange = Union[str, float]  # "generated" (the protocol), "dtype" (255), or a number


def gaussian_window(sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """The 1-D Gaussian taps scipy.ndimage uses (radius ``int(truncate * sigma + 0.5)``), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _valid_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of ``x`` [..., H, W, C] along H and W: [..., H - 2r, W - 2r, C]."""
    r = len(taps) - 1
    h, w = x.shape[-3], x.shape[-2]
    x = sum(float(t) * x[..., k : h - r + k, :, :] for k, t in enumerate(taps))
    return sum(float(t) * x[..., :, k : w - r + k, :] for k, t in enumerate(taps))


@functools.partial(jax.jit, static_argnames=("sigma", "data_range"))
def _ssim(generated: jax.Array, reference: jax.Array, sigma: float, data_range) -> jax.Array:
    taps = gaussian_window(sigma)
    x = reference.astype(jnp.float32)
    y = generated.astype(jnp.float32)
    if data_range == "generated":
        rng = jnp.max(y, axis=(1, 2, 3)) - jnp.min(y, axis=(1, 2, 3))  # [B]
    elif data_range == "dtype":
        rng = jnp.full(x.shape[:1], 255.0)
    else:
        rng = jnp.full(x.shape[:1], float(data_range))
    # Moments of images shifted by their own mean: same SSIM, but E[x^2] - E[x]^2 cancels far less in float32.
    cx = jnp.mean(x, axis=(1, 2), keepdims=True)
    cy = jnp.mean(y, axis=(1, 2), keepdims=True)
    xs, ys = x - cx, y - cy
    stacked = jnp.stack([xs, ys, xs * xs, ys * ys, xs * ys])  # [5, B, H, W, C]
    ux, uy, uxx, uyy, uxy = _valid_filter(stacked, taps)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    ux, uy = ux + cx, uy + cy
    c1 = ((K1 * rng) ** 2)[:, None, None, None]
    c2 = ((K2 * rng) ** 2)[:, None, None, None]
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def ssim(generated, reference, sigma: float = SIGMA, data_range: DataRange = "generated") -> jax.Array:
    """Per-image SSIM with the protocol's settings (see the module docstring).

    Args:
      generated, reference: uint8 (or float in [0, 255]) ``[B, H, W, 3]``, H and W at least the window (11).
      sigma: Gaussian window sigma (1.5; PCDMs' script: 1.2).
      data_range: ``"generated"`` (the protocol: max - min of each generated image), ``"dtype"`` (255), or a number.
    Returns:
      float32 ``[B]``.
    """
    generated, reference = _check_pair(generated, reference)
    if min(generated.shape[1:3]) < len(gaussian_window(sigma)):
        raise ValueError(f"images {generated.shape[1:3]} are smaller than the SSIM window")
    if not isinstance(data_range, str):
        data_range = float(data_range)
    elif data_range not in ("generated", "dtype"):
        raise ValueError(f"data_range={data_range!r}: 'generated', 'dtype' or a number")
    return _ssim(generated, reference, float(sigma), data_range)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(generated: jax.Array, reference: jax.Array, data_range: float) -> jax.Array:
    diff = generated.astype(jnp.float32) - reference.astype(jnp.float32)
    mse = jnp.mean(diff * diff, axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)  # inf for identical images, as skimage


def psnr(generated, reference, data_range: float = 255.0) -> jax.Array:
    """Per-image PSNR in dB: ``10 log10(data_range^2 / MSE)`` over all pixels and channels; float32 ``[B]``."""
    generated, reference = _check_pair(generated, reference)
    return _psnr(generated, reference, float(data_range))


def _check_pair(generated, reference):
    generated, reference = jnp.asarray(generated), jnp.asarray(reference)
    if generated.shape != reference.shape or generated.ndim != 4 or generated.shape[-1] != 3:
        raise ValueError(f"expected two [B, H, W, 3] batches of one shape, got {generated.shape} and {reference.shape}")
    return generated, reference

