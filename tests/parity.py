"""Helpers for parity tests against the PyTorch oracles (diffusers / transformers)."""

from __future__ import annotations

import numpy as np


def rel_err(ours, theirs) -> float:
    """‖ours − theirs‖ / ‖theirs‖ (Frobenius), in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))


def to_nhwc(t) -> np.ndarray:
    """torch NCHW tensor -> numpy NHWC."""
    return t.detach().cpu().numpy().transpose(0, 2, 3, 1)


def to_nchw(x):
    """numpy NHWC -> torch NCHW float32 tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(0, 3, 1, 2)))


def randomize_(model, seed: int = 0, scale: float = 0.2):
    """Gives every parameter random values (zero-initialised layers included, e.g. ControlNet zero convs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model
