"""A sampling result holding NaN or Inf is an error, never a saved black image (``to_pil`` would clip NaN to 0)."""

from __future__ import annotations

import numpy as np

from pmf_jax.errors import PMFInputError


def check_finite_output(out: np.ndarray, what: str = "sampling") -> None:
    """Raises PMFInputError when any of the N outputs ``out`` (``[N, ...]``: images or latents, on the host) holds
    NaN or Inf; one vectorised reduction, then the count of bad outputs for the message."""
    out = np.asarray(out)
    if out.size == 0 or np.isfinite(out).all():
        return
    bad = int((~np.isfinite(out.reshape(out.shape[0], -1))).any(axis=1).sum())
    raise PMFInputError(f"{what}: {bad} of {out.shape[0]} outputs hold NaN or Inf values, so no image is written; the "
                        f"model's weights or the guidance scales are broken (try guidance 1.0, or check the weights)")
